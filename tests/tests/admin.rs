//! What the host and the agent report about themselves.

use std::time::Duration;

use tower_e2e::{
    Https, Member, Server, TempDir, admin_get, admin_get_as, admin_token, agent, bin_path, kubectl,
    server, wait_for, wait_for_with,
};

#[test]
fn cluster_table_metrics_and_probes_tell_the_truth() {
    let started = std::time::SystemTime::now();
    let member = Member::start();
    // A long grace, so that the drain at the end can be watched.
    let mut server = server().args(&["--shutdown-grace", "60s"]).start();
    let mut first = agent(&server, &member, "member-1").connect(&server);
    let kc = server.kubeconfig("member-1", "alice", &[]);
    kubectl(&kc, &["get", "pods"]).success();
    let refused = kubectl(
        &server.kubeconfig_with_token("member-1", "garbage"),
        &["get", "pods"],
    );
    assert_ne!(refused.code(), Some(0));

    let table = server.cluster_details();
    let row = &table[0];
    assert_eq!(row["name"], "member-1");
    assert_eq!(row["connected"], true);
    assert_eq!(row["agent_version"], env!("CARGO_PKG_VERSION"));
    // The agent's end of the tunnel: loopback, from an ephemeral port.
    let remote: std::net::SocketAddr = row["remote_address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("remote_address is an address: {row}"));
    assert!(remote.ip().is_loopback() && remote.port() != 0, "{row}");
    // RFC 3339 (UTC), and within this test's run.
    let since = row["connected_since"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .unwrap_or_else(|| panic!("connected_since is an RFC 3339 time: {row}"));
    assert!(
        row["connected_since"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let slack = Duration::from_secs(1);
    assert!(
        since + slack >= started && since <= std::time::SystemTime::now(),
        "connected_since {row} is not within the test"
    );

    let admin = server.admin;
    let sample = move |name: &str| -> Option<f64> {
        let (code, text) = admin_get(admin, "/metrics");
        assert_eq!(code, 200);
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let metric = move |name: &str| -> f64 {
        sample(name)
            .unwrap_or_else(|| panic!("{name} missing from\n{}", admin_get(admin, "/metrics").1))
    };
    assert_eq!(metric("tower_tunnels "), 1.0);
    assert!(metric("tower_requests_total{code=\"200\"}") >= 1.0);
    assert!(metric("tower_requests_total{code=\"401\"}") >= 1.0);
    assert!(metric("tower_bytes_total{direction=\"response\"}") > 0.0);
    assert_eq!(metric("tower_tunnel_reconnects_total"), 0.0);

    // Request bodies are counted on their way to the member.
    let request_bytes = || sample("tower_bytes_total{direction=\"request\"}").unwrap_or(0.0);
    let before = request_bytes();
    let value = "v".repeat(8192);
    let manifest = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: sized\n  namespace: default\ndata:\n  k: {value}\n"
    );
    tower_e2e::kubectl_with_input(&kc, &["create", "-f", "-"], manifest.as_bytes()).success();
    let sent = request_bytes() - before;
    assert!(
        sent >= 8192.0,
        "{sent} request bytes counted for an 8 KiB value"
    );

    // Refused handshakes are counted by reason and status.
    let refusals =
        |labels: &str| sample(&format!("tower_tunnel_refusals_total{{{labels}}}")).unwrap_or(0.0);
    let bad_token = "reason=\"bad_token\",code=\"401\"";
    let forbidden = "reason=\"forbidden\",code=\"403\"";
    assert_eq!(refusals(bad_token), 0.0);
    // (Handshakes by hand: a real agent checks its own token and --name before dialing.)
    let tunnel = Https::to(&server, server.tunnel);
    let handshake = |token: &str, cluster: &str| {
        tunnel
            .request(
                "GET",
                "/v1/tunnel",
                Some(token),
                &[
                    ("connection", "Upgrade"),
                    ("upgrade", "tower-tunnel/1"),
                    ("tower-cluster", cluster),
                ],
            )
            .status
    };
    assert_eq!(handshake("not.a.jwt", "member-2"), 401);
    assert_eq!(refusals(bad_token), 1.0);
    let minted = Server::minter().agent_token("member-1", None);
    assert_eq!(handshake(&minted, "member-3"), 403);
    assert_eq!(handshake(&minted, "member-3"), 403);
    assert_eq!(refusals(forbidden), 2.0);
    assert_eq!(refusals(bad_token), 1.0);
    assert!(
        server
            .clusters()
            .as_array()
            .is_some_and(|l| l.iter().all(|c| c["name"] == "member-1")),
        "refused agents register nothing: {}",
        server.clusters()
    );

    wait_for(
        "requests in flight to settle",
        Duration::from_secs(10),
        || (metric("tower_requests_in_flight ") == 0.0).then_some(()),
    );

    assert_eq!(admin_get(server.admin, "/healthz").0, 200);
    assert_eq!(admin_get(server.admin, "/readyz").0, 200);
    let agent_admin = first.admin.expect("agent admin address");
    assert_eq!(admin_get(agent_admin, "/healthz").0, 200);
    assert_eq!(first.readyz(), 200);

    // The table and the metrics follow the tunnel as it goes and comes back (they are
    // updated one after the other, so each step is awaited until both agree).
    first.process.kill();
    wait_for(
        "the table and the gauge to show the tunnel gone",
        Duration::from_secs(10),
        || (!server.connected("member-1") && metric("tower_tunnels ") == 0.0).then_some(()),
    );
    let second = agent(&server, &member, "member-1").spawn();
    wait_for_with(
        "the table and the metrics to show the agent back, reconnected",
        Duration::from_secs(20),
        || {
            (server.connected("member-1")
                && metric("tower_tunnels ") == 1.0
                && metric("tower_tunnel_reconnects_total") == 1.0)
                .then_some(())
        },
        || second.process.log(),
    );

    // Draining: /readyz says so (and why) while a request is still in flight.
    let user = Server::minter().user_token("alice", &[], None);
    let held =
        Https::frontend(&server).open("/clusters/member-1/debug/bytes?size=4000000000", &user);
    assert_eq!(held.status, 200, "{}", held.head);
    server.process.terminate();
    let (code, reason) = wait_for(
        "/readyz to fail while draining",
        Duration::from_secs(10),
        || {
            let (code, body) = admin_get(admin, "/readyz");
            (code != 200).then_some((code, body))
        },
    );
    assert_eq!(code, 503, "{reason}");
    assert!(reason.contains("draining"), "{reason}");
    assert!(server.process.running(), "still draining the held request");
    assert_eq!(
        admin_get(admin, "/metrics").0,
        200,
        "metrics stay up while draining"
    );
    assert_eq!(admin_get(admin, "/healthz").0, 200, "draining is not dead");
    drop(held);
}

/// The cluster table's summary is open (for the kubelet's neighbours: monitoring, the
/// harness); the agents' addresses, versions and targets and agent.yaml need a user token
/// in --admin-group, and only on a loopback address; `tower-server clusters` sends one.
#[test]
fn cluster_details_and_agent_yaml_need_an_admin_token_on_loopback() {
    let member = Member::start();
    let server = server()
        .admin_addr("0.0.0.0:0")
        .args(&["--proxy-publish-address", "https://tower.example.com:8080"])
        .start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let port = server.admin.port();
    let loopback: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let minter = Server::minter();
    let alice = minter.user_token("alice", &["devs".to_owned()], None);
    let admin = admin_token();

    // No token: the summary, without what an attacker would want.
    let (code, body) = admin_get(loopback, "/v1/clusters");
    assert_eq!(code, 200, "{body}");
    let summary: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let row = &summary[0];
    assert_eq!(row["name"], "member-1");
    assert_eq!(row["connected"], true);
    assert!(row["connected_since"].is_string(), "{row}");
    assert!(row["replicas"].is_array(), "{row}");
    for secret in ["remote_address", "agent_version", "targets", "streams"] {
        assert!(row.get(secret).is_none(), "{secret} without a token: {row}");
    }
    // A token: all of it, for the admin group only.
    for (token, want) in [("garbage", 401), (alice.as_str(), 403)] {
        for path in ["/v1/clusters", "/v1/clusters/member-1/agent.yaml"] {
            let (code, body) = admin_get_as(loopback, path, Some(token));
            assert_eq!(code, want, "{path}: {body}");
        }
    }
    let (code, body) = admin_get_as(loopback, "/v1/clusters", Some(&admin));
    assert_eq!(code, 200, "{body}");
    let details: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(details[0]["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(details[0]["remote_address"].is_string(), "{details}");
    let (code, yaml) = admin_get_as(loopback, "/v1/clusters/member-1/agent.yaml", Some(&admin));
    assert_eq!(code, 200, "{yaml}");
    assert!(yaml.contains("tower.example.com:8080"), "{yaml}");

    // The CLI: with the jwtSecret it mints its own admin token (as in the host's pod,
    // where TOWER_JWT_SECRET_FILE is set) and shows the versions; without, the summary.
    let clusters = |with_secret: bool| {
        let mut command = std::process::Command::new(bin_path("tower-server"));
        command
            .args(["clusters", "--admin-url"])
            .arg(format!("http://{loopback}"))
            .env_remove("TOWER_JWT_SECRET_FILE")
            .env_remove("TOWER_JWT_SECRET")
            .env_remove("TOWER_TOKEN");
        if with_secret {
            command.env("TOWER_JWT_SECRET_FILE", &server.secret_file);
        }
        let out = command.output().expect("tower-server clusters");
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        let row: Vec<String> = table
            .lines()
            .nth(1)
            .expect("a row")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        (row, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (row, _) = clusters(true);
    assert_eq!(row[0], "member-1");
    assert_eq!(row[4], env!("CARGO_PKG_VERSION"));
    let (row, stderr) = clusters(false);
    assert_eq!((row[0].as_str(), row[4].as_str()), ("member-1", "-"));
    assert!(stderr.contains("--jwt-secret-file"), "{stderr}");

    // On the host's own (pod) address: probes and metrics, never the secrets, even for
    // an admin (the token and agent.yaml would cross the network in clear).
    match tower_e2e::non_loopback_ip() {
        Some(ip) => {
            let outside: std::net::SocketAddr = (ip, port).into();
            assert_eq!(admin_get(outside, "/healthz").0, 200);
            assert_eq!(admin_get(outside, "/metrics").0, 200);
            assert_eq!(admin_get(outside, "/v1/clusters").0, 200);
            for path in ["/v1/clusters", "/v1/clusters/member-1/agent.yaml"] {
                let (code, body) = admin_get_as(outside, path, Some(&admin));
                assert_eq!(code, 403, "{path} on {outside}: {body}");
                assert!(body.contains("loopback"), "{body}");
            }
        }
        None => eprintln!(
            "this host has no non-loopback address: the pod-address case is left to the unit test"
        ),
    }
}

/// A restart that finds the serving certificate gone (or no longer right for the server's
/// names) issues a new one from the CA it kept: agents pinned to that CA reconnect.
#[test]
fn a_restarted_server_keeps_its_ca_and_agents_that_trust_it_reconnect() {
    let member = Member::start();
    let mut server = server().start();
    let state = server.state.clone();
    let read = |name: &str| std::fs::read(state.join(name)).expect("state file");
    let (ca, ca_key, leaf) = (read("ca.crt"), read("ca.key"), read("tls.crt"));
    // The agent trusts a copy of the CA, as a member cluster's agent.yaml does.
    let copies = TempDir::new("pinned-ca");
    let pinned = copies.path().join("ca.crt");
    std::fs::write(&pinned, &ca).expect("write the copy");
    let agent = agent(&server, &member, "member-1")
        .ca_file(&pinned)
        .connect(&server);

    // Lost: the serving key (a partial restore, a hand-cleaned directory).
    std::fs::remove_file(state.join("tls.key")).expect("remove tls.key");
    server.restart();
    assert_eq!(
        read("ca.crt"),
        ca,
        "the CA is byte for byte the one agents trust"
    );
    assert_eq!(read("ca.key"), ca_key);
    assert_ne!(read("tls.crt"), leaf, "a new serving certificate");
    wait_for_with(
        "the agent pinned to the old CA to reconnect",
        Duration::from_secs(20),
        || server.connected("member-1").then_some(()),
        || agent.process.log(),
    );
    let ca_pem = String::from_utf8(ca.clone()).expect("PEM");
    let token = Server::minter().user_token("alice", &[], None);
    let reply =
        Https::with_ca(&ca_pem, server.frontend).get("/clusters/member-1/version", Some(&token));
    assert_eq!(reply.status, 200, "{}", reply.body);

    // Half a CA is refused (exit 2, naming the missing file), and nothing is overwritten.
    server.process.kill();
    std::fs::remove_file(state.join("ca.key")).expect("remove ca.key");
    let out = std::process::Command::new(bin_path("tower-server"))
        .args([
            "serve",
            "--tunnel-addr",
            "127.0.0.1:0",
            "--proxy-addr",
            "127.0.0.1:0",
        ])
        .args(["--admin-addr", "127.0.0.1:0", "--jwt-secret-file"])
        .arg(&server.secret_file)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .expect("tower-server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ca.key is missing"), "{stderr}");
    assert_eq!(read("ca.crt"), ca);
    assert!(!state.join("ca.key").exists());
}

#[test]
fn operators_can_bring_their_own_certificates() {
    let pki = tower_e2e::OperatorPki::new();
    let member = Member::start();
    let server = server().args(&pki.flags()).start();
    assert!(
        !server.state.join("ca.crt").exists(),
        "nothing generated when certificates are given"
    );
    let _agent = agent(&server, &member, "member-1")
        .ca_file(pki.ca_file())
        .connect(&server);
    let token = tower_e2e::Server::minter().user_token("alice", &[], None);
    let https = tower_e2e::Https::with_ca(&pki.ca_pem, server.frontend);
    assert_eq!(
        https.get("/clusters/member-1/version", Some(&token)).status,
        200
    );
}

#[test]
fn the_kubesphere_target_reaches_its_own_service_with_the_callers_token() {
    use std::io::{BufRead, BufReader, Write};
    // A stand-in for ks-apiserver: answers with the Authorization header it received.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let ks = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut auth = String::new();
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                if let Some(v) = line
                    .to_ascii_lowercase()
                    .strip_prefix("authorization: bearer ")
                {
                    auth = v.trim().chars().take(12).collect();
                }
                line.clear();
            }
            let body = format!("ks saw {auth}");
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1")
        .args(&["--kubesphere-service", &ks])
        .connect(&server);
    let token = tower_e2e::Server::minter().user_token("alice", &[], None);
    let reply = tower_e2e::Https::frontend(&server).get(
        "/clusters/member-1/targets/kubesphere/kapis/version",
        Some(&token),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.body,
        format!("ks saw {}", &token.to_ascii_lowercase()[..12])
    );
}
