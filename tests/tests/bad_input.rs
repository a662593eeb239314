//! Bad input, each with its own status and message; the server keeps serving others.

use std::io::{Read, Write};
use std::time::Duration;

use base64::Engine;
use tower_e2e::{Https, Member, Server, agent, server, wait_for};

fn forged(header: &str, claims: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("{}.{}.{}", b64(header), b64(claims), b64("signature"))
}

/// The bad tokens every listener refuses, each with the reason it must give: none,
/// garbage, signed with another secret, expired, and `alg: none`. `claims` are valid
/// claims of the kind the listener wants; `other_secret` signs them with a wrong key.
fn bad_tokens(
    claims: serde_json::Value,
    other_secret: impl FnOnce(&tower_auth::Minter) -> String,
) -> Vec<(Option<String>, &'static str)> {
    let wrong =
        tower_auth::Minter::new(&tower_auth::Secret::new("not the shared secret").expect("secret"));
    let mut expired = claims.clone();
    expired["iat"] = 999_000_000u64.into();
    expired["exp"] = 1_000_000_000u64.into();
    vec![
        (None, "no bearer token"),
        (Some("garbage".into()), "malformed token"),
        (Some(other_secret(&wrong)), "signature does not match"),
        (
            Some(if claims["aud"] == "tower-agent" {
                Server::minter().sign_for_cluster("member-1", &expired)
            } else {
                Server::minter().sign(&expired)
            }),
            "token expired",
        ),
        (
            Some(forged(r#"{"alg":"none","typ":"JWT"}"#, &claims.to_string())),
            "alg: none",
        ),
    ]
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
    let agent_token = minter.agent_token("member-1", None);

    let path = "/clusters/member-1/api/v1/namespaces/default/pods";
    assert_eq!(https.get(path, Some(&user)).status, 200);
    let mut refused = bad_tokens(
        serde_json::json!({"username": "admin", "token_type": "access_token"}),
        |wrong| wrong.user_token("alice", &[], None),
    );
    refused.push((
        Some(agent_token),
        "agent token (aud tower-agent) cannot be used as a user token",
    ));
    // What KubeSphere's issuer refuses: an exp a second gone (no leeway), an iat ahead
    // of the clock by more than 10 s; and a refresh token is no API credential.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    for (claims, message) in [
        (
            serde_json::json!({"username": "admin", "token_type": "access_token", "exp": now - 1}),
            "token expired",
        ),
        (
            serde_json::json!({"username": "admin", "token_type": "access_token", "iat": now + 60}),
            "used before it was issued",
        ),
        (
            serde_json::json!({"username": "admin", "token_type": "refresh_token"}),
            "refresh_token\\\" refused: want",
        ),
    ] {
        refused.push((Some(minter.sign(&claims)), message));
    }
    // KubeSphere's static tokens (no exp) are API credentials.
    let static_token =
        minter.sign(&serde_json::json!({"username": "alice", "token_type": "static_token"}));
    assert_eq!(https.get(path, Some(&static_token)).status, 200);
    for (token, message) in refused {
        let token = token.as_deref();
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
    assert!(
        plain.body.contains("Upgrade: tower-tunnel/1"),
        "{}",
        plain.body
    );
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
    assert!(
        version
            .body
            .contains("this server speaks tower-tunnel/1, not \"tower-tunnel/9\""),
        "{}",
        version.body
    );

    // Each bad agent token is refused with 401 and its own reason.
    let mut refused = bad_tokens(
        serde_json::json!({"sub": "member-1", "aud": "tower-agent"}),
        |wrong| wrong.agent_token("member-1", None),
    );
    refused.push((
        Some(user.clone()),
        "a user token cannot be used as an agent token",
    ));
    for (token, message) in refused {
        let token = token.as_deref();
        let reply = tunnel.request("GET", "/v1/tunnel", token, &upgrade);
        assert_eq!(reply.status, 401, "{token:?}: {}", reply.body);
        assert!(reply.body.contains(message), "{token:?}: {}", reply.body);
    }
    // An agent token of an older Tower, signed with the jwtSecret itself: named as such.
    let legacy = Server::minter().sign(&serde_json::json!({
        "sub": "member-1", "aud": "tower-agent", "iat": 1_700_000_000u64
    }));
    let reply = tunnel.request("GET", "/v1/tunnel", Some(&legacy), &upgrade);
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert!(reply.body.contains("older Tower"), "{}", reply.body);
    // An agent that checks callers' tokens itself (no `identity` capability) would refuse
    // every request this server sends it: told to upgrade instead.
    let old_agent = tunnel.request(
        "GET",
        "/v1/tunnel",
        Some(&good),
        &[
            ("connection", "Upgrade"),
            ("upgrade", "tower-tunnel/1"),
            ("tower-cluster", "member-1"),
            ("tower-capabilities", "control,drain,http2"),
        ],
    );
    assert_eq!(old_agent.status, 426, "{}", old_agent.body);
    assert!(
        old_agent.body.contains("upgrade tower-agent"),
        "{}",
        old_agent.body
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
    for bad in ["Member-1", "../member-1", "member_1", "-member"] {
        let reply = tunnel.request(
            "GET",
            "/v1/tunnel",
            Some(&good),
            &[
                ("connection", "Upgrade"),
                ("upgrade", "tower-tunnel/1"),
                ("tower-cluster", bad),
            ],
        );
        assert_eq!(reply.status, 400, "{bad}: {}", reply.body);
        assert!(
            reply.body.contains("DNS-1123 subdomain"),
            "{bad}: {}",
            reply.body
        );
    }
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
                .contains(&format!(
                    "does not contain the pinned CA: expected sha256:{}",
                    "0".repeat(64)
                ))
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
    // The same on the TLS listeners, the tunnel's and the frontend's: cut within the
    // timeout, having sent nothing that could pass for an answer.
    for (listener, addr) in [("tunnel", server.tunnel), ("frontend", server.frontend)] {
        let started = std::time::Instant::now();
        let answer = Https::to(&server, addr)
            .stall(b"GET /v1/tunnel HTTP/1.1\r\nHost: x\r\n")
            .unwrap_or_else(|e| panic!("{listener}: {e}"));
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.is_empty() || text.contains("408"),
            "{listener}: {text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{listener} kept a stalled client for {:?} with a 1 s header timeout",
            started.elapsed()
        );
    }

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
    // Both limits are counted.
    for (reason, at_least) in [("header_too_large", 1.0), ("header_read_timeout", 3.0)] {
        let name = format!("tower_requests_limited_total{{reason=\"{reason}\"}}");
        let counted = tower_e2e::metric_value(server.admin, &name);
        assert!(
            counted.is_some_and(|n| n >= at_least),
            "{name}: {counted:?}"
        );
    }
}

// After the upgrade: a client with a valid agent token and a correct handshake that then
// speaks garbage, broken yamux, floods streams or goes silent. Frames are made by hand:
// a yamux header is version u8 (0) | type u8 | flags u16 | stream id u32 | length u32,
// big-endian; after the 101 the server opens stream 1 (its control stream: a preamble,
// then `type u8 | len u16 | payload` messages, ping = 1, pong = 2).

mod raw_tunnel {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
    use tokio::net::TcpStream;
    use tokio_rustls::client::TlsStream;
    use tower_e2e::Server;

    pub(super) const DATA: u8 = 0;
    pub(super) const WINDOW_UPDATE: u8 = 1;
    pub(super) const PING: u8 = 2;
    pub(super) const SYN: u16 = 1;
    pub(super) const ACK: u16 = 2;
    pub(super) const RST: u16 = 8;

    /// A yamux frame header.
    pub(super) fn header(kind: u8, flags: u16, stream: u32, length: u32) -> Vec<u8> {
        let mut h = vec![0, kind];
        h.extend(flags.to_be_bytes());
        h.extend(stream.to_be_bytes());
        h.extend(length.to_be_bytes());
        h
    }

    /// A data frame carrying `body`.
    pub(super) fn data(flags: u16, stream: u32, body: &[u8]) -> Vec<u8> {
        let mut f = header(DATA, flags, stream, body.len() as u32);
        f.extend(body);
        f
    }

    /// What the server sent on one raw tunnel so far.
    #[derive(Debug, Default, Clone)]
    pub(super) struct Seen {
        pub(super) frames: u64,
        /// The first frames' headers (type, flags, stream, length), for failure messages.
        pub(super) first: Vec<(u8, u16, u32, u32)>,
        /// Streams the server reset.
        pub(super) reset: HashSet<u32>,
        /// Control pings answered with a pong.
        pub(super) pongs: u64,
        /// yamux pings of ours that the server acknowledged.
        pub(super) ping_acks: u64,
        /// When and how the connection ended.
        pub(super) closed: Option<(Instant, String)>,
    }

    type Writer = Arc<tokio::sync::Mutex<WriteHalf<TlsStream<TcpStream>>>>;

    /// A hand-made agent on a raw TLS connection to the tunnel listener.
    pub(super) struct RawAgent {
        writer: Writer,
        seen: Arc<Mutex<Seen>>,
        runtime: Arc<tokio::runtime::Runtime>,
        /// When the 101 arrived.
        pub(super) upgraded: Instant,
    }

    impl RawAgent {
        /// TLS, `GET /v1/tunnel` with a valid token for `cluster`, the 101; then a task
        /// that reads every frame, acknowledges the control stream and, when `answer`
        /// is set, answers the server's control pings (a live but hand-made agent).
        pub(super) fn connect(
            runtime: &Arc<tokio::runtime::Runtime>,
            server: &Server,
            cluster: &str,
            answer: bool,
        ) -> RawAgent {
            let token = Server::minter().agent_token(cluster, None);
            let certs = tower_tunnel::tls::certs_from_pem(server.ca_pem.as_bytes()).expect("CA");
            let tls =
                tower_tunnel::tls::client_config(&tower_tunnel::tls::CaTrust::Certificates(certs))
                    .expect("tls");
            let addr = server.tunnel;
            let request = format!(
                "GET /v1/tunnel HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n\
                 Upgrade: tower-tunnel/1\r\nAuthorization: Bearer {token}\r\n\
                 Tower-Cluster: {cluster}\r\nTower-Agent-Version: raw-test\r\n\
                 Tower-Capabilities: control,drain,identity\r\n\r\n"
            );
            let stream = runtime.block_on(async move {
                let tcp = TcpStream::connect(addr).await.expect("connect");
                let mut tls = tokio_rustls::TlsConnector::from(tls)
                    .connect("localhost".try_into().expect("name"), tcp)
                    .await
                    .expect("TLS");
                tls.write_all(request.as_bytes()).await.expect("request");
                // Byte by byte, so that nothing after the head (yamux) is consumed.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    tls.read_exact(&mut byte).await.expect("response head");
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                tls
            });
            let upgraded = Instant::now();
            let (reader, writer) = tokio::io::split(stream);
            let writer: Writer = Arc::new(tokio::sync::Mutex::new(writer));
            let seen = Arc::new(Mutex::new(Seen::default()));
            runtime.spawn(read_frames(reader, writer.clone(), seen.clone(), answer));
            RawAgent {
                writer,
                seen,
                runtime: runtime.clone(),
                upgraded,
            }
        }

        /// Writes raw bytes after the upgrade.
        pub(super) fn send(&self, bytes: &[u8]) -> Result<(), String> {
            let writer = self.writer.clone();
            let bytes = bytes.to_vec();
            self.runtime.block_on(async move {
                let mut w = writer.lock().await;
                w.write_all(&bytes).await.map_err(|e| e.to_string())?;
                w.flush().await.map_err(|e| e.to_string())
            })
        }

        /// What the server sent so far.
        pub(super) fn seen(&self) -> Seen {
            self.seen.lock().expect("lock").clone()
        }

        /// Waits until the server has closed the connection; how long after `since`.
        pub(super) fn closed_within(&self, since: Instant, timeout: Duration) -> Option<Duration> {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some((at, _)) = &self.seen().closed {
                    return Some(at.saturating_duration_since(since));
                }
                if Instant::now() >= deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    impl Drop for RawAgent {
        fn drop(&mut self) {
            let writer = self.writer.clone();
            self.runtime.block_on(async move {
                let _ = writer.lock().await.shutdown().await;
            });
        }
    }

    async fn read_frames(
        mut reader: ReadHalf<TlsStream<TcpStream>>,
        writer: Writer,
        seen: Arc<Mutex<Seen>>,
        answer: bool,
    ) {
        let mut control = Vec::new();
        let mut preamble_done = false;
        let why = loop {
            let mut h = [0u8; 12];
            if let Err(e) = reader.read_exact(&mut h).await {
                break e.to_string();
            }
            let (kind, flags) = (h[1], u16::from_be_bytes([h[2], h[3]]));
            let stream = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            let length = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            let mut body = Vec::new();
            if kind == DATA {
                body.resize(length as usize, 0);
                if let Err(e) = reader.read_exact(&mut body).await {
                    break e.to_string();
                }
            }
            let mut reply = Vec::new();
            {
                let mut seen = seen.lock().expect("lock");
                seen.frames += 1;
                if seen.first.len() < 32 {
                    seen.first.push((kind, flags, stream, length));
                }
                if flags & RST != 0 {
                    seen.reset.insert(stream);
                }
                if kind == PING && flags & ACK != 0 {
                    seen.ping_acks += 1;
                }
                if stream == 1 && kind == DATA {
                    if flags & SYN != 0 {
                        // Accept the control stream, as yamux expects.
                        reply.extend(header(WINDOW_UPDATE, ACK, 1, 0));
                    }
                    control.extend_from_slice(&body);
                    if !preamble_done && control.len() >= 4 {
                        let len = 4 + u16::from_be_bytes([control[2], control[3]]) as usize;
                        if control.len() >= len {
                            control.drain(..len);
                            preamble_done = true;
                        }
                    }
                    while preamble_done && control.len() >= 3 {
                        let len = 3 + u16::from_be_bytes([control[1], control[2]]) as usize;
                        if control.len() < len {
                            break;
                        }
                        let message: Vec<u8> = control.drain(..len).collect();
                        if answer && message[0] == 1 && message.len() == 11 {
                            let mut pong = vec![2, 0, 8];
                            pong.extend(&message[3..]);
                            reply.extend(data(0, 1, &pong));
                            seen.pongs += 1;
                        }
                    }
                }
            }
            if !reply.is_empty() {
                let mut w = writer.lock().await;
                if let Err(e) = w.write_all(&reply).await {
                    break e.to_string();
                }
                let _ = w.flush().await;
            }
        };
        seen.lock().expect("lock").closed = Some((Instant::now(), why));
    }
}

/// A server with a healthy agent for member-1 (and its kubeconfig), for the raw-tunnel
/// attacks; the attackers use another cluster's valid token.
struct Arena {
    _member: Member,
    server: Server,
    _healthy: tower_e2e::Agent,
    kubeconfig: std::path::PathBuf,
    runtime: std::sync::Arc<tokio::runtime::Runtime>,
}

impl Arena {
    fn start() -> Self {
        let member = Member::start();
        let server = server().start();
        let healthy = agent(&server, &member, "member-1").connect(&server);
        let kubeconfig = server.kubeconfig("member-1", "alice", &[]);
        let runtime = std::sync::Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime"),
        );
        let arena = Arena {
            _member: member,
            server,
            _healthy: healthy,
            kubeconfig,
            runtime,
        };
        wait_for(
            "one tunnel (the healthy agent)",
            Duration::from_secs(10),
            || (arena.tunnels() == Some(1.0)).then_some(()),
        );
        arena
    }

    /// `tower_tunnels` on `/metrics`.
    fn tunnels(&self) -> Option<f64> {
        tower_e2e::metric_value(self.server.admin, "tower_tunnels")
    }

    /// The server is alive and healthy, and member-1 works through it with kubectl.
    fn still_fine(&mut self, after: &str) {
        assert!(
            self.server.process.running(),
            "the server died after {after}:\n{}",
            self.server.process.log()
        );
        assert_eq!(
            tower_e2e::admin_get(self.server.admin, "/healthz").0,
            200,
            "after {after}"
        );
        let pods = tower_e2e::kubectl(&self.kubeconfig, &["get", "pods", "-o", "name"]);
        assert!(
            pods.success().contains("pod/web-0"),
            "member-1 after {after}"
        );
    }

    /// Sends each attack on a fresh raw tunnel (whose agent answers pings, so the
    /// keepalive never closes it) and expects the server to close that connection
    /// promptly; checks the server and member-1 after each.
    fn expect_closed(&mut self, attacks: &[(&str, Vec<u8>)]) {
        // The keepalive (2 s, a pong due 2 s later) could close a silent tunnel 4 s after
        // the upgrade at the earliest; these raw agents answer pings, so a close is the
        // attack's doing, however long it takes on a loaded machine.
        let prompt = Duration::from_secs(10);
        let mut kept = Vec::new();
        for (what, bytes) in attacks {
            let raw = raw_tunnel::RawAgent::connect(&self.runtime, &self.server, "attacker", true);
            let sent = std::time::Instant::now();
            let _ = raw.send(bytes); // the server may close before all is written
            let closed = raw.closed_within(sent, prompt);
            eprintln!("{what}: connection closed after {closed:?}");
            if closed.is_none() {
                kept.push(format!(
                    "{what}: the server kept the connection for {prompt:?}; still counted as \
                     a tunnel: tower_tunnels = {:?}, attacker connected = {}; frames it sent \
                     (type, flags, stream, length; type 3 = GoAway): {:?}",
                    self.tunnels(),
                    self.server.connected("attacker"),
                    raw.seen().first
                ));
            }
            drop(raw);
            self.still_fine(what);
        }
        assert!(kept.is_empty(), "{}", kept.join("\n"));
    }

    /// Every raw tunnel is gone: `tower_tunnels` is back to the healthy agent's 1.
    fn back_to_baseline(&self) {
        let since = std::time::Instant::now();
        wait_for("tower_tunnels back to 1", Duration::from_secs(5), || {
            (self.tunnels() == Some(1.0)).then_some(())
        });
        eprintln!("tower_tunnels back to 1 within {:?}", since.elapsed());
        assert!(self.server.connected("member-1"));
        let log = self.server.process.log();
        assert!(!log.contains("panicked"), "{log}");
    }
}

#[test]
fn garbage_floods_and_silence_after_the_upgrade_cost_only_their_own_tunnel() {
    use raw_tunnel::{DATA, PING, RawAgent, SYN, WINDOW_UPDATE, data, header};
    use std::time::Instant;

    let mut arena = Arena::start();

    // (a) Plain garbage; (b) frames yamux cannot decode.
    let mut noise = b"GET / HTTP/1.1\r\nHost: not-yamux\r\n\r\n".to_vec();
    noise.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 | 1));
    arena.expect_closed(&[
        ("plain garbage", noise),
        ("a bad version byte", {
            let mut h = header(DATA, 0, 1, 4);
            h[0] = 1;
            h.extend(b"ping");
            h
        }),
        ("an unknown frame type", {
            let mut h = header(DATA, 0, 1, 0);
            h[1] = 9;
            h
        }),
        (
            "a data frame claiming 0xFFFFFFFF bytes",
            header(DATA, 0, 1, u32::MAX),
        ),
    ]);

    // (c) A flood of streams opened by the "agent" (which never opens any in Tower's
    // protocol), half of them carrying a request into the host's network: each must be
    // refused (reset), or the tunnel closed.
    const FLOOD: u32 = 10_000;
    let raw = RawAgent::connect(&arena.runtime, &arena.server, "attacker", true);
    let mut flood = Vec::with_capacity(FLOOD as usize * 60);
    for i in 1..=FLOOD {
        if i % 2 == 0 {
            flood.extend(header(WINDOW_UPDATE, SYN, 2 * i, 0));
        } else {
            flood.extend(data(
                SYN,
                2 * i,
                b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n",
            ));
        }
    }
    let sent = Instant::now();
    let _ = raw.send(&flood);
    let (refused, closed) = wait_for(
        "every flooded stream refused, or the tunnel closed",
        Duration::from_secs(30),
        || {
            let seen = raw.seen();
            let refused = (1..=FLOOD)
                .filter(|i| seen.reset.contains(&(2 * i)))
                .count();
            (refused == FLOOD as usize || seen.closed.is_some()).then_some((refused, seen.closed))
        },
    );
    eprintln!(
        "a flood of {FLOOD} agent-opened streams: {refused} reset, connection {} after {:?}",
        if closed.is_some() { "closed" } else { "kept" },
        sent.elapsed()
    );
    if closed.is_none() {
        // Refused one by one: the tunnel itself stays live (pongs keep flowing).
        let pongs = raw.seen().pongs;
        wait_for(
            "the flooded tunnel to keep answering pings",
            Duration::from_secs(10),
            || (raw.seen().pongs > pongs).then_some(()),
        );
        assert!(raw.seen().closed.is_none());
    }
    drop(raw);
    let log = arena.server.process.log();
    eprintln!(
        "the flood left {} lines ({} KiB) in the server's log",
        log.lines().count(),
        log.len() >> 10
    );
    arena.still_fine("a stream flood");

    // (d) A valid yamux session (it accepts the control stream, and the server answers
    // its yamux ping) whose agent never answers the control pings: closed by the
    // keepalive, within two intervals.
    let silent = RawAgent::connect(&arena.runtime, &arena.server, "attacker", false);
    silent
        .send(&header(PING, SYN, 0, 42))
        .expect("a yamux ping");
    wait_for(
        "the server to answer a yamux ping",
        Duration::from_secs(5),
        || (silent.seen().ping_acks > 0).then_some(()),
    );
    wait_for(
        "the silent tunnel to be counted",
        Duration::from_secs(5),
        || (arena.tunnels() == Some(2.0)).then_some(()),
    );
    let closed = silent
        .closed_within(silent.upgraded, Duration::from_secs(15))
        .expect("the server kept a tunnel whose agent never answers pings");
    eprintln!("a silent agent: connection closed {closed:?} after the upgrade");
    assert!(
        closed >= Duration::from_secs(2),
        "closed before any ping was due: {closed:?}"
    );
    drop(silent);
    arena.still_fine("a silent agent");
    arena.back_to_baseline();
}

/// yamux violations that decode fine but break its rules (credit, stream ids) must end
/// the tunnel too. yamux 0.14 answers them with a GoAway (protocol error) and nothing
/// else, and keeps the connection open; `tower_tunnel::goaway` watches for that GoAway
/// so the server closes and unroutes the tunnel instead of opening new streams on it.
#[test]
fn yamux_rule_violations_after_the_upgrade_close_the_tunnel() {
    use raw_tunnel::{SYN, WINDOW_UPDATE, data, header};

    let mut arena = Arena::start();
    arena.expect_closed(&[
        // Stream 1 (the control stream) was granted 256 KiB.
        (
            "a data frame beyond the stream's window",
            data(0, 1, &vec![0u8; 300 * 1024]),
        ),
        (
            "a window update overflowing the window",
            header(WINDOW_UPDATE, 0, 1, u32::MAX),
        ),
        (
            "a SYN for a server-side (odd) stream id",
            header(WINDOW_UPDATE, SYN, 3, 0),
        ),
    ]);
    arena.back_to_baseline();
}

/// Tower refuses some requests before it reads their bodies (a bad token, a cluster without
/// its agent). A client still sending a large body must get that answer,
/// not a reset that destroys it: over HTTP/1.1, with the body streamed, every time.
#[test]
fn an_early_refusal_of_a_large_upload_reaches_the_caller() {
    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let https = Https::frontend(&server);
    let user = Server::minter().user_token("alice", &[], None);
    for _ in 0..5 {
        for (path, token, status) in [
            (
                "/clusters/member-1/api/v1/namespaces/default/configmaps",
                "garbage",
                401,
            ),
            (
                "/clusters/nowhere/api/v1/namespaces/default/configmaps",
                user.as_str(),
                503,
            ),
        ] {
            let reply = https
                .try_upload(path, token, 64 << 20, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(reply.status, status, "{path}: {}", reply.body);
        }
    }
}
