//! HTTP/2 to the kube-apiserver: many watches on a few connections.
//!
//! Over HTTP/1.1 every watch held open needs a connection of its own, and with it a TLS
//! session and buffers in the agent and in the apiserver; ten thousand watches are ten
//! thousand of each. HTTP/2 multiplexes them. But a server caps the requests open on one
//! connection (`SETTINGS_MAX_CONCURRENT_STREAMS`; kube-apiserver's is
//! `--http2-max-streams-per-connection`), and a client past the cap queues new requests
//! on that connection: for watches, which never end, that is waiting forever. So the
//! pool counts its own open requests per connection and dials another connection when
//! every one has `streams_per_connection` open, packing requests into the oldest
//! connections first so the pool shrinks back as watches end.
//!
//! Only watches come here ([`crate::upstream::Upstream::send`] says why); a server that
//! does not negotiate `h2` turns the pool off for good and watches go over HTTP/1.1 too.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::upstream::{BoxError, UpstreamBody};

/// How long dialing the apiserver (TCP, TLS and the HTTP/2 preface) may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on a connection with requests open, so a dead apiserver connection fails
/// its watches within a minute instead of leaving them silent.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Receive window of each watch: the most of it the apiserver may send ahead of the
/// tunnel. Events are small, and 64 KiB a round trip is still tens of MB/s.
const WATCH_WINDOW: u32 = 64 * 1024;

/// What [`Http2Pool::send`] did with a request.
pub(crate) enum Sent {
    /// The apiserver answered over HTTP/2.
    Response(Response<PooledBody>),
    /// The apiserver does not speak HTTP/2: send it over HTTP/1.1.
    Declined(Request<UpstreamBody>),
}

/// HTTP/2 connections to one apiserver.
pub(crate) struct Http2Pool {
    /// Host (without IPv6 brackets) and port to dial.
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    streams_per_connection: usize,
    connections: Mutex<Vec<Arc<Connection>>>,
    /// Held while dialing, so a burst of requests dials one connection, not one each.
    dialing: tokio::sync::Mutex<()>,
    /// The server did not negotiate `h2`.
    declined: AtomicBool,
}

struct Connection {
    sender: SendRequest<UpstreamBody>,
    open: AtomicUsize,
    /// Refused a request (a GOAWAY, or closed): gets no more.
    retired: AtomicBool,
}

/// One request's place on a connection, given back when the response body is done.
struct Slot(Arc<Connection>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Http2Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2Pool")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("streams_per_connection", &self.streams_per_connection)
            .finish_non_exhaustive()
    }
}

impl Http2Pool {
    /// A pool for the `https` upstream `base`, offering `h2` (then `http/1.1`) over `tls`.
    pub(crate) fn new(
        base: &Uri,
        mut tls: rustls::ClientConfig,
        streams_per_connection: usize,
    ) -> Result<Self, String> {
        let host = base
            .host()
            .ok_or_else(|| format!("upstream {base} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = base.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| format!("upstream host {host:?}: {e}"))?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Http2Pool {
            host,
            port,
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            streams_per_connection: streams_per_connection.max(1),
            connections: Mutex::new(Vec::new()),
            dialing: tokio::sync::Mutex::new(()),
            declined: AtomicBool::new(false),
        })
    }

    /// Sends `request` on a connection with room, dialing one when none has.
    pub(crate) async fn send(&self, mut request: Request<UpstreamBody>) -> Result<Sent, BoxError> {
        // A connection that went away between the pick and the send gives the request
        // back untouched; one more try on another connection.
        let mut retried = false;
        loop {
            let Some(slot) = self.slot().await? else {
                return Ok(Sent::Declined(request));
            };
            let mut sender = slot.0.sender.clone();
            match sender.try_send_request(request).await {
                Ok(response) => {
                    return Ok(Sent::Response(
                        response.map(|body| PooledBody { body, _slot: slot }),
                    ));
                }
                Err(mut refused) => match refused.take_message() {
                    Some(unsent) if !retried => {
                        slot.0.retired.store(true, Ordering::Release);
                        request = unsent;
                        retried = true;
                    }
                    _ => return Err(refused.into_error().into()),
                },
            }
        }
    }

    /// Connections open now (for tests and diagnostics).
    #[cfg(test)]
    fn connections(&self) -> usize {
        self.lock().len()
    }

    /// A place on a connection with room; `None` when the server declined HTTP/2.
    async fn slot(&self) -> Result<Option<Slot>, BoxError> {
        if self.declined.load(Ordering::Acquire) {
            return Ok(None);
        }
        if let Some(slot) = self.take_room() {
            return Ok(Some(slot));
        }
        let _dialing = self.dialing.lock().await;
        // Another request may have dialed (or a request ended) while this one waited.
        if let Some(slot) = self.take_room() {
            return Ok(Some(slot));
        }
        let Some(sender) = tokio::time::timeout(DIAL_TIMEOUT, self.dial())
            .await
            .map_err(|_| format!("dialing {}:{} timed out", self.host, self.port))??
        else {
            self.declined.store(true, Ordering::Release);
            tracing::info!(host = %self.host, "the kube-apiserver does not offer HTTP/2: using HTTP/1.1");
            return Ok(None);
        };
        let connection = Arc::new(Connection {
            sender,
            open: AtomicUsize::new(1),
            retired: AtomicBool::new(false),
        });
        self.lock().push(connection.clone());
        Ok(Some(Slot(connection)))
    }

    /// Takes a place on the oldest connection with room, dropping closed connections and
    /// all idle ones but one (so that after a burst of watches the pool shrinks back).
    fn take_room(&self) -> Option<Slot> {
        let mut connections = self.lock();
        let mut idle_kept = false;
        connections.retain(|c| {
            if c.sender.is_closed() || c.retired.load(Ordering::Acquire) {
                return false;
            }
            if c.open.load(Ordering::Acquire) > 0 {
                return true;
            }
            // Dropping the pool's handle closes the connection once it has no requests.
            !std::mem::replace(&mut idle_kept, true)
        });
        connections.iter().find_map(|c| {
            c.open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.streams_per_connection).then_some(n + 1)
                })
                .ok()
                .map(|_| Slot(c.clone()))
        })
    }

    /// Dials a connection; `None` when the server chose HTTP/1.1.
    async fn dial(&self) -> Result<Option<SendRequest<UpstreamBody>>, BoxError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let tls = self.tls.connect(self.server_name.clone(), tcp).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Ok(None);
        }
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Fixed windows, not adaptive ones (which grow with the connection's
            // throughput, up to megabytes per stream): a watch nobody reads holds what its
            // window let in. Every stream's window fits in the connection's, so unread
            // watches never hold back the others.
            .initial_stream_window_size(WATCH_WINDOW)
            .initial_connection_window_size(
                WATCH_WINDOW
                    .saturating_mul(u32::try_from(self.streams_per_connection).unwrap_or(u32::MAX)),
            )
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .handshake(TokioIo::new(tls))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "HTTP/2 connection to the kube-apiserver ended");
            }
        });
        Ok(Some(sender))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Connection>>> {
        self.connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A response body that holds its request's place on the connection until it is done.
pub(crate) struct PooledBody {
    body: Incoming,
    _slot: Slot,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt;
    use tower_kube_stand_in::StandIn;

    fn get(base: &str, path: &str, token: &str) -> Request<UpstreamBody> {
        Request::get(format!("{base}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .body(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .unwrap()
    }

    async fn pool_for(stand_in: &StandIn, per_connection: usize) -> Http2Pool {
        use kube::client::ConfigExt as _;
        let kubeconfig = kube::config::Kubeconfig::from_yaml(
            &stand_in.kubeconfig_yaml(tower_kube_stand_in::KubeconfigAuth::Token),
        )
        .unwrap();
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap();
        let tls = config.rustls_client_config().unwrap();
        Http2Pool::new(&stand_in.url().parse().unwrap(), tls, per_connection).unwrap()
    }

    fn response(sent: Sent) -> Response<PooledBody> {
        match sent {
            Sent::Response(response) => response,
            Sent::Declined(_) => panic!("the stand-in speaks HTTP/2"),
        }
    }

    #[tokio::test]
    async fn requests_past_the_stream_cap_go_to_new_connections_and_the_pool_shrinks_back() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stand_in = StandIn::start(listener, "t0k3n").await.unwrap();
        let pool = pool_for(&stand_in, 3).await;
        let base = stand_in.url();
        let mut watches = Vec::new();
        for _ in 0..7 {
            let sent = pool
                .send(get(
                    &base,
                    "/api/v1/namespaces/default/configmaps?watch=1",
                    "t0k3n",
                ))
                .await
                .unwrap();
            let watch = response(sent);
            assert_eq!(watch.status(), 200);
            watches.push(watch);
        }
        assert_eq!(pool.connections(), 3, "7 watches at 3 per connection");
        assert_eq!(stand_in.open_connections(), 3);
        assert!(
            stand_in
                .calls()
                .iter()
                .all(|c| c.version == http::Version::HTTP_2),
            "every call came over HTTP/2"
        );
        // Ending watches gives their places back: new requests fit without dialing, and
        // of the two connections left idle one is closed.
        watches.truncate(1);
        for _ in 0..4 {
            let sent = pool
                .send(get(&base, "/api/v1/namespaces", "t0k3n"))
                .await
                .unwrap();
            let body = response(sent).into_body().collect().await.unwrap();
            assert!(!body.to_bytes().is_empty());
        }
        assert_eq!(
            pool.connections(),
            2,
            "one idle connection is kept, not two"
        );
        assert_eq!(
            stand_in.calls().len(),
            11,
            "the stand-in answered every request"
        );
    }

    #[tokio::test]
    async fn a_dropped_connection_is_replaced_on_the_next_request() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stand_in = StandIn::start(listener, "t0k3n").await.unwrap();
        let pool = pool_for(&stand_in, 100).await;
        let base = stand_in.url();
        let first = response(pool.send(get(&base, "/version", "t0k3n")).await.unwrap());
        assert_eq!(first.status(), 200);
        drop(first);
        stand_in.drop_connections();
        let mut answered = None;
        // The pool learns that the connection is gone when hyper's connection task sees
        // the cut; until then a request may fail once, never hang.
        for _ in 0..50 {
            match pool.send(get(&base, "/version", "t0k3n")).await {
                Ok(sent) => {
                    answered = Some(response(sent).status());
                    break;
                }
                Err(_) => tokio::task::yield_now().await,
            }
        }
        assert_eq!(answered, Some(http::StatusCode::OK));
    }
}
