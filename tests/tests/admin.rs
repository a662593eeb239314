//! What the host and the agent report about themselves.

use std::time::Duration;

use tower_e2e::{Member, admin_get, agent, kubectl, server, wait_for};

#[test]
fn cluster_table_metrics_and_probes_tell_the_truth() {
    let member = Member::start();
    let server = server().start();
    let mut first = agent(&server, &member, "member-1").connect(&server);
    let kc = server.kubeconfig("member-1", "alice", &[]);
    kubectl(&kc, &["get", "pods"]).success();
    let refused = kubectl(
        &server.kubeconfig_with_token("member-1", "garbage"),
        &["get", "pods"],
    );
    assert_ne!(refused.code(), Some(0));

    let table = server.clusters();
    let row = &table[0];
    assert_eq!(row["name"], "member-1");
    assert_eq!(row["connected"], true);
    assert_eq!(row["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(
        row["remote_address"]
            .as_str()
            .unwrap_or_default()
            .starts_with("127.0.0.1:"),
        "{row}"
    );
    assert!(
        row["connected_since"]
            .as_str()
            .unwrap_or_default()
            .ends_with('Z'),
        "{row}"
    );

    let metric = |name: &str| -> f64 {
        let (code, text) = admin_get(server.admin, "/metrics");
        assert_eq!(code, 200);
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
    };
    assert_eq!(metric("tower_tunnels "), 1.0);
    assert!(metric("tower_requests_total{code=\"200\"}") >= 1.0);
    assert!(metric("tower_requests_total{code=\"401\"}") >= 1.0);
    assert!(metric("tower_bytes_total{direction=\"response\"}") > 0.0);
    assert_eq!(metric("tower_tunnel_reconnects_total"), 0.0);
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

    first.process.kill();
    wait_for("the tunnel to close", Duration::from_secs(10), || {
        (!server.connected("member-1")).then_some(())
    });
    assert_eq!(metric("tower_tunnels "), 0.0);
    let _second = agent(&server, &member, "member-1").connect(&server);
    assert_eq!(metric("tower_tunnel_reconnects_total"), 1.0);
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
