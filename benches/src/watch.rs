//! B4: many concurrent watches over one tunnel.
//!
//! N clients each open one HTTP/1.1 connection over TLS and one watch on the stand-in's
//! `default` configmaps (from the current resourceVersion, so nothing is replayed and the
//! stream carries only what happens next). Then the bench creates a configmap directly at
//! the stand-in and times how long each watcher takes to see its event. The same runs
//! directly against the stand-in and through a fresh tower-server + tower-agent pair
//! (fresh, so that the processes' idle RSS is a clean baseline for memory per watch).
//!
//! The stand-in runs as its own process (`kube-stand-in`) here, so that its descriptors
//! (one per connection) and memory are its own: its RSS per watch is the direct column's
//! memory figure.

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ChildStdout, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::client::conn::http2;
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tower_e2e::{Process, Server, TempDir, bin_path};

use crate::load::{Target, cpu_time, percentile};
use crate::stats::Samples;

/// Objects whose events the watchers time are named this, then a number.
const EVENT_PREFIX: &[u8] = b"bench-event-";
/// Watches being opened at once (connect + TLS + request until the response head).
/// Below the listeners' accept backlog (128 for tower-server's and the stand-in's), so
/// the opening measures the processes, not the kernel's 1 s SYN retransmit after an
/// overflowing burst.
const OPENING_AT_ONCE: usize = 96;
/// Watches per HTTP/2 connection in the HTTP/2 runs: the stand-in's stream cap (a Go
/// client such as client-go opens another connection at a server's cap).
const WATCHES_PER_HTTP2_CONNECTION: usize = 100;

/// How the bench's watchers talk to the frontend or the stand-in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// One HTTP/1.1 connection per watch.
    Http1,
    /// [`WATCHES_PER_HTTP2_CONNECTION`] watches per HTTP/2 connection.
    Http2,
}

/// How long one event may take to reach every watcher.
const DELIVERY_LIMIT: Duration = Duration::from_secs(30);
/// How long the stand-in may take to notice that closed watches are gone.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// Open files the stand-in needs besides its connections (listener, epoll, stdio, …).
const STAND_IN_SPARE_FILES: u64 = 64;

/// The largest N a process can serve with `open_files` (one per connection), in hundreds.
pub(crate) fn most_watches(open_files: u64) -> usize {
    (open_files.saturating_sub(STAND_IN_SPARE_FILES) / 100 * 100) as usize
}

/// What one side (direct or tunnel) measured for one N.
#[derive(Debug, Default)]
struct Side {
    opened: usize,
    failed: usize,
    first_error: Option<String>,
    /// First request to the last response head.
    open_time: Duration,
    /// Every watcher's delay for every event (from just before the create is sent).
    latencies: Vec<Duration>,
    /// Watchers that missed an event within [`DELIVERY_LIMIT`], over all events.
    missed: usize,
    /// The slowest watcher of each event.
    slowest: Vec<Duration>,
    /// RSS in KiB of each measured process (direct: the stand-in; tunnel: the server and
    /// the agent): idle (warmed up), all watches open, after the events.
    rss: [Vec<u64>; 3],
    /// CPU seconds each measured process, then this one (client and all), spent opening
    /// the watches and delivering the events.
    cpu: [Vec<f64>; 2],
}

impl Side {
    /// (RSS after the events − idle RSS) / watches open, per measured process.
    fn kib_per_watch(&self) -> Vec<f64> {
        let [idle, _, after] = &self.rss;
        let n = self.opened.max(1) as f64;
        idle.iter()
            .zip(after)
            .map(|(i, a)| a.saturating_sub(*i) as f64 / n)
            .collect()
    }

    /// p50, p99 and max of the event delays.
    fn event_stats(&self) -> [Duration; 3] {
        let mut v = self.latencies.clone();
        [0.5, 0.99, 1.0].map(|q| percentile(&mut v, q))
    }

    fn to_json(&self, processes: &[&str]) -> Value {
        let [p50, p99, max] = self.event_stats().map(ms);
        let per = self.kib_per_watch();
        let [idle, open, after] = &self.rss;
        let rss: serde_json::Map<String, Value> = processes
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let kib = json!({
                    "idle": idle.get(i), "open": open.get(i), "after_events": after.get(i),
                    "per_watch": per.get(i),
                    "cpu_s_open": self.cpu[0].get(i), "cpu_s_events": self.cpu[1].get(i),
                });
                (name.to_string(), kib)
            })
            .collect();
        json!({
            "opened": self.opened,
            "failed": self.failed,
            "first_error": self.first_error,
            "open_all_s": self.open_time.as_secs_f64(),
            "event_ms": {
                "p50": p50,
                "p99": p99,
                "max": max,
                "slowest_per_event": self.slowest.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
                "missed": self.missed,
            },
            "processes": rss,
            "bench_process_cpu_s": {"open": self.cpu[0].last(), "events": self.cpu[1].last()},
        })
    }
}

/// Runs B4 for each (protocol, N) in `runs`, `rounds` times (each round: directly against
/// a fresh stand-in, then through a fresh tower-server + tower-agent to it), `events`
/// events per side; prints the rows (medians over the rounds, and spreads) and returns
/// the JSON, with what went wrong in any round (a watch that did not open, an event not
/// delivered): figures over fewer watches than asked for are no figures of B4.
pub(crate) fn b4(
    rt: &Runtime,
    user: &str,
    runs: &[(Protocol, usize)],
    rounds: usize,
    events: usize,
    open_limit: Duration,
) -> (Value, Vec<String>) {
    let mut out = serde_json::Map::new();
    let mut failures = Vec::new();
    for &(protocol, n) in runs {
        let (mut direct, mut tunnel) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            // A fresh stand-in each round, as the server and agent are: one that served
            // the previous round grows less (it reuses what it freed), which made its
            // memory per watch 1.4-27.8 KiB over three rounds.
            let upstream = Upstream::start();
            let direct_target = |path: &str| {
                Target::new(&upstream.ca_pem, upstream.addr, path.into(), UPSTREAM_TOKEN)
            };
            let files_before = upstream.open_files();
            direct.push(measure(
                rt,
                &upstream,
                (protocol, n),
                events,
                open_limit,
                &direct_target,
                &[&upstream.process],
            ));
            upstream.wait_released(files_before);

            let server = crate::tower_server().start();
            let cluster = format!("watch-{n}");
            let agent = upstream.agent(&server, &cluster);
            let tunnel_target = |path: &str| {
                Target::new(
                    &server.ca_pem,
                    server.frontend,
                    format!("/clusters/{cluster}{path}"),
                    user,
                )
            };
            // Warm both processes up (first connections, pools, TLS state) with one
            // watch and one event, so that their idle RSS is not their start-up RSS.
            measure(
                rt,
                &upstream,
                (protocol, 1),
                1,
                open_limit,
                &tunnel_target,
                &[],
            );
            tunnel.push(measure(
                rt,
                &upstream,
                (protocol, n),
                events,
                open_limit,
                &tunnel_target,
                &[&server.process, &agent.process],
            ));
        }

        print_rows(protocol, n, &direct, &tunnel);
        let key = match protocol {
            Protocol::Http1 => n.to_string(),
            Protocol::Http2 => format!("{n} http2"),
        };
        for (side, sides) in [("direct", &direct), ("tunnel", &tunnel)] {
            if let Some(failed) = sides.iter().find(|s| s.opened < n || s.missed > 0) {
                failures.push(format!(
                    "B4 N={key}, {side}: opened {} of {n}, {} deliveries missed{}",
                    failed.opened,
                    failed.missed,
                    failed
                        .first_error
                        .as_deref()
                        .map_or(String::new(), |e| format!(" (first error: {e})")),
                ));
            }
        }
        let sides = |sides: &[Side], names: &[&str]| {
            json!({
                "open_all_s": over(sides, |s| s.open_time.as_secs_f64()).to_json(),
                "event_p99_ms": over(sides, |s| ms(s.event_stats()[1])).to_json(),
                "kib_per_watch": names.iter().enumerate().map(|(i, name)| {
                    (name.to_string(), over(sides, |s| s.kib_per_watch()[i]).to_json())
                }).collect::<serde_json::Map<_, _>>(),
                "rounds": sides.iter().map(|s| s.to_json(names)).collect::<Vec<_>>(),
            })
        };
        out.insert(
            key,
            json!({
                "direct": sides(&direct, &["stand_in"]),
                "tunnel": sides(&tunnel, &["server", "agent"]),
            }),
        );
    }
    (Value::Object(out), failures)
}

/// One figure of each round's side.
fn over(sides: &[Side], figure: impl Fn(&Side) -> f64) -> Samples {
    sides.iter().map(figure).collect()
}

/// One figure of each round's tunnel side over the same round's direct side.
fn ratios(direct: &[Side], tunnel: &[Side], figure: impl Fn(&Side) -> f64) -> Samples {
    direct
        .iter()
        .zip(tunnel)
        .map(|(d, t)| figure(t) / figure(d))
        .collect()
}

fn print_rows(protocol: Protocol, n: usize, direct: &[Side], tunnel: &[Side]) {
    let h2 = if protocol == Protocol::Http2 {
        " h2"
    } else {
        ""
    };
    let label = |what: &str| format!("B4 N={n}{h2} {what}");
    let rounds = direct.len();
    let open = |s: &Side| s.open_time.as_secs_f64();
    crate::row_s(
        &label("open all (s)"),
        [
            &over(direct, open),
            &over(tunnel, open),
            &ratios(direct, tunnel, open),
        ],
        2,
        if n >= 10_000 && protocol == Protocol::Http1 {
            "< 10 s"
        } else {
            ""
        },
    );
    let event = |q: usize| move |s: &Side| ms(s.event_stats()[q]);
    let stats = |sides: &[Side]| {
        let [p50, p99, max] = [0, 1, 2].map(|q| over(sides, event(q)).median());
        format!("{p50:.1}/{p99:.1}/{max:.1}")
    };
    crate::row(
        &label("event p50/p99/max ms"),
        &stats(direct),
        &stats(tunnel),
        &format!("{:.2}", ratios(direct, tunnel, event(1)).median()),
        "",
    );
    println!(
        "{:<36} spread of p99 over {rounds} rounds: direct {}, tunnel {}",
        "",
        over(direct, event(1)).spread(1),
        over(tunnel, event(1)).spread(1),
    );
    let per_watch = |sides: &[Side], i: usize| over(sides, |s| s.kib_per_watch()[i]);
    let (server, agent, stand_in) = (
        per_watch(tunnel, 0),
        per_watch(tunnel, 1),
        per_watch(direct, 0),
    );
    crate::row(
        &label("KiB per watch"),
        &format!("stand-in {:.1}", stand_in.median()),
        &format!("srv {:.1} agt {:.1}", server.median(), agent.median()),
        "",
        "<= 8 each",
    );
    println!(
        "{:<36} spread over {rounds} rounds: stand-in {}, server {}, agent {}",
        "",
        stand_in.spread(1),
        server.spread(1),
        agent.spread(1),
    );
    let cpu = |sides: &[Side]| {
        let processes = sides.first().map_or(0, |s| s.cpu[0].len());
        (0..processes)
            .map(|i| format!("{:.1}", over(sides, |s| s.cpu[0][i]).median()))
            .collect::<Vec<_>>()
            .join("/")
    };
    println!(
        "{:<36} CPU s to open (median): direct stand-in/bench {}; tunnel server/agent/bench {}",
        "",
        cpu(direct),
        cpu(tunnel),
    );
    for (side, sides) in [("direct", direct), ("tunnel", tunnel)] {
        for (round, s) in sides.iter().enumerate() {
            if s.opened < n || s.missed > 0 {
                println!(
                    "{:<36} {side}, round {}: opened {} of {n} ({} failed{}), {} deliveries missed",
                    "",
                    round + 1,
                    s.opened,
                    s.failed,
                    s.first_error
                        .as_deref()
                        .map_or(String::new(), |e| format!(", first: {e}")),
                    s.missed,
                );
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Opens `n` watches on `target_for(watch path)`, sends `events` events, closes them, and
/// samples the RSS of `procs`.
fn measure(
    rt: &Runtime,
    upstream: &Upstream,
    (protocol, n): (Protocol, usize),
    events: usize,
    open_limit: Duration,
    target_for: &dyn Fn(&str) -> Target,
    procs: &[&Process],
) -> Side {
    let rss = || procs.iter().map(|p| p.rss_kib()).collect::<Vec<_>>();
    let pids: Vec<u32> = procs
        .iter()
        .map(|p| p.pid())
        .chain([std::process::id()])
        .collect();
    let cpu = || pids.iter().map(|p| cpu_time(*p)).collect::<Vec<_>>();
    let spent = |before: &[Duration], after: &[Duration]| {
        before
            .iter()
            .zip(after)
            .map(|(b, a)| a.saturating_sub(*b).as_secs_f64())
            .collect::<Vec<_>>()
    };
    let writer = Target::new(
        &upstream.ca_pem,
        upstream.addr,
        String::new(),
        UPSTREAM_TOKEN,
    );
    let mut writer = rt
        .block_on(Writer::connect(&writer))
        .expect("a connection to the stand-in");
    let rv = rt
        .block_on(writer.resource_version())
        .expect("the configmaps' resourceVersion");
    let target = target_for(&format!(
        "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={rv}"
    ));
    let idle = rss();
    let cpu_idle = cpu();
    let (mut watches, mut side) = rt.block_on(Watches::open(&target, protocol, n, open_limit));
    let open = rss();
    let cpu_open = cpu();
    for _ in 0..events {
        let delivery = rt.block_on(watches.deliver(&mut writer, side.opened));
        side.missed += side.opened.saturating_sub(delivery.len());
        side.slowest
            .push(delivery.iter().copied().max().unwrap_or_default());
        side.latencies.extend(delivery);
    }
    side.rss = [idle, open, rss()];
    side.cpu = [spent(&cpu_idle, &cpu_open), spent(&cpu_open, &cpu())];
    rt.block_on(watches.close());
    drop(writer);
    side
}

/// The stand-in's bearer token in B4.
const UPSTREAM_TOKEN: &str = "bench-stand-in-token";

/// The stand-in (`kube-stand-in`) in a process of its own.
struct Upstream {
    process: Process,
    addr: SocketAddr,
    ca_pem: String,
    kubeconfig: PathBuf,
    dir: TempDir,
    _stdout: ChildStdout,
}

impl Upstream {
    fn start() -> Upstream {
        let dir = TempDir::new("bench-stand-in");
        let kubeconfig = dir.path().join("kubeconfig");
        let mut command = Command::new(bin_path("kube-stand-in"));
        command
            .args(["--listen", "127.0.0.1:0", "--token", UPSTREAM_TOKEN])
            .arg("--kubeconfig-out")
            .arg(&kubeconfig);
        let (process, stdout) = Process::spawn(command, dir.path().join("stand-in.log"));
        let mut stdout = std::io::BufReader::new(stdout);
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let addr = line
            .trim()
            .strip_prefix("listening on https://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("kube-stand-in said {line:?}\n{}", process.log()));
        // The kubeconfig holds the CA inline; it is written before the address is printed.
        let config = std::fs::read_to_string(&kubeconfig).expect("the stand-in's kubeconfig");
        let ca_pem = config
            .lines()
            .find_map(|l| l.trim().strip_prefix("certificate-authority-data:"))
            .and_then(|b64| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .ok()
            })
            .and_then(|pem| String::from_utf8(pem).ok())
            .expect("the stand-in's CA in its kubeconfig");
        Upstream {
            process,
            addr,
            ca_pem,
            kubeconfig,
            dir,
            _stdout: stdout.into_inner(),
        }
    }

    /// Its open file descriptors (one per connection).
    fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.process.pid())).map_or(0, |d| d.count())
    }

    /// Waits (at most [`DRAIN_LIMIT`]) until the stand-in holds no more descriptors than
    /// `files`: a round's tunnel half starts only once it has let go of the direct half's
    /// connections.
    fn wait_released(&self, files: usize) {
        let deadline = Instant::now() + DRAIN_LIMIT;
        while self.open_files() > files && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a tower-agent process serving this stand-in as `cluster`, as the e2e harness
    /// does, and waits until `server` shows it connected.
    fn agent(&self, server: &Server, cluster: &str) -> Agent {
        let token = Server::minter().agent_token(cluster, None);
        let mut command = Command::new(bin_path("tower-agent"));
        command
            .args(["--name", cluster, "--token", &token])
            .arg("--proxy-server")
            .arg(format!("https://{}", server.tunnel))
            .arg("--ca-file")
            .arg(&server.ca_file)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--jwt-secret-file")
            .arg(&server.secret_file)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env("TOWER_LOG", crate::TOWER_LOG);
        let log = self.dir.path().join(format!("agent-{cluster}.log"));
        let (process, stdout) = Process::spawn(command, log);
        tower_e2e::wait_for_with(
            &format!("cluster {cluster} to connect"),
            Duration::from_secs(20),
            || server.connected(cluster).then_some(()),
            || process.log(),
        );
        Agent {
            process,
            _stdout: stdout,
        }
    }
}

/// A tower-agent process (killed on drop) and its stdout.
struct Agent {
    process: Process,
    _stdout: ChildStdout,
}

/// Open watches: one task per watch drives its own connection and reports each event.
struct Watches {
    /// The watches, then the HTTP/2 connections' tasks (if any).
    tasks: Vec<JoinHandle<()>>,
    events: mpsc::UnboundedReceiver<(u64, Instant)>,
}

/// How one watch reaches its target.
enum Link {
    /// A connection of its own.
    Http1(Target),
    /// A stream on a shared connection.
    Http2(Target, http2::SendRequest<Empty<Bytes>>),
}

impl Watches {
    /// Opens `n` watches, [`OPENING_AT_ONCE`] at a time; gives up waiting after `limit`.
    /// Over HTTP/2 the connections are dialed first, as part of the time to open all.
    async fn open(
        target: &Target,
        protocol: Protocol,
        n: usize,
        limit: Duration,
    ) -> (Watches, Side) {
        let (opened_tx, mut opened_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let permits = Arc::new(Semaphore::new(OPENING_AT_ONCE));
        let started = Instant::now();
        let mut connections = Vec::new();
        let mut senders = Vec::new();
        if protocol == Protocol::Http2 {
            for _ in 0..n.div_ceil(WATCHES_PER_HTTP2_CONNECTION) {
                match target.handshake_http2().await {
                    Ok((sender, connection)) => {
                        senders.push(sender);
                        connections.push(tokio::spawn(async move {
                            let _ = connection.await;
                        }));
                    }
                    Err(e) => panic!("B4: an HTTP/2 connection: {e}"),
                }
            }
        }
        let mut tasks: Vec<JoinHandle<()>> = (0..n)
            .map(|i| {
                let link = match protocol {
                    Protocol::Http1 => Link::Http1(target.clone()),
                    Protocol::Http2 => Link::Http2(
                        target.clone(),
                        senders[i / WATCHES_PER_HTTP2_CONNECTION].clone(),
                    ),
                };
                tokio::spawn(watch(
                    link,
                    permits.clone(),
                    opened_tx.clone(),
                    events_tx.clone(),
                ))
            })
            .collect();
        tasks.extend(connections);
        drop(opened_tx);
        let mut side = Side::default();
        let deadline = tokio::time::Instant::from_std(started + limit);
        let mut last = started;
        while side.opened + side.failed < n {
            match tokio::time::timeout_at(deadline, opened_rx.recv()).await {
                Ok(Some(Ok(at))) => {
                    side.opened += 1;
                    last = last.max(at);
                }
                Ok(Some(Err(e))) => {
                    side.failed += 1;
                    side.first_error.get_or_insert(e);
                }
                Ok(None) => break,
                Err(_) => {
                    side.first_error
                        .get_or_insert(format!("not all open within {limit:?}"));
                    break;
                }
            }
        }
        side.open_time = last - started;
        (Watches { tasks, events }, side)
    }

    /// Creates one configmap through `writer`; returns each watcher's delay in seeing it,
    /// from just before the create was sent, waiting for `expected` of them at most
    /// [`DELIVERY_LIMIT`] (missing watchers are left out).
    async fn deliver(&mut self, writer: &mut Writer, expected: usize) -> Vec<Duration> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        if let Err(e) = writer.create_configmap(id).await {
            println!("tower-bench: B4: creating event {id}: {e}");
            return Vec::new();
        }
        let deadline = tokio::time::Instant::from_std(sent + DELIVERY_LIMIT);
        let mut seen = Vec::with_capacity(expected);
        while seen.len() < expected {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some((event, at))) if event == id => seen.push(at - sent),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        seen
    }

    /// Closes every watch (aborting a task drops its connection).
    async fn close(self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// One watch: connects, reports when the response head arrives (or why it did not), then
/// reports the id of every bench event it sees, with the time it saw it.
async fn watch(
    link: Link,
    permits: Arc<Semaphore>,
    opened: mpsc::UnboundedSender<Result<Instant, String>>,
    events: mpsc::UnboundedSender<(u64, Instant)>,
) {
    let permit = permits.acquire_owned().await;
    // Over HTTP/1.1 this task drives its own connection (aborting it closes it); over
    // HTTP/2 the shared connection has a task of its own.
    let (response, conn) = match link {
        Link::Http1(target) => {
            let (mut sender, conn) = match target.handshake::<Empty<Bytes>>().await {
                Ok(pair) => pair,
                Err(e) => {
                    let _ = opened.send(Err(e));
                    return;
                }
            };
            let mut conn = Box::pin(conn);
            let response = tokio::select! {
                response = sender.send_request(target.get(&target.path)) => response,
                _ = &mut conn => {
                    let _ = opened.send(Err("connection closed before the response".into()));
                    return;
                }
            };
            (response, Some(conn))
        }
        Link::Http2(target, mut sender) => {
            let request = target.get(&target.path);
            (sender.send_request(request).await, None)
        }
    };
    let mut conn = std::pin::pin!(async move {
        match conn {
            Some(conn) => {
                let _ = conn.await;
            }
            None => std::future::pending().await,
        }
    });
    let response = match response {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let _ = opened.send(Err(format!("status {}", r.status())));
            return;
        }
        Err(e) => {
            let _ = opened.send(Err(format!("request: {e}")));
            return;
        }
    };
    let _ = opened.send(Ok(Instant::now()));
    drop(permit);
    let mut body = response.into_body();
    let mut line = Vec::new();
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = &mut conn => break,
        };
        let Some(Ok(frame)) = frame else { break };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        for piece in data.split_inclusive(|b| *b == b'\n') {
            line.extend_from_slice(piece);
            if line.ends_with(b"\n") {
                if let Some(id) = event_id(&line) {
                    let _ = events.send((id, now));
                }
                line.clear();
            }
        }
    }
}

/// The number after [`EVENT_PREFIX`] in a watch event line.
fn event_id(line: &[u8]) -> Option<u64> {
    let at = line
        .windows(EVENT_PREFIX.len())
        .position(|w| w == EVENT_PREFIX)?;
    let digits: Vec<u8> = line[at + EVENT_PREFIX.len()..]
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// A kept-alive connection to the stand-in that creates the events (so the timed create
/// pays for no handshake).
struct Writer {
    sender: SendRequest<Full<Bytes>>,
    token: String,
    conn: JoinHandle<()>,
}

impl Writer {
    async fn connect(target: &Target) -> Result<Writer, String> {
        let (sender, conn) = target.handshake().await?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Writer {
            sender,
            token: target.token.clone(),
            conn,
        })
    }

    async fn send(&mut self, method: &str, path: &str, body: Bytes) -> Result<Bytes, String> {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection: {e}"))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{method} {path}: body: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "{method} {path}: {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        Ok(body)
    }

    /// The resourceVersion of the `default` configmaps list (a watch from it replays
    /// nothing).
    async fn resource_version(&mut self) -> Result<String, String> {
        let body = self
            .send(
                "GET",
                "/api/v1/namespaces/default/configmaps?limit=1",
                Bytes::new(),
            )
            .await?;
        let list: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        list["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| "the list has no resourceVersion".into())
    }

    async fn create_configmap(&mut self, id: u64) -> Result<(), String> {
        let name = format!("{}{id}", String::from_utf8_lossy(EVENT_PREFIX));
        let object = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "default"},
            "data": {"bench": "b4"},
        });
        self.send(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            Bytes::from(object.to_string()),
        )
        .await
        .map(drop)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::event_id;

    #[test]
    fn finds_the_event_number_in_a_line() {
        let line = br#"{"type":"ADDED","object":{"metadata":{"name":"bench-event-42","namespace":"default"}}}"#;
        assert_eq!(event_id(line), Some(42));
        assert_eq!(event_id(br#"{"type":"ADDED","object":{}}"#), None);
    }
}
