//! Bad input, each with its own status and message; the server keeps serving others.

use std::io::{Read, Write};
use std::time::Duration;

use base64::Engine;
use tower_e2e::{Https, Member, Server, agent, server, wait_for};

fn forged(header: &str, claims: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("{}.{}.{}", b64(header), b64(claims), b64("signature"))
}

#[test]
fn frontend_refuses_bad_tokens_names_and_targets_with_clear_messages() {
    let member = Member::start();
    let dir = tower_e2e::TempDir::new("clusters");
    let clusters = dir.path().join("clusters.yaml");
    std::fs::write(&clusters, "clusters:\n- name: member-1\n- name: member-2\n")
        .expect("clusters file");
    let server = server()
        .args(&["--clusters", clusters.to_str().expect("path")])
        .start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let https = Https::frontend(&server);
    let minter = Server::minter();
    let user = minter.user_token("alice", &[], Some(Duration::from_secs(600)));
    let other_secret =
        tower_auth::Minter::new(&tower_auth::Secret::new("not the shared secret").expect("secret"))
            .user_token("alice", &[], None);
    let expired = minter.sign(&serde_json::json!({
        "username": "alice", "token_type": "access_token", "exp": 1_000_000_000u64
    }));
    let none = forged(
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"username":"admin","token_type":"access_token"}"#,
    );
    let agent_token = minter.agent_token("member-1", None);

    let path = "/clusters/member-1/api/v1/namespaces/default/pods";
    assert_eq!(https.get(path, Some(&user)).status, 200);
    for (token, message) in [
        (None, "no bearer token"),
        (Some("garbage"), "malformed token"),
        (Some(other_secret.as_str()), "signature does not match"),
        (Some(expired.as_str()), "token expired"),
        (Some(none.as_str()), "alg: none"),
        (
            Some(agent_token.as_str()),
            "agent token (aud tower-agent) cannot be used as a user token",
        ),
    ] {
        let reply = https.get(path, token);
        assert_eq!(reply.status, 401, "{token:?}: {}", reply.body);
        assert!(reply.body.contains(message), "{token:?}: {}", reply.body);
        assert!(reply.body.contains("\"kind\":\"Status\""), "{}", reply.body);
    }

    for bad in [
        "/clusters/../api",
        "/clusters/a%2fb/api",
        "/clusters/Member/api",
        "/clusters/-x/api",
    ] {
        let reply = https.get(bad, Some(&user));
        assert_eq!(reply.status, 400, "{bad}: {}", reply.body);
        assert!(
            reply.body.contains("DNS-1123 subdomain"),
            "{bad}: {}",
            reply.body
        );
    }
    let unknown = https.get("/clusters/nowhere/api", Some(&user));
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    assert!(unknown.body.contains("not registered"), "{}", unknown.body);
    let down = https.get("/clusters/member-2/api", Some(&user));
    assert_eq!(down.status, 503, "{}", down.body);
    assert!(down.body.contains("no agent connected"), "{}", down.body);
    let target = https.get(
        "/clusters/member-1/targets/kubesphere/kapis/version",
        Some(&user),
    );
    assert_eq!(target.status, 403, "{}", target.body);
    assert!(
        target.body.contains("not on this agent's allowlist"),
        "{}",
        target.body
    );

    // Still serving after all that.
    assert_eq!(https.get(path, Some(&user)).status, 200);
}

#[test]
fn tunnel_handshake_refusals_are_plain_http() {
    let member = Member::start();
    let dir = tower_e2e::TempDir::new("clusters");
    let clusters = dir.path().join("clusters.yaml");
    std::fs::write(&clusters, "clusters:\n- name: member-1\n").expect("clusters file");
    let server = server()
        .args(&[
            "--clusters",
            clusters.to_str().expect("path"),
            "--server-id",
            "tower-x",
        ])
        .start();
    let tunnel = Https::to(&server, server.tunnel);
    let minter = Server::minter();
    let good = minter.agent_token("member-1", None);
    let user = minter.user_token("alice", &[], None);
    let stranger = minter.agent_token("member-9", None);
    let upgrade = [
        ("connection", "Upgrade"),
        ("upgrade", "tower-tunnel/1"),
        ("tower-cluster", "member-1"),
    ];

    assert_eq!(tunnel.get("/healthz", None).status, 200);
    let plain = tunnel.request("GET", "/v1/tunnel", Some(&good), &[]);
    assert_eq!(plain.status, 400, "{}", plain.body);
    let version = tunnel.request(
        "GET",
        "/v1/tunnel",
        Some(&good),
        &[
            ("connection", "Upgrade"),
            ("upgrade", "tower-tunnel/9"),
            ("tower-cluster", "member-1"),
        ],
    );
    assert_eq!(version.status, 426, "{}", version.body);
    let missing = tunnel.request("GET", "/v1/tunnel", None, &upgrade);
    assert_eq!(missing.status, 401, "{}", missing.body);
    let user_as_agent = tunnel.request("GET", "/v1/tunnel", Some(&user), &upgrade);
    assert_eq!(user_as_agent.status, 401);
    assert!(
        user_as_agent
            .body
            .contains("a user token cannot be used as an agent token"),
        "{}",
        user_as_agent.body
    );
    let mismatch = tunnel.request(
        "GET",
        "/v1/tunnel",
        Some(&good),
        &[
            ("connection", "Upgrade"),
            ("upgrade", "tower-tunnel/1"),
            ("tower-cluster", "member-2"),
        ],
    );
    assert_eq!(mismatch.status, 403);
    assert!(
        mismatch.body.contains("does not match its token"),
        "{}",
        mismatch.body
    );
    let not_listed = tunnel.request(
        "GET",
        "/v1/tunnel",
        Some(&stranger),
        &[
            ("connection", "Upgrade"),
            ("upgrade", "tower-tunnel/1"),
            ("tower-cluster", "member-9"),
        ],
    );
    assert_eq!(not_listed.status, 403);
    assert!(
        not_listed
            .body
            .contains("not in this server's clusters file"),
        "{}",
        not_listed.body
    );

    let duplicate = tunnel.request(
        "GET",
        "/v1/tunnel",
        Some(&good),
        &[
            ("connection", "Upgrade"),
            ("upgrade", "tower-tunnel/1"),
            ("tower-cluster", "member-1"),
            ("tower-held-servers", "tower-w,tower-x"),
        ],
    );
    assert_eq!(duplicate.status, 409, "{}", duplicate.body);
    assert!(
        duplicate
            .body
            .contains("already holds a tunnel to replica \"tower-x\""),
        "{}",
        duplicate.body
    );

    // The agent binary refuses a --name that is not its token's before dialing.
    let mut wrong_name = agent(&server, &member, "member-2").token(&good).spawn();
    assert_eq!(
        wrong_name.process.wait_exit(Duration::from_secs(10)),
        Some(2)
    );
    assert!(
        wrong_name
            .process
            .log()
            .contains("does not match the token"),
        "{}",
        wrong_name.process.log()
    );

    // A wrong CA pin never connects, and says why.
    let pin = format!("--ca-hash=sha256:{}", "0".repeat(64));
    let pinned_wrong = agent(&server, &member, "member-1").args(&[&pin]).spawn();
    wait_for(
        "the pin refusal in the agent's log",
        Duration::from_secs(20),
        || {
            pinned_wrong
                .process
                .log()
                .contains("does not contain the CA pinned by --ca-hash")
                .then_some(())
        },
    );
    assert_eq!(pinned_wrong.readyz(), 503);
    assert!(!server.connected("member-1"));
    drop(pinned_wrong);

    // The right pin (the CA's SPKI hash) connects.
    let ca = tower_tunnel::tls::certs_from_pem(server.ca_pem.as_bytes()).expect("CA");
    let pin = format!(
        "--ca-hash={}",
        tower_tunnel::tls::spki_pin(&ca[0]).expect("pin")
    );
    let pinned = agent(&server, &member, "member-1")
        .args(&[&pin])
        .connect(&server);
    wait_for("agent /readyz", Duration::from_secs(10), || {
        (pinned.readyz() == 200).then_some(())
    });
}

#[test]
fn slow_and_oversized_headers_are_cut_off_without_hurting_others() {
    let member = Member::start();
    let server = server()
        .args(&["--header-read-timeout", "1s", "--max-header-bytes", "16384"])
        .start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let https = Https::frontend(&server);
    let user = Server::minter().user_token("alice", &[], None);

    // A client that never finishes its headers is disconnected.
    let mut slow = std::net::TcpStream::connect(server.admin).expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .expect("partial headers");
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let mut answer = Vec::new();
    let read = slow.read_to_end(&mut answer);
    assert!(
        read.is_ok(),
        "the server closed the slow connection instead of waiting forever: {read:?}"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(text.is_empty() || text.contains("408"), "{text}");

    let huge = "x".repeat(32 * 1024);
    let reply = https.request(
        "GET",
        "/clusters/member-1/version",
        Some(&user),
        &[("x-padding", &huge)],
    );
    assert_eq!(reply.status, 431, "{}", reply.body);
    assert_eq!(
        https.get("/clusters/member-1/version", Some(&user)).status,
        200
    );
}
