//! `tower-bench`: runs each scenario through the tunnel and directly against the same
//! upstream in the same run, and prints ratios. Benchmarks print; they never fail a build.
//!
//! ```sh
//! cargo build --release --bins && cargo run --release -p tower-benches -- [--quick]
//! ```
//!
//! Scenarios so far: B1 bulk download (MB/s, and the peak RSS of tower-server and
//! tower-agent while it runs). Results also go to `target/bench-results.json`.

use std::time::Instant;

use tower_e2e::{Https, Member, RssPeaks, Server, agent, server};

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (size, rounds): (u64, usize) = if quick { (256 << 20, 3) } else { (1 << 30, 5) };
    let member = Member::start();
    let server = server().start();
    let agent = agent(&server, &member, "bench").connect(&server);
    let user = Server::minter().user_token("bench", &[], None);
    let tunnel = Https::frontend(&server);
    let direct = Https::with_ca(member.api.ca_pem(), member.api.addr());
    let path = format!("/debug/bytes?size={size}");

    let mut direct_mbps = Vec::new();
    let mut tunnel_mbps = Vec::new();
    let mut peak = (0u64, 0u64);
    let idle = (server.process.rss_kib(), agent.process.rss_kib());
    for _ in 0..rounds {
        direct_mbps.push(mbps(size, || {
            direct.download_checked(&path, member.api.token())
        }));
        let sampler = RssPeaks::start(&[server.process.pid(), agent.process.pid()]);
        tunnel_mbps.push(mbps(size, || {
            tunnel.download_checked(&format!("/clusters/bench{path}"), &user)
        }));
        let s = sampler.stop();
        peak = (peak.0.max(s[0]), peak.1.max(s[1]));
    }
    let (d, t) = (median(&mut direct_mbps), median(&mut tunnel_mbps));
    println!("scenario                 direct        tunnel        ratio   target");
    println!(
        "B1 bulk {:>4} MiB     {:>8.1} MB/s {:>8.1} MB/s   {:>5.2}x   >= 0.5x",
        size >> 20,
        d,
        t,
        t / d
    );
    println!(
        "   spread (min-max)  {:>6.1}-{:<6.1} {:>6.1}-{:<6.1}",
        min(&direct_mbps),
        max(&direct_mbps),
        min(&tunnel_mbps),
        max(&tunnel_mbps)
    );
    println!(
        "   RSS KiB idle/peak: tower-server {}/{}, tower-agent {}/{}",
        idle.0, peak.0, idle.1, peak.1
    );
    let results = serde_json::json!({
        "B1": {
            "bytes": size, "rounds": rounds,
            "direct_mbps": direct_mbps, "tunnel_mbps": tunnel_mbps,
            "median_ratio": t / d,
            "rss_kib": {"server_idle": idle.0, "server_peak": peak.0, "agent_idle": idle.1, "agent_peak": peak.1},
        }
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results.json");
    if let Err(e) = std::fs::write(
        &out,
        serde_json::to_string_pretty(&results).unwrap_or_default(),
    ) {
        eprintln!("tower-bench: writing {}: {e}", out.display());
    }
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
