//! Logs an operator can read, from the real binaries: plain text when stderr is not a
//! terminal (as under `kubectl logs`), one JSON object per line with `--log-format json`
//! or `TOWER_LOG_FORMAT=json`, no dependency noise by default (rustls's WARN for a client
//! that sends an IP address as SNI), and a clear exit 2 for a format that does not exist.
//!
//! The harness sets `TOWER_LOG` for its own debugging; `TOWER_LOG=""` (empty counts as
//! unset) gives these tests the default filter an operator gets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tower_e2e::{Agent, Https, Member, Server, TempDir, agent, bin_path, server, wait_for_with};

const ESC: char = '\u{1b}';

/// Waits until `log()` has a line holding every one of `parts`; returns that line.
fn wait_line(what: &str, log: impl Fn() -> String, parts: &[&str]) -> String {
    wait_for_with(
        what,
        Duration::from_secs(20),
        || {
            log()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .map(str::to_owned)
        },
        &log,
    )
}

/// SIGTERMs the agent, then the server, and waits for both to exit, so their logs are
/// complete (no line half written) and hold the shutdown lines too.
fn stop(server: &mut Server, agent: &mut Agent) {
    agent.process.terminate();
    agent.process.wait_exit(Duration::from_secs(20));
    server.process.terminate();
    server.process.wait_exit(Duration::from_secs(20));
}

#[test]
fn text_logs_have_no_colour_off_a_terminal_and_keep_towers_info_lines() {
    let member = Member::start();
    let mut server = server().env("TOWER_LOG", "").start();
    let mut agent = agent(&server, &member, "member-1")
        .env("TOWER_LOG", "")
        .connect(&server);
    let connected = wait_line(
        "the server's agent connected line",
        || server.process.log(),
        &["agent connected"],
    );
    let up = wait_line(
        "the agent's tunnel up line",
        || agent.process.log(),
        &["tunnel up"],
    );
    for line in [&connected, &up] {
        assert!(!line.contains(ESC), "coloured: {line:?}");
    }
    // Tower's own INFO lines pass the default filter, their fields as plain key=value.
    assert!(
        connected.contains(" INFO ") && connected.contains(" cluster=member-1 "),
        "{connected}"
    );
    assert!(up.contains(" INFO ") && up.contains(" server_id="), "{up}");
    stop(&mut server, &mut agent);
    for (who, log) in [
        ("server", server.process.log()),
        ("agent", agent.process.log()),
    ] {
        assert!(
            !log.contains(ESC),
            "the {who}'s log holds terminal escape sequences:\n{log:?}"
        );
    }
}

/// Every non-empty line of `log` as a JSON object with timestamp, level, target and
/// fields.message; panics naming the first line that is not.
fn json_lines(who: &str, log: &str) -> Vec<serde_json::Value> {
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let line: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{who}: not a JSON line ({e}): {l:?}\n{log}"));
            assert!(line.is_object(), "{who}: {l}");
            for key in ["timestamp", "level", "target"] {
                assert!(line[key].is_string(), "{who}: no {key} in {l}");
            }
            assert!(
                line["fields"]["message"].is_string(),
                "{who}: no message in {l}"
            );
            line
        })
        .collect();
    assert!(lines.len() >= 2, "{who}: too few lines:\n{log}");
    lines
}

/// The first line whose message is `message`.
fn line_with<'a>(
    who: &str,
    lines: &'a [serde_json::Value],
    message: &str,
) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|l| l["fields"]["message"] == message)
        .unwrap_or_else(|| panic!("{who}: no {message:?} line in {lines:#?}"))
}

#[test]
fn json_logs_are_one_object_per_line_by_env_var_and_by_flag() {
    let member = Member::start();
    for by_flag in [false, true] {
        let how = if by_flag {
            "--log-format json"
        } else {
            "TOWER_LOG_FORMAT=json"
        };
        // The harness's TOWER_LOG (Tower at debug, dependencies at info) stays: more
        // lines, from more places, some of them from the `log` crate (rustls).
        let mut server = if by_flag {
            server().args(&["--log-format", "json"])
        } else {
            server().env("TOWER_LOG_FORMAT", "json")
        }
        .start();
        let builder = agent(&server, &member, "member-1");
        let mut agent = if by_flag {
            builder.args(&["--log-format", "json"])
        } else {
            builder.env("TOWER_LOG_FORMAT", "json")
        }
        .connect(&server);
        // A request through the tunnel logs more (the frontend's `proxying` line carries
        // a field named `target`, beside the event's own).
        let token = Server::minter().user_token("alice", &[], Some(Duration::from_secs(60)));
        let reply = Https::frontend(&server).get("/clusters/member-1/version", Some(&token));
        assert_eq!(reply.status, 200, "{}", reply.body);
        wait_line(
            "the server's agent connected line",
            || server.process.log(),
            &["agent connected"],
        );
        wait_line(
            "the agent's tunnel up line",
            || agent.process.log(),
            &["tunnel up"],
        );
        stop(&mut server, &mut agent);

        let lines = json_lines(&format!("server ({how})"), &server.process.log());
        let connected = line_with(how, &lines, "agent connected");
        assert_eq!(connected["level"], "INFO", "{connected}");
        assert_eq!(connected["target"], "tower_server::agents", "{connected}");
        assert_eq!(connected["fields"]["cluster"], "member-1", "{connected}");
        let listening = line_with(how, &lines, "tower-server listening");
        assert_eq!(
            listening["fields"]["tunnel"],
            server.tunnel.to_string(),
            "{listening}"
        );
        let proxying = line_with(how, &lines, "proxying");
        assert_eq!(proxying["level"], "DEBUG", "{proxying}");
        assert_eq!(proxying["fields"]["target"], "kubernetes", "{proxying}");
        assert_eq!(proxying["fields"]["user"], "alice", "{proxying}");

        let lines = json_lines(&format!("agent ({how})"), &agent.process.log());
        let up = line_with(how, &lines, "tunnel up");
        assert_eq!(up["level"], "INFO", "{up}");
        assert!(
            up["target"].as_str().unwrap().starts_with("tower_agent"),
            "{up}"
        );
        assert!(
            up["fields"]["server_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty()),
            "{up}"
        );
        // SIGTERM: an orderly stop says so, and warns of nothing (the tunnel it closes
        // itself is no failure).
        let stopping = line_with(how, &lines, "shutting down: draining the tunnel");
        assert_eq!(stopping["level"], "INFO", "{stopping}");
        let warnings: Vec<_> = lines.iter().filter(|l| l["level"] == "WARN").collect();
        assert!(warnings.is_empty(), "{how}: {warnings:#?}");
    }
}

/// `openssl s_client` to `addr` with the IP address 127.0.0.1 as SNI, trusting `ca`:
/// the handshake must complete and the server's certificate verify, which proves the
/// ClientHello (and its SNI) reached the server's TLS stack.
fn handshake_with_ip_sni(addr: std::net::SocketAddr, ca: &Path) {
    let out: Output = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string()])
        .args([
            "-servername",
            "127.0.0.1",
            "-verify_return_error",
            "-CAfile",
        ])
        .arg(ca)
        .stdin(Stdio::null())
        .output()
        .expect("openssl must be installed (.ci/run installs Debian's openssl)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Verify return code: 0 (ok)"),
        "openssl s_client to {addr} ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_client_sending_an_ip_address_as_sni_adds_no_warning_by_default() {
    // Control: with every crate's WARN let through, rustls does warn for exactly these
    // handshakes, so the default server's silence below is the filter, not luck.
    let noisy = server().env("TOWER_LOG", "info").start();
    for addr in [noisy.tunnel, noisy.frontend] {
        handshake_with_ip_sni(addr, &noisy.ca_file);
    }
    let warning = wait_line(
        "rustls's IP-as-SNI warning with TOWER_LOG=info",
        || noisy.process.log(),
        &["WARN", "Illegal SNI"],
    );
    assert!(warning.contains("ignoring IP address"), "{warning}");

    let quiet = server().env("TOWER_LOG", "").start();
    for _ in 0..3 {
        for addr in [quiet.tunnel, quiet.frontend] {
            handshake_with_ip_sni(addr, &quiet.ca_file);
        }
    }
    // The warning is written while the ClientHello is parsed, before the server answers
    // it: the handshakes above completing means it would be in the log by now.
    let log = quiet.process.log();
    assert!(
        log.contains("tower-server listening"),
        "Tower's own INFO lines stay:\n{log}"
    );
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("Illegal SNI"))
        .collect();
    assert!(
        warnings.is_empty(),
        "dependency noise in the default log: {warnings:#?}"
    );
}

/// A binary, its arguments and its environment.
type Run<'a> = (&'a str, &'a [&'a str], &'a [(&'a str, &'a str)]);

/// Runs `binary args…` to completion with `env`, without the caller's TOWER_ variables.
fn run(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(bin_path(binary));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TOWER_") {
            command.env_remove(key);
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run the binary")
}

#[test]
fn an_unknown_log_format_or_filter_exits_2_naming_what_is_valid() {
    let dir = TempDir::new("logs");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret").unwrap();
    let secret = secret.to_str().unwrap();
    let token = ["token", "--jwt-secret-file", secret, "--cluster", "c1"];
    let agent = [
        "--name",
        "c1",
        "--token",
        "t",
        "--proxy-server",
        "https://127.0.0.1:1",
        "--ca-hash",
        "sha256:00",
    ];
    // The flag before and after the subcommand, and the env var, for both binaries.
    let server_before: Vec<&str> = ["--log-format", "xml"].into_iter().chain(token).collect();
    let server_after: Vec<&str> = token.into_iter().chain(["--log-format", "xml"]).collect();
    let agent_flag: Vec<&str> = agent.into_iter().chain(["--log-format", "xml"]).collect();
    let cases: [Run; 5] = [
        ("tower-server", &server_before, &[]),
        ("tower-server", &server_after, &[]),
        ("tower-server", &token, &[("TOWER_LOG_FORMAT", "xml")]),
        ("tower-agent", &agent_flag, &[]),
        ("tower-agent", &agent, &[("TOWER_LOG_FORMAT", "xml")]),
    ];
    for (binary, args, env) in cases {
        let out = run(binary, args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{binary} {args:?} {env:?}: {stderr}"
        );
        assert!(
            stderr.contains("'xml'")
                && stderr.contains("--log-format")
                && stderr.contains("possible values: text, json"),
            "{binary} {args:?} {env:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{binary}: nothing on stdout");
    }
    // Both values are accepted, in either case of setting.
    for format in ["text", "json"] {
        let out = run("tower-server", &token, &[("TOWER_LOG_FORMAT", format)]);
        assert!(
            out.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A TOWER_LOG that is not a filter is bad configuration too, not a silent default.
    for (binary, args) in [("tower-server", &token[..]), ("tower-agent", &agent[..])] {
        let out = run(binary, args, &[("TOWER_LOG", "info,tower_server=loud")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{binary}: {stderr}");
        assert!(
            stderr.contains("TOWER_LOG") && stderr.contains("tower_server=loud"),
            "{binary}: {stderr}"
        );
    }
}

/// Text a peer controls (a JWT's `alg` and `sub`, a user's name, a path) reaches the log
/// escaped: no raw ESC byte, and no line of its own.
#[test]
fn what_peers_send_cannot_forge_a_log_line_or_colour_a_terminal() {
    use base64::Engine;
    const FORGED: &str = "FORGED";
    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let evil = format!("\n{FORGED} INFO x\u{1b}[31m");
    // Unauthenticated: a header whose alg is a log line of its own and a colour.
    let alg = serde_json::json!({ "alg": format!("A{evil}"), "typ": "JWT" }).to_string();
    let claims = serde_json::json!({ "sub": "member-1", "aud": "tower-agent" }).to_string();
    let forged_alg = format!("{}.{}.{}", b64(&alg), b64(&claims), b64("sig"));
    // Signed, but naming another cluster than the one it dials for.
    let minter = Server::minter();
    let evil_sub = minter.agent_token(&format!("member-1{evil}"), None);
    // A user whose name carries the same, through to the debug line that routes it.
    let evil_user = minter.user_token(&format!("alice{evil}"), &[], None);

    let tunnel = Https::to(&server, server.tunnel);
    let handshake = |token: &str| {
        tunnel
            .request(
                "GET",
                "/v1/tunnel",
                Some(token),
                &[
                    ("connection", "Upgrade"),
                    ("upgrade", "tower-tunnel/1"),
                    ("tower-cluster", "member-1"),
                ],
            )
            .status
    };
    assert_eq!(handshake(&forged_alg), 401);
    assert_eq!(handshake(&evil_sub), 403);
    let frontend = Https::frontend(&server);
    assert_eq!(
        frontend
            .get("/clusters/member-1/version", Some(&forged_alg))
            .status,
        401
    );
    frontend.get("/clusters/member-1/api/%1b%0aFORGED", Some(&evil_user));
    frontend.get("/clusters/member%1b%0a1/api", Some(&evil_user));

    let log = || server.process.log();
    wait_for_with(
        "both refusals and the routed request in the log",
        Duration::from_secs(20),
        || {
            let log = log();
            (log.matches("refused a tunnel").count() >= 2 && log.contains("proxying")).then_some(())
        },
        log,
    );
    let log = log();
    assert!(!log.contains(ESC), "a raw ESC reached the log:\n{log:?}");
    assert!(
        !log.lines().any(|l| l.trim_start().starts_with(FORGED)),
        "a peer forged a line:\n{log}"
    );
    // The text is there, escaped, on the line that logs it.
    let refusal = log
        .lines()
        .find(|l| l.contains("refused a tunnel") && l.contains("algorithm"))
        .unwrap_or_else(|| panic!("the alg refusal:\n{log}"));
    assert!(
        refusal.contains("\\n") && refusal.contains(FORGED),
        "{refusal}"
    );
    let routed = log
        .lines()
        .find(|l| l.contains("proxying") && l.contains("alice"))
        .unwrap_or_else(|| panic!("the routed request:\n{log}"));
    assert!(routed.contains(FORGED), "{routed}");
}
