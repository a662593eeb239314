//! The listeners: binding them with a deep accept queue ([`listen`]), and serving each
//! one's connections ([`serve`]): admission, TLS, HTTP/1.1 or HTTP/2 by ALPN, the timers
//! that close idle and stalled connections, and draining on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_tunnel::read_ahead::ReadAhead;
use tower_tunnel::requests::OpenRequests;
use tower_tunnel::woken::woken_only;

use crate::Limits;
use crate::connections::{Admission, Peer};
use crate::linger::Lingering;
use crate::metrics;
use crate::status::Body;

/// Connections the kernel completes and queues for a listener before it drops SYNs.
///
/// The default (128, as std and mio use) is too small for the tunnel listener: after a
/// server restart every agent of a fleet dials within the first backoff step, and a SYN
/// dropped from a full queue is retried only after 1 s. The kernel caps this at
/// `net.core.somaxconn` (4096 by default since Linux 5.4).
pub const ACCEPT_BACKLOG: u32 = 4096;

/// Binds a listener on `addr` with [`ACCEPT_BACKLOG`].
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// The three listeners, bound by the caller (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    /// Agents dial this.
    pub tunnel: TcpListener,
    /// Callers reach clusters here.
    pub frontend: TcpListener,
    /// Health, metrics, cluster table.
    pub admin: TcpListener,
}

/// The connections of a listener, and the signal that asks them to finish.
#[derive(Clone, Default)]
pub(crate) struct Connections {
    pub(crate) tracker: TaskTracker,
    pub(crate) finish: CancellationToken,
}

/// Requests open at once on one HTTP/2 connection from a caller. Go's clients (kubectl,
/// client-go) open another connection when a server's cap is reached.
const HTTP2_MAX_STREAMS: u32 = 1000;
/// HTTP/2 pings to callers, so a dead client's watches are noticed and freed.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(30);

/// Accepts connections on `listener` until `stop`, serving `handler` over TLS when `tls`
/// is given: HTTP/2 when the TLS handshake chose it (only the frontend's ALPN offers
/// `h2`), else HTTP/1.1 with upgrades. Connections past `admission`'s limits are closed
/// at once.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve<F, Fut>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    admission: Arc<Admission>,
    limits: Limits,
    stop: CancellationToken,
    connections: Connections,
    metrics: Arc<metrics::Metrics>,
    handler: F,
) where
    F: Fn(Request<Incoming>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let name = admission.listener;
    let accept_failures = crate::connections::LogThrottle::new(crate::connections::LOG_EVERY);
    let handshakes = (tls.is_some() && limits.max_concurrent_handshakes > 0).then(|| {
        Arc::new(tokio::sync::Semaphore::new(
            limits.max_concurrent_handshakes,
        ))
    });
    loop {
        let (tcp, remote) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning,
                    // and say so once in a while, not once per try.
                    if let Some(suppressed) = accept_failures.allow() {
                        tracing::warn!(listener = name, error = %e, suppressed, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let admitted = match admission.admit(remote.ip()) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                if let Some(suppressed) = admission.log.allow() {
                    let limit = match refusal {
                        crate::connections::Refusal::Listener => admission.max,
                        crate::connections::Refusal::Source => admission.max_per_source,
                    };
                    tracing::warn!(
                        listener = name,
                        %remote,
                        reason = refusal.reason(),
                        limit,
                        suppressed,
                        "connection refused: at the connection limit (--max-{name}-connections, --max-connections-per-source)"
                    );
                }
                drop(tcp);
                continue;
            }
        };
        let peer = Peer::new(remote, tcp.local_addr().unwrap_or(remote));
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        let handler = handler.clone();
        let limits = limits.clone();
        let finish = connections.finish.clone();
        let metrics = metrics.clone();
        let handshakes = handshakes.clone();
        connections.tracker.spawn(async move {
            let _admitted = admitted;
            let io = match tls {
                Some(tls) => {
                    // In turn when many come at once (see --max-concurrent-handshakes).
                    let _turn = match &handshakes {
                        Some(handshakes) => handshakes.clone().acquire_owned().await.ok(),
                        None => None,
                    };
                    match tokio::time::timeout(limits.handshake_timeout, tls.accept(ReadAhead::new(tcp))).await {
                        Ok(Ok(stream)) => Either::Left(stream),
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            metrics.count_limited("tls_handshake_timeout");
                            return;
                        }
                    }
                }
                None => Either::Right(tcp),
            };
            // Each protocol's connection is boxed on its own: an enum of both would cost
            // every HTTP/1.1 connection the size of an HTTP/2 one.
            let http2 =
                matches!(&io, Either::Left(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2"));
            // The responses a handler asks to watch: one nobody reads closes the connection.
            let unread = peer.unread.clone();
            // The requests open on the connection, which closes when it has none for long:
            // one timer per connection, where hyper's header read timeout would arm one
            // per HTTP/1.1 request.
            let requests = Arc::new(OpenRequests::default());
            let counted = requests.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let open = counted.start();
                // Boxed: the request's future is large (routing, dialing a stream) and
                // would otherwise be inline in the task of every HTTP/2 stream, or in
                // every HTTP/1.1 connection's task, for as long as the response runs:
                // about 9 KiB each for a watch that lasts hours.
                let response = Box::pin(handler(req, peer.clone()));
                async move {
                    let response = response.await;
                    // Open until the response body is done with.
                    let response = response.map(|body| {
                        body.map_frame(move |frame| {
                            let _open_until_the_body_ends = &open;
                            frame
                        })
                        .boxed()
                    });
                    Ok::<_, Infallible>(response)
                }
            });
            let served = async {
                if http2 {
                    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .max_concurrent_streams(HTTP2_MAX_STREAMS)
                        .max_header_list_size(
                            u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX),
                        )
                        .keep_alive_interval(HTTP2_KEEPALIVE)
                        .serve_connection(TokioIo::new(io), service);
                    let mut connection = Box::pin(connection);
                    tokio::select! {
                        result = connection.as_mut() => result,
                        () = woken_only(finish.cancelled()) => {
                            // A GOAWAY: requests in flight finish, new ones go elsewhere.
                            connection.as_mut().graceful_shutdown();
                            connection.await
                        }
                        // hyper gives HTTP/1.1 a first-request and an idle deadline (its
                        // header read timeout) but HTTP/2 neither: a client that sends its
                        // preface, answers pings and never a request would stay forever.
                        why = requests.idle(limits.header_read_timeout, limits.idle_connection_timeout) => {
                            tracing::debug!(%remote, reason = why.reason(), "HTTP/2 connection without requests: closed");
                            metrics.count_limited(why.reason());
                            connection.as_mut().graceful_shutdown();
                            // The GOAWAY's round trip, and any request that raced it; a
                            // client that lets even that sit is cut.
                            tokio::select! {
                                result = connection.as_mut() => result,
                                _ = requests.idle(limits.header_read_timeout, limits.header_read_timeout) => Ok(()),
                            }
                        }
                    }
                } else {
                    // No timer for hyper: its header read timeout arms one per request (a
                    // boxed sleep, registered and cancelled). The first request, and each
                    // next one, must come within --header-read-timeout of the connection
                    // opening or the last response ending, as hyper's would ask: a client
                    // that trickles its headers never opens a request.
                    // A lingering close: an answer given before a request's body was
                    // read reaches a client still sending it (see `linger`).
                    let connection = hyper::server::conn::http1::Builder::new()
                        .max_buf_size(limits.max_header_bytes.max(8192))
                        .serve_connection(TokioIo::new(Lingering::new(io)), service)
                        .with_upgrades();
                    let mut connection = Box::pin(connection);
                    let headers_late = || async {
                        requests
                            .idle(limits.header_read_timeout, limits.header_read_timeout)
                            .await;
                    };
                    let ended = tokio::select! {
                        result = connection.as_mut() => Some(result),
                        // Finish the request in flight, then close.
                        () = woken_only(finish.cancelled()) => None,
                        () = headers_late() => {
                            tracing::debug!(%remote, "no request headers within --header-read-timeout: closed");
                            metrics.count_limited("header_read_timeout");
                            // No request is open: hyper closes at once, and cleanly (TLS
                            // close_notify), unless the client does not read even that.
                            None
                        }
                    };
                    match ended {
                        Some(result) => result,
                        None => {
                            connection.as_mut().graceful_shutdown();
                            tokio::select! {
                                result = connection.as_mut() => result,
                                () = headers_late() => Ok(()),
                            }
                        }
                    }
                }
            };
            // Served until done, unless a response sits unread: then the connection is
            // dropped, with the responses and all they hold.
            let result = tokio::select! {
                result = served => result,
                () = unread.stalled_past(limits.stream_idle_timeout) => {
                    tracing::debug!(%remote, "a response sat unread past --stream-idle-timeout: connection closed");
                    metrics.count_limited("idle_timeout");
                    return;
                }
            };
            if let Err(e) = result {
                // hyper answered 431 itself.
                if e.is_parse_too_large() {
                    metrics.count_limited("header_too_large");
                }
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Connects `n` clients to a listener that accepts none; how many completed within
    /// `each` (a connect past a full accept queue waits for a SYN retry, 1 s).
    async fn queued(listener: &TcpListener, n: usize, each: Duration) -> usize {
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..n {
            match tokio::time::timeout(each, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(client)) => clients.push(client),
                _ => break,
            }
        }
        clients.len()
    }

    #[tokio::test]
    async fn a_burst_of_dials_fits_the_accept_queue() {
        // Nothing accepts, so a dial past a full queue never completes, however long it is
        // given: a generous deadline for ours (a loaded machine can be slow to answer a
        // SYN), a short one where slowness only lowers the count.
        let ours = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(queued(&ours, 600, Duration::from_secs(5)).await, 600);
        // What the default backlog does with the same burst.
        let default = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(queued(&default, 600, Duration::from_millis(700)).await < 200);
    }
}
