//! The `tower-server` subcommands an operator scripts (`token`, `user-token`,
//! `kubeconfig`), run as the real binary: what they print works end to end, says what it
//! should, takes its flags from the environment too, and bad usage exits 2 with a reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use tower_e2e::{
    ANY_PORTS, Member, SECRET, TempDir, agent, bin_path, kubectl, kubectl_command, run_with_input,
    server,
};

/// Runs `tower-server ARGS` with `env` and none of the caller's own TOWER_ variables.
fn tower_server(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(bin_path("tower-server"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TOWER_") {
            command.env_remove(key);
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run tower-server")
}

/// Stdout of a run that must have succeeded, trimmed.
fn printed(out: &Output) -> String {
    assert!(
        out.status.success(),
        "tower-server failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .expect("UTF-8")
        .trim()
        .to_owned()
}

/// Stderr of a run that must have been refused as bad usage (exit 2, nothing printed).
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = tower_server(args, env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed something");
    stderr
}

/// The claims of a JWT, unverified (the server and agent check the signature).
fn claims(jwt: &str) -> serde_json::Value {
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT: {jwt}");
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[1])
        .expect("base64url payload");
    serde_json::from_slice(&payload).expect("JSON claims")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Asserts `exp` is `ttl` seconds after `iat`, and `iat` is now.
fn assert_lifetime(claims: &serde_json::Value, ttl: u64) {
    let iat = claims["iat"].as_u64().expect("iat");
    assert!(iat.abs_diff(now()) <= 60, "iat {iat} is now: {claims}");
    assert_eq!(claims["exp"].as_u64(), Some(iat + ttl), "{claims}");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn an_agent_token_from_the_cli_connects_and_carries_its_claims() {
    let member = Member::start();
    let server = server().start();
    let secret = path(&server.secret_file);

    let token = printed(&tower_server(
        &[
            "token",
            "--jwt-secret-file",
            secret,
            "--cluster",
            "member-1",
        ],
        &[],
    ));
    let agent_claims = claims(&token);
    assert_eq!(agent_claims["sub"], "member-1", "{agent_claims}");
    let aud = &agent_claims["aud"];
    assert!(
        aud == "tower-agent" || aud.as_array().is_some_and(|a| a == &["tower-agent"]),
        "{agent_claims}"
    );
    assert!(
        agent_claims.get("exp").is_none_or(|e| e.is_null()),
        "no --ttl, no expiry: {agent_claims}"
    );
    assert!(
        agent_claims["jti"].as_str().is_some_and(|j| !j.is_empty()),
        "{agent_claims}"
    );

    let _agent = agent(&server, &member, "member-1")
        .token(&token)
        .connect(&server);

    // --ttl is honoured, and every flag can come from the environment instead.
    let expiring = printed(&tower_server(
        &[
            "token",
            "--jwt-secret-file",
            secret,
            "--cluster",
            "member-1",
            "--ttl",
            "1h",
        ],
        &[],
    ));
    assert_lifetime(&claims(&expiring), 3600);
    let from_env = printed(&tower_server(
        &["token"],
        &[
            ("TOWER_JWT_SECRET", SECRET),
            ("TOWER_CLUSTER", "member-2"),
            ("TOWER_TTL", "90s"),
        ],
    ));
    let env_claims = claims(&from_env);
    assert_eq!(env_claims["sub"], "member-2", "{env_claims}");
    assert_lifetime(&env_claims, 90);
    // Signed with the shared secret: the second cluster connects with it too.
    let _second = agent(&server, &member, "member-2")
        .token(&from_env)
        .connect(&server);
}

#[test]
fn a_user_token_from_the_cli_reaches_the_member_as_that_user_and_groups() {
    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let secret = path(&server.secret_file);
    let dir = TempDir::new("cli");

    let token = printed(&tower_server(
        &[
            "user-token",
            "--jwt-secret-file",
            secret,
            "--user",
            "alice",
            "--group",
            "devs",
            "--group",
            "ops",
            "--ttl",
            "2h",
        ],
        &[],
    ));
    let user_claims = claims(&token);
    assert_eq!(user_claims["username"], "alice", "{user_claims}");
    assert_eq!(
        user_claims["groups"],
        serde_json::json!(["devs", "ops"]),
        "{user_claims}"
    );
    assert_eq!(user_claims["token_type"], "access_token", "{user_claims}");
    assert_lifetime(&user_claims, 2 * 3600);

    // The default lifetime is a day.
    let default_ttl = printed(&tower_server(
        &["user-token", "--jwt-secret-file", secret, "--user", "carol"],
        &[],
    ));
    let default_claims = claims(&default_ttl);
    assert_lifetime(&default_claims, 24 * 3600);
    assert!(
        default_claims["groups"].is_null() || default_claims["groups"] == serde_json::json!([]),
        "no --group, no groups: {default_claims}"
    );

    let frontend = format!("https://{}", server.frontend);
    let kubeconfig = printed(&tower_server(
        &[
            "kubeconfig",
            "--cluster",
            "member-1",
            "--server",
            &frontend,
            "--token",
            &token,
            "--ca-cert",
            path(&server.ca_file),
        ],
        &[],
    ));
    let kc = dir.path().join("alice");
    std::fs::write(&kc, kubeconfig).unwrap();
    let pods = kubectl(&kc, &["get", "pods"]).success();
    assert!(pods.contains("web-0"), "{pods}");
    let calls = member.api.calls();
    assert!(!calls.is_empty());
    for call in &calls {
        assert_eq!(call.credential, "token", "{call:?}");
        assert_eq!(call.impersonate_user.as_deref(), Some("alice"), "{call:?}");
        assert_eq!(call.impersonate_groups, ["devs", "ops"], "{call:?}");
    }

    // The same from environment variables alone: TOWER_GROUPS is a comma-separated list.
    let bob = printed(&tower_server(
        &["user-token"],
        &[
            ("TOWER_JWT_SECRET_FILE", secret),
            ("TOWER_USER", "bob"),
            ("TOWER_GROUPS", "viewers,auditors"),
            ("TOWER_TTL", "10m"),
        ],
    ));
    let bob_claims = claims(&bob);
    assert_eq!(bob_claims["username"], "bob");
    assert_eq!(
        bob_claims["groups"],
        serde_json::json!(["viewers", "auditors"])
    );
    assert_lifetime(&bob_claims, 600);
    let kubeconfig = printed(&tower_server(
        &["kubeconfig"],
        &[
            ("TOWER_CLUSTER", "member-1"),
            ("TOWER_SERVER", &frontend),
            ("TOWER_TOKEN", &bob),
            ("TOWER_CA_CERT", path(&server.ca_file)),
        ],
    ));
    let kc = dir.path().join("bob");
    std::fs::write(&kc, kubeconfig).unwrap();
    let before = member.api.calls().len();
    kubectl(&kc, &["get", "pods"]).success();
    let calls = member.api.calls();
    assert!(calls.len() > before);
    for call in &calls[before..] {
        assert_eq!(call.impersonate_user.as_deref(), Some("bob"), "{call:?}");
        assert_eq!(call.impersonate_groups, ["viewers", "auditors"], "{call:?}");
    }
}

/// `kubectl config view --raw -o jsonpath=…` of a kubeconfig.
fn jsonpath(kubeconfig: &Path, path: &str) -> String {
    let mut command = kubectl_command(kubeconfig);
    command.args(["config", "view", "--raw", "-o", &format!("jsonpath={path}")]);
    run_with_input(command, b"").success()
}

#[test]
fn a_kubeconfig_keeps_yaml_special_values_and_needs_no_ca() {
    let dir = TempDir::new("cli-yaml");
    let cases = [
        ("https://tower.example.com:9443", "plain.jwt.value"),
        ("https://tower.example.com:9443/", "*not-an-alias"),
        ("https://h:9443/&anchor", "'half-quoted"),
        ("https://h:9443/a#b", "\"x\":{y}[z]!w|v>u%t@s`r,q"),
        ("https://h:9443/p?x=1&y=*", "null"),
        ("https://h:9443", "true"),
        ("https://h:9443", "#comment"),
        ("https://h:9443", "0x1F"),
    ];
    for (n, (server, token)) in cases.into_iter().enumerate() {
        let out = tower_server(
            &[
                "kubeconfig",
                "--cluster",
                "member-1",
                "--server",
                server,
                "--token",
                token,
            ],
            &[],
        );
        let yaml = printed(&out);
        let kc = dir.path().join(format!("kubeconfig-{n}"));
        std::fs::write(&kc, &yaml).unwrap();
        let want_server = format!("{}/clusters/member-1", server.trim_end_matches('/'));
        assert_eq!(
            jsonpath(&kc, "{.clusters[0].cluster.server}"),
            want_server,
            "{yaml}"
        );
        assert_eq!(jsonpath(&kc, "{.users[0].user.token}"), token, "{yaml}");
        assert_eq!(jsonpath(&kc, "{.current-context}"), "member-1", "{yaml}");
        assert_eq!(
            jsonpath(&kc, "{.clusters[0].cluster.certificate-authority-data}"),
            "",
            "no --ca-cert, no CA: {yaml}"
        );
    }
}

#[test]
fn bad_usage_exits_2_with_the_reason() {
    let dir = TempDir::new("cli-usage");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let secret = path(&secret);

    let token = |extra: &[&'static str]| {
        let mut args = vec!["token", "--jwt-secret-file", secret];
        args.extend_from_slice(extra);
        args
    };
    let kubeconfig = |cluster: &'static str, server: &'static str, token: &'static str| {
        vec![
            "kubeconfig",
            "--cluster",
            cluster,
            "--server",
            server,
            "--token",
            token,
        ]
    };
    let mut bad_ca = kubeconfig("m", "https://h", "t");
    bad_ca.extend(["--ca-cert", secret]);
    let state = dir.path().join("state");
    let mut serve_anywhere = vec!["serve", "--jwt-secret-file", secret, "--state-dir"];
    serve_anywhere.push(path(&state));
    serve_anywhere.extend(ANY_PORTS);
    let none: &[(&str, &str)] = &[];
    let ttl_env: &[(&str, &str)] = &[
        ("TOWER_JWT_SECRET", SECRET),
        ("TOWER_CLUSTER", "m"),
        ("TOWER_TTL", "soon"),
    ];
    // Each bad invocation, and what its message must name.
    type Case<'a> = (Vec<&'a str>, &'a [(&'a str, &'a str)], Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (token(&[]), none, vec!["--cluster"]),
        (
            token(&["--cluster", "member-1", "--ttl", "5x"]),
            none,
            vec!["5x", "--ttl"],
        ),
        (vec!["token"], ttl_env, vec!["soon", "--ttl"]),
        // A lifetime past any date a JWT can carry is refused, not wrapped around.
        (
            token(&["--cluster", "m", "--ttl", "18446744073709551615s"]),
            none,
            vec!["--ttl", "at most 100 years"],
        ),
        // The rule is quoted with the name.
        (
            token(&["--cluster", "Member_1"]),
            none,
            vec!["\"Member_1\"", "DNS-1123"],
        ),
        (
            vec!["token", "--cluster", "member-1"],
            none,
            vec!["jwtSecret is required"],
        ),
        (
            vec![
                "token",
                "--jwt-secret-file",
                "/nonexistent/secret",
                "--cluster",
                "m",
            ],
            none,
            vec!["/nonexistent/secret"],
        ),
        (
            vec!["user-token", "--jwt-secret-file", secret],
            none,
            vec!["--user"],
        ),
        (
            vec![
                "user-token",
                "--jwt-secret-file",
                secret,
                "--user",
                "a",
                "--ttl",
                "5x",
            ],
            none,
            vec!["5x", "--ttl"],
        ),
        (
            kubeconfig("m", "http://h:9443", "t"),
            none,
            vec!["https://"],
        ),
        (kubeconfig("m", "https://h", "a b"), none, vec!["--token"]),
        (kubeconfig("a_b", "https://h", "t"), none, vec!["DNS-1123"]),
        (bad_ca, none, vec!["--ca-cert", secret]),
        // Bounds that used to panic later (an overflowing deadline, a semaphore too big).
        (
            vec!["serve", "--jwt-secret-file", secret, "--keepalive", "2h"],
            none,
            vec!["--keepalive must be between 100ms and 1h"],
        ),
        (
            vec![
                "serve",
                "--jwt-secret-file",
                secret,
                "--max-requests-per-cluster",
                "18446744073709551615",
            ],
            none,
            vec!["--max-requests-per-cluster must be between"],
        ),
        (
            vec![
                "serve",
                "--jwt-secret-file",
                secret,
                "--max-requests-per-user",
                "0",
            ],
            none,
            vec!["--max-requests-per-user must be between"],
        ),
        (
            vec![
                "serve",
                "--jwt-secret-file",
                secret,
                "--stream-idle-timeout",
                "400y",
            ],
            none,
            vec!["--stream-idle-timeout must be between"],
        ),
        // A worker count for the runtime that is not one (tokio's own variable).
        (
            serve_anywhere.clone(),
            &[("TOKIO_WORKER_THREADS", "0")],
            vec!["TOKIO_WORKER_THREADS", "at least 1"],
        ),
        (
            serve_anywhere,
            &[("TOKIO_WORKER_THREADS", "two")],
            vec!["TOKIO_WORKER_THREADS", "\"two\""],
        ),
    ];
    for (args, env, names) in cases {
        let e = refused(&args, env);
        assert!(names.iter().all(|n| e.contains(n)), "{args:?}: {e}");
    }
}
