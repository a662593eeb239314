//! Per-cluster metrics on the server's `/metrics` and the agent's own `/metrics`.

use std::time::Duration;

use tower_e2e::{Https, Member, Server, TempDir, admin_get, agent, kubectl, server, wait_for};

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// What `promtool check metrics` (Prometheus's linter of names, units and help) says
/// about the series of `text` whose names start with one of `ours`.
fn lint(text: &str, ours: &[&str]) -> Vec<String> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; .ci/run installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .filter(|l| ours.iter().any(|p| l.trim_start().starts_with(p)))
        // promtool reads the classic text format, where a counter's HELP names the
        // sample (`x_total`); OpenMetrics, which both binaries serve, names the family
        // (`x`). Not a fault of the metric.
        .filter(|l| !l.contains("_total no help text"))
        .map(str::to_owned)
        .collect()
}

fn scrape(addr: std::net::SocketAddr) -> String {
    let (code, text) = admin_get(addr, "/metrics");
    assert_eq!(code, 200, "{text}");
    text
}

#[test]
fn per_cluster_series_exist_for_registered_clusters_only() {
    let member = Member::start();
    let dir = TempDir::new("fleet-metrics");
    let clusters = dir.path().join("clusters.yaml");
    std::fs::write(
        &clusters,
        "clusters:\n  - name: member-1\n  - name: member-2\n",
    )
    .expect("clusters file");
    let server = server()
        .args(&["--clusters", clusters.to_str().expect("path")])
        .start();
    let first = agent(&server, &member, "member-1").connect(&server);
    let kc = server.kubeconfig("member-1", "alice", &["devs"]);
    kubectl(&kc, &["get", "pods"]).success();
    // A name nobody registered, and one that is not even a name: 404 and 400, counted in
    // the totals but never a series of its own.
    let https = Https::frontend(&server);
    let token = Server::minter().user_token("alice", &[], Some(Duration::from_secs(3600)));
    assert_eq!(https.get("/clusters/nope/api", Some(&token)).status, 404);
    assert_eq!(https.get("/clusters/NOPE_/api", Some(&token)).status, 400);
    // member-2 is registered, its agent is not connected: 503, in its own series.
    assert_eq!(
        https.get("/clusters/member-2/api", Some(&token)).status,
        503
    );

    let text = wait_for(
        "member-1's tunnel round trip",
        Duration::from_secs(15),
        || {
            let text = scrape(server.admin);
            sample(
                &text,
                "tower_cluster_tunnel_rtt_seconds{cluster=\"member-1\"}",
            )
            .is_some()
            .then_some(text)
        },
    );
    let get = |prefix: &str| {
        sample(&text, prefix).unwrap_or_else(|| panic!("{prefix} missing from\n{text}"))
    };
    assert_eq!(get("tower_ready"), 1.0);
    assert_eq!(get("tower_cluster_tunnel_up{cluster=\"member-1\"}"), 1.0);
    assert_eq!(get("tower_cluster_tunnel_up{cluster=\"member-2\"}"), 0.0);
    let rtt = get("tower_cluster_tunnel_rtt_seconds{cluster=\"member-1\"}");
    assert!(rtt > 0.0 && rtt < 1.0, "{rtt}");
    assert!(
        sample(
            &text,
            "tower_cluster_tunnel_rtt_seconds{cluster=\"member-2\"}"
        )
        .is_none(),
        "no round trip without a tunnel"
    );
    assert!(
        get(
            "tower_cluster_request_duration_seconds_count{cluster=\"member-1\",code_class=\"2xx\"}"
        ) >= 1.0
    );
    assert_eq!(
        get(
            "tower_cluster_request_duration_seconds_count{cluster=\"member-2\",code_class=\"5xx\"}"
        ),
        1.0
    );
    // Buckets are cumulative and end with +Inf = count.
    let inf = get(
        "tower_cluster_request_duration_seconds_bucket{le=\"+Inf\",cluster=\"member-1\",code_class=\"2xx\"}",
    );
    assert_eq!(
        inf,
        get(
            "tower_cluster_request_duration_seconds_count{cluster=\"member-1\",code_class=\"2xx\"}"
        )
    );
    assert!(get("tower_cluster_bytes_total{cluster=\"member-1\",direction=\"response\"}") > 0.0);
    assert!(get("tower_cluster_streams{cluster=\"member-1\"}") >= 0.0);
    for line in text.lines().filter(|l| l.contains("cluster=\"")) {
        assert!(
            line.contains("cluster=\"member-1\"") || line.contains("cluster=\"member-2\""),
            "a series for an unregistered name: {line}"
        );
    }

    let complaints = lint(&text, &["tower_cluster_", "tower_ready"]);
    assert!(
        complaints.is_empty(),
        "promtool check metrics: {complaints:#?}"
    );

    // The agent's own metrics: its tunnel, its upstream's latency, what it refused.
    let agent_admin = first.admin.expect("agent admin address");
    let refused = kubectl(&kc, &["get", "pods", "--as", "bob"]);
    assert_ne!(refused.code(), Some(0));
    let text = scrape(agent_admin);
    let get = |prefix: &str| {
        sample(&text, prefix).unwrap_or_else(|| panic!("{prefix} missing from\n{text}"))
    };
    assert_eq!(get("tower_agent_tunnels"), 1.0);
    assert!(
        get(
            "tower_agent_upstream_request_duration_seconds_count{target=\"kubernetes\",code_class=\"2xx\"}"
        ) >= 1.0
    );
    assert!(get("tower_agent_requests_refused_total{reason=\"impersonation\"}") >= 1.0);
    assert!(text.contains("# TYPE tower_agent_upstream_failures counter"));
    let complaints = lint(&text, &["tower_agent_"]);
    assert!(
        complaints.is_empty(),
        "promtool check metrics: {complaints:#?}"
    );
}
