//! B5: many idle agents connected to one tower-server.
//!
//! A thousand `tower-agent` processes would measure the machine, not the server, so the
//! agents run in this process, from the `tower_agent` library (`tower_agent::run`, the
//! same entry point the binary calls), on their own two-thread runtime. Each has its own
//! cluster name and agent token. The server is fresh and runs with the default keepalive
//! (10 s), as it would in the field; its memory per agent is its RSS with every tunnel
//! up, minus its RSS before the first agent dialed.

use std::time::{Duration, Instant};

use clap::Parser as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower_e2e::{Member, Server};

/// How often `/v1/clusters` is polled while the agents connect.
const POLL: Duration = Duration::from_millis(100);
/// How long after the last agent connected the server's RSS is sampled again (a
/// keepalive round and the first pings' buffers are then part of it).
const SETTLE: Duration = Duration::from_secs(3);

/// Connects `n` in-process agents to a fresh server, waiting at most `limit`; prints the
/// rows and returns the JSON.
pub(crate) fn b5(member: &Member, n: usize, limit: Duration) -> Value {
    let server = crate::tower_server().args(&["--keepalive", "10s"]).start();
    let idle = server.process.rss_kib();
    let bench_idle = tower_e2e::rss_kib(std::process::id());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("agents' runtime");
    let minter = Server::minter();
    let proxy_server = format!("https://{}", server.tunnel);
    let ca_file = server.ca_file.display().to_string();
    let kubeconfig = member.kubeconfig.display().to_string();
    let secret_file = server.secret_file.display().to_string();
    let configs: Vec<tower_agent::Config> = (0..n)
        .map(|i| {
            let name = format!("idle-{i:04}");
            let token = minter.agent_token(&name, None);
            let flags = [
                ("--name", name.as_str()),
                ("--token", &token),
                ("--proxy-server", &proxy_server),
                ("--ca-file", &ca_file),
                ("--kubeconfig", &kubeconfig),
                ("--jwt-secret-file", &secret_file),
                ("--shutdown-grace", "1s"),
            ];
            let args =
                std::iter::once("tower-agent").chain(flags.iter().flat_map(|(k, v)| [*k, *v]));
            let cli = tower_agent::cli::Cli::try_parse_from(args).expect("agent flags");
            runtime
                .block_on(tower_agent::cli::build_config(&cli))
                .expect("agent config")
        })
        .collect();

    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let agents: Vec<_> = configs
        .into_iter()
        .map(|config| runtime.spawn(tower_agent::run(config, None, shutdown.clone())))
        .collect();
    let mut connected = 0;
    while started.elapsed() < limit {
        connected = count_connected(&server);
        if connected >= n {
            break;
        }
        std::thread::sleep(POLL);
    }
    let connect_time = started.elapsed();
    let all_up = server.process.rss_kib();
    std::thread::sleep(SETTLE);
    let settled = server.process.rss_kib();
    let still = count_connected(&server);
    let bench = tower_e2e::rss_kib(std::process::id());

    shutdown.cancel();
    runtime.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            for agent in agents {
                let _ = agent.await;
            }
        })
        .await;
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    drop(server);

    let per = |rss: u64| rss.saturating_sub(idle) as f64 / connected.max(1) as f64;
    crate::row(
        &format!("B5 {n} idle agents: connect all (s)"),
        "-",
        &format!("{:.2}", connect_time.as_secs_f64()),
        "",
        "",
    );
    crate::row(
        &format!("B5 {n} idle agents: server KiB/agent"),
        &format!("idle {:.1} MiB", idle as f64 / 1024.0),
        &format!("{:.1}", per(settled)),
        "",
        "<= 64",
    );
    if connected < n || still < connected {
        println!(
            "{:<36} only {connected} of {n} connected within {limit:?} ({still} still up {SETTLE:?} later)",
            ""
        );
    }
    json!({
        "agents": n,
        "connected": connected,
        "still_connected_after_settle": still,
        "connect_all_s": connect_time.as_secs_f64(),
        "server_rss_kib": {"idle": idle, "all_connected": all_up, "settled": settled},
        "server_kib_per_agent": per(settled),
        "server_kib_per_agent_at_connect": per(all_up),
        // The agents' own side, for context only: it shares this process with the client
        // and the stand-in.
        "bench_process_kib_per_agent": bench.saturating_sub(bench_idle) as f64 / connected.max(1) as f64,
    })
}

/// How many `idle-*` clusters the server shows connected (0 if it does not answer).
fn count_connected(server: &Server) -> usize {
    let (code, body) = tower_e2e::admin_get(server.admin, "/v1/clusters");
    if code != 200 {
        return 0;
    }
    let list: Value = serde_json::from_str(&body).unwrap_or_default();
    list.as_array().map_or(0, |clusters| {
        clusters
            .iter()
            .filter(|c| {
                c["connected"] == true && c["name"].as_str().is_some_and(|n| n.starts_with("idle-"))
            })
            .count()
    })
}
