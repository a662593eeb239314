//! `tower-bench`: runs each scenario through the tunnel and directly against the same
//! upstream in the same run, and prints ratios. Benchmarks print; they never fail a build.
//!
//! ```sh
//! cargo build --release --bins && ./target/release/tower-bench [--quick]
//! ```
//!
//! Scenarios: B1 bulk download (MB/s; peak RSS of both sides), B2 small requests
//! (latency at concurrency 1, requests/s at 64 and 256), B3 head-of-line (small-request
//! latency while a bulk download shares the tunnel), B6 reconnect after a server
//! restart, B7 CPU per request and per GiB on each side. The upstream is the stand-in
//! API server (`/version` for small requests, `/debug/bytes` for bulk). Results also go
//! to `target/bench-results.json`.

mod load;

use std::time::{Duration, Instant};

use serde_json::json;
use tower_e2e::{Https, Member, RssPeaks, Server, agent, server};

use crate::load::{Target, cpu_time};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let member = Member::start();
    let mut server = server().start();
    let agent = agent(&server, &member, "bench").connect(&server);
    let user = Server::minter().user_token("bench", &[], None);
    let pids = [server.process.pid(), agent.process.pid()];
    let mut results = serde_json::Map::new();
    println!(
        "{:<34} {:>14} {:>14} {:>8}   target",
        "scenario", "direct", "tunnel", "ratio"
    );

    // B1: bulk.
    let (size, rounds): (u64, usize) = if quick { (256 << 20, 3) } else { (1 << 30, 5) };
    let tunnel = Https::frontend(&server);
    let direct = Https::with_ca(member.api.ca_pem(), member.api.addr());
    let bulk = format!("/debug/bytes?size={size}");
    let (mut d_mbps, mut t_mbps, mut peak) = (Vec::new(), Vec::new(), [0u64; 2]);
    let idle = [server.process.rss_kib(), agent.process.rss_kib()];
    let cpu_before = pids.map(cpu_time);
    for _ in 0..rounds {
        d_mbps.push(mbps(size, || {
            direct.download_checked(&bulk, member.api.token())
        }));
        let sampler = RssPeaks::start(&pids);
        t_mbps.push(mbps(size, || {
            tunnel.download_checked(&format!("/clusters/bench{bulk}"), &user)
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
    row(
        &format!("B1 bulk {} MiB (MB/s)", size >> 20),
        d,
        t,
        t / d,
        ">= 0.5x",
    );
    println!(
        "{:<34} spread direct {:.0}-{:.0}, tunnel {:.0}-{:.0}; RSS KiB idle/peak server {}/{}, agent {}/{}",
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
    results.insert("B1".into(), json!({
        "bytes": size, "rounds": rounds, "direct_mbps": d_mbps, "tunnel_mbps": t_mbps,
        "median_ratio": t / d,
        "rss_kib": {"server_idle": idle[0], "server_peak": peak[0], "agent_idle": idle[1], "agent_peak": peak[1]},
    }));

    // B2: small requests.
    let small_direct = Target::new(
        member.api.ca_pem(),
        member.api.addr(),
        "/version".into(),
        member.api.token(),
    );
    let small_tunnel = Target::new(
        &server.ca_pem,
        server.frontend,
        "/clusters/bench/version".into(),
        &user,
    );
    let n1 = if quick { 1000 } else { 5000 };
    let limit = Duration::from_secs(if quick { 5 } else { 15 });
    rt.block_on(load::run(&small_tunnel, 1, 200, limit)); // warm the pools
    let mut d1 = rt.block_on(load::run(&small_direct, 1, n1, limit));
    let mut t1 = rt.block_on(load::run(&small_tunnel, 1, n1, limit));
    let (d50, t50, d99, t99) = (
        d1.percentile(0.5),
        t1.percentile(0.5),
        d1.percentile(0.99),
        t1.percentile(0.99),
    );
    row(
        "B2 c=1 p50 (us)",
        us(d50),
        us(t50),
        us(t50) - us(d50),
        "+<=80us",
    );
    row(
        "B2 c=1 p99 (us)",
        us(d99),
        us(t99),
        us(t99) / us(d99),
        "<= 2x",
    );
    let mut b2 = json!({"c1": {"direct_p50_us": us(d50), "tunnel_p50_us": us(t50), "direct_p99_us": us(d99), "tunnel_p99_us": us(t99)}});
    let cpu_before = pids.map(cpu_time);
    let mut requests = 0usize;
    for c in [64usize, 256] {
        let per = if quick { 20_000 / c } else { 100_000 / c };
        let d = rt.block_on(load::run(&small_direct, c, per, limit));
        let t = rt.block_on(load::run(&small_tunnel, c, per, limit));
        requests += t.latencies.len();
        row(
            &format!("B2 c={c} requests/s"),
            d.rps(),
            t.rps(),
            t.rps() / d.rps(),
            if c == 64 { ">= 0.4x" } else { "" },
        );
        if d.errors + t.errors > 0 {
            println!(
                "{:<34} errors: direct {}, tunnel {}",
                "", d.errors, t.errors
            );
        }
        b2[format!("c{c}")] =
            json!({"direct_rps": d.rps(), "tunnel_rps": t.rps(), "errors": [d.errors, t.errors]});
    }
    let cpu_small = cpu_per(pids.map(cpu_time), cpu_before, requests as f64);
    results.insert("B2".into(), b2);

    // B3: head-of-line blocking: small requests while a bulk download shares the tunnel.
    let hol_size: u64 = if quick { 512 << 20 } else { 2 << 30 };
    let downloader = {
        let tunnel = Https::frontend(&server);
        let user = user.clone();
        std::thread::spawn(move || {
            tunnel.download_checked(
                &format!("/clusters/bench/debug/bytes?size={hol_size}"),
                &user,
            )
        })
    };
    tower_e2e::wait_for(
        "the bulk download to reach the member",
        Duration::from_secs(10),
        || {
            member
                .api
                .calls()
                .iter()
                .any(|c| c.path_and_query.contains(&format!("size={hol_size}")))
                .then_some(())
        },
    );
    let mut during = rt.block_on(load::run(&small_tunnel, 1, n1 / 2, limit));
    let busy_p99 = during.percentile(0.99);
    let finished_first = downloader.is_finished();
    let _ = downloader.join();
    row(
        "B3 c=1 p99 (us) idle vs bulk",
        us(t99),
        us(busy_p99),
        us(busy_p99) / us(t99),
        "<= 3x",
    );
    if finished_first {
        println!(
            "{:<34} (the download ended before the probe did: raise its size)",
            ""
        );
    }
    results.insert("B3".into(), json!({"idle_p99_us": us(t99), "during_bulk_p99_us": us(busy_p99), "p50_us": us(during.percentile(0.5))}));

    // B7: CPU.
    println!(
        "{:<34} server {:.1} us/request, {:.2} s/GiB; agent {:.1} us/request, {:.2} s/GiB",
        "B7 CPU",
        cpu_small[0] * 1e6,
        cpu_bulk[0],
        cpu_small[1] * 1e6,
        cpu_bulk[1]
    );
    results.insert(
        "B7".into(),
        json!({
            "server_us_per_request": cpu_small[0] * 1e6, "agent_us_per_request": cpu_small[1] * 1e6,
            "server_s_per_gib": cpu_bulk[0], "agent_s_per_gib": cpu_bulk[1],
        }),
    );

    // B6: reconnect after a server restart (SIGKILL, start again on the same ports).
    let restarts = if quick { 3 } else { 20 };
    let mut times = Vec::new();
    let probe = Https::frontend(&server);
    for _ in 0..restarts {
        // Restarts in the field are minutes apart: let the tunnel pass the agent's healthy
        // period (5 s) so each restart starts from a reset backoff, as it would there.
        std::thread::sleep(Duration::from_millis(5500));
        let started = Instant::now();
        server.restart();
        let deadline = started + Duration::from_secs(30);
        while Instant::now() < deadline {
            if probe
                .try_request("GET", "/clusters/bench/version", Some(&user), &[])
                .is_ok_and(|r| r.status == 200)
            {
                times.push(started.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    times.sort();
    let pct = |p: f64| {
        times
            .get(((times.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{:<34} {:>14} {:>14}            p99 <= 1s",
        format!("B6 reconnect over {} restarts", times.len()),
        format!("p50 {:.0} ms", pct(0.5).as_secs_f64() * 1e3),
        format!("p99 {:.0} ms", pct(0.99).as_secs_f64() * 1e3)
    );
    results.insert("B6".into(), json!({"restarts": times.len(), "p50_ms": pct(0.5).as_secs_f64() * 1e3, "p99_ms": pct(0.99).as_secs_f64() * 1e3}));
    drop(agent);

    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results.json");
    if let Err(e) = std::fs::write(
        &out,
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    ) {
        eprintln!("tower-bench: writing {}: {e}", out.display());
    }
}

fn row(name: &str, direct: f64, tunnel: f64, ratio: f64, target: &str) {
    println!("{name:<34} {direct:>14.1} {tunnel:>14.1} {ratio:>8.2}   {target}");
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
