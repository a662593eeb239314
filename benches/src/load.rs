//! A small HTTP/1.1-over-TLS load generator: N workers, each on its own keep-alive
//! connection, sending GETs back to back and recording each latency.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

/// Where to send requests.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) tls: Arc<rustls::ClientConfig>,
    pub(crate) path: String,
    pub(crate) token: String,
}

impl Target {
    pub(crate) fn new(ca_pem: &str, addr: SocketAddr, path: String, token: &str) -> Self {
        let ca = tower_tunnel::tls::certs_from_pem(ca_pem.as_bytes()).expect("CA");
        let tls = tower_tunnel::tls::client_config(&tower_tunnel::tls::CaTrust::Certificates(ca))
            .expect("TLS config");
        Target {
            addr,
            tls,
            path,
            token: token.to_owned(),
        }
    }

    async fn connect(&self) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
        tower_e2e::http1_over_tls(self.addr, self.tls.clone()).await
    }
}

/// What a run measured.
pub(crate) struct Run {
    pub(crate) latencies: Vec<Duration>,
    pub(crate) elapsed: Duration,
    pub(crate) errors: usize,
}

impl Run {
    pub(crate) fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn percentile(&mut self, p: f64) -> Duration {
        self.latencies.sort();
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[i - 1]
    }
}

/// Runs `concurrency` workers until each has sent `per_worker` requests or `limit` passed.
pub(crate) async fn run(
    target: &Target,
    concurrency: usize,
    per_worker: usize,
    limit: Duration,
) -> Run {
    let started = Instant::now();
    let deadline = started + limit;
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let target = target.clone();
        workers.push(tokio::spawn(async move {
            let mut sender = target.connect().await;
            let mut latencies = Vec::with_capacity(per_worker);
            let mut errors = 0;
            for _ in 0..per_worker {
                if Instant::now() >= deadline {
                    break;
                }
                let request = http::Request::get(target.path.as_str())
                    .header("host", "localhost")
                    .header("authorization", format!("Bearer {}", target.token))
                    .body(Empty::<Bytes>::new())
                    .expect("request");
                let sent = Instant::now();
                let ok = match sender.send_request(request).await {
                    Ok(response) => {
                        let good = response.status().is_success();
                        good && response.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                };
                if ok {
                    latencies.push(sent.elapsed());
                } else {
                    errors += 1;
                    sender = target.connect().await;
                }
            }
            (latencies, errors)
        }));
    }
    let mut run = Run {
        latencies: Vec::new(),
        elapsed: Duration::ZERO,
        errors: 0,
    };
    for worker in workers {
        let (latencies, errors) = worker.await.expect("worker");
        run.latencies.extend(latencies);
        run.errors += errors;
    }
    run.elapsed = started.elapsed();
    run
}

/// CPU time (user + system) a process has used so far, from /proc.
pub(crate) fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
    let hz = 100.0; // USER_HZ on Linux
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / hz)
}
