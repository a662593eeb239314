//! `tower-agent`: the member side of Tower.
//!
//! The agent dials *out* to tower-server ([`tower_tunnel::dial`]), holds the tunnel, and
//! serves each stream the server opens: a control stream (keepalive, drain), an HTTP/1.1
//! stream for one of its targets, or an HTTP/2 stream that carries many requests (the
//! server's watches) for one of its targets. For the `kubernetes` target it verifies the
//! caller's JWT with its own copy of the jwtSecret, refuses requests that ask to
//! impersonate someone else (`kubectl --as`, `Impersonate-*` headers), removes the
//! caller's `Authorization`, and calls its kube-apiserver with its own credentials plus
//! `Impersonate-User`/`Impersonate-Group`, so member RBAC applies to the real user.
//! Other targets exist only when configured ([`Config::targets`]); anything else is
//! refused. The agent never opens streams toward the host.
//!
//! Key types: [`Config`], [`upstream::Upstream`]; entry point [`run`].

#![forbid(unsafe_code)]

pub mod cli;
mod http2;
pub mod metrics;
mod pace;
pub mod upstream;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_auth::Verifier;
use tower_proto::handshake::Refusal;
use tower_proto::{ControlMessage, StreamKind};
use tower_tunnel::control::{self, Keepalive};
use tower_tunnel::dial::{self, DialConfig};
use tower_tunnel::http::{failure, strip_hop_by_hop};
use tower_tunnel::session::{self, Role};
use tower_tunnel::{SessionConfig, TunnelStream};

use crate::upstream::{Credentials, TokenFile, Upstream};

type Body = BoxBody<Bytes, hyper::Error>;

/// Reconnect backoff: exponential with full jitter, capped, reset after a healthy tunnel.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First delay's upper bound.
    pub base: Duration,
    /// Largest delay.
    pub max: Duration,
    /// A tunnel up this long resets the backoff.
    pub healthy_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            // Small first steps: a restarted server is usually back within a second.
            base: Duration::from_millis(100),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The largest delay before attempt `attempt` (0-based): `min(max, base·2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.base
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max)
    }

    /// The delay before attempt `attempt` (0-based): uniform in `[0, ceiling(attempt)]`
    /// ("full jitter", so agents cut off together do not come back together).
    pub fn delay(&self, attempt: u32) -> Duration {
        self.ceiling(attempt).mul_f64(rand::random::<f64>())
    }
}

/// The reconnect bookkeeping of [`run`], apart from its I/O: which backoff step the next
/// dial waits for.
#[derive(Debug, Default)]
struct Reconnects {
    /// Failures (failed dials, tunnels that died young) since the last healthy tunnel.
    failures: u32,
}

impl Reconnects {
    /// A dial failed: the backoff step to wait before the next one.
    fn dial_failed(&mut self) -> u32 {
        let step = self.failures;
        self.failures = self.failures.saturating_add(1);
        step
    }

    /// A tunnel ended after `lasted`: the backoff step to wait before dialing again, or
    /// `None` to dial at once (a healthy tunnel the server drained: another replica
    /// answers). A tunnel that stayed up for `healthy_after` first resets the count; one
    /// drained younger counts as a failure, so a server that drains every tunnel it takes
    /// is not redialed in a hot loop.
    fn tunnel_ended(
        &mut self,
        ended: &Ended,
        lasted: Duration,
        healthy_after: Duration,
    ) -> Option<u32> {
        let healthy = lasted >= healthy_after;
        if healthy {
            self.failures = 0;
        }
        match ended {
            Ended::Drained if healthy => None,
            Ended::Drained | Ended::Closed => Some(self.dial_failed()),
        }
    }
}

/// Everything `run` needs, validated.
pub struct Config {
    /// How to reach the server.
    pub dial: DialConfig,
    /// Where `dial.token` came from, if a file: read again before each dial.
    pub token_file: Option<TokenFile>,
    /// Checks callers' JWTs.
    pub verifier: Verifier,
    /// The targets this agent serves; always holds `kubernetes`.
    pub targets: HashMap<String, Upstream>,
    /// Keepalive on the tunnel (the server's wish wins when it asks for more often).
    pub keepalive: Keepalive,
    /// Reconnect policy.
    pub backoff: Backoff,
    /// On shutdown, how long requests in flight get to finish (watches end at once,
    /// cleanly).
    pub shutdown_grace: Duration,
    /// What `/metrics` on the admin listener shows.
    pub metrics: Arc<metrics::Metrics>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("server", &format!("{}:{}", self.dial.host, self.dial.port))
            .field("cluster", &self.dial.cluster)
            .field("targets", &self.targets.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Serving the admin listener failed.
    #[error("admin listener: {0}")]
    Admin(std::io::Error),
}

/// Runs the agent until `shutdown`: keeps a tunnel up, and serves `/healthz` and
/// `/readyz` (ready = at least one tunnel up, i.e. with its control stream open) on
/// `admin`. Holds one tunnel per server
/// replica behind the published address.
pub async fn run(
    config: Config,
    admin: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let up = Arc::new(AtomicUsize::new(0));
    if let Some(listener) = admin {
        let metrics = config.metrics.clone();
        tokio::spawn(serve_admin(listener, up.clone(), metrics, shutdown.clone()));
    }
    let config = Arc::new(config);
    let server = format!("{}:{}", config.dial.host, config.dial.port);
    // One tunnel per server replica behind the one published address: the 101 names the
    // replica and how many there are; dial until every one holds a tunnel.
    let mut held: HashSet<String> = HashSet::new();
    // Every tunnel's control stream tells its replica which replicas are held now.
    let (held_tx, _) = watch::channel(Vec::<String>::new());
    let publish_held = |held: &HashSet<String>| {
        let mut ids: Vec<String> = held.iter().cloned().collect();
        ids.sort();
        held_tx.send_replace(ids);
    };
    let mut replicas: usize = 1;
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(String, Ended, Duration)>();
    let tunnels = TaskTracker::new();
    let (count_tx, mut count_rx) = mpsc::unbounded_channel::<usize>();
    let mut reconnects = Reconnects::default();
    let mut dial_config = config.dial.clone();
    let mut duplicates: u32 = 0;
    let mut delay = Duration::ZERO;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(count) = count_rx.recv() => {
                if count != replicas {
                    tracing::info!(replicas = count, tunnels = held.len(), "the server count changed");
                    replicas = count;
                }
                continue;
            }
            Some((server_id, ended, lasted)) = ended_rx.recv() => {
                held.remove(&server_id);
                publish_held(&held);
                delay = reconnects
                    .tunnel_ended(&ended, lasted, config.backoff.healthy_after)
                    .map_or(Duration::ZERO, |step| config.backoff.delay(step));
                tracing::info!(server_id = server_id.as_str(), ?delay, tunnels = held.len(), "tunnel ended; reconnecting");
                continue;
            }
            () = tokio::time::sleep(delay), if held.len() < replicas => {}
        }
        if let Some(file) = &config.token_file {
            dial_config.token = file.token();
        }
        let held_ids: Vec<String> = held.iter().cloned().collect();
        let dialed = tokio::select! {
            dialed = dial::dial(&dial_config, &held_ids) => dialed,
            () = shutdown.cancelled() => break,
        };
        if let Err(e) = &dialed {
            config.metrics.dial_error(e);
        }
        match dialed {
            Ok(dialed) => {
                replicas = usize::from(dialed.hello.server_count.max(1));
                let server_id = dialed.hello.server_id.clone();
                if held.contains(&server_id) {
                    // The load balancer sent us to a replica we already hold: drop this
                    // one and try again soon (jittered, so we do not hammer it).
                    duplicates = duplicates.saturating_add(1);
                    delay = duplicate_delay(&config.backoff, duplicates);
                    tracing::debug!(
                        server_id = server_id.as_str(),
                        "duplicate tunnel to a replica already held: closed"
                    );
                    continue;
                }
                duplicates = 0;
                tracing::info!(%server, server_id = server_id.as_str(), replicas, tunnels = held.len() + 1, "tunnel up");
                held.insert(server_id.clone());
                publish_held(&held);
                delay = Duration::ZERO;
                let (config, shutdown, up, ended_tx, held_rx, count_tx) = (
                    config.clone(),
                    shutdown.clone(),
                    up.clone(),
                    ended_tx.clone(),
                    held_tx.subscribe(),
                    count_tx.clone(),
                );
                tunnels.spawn(async move {
                    let started = Instant::now();
                    let ended = hold_tunnel(dialed, config, shutdown, held_rx, count_tx, &up).await;
                    let _ = ended_tx.send((server_id, ended, started.elapsed()));
                });
            }
            Err(tower_tunnel::TunnelError::Refused {
                status: 409,
                reason,
                refusal: Some(refusal),
            }) if refusal == Refusal::Conflict.as_str() => {
                // Another agent for this cluster holds a live tunnel: the server will not
                // let this one replace it while it answers. Back off as for any failure;
                // once that tunnel is gone (a restart), the next dial gets through.
                // The server's words, as it sent them: a string field, escaped.
                tracing::warn!(%server, reason = reason.as_str(), "another agent holds this cluster's tunnel");
                delay = config.backoff.delay(reconnects.dial_failed());
            }
            Err(tower_tunnel::TunnelError::Refused { status: 409, .. }) => {
                // The load balancer sent us to a replica we already hold, which said so
                // before touching its tunnel: try again soon, jittered.
                duplicates = duplicates.saturating_add(1);
                delay = duplicate_delay(&config.backoff, duplicates);
                continue;
            }
            Err(e) => {
                // The error may quote the server's (or a proxy's) refusal: escaped.
                tracing::warn!(%server, error = %tower_telemetry::Escaped(&e), "dialing tower-server failed");
                delay = config.backoff.delay(reconnects.dial_failed());
            }
        }
    }
    // Every tunnel drains on the same signal: wait for them (each bounds its own wait).
    tunnels.close();
    tunnels.wait().await;
    Ok(())
}

enum Ended {
    Closed,
    Drained,
}

/// The pause before dialing again after landing on a replica already held.
fn duplicate_delay(backoff: &Backoff, duplicates: u32) -> Duration {
    Backoff {
        base: Duration::from_millis(50),
        max: Duration::from_secs(2).min(backoff.max),
        ..*backoff
    }
    .delay(duplicates.min(6))
}

/// Counts one tunnel in `/readyz` while alive.
struct UpGuard(Arc<AtomicUsize>);

impl UpGuard {
    fn new(up: &Arc<AtomicUsize>) -> Self {
        up.fetch_add(1, Ordering::SeqCst);
        UpGuard(up.clone())
    }
}

impl Drop for UpGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long after the 101 the server's control stream may take to arrive: a tunnel
/// without one has no keepalive, so a link that went silent right after the upgrade
/// would otherwise look up for ever. One keepalive round (ping interval plus pong
/// deadline) is what a live tunnel is allowed anyway.
fn control_deadline(keepalive: &Keepalive) -> Duration {
    keepalive.interval + keepalive.timeout
}

/// Serves one tunnel until it closes, the server drains it, or shutdown. The tunnel
/// counts in `up` (readiness) once the server's control stream is open; without one
/// within [`control_deadline`], the tunnel is dropped.
async fn hold_tunnel(
    dialed: dial::Dialed,
    config: Arc<Config>,
    shutdown: CancellationToken,
    held: watch::Receiver<Vec<String>>,
    replicas: mpsc::UnboundedSender<usize>,
    up: &Arc<AtomicUsize>,
) -> Ended {
    let dialed_server_id = dialed.hello.server_id.clone();
    let (handle, mut inbound, driver) =
        session::start(dialed.io, Role::Agent, &SessionConfig::default());
    let driver = tokio::spawn(driver.run());
    let keepalive = config
        .keepalive
        .at_most(Duration::from_millis(dialed.hello.keepalive_ms.max(100)));
    let (drained_tx, mut drained_rx) = mpsc::channel::<()>(1);
    let control_open = CancellationToken::new();
    let streams = TaskTracker::new();
    // Only HTTP streams count for a drain: the control stream lives as long as the tunnel.
    let requests = TaskTracker::new();
    let serving = {
        let handle = handle.clone();
        let config = config.clone();
        let streams = streams.clone();
        let tunnel = TunnelContext {
            session: handle.clone(),
            drained: drained_tx,
            held,
            shutdown: shutdown.clone(),
            requests: requests.clone(),
            replicas,
            control_open: control_open.clone(),
        };
        tokio::spawn(async move {
            while let Some(stream) = inbound.recv().await {
                let config = config.clone();
                let tunnel = tunnel.clone();
                streams.spawn(async move {
                    serve_stream(stream, config, keepalive, tunnel).await;
                });
            }
        })
    };
    let deadline = control_deadline(&keepalive);
    // Ready while the control stream is open; resolves only when it did not open in time.
    let ready = async {
        if tokio::time::timeout(deadline, control_open.cancelled())
            .await
            .is_err()
        {
            return;
        }
        let _up = UpGuard::new(up);
        std::future::pending::<()>().await;
    };
    let ended = tokio::select! {
        () = handle.closed() => Ended::Closed,
        () = ready => {
            tracing::warn!(?deadline, server_id = dialed_server_id.as_str(), "no control stream from the server after the upgrade: dropping the tunnel");
            handle.close();
            Ended::Closed
        }
        Some(()) = drained_rx.recv() => Ended::Drained,
        () = shutdown.cancelled() => {
            // Drain: the server was told (control stream) and routes nothing new here;
            // idle streams close, watches end cleanly, the rest get the grace period.
            requests.close();
            if tokio::time::timeout(config.shutdown_grace, requests.wait()).await.is_err() {
                tracing::warn!(grace = ?config.shutdown_grace, "grace period over: closing requests still in flight");
            }
            handle.close();
            Ended::Closed
        }
    };
    if matches!(ended, Ended::Drained) {
        // Let in-flight streams finish on the old tunnel while we dial a new one; the
        // server closes it when its grace period ends.
        tokio::spawn(async move {
            let _ = driver.await;
            let _ = serving.await;
        });
    } else {
        tower_tunnel::session::finish(driver).await;
        serving.abort();
    }
    ended
}

/// What every stream of one tunnel shares.
#[derive(Clone)]
struct TunnelContext {
    session: tower_tunnel::SessionHandle,
    /// Told when the server drains this tunnel.
    drained: mpsc::Sender<()>,
    /// The replicas held, for `Held` messages.
    held: watch::Receiver<Vec<String>>,
    /// The agent is shutting down: drain.
    shutdown: CancellationToken,
    /// HTTP streams in flight.
    requests: TaskTracker,
    /// Replica counts the server announces.
    replicas: mpsc::UnboundedSender<usize>,
    /// Cancelled when the server's control stream arrives (keepalive runs from then on).
    control_open: CancellationToken,
}

async fn serve_stream(
    mut stream: TunnelStream,
    config: Arc<Config>,
    keepalive: Keepalive,
    tunnel: TunnelContext,
) {
    let TunnelContext {
        session,
        drained,
        mut held,
        shutdown,
        requests,
        replicas,
        control_open,
    } = tunnel;
    let preamble = match tokio::time::timeout(Duration::from_secs(10), stream.read_preamble()).await
    {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "bad stream preamble");
            return;
        }
        Err(_) => {
            tracing::warn!("stream preamble did not arrive in time");
            return;
        }
    };
    match preamble.kind {
        StreamKind::Control => {
            control_open.cancel();
            let (out_tx, out_rx) = mpsc::channel(2);
            let out_tx_drain = out_tx.clone();
            let (events_tx, mut events_rx) = mpsc::channel(8);
            // Tell the replica which replicas hold this cluster, now and on every change.
            let tell_held = async move {
                loop {
                    let server_ids = held.borrow_and_update().clone();
                    if out_tx
                        .send(ControlMessage::Held { server_ids })
                        .await
                        .is_err()
                        || held.changed().await.is_err()
                    {
                        break;
                    }
                }
            };
            let tell_held = tokio::spawn(tell_held);
            // On shutdown, tell the server to stop routing here (it keeps the tunnel
            // until the requests on it are done).
            let grace_ms = config.shutdown_grace.as_millis().min(u128::from(u32::MAX)) as u32;
            let announce_drain = {
                let shutdown = shutdown.clone();
                let out = out_tx_drain;
                tokio::spawn(async move {
                    shutdown.cancelled().await;
                    let _ = out.send(ControlMessage::Drain { grace_ms }).await;
                })
            };
            let watch_events = async {
                while let Some(event) = events_rx.recv().await {
                    match event {
                        ControlMessage::Drain { grace_ms } => {
                            tracing::info!(
                                grace_ms,
                                server_id = preamble.server_id.as_str(),
                                "server is draining this tunnel"
                            );
                            let _ = drained.send(()).await;
                        }
                        ControlMessage::ServerInfo { server_count, .. } => {
                            // The replicas behind the address changed: hold one each.
                            let _ = replicas.send(usize::from(server_count.max(1)));
                        }
                        _ => {}
                    }
                }
            };
            let health = control::LinkHealth::default();
            let (result, ()) = tokio::join!(
                control::run(stream, keepalive, out_rx, events_tx, &health),
                watch_events
            );
            tell_held.abort();
            announce_drain.abort();
            if let Err(e) = result {
                tracing::warn!(error = %e, "control stream failed: closing the tunnel");
            }
            session.close();
        }
        StreamKind::Http => {
            let _in_flight = requests.token();
            // Responses are read from the upstream as fast as the stream takes them, not
            // as fast as hyper would buffer them.
            let (stream, pace) = pace::PacedIo::new(stream);
            let service = proxy_service(config, preamble.target, shutdown.clone(), Some(pace));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(300))
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            // On shutdown: finish the request in progress (if any), then close the stream.
            let result = until_done(connection, &shutdown, |c| c.graceful_shutdown()).await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "tunnel stream ended with an error");
            }
        }
        StreamKind::Http2 => {
            let _in_flight = requests.token();
            let service = proxy_service(config, preamble.target, shutdown.clone(), None);
            let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // What a response may have buffered beyond what the server's window
                // takes (hyper's default is ~400 KiB): a watch nobody reads costs the
                // agent this, and watch events are small.
                .max_send_buf_size(HTTP2_SEND_BUFFER)
                // The server counts these requests against its own limit, which is at
                // most this.
                .max_concurrent_streams(session::AGENT_MAX_REQUESTS as u32)
                .max_header_list_size(tower_proto::preamble::HTTP2_MAX_HEADER_LIST)
                .serve_connection(TokioIo::new(stream), service);
            // On shutdown: no new requests (GOAWAY); watches end cleanly, the rest finish.
            let result = until_done(connection, &shutdown, |c| c.graceful_shutdown()).await;
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP/2 tunnel stream ended with an error");
            }
        }
    }
}

/// Runs `connection` to its end; when `shutdown` comes first, asks it to finish
/// gracefully (`graceful_shutdown`) and waits for that.
async fn until_done<C: Future>(
    connection: C,
    shutdown: &CancellationToken,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
) -> C::Output {
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            graceful_shutdown(connection.as_mut());
            connection.await
        }
    }
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// Most of a response an HTTP/2 stream buffers past what the server's window takes.
const HTTP2_SEND_BUFFER: usize = 16 * 1024;

/// Serves the requests of one tunnel stream toward `target`; with `pace`, each response
/// body is read no faster than the stream takes it ([`pace`]).
fn proxy_service(
    config: Arc<Config>,
    target: String,
    ending: CancellationToken,
    pace: Option<Arc<pace::Pace>>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = ResponseFuture,
> + Clone {
    service_fn(move |req: Request<Incoming>| {
        let config = config.clone();
        let target = target.clone();
        let ending = ending.clone();
        let pace = pace.clone();
        // Boxed: checking and sending a request (dialing the upstream, perhaps) is a
        // large future, and unboxed it would sit in the task of every HTTP/2 stream for
        // as long as its response runs: 9.3 KiB per watch (heaptrack), for hours.
        Box::pin(async move {
            let watch = tower_tunnel::watch_end::is_watch(req.uri());
            let mut response = handle_request(&config, &target, req).await;
            if let Some(pace) = pace {
                response = response.map(|body| pace::PacedBody::new(body, pace).boxed());
            }
            // A watch ends cleanly when the agent drains; clients watch again.
            Ok::<_, Infallible>(if watch {
                let framer = tower_tunnel::watch_end::Framer::for_content_type(
                    response.headers().get(header::CONTENT_TYPE),
                );
                response.map(|body| {
                    tower_tunnel::watch_end::EndOnSignal::new(body, framer, ending).boxed()
                })
            } else {
                response
            })
        }) as ResponseFuture
    })
}

fn reply(response: Response<Full<Bytes>>) -> Response<Body> {
    response.map(|b| b.map_err(|never| match never {}).boxed())
}

/// Checks, rewrites and forwards one request to `target`.
async fn handle_request<B>(config: &Config, target: &str, mut req: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<upstream::BoxError>,
{
    let Some(upstream) = config.targets.get(target) else {
        config.metrics.refused(metrics::Refused::UnknownTarget);
        return reply(failure(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("target {target:?} is not on this agent's allowlist"),
        ));
    };
    let token = tower_auth::bearer(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default(),
    )
    .unwrap_or_default();
    let identity = match config.verifier.verify_user(token) {
        Ok(identity) => identity,
        Err(e) => {
            config.metrics.refused(metrics::Refused::BadToken);
            return reply(failure(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                &format!("tower-agent: {e}"),
            ));
        }
    };
    // On every target: a target without credentials of ours (ks-apiserver) proxies to its
    // own kube-apiserver with a privileged credential, where Impersonate-* would act.
    if req.headers().keys().any(is_impersonation)
        && !(upstream.credentials.is_some() && is_discovery(req.method(), req.uri().path()))
    {
        // kubectl sends --as on its discovery requests too, and shows only "Forbidden:
        // unknown" when one is refused. Discovery reads the same for every user: with
        // our own credentials it is served as the token's user (its Impersonate-*
        // headers are replaced below), and the request that follows is refused here,
        // with the reason.
        config.metrics.refused(metrics::Refused::Impersonation);
        return refuse_impersonation(req.headers(), &identity.user);
    }
    let client_upgrade = req
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // Whatever the tunnel stream spoke; the upstream pools pick their own version.
    parts.version = http::Version::HTTP_11;
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = match upstream.uri_for(&path) {
        Ok(uri) => uri,
        Err(e) => {
            config.metrics.refused(metrics::Refused::BadRequest);
            return reply(failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &e.to_string(),
            ));
        }
    };
    strip_hop_by_hop(&mut parts.headers);
    // The server strips these too; the member is the authority, so it checks again.
    tower_tunnel::http::strip_remote_identity(&mut parts.headers);
    parts.headers.remove(header::HOST);
    if let Some(credentials) = &upstream.credentials {
        // The member is the authority: replace the caller's credentials and any
        // Impersonate-* headers (only a discovery read gets here with some) with our own
        // credentials and the verified identity.
        parts.headers.remove(header::AUTHORIZATION);
        let asked: Vec<_> = parts
            .headers
            .keys()
            .filter(|n| is_impersonation(n))
            .cloned()
            .collect();
        for name in asked {
            parts.headers.remove(name);
        }
        match credentials {
            Credentials::Token(token) => set_bearer(&mut parts.headers, token),
            Credentials::TokenFile(file) => set_bearer(&mut parts.headers, &file.token()),
            Credentials::ClientCertificate | Credentials::None => {}
        }
        match header::HeaderValue::from_str(&identity.user) {
            Ok(user) => {
                parts.headers.insert("impersonate-user", user);
            }
            Err(_) => {
                config.metrics.refused(metrics::Refused::BadRequest);
                return reply(failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the token's user name cannot be sent as a header",
                ));
            }
        }
        for group in &identity.groups {
            if let Ok(group) = header::HeaderValue::from_str(group) {
                parts.headers.append("impersonate-group", group);
            }
        }
    }
    let request = Request::from_parts(parts, body.map_err(Into::into).boxed_unsync());
    let sent = std::time::Instant::now();
    let answer = upstream.send(request).await;
    let code = answer.as_ref().ok().map(|r| r.status().as_u16());
    config.metrics.upstream(target, code, sent.elapsed());
    let mut response = match answer {
        Ok(response) => response,
        Err(e) => {
            tracing::warn!(%target, error = %e, "upstream request failed");
            return reply(failure(
                StatusCode::BAD_GATEWAY,
                "InternalError",
                &format!("tower-agent could not reach its {target} upstream: {e}"),
            ));
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            // The server bounds how long it may sit idle; its end closes this one.
            tokio::spawn(tower_tunnel::http::join_upgrades(
                client_upgrade,
                upstream_upgrade,
                || {},
            ));
        }
    } else {
        strip_hop_by_hop(response.headers_mut());
    }
    response
}

/// Whether `name` is one of kube-apiserver's impersonation headers (`Impersonate-User`,
/// `-Group`, `-Uid`, `-Extra-*`).
fn is_impersonation(name: &http::HeaderName) -> bool {
    name.as_str().starts_with("impersonate-")
}

/// A 403 for a request that asks to impersonate someone (`kubectl --as`, `--as-group`,
/// `--as-uid`: `Impersonate-User`, `-Group`, `-Uid`, `-Extra-*`, or any other
/// `Impersonate-*` header). Tower impersonates the token's own user; silently dropping
/// the caller's wish would run the request as someone the caller did not ask for.
fn refuse_impersonation(headers: &http::HeaderMap, user: &str) -> Response<Body> {
    let asked: Vec<&str> = headers
        .keys()
        .filter(|n| is_impersonation(n))
        .map(http::HeaderName::as_str)
        .collect();
    reply(failure(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &format!(
            "tower-agent: Tower impersonates the user of your token ({user:?}) itself; \
             kubectl --as/--as-group/--as-uid and Impersonate-* headers are not accepted \
             (this request had: {})",
            asked.join(", ")
        ),
    ))
}

/// Whether a request only reads API discovery (`/api`, `/api/v1`, `/apis`,
/// `/apis/GROUP[/VERSION]`, `/version`, `/openapi/v2`, `/openapi/v3[/...]`), which every
/// authenticated user may read and which reads the same for all. Only plain paths
/// qualify: a `.`/`..` segment, an empty one or a %-escape could name something else to
/// a hop that normalises paths.
fn is_discovery(method: &http::Method, path: &str) -> bool {
    if method != http::Method::GET && method != http::Method::HEAD {
        return false;
    }
    let path = path.strip_suffix('/').unwrap_or(path);
    let Some(path) = path.strip_prefix('/') else {
        return false;
    };
    let mut segments = path.split('/');
    if segments
        .clone()
        .any(|s| s.is_empty() || s == "." || s == ".." || s.contains('%'))
    {
        return false;
    }
    match (segments.next(), segments.next(), segments.next()) {
        (Some("api"), None | Some("v1"), None) | (Some("apis" | "version"), None, None) => true,
        (Some("apis"), Some(_), _) => segments.next().is_none(),
        (Some("openapi"), Some("v2"), None) | (Some("openapi"), Some("v3"), _) => true,
        _ => false,
    }
}

fn set_bearer(headers: &mut http::HeaderMap, token: &str) {
    if let Ok(value) = header::HeaderValue::from_str(&format!("Bearer {token}")) {
        headers.insert(header::AUTHORIZATION, value);
    }
}

async fn serve_admin(
    listener: TcpListener,
    up: Arc<AtomicUsize>,
    metrics: Arc<metrics::Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (up, metrics) = (up.clone(), metrics.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let ready = up.load(Ordering::SeqCst) > 0;
                let scraped =
                    (req.uri().path() == "/metrics").then(|| metrics::response(&metrics, &up));
                async move {
                    if let Some(response) = scraped {
                        return Ok::<_, Infallible>(response);
                    }
                    let (code, body) = match req.uri().path() {
                        "/healthz" | "/livez" => (StatusCode::OK, "ok\n"),
                        "/readyz" if ready => (StatusCode::OK, "ok: tunnel up\n"),
                        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "tunnel down\n"),
                        _ => (
                            StatusCode::NOT_FOUND,
                            "endpoints: /healthz /readyz /metrics\n",
                        ),
                    };
                    let mut response =
                        Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    *response.status_mut() = code;
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tower_auth::{Minter, Secret};
    use tower_proto::preamble::KUBERNETES_TARGET;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
            healthy_after: Duration::from_secs(1),
        };
        // The ceiling doubles per attempt from `base` up to `max`, and stays there (no
        // overflow, however many attempts).
        let ms = |attempt| b.ceiling(attempt).as_millis();
        let ceilings: Vec<_> = (0..7).map(ms).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(ms(40), 2000);
        assert_eq!(ms(u32::MAX), 2000);

        // Full jitter: for each attempt, delays spread over all of [0, ceiling] (uniform,
        // so the mean is ceiling/2 and many fall below ceiling/4). A delay that never
        // grows, "equal jitter" (ceiling/2 + jitter) or a missing cap all fail here.
        const SAMPLES: u32 = 2000;
        for attempt in [0, 1, 2, 3, 4, 5, 12, 40] {
            let ceiling = b.ceiling(attempt);
            let samples: Vec<Duration> = (0..SAMPLES).map(|_| b.delay(attempt)).collect();
            let most = samples.iter().max().unwrap();
            let least = samples.iter().min().unwrap();
            let mean = samples.iter().sum::<Duration>() / SAMPLES;
            let low = samples.iter().filter(|d| **d < ceiling / 4).count();
            assert!(
                *most <= ceiling,
                "attempt {attempt}: {most:?} over {ceiling:?}"
            );
            assert!(
                *most >= ceiling.mul_f64(0.95),
                "attempt {attempt}: nothing near the ceiling {ceiling:?} (max {most:?})"
            );
            assert!(
                *least <= ceiling / 20,
                "attempt {attempt}: nothing near zero (min {least:?}): not full jitter"
            );
            assert!(
                (ceiling.mul_f64(0.45)..=ceiling.mul_f64(0.55)).contains(&mean),
                "attempt {attempt}: mean {mean:?} is not about {ceiling:?}/2"
            );
            // Expected 500 of 2000; 350 is over 8 standard deviations away.
            assert!(
                low > 350,
                "attempt {attempt}: only {low} below a quarter of the ceiling"
            );
        }
    }

    #[test]
    fn reconnect_attempts_grow_until_a_tunnel_stays_up_for_the_healthy_period() {
        let healthy = Duration::from_secs(5);
        let mut r = Reconnects::default();
        // Dials failing in a row climb the backoff.
        assert_eq!(
            [r.dial_failed(), r.dial_failed(), r.dial_failed()],
            [0, 1, 2]
        );
        // A tunnel that came up but died young keeps climbing: a flapping link must not
        // reconnect at full speed.
        let young = healthy - Duration::from_millis(1);
        assert_eq!(r.tunnel_ended(&Ended::Closed, young, healthy), Some(3));
        assert_eq!(r.dial_failed(), 4);
        // A drain of a young tunnel climbs too: a server draining every tunnel it takes
        // must not be redialed in a hot loop.
        assert_eq!(r.tunnel_ended(&Ended::Drained, young, healthy), Some(5));
        assert_eq!(r.dial_failed(), 6);
        // A tunnel that stayed up for the healthy period resets the count: the next wait
        // is the first step again, and so is the climb after it.
        assert_eq!(r.tunnel_ended(&Ended::Closed, healthy, healthy), Some(0));
        assert_eq!(r.dial_failed(), 1);
        // A healthy tunnel drained asks for an immediate redial and resets the count.
        assert_eq!(
            r.tunnel_ended(&Ended::Drained, Duration::from_secs(3600), healthy),
            None
        );
        assert_eq!(
            r.dial_failed(),
            0,
            "a drain after a healthy tunnel resets too"
        );
        // No overflow after very many failures.
        let mut r = Reconnects {
            failures: u32::MAX - 1,
        };
        assert_eq!(r.dial_failed(), u32::MAX - 1);
        assert_eq!(r.dial_failed(), u32::MAX);
        assert_eq!(r.dial_failed(), u32::MAX);
    }

    #[test]
    fn discovery_paths_are_told_apart_from_resources() {
        let get = http::Method::GET;
        for path in [
            "/api",
            "/api/",
            "/api/v1",
            "/apis",
            "/apis/apps",
            "/apis/apps/v1",
            "/version",
            "/openapi/v2",
            "/openapi/v3/apis/apps/v1",
        ] {
            assert!(is_discovery(&get, path), "{path}");
        }
        for path in [
            "/",
            "/api/v1/pods",
            "/api/v1/namespaces/default/pods",
            "/apis/apps/v1/deployments",
            "/apis/apps/v1/namespaces/default/deployments/web",
            "/apis//v1",
            "/healthz",
            "/apiss",
            "//api",
            "/api//",
            "/openapi",
            "/openapi/v4",
            // Names that a hop normalising paths would read as resources.
            "/openapi/../api/v1/namespaces/default/secrets",
            "/openapi/v3/../../api/v1/secrets",
            "/openapi/%2e%2e/api/v1/secrets",
            "/apis/../api",
            "/apis/apps/..",
            "/apis/apps/./v1",
            "/api/%76%31",
        ] {
            assert!(!is_discovery(&get, path), "{path}");
        }
        assert!(!is_discovery(&http::Method::POST, "/api"));
    }

    #[test]
    fn the_control_stream_deadline_is_one_keepalive_round() {
        assert_eq!(
            control_deadline(&Keepalive::new(Duration::from_secs(10))),
            Duration::from_secs(20)
        );
        // The pong deadline is at least 2 s, so short intervals still allow for a slow link.
        assert_eq!(
            control_deadline(&Keepalive::new(Duration::from_secs(1))),
            Duration::from_secs(3)
        );
    }

    /// An upstream that records the headers of every request it gets.
    async fn recording_upstream() -> (String, mpsc::UnboundedReceiver<http::HeaderMap>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let _ = tx.send(req.headers().clone());
                        async {
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (format!("http://{addr}"), rx)
    }

    fn config(upstream: &str, secret: &Secret) -> Config {
        let mut kube = kube::Config::new(upstream.parse().unwrap());
        kube.auth_info.token = Some("member-sa-token".to_string().into());
        let mut targets = HashMap::new();
        targets.insert(
            KUBERNETES_TARGET.to_owned(),
            Upstream::kubernetes(&kube, None, upstream::DEFAULT_STREAMS_PER_CONNECTION).unwrap(),
        );
        Config {
            dial: DialConfig {
                host: "unused".into(),
                port: 1,
                tls: None,
                proxy: None,
                token: String::new(),
                cluster: "c1".into(),
                agent_version: "test".into(),
                targets: vec![KUBERNETES_TARGET.into()],
                timeout: Duration::from_secs(1),
            },
            token_file: None,
            metrics: Default::default(),
            verifier: Verifier::new(secret),
            targets,
            keepalive: Keepalive::default(),
            backoff: Backoff::default(),
            shutdown_grace: Duration::from_secs(1),
        }
    }

    fn request(token: &str, extra: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut builder = Request::get("/api/v1/pods")
            .header("host", "tower-frontend:9443")
            .header("authorization", format!("Bearer {token}"));
        for (k, v) in extra {
            builder = builder.header(*k, *v);
        }
        builder.body(Full::new(Bytes::new())).unwrap()
    }

    #[tokio::test]
    async fn the_agent_verifies_again_and_impersonates_only_the_token_identity() {
        let secret = Secret::new("member-secret").unwrap();
        let (url, mut seen) = recording_upstream().await;
        let config = config(&url, &secret);
        let alice = Minter::new(&secret).user_token("alice", &["devs".into()], None);

        // `kubectl --as root --as-group system:masters`, `--as-uid`, and extras: each is
        // refused with a Status that says why, and never reaches the upstream.
        for asked in [
            &[
                ("impersonate-user", "root"),
                ("impersonate-group", "system:masters"),
            ][..],
            &[("impersonate-group", "system:masters")][..],
            &[("impersonate-uid", "0")][..],
            &[("impersonate-extra-scopes", "x")][..],
            &[("Impersonate-User", "alice")][..],
        ] {
            let response = handle_request(&config, KUBERNETES_TARGET, request(&alice, asked)).await;
            assert_eq!(response.status(), 403, "{asked:?}");
            assert_eq!(response.headers()["content-type"], "application/json");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let status: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(status["kind"], "Status");
            assert_eq!(status["reason"], "Forbidden");
            assert_eq!(status["code"], 403);
            let message = status["message"].as_str().unwrap();
            assert!(
                message.contains("Tower impersonates the user of your token (\"alice\")")
                    && message.contains("--as")
                    && message.contains("Impersonate-* headers are not accepted")
                    && message.contains(&asked[0].0.to_ascii_lowercase()),
                "{message}"
            );
        }
        assert!(
            seen.try_recv().is_err(),
            "refused requests never reach the upstream"
        );

        // Without such headers: the agent's own credentials and the token's identity.
        // Front-proxy identity headers never reach the member.
        let forged = [
            ("x-remote-user", "root"),
            ("x-remote-group", "system:masters"),
        ];
        let response = handle_request(&config, KUBERNETES_TARGET, request(&alice, &forged)).await;
        assert_eq!(response.status(), 200);
        let headers = seen.recv().await.unwrap();
        assert!(headers.get("x-remote-user").is_none() && headers.get("x-remote-group").is_none());
        assert_eq!(headers["authorization"], "Bearer member-sa-token");
        assert_eq!(headers["impersonate-user"], "alice");
        let groups: Vec<_> = headers.get_all("impersonate-group").iter().collect();
        assert_eq!(groups, ["devs"]);
        assert!(headers.get("impersonate-uid").is_none());
        assert_ne!(headers["host"], "tower-frontend:9443");

        // Discovery (which kubectl sends with --as too, and whose refusal it would show
        // only as "unknown") is served as the token's user.
        // Nothing the caller asked for survives: not a group, a uid or an extra either.
        let mut discovery = request(
            &alice,
            &[
                ("impersonate-user", "root"),
                ("impersonate-group", "system:masters"),
                ("impersonate-uid", "0"),
                ("impersonate-extra-scopes", "x"),
            ],
        );
        *discovery.uri_mut() = "/apis/apps/v1".parse().unwrap();
        let response = handle_request(&config, KUBERNETES_TARGET, discovery).await;
        assert_eq!(response.status(), 200);
        let headers = seen.recv().await.unwrap();
        assert_eq!(headers["impersonate-user"], "alice");
        assert_eq!(headers.get_all("impersonate-user").iter().count(), 1);
        let groups: Vec<_> = headers.get_all("impersonate-group").iter().collect();
        assert_eq!(groups, ["devs"]);
        assert!(headers.get("impersonate-uid").is_none());
        assert!(headers.get("impersonate-extra-scopes").is_none());

        // A token the host accepted but this member's secret did not sign.
        let host_only =
            Minter::new(&Secret::new("host-secret").unwrap()).user_token("alice", &[], None);
        let refused = handle_request(
            &config,
            KUBERNETES_TARGET,
            request(&host_only, &[("impersonate-user", "root")]),
        )
        .await;
        assert_eq!(refused.status(), 401, "the token is checked first");
        let body = refused.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains("tower-agent: token signature does not match")
        );

        let elsewhere = handle_request(&config, "dashboard", request(&alice, &[])).await;
        assert_eq!(elsewhere.status(), 403);
        assert!(
            seen.try_recv().is_err(),
            "refused requests never reach the upstream"
        );
    }
}
