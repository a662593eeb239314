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
//! reconnect after a server restart, B7 CPU per request and per GiB on each side. The
//! upstream is the stand-in API server (`/version` for small requests, `/debug/bytes` for
//! bulk, configmap watches for B4). Results also go to `target/bench-results.json`.

mod agents;
mod load;
mod watch;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tower_e2e::{Agent, Https, Member, RssPeaks, Server, agent, server};

use crate::load::{Target, cpu_time};

/// Open files the bench asks for (tower-server, tower-agent and B4's stand-in inherit
/// the limit): B4 at N = 10,000 needs 10,000 client connections here, 10,000 in the
/// server and in the agent, and 20,000 descriptors in the stand-in.
const WANT_OPEN_FILES: u64 = 65_536;

/// The log filter tower-server and tower-agent run with here: their own default. The e2e
/// harness turns their debug logging on, which formats a line for every request.
pub(crate) const TOWER_LOG: &str = "info";

/// A tower-server as the e2e harness starts it, but logging as in production.
pub(crate) fn tower_server() -> tower_e2e::ServerBuilder {
    server().env("TOWER_LOG", TOWER_LOG)
}

const USAGE: &str = "usage: tower-bench [--quick] [--only B1,B2,B3,B4,B5,B6,B7]";

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
    let Bench {
        rt,
        member,
        server,
        agent,
        user,
        mut results,
        ..
    } = bench;
    // B4 and B5 start servers of their own.
    drop(agent);
    drop(server);
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
        let b4 = watch::b4(&rt, &user, &runs, 3, open_limit);
        results.insert("B4".into(), b4);
    }
    if selected("B5") {
        let n = if quick { 200 } else { 1_000 };
        let b5 = agents::b5(&member, n, Duration::from_secs(120));
        results.insert("B5".into(), b5);
    }

    let elapsed = run_started.elapsed();
    let load_after = load_average();
    results.insert(
        "run".into(),
        json!({
            "quick": quick,
            "profile": profile,
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

/// The shared setup of B1–B3, B6 and B7: the stand-in, one server and one agent.
struct Bench {
    quick: bool,
    /// Bulk downloads are divided by this: 4 in a quick run of a debug build (a smoke run
    /// in CI, where the client's byte check runs at ~35 MB/s), else 1.
    bulk_divisor: u64,
    rt: tokio::runtime::Runtime,
    member: Member,
    server: Server,
    agent: Agent,
    user: String,
    results: serde_json::Map<String, Value>,
}

impl Bench {
    fn start(quick: bool) -> Bench {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let member = Member::start();
        let server = tower_server().start();
        let agent = agent(&server, &member, "bench")
            .env("TOWER_LOG", TOWER_LOG)
            .connect(&server);
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
            server,
            agent,
            user,
            results: serde_json::Map::new(),
        }
    }

    fn pids(&self) -> [u32; 2] {
        [self.server.process.pid(), self.agent.process.pid()]
    }

    fn small_direct(&self) -> Target {
        Target::new(
            self.member.api.ca_pem(),
            self.member.api.addr(),
            "/version".into(),
            self.member.api.token(),
        )
    }

    fn small_tunnel(&self) -> Target {
        Target::new(
            &self.server.ca_pem,
            self.server.frontend,
            "/clusters/bench/version".into(),
            &self.user,
        )
    }

    fn limit(&self) -> Duration {
        Duration::from_secs(if self.quick { 5 } else { 15 })
    }

    /// B1: bulk. Returns the CPU seconds per GiB of [server, agent].
    fn b1(&mut self) -> [f64; 2] {
        let (size, rounds): (u64, usize) = if self.quick {
            ((256 << 20) / self.bulk_divisor, 3)
        } else {
            (1 << 30, 5)
        };
        let pids = self.pids();
        let tunnel = Https::frontend(&self.server);
        let direct = Https::with_ca(self.member.api.ca_pem(), self.member.api.addr());
        let bulk = format!("/debug/bytes?size={size}");
        let (mut d_mbps, mut t_mbps, mut peak) = (Vec::new(), Vec::new(), [0u64; 2]);
        let idle = [self.server.process.rss_kib(), self.agent.process.rss_kib()];
        let cpu_before = pids.map(cpu_time);
        for _ in 0..rounds {
            d_mbps.push(mbps(size, || {
                direct.download_checked(&bulk, self.member.api.token())
            }));
            let sampler = RssPeaks::start(&pids);
            t_mbps.push(mbps(size, || {
                tunnel.download_checked(&format!("/clusters/bench{bulk}"), &self.user)
            }));
            let s = sampler.stop();
            peak = [peak[0].max(s[0]), peak[1].max(s[1])];
        }
        let cpu_bulk = cpu_per(
            pids.map(cpu_time),
            cpu_before,
            (size * rounds as u64) as f64 / (1u64 << 30) as f64,
        );
        let (d, t) = (median(&mut d_mbps), median(&mut t_mbps));
        row_f(
            &format!("B1 bulk {} MiB (MB/s)", size >> 20),
            d,
            t,
            t / d,
            ">= 0.5x",
        );
        println!(
            "{:<36} spread direct {:.0}-{:.0}, tunnel {:.0}-{:.0}; RSS KiB idle/peak server {}/{}, agent {}/{}",
            "",
            min(&d_mbps),
            max(&d_mbps),
            min(&t_mbps),
            max(&t_mbps),
            idle[0],
            peak[0],
            idle[1],
            peak[1]
        );
        self.results.insert("B1".into(), json!({
            "bytes": size, "rounds": rounds, "direct_mbps": d_mbps, "tunnel_mbps": t_mbps,
            "median_ratio": t / d,
            "rss_kib": {"server_idle": idle[0], "server_peak": peak[0], "agent_idle": idle[1], "agent_peak": peak[1]},
        }));
        cpu_bulk
    }

    /// B2: small requests. Returns the CPU seconds per request of [server, agent].
    fn b2(&mut self) -> [f64; 2] {
        let (small_direct, small_tunnel) = (self.small_direct(), self.small_tunnel());
        let n1 = if self.quick { 1000 } else { 5000 };
        let limit = self.limit();
        let rt = &self.rt;
        rt.block_on(load::run(&small_tunnel, 1, 200, limit)); // warm the pools
        let mut d1 = rt.block_on(load::run(&small_direct, 1, n1, limit));
        let mut t1 = rt.block_on(load::run(&small_tunnel, 1, n1, limit));
        let (d50, t50, d99, t99) = (
            d1.percentile(0.5),
            t1.percentile(0.5),
            d1.percentile(0.99),
            t1.percentile(0.99),
        );
        row_f(
            "B2 c=1 p50 (us)",
            us(d50),
            us(t50),
            us(t50) - us(d50),
            "+<=80us",
        );
        row_f(
            "B2 c=1 p99 (us)",
            us(d99),
            us(t99),
            us(t99) / us(d99),
            "<= 2x",
        );
        let mut b2 = json!({"c1": {"direct_p50_us": us(d50), "tunnel_p50_us": us(t50), "direct_p99_us": us(d99), "tunnel_p99_us": us(t99)}});
        let pids = self.pids();
        let cpu_before = pids.map(cpu_time);
        let mut requests = 0usize;
        for c in [64usize, 256] {
            let per = if self.quick { 20_000 / c } else { 100_000 / c };
            let d = rt.block_on(load::run(&small_direct, c, per, limit));
            let t = rt.block_on(load::run(&small_tunnel, c, per, limit));
            requests += t.latencies.len();
            row_f(
                &format!("B2 c={c} requests/s"),
                d.rps(),
                t.rps(),
                t.rps() / d.rps(),
                if c == 64 { ">= 0.4x" } else { "" },
            );
            if d.errors + t.errors > 0 {
                println!(
                    "{:<36} errors: direct {}, tunnel {}",
                    "", d.errors, t.errors
                );
            }
            b2[format!("c{c}")] = json!({"direct_rps": d.rps(), "tunnel_rps": t.rps(), "errors": [d.errors, t.errors]});
        }
        let cpu_small = cpu_per(pids.map(cpu_time), cpu_before, requests as f64);
        self.results.insert("B2".into(), b2);
        cpu_small
    }

    /// B3: small-request latency (one at a time) while a bulk download runs. Five
    /// pairings separate head-of-line blocking in the tunnel from CPU contention on a
    /// small machine: the tunnel probe during a tunnel download (both), the direct probe
    /// during the same tunnel download (the same contention, no tunnel on the probe's
    /// path), the direct probe during a direct download (no tunnel anywhere), the tunnel
    /// probe during a direct download (contention, but no shared tunnel), and the tunnel
    /// probe during a tunnel download whose reader is slow (flow control, little CPU).
    fn b3(&mut self) {
        let n = if self.quick { 500 } else { 2500 };
        let size: u64 = if self.quick {
            (512 << 20) / self.bulk_divisor
        } else {
            2 << 30
        };
        let (small_direct, small_tunnel) = (self.small_direct(), self.small_tunnel());
        let limit = self.limit();
        // Idle baselines with the same probe.
        self.rt.block_on(load::run(&small_tunnel, 1, 200, limit)); // warm the pools
        let idle_direct = self
            .rt
            .block_on(load::run(&small_direct, 1, n, limit))
            .percentile(0.99);
        let idle_tunnel = self
            .rt
            .block_on(load::run(&small_tunnel, 1, n, limit))
            .percentile(0.99);
        let t_t = self.probe_during_download(true, &small_tunnel, n, size, None);
        let d_t = self.probe_during_download(true, &small_direct, n, size, None);
        let d_d = self.probe_during_download(false, &small_direct, n, size, None);
        let t_d = self.probe_during_download(false, &small_tunnel, n, size, None);
        // A slow reader: the bulk stream is held back by its flow-control window, so the
        // tunnel carries it at a fraction of the CPU (what stalls a Konnectivity tunnel).
        // Four times the probes: the slow reader's window updates release the bulk in
        // bursts, and a p99 of 2,500 probes is the 25th worst of a handful of bursts.
        let slow_n = 4 * n;
        let slow_size = SLOW_READER_RATE * if self.quick { 4 } else { 10 };
        let t_slow = self.probe_during_download(
            true,
            &small_tunnel,
            slow_n,
            slow_size,
            Some(SLOW_READER_RATE),
        );
        // The direct probe during the same slow tunnel download: what the bulk's CPU
        // (little, at this rate) does to a request that does not cross the tunnel.
        let d_slow = self.probe_during_download(
            true,
            &small_direct,
            slow_n,
            slow_size,
            Some(SLOW_READER_RATE),
        );
        let shift = |idle: Duration, busy: Duration| format!("{:.0}->{:.0}", us(idle), us(busy));
        let times = |idle: Duration, busy: Duration| format!("{:.1}x", us(busy) / us(idle));
        row(
            "B3 p99 us idle->busy, tunnel bulk",
            &shift(idle_direct, d_t.p99),
            &shift(idle_tunnel, t_t.p99),
            &format!(
                "{}/{}",
                times(idle_direct, d_t.p99),
                times(idle_tunnel, t_t.p99)
            ),
            "<= 3x",
        );
        row(
            "B3 tunnel probe p99 / direct probe p99",
            "",
            "",
            &format!("{:.1}x", us(t_t.p99) / us(d_t.p99)),
            "(same tunnel bulk)",
        );
        row(
            "B3 p99 us idle->busy, slow reader",
            &shift(idle_direct, d_slow.p99),
            &shift(idle_tunnel, t_slow.p99),
            &format!(
                "{}/{}",
                times(idle_direct, d_slow.p99),
                times(idle_tunnel, t_slow.p99)
            ),
            "<= 3x",
        );
        row(
            "B3 p99 us idle->busy, direct bulk",
            &shift(idle_direct, d_d.p99),
            &shift(idle_tunnel, t_d.p99),
            &format!(
                "{}/{}",
                times(idle_direct, d_d.p99),
                times(idle_tunnel, t_d.p99)
            ),
            "",
        );
        for (what, probe) in [
            ("tunnel probe, tunnel bulk", &t_t),
            ("direct probe, tunnel bulk", &d_t),
            ("tunnel probe, slow reader", &t_slow),
            ("direct probe, slow reader", &d_slow),
            ("direct probe, direct bulk", &d_d),
            ("tunnel probe, direct bulk", &t_d),
        ] {
            if probe.download_ended_first {
                println!(
                    "{:<36} {what}: the download ended before the probe did (raise its size)",
                    ""
                );
            }
        }
        self.results.insert(
            "B3".into(),
            json!({
                "probe_requests": n,
                "download_bytes": size,
                "idle_p99_us": {"direct": us(idle_direct), "tunnel": us(idle_tunnel)},
                "tunnel_probe_tunnel_bulk": t_t.to_json(),
                "direct_probe_tunnel_bulk": d_t.to_json(),
                "slow_reader_bytes_per_second": SLOW_READER_RATE,
                "slow_reader_probe_requests": slow_n,
                "tunnel_probe_slow_reader": t_slow.to_json(),
                "direct_probe_slow_reader": d_slow.to_json(),
                "direct_probe_direct_bulk": d_d.to_json(),
                "tunnel_probe_direct_bulk": t_d.to_json(),
            }),
        );
    }

    /// Runs `n` requests to `probe`, one at a time, while a `size`-byte download runs
    /// through the tunnel (`via_tunnel`) or directly from the stand-in.
    fn probe_during_download(
        &self,
        via_tunnel: bool,
        probe: &Target,
        n: usize,
        size: u64,
        pace: Option<u64>,
    ) -> Probe {
        let marker = format!("size={size}");
        let downloads = || {
            self.member
                .api
                .calls()
                .iter()
                .filter(|c| c.path_and_query.contains(&marker))
                .count()
        };
        let before = downloads();
        let downloader = {
            let (client, path, token) = if via_tunnel {
                (
                    Https::frontend(&self.server),
                    format!("/clusters/bench/debug/bytes?{marker}"),
                    self.user.clone(),
                )
            } else {
                (
                    Https::with_ca(self.member.api.ca_pem(), self.member.api.addr()),
                    format!("/debug/bytes?{marker}"),
                    self.member.api.token().to_owned(),
                )
            };
            std::thread::spawn(move || client.download_paced(&path, &token, pace))
        };
        tower_e2e::wait_for(
            "the bulk download to reach the member",
            Duration::from_secs(10),
            || (downloads() > before).then_some(()),
        );
        let mut during = self.rt.block_on(load::run(probe, 1, n, self.limit()));
        let download_ended_first = downloader.is_finished();
        let got = downloader.join().expect("the bulk download failed");
        assert_eq!(got, size, "short bulk download");
        Probe {
            p50: during.percentile(0.5),
            p99: during.percentile(0.99),
            requests: during.latencies.len(),
            errors: during.errors,
            download_ended_first,
        }
    }

    /// B7: CPU, from B1's and B2's runs (a dash for one that did not run).
    fn b7(&mut self, small: Option<[f64; 2]>, bulk: Option<[f64; 2]>) {
        let small = small.map(|c| c.map(|s| s * 1e6));
        let show = |v: Option<[f64; 2]>, i: usize, unit: &str, digits: usize| {
            v.map_or("-".into(), |v| format!("{:.*} {unit}", digits, v[i]))
        };
        println!(
            "{:<36} server {}, {}; agent {}, {}",
            "B7 CPU",
            show(small, 0, "us/request", 1),
            show(bulk, 0, "s/GiB", 2),
            show(small, 1, "us/request", 1),
            show(bulk, 1, "s/GiB", 2),
        );
        let at = |v: Option<[f64; 2]>, i: usize| v.map(|v| v[i]);
        self.results.insert(
            "B7".into(),
            json!({
                "server_us_per_request": at(small, 0), "agent_us_per_request": at(small, 1),
                "server_s_per_gib": at(bulk, 0), "agent_s_per_gib": at(bulk, 1),
            }),
        );
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

/// How fast B3's slow reader reads its download (bytes per second).
const SLOW_READER_RATE: u64 = 16 << 20;

/// What a B3 probe measured.
struct Probe {
    p50: Duration,
    p99: Duration,
    requests: usize,
    errors: usize,
    download_ended_first: bool,
}

impl Probe {
    fn to_json(&self) -> Value {
        json!({
            "p50_us": us(self.p50), "p99_us": us(self.p99), "requests": self.requests,
            "errors": self.errors, "download_ended_first": self.download_ended_first,
        })
    }
}

/// Prints a table row.
fn row(name: &str, direct: &str, tunnel: &str, ratio: &str, target: &str) {
    println!("{name:<36} {direct:>16} {tunnel:>16} {ratio:>8}   {target}");
}

/// Prints a table row of numbers.
fn row_f(name: &str, direct: f64, tunnel: f64, ratio: f64, target: &str) {
    row(
        name,
        &format!("{direct:.1}"),
        &format!("{tunnel:.1}"),
        &format!("{ratio:.2}"),
        target,
    );
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// CPU seconds per unit of work, for each process.
fn cpu_per(after: [Duration; 2], before: [Duration; 2], units: f64) -> [f64; 2] {
    [0, 1].map(|i| (after[i] - before[i]).as_secs_f64() / units.max(1.0))
}

fn mbps(size: u64, download: impl FnOnce() -> u64) -> f64 {
    let started = Instant::now();
    let got = download();
    assert_eq!(got, size, "short download");
    size as f64 / 1e6 / started.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}
