//! Per-cluster metrics on the server's `/metrics` and the agent's own `/metrics`.

use std::time::Duration;

use tower_e2e::{
    Https, Member, Server, TempDir, admin_get, agent, kubectl, kubectl_with_input, server, wait_for,
};

/// The value of the sample whose line starts with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(prefix)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `text` (OpenMetrics, which both binaries serve) in the classic text format, the one
/// `promtool check metrics` reads. The two differ only in what a counter's `# HELP` and
/// `# TYPE` name: the family (`x`) in OpenMetrics, the sample (`x_total`) in the classic
/// format; read as it is, every counter would be "no help text".
fn classic(text: &str) -> String {
    let counters: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len() + 64);
    for line in text.lines() {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let (name, rest) = line.strip_prefix(tag)?.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{tag}{name}_total {rest}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Lints every series of `text` with `promtool check metrics` (Prometheus's linter of
/// names, units and help); fails on any complaint, a parse error, or a non-zero exit.
fn lint(text: &str) {
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
        .write_all(classic(text).as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics ({}): {said}\nof:\n{text}",
        out.status
    );
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
        // Long enough to look at a draining server (the end of the test).
        .args(&[
            "--clusters",
            clusters.to_str().expect("path"),
            "--shutdown-grace",
            "60s",
        ])
        .start();
    let first = agent(&server, &member, "member-1").connect(&server);
    let https = Https::frontend(&server);
    let token = Server::minter().user_token("alice", &[], Some(Duration::from_secs(3600)));
    // From a fresh scrape each time.
    let metric = |prefix: &str| {
        let text = scrape(server.admin);
        sample(&text, prefix).unwrap_or_else(|| panic!("{prefix} missing from\n{text}"))
    };

    // Open streams. Idle, a tunnel holds one, its control stream; requests leave the
    // connections they used pooled, each holding a stream, so this looks before the
    // first. One more while a download is held open; back to idle once its caller goes
    // (a connection cut mid-body is not pooled).
    let streams = "tower_cluster_streams{cluster=\"member-1\"}";
    let idle = 1.0;
    assert_eq!(metric(streams), idle, "only the control stream");
    let download = "/clusters/member-1/debug/bytes?size=4000000000";
    let held = https.open(download, &token);
    assert_eq!(held.status, 200, "{}", held.head);
    assert_eq!(
        metric(streams),
        idle + 1.0,
        "a download in flight holds a stream"
    );
    drop(held);
    wait_for(
        "the download's stream to close",
        Duration::from_secs(10),
        || (metric(streams) == idle).then_some(()),
    );

    let kc = server.kubeconfig("member-1", "alice", &["devs"]);
    kubectl(&kc, &["get", "pods"]).success();
    // A name nobody registered, and one that is not even a name: 404 and 400, counted in
    // the totals but never a series of its own.
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
    for line in text.lines().filter(|l| l.contains("cluster=\"")) {
        assert!(
            line.contains("cluster=\"member-1\"") || line.contains("cluster=\"member-2\""),
            "a series for an unregistered name: {line}"
        );
    }
    lint(&text);

    // Request bodies count on their way to the member.
    let request_bytes = "tower_cluster_bytes_total{cluster=\"member-1\",direction=\"request\"}";
    let before = metric(request_bytes);
    let value = "v".repeat(8192);
    let manifest = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: sized\n  namespace: default\ndata:\n  k: {value}\n"
    );
    kubectl_with_input(&kc, &["create", "-f", "-"], manifest.as_bytes()).success();
    let sent = metric(request_bytes) - before;
    assert!(
        sent >= 8192.0,
        "{sent} request bytes counted for an 8 KiB value"
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
    lint(&text);

    // Draining (SIGTERM, a request still in flight): not ready, as /readyz says.
    assert_eq!(metric("tower_ready"), 1.0);
    let held = https.open(download, &token);
    assert_eq!(held.status, 200, "{}", held.head);
    server.process.terminate();
    wait_for(
        "tower_ready 0 while draining",
        Duration::from_secs(10),
        || (metric("tower_ready") == 0.0).then_some(()),
    );
    let (code, reason) = admin_get(server.admin, "/readyz");
    assert_eq!((code, reason.trim()), (503, "draining"));
    drop(held);
}
