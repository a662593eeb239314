//! B5: many idle agents connected to one tower-server.
//!
//! A thousand `tower-agent` processes would measure the machine, not the server, so the
//! agents run in this process, from the `tower_agent` library (`tower_agent::run`, the
//! same entry point the binary calls), on their own two-thread runtime. Each has its own
//! cluster name and agent token. The server is fresh and runs with the default keepalive
//! (10 s), as it would in the field; its memory per agent is its RSS with every tunnel
//! up, minus its RSS before the first agent dialed.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower_e2e::{Member, Server};

use crate::stats::Samples;

/// How often `/v1/clusters` is polled while the agents connect.
const POLL: Duration = Duration::from_millis(100);
/// How long after the last agent connected the server's RSS is sampled again (a
/// keepalive round and the first pings' buffers are then part of it).
const SETTLE: Duration = Duration::from_secs(3);

/// Connects `n` in-process agents to a fresh server, `rounds` times, waiting at most
/// `limit` each time; prints the rows (medians over the rounds, and spreads) and returns
/// the JSON.
pub(crate) fn b5(member: &Member, n: usize, rounds: usize, limit: Duration) -> Value {
    let all: Vec<Round> = (0..rounds).map(|_| round(member, n, limit)).collect();
    let over = |figure: fn(&Round) -> f64| all.iter().map(figure).collect::<Samples>();
    let connect = over(|r| r.connect_time.as_secs_f64());
    let per_agent = over(|r| r.per_agent(r.settled));
    let idle = over(|r| r.idle as f64 / 1024.0);
    crate::row(
        &format!("B5 {n} idle agents: connect all (s)"),
        "-",
        &format!("{:.2}", connect.median()),
        "",
        "",
    );
    crate::row(
        &format!("B5 {n} idle agents: server KiB/agent"),
        &format!("idle {:.1} MiB", idle.median()),
        &format!("{:.1}", per_agent.median()),
        "",
        "<= 64",
    );
    println!(
        "{:<36} spread over {rounds} rounds: KiB/agent {}, connect all {} s",
        "",
        per_agent.spread(1),
        connect.spread(2),
    );
    for (i, r) in all.iter().enumerate() {
        if r.connected < n || r.still < r.connected {
            println!(
                "{:<36} round {}: only {} of {n} connected within {limit:?} ({} still up {SETTLE:?} later)",
                "",
                i + 1,
                r.connected,
                r.still
            );
        }
    }
    json!({
        "agents": n,
        "server_kib_per_agent": per_agent.to_json(),
        "connect_all_s": connect.to_json(),
        "rounds": all.iter().map(Round::to_json).collect::<Vec<_>>(),
    })
}

/// What one round of B5 measured.
struct Round {
    connected: usize,
    /// Still connected [`SETTLE`] after the last one connected.
    still: usize,
    connect_time: Duration,
    /// The server's RSS (KiB) before the first agent dialed, when the last connected, and
    /// [`SETTLE`] later.
    idle: u64,
    all_up: u64,
    settled: u64,
    /// This process's RSS growth per agent.
    bench_per_agent: f64,
}

impl Round {
    /// KiB per agent of the server at RSS `rss`.
    fn per_agent(&self, rss: u64) -> f64 {
        rss.saturating_sub(self.idle) as f64 / self.connected.max(1) as f64
    }

    fn to_json(&self) -> Value {
        json!({
            "connected": self.connected,
            "still_connected_after_settle": self.still,
            "connect_all_s": self.connect_time.as_secs_f64(),
            "server_rss_kib": {"idle": self.idle, "all_connected": self.all_up, "settled": self.settled},
            "server_kib_per_agent": self.per_agent(self.settled),
            "server_kib_per_agent_at_connect": self.per_agent(self.all_up),
            // The agents' own side, for context only: it shares this process with the
            // client and the stand-in.
            "bench_process_kib_per_agent": self.bench_per_agent,
        })
    }
}

/// Connects `n` in-process agents to a fresh server, waiting at most `limit`.
fn round(member: &Member, n: usize, limit: Duration) -> Round {
    let server = crate::tower_server().args(&["--keepalive", "10s"]).start();
    let idle = server.process.rss_kib();
    let bench_idle = tower_e2e::rss_kib(std::process::id());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("agents' runtime");
    let minter = Server::minter();
    let configs: Vec<tower_agent::Config> = (0..n)
        .map(|i| {
            let name = format!("idle-{i:04}");
            let token = minter.agent_token(&name, None);
            tower_e2e::fleet::agent_config(&runtime, &server, member, &name, &token)
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

    Round {
        connected,
        still,
        connect_time,
        idle,
        all_up,
        settled,
        bench_per_agent: bench.saturating_sub(bench_idle) as f64 / connected.max(1) as f64,
    }
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
