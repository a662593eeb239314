//! One tunnel: the session, its control stream (keepalive, drain, replica counts), and
//! the HTTP/1.1 and HTTP/2 streams the server opens, each served by [`proxy_service`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt as _;
use http::{Request, Response, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;
use tower_proto::{ControlMessage, StreamKind};
use tower_tunnel::control::{self, Keepalive};
use tower_tunnel::dial;
use tower_tunnel::requests::OpenRequests;
use tower_tunnel::session::{self, Role};
use tower_tunnel::woken::{WokenOnly, woken_only};
use tower_tunnel::{SessionConfig, TunnelStream};

use crate::backoff::Ended;
use crate::request::{Body, handle_request};
use crate::{Config, pace};

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
pub(crate) async fn hold_tunnel(
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
            tracing::info!(server_id = dialed_server_id.as_str(), grace = ?config.shutdown_grace, "shutting down: draining the tunnel");
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
                        ControlMessage::Token { token } => {
                            match config.renewed_token.offer(&config.dial.cluster, token) {
                                Ok(exp) => tracing::info!(
                                    valid_until = exp,
                                    "the server renewed this agent's token: dialing with the new one from now on"
                                ),
                                Err(e) => {
                                    tracing::warn!(error = %tower_telemetry::Escaped(&e), "refused a renewed token")
                                }
                            }
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
            match result {
                // This agent is stopping and closed the tunnel itself: nothing failed.
                Err(e) if shutdown.is_cancelled() => {
                    tracing::debug!(error = %e, "control stream closed on shutdown");
                }
                Err(e) => tracing::warn!(error = %e, "control stream failed: closing the tunnel"),
                Ok(()) => {}
            }
            session.close();
        }
        StreamKind::Http => {
            let _in_flight = requests.token();
            // Responses are read from the upstream as fast as the stream takes them, not
            // as fast as hyper would buffer them.
            let (stream, pace) = pace::PacedIo::new(stream);
            // Each request also counts among the session's exchanges, which the tunnel's
            // flushes go by.
            let requests = Arc::new(OpenRequests::counting(session.exchanges()));
            let service = proxy_service(
                config,
                preamble.target,
                shutdown.clone(),
                Some((pace, requests.clone())),
            );
            let served = serve_http1(stream, service, &requests, &shutdown, STREAM_IDLE_TIMEOUT);
            if let Err(e) = served.await {
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

/// Serves HTTP/1.1 (with upgrades) on `io` until the server closes it, or `shutdown`
/// (the request in progress, if any, finishes first), or no request of `requests` (which
/// `service` counts) was open for `idle`: no timer for hyper, whose header read timeout
/// would arm one per request.
async fn serve_http1<I, S>(
    io: I,
    service: S,
    requests: &OpenRequests,
    shutdown: &CancellationToken,
    idle: Duration,
) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Body>,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::select! {
        result = until_done(connection, shutdown, |c| c.graceful_shutdown()) => result,
        _ = requests.idle(idle, idle) => {
            tracing::debug!(timeout = ?idle, "tunnel stream without a request: closed");
            Ok(())
        }
    }
}

pin_project_lite::pin_project! {
    /// What [`until_done`] returns.
    struct UntilDone<'a, C, G> {
        #[pin]
        connection: C,
        // Polled with every turn of the connection's task: through only when it fires.
        #[pin]
        shutdown: WokenOnly<WaitForCancellationFuture<'a>>,
        graceful_shutdown: Option<G>,
    }
}

/// Runs `connection` to its end; when `shutdown` comes first, asks it to finish
/// gracefully (`graceful_shutdown`) and waits for that.
///
/// A future of its own rather than an `async fn`, which would hold `connection` (a hyper
/// connection, 1-2 KiB) twice in every tunnel stream's task: as captured, and as the
/// pinned local it is moved into.
fn until_done<C, G>(
    connection: C,
    shutdown: &CancellationToken,
    graceful_shutdown: G,
) -> UntilDone<'_, C, G>
where
    C: Future,
    G: FnOnce(Pin<&mut C>),
{
    UntilDone {
        connection,
        shutdown: woken_only(shutdown.cancelled()),
        graceful_shutdown: Some(graceful_shutdown),
    }
}

impl<C, G> Future for UntilDone<'_, C, G>
where
    C: Future,
    G: FnOnce(Pin<&mut C>),
{
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<C::Output> {
        let mut this = self.project();
        if this.graceful_shutdown.is_some()
            && this.shutdown.poll(cx).is_ready()
            && let Some(graceful_shutdown) = this.graceful_shutdown.take()
        {
            graceful_shutdown(this.connection.as_mut());
        }
        this.connection.poll(cx)
    }
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// Most of a response an HTTP/2 stream buffers past what the server's window takes.
const HTTP2_SEND_BUFFER: usize = 16 * 1024;

/// How long an HTTP/1.1 tunnel stream may go without a request, from its opening or its
/// last response's end: past the server's pool, which closes a stream idle for 90 s.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Serves the requests of one tunnel stream toward `target`; with `stream` (an HTTP/1.1
/// stream's pace and open requests), each response body is read no faster than the
/// stream takes it ([`pace`]) and counts its request open until it is gone.
fn proxy_service(
    config: Arc<Config>,
    target: String,
    ending: CancellationToken,
    stream: Option<(Arc<pace::Pace>, Arc<OpenRequests>)>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = ResponseFuture,
> + Clone {
    // Shared: every request on the stream takes a reference count, not a copy.
    let target: Arc<str> = target.into();
    service_fn(move |req: Request<Incoming>| {
        let ending = ending.clone();
        let watch = tower_proto::request_info::is_watch(req.method(), req.uri());
        let paced = stream
            .as_ref()
            .map(|(pace, requests)| (pace.clone(), requests.start()));
        // Made here, taking the request, and finished by a closure (`map`): an async block
        // that took the request to call this, or that awaited it, would hold the request
        // or the whole future once more in every request's (the future is boxed and
        // copied per request).
        let handled = handle_request(config.clone(), target.clone(), req);
        // Boxed: checking and sending a request (dialing the upstream, perhaps) is a
        // large future, and unboxed it would sit in the task of every HTTP/2 stream for
        // as long as its response runs: 9.3 KiB per watch (heaptrack), for hours.
        Box::pin(handled.map(move |mut response| {
            if let Some((pace, open)) = paced {
                response =
                    response.map(|body| pace::PacedBody::new(body, pace).holding(open).boxed());
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
        })) as ResponseFuture
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A stream the server leaves without a request is closed `idle` after its last
    /// response ended (or after it opened), never while a request is open.
    #[tokio::test(start_paused = true)]
    async fn an_http1_stream_without_requests_is_closed_after_the_idle_timeout() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let idle = Duration::from_secs(300);
        let requests = Arc::new(OpenRequests::default());
        let counted = requests.clone();
        // Each response is held open for 400 s (longer than `idle`) by its body, which
        // holds its request's count, as the agent's responses do.
        let service = service_fn(move |_req: Request<Incoming>| {
            let open = counted.start();
            async move {
                let body = futures::stream::once(async move {
                    tokio::time::sleep(Duration::from_secs(400)).await;
                    drop(open);
                    Ok::<_, Infallible>(hyper::body::Frame::data(bytes::Bytes::from("done")))
                });
                let body = http_body_util::StreamBody::new(body).map_err(|never| match never {});
                Ok::<_, Infallible>(Response::new(body.boxed()))
            }
        });
        let (mut client, io) = tokio::io::duplex(64 * 1024);
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let served = tokio::spawn({
            let requests = requests.clone();
            async move { serve_http1(io, service, &requests, &shutdown, idle).await }
        });
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // The response (chunked: "done") comes after 400 s, past `idle`, whole.
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while !answer.ends_with(b"0\r\n\r\n") {
            let n = client.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed mid-response: {:?}",
                String::from_utf8_lossy(&answer)
            );
            answer.extend_from_slice(&buf[..n]);
        }
        let ended = tokio::time::Instant::now();
        assert_eq!(ended - started, Duration::from_secs(400));
        assert!(String::from_utf8_lossy(&answer).contains("done"));
        // Then nothing: closed `idle` after the response ended.
        tokio::time::timeout(idle * 2, served)
            .await
            .expect("the idle stream to be closed")
            .unwrap()
            .unwrap();
        assert_eq!(ended.elapsed(), idle);
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
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
}
