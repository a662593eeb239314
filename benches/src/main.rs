//! `tower-bench`: runs each scenario through the tunnel and directly against the same
//! upstream in the same run, and prints ratios. Benchmarks print; they never fail a build
//! (a crash does: a panic exits non-zero).
//!
//! ```sh
//! cargo build --release -p tower-benches -p tower-server -p tower-agent
//! ./target/release/tower-bench [--quick] [--only B1,B4,...]
//! ```
//!
//! Scenarios: B1 bulk download (MB/s; peak RSS of both sides), B2 small requests
//! (latency at concurrency 1, requests/s at 64 and 256), B3 head-of-line (small-request
//! latency while a bulk download runs, through the tunnel and directly), B4 many watches
//! over one tunnel ([`watch`]), B5 many idle agents on one server ([`agents`]), B6
//! reconnect after a server restart, B7 CPU per request and per GiB on each side, B8 the
//! tunnel over a WAN (a delaying relay between agent and server; [`wan`]), B9 how many
//! members one server serves ([`scale`]). The upstream of B1, B2, B6 and B8 is nginx
//! from the Debian packages ([`nginx`]; the stand-in API
//! server when nginx is not installed): `/version` for small requests, `/debug/bytes` for
//! bulk. B3 (see [`Bench::b3`]), B4's watches and B5's agents use the stand-in. Every scenario
//! runs in rounds and reports the median and the spread (min-max) of each figure;
//! B6's figure is its distribution over its restarts. Results also go to
//! `target/bench-results.json`, every round's value included.

#![forbid(unsafe_code)]

mod agents;
mod delay;
mod load;
mod nginx;
mod scale;
mod stats;
mod wan;
mod watch;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tower_e2e::{Agent, AgentBuilder, Https, Member, RssPeaks, Server, agent, server};

use crate::load::{Target, cpu_time};
use crate::nginx::Nginx;
use crate::stats::Samples;

/// Open files the bench asks for (tower-server, tower-agent and B4's stand-in inherit
/// the limit): B4 at N = 10,000 needs 10,000 client connections here, 10,000 in the
/// server and in the agent, and 20,000 descriptors in the stand-in.
const WANT_OPEN_FILES: u64 = 65_536;

/// The log filter tower-server and tower-agent run with here: their own default. The e2e
/// harness turns their debug logging on, which formats a line for every request.
pub(crate) const TOWER_LOG: &str = "info";

/// A tower-server as the e2e harness starts it, but logging as in production.
pub(crate) fn tower_server() -> tower_e2e::ServerBuilder {
    server()
        .env("TOWER_LOG", TOWER_LOG)
        // Every bench client and agent comes from 127.0.0.1, up to 10,000 at once (B4,
        // B5): past the per-source and per-listener defaults, which guard against floods.
        .env("TOWER_MAX_CONNECTIONS_PER_SOURCE", "0")
        .env("TOWER_MAX_FRONTEND_CONNECTIONS", "50000")
        .env("TOWER_MAX_TUNNEL_CONNECTIONS", "50000")
        // B4 opens up to 10,000 watches with one user's token: past the per-user bound
        // (1,024), which keeps one caller from holding a cluster's share (429s since
        // d27e08e, which B4's N = 10,000 rows then measured over 1,024 watches). The
        // per-cluster bound stays at its default, 16,384.
        .env("TOWER_MAX_REQUESTS_PER_USER", "16384")
}

const USAGE: &str = "usage: tower-bench [--quick] [--only B1,B2,B3,B4,B5,B6,B7,B8,B9]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut quick = false;
    let mut only: Option<Vec<String>> = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--only" => {
                let list = rest.next().unwrap_or_else(|| usage_exit());
                only = Some(list.split(',').map(|s| s.trim().to_uppercase()).collect());
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            _ => usage_exit(),
        }
    }
    let selected = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|s| s == name));
    let run_started = Instant::now();
    let load_before = load_average();
    let open_files = raise_open_files(WANT_OPEN_FILES);

    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "tower-bench: {} run, {profile} build{}",
        if quick { "quick" } else { "full" },
        if cfg!(debug_assertions) {
            " (a smoke run: debug figures are not comparable to BENCHMARKS.md; quick bulk sizes are quartered)"
        } else {
            ""
        }
    );
    let mut bench = Bench::start(quick);
    let upstream = bench.upstream().0;
    println!("tower-bench: upstream {upstream} (B3, B4 and B5: the stand-in API server)");
    println!(
        "{:<36} {:>16} {:>16} {:>8}   target",
        "scenario", "direct", "tunnel", "ratio"
    );
    let cpu_bulk = selected("B1").then(|| bench.b1());
    let cpu_small = selected("B2").then(|| bench.b2());
    if selected("B3") {
        bench.b3();
    }
    if selected("B7") {
        bench.b7(cpu_small, cpu_bulk);
    }
    if selected("B6") {
        bench.b6();
    }
    if selected("B8") {
        bench.b8();
    }
    let Bench {
        rt,
        member,
        nginx,
        server,
        agent,
        stand_in_agent,
        user,
        mut results,
        ..
    } = bench;
    // B4 and B5 start servers of their own.
    drop(stand_in_agent);
    drop(agent);
    drop(server);
    drop(nginx);
    // Scenarios whose requests failed: their figures are printed, and the run fails.
    let mut failures: Vec<String> = Vec::new();
    if selected("B4") {
        let most = watch::most_watches(open_files);
        let mut sizes = if quick {
            vec![100, 1_000]
        } else {
            vec![100, 1_000, 10_000]
        };
        if sizes.iter().any(|n| *n > most) {
            println!(
                "tower-bench: B4: {open_files} open files per process allow the stand-in (one per connection) at most {most} watches; capping"
            );
            sizes = sizes.into_iter().map(|n| n.min(most)).collect();
        }
        let open_limit = Duration::from_secs(if quick { 30 } else { 60 });
        // Then the largest N again with clients that multiplex over HTTP/2.
        let largest = sizes.last().copied().unwrap_or(0);
        let runs: Vec<_> = sizes
            .iter()
            .map(|n| (watch::Protocol::Http1, *n))
            .chain([(watch::Protocol::Http2, largest)])
            .collect();
        let (b4, failed) = watch::b4(&rt, &user, &runs, 3, 3, open_limit);
        results.insert("B4".into(), b4);
        failures.extend(failed);
    }
    if selected("B5") {
        let n = if quick { 200 } else { 1_000 };
        let b5 = agents::b5(&member, n, 3, Duration::from_secs(120));
        results.insert("B5".into(), b5);
    }
    if selected("B9") {
        results.insert("B9".into(), scale::run(&member, &user, quick, open_files));
    }

    let elapsed = run_started.elapsed();
    let load_after = load_average();
    results.insert(
        "run".into(),
        json!({
            "quick": quick,
            "profile": profile,
            "upstream": upstream,
            "scenarios": only,
            "seconds": elapsed.as_secs_f64(),
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "open_files": open_files,
            "load_average_1min": {"start": load_before, "end": load_after},
        }),
    );
    // Everything here shares the machine's cores: a load well above what the bench itself
    // adds (about 2) means other work skewed the wall-clock figures (not the CPU ones).
    println!(
        "tower-bench: {} run done in {:.0} s; 1-minute load average {load_before} at the start, {load_after} at the end",
        if quick { "quick" } else { "full" },
        elapsed.as_secs_f64()
    );
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results.json");
    if let Err(e) = std::fs::write(
        &out,
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    ) {
        eprintln!("tower-bench: writing {}: {e}", out.display());
    }
    if !failures.is_empty() {
        for failure in &failures {
            eprintln!("tower-bench: {failure}");
        }
        eprintln!(
            "tower-bench: requests failed: the figures above are not of the scenarios asked for"
        );
        std::process::exit(1);
    }
}

/// The 1-minute load average, as /proc/loadavg gives it ("?" if unreadable).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn usage_exit() -> ! {
    eprintln!("{USAGE}");
    std::process::exit(2)
}

/// Raises this process's open-file limit (soft and hard when allowed, else the soft one
/// up to the hard one); returns the soft limit now in force.
fn raise_open_files(want: u64) -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    let current = now.current.unwrap_or(u64::MAX);
    if current >= want {
        return current;
    }
    let hard = now.maximum.unwrap_or(u64::MAX);
    let raised = Rlimit {
        current: Some(want),
        maximum: Some(hard.max(want)),
    };
    if setrlimit(Resource::Nofile, raised).is_ok() {
        return want;
    }
    let soft = Rlimit {
        current: Some(hard.min(want)),
        maximum: now.maximum,
    };
    match setrlimit(Resource::Nofile, soft) {
        Ok(()) => hard.min(want),
        Err(_) => current,
    }
}

/// Cluster `bench`'s agent on `server`, serving B1's, B2's, B6's and B8's upstream: nginx
/// when it runs, else the stand-in.
fn bench_agent(server: &Server, member: &Member, nginx: Option<&Nginx>) -> AgentBuilder {
    let kubeconfig = nginx.map_or(&member.kubeconfig, |n| &n.kubeconfig);
    agent(server, member, "bench")
        .kubeconfig(kubeconfig)
        .env("TOWER_LOG", TOWER_LOG)
}

/// The shared setup of B1–B3, B6 and B7: the stand-in, one server and one agent.
struct Bench {
    quick: bool,
    /// B1's download is divided by this: 4 in a quick run of a debug build (a smoke run
    /// in CI, where the debug tower binaries are what the time goes on), else 1. B3's
    /// downloads stop when its probe does, and B8's link bounds its own.
    bulk_divisor: u64,
    rt: tokio::runtime::Runtime,
    member: Member,
    /// The upstream of B1, B2, B6 and B8 when nginx is installed (else the stand-in is).
    nginx: Option<Nginx>,
    server: Server,
    agent: Agent,
    /// B3's agent when `agent` serves nginx: cluster [`STAND_IN_CLUSTER`], serving the
    /// stand-in (B3 never uses nginx; see [`Bench::b3`]).
    stand_in_agent: Option<Agent>,
    user: String,
    results: serde_json::Map<String, Value>,
}

impl Bench {
    fn start(quick: bool) -> Bench {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let member = Member::start();
        let stand_in_asked = std::env::var("TOWER_BENCH_UPSTREAM").is_ok_and(|u| u == "stand-in");
        let nginx = match Nginx::find().filter(|_| !stand_in_asked) {
            Some(binary) => Some(Nginx::start(&binary).unwrap_or_else(|e| panic!("{e}"))),
            None if stand_in_asked => None,
            None => {
                println!(
                    "tower-bench: nginx is not installed (apt-get install -y nginx): B1, B2, B6 and B8 use the stand-in as their upstream"
                );
                None
            }
        };
        let server = tower_server().start();
        let agent = bench_agent(&server, &member, nginx.as_ref()).connect(&server);
        let stand_in_agent = nginx.as_ref().map(|_| {
            tower_e2e::agent(&server, &member, STAND_IN_CLUSTER)
                .env("TOWER_LOG", TOWER_LOG)
                .connect(&server)
        });
        let user = Server::minter().user_token("bench", &[], None);
        Bench {
            quick,
            bulk_divisor: if quick && cfg!(debug_assertions) {
                4
            } else {
                1
            },
            rt,
            member,
            nginx,
            server,
            agent,
            stand_in_agent,
            user,
            results: serde_json::Map::new(),
        }
    }

    fn pids(&self) -> [u32; 2] {
        [self.server.process.pid(), self.agent.process.pid()]
    }

    /// The upstream of B1, B2, B6 and B8: (name, address, CA, token).
    fn upstream(&self) -> (String, std::net::SocketAddr, &str, &str) {
        match &self.nginx {
            Some(n) => (n.version.clone(), n.addr, &n.ca_pem, n.token()),
            None => {
                let api = &self.member.api;
                ("the stand-in".into(), api.addr(), api.ca_pem(), api.token())
            }
        }
    }

    /// `path` at the upstream, with its token.
    fn direct_target(&self, path: &str) -> Target {
        match &self.nginx {
            Some(n) => Target::new(&n.ca_pem, n.addr, path.into(), n.token()),
            None => self.stand_in_target(path),
        }
    }

    /// The path of a `size`-byte bulk download (at the upstream; through the tunnel, the
    /// same under `/clusters/bench`), its file written first when nginx serves it.
    fn bulk_path(&self, size: u64) -> String {
        if let Some(nginx) = &self.nginx {
            nginx.ensure_bulk(size);
        }
        format!("/debug/bytes?size={size}")
    }

    /// `path` at the frontend, with the bench user's token.
    fn tunnel_target(&self, path: &str) -> Target {
        Target::new(
            &self.server.ca_pem,
            self.server.frontend,
            path.into(),
            &self.user,
        )
    }

    fn small_direct(&self) -> Target {
        self.direct_target("/version")
    }

    fn small_tunnel(&self) -> Target {
        self.tunnel_target("/clusters/bench/version")
    }

    /// `path` at the stand-in, with its token.
    fn stand_in_target(&self, path: &str) -> Target {
        let api = &self.member.api;
        Target::new(api.ca_pem(), api.addr(), path.into(), api.token())
    }

    /// The cluster whose agent serves the stand-in.
    fn stand_in_cluster(&self) -> &str {
        match self.stand_in_agent {
            Some(_) => STAND_IN_CLUSTER,
            None => "bench",
        }
    }

    fn limit(&self) -> Duration {
        Duration::from_secs(if self.quick { 5 } else { 15 })
    }

    /// B1: bulk. Returns the CPU seconds per GiB of [server, agent], per round.
    fn b1(&mut self) -> [Samples; 2] {
        let (size, rounds): (u64, usize) = if self.quick {
            ((256 << 20) / self.bulk_divisor, 3)
        } else {
            (1 << 30, 5)
        };
        let pids = self.pids();
        let tunnel = Https::frontend(&self.server);
        let (_, addr, ca_pem, token) = self.upstream();
        let direct = Https::with_ca(ca_pem, addr);
        let bulk = self.bulk_path(size);
        let (mut d_mbps, mut t_mbps, mut ratio) = Default::default();
        let mut cpu: [Samples; 2] = Default::default();
        let mut peak = [0u64; 2];
        let idle = [self.server.process.rss_kib(), self.agent.process.rss_kib()];
        for _ in 0..rounds {
            let d = mbps(size, || direct.download_checked(&bulk, token));
            let sampler = RssPeaks::start(&pids);
            let cpu_before = pids.map(cpu_time);
            let t = mbps(size, || {
                tunnel.download_checked(&format!("/clusters/bench{bulk}"), &self.user)
            });
            let per_gib = cpu_per(
                pids.map(cpu_time),
                cpu_before,
                size as f64 / (1u64 << 30) as f64,
            );
            let s = sampler.stop();
            peak = [peak[0].max(s[0]), peak[1].max(s[1])];
            Samples::push_all([&mut d_mbps, &mut t_mbps, &mut ratio], [d, t, t / d]);
            Samples::push_all(cpu.each_mut(), per_gib);
        }
        row_s(
            &format!("B1 bulk {} MiB (MB/s)", size >> 20),
            [&d_mbps, &t_mbps, &ratio],
            0,
            ">= 0.5x",
        );
        println!(
            "{:<36} RSS KiB idle/peak server {}/{}, agent {}/{}",
            "", idle[0], peak[0], idle[1], peak[1]
        );
        self.results.insert("B1".into(), json!({
            "bytes": size, "rounds": rounds,
            "direct_mbps": d_mbps.to_json(), "tunnel_mbps": t_mbps.to_json(), "ratio": ratio.to_json(),
            "rss_kib": {"server_idle": idle[0], "server_peak": peak[0], "agent_idle": idle[1], "agent_peak": peak[1]},
        }));
        cpu
    }

    /// B2: small requests, in rounds (each: concurrency 1, 64 and 256, directly and
    /// through the tunnel). Returns the CPU seconds per request of [server, agent] at
    /// concurrency 64 and 256, per round.
    fn b2(&mut self) -> [Samples; 2] {
        let (small_direct, small_tunnel) = (self.small_direct(), self.small_tunnel());
        let (rounds, n1, at_64_and_256) = if self.quick {
            (3, 1_000, 20_000)
        } else {
            (5, 2_000, 40_000)
        };
        let limit = self.limit();
        let rt = &self.rt;
        let pids = self.pids();
        rt.block_on(load::run(&small_tunnel, 1, 200, limit)); // warm the pools
        // Per round: p50 and p99 at c=1 [direct, tunnel, tunnel-direct or tunnel/direct].
        let (mut p50, mut p99): ([Samples; 3], [Samples; 3]) = Default::default();
        let mut rps: [[Samples; 3]; 2] = Default::default();
        let mut errors = [[0usize; 2]; 2];
        let mut cpu: [Samples; 2] = Default::default();
        for _ in 0..rounds {
            let mut d1 = rt.block_on(load::run(&small_direct, 1, n1, limit));
            let mut t1 = rt.block_on(load::run(&small_tunnel, 1, n1, limit));
            let (d50, t50) = (us(d1.percentile(0.5)), us(t1.percentile(0.5)));
            let (d99, t99) = (us(d1.percentile(0.99)), us(t1.percentile(0.99)));
            Samples::push_all(p50.each_mut(), [d50, t50, t50 - d50]);
            Samples::push_all(p99.each_mut(), [d99, t99, t99 / d99]);
            let mut cpu_spent = [Duration::ZERO; 2];
            let mut requests = 0usize;
            for (i, c) in [64usize, 256].into_iter().enumerate() {
                let per = at_64_and_256 / c;
                let d = rt.block_on(load::run(&small_direct, c, per, limit));
                let before = pids.map(cpu_time);
                let t = rt.block_on(load::run(&small_tunnel, c, per, limit));
                let after = pids.map(cpu_time);
                cpu_spent = [0, 1].map(|p| cpu_spent[p] + (after[p] - before[p]));
                requests += t.latencies.len();
                Samples::push_all(rps[i].each_mut(), [d.rps(), t.rps(), t.rps() / d.rps()]);
                errors[i] = [errors[i][0] + d.errors, errors[i][1] + t.errors];
            }
            let per_request = cpu_per(cpu_spent, [Duration::ZERO; 2], requests as f64);
            Samples::push_all(cpu.each_mut(), per_request);
        }
        row_s("B2 c=1 p50 (us)", p50.each_ref(), 0, "+<=80us");
        row_s("B2 c=1 p99 (us)", p99.each_ref(), 0, "<= 2x");
        let mut b2 = json!({
            "rounds": rounds,
            "c1": {
                "requests_per_round": n1,
                "direct_p50_us": p50[0].to_json(), "tunnel_p50_us": p50[1].to_json(),
                "added_p50_us": p50[2].to_json(),
                "direct_p99_us": p99[0].to_json(), "tunnel_p99_us": p99[1].to_json(),
                "p99_ratio": p99[2].to_json(),
            },
        });
        for (i, c) in [64usize, 256].into_iter().enumerate() {
            row_s(
                &format!("B2 c={c} requests/s"),
                rps[i].each_ref(),
                0,
                if c == 64 { ">= 0.4x" } else { "" },
            );
            let [d, t] = errors[i];
            if d + t > 0 {
                println!("{:<36} errors: direct {d}, tunnel {t}", "");
            }
            b2[format!("c{c}")] = json!({
                "requests_per_round": at_64_and_256,
                "direct_rps": rps[i][0].to_json(), "tunnel_rps": rps[i][1].to_json(),
                "ratio": rps[i][2].to_json(), "errors": errors[i],
            });
        }
        self.results.insert("B2".into(), b2);
        cpu
    }

    /// B3: small-request latency (one at a time, each [`PROBE_EVERY`] after the one
    /// before: the *probe*) while a bulk download runs, in rounds. Each round measures
    /// both probes idle, then once for each [`PAIRINGS`] entry, which together separate
    /// head-of-line blocking in the tunnel from CPU contention on a small machine; then
    /// the first two pairings again with probes sent back to back, as B3 sent them until
    /// 2026-12-07 (see [`load::paced`] for why it paces them).
    ///
    /// Its upstream is the stand-in, not nginx: an nginx worker serving a fast reader
    /// over TLS starves its other connections until that download ends. With one worker,
    /// a direct probe's connect waited 1.3 s behind a direct 1 GiB download, and with two,
    /// a tunnel probe (whose pooled upstream connection may belong to the busy worker)
    /// stalled 1.4-5.5 s in some rounds. B3 asks what the tunnel does, and a
    /// kube-apiserver serves its connections concurrently, as the stand-in does.
    fn b3(&mut self) {
        let (rounds, n) = if self.quick { (3, 500) } else { (3, 2500) };
        // The download stops when the probe is done: the size only has to outlast it (a
        // paced probe takes at least `n` × 2 ms; a direct download runs up to 2.4 GB/s
        // here, in a debug build too, as it crosses no Tower binary; the stand-in makes
        // the bytes as it sends them). So a debug build does not quarter it.
        let size: u64 = if self.quick { 8 << 30 } else { 32 << 30 };
        // The slow reader's probe sends four times the requests: its window updates
        // release the bulk in bursts, and a p99 of 2,500 probes is the 25th worst of a
        // handful of bursts. Its download outlasts the probe twice over.
        let slow_n = 4 * n;
        let slow_size = SLOW_READER_RATE * (2 * (PROBE_EVERY * slow_n as u32).as_secs() + 4);
        let small_direct = self.stand_in_target("/version");
        let small_tunnel =
            self.tunnel_target(&format!("/clusters/{}/version", self.stand_in_cluster()));
        let limit = self.limit();
        self.rt.block_on(load::run(&small_tunnel, 1, 200, limit)); // warm the pools
        // Per pacing (paced, back to back) and probe (direct, tunnel): its idle p99.
        let mut idle: [[Samples; 2]; 2] = Default::default();
        let mut busy: Vec<Busy> = PAIRINGS.iter().map(|_| Busy::default()).collect();
        let mut notes = Vec::new();
        for _ in 0..rounds {
            let idle_p99 = [true, false].map(|paced| {
                [&small_direct, &small_tunnel]
                    .map(|probe| us(self.probe(probe, n, paced).percentile(0.99)))
            });
            for (idle, p99) in idle.iter_mut().zip(idle_p99) {
                Samples::push_all(idle.each_mut(), p99);
            }
            for (pairing, busy) in PAIRINGS.iter().zip(&mut busy) {
                let probe = if pairing.tunnel_probe {
                    &small_tunnel
                } else {
                    &small_direct
                };
                let (requests, bytes) = if pairing.slow {
                    (slow_n, slow_size)
                } else {
                    (n, size)
                };
                let got = self.probe_during_download(pairing, probe, requests, bytes);
                if got.download_ended_first {
                    notes.push(format!(
                        "{}: the download ended before the probe did (raise its size)",
                        pairing.what
                    ));
                }
                if got.errors > 0 {
                    notes.push(format!("{}: {} probe errors", pairing.what, got.errors));
                }
                let p99 = us(got.p99);
                busy.p99.push(p99);
                busy.over_idle.push(
                    p99 / idle_p99[usize::from(!pairing.paced)][usize::from(pairing.tunnel_probe)],
                );
                busy.max.push(us(got.max));
                busy.seconds.push(got.seconds);
                busy.bulk_mbps.push(got.bulk_mbps);
            }
        }
        let of = |key: &str| {
            let i = PAIRINGS.iter().position(|p| p.key == key);
            &busy[i.expect("a pairing of PAIRINGS")]
        };
        // Per round: the tunnel probe's p99 over the direct probe's, same tunnel bulk.
        let tunnel_over_direct = |pacing: &str| -> Samples {
            let (t, d) = (
                of(&format!("tunnel_probe_tunnel_bulk{pacing}")),
                of(&format!("direct_probe_tunnel_bulk{pacing}")),
            );
            t.p99.iter().zip(d.p99.iter()).map(|(t, d)| t / d).collect()
        };
        let (paced, back_to_back) = (tunnel_over_direct(""), tunnel_over_direct("_back_to_back"));
        // Rows: direct probe | tunnel probe, each "idle p99 -> busy p99" (medians); the
        // ratio column is the median of each round's busy/idle.
        for (label, bulk, target) in [
            ("B3 p99 us idle->busy, tunnel bulk", "tunnel_bulk", "<= 3x"),
            ("B3 p99 us idle->busy, slow reader", "slow_reader", "<= 3x"),
            ("B3 p99 us idle->busy, direct bulk", "direct_bulk", ""),
        ] {
            let (d, t) = (
                of(&format!("direct_probe_{bulk}")),
                of(&format!("tunnel_probe_{bulk}")),
            );
            let shift = |probe: usize, busy: &Busy| {
                format!("{:.0}->{:.0}", idle[0][probe].median(), busy.p99.median())
            };
            let ratio = format!("{:.1}x/{:.1}x", d.over_idle.median(), t.over_idle.median());
            let spread = format!("{}x/{}x", d.over_idle.spread(1), t.over_idle.spread(1));
            row(label, &shift(0, d), &shift(1, t), &ratio, target);
            println!(
                "{:<36} spread of busy/idle over {rounds} rounds: direct probe {spread}",
                ""
            );
        }
        row(
            "B3 tunnel probe p99 / direct probe p99",
            "",
            "",
            &format!("{:.1}x", paced.median()),
            "<= 2x (issue 18; same tunnel bulk)",
        );
        println!(
            "{:<36} spread over {rounds} rounds {}x; probes back to back {:.1}x [{}x]",
            "",
            paced.spread(1),
            back_to_back.median(),
            back_to_back.spread(1)
        );
        for note in notes {
            println!("{:<36} {note}", "");
        }
        let mut b3 = json!({
            "rounds": rounds,
            "probe_requests": n,
            "download_bytes": size,
            "slow_reader_bytes_per_second": SLOW_READER_RATE,
            "slow_reader_probe_requests": slow_n,
            "probe_every_us": PROBE_EVERY.as_micros() as u64,
            "idle_p99_us": {
                "direct": idle[0][0].to_json(), "tunnel": idle[0][1].to_json(),
                "back_to_back": {"direct": idle[1][0].to_json(), "tunnel": idle[1][1].to_json()},
            },
            "tunnel_over_direct_probe_p99": paced.to_json(),
            "tunnel_over_direct_probe_p99_back_to_back": back_to_back.to_json(),
        });
        for (pairing, busy) in PAIRINGS.iter().zip(&busy) {
            b3[pairing.key] = json!({
                "p99_us": busy.p99.to_json(), "p99_over_idle": busy.over_idle.to_json(),
                "max_us": busy.max.to_json(), "probe_seconds": busy.seconds.to_json(),
                "bulk_mbps_meanwhile": busy.bulk_mbps.to_json(),
            });
        }
        self.results.insert("B3".into(), b3);
    }

    /// B3's probe: `n` requests to `target`, one at a time, each [`PROBE_EVERY`] after the
    /// one before (`paced`) or back to back.
    fn probe(&self, target: &Target, n: usize, paced: bool) -> load::Run {
        if paced {
            let limit = self.limit() + PROBE_EVERY * n as u32;
            self.rt.block_on(load::paced(target, n, PROBE_EVERY, limit))
        } else {
            self.rt.block_on(load::run(target, 1, n, self.limit()))
        }
    }

    /// Runs `n` requests to `probe` while a download of up to `size` bytes runs, each
    /// as `pairing` has it (paced or back to back; through the tunnel or directly from
    /// the stand-in, read at once or by a slow reader); the download stops when the
    /// probe is done.
    fn probe_during_download(
        &self,
        pairing: &Pairing,
        probe: &Target,
        n: usize,
        size: u64,
    ) -> Probe {
        let path = format!("/debug/bytes?size={size}");
        let bulk = if pairing.tunnel_bulk {
            self.tunnel_target(&format!("/clusters/{}{path}", self.stand_in_cluster()))
        } else {
            self.stand_in_target(&path)
        };
        let download = load::Download::start(&bulk, pairing.slow.then_some(SLOW_READER_RATE));
        if let Err(e) = download.wait_started(Duration::from_secs(10)) {
            panic!("the bulk download did not start: {e}");
        }
        let started = Instant::now();
        let mut during = self.probe(probe, n, pairing.paced);
        let elapsed = started.elapsed();
        let done = download
            .finish()
            .unwrap_or_else(|e| panic!("the bulk download failed: {e}"));
        if done.ended_first {
            assert_eq!(done.bytes, size, "short bulk download");
        }
        Probe {
            p99: during.percentile(0.99),
            max: during.percentile(1.0),
            errors: during.errors,
            seconds: elapsed.as_secs_f64(),
            bulk_mbps: done.bytes as f64 / 1e6 / elapsed.as_secs_f64(),
            download_ended_first: done.ended_first,
        }
    }

    /// B7: CPU, from B1's and B2's rounds (a dash for one that did not run), and per small
    /// request with one tokio worker per process ([`Bench::cpu_one_worker`]): medians,
    /// spreads in brackets.
    fn b7(&mut self, small: Option<[Samples; 2]>, bulk: Option<[Samples; 2]>) {
        let small = small.map(|c| c.map(|s| s.scaled(1e6)));
        let deployed = Some(self.cpu_one_worker().map(|s| s.scaled(1e6)));
        let show = |v: &Option<[Samples; 2]>, i: usize, unit: &str, digits: usize| {
            v.as_ref().map_or("-".into(), |v| {
                format!(
                    "{:.*} {unit} [{}]",
                    digits,
                    v[i].median(),
                    v[i].spread(digits)
                )
            })
        };
        println!(
            "{:<36} server {}, {}; agent {}, {}",
            "B7 CPU",
            show(&small, 0, "us/request", 1),
            show(&bulk, 0, "s/GiB", 2),
            show(&small, 1, "us/request", 1),
            show(&bulk, 1, "s/GiB", 2),
        );
        println!(
            "{:<36} server {}; agent {}",
            "B7 CPU, one worker (as deployed)",
            show(&deployed, 0, "us/request", 1),
            show(&deployed, 1, "us/request", 1),
        );
        let at = |v: &Option<[Samples; 2]>, i: usize| v.as_ref().map(|v| v[i].to_json());
        self.results.insert(
            "B7".into(),
            json!({
                "server_us_per_request": at(&small, 0), "agent_us_per_request": at(&small, 1),
                "server_s_per_gib": at(&bulk, 0), "agent_s_per_gib": at(&bulk, 1),
                "one_worker": {
                    "server_us_per_request": at(&deployed, 0),
                    "agent_us_per_request": at(&deployed, 1),
                },
            }),
        );
    }

    /// CPU seconds per small request of [server, agent] at c=64 and c=256 (B2's loads, to
    /// B2's upstream), per round, through a second server and agent that run one tokio
    /// worker each: as deployed, where both Deployments limit their pod to 1 CPU and tokio
    /// sizes its pool to that. B2's pair runs a worker per core of this machine.
    fn cpu_one_worker(&mut self) -> [Samples; 2] {
        let server = tower_server().env("TOKIO_WORKER_THREADS", "1").start();
        let agent = bench_agent(&server, &self.member, self.nginx.as_ref())
            .env("TOKIO_WORKER_THREADS", "1")
            .connect(&server);
        let target = Target::new(
            &server.ca_pem,
            server.frontend,
            "/clusters/bench/version".into(),
            &self.user,
        );
        let (rounds, at_64_and_256) = if self.quick { (3, 20_000) } else { (5, 40_000) };
        let limit = self.limit();
        let pids = [server.process.pid(), agent.process.pid()];
        self.rt.block_on(load::run(&target, 1, 200, limit)); // warm the pools
        let mut cpu: [Samples; 2] = Default::default();
        let mut errors = 0;
        for _ in 0..rounds {
            let (mut spent, mut requests) = ([Duration::ZERO; 2], 0usize);
            for c in [64usize, 256] {
                let before = pids.map(cpu_time);
                let run = self
                    .rt
                    .block_on(load::run(&target, c, at_64_and_256 / c, limit));
                let after = pids.map(cpu_time);
                spent = [0, 1].map(|p| spent[p] + (after[p] - before[p]));
                requests += run.latencies.len();
                errors += run.errors;
            }
            Samples::push_all(
                cpu.each_mut(),
                cpu_per(spent, [Duration::ZERO; 2], requests as f64),
            );
        }
        if errors > 0 {
            println!("{:<36} errors: tunnel {errors}", "");
        }
        cpu
    }

    /// B6: reconnect after a server restart (SIGKILL, start again on the same ports).
    fn b6(&mut self) {
        let restarts = if self.quick { 3 } else { 20 };
        let mut times = Vec::new();
        let probe = Https::frontend(&self.server);
        for _ in 0..restarts {
            // Restarts in the field are minutes apart: let the tunnel pass the agent's
            // healthy period (5 s) so each restart starts from a reset backoff, as it
            // would there.
            std::thread::sleep(Duration::from_millis(5500));
            let started = Instant::now();
            self.server.restart();
            let deadline = started + Duration::from_secs(30);
            while Instant::now() < deadline {
                if probe
                    .try_request("GET", "/clusters/bench/version", Some(&self.user), &[])
                    .is_ok_and(|r| r.status == 200)
                {
                    times.push(started.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let (p50, p99) = (
            load::percentile(&mut times, 0.5),
            load::percentile(&mut times, 0.99),
        );
        row(
            &format!("B6 reconnect over {} restarts", times.len()),
            "",
            &format!("p50 {:.0} ms", p50.as_secs_f64() * 1e3),
            &format!("p99 {:.0} ms", p99.as_secs_f64() * 1e3),
            "p99 <= 1s",
        );
        self.results.insert("B6".into(), json!({"restarts": times.len(), "p50_ms": p50.as_secs_f64() * 1e3, "p99_ms": p99.as_secs_f64() * 1e3}));
    }
}

/// The cluster B3 goes through when the main agent serves nginx.
const STAND_IN_CLUSTER: &str = "bench-stand-in";

/// How often B3's probe sends a request: each this long after the one before, or at once
/// when the one before took longer (see [`load::paced`]). Longer than a probe takes
/// through the tunnel during a download at the median (about 1 ms), so both probes
/// mostly wait between requests, as a console or a kubectl does.
const PROBE_EVERY: Duration = Duration::from_millis(2);

/// How fast B3's slow reader reads its download (bytes per second).
const SLOW_READER_RATE: u64 = 16 << 20;

/// One B3 pairing: which probe, during which download.
struct Pairing {
    key: &'static str,
    what: &'static str,
    tunnel_probe: bool,
    tunnel_bulk: bool,
    /// The bulk's reader takes [`SLOW_READER_RATE`]: the tunnel carries it at a fraction
    /// of the CPU, held back by flow control (what stalls a Konnectivity tunnel).
    slow: bool,
    /// The probe sends a request each [`PROBE_EVERY`]; else back to back.
    paced: bool,
}

/// B3's pairings; the table finds them by `key`.
const PAIRINGS: [Pairing; 8] = [
    // Head-of-line blocking in the tunnel and CPU contention.
    Pairing {
        key: "tunnel_probe_tunnel_bulk",
        what: "tunnel probe, tunnel bulk",
        tunnel_probe: true,
        tunnel_bulk: true,
        slow: false,
        paced: true,
    },
    // The same contention, but nothing of the probe's path is shared with the bulk.
    Pairing {
        key: "direct_probe_tunnel_bulk",
        what: "direct probe, tunnel bulk",
        tunnel_probe: false,
        tunnel_bulk: true,
        slow: false,
        paced: true,
    },
    // No tunnel anywhere.
    Pairing {
        key: "direct_probe_direct_bulk",
        what: "direct probe, direct bulk",
        tunnel_probe: false,
        tunnel_bulk: false,
        slow: false,
        paced: true,
    },
    // Contention, but no shared tunnel.
    Pairing {
        key: "tunnel_probe_direct_bulk",
        what: "tunnel probe, direct bulk",
        tunnel_probe: true,
        tunnel_bulk: false,
        slow: false,
        paced: true,
    },
    // Flow control, little CPU.
    Pairing {
        key: "tunnel_probe_slow_reader",
        what: "tunnel probe, slow reader",
        tunnel_probe: true,
        tunnel_bulk: true,
        slow: true,
        paced: true,
    },
    // What the slow bulk's CPU does to a request that does not cross the tunnel.
    Pairing {
        key: "direct_probe_slow_reader",
        what: "direct probe, slow reader",
        tunnel_probe: false,
        tunnel_bulk: true,
        slow: true,
        paced: true,
    },
    // The first two with the probe sent back to back, as B3 sent it until 2026-12-07.
    Pairing {
        key: "tunnel_probe_tunnel_bulk_back_to_back",
        what: "tunnel probe back to back, tunnel bulk",
        tunnel_probe: true,
        tunnel_bulk: true,
        slow: false,
        paced: false,
    },
    Pairing {
        key: "direct_probe_tunnel_bulk_back_to_back",
        what: "direct probe back to back, tunnel bulk",
        tunnel_probe: false,
        tunnel_bulk: true,
        slow: false,
        paced: false,
    },
];

/// What B3 measured of one pairing, a value per round.
#[derive(Default)]
struct Busy {
    p99: Samples,
    /// The p99 over the same probe's idle p99 in the same round.
    over_idle: Samples,
    max: Samples,
    /// How long the probe took (seconds).
    seconds: Samples,
    /// The download's MB/s over the probe's time.
    bulk_mbps: Samples,
}

/// What a B3 probe measured.
struct Probe {
    p99: Duration,
    max: Duration,
    errors: usize,
    /// How long the probe took.
    seconds: f64,
    /// The download's bytes over the probe's time (MB/s).
    bulk_mbps: f64,
    download_ended_first: bool,
}

/// Prints a table row.
pub(crate) fn row(name: &str, direct: &str, tunnel: &str, ratio: &str, target: &str) {
    println!("{name:<36} {direct:>16} {tunnel:>16} {ratio:>8}   {target}");
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// CPU seconds per unit of work, for each process.
fn cpu_per(after: [Duration; 2], before: [Duration; 2], units: f64) -> [f64; 2] {
    [0, 1].map(|i| (after[i] - before[i]).as_secs_f64() / units)
}

fn mbps(size: u64, download: impl FnOnce() -> u64) -> f64 {
    let started = Instant::now();
    let got = download();
    assert_eq!(got, size, "short download");
    size as f64 / 1e6 / started.elapsed().as_secs_f64()
}

/// Prints a row of medians over rounds ([direct, tunnel, ratio]), then their spreads.
pub(crate) fn row_s(
    name: &str,
    [direct, tunnel, ratio]: [&Samples; 3],
    digits: usize,
    target: &str,
) {
    row(
        name,
        &format!("{:.*}", digits, direct.median()),
        &format!("{:.*}", digits, tunnel.median()),
        &format!("{:.2}", ratio.median()),
        target,
    );
    println!(
        "{:<36} spread over {} rounds: direct {}, tunnel {}, ratio {}",
        "",
        direct.len(),
        direct.spread(digits),
        tunnel.spread(digits),
        ratio.spread(2)
    );
}
