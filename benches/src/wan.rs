//! B8: the tunnel over a WAN.
//!
//! Members sit in other clouds and IDCs, so the tunnel crosses a WAN. For each [`Link`]
//! (a round-trip time and a rate), a [`DelayRelay`] sits between a tower-agent of its own
//! and the tower-server (the agent dials the relay: the tunnel crosses the link), and
//! another with the same link between the direct client and the upstream (the client's
//! every connection crosses it). The bench's client, the frontend and the agent's
//! upstream stay on loopback: the link is the only distance. Per link, in rounds:
//!
//! - **a fresh request**: `/version` on a new client connection, in round trips of the
//!   link. Directly that is TCP's handshake, TLS's and the request (3); through the
//!   tunnel, which is already up, only the request should cross (1).
//! - **bulk**: a download (256 MiB in full runs) on a connection opened first, from the
//!   request to the last byte: the tunnel's stream windows must grow to the
//!   bandwidth-delay product to keep up with a direct TCP connection over the same link
//!   (which meets no window but the relay's queue, see [`crate::delay`]).
//! - **a probe during bulk**: `/version` one at a time on a keep-alive connection, idle
//!   and then while a download runs: through the tunnel on the tunnel that carries the
//!   download, directly on a connection of its own over the link that carries it.
//! - **reconnect** (once per round-trip time, at its first rate): the server is killed
//!   and started again; the time to the first request through the agent's new tunnel
//!   that succeeds, as in B6.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tower_e2e::Https;

use crate::delay::{DelayRelay, Link};
use crate::load::{self, Target};
use crate::stats::Samples;
use crate::{Bench, row, row_s};

const MBIT: u64 = 1_000_000;
const GBIT: u64 = 1_000_000_000;

/// How long the agent's tunnel stays up before a restart: past the agent's healthy period
/// (5 s), so each restart starts from a reset backoff, as in B6.
const HEALTHY: Duration = Duration::from_millis(5500);

/// What B8 runs: the links, and how much on each.
struct Plan {
    links: Vec<Link>,
    rounds: usize,
    /// Fresh requests per path per round.
    fresh: usize,
    bulk: u64,
    /// Probes per path per round, idle and during a download.
    probes: usize,
    /// The download the probe runs beside: stopped when the probe is done, so it only
    /// has to outlast it.
    busy_bulk: u64,
    /// Restarts per round-trip time.
    restarts: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        let ms = Duration::from_millis;
        if quick {
            Plan {
                links: vec![Link::new(ms(50), Some(400 * MBIT))],
                rounds: 2,
                fresh: 3,
                bulk: 32 << 20,
                probes: 10,
                // Link-bound, not CPU-bound: not quartered in a debug build.
                busy_bulk: 256 << 20,
                restarts: 1,
            }
        } else {
            let links = [ms(50), ms(100)]
                .into_iter()
                .flat_map(|rtt| [400 * MBIT, GBIT].map(|rate| Link::new(rtt, Some(rate))))
                .collect();
            Plan {
                links,
                rounds: 3,
                fresh: 5,
                bulk: 256 << 20,
                probes: 20,
                busy_bulk: 1 << 30,
                restarts: 3,
            }
        }
    }
}

/// What one link's rounds measured: a value per round (ms, MB/s or a ratio).
#[derive(Default)]
struct Measured {
    /// The median fresh request of each round, ms: direct, tunnel.
    fresh: [Samples; 2],
    /// MB/s: direct, tunnel, tunnel/direct.
    bulk: [Samples; 3],
    /// The probe's p50, ms: direct idle, tunnel idle, direct busy, tunnel busy.
    probe_p50: [Samples; 4],
    /// The probe's p99 during the download, ms: direct, tunnel.
    probe_p99: [Samples; 2],
    /// Tunnel busy p50 / direct busy p50.
    probe_ratio: Samples,
    /// The download's MB/s while the probe ran: direct, tunnel.
    busy_mbps: [Samples; 2],
    notes: Vec<String>,
    /// Reconnect times after a restart.
    reconnects: Vec<Duration>,
}

impl Bench {
    /// B8: the tunnel over a WAN (see the module's comment).
    pub(crate) fn b8(&mut self) {
        let plan = Plan::new(self.quick);
        let mut links = Vec::new();
        let mut reconnected_rtts = Vec::new();
        for (i, link) in plan.links.iter().enumerate() {
            let restarts = if reconnected_rtts.contains(&link.rtt()) {
                0
            } else {
                reconnected_rtts.push(link.rtt());
                plan.restarts
            };
            let measured = self.b8_link(i, *link, &plan, restarts);
            links.push(report(*link, &plan, &measured));
        }
        self.results.insert(
            "B8".into(),
            json!({
                "rounds": plan.rounds, "fresh_requests_per_round": plan.fresh,
                "bulk_bytes": plan.bulk, "probes_per_round": plan.probes,
                "links": links,
            }),
        );
    }

    /// One link: its own agent and relays, `plan.rounds` rounds, then `restarts`.
    fn b8_link(&mut self, index: usize, link: Link, plan: &Plan, restarts: usize) -> Measured {
        let (_, upstream, ca_pem, token) = self.upstream();
        let (ca_pem, token) = (ca_pem.to_owned(), token.to_owned());
        let tunnel_relay = DelayRelay::start(self.server.tunnel, link).expect("tunnel relay");
        let direct_relay = DelayRelay::start(upstream, link).expect("direct relay");
        // A cluster of its own per link: the server never confuses it with the last
        // link's tunnel, which may not have ended yet.
        let cluster = format!("bench-wan-{index}");
        let kubeconfig = self
            .nginx
            .as_ref()
            .map_or(&self.member.kubeconfig, |n| &n.kubeconfig);
        let agent = tower_e2e::agent(&self.server, &self.member, &cluster)
            .proxy_server(tunnel_relay.addr)
            .kubeconfig(kubeconfig)
            .env("TOWER_LOG", crate::TOWER_LOG)
            .connect(&self.server);
        let mut up_since = Instant::now();
        let bulk = self.bulk_path(plan.bulk);
        let busy_bulk = self.bulk_path(plan.busy_bulk);
        let direct =
            |path: &str| Target::new(&ca_pem, direct_relay.addr, path.into(), token.as_str());
        let tunnel = |path: &str| self.tunnel_target(&format!("/clusters/{cluster}{path}"));
        let (small_d, small_t) = (direct("/version"), tunnel("/version"));
        let (bulk_d, bulk_t) = (direct(&bulk), tunnel(&bulk));
        let (busy_d, busy_t) = (direct(&busy_bulk), tunnel(&busy_bulk));
        let rt = &self.rt;
        let limit = Duration::from_secs(60);
        // Warm: the server's pool of streams to the agent, the agent's to its upstream.
        rt.block_on(load::run(&small_t, 1, 3, limit));
        let mut m = Measured::default();
        for _ in 0..plan.rounds {
            let fresh = [&small_d, &small_t].map(|target| {
                let mut took: Vec<Duration> = (0..plan.fresh)
                    .map(|_| {
                        rt.block_on(load::fresh_request(target))
                            .unwrap_or_else(|e| panic!("B8 fresh request: {e}"))
                    })
                    .collect();
                ms(load::percentile(&mut took, 0.5))
            });
            Samples::push_all(m.fresh.each_mut(), fresh);

            let [d, t] = [&bulk_d, &bulk_t].map(|target| {
                let (bytes, took) = rt
                    .block_on(load::timed_download(target))
                    .unwrap_or_else(|e| panic!("B8 download: {e}"));
                assert_eq!(bytes, plan.bulk, "B8: short download");
                bytes as f64 / 1e6 / took.as_secs_f64()
            });
            Samples::push_all(m.bulk.each_mut(), [d, t, t / d]);

            let idle = [&small_d, &small_t].map(|probe| {
                ms(rt
                    .block_on(load::run(probe, 1, plan.probes, limit))
                    .percentile(0.5))
            });
            let mut busy = [(&busy_d, &small_d), (&busy_t, &small_t)]
                .map(|(bulk, probe)| self.b8_probe(bulk, probe, plan.probes, limit, &mut m.notes));
            let p50 = busy.each_mut().map(|b| ms(b.0.percentile(0.5)));
            let p99 = busy.each_mut().map(|b| ms(b.0.percentile(0.99)));
            Samples::push_all(m.probe_p50.each_mut(), [idle[0], idle[1], p50[0], p50[1]]);
            Samples::push_all(m.probe_p99.each_mut(), p99);
            m.probe_ratio.push(p50[1] / p50[0]);
            Samples::push_all(m.busy_mbps.each_mut(), busy.map(|b| b.1));
        }
        let probe = Https::frontend(&self.server);
        let path = format!("/clusters/{cluster}/version");
        for _ in 0..restarts {
            // The agent's backoff resets after a healthy period, as between restarts in
            // the field.
            std::thread::sleep(HEALTHY.saturating_sub(up_since.elapsed()));
            let started = Instant::now();
            self.server.restart();
            let deadline = started + Duration::from_secs(30);
            while Instant::now() < deadline {
                if probe
                    .try_request("GET", &path, Some(&self.user), &[])
                    .is_ok_and(|r| r.status == 200)
                {
                    m.reconnects.push(started.elapsed());
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            up_since = Instant::now();
        }
        if m.reconnects.len() < restarts {
            m.notes.push(format!(
                "{} of {restarts} restarts did not reconnect within 30 s",
                restarts - m.reconnects.len()
            ));
        }
        drop(agent);
        m
    }

    /// `n` probes one at a time while `bulk` downloads (stopped once they are done): the
    /// probe's latencies, and the download's MB/s meanwhile.
    fn b8_probe(
        &self,
        bulk: &Target,
        probe: &Target,
        n: usize,
        limit: Duration,
        notes: &mut Vec<String>,
    ) -> (load::Run, f64) {
        let download = load::Download::start(bulk, None);
        if let Err(e) = download.wait_started(Duration::from_secs(30)) {
            panic!("B8: the bulk download did not start: {e}");
        }
        let started = Instant::now();
        let run = self.rt.block_on(load::run(probe, 1, n, limit));
        let elapsed = started.elapsed();
        let done = download
            .finish()
            .unwrap_or_else(|e| panic!("B8: the bulk download failed: {e}"));
        if done.ended_first {
            notes.push("a download ended before its probe did (raise its size)".into());
        }
        if run.errors > 0 {
            notes.push(format!("{} probe errors", run.errors));
        }
        (run, done.bytes as f64 / 1e6 / elapsed.as_secs_f64())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints one link's rows; returns its JSON.
fn report(link: Link, plan: &Plan, m: &Measured) -> Value {
    let rtt = ms(link.rtt());
    let rtts = |s: &Samples| s.scaled(1.0 / rtt);
    let bdp = link.bdp().unwrap_or(0);
    println!(
        "B8 {} (BDP {:.1} MB), {} rounds",
        link.describe(),
        bdp as f64 / 1e6,
        plan.rounds
    );
    let [fresh_d, fresh_t] = m.fresh.each_ref().map(rtts);
    row(
        "  fresh request (round trips)",
        &format!("{:.2} ({:.0} ms)", fresh_d.median(), m.fresh[0].median()),
        &format!("{:.2} ({:.0} ms)", fresh_t.median(), m.fresh[1].median()),
        "",
        "tunnel 1 RTT",
    );
    println!(
        "{:<36} spread over {} rounds: direct {}, tunnel {} round trips",
        "",
        plan.rounds,
        fresh_d.spread(2),
        fresh_t.spread(2)
    );
    row_s(
        &format!("  bulk {} MiB (MB/s)", plan.bulk >> 20),
        m.bulk.each_ref(),
        0,
        ">= 0.85x",
    );
    let p = &m.probe_p50;
    row(
        "  probe p50 ms, idle -> during bulk",
        &format!("{:.0} -> {:.0}", p[0].median(), p[2].median()),
        &format!("{:.0} -> {:.0}", p[1].median(), p[3].median()),
        &format!("{:.2}", m.probe_ratio.median()),
        "(ratio: tunnel/direct, busy)",
    );
    println!(
        "{:<36} p99 during bulk: direct {:.0} ms, tunnel {:.0} ms; bulk meanwhile {:.0} / {:.0} MB/s",
        "",
        m.probe_p99[0].median(),
        m.probe_p99[1].median(),
        m.busy_mbps[0].median(),
        m.busy_mbps[1].median()
    );
    let mut reconnects = m.reconnects.clone();
    let (p50, p99) = (
        load::percentile(&mut reconnects, 0.5),
        load::percentile(&mut reconnects, 0.99),
    );
    if !m.reconnects.is_empty() {
        row(
            &format!("  reconnect, {} restarts", m.reconnects.len()),
            "",
            &format!("p50 {:.0} ms", ms(p50)),
            &format!("{:.1} RTT", ms(p50) / rtt),
            &format!("p99 {:.0} ms", ms(p99)),
        );
    }
    for note in &m.notes {
        println!("{:<36} {note}", "");
    }
    json!({
        "rtt_ms": rtt,
        "rate_bits_per_second": link.rate,
        "bdp_bytes": bdp,
        "relay_queue_ms": ms(link.queue),
        "fresh_request": {
            "direct_ms": m.fresh[0].to_json(), "tunnel_ms": m.fresh[1].to_json(),
            "direct_rtts": fresh_d.to_json(), "tunnel_rtts": fresh_t.to_json(),
        },
        "bulk": {
            "direct_mbps": m.bulk[0].to_json(), "tunnel_mbps": m.bulk[1].to_json(),
            "ratio": m.bulk[2].to_json(),
        },
        "probe_during_bulk": {
            "direct_idle_p50_ms": p[0].to_json(), "tunnel_idle_p50_ms": p[1].to_json(),
            "direct_busy_p50_ms": p[2].to_json(), "tunnel_busy_p50_ms": p[3].to_json(),
            "direct_busy_p99_ms": m.probe_p99[0].to_json(),
            "tunnel_busy_p99_ms": m.probe_p99[1].to_json(),
            "tunnel_over_direct_busy_p50": m.probe_ratio.to_json(),
            "bulk_mbps_meanwhile": {"direct": m.busy_mbps[0].to_json(), "tunnel": m.busy_mbps[1].to_json()},
        },
        "reconnect": {
            "restarts": m.reconnects.len(),
            "ms": m.reconnects.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "p50_ms": ms(p50), "p99_ms": ms(p99), "p50_rtts": ms(p50) / rtt,
        },
        "notes": m.notes,
    })
}
