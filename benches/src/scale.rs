//! B9: how many members can one tower-server serve?
//!
//! As in B5 ([`crate::agents`]), the agents run in this process from the `tower_agent`
//! library ([`tower_e2e::fleet::Fleet`]), on one two-thread runtime, each with its own
//! cluster name and token; they share one set of metrics, whose count of tunnels up is
//! how the bench sees them connect without asking the server. For each N (a fresh server each
//! time, at its default 10 s keepalive):
//!
//! - **memory**: the server's RSS once all N are up and a few seconds idle, minus its
//!   RSS before the first dialed, over N; and its peak (`VmHWM`) through the first
//!   connect and through the restart's reconnect, against deploy/host's memory limit;
//! - **routing**: p50/p99 of small requests (`/version`) to one member, one at a time,
//!   through the frontend, with the other N − 1 idle;
//! - **restart**: the server is killed (SIGKILL) and started again on the same ports;
//!   the time from the kill until all N tunnels are back, how fast they came back at the
//!   peak (tunnels per second over the busiest 100 ms: the herd, if there is one) and how
//!   many dials failed meanwhile (refused while the server was down, timed out, ...).
//!
//! Kubernetes mode ([`b9_kubernetes`]): Cluster objects on the stand-in (the host API
//! server), the server in `--kubernetes` mode paced to `--kube-api-qps`/`--kube-api-burst`,
//! and the time until every Cluster's `AgentAvailable` condition is right after a restart
//! during which some agents left and others arrived, with the restarted server's idle
//! RSS and its peak since the restart.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tower_e2e::Member;
use tower_e2e::fleet::{Fleet, clusters};

use crate::load::{self, Target};
use crate::stats::Samples;

/// How long after the last agent connected the server's RSS is sampled (a keepalive
/// round and the first pings' buffers are then part of it).
const SETTLE: Duration = Duration::from_secs(3);
/// How often the count of tunnels up is sampled during a restart.
const SAMPLE: Duration = Duration::from_millis(10);
/// The window over which the peak reconnect rate is taken.
const PEAK_WINDOW: Duration = Duration::from_millis(100);
/// The cluster whose routing latency is measured (always one of the N).
const PROBE_CLUSTER: &str = "scale-00000";
/// The Deployment tower-server runs as: its memory limit is what the peaks must stay under.
const DEPLOYMENT: &str = include_str!("../../deploy/host/deployment.yaml");

/// What one N measured.
struct Round {
    n: usize,
    connected: usize,
    connect_all: Duration,
    /// Server RSS (KiB) before the first dial and after all settled.
    idle_kib: u64,
    settled_kib: u64,
    p50_us: f64,
    p99_us: f64,
    probe_errors: usize,
    /// From the kill until all were back (None: not within the limit).
    restart_all_back: Option<Duration>,
    /// How many were back at the limit, if not all.
    restart_back: usize,
    /// Tunnels per second over the busiest [`PEAK_WINDOW`].
    peak_rate: f64,
    /// Dials that failed between the kill and all back.
    dials_failed: u64,
    /// Server RSS after the restart, all back and settled.
    restarted_kib: u64,
    /// The server's peak RSS (`VmHWM`) through the first connect of all N, and through the
    /// restart's reconnect (the restarted process's own peak).
    connect_peak_kib: u64,
    restart_peak_kib: u64,
}

impl Round {
    fn kib_per_member(&self) -> f64 {
        self.settled_kib.saturating_sub(self.idle_kib) as f64 / self.connected.max(1) as f64
    }

    fn to_json(&self) -> Value {
        json!({
            "members": self.n,
            "connected": self.connected,
            "connect_all_s": self.connect_all.as_secs_f64(),
            "server_rss_kib": {"idle": self.idle_kib, "settled": self.settled_kib, "after_restart": self.restarted_kib,
                               "peak_connect": self.connect_peak_kib, "peak_restart": self.restart_peak_kib},
            "server_kib_per_member": self.kib_per_member(),
            "routing_p50_us": self.p50_us,
            "routing_p99_us": self.p99_us,
            "routing_errors": self.probe_errors,
            "restart_all_back_s": self.restart_all_back.map(|d| d.as_secs_f64()),
            "restart_back": self.restart_back,
            "restart_peak_tunnels_per_s": self.peak_rate,
            "restart_dials_failed": self.dials_failed,
        })
    }
}

/// B9: the sizes of this run (capped to what `open_files` allows: one descriptor per
/// tunnel in this process and in the server), then Kubernetes mode.
pub(crate) fn run(member: &Member, user: &str, quick: bool, open_files: u64) -> Value {
    let most = usize::try_from(open_files.saturating_sub(2_000)).unwrap_or(usize::MAX);
    let (mut sizes, rounds) = if quick {
        (vec![10, 1_000], 1)
    } else {
        (vec![10, 100, 1_000, 10_000], 3)
    };
    // `TOWER_BENCH_B9=10000` (a comma-separated list; `0` for none): other sizes, for
    // side-by-side runs of one change.
    if let Ok(list) = std::env::var("TOWER_BENCH_B9") {
        sizes = list
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .filter(|n| *n > 0)
            .collect();
    }
    if sizes.iter().any(|n| *n > most) {
        println!("tower-bench: B9: {open_files} open files allow at most {most} members; capping");
    }
    let sizes: Vec<usize> = sizes.into_iter().map(|n| n.min(most)).collect();
    let members = b9(member, user, &sizes, rounds, quick);
    // `TOWER_BENCH_B9_KUBE=N`: Kubernetes mode with N Clusters (`0`: left out).
    let clusters = match std::env::var("TOWER_BENCH_B9_KUBE").map(|v| v.trim().parse::<usize>()) {
        Ok(Ok(n)) => n,
        _ if quick => 500,
        _ => 10_000,
    };
    let kubernetes =
        (clusters > 0).then(|| b9_kubernetes(member, clusters.min(most), (50.0, 100), quick));
    json!({ "members": members, "kubernetes": kubernetes })
}

/// B9 at each of `sizes`, `rounds` times each; prints the rows and returns the JSON.
pub(crate) fn b9(
    member: &Member,
    user: &str,
    sizes: &[usize],
    rounds: usize,
    quick: bool,
) -> Value {
    let mut out = Vec::new();
    let limit_mib = deployed_limit_kib() as f64 / 1024.0;
    for &n in sizes {
        let all: Vec<Round> = (0..rounds).map(|_| round(member, user, n, quick)).collect();
        let over = |f: &dyn Fn(&Round) -> f64| all.iter().map(f).collect::<Samples>();
        let kib = over(&|r| r.kib_per_member());
        let p50 = over(&|r| r.p50_us);
        let p99 = over(&|r| r.p99_us);
        let back = over(&|r| r.restart_all_back.map_or(f64::NAN, |d| d.as_secs_f64()));
        let peak = over(&|r| r.peak_rate);
        let connect = over(&|r| r.connect_all.as_secs_f64());
        let failed = over(&|r| r.dials_failed as f64);
        let mib = |kib: u64| kib as f64 / 1024.0;
        let connect_peak = over(&|r| mib(r.connect_peak_kib));
        let restart_peak = over(&|r| mib(r.restart_peak_kib));
        crate::row(
            &format!("B9 N={n}: server KiB/member"),
            "-",
            &format!("{:.1}", kib.median()),
            "",
            "<= 32",
        );
        crate::row(
            &format!("B9 N={n}: one member p50/p99 (us)"),
            "-",
            &format!("{:.0} / {:.0}", p50.median(), p99.median()),
            "",
            "flat in N",
        );
        crate::row(
            &format!("B9 N={n}: all back after restart (s)"),
            "-",
            &format!("{:.2}", back.median()),
            "",
            "<= 10 s",
        );
        println!(
            "{:<36} peak {:.0} tunnels/s over {PEAK_WINDOW:?}, {:.0} dials failed, connect all {:.2} s",
            "",
            peak.median(),
            failed.median(),
            connect.median()
        );
        crate::row(
            &format!("B9 N={n}: server peak RSS (MiB)"),
            "-",
            &format!(
                "{:.0} / {:.0}",
                connect_peak.median(),
                restart_peak.median()
            ),
            "",
            &format!("<= {limit_mib:.0}"),
        );
        println!(
            "{:<36} through the first connect / the restart's reconnect; the limit is deploy/host's",
            ""
        );
        if rounds > 1 {
            println!(
                "{:<36} spread over {rounds} rounds: KiB/member {}, p99 {} us, back {} s",
                "",
                kib.spread(1),
                p99.spread(0),
                back.spread(2)
            );
        }
        for r in &all {
            if r.connected < n || r.restart_all_back.is_none() {
                println!(
                    "{:<36} only {} of {n} connected; {} back after the restart",
                    "", r.connected, r.restart_back
                );
            }
        }
        out.push(json!({
            "members": n,
            "server_kib_per_member": kib.to_json(),
            "routing_p50_us": p50.to_json(),
            "routing_p99_us": p99.to_json(),
            "restart_all_back_s": back.to_json(),
            "restart_peak_tunnels_per_s": peak.to_json(),
            "restart_dials_failed": failed.to_json(),
            "connect_all_s": connect.to_json(),
            "server_peak_rss_mib": {"connect": connect_peak.to_json(), "restart": restart_peak.to_json(),
                                    "deployed_limit": limit_mib},
            "rounds": all.iter().map(Round::to_json).collect::<Vec<_>>(),
        }));
    }
    json!({ "sizes": out })
}

fn round(member: &Member, user: &str, n: usize, quick: bool) -> Round {
    let limit = Duration::from_secs(if n > 1_000 { 120 } else { 60 });
    let mut server = crate::tower_server().args(&["--keepalive", "10s"]).start();
    let idle_kib = server.process.rss_kib();
    let mut fleet = Fleet::new();
    let names = clusters("scale", n);
    let started = Instant::now();
    fleet.start(&server, member, &names);
    // From the first agent's start (they dial while the others are being set up).
    fleet.wait_up(n, limit.saturating_sub(started.elapsed()));
    let connect_all = started.elapsed();
    let connected = fleet.tunnels_up();
    std::thread::sleep(SETTLE);
    let settled_kib = server.process.rss_kib();
    let connect_peak_kib = server.process.peak_rss_kib();

    // One member's routing latency, the others idle.
    let probe = Target::new(
        &server.ca_pem,
        server.frontend,
        format!("/clusters/{PROBE_CLUSTER}/version"),
        user,
    );
    let requests = if quick { 500 } else { 2_000 };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("probe runtime");
    rt.block_on(load::run(&probe, 1, 100, Duration::from_secs(10))); // warm the pools
    let mut run = rt.block_on(load::run(&probe, 1, requests, Duration::from_secs(30)));
    let (p50_us, p99_us) = (
        run.percentile(0.5).as_secs_f64() * 1e6,
        run.percentile(0.99).as_secs_f64() * 1e6,
    );

    // Restart: kill, start again on the same ports, and watch them come back.
    let failed_before = fleet.dials_failed();
    let killed = Instant::now();
    server.process.kill();
    let samples = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut samples = vec![(Duration::ZERO, fleet.tunnels_up())];
            let mut dipped = false;
            while killed.elapsed() < limit {
                let up = fleet.tunnels_up();
                samples.push((killed.elapsed(), up));
                dipped |= up < n;
                if dipped && up >= n {
                    break;
                }
                std::thread::sleep(SAMPLE);
            }
            samples
        });
        server.restart();
        sampler.join().expect("sampler")
    });
    let dials_failed = fleet.dials_failed() - failed_before;
    let (at, restart_back) = samples.last().copied().unwrap_or_default();
    let restart_all_back = (restart_back >= n).then_some(at);
    let peak_rate = peak_rate(&samples);
    std::thread::sleep(SETTLE);
    let restarted_kib = server.process.rss_kib();
    let restart_peak_kib = server.process.peak_rss_kib();

    fleet.stop();
    drop(server);
    Round {
        n,
        connected,
        connect_all,
        idle_kib,
        settled_kib,
        p50_us,
        p99_us,
        probe_errors: run.errors,
        restart_all_back,
        restart_back,
        peak_rate,
        dials_failed,
        restarted_kib,
        connect_peak_kib,
        restart_peak_kib,
    }
}

/// tower-server's memory limit in deploy/host, in KiB.
fn deployed_limit_kib() -> u64 {
    tower_e2e::pod::deployment_memory_limit(DEPLOYMENT)
        .expect("deploy/host/deployment.yaml")
        .expect("deploy/host's tower-server has a memory limit")
        / 1024
}

/// The most tunnels that came up within any [`PEAK_WINDOW`], per second.
fn peak_rate(samples: &[(Duration, usize)]) -> f64 {
    let mut best = 0usize;
    let mut from = 0;
    for (i, &(at, up)) in samples.iter().enumerate() {
        while at - samples[from].0 > PEAK_WINDOW {
            from += 1;
        }
        // Rises only: the fall after the kill is not arrivals.
        let low = samples[from..=i].iter().map(|s| s.1).min().unwrap_or(up);
        best = best.max(up.saturating_sub(low));
    }
    best as f64 / PEAK_WINDOW.as_secs_f64()
}

/// What Kubernetes mode measured.
struct KubeRun {
    clusters: usize,
    setup_converged: Option<Duration>,
    setup_rate: (f64, u32),
    restart_converged: Option<Duration>,
    /// From the kill until the server answered again, and until every agent was back.
    server_up: Duration,
    server_ready: Duration,
    /// Half, 99 % and all of the agents back.
    half_back: Duration,
    most_back: Duration,
    agents_back: Duration,
    /// The server's CPU (cores) once converged, with every agent idle.
    idle_cpu: f64,
    /// The restarted server's RSS then, and its peak since it started (`VmHWM`: the
    /// first list, the agents' reconnect and the writes), in KiB.
    idle_kib: u64,
    peak_kib: u64,
    grace: Duration,
    wrong_at_end: Vec<String>,
    /// The server's requests to the host API from the kill until converged.
    requests: usize,
    writes: usize,
    /// The most of the server's requests in any one second after the restart.
    peak_per_second: usize,
    list_pages: usize,
    churn: (usize, usize, usize),
}

/// Kubernetes mode: `n` proxy Clusters on a stand-in host; agents for most of them.
/// First start at a fast pace (the bench's setup: every Cluster gets its token, endpoint
/// and kubeconfig written, and its condition), then the server is killed; while it is
/// down some agents stop and some of the absent ones start; it starts again at the pace
/// under test (`rate`), and the bench waits for every Cluster to show the right
/// `AgentAvailable` (`True` with a tunnel, `False` without).
pub(crate) fn b9_kubernetes(member: &Member, n: usize, rate: (f64, u32), quick: bool) -> Value {
    let host = Member::start();
    let hosted = tower_e2e::fleet::ClusterHost::new(&host);
    let dir = tower_e2e::TempDir::new("b9-host");
    let kubeconfig = hosted.kubeconfig_with_token("b9-tower-server", dir.path());
    let names = clusters("kube", n);
    let absent = (n / 100).max(2);
    let gone = (n / 100).max(2);
    let arriving = absent / 2;
    hosted.create_proxy_clusters(&names);
    let setup_rate = (2_000.0, 4_000);
    // Past the time all agents take to come back (else the ones not back yet are written
    // False, then True again: correct in the end, but writes the pace must carry): 5.5 s
    // for 10,000 on 2026-12-04, since dials wait for the server's first list instead of
    // being refused (30 s before). The server's default, 40 s, also covers agents that
    // reached their 30 s backoff during a long outage.
    let grace = Duration::from_secs(if quick { 8 } else { 12 });
    let limit = Duration::from_secs(if quick { 60 } else { 600 });
    let mut server = crate::tower_server()
        .args(&[
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().expect("path"),
            "--frontend-url",
            "https://tower.bench.example:9443",
            "--keepalive",
            "10s",
        ])
        .env("TOWER_KUBE_API_QPS", &setup_rate.0.to_string())
        .env("TOWER_KUBE_API_BURST", &setup_rate.1.to_string())
        .env("TOWER_AGENT_RETURN_GRACE", &format!("{}s", grace.as_secs()))
        .start();
    let started = Instant::now();
    let mut fleet = Fleet::new();
    fleet.start(&server, member, &names[absent..]);
    let mut want: std::collections::HashMap<String, &str> = names
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), if i < absent { "False" } else { "True" }))
        .collect();
    let poll = Duration::from_millis(if n > 2_000 { 1_000 } else { 250 });
    let converge = |want: &std::collections::HashMap<String, &str>, since: Instant| {
        while since.elapsed() < limit {
            if hosted.wrong(want).is_empty() {
                return Some(since.elapsed());
            }
            std::thread::sleep(poll);
        }
        None
    };
    let setup_converged = converge(&want, started);

    // Down: some agents leave, some absent ones come.
    let killed = Instant::now();
    server.process.kill();
    let leaving: Vec<String> = names[absent..absent + gone]
        .iter()
        .map(|(name, _)| name.clone())
        .collect();
    fleet.stop_agents(&leaving);
    fleet.start(&server, member, &names[..arriving]);
    for name in &leaving {
        want.insert(name.clone(), "False");
    }
    for (name, _) in &names[..arriving] {
        want.insert(name.clone(), "True");
    }
    server.restart_with_env(&[
        ("TOWER_KUBE_API_QPS", &rate.0.to_string()),
        ("TOWER_KUBE_API_BURST", &rate.1.to_string()),
    ]);
    let server_up = killed.elapsed();
    // Ready = the first list is in and agents are admitted (`/readyz` 200).
    while tower_e2e::admin_get(server.admin, "/readyz").0 != 200 && killed.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(10));
    }
    let server_ready = killed.elapsed();
    let running = n - (absent - arriving) - gone;
    // When half, 99 % and all of them were back.
    let mut half_back = None;
    let mut most_back = None;
    while fleet.tunnels_up() < running && killed.elapsed() < limit {
        let up = fleet.tunnels_up();
        if up * 2 >= running {
            half_back.get_or_insert(killed.elapsed());
        }
        if up * 100 >= running * 99 {
            most_back.get_or_insert(killed.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let agents_back = killed.elapsed();
    let half_back = half_back.unwrap_or(agents_back);
    let most_back = most_back.unwrap_or(agents_back);
    let restart_converged = converge(&want, killed);
    let wrong_at_end = hosted.wrong(&want);
    // What the server spends with nothing happening: every Cluster settled, every agent
    // idle (keepalives only).
    let idle_window = Duration::from_secs(if quick { 5 } else { 20 });
    let cpu_before = crate::load::cpu_time(server.process.pid());
    std::thread::sleep(idle_window);
    let idle_cpu = (crate::load::cpu_time(server.process.pid()) - cpu_before).as_secs_f64()
        / idle_window.as_secs_f64();
    let idle_kib = server.process.rss_kib();
    let peak_kib = server.process.peak_rss_kib();

    let calls: Vec<_> = host
        .api
        .calls()
        .into_iter()
        .filter(|c| c.at >= killed && c.credential.starts_with("token#"))
        .collect();
    let times: Vec<Instant> = calls.iter().map(|c| c.at).collect();
    let writes = calls
        .iter()
        .filter(|c| c.method == "PATCH" || c.method == "PUT")
        .count();
    let list_pages = calls
        .iter()
        .filter(|c| {
            c.method == "GET"
                && c.path_and_query
                    .starts_with("/apis/cluster.kubesphere.io/v1alpha1/clusters?")
                && !c.path_and_query.contains("watch=")
        })
        .count();
    let run = KubeRun {
        clusters: n,
        setup_converged,
        setup_rate,
        restart_converged,
        server_up,
        server_ready,
        half_back,
        most_back,
        agents_back,
        idle_cpu,
        idle_kib,
        peak_kib,
        grace,
        wrong_at_end,
        requests: calls.len(),
        writes,
        peak_per_second: tower_e2e::fleet::most_within(&times, Duration::from_secs(1)),
        list_pages,
        churn: (absent - arriving, gone, arriving),
    };
    fleet.stop();
    drop(server);
    let secs = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64()));
    crate::row(
        &format!("B9 kube {n} Clusters: converge (s)"),
        "-",
        &secs(run.restart_converged),
        "",
        &format!("qps {}/{}", rate.0, rate.1),
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    let limit_mib = mib(deployed_limit_kib());
    crate::row(
        &format!("B9 kube {n} Clusters: server RSS idle / peak (MiB)"),
        "-",
        &format!("{:.0} / {:.0}", mib(run.idle_kib), mib(run.peak_kib)),
        "",
        &format!("<= {limit_mib:.0}"),
    );
    println!(
        "{:<36} server up {:.1} s, ready {:.1} s, agents back (half / 99 % / all) {:.1} / {:.1} / {:.1} s after the kill; with {} absent, {} gone, {} arrived (grace {:?}): {} requests ({} writes, {} list pages), at most {} in one second (qps+burst {}); {} wrong at the end; idle after: {:.1} % of a core; first start at qps {}/{}: {} s",
        "",
        run.server_up.as_secs_f64(),
        run.server_ready.as_secs_f64(),
        run.half_back.as_secs_f64(),
        run.most_back.as_secs_f64(),
        run.agents_back.as_secs_f64(),
        run.churn.0,
        run.churn.1,
        run.churn.2,
        run.grace,
        run.requests,
        run.writes,
        run.list_pages,
        run.peak_per_second,
        rate.0 + f64::from(rate.1),
        run.wrong_at_end.len(),
        run.idle_cpu * 100.0,
        run.setup_rate.0,
        run.setup_rate.1,
        secs(run.setup_converged),
    );
    json!({
        "clusters": run.clusters,
        "qps": rate.0, "burst": rate.1,
        "agent_return_grace_s": run.grace.as_secs_f64(),
        "absent": run.churn.0, "gone_while_down": run.churn.1, "arrived_while_down": run.churn.2,
        "restart_converged_s": run.restart_converged.map(|d| d.as_secs_f64()),
        "server_up_s": run.server_up.as_secs_f64(),
        "server_ready_s": run.server_ready.as_secs_f64(),
        "half_back_s": run.half_back.as_secs_f64(),
        "most_back_s": run.most_back.as_secs_f64(),
        "agents_back_s": run.agents_back.as_secs_f64(),
        "wrong_at_end": run.wrong_at_end.len(),
        "idle_cpu_cores": run.idle_cpu,
        "server_rss_mib": {"idle": mib(run.idle_kib), "peak_since_restart": mib(run.peak_kib), "deployed_limit": limit_mib},
        "requests_after_restart": run.requests,
        "writes_after_restart": run.writes,
        "list_pages_after_restart": run.list_pages,
        "peak_requests_per_second": run.peak_per_second,
        "setup": {"qps": run.setup_rate.0, "burst": run.setup_rate.1, "converged_s": run.setup_converged.map(|d| d.as_secs_f64())},
    })
}
