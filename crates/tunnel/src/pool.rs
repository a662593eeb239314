//! HTTP/1.1 client connections, pooled by authority: the agent's to its upstreams, the
//! server's tunnel streams to each cluster. Used in place of hyper-util's legacy
//! `Client`, which cost the agent ~14 K instructions per small request (callgrind): a
//! SipHash of the scheme and authority, byte by byte, at every checkout and return; a
//! race of a checkout against a connect; and a task spawned per request to put the
//! connection back once it is ready again, one more hand-off between tasks (and with two
//! workers a wake of the other thread; BENCHMARKS.md, "Where a small request's
//! instructions go").
//!
//! Here a connection goes back to the pool when its response body ends, in the task that
//! read it; a checkout takes the newest idle connection that is ready, so one still
//! finishing (hyper marks it ready once it has read the response's end) is passed over,
//! never waited for. What hyper-util did that is kept: the `Host` header and the
//! origin-form request target ([`prepare`]); a request refused by a pooled connection
//! before any of it was written goes out on another (its `retry_canceled_requests`); idle
//! connections are closed after [`IDLE_TIMEOUT`], and at most `max_idle` are kept per
//! authority.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::{HashMap, HashMapExt as _};
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use tower_service::Service;

use crate::answer_first::AnswerFirst;

/// Any error of a connector or a body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a connection may sit idle in the pool (hyper-util's default, which both
/// sides used before).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why a request got no response.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: a new one would meet the same.
    Connect(BoxError),
    /// The request failed on its connection (perhaps after it was written).
    Send(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The cause follows as the source (`http::error_chain`).
        f.write_str(match self {
            SendError::Connect(_) => "connecting",
            SendError::Send(_) => "sending the request",
        })
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SendError::Connect(e) => Some(&**e),
            SendError::Send(e) => Some(e),
        }
    }
}

/// HTTP/1.1 connections made by `C`, pooled by the request URI's authority.
pub struct Http1Pool<C, B> {
    inner: Arc<Inner<C, B>>,
}

struct Inner<C, B> {
    connector: C,
    /// Largest read buffer of a connection; hyper's default when `None`.
    read_buffer: Option<usize>,
    max_idle: usize,
    /// Per authority, oldest first; checkouts take from the end. Hashed with foldhash:
    /// looked up twice a request, by authorities the proxies make themselves.
    idle: Mutex<HashMap<Arc<str>, Parked<B>>>,
    /// Started with the first connection: a task that closes idle connections past
    /// [`IDLE_TIMEOUT`] while the pool lives.
    reaping: std::sync::Once,
}

/// An authority's idle connections, and its name: the map's key, shared with the
/// responses whose connections go back to it (a reference count per request, not a copy).
struct Parked<B> {
    key: Arc<str>,
    idle: Vec<Idle<B>>,
}

impl<B> Parked<B> {
    fn new(key: &Arc<str>) -> Self {
        Parked {
            key: key.clone(),
            idle: Vec::new(),
        }
    }
}

struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

impl<C, B> Http1Pool<C, B>
where
    C: Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A pool that keeps at most `max_idle` idle connections per authority, each reading
    /// at most `read_buffer` at a time (hyper's default when `None`).
    pub fn new(connector: C, read_buffer: Option<usize>, max_idle: usize) -> Self {
        Http1Pool {
            inner: Arc::new(Inner {
                connector,
                read_buffer,
                max_idle,
                idle: Mutex::new(HashMap::new()),
                reaping: std::sync::Once::new(),
            }),
        }
    }

    /// Sends `request` (absolute URI) on an idle connection to its authority that is
    /// ready, or a new one.
    ///
    /// Not an `async fn`: that holds its arguments twice in its future (as captured, and
    /// as the locals they are moved into), and so every request's future held two copies
    /// of the request (BENCHMARKS.md, "Smaller request futures").
    pub fn send(
        &self,
        mut request: Request<B>,
    ) -> impl Future<Output = Result<Response<PooledBody<B>>, SendError>> + '_ {
        let uri = request.uri().clone();
        prepare(&mut request);
        async move {
            let authority = uri.authority().map_or("", |a| a.as_str());
            loop {
                let (mut sender, reused, key) = match self.inner.checkout(authority) {
                    Some((sender, key)) => (sender, true, key),
                    // Boxed: a connect (the connector's dial and TLS handshake, hyper's
                    // handshake) is kilobytes of future that every request's would carry.
                    None => (
                        Box::pin(self.connect(&uri)).await?,
                        false,
                        self.inner.key(authority),
                    ),
                };
                match sender.try_send_request(request).await {
                    Ok(response) => return Ok(watch(&self.inner, key, response, sender)),
                    Err(mut e) => match e.take_message() {
                        // Refused before any of it was written (the connection closed
                        // while idle): another connection may take it; a new one failing
                        // so will not.
                        Some(back) if reused => request = back,
                        _ => return Err(SendError::Send(e.into_error())),
                    },
                }
            }
        }
    }

    /// A new connection to `uri`'s authority, driven by a task of its own.
    async fn connect(&self, uri: &Uri) -> Result<SendRequest<B>, SendError> {
        let inner = &self.inner;
        inner
            .reaping
            .call_once(|| drop(tokio::spawn(reap(Arc::downgrade(inner)))));
        let mut connector = inner.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        let io = connector
            .call(uri.clone())
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        let mut builder = http1::Builder::new();
        if let Some(read_buffer) = inner.read_buffer {
            builder.max_buf_size(read_buffer);
        }
        let (sender, connection) = builder
            .handshake(AnswerFirst::new(io))
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "HTTP/1.1 client connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Idle connections to `authority` now.
    #[cfg(test)]
    fn idle(&self, authority: &str) -> usize {
        self.inner.lock().get(authority).map_or(0, |p| p.idle.len())
    }
}

impl<C, B> Inner<C, B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Parked<B>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest idle connection to `key` that is ready, with the pool's name for `key`;
    /// closed and expired ones are dropped on the way, ones not ready yet stay.
    fn checkout(&self, key: &str) -> Option<(SendRequest<B>, Arc<str>)> {
        let mut idle = self.lock();
        // An emptied list stays (the connection usually comes back to it, without its key
        // allocated again); the reaper drops lists that stay empty.
        let parked = idle.get_mut(key)?;
        let list = &mut parked.idle;
        let now = Instant::now();
        let mut at = list.len();
        while at > 0 {
            at -= 1;
            let entry = &list[at];
            if entry.sender.is_closed() || now.duration_since(entry.since) >= IDLE_TIMEOUT {
                list.remove(at);
            } else if entry.sender.is_ready() {
                return Some((list.remove(at).sender, parked.key.clone()));
            }
        }
        None
    }

    /// The pool's name for `key`, kept (with no connections yet) if it had none.
    fn key(&self, key: &str) -> Arc<str> {
        let mut idle = self.lock();
        if let Some(parked) = idle.get(key) {
            return parked.key.clone();
        }
        let name: Arc<str> = key.into();
        idle.insert(name.clone(), Parked::new(&name));
        name
    }

    fn put(&self, key: &Arc<str>, sender: SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let list = match idle.get_mut(&**key) {
            Some(parked) => &mut parked.idle,
            None => {
                &mut idle
                    .entry(key.clone())
                    .or_insert_with(|| Parked::new(key))
                    .idle
            }
        };
        if list.len() < self.max_idle {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// The response, whose body puts `sender` back when it ends. An upgraded connection
/// (101) is the upgrade's; one whose body is dropped unread is closed by hyper.
fn watch<C, B>(
    pool: &Arc<Inner<C, B>>,
    key: Arc<str>,
    response: Response<Incoming>,
    sender: SendRequest<B>,
) -> Response<PooledBody<B>>
where
    C: Send + Sync + 'static,
    B: Send + 'static,
{
    let back = if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        None
    } else if response.body().is_end_stream() {
        pool.put(&key, sender);
        None
    } else {
        let pool: Arc<dyn PutBack<B>> = pool.clone();
        Some(Back { pool, key, sender })
    };
    response.map(|body| PooledBody { body, back })
}

/// A pool a connection goes back to, whatever its connector.
trait PutBack<B>: Send + Sync {
    fn put_back(&self, key: &Arc<str>, sender: SendRequest<B>);
}

impl<C: Send + Sync, B: Send> PutBack<B> for Inner<C, B> {
    fn put_back(&self, key: &Arc<str>, sender: SendRequest<B>) {
        self.put(key, sender);
    }
}

/// Closes idle connections past [`IDLE_TIMEOUT`], while the pool lives.
async fn reap<C, B>(pool: Weak<Inner<C, B>>) {
    let mut every = tokio::time::interval(IDLE_TIMEOUT / 3);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        pool.lock().retain(|_, parked| {
            parked
                .idle
                .retain(|i| !i.sender.is_closed() && now.duration_since(i.since) < IDLE_TIMEOUT);
            !parked.idle.is_empty()
        });
    }
}

/// What hyper-util's client did to a request before sending it on an HTTP/1.1
/// connection: a `Host` header from the URI when there is none, and the request target in
/// origin form (`/path?query`; authority form for CONNECT).
fn prepare<B>(request: &mut Request<B>) {
    let uri = request.uri().clone();
    if !request.headers().contains_key(header::HOST)
        && let Some(value) = host_header(&uri)
    {
        request.headers_mut().insert(header::HOST, value);
    }
    let mut parts = http::uri::Parts::default();
    if request.method() == Method::CONNECT {
        parts.authority = uri.authority().cloned();
    } else {
        parts.path_and_query = uri.path_and_query().cloned();
    }
    if let Ok(target) = Uri::from_parts(parts) {
        *request.uri_mut() = target;
    }
}

/// The `Host` header a request to `uri` gets when it has none: the host, and the port
/// unless it is the scheme's default. Callers that send many requests to one authority
/// make it once and set it themselves.
pub fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let value = match uri.port_u16() {
        Some(port) if Some(port) != default_port(uri) => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    // A host a URI parsed with is always a valid header value.
    HeaderValue::from_str(&value).ok()
}

fn default_port(uri: &Uri) -> Option<u16> {
    match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    }
}

/// A response body from the pool: its connection goes back when it ends.
pub struct PooledBody<B> {
    body: Incoming,
    back: Option<Back<B>>,
}

struct Back<B> {
    pool: Arc<dyn PutBack<B>>,
    key: Arc<str>,
    sender: SendRequest<B>,
}

impl<B> PooledBody<B> {
    fn give_back(&mut self) {
        if let Some(back) = self.back.take() {
            back.pool.put_back(&back.key, back.sender);
        }
    }
}

impl<B> Body for PooledBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.give_back(),
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.give_back(),
            // An error: the connection is not reused.
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt as _;

    use hyper_util::client::legacy::connect::HttpConnector;

    use super::*;

    /// An upstream that answers every request with `size` bytes on keep-alive
    /// connections, and counts the connections it accepted.
    async fn upstream(size: usize) -> (Uri, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let service =
                    hyper::service::service_fn(move |_req: Request<Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from(vec![b'x'; size]),
                        )))
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
                );
            }
        });
        (format!("http://{addr}/x").parse().unwrap(), accepted)
    }

    type Empty = http_body_util::Empty<Bytes>;

    fn pool() -> Http1Pool<HttpConnector, Empty> {
        Http1Pool::new(HttpConnector::new(), Some(8 * 1024), 4)
    }

    fn get(uri: &Uri) -> Request<Empty> {
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = uri.clone();
        request
    }

    /// The upstream accepted one connection, which served every request.
    fn served_by_one(accepted: &AtomicUsize) {
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection served all"
        );
    }

    fn idle(pool: &Http1Pool<HttpConnector, Empty>, uri: &Uri) -> usize {
        pool.idle(uri.authority().unwrap().as_str())
    }

    /// An upstream that takes a little of each request (the head and some of the body),
    /// then writes `answer` and closes with the rest unread, which resets the connection
    /// while the body is still being sent (a kube-apiserver past its 3 MiB answers 413 so).
    async fn refusing_upstream(answer: &'static [u8]) -> Uri {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut some = vec![0; 64 * 1024];
                let _ = tcp.read(&mut some).await.unwrap();
                tcp.write_all(answer).await.unwrap();
                drop(tcp);
            }
        });
        format!("http://{addr}/upload").parse().unwrap()
    }

    pub(crate) type Chunks = http_body_util::StreamBody<
        futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>>,
    >;

    /// A POST of 8 MiB in chunks of 64 KiB, each written as it comes.
    pub(crate) fn upload(uri: &Uri) -> Request<Chunks> {
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = (0..128)
            .map(|_| Ok(Frame::data(Bytes::from(vec![b'x'; 64 << 10]))))
            .collect();
        let mut request = Request::new(http_body_util::StreamBody::new(futures::stream::iter(
            chunks,
        )));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri.clone();
        request
    }

    /// The answer of an upstream that refused the body reaches the caller (see
    /// `answer_first`), every time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_sent_before_the_body_was_all_read_reaches_the_caller() {
        let uri = refusing_upstream(
            b"HTTP/1.1 413 Request Entity Too Large\r\ncontent-length: 9\r\n\
              connection: close\r\n\r\ntoo large",
        )
        .await;
        let pool = Http1Pool::new(HttpConnector::new(), Some(8 * 1024), 4);
        for _ in 0..20 {
            let response = pool.send(upload(&uri)).await.unwrap();
            assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"too large");
        }
    }

    /// The same upstream without an answer: the reset is the caller's error, at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_without_an_answer_is_an_error_not_a_wait() {
        let uri = refusing_upstream(b"").await;
        let pool = Http1Pool::new(HttpConnector::new(), Some(8 * 1024), 4);
        for _ in 0..5 {
            let sent = tokio::time::timeout(Duration::from_secs(10), pool.send(upload(&uri))).await;
            match sent {
                // The reset, as the read met it.
                Ok(Err(SendError::Send(_))) => {}
                Ok(Err(e)) => panic!("not a send error: {e}"),
                Ok(Ok(response)) => panic!("an answer nobody sent: {}", response.status()),
                Err(_) => panic!("no error within 10 s"),
            }
        }
    }

    #[tokio::test]
    async fn a_connection_goes_back_when_its_body_ends_and_is_used_again() {
        let (uri, accepted) = upstream(100_000).await;
        let pool = pool();
        for _ in 0..20 {
            let response = pool.send(get(&uri)).await.unwrap();
            assert_eq!(response.status(), 200);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), 100_000);
            assert_eq!(idle(&pool, &uri), 1);
        }
        served_by_one(&accepted);
    }

    #[tokio::test]
    async fn a_body_dropped_unread_takes_its_connection_with_it() {
        let (uri, accepted) = upstream(1_000_000).await;
        let pool = pool();
        let response = pool.send(get(&uri)).await.unwrap();
        drop(response);
        assert_eq!(idle(&pool, &uri), 0);
        let response = pool.send(get(&uri)).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.len(), 1_000_000);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(idle(&pool, &uri), 1);
    }

    #[tokio::test]
    async fn at_most_max_idle_connections_are_kept() {
        let (uri, accepted) = upstream(10).await;
        let pool = pool();
        // Six responses in flight at once take six connections; four are kept.
        let mut responses = Vec::new();
        for _ in 0..6 {
            responses.push(pool.send(get(&uri)).await.unwrap());
        }
        for response in responses {
            response.into_body().collect().await.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 6);
        assert_eq!(idle(&pool, &uri), 4);
    }

    /// `HttpConnector`'s connections, counting the reads their tasks attempt.
    #[derive(Clone)]
    struct CountReads {
        inner: HttpConnector,
        reads: Arc<AtomicUsize>,
    }

    struct Counted {
        io: hyper_util::rt::TokioIo<tokio::net::TcpStream>,
        reads: Arc<AtomicUsize>,
    }

    impl Service<Uri> for CountReads {
        type Response = Counted;
        type Error = BoxError;
        type Future = Pin<Box<dyn std::future::Future<Output = Result<Counted, BoxError>> + Send>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            self.inner.poll_ready(cx).map_err(Into::into)
        }

        fn call(&mut self, uri: Uri) -> Self::Future {
            let (connecting, reads) = (self.inner.call(uri), self.reads.clone());
            Box::pin(async move {
                let io = connecting.await?;
                Ok(Counted { io, reads })
            })
        }
    }

    impl hyper::rt::Read for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: hyper::rt::ReadBufCursor<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl hyper::rt::Write for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// Reading a small response's body does not wake its connection's task, which
    /// finished the body when it read it (vendor/README.md, hyper). With two workers, such
    /// a wake costs tower-agent a wake of the other worker per request: the stream task's
    /// next wake, of the session driver, pushes the connection's task out of tokio's LIFO
    /// slot onto the run queue, and that notifies a parked worker.
    #[tokio::test]
    async fn reading_a_finished_body_leaves_its_connection_task_alone() {
        let (uri, accepted) = upstream(10).await;
        let reads = Arc::new(AtomicUsize::new(0));
        let connector = CountReads {
            inner: HttpConnector::new(),
            reads: reads.clone(),
        };
        let pool = Http1Pool::new(connector, None, 4);
        for _ in 0..3 {
            let mut body = pool.send(get(&uri)).await.unwrap().into_body();
            // The connection's task read the whole response (one segment) and left.
            let quiet = reads.load(Ordering::SeqCst);
            let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(data.len(), 10);
            assert!(body.frame().await.is_none());
            // Anything woken runs before this task resumes (one thread).
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            assert_eq!(
                reads.load(Ordering::SeqCst),
                quiet,
                "the connection's task was polled again"
            );
        }
        served_by_one(&accepted);
    }

    /// A keep-alive connection reads its next response into the room its last one left
    /// in the read buffer, instead of a new block for every response (vendor/README.md,
    /// hyper's second change). Seen through the bodies: hyper hands them out as slices of
    /// that buffer, and while the first is held its block cannot be reused.
    #[tokio::test]
    async fn a_connection_reads_its_next_response_into_the_room_left() {
        let (uri, accepted) = upstream(10).await;
        let pool = pool();
        let mut chunks = Vec::new();
        for _ in 0..3 {
            let mut body = pool.send(get(&uri)).await.unwrap().into_body();
            let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert!(body.frame().await.is_none());
            chunks.push(data);
        }
        served_by_one(&accepted);
        let first = chunks[0].as_ptr() as usize;
        for later in &chunks[1..] {
            let at = later.as_ptr() as usize;
            assert!(
                at > first && at - first < 8 * 1024,
                "a response read into a block of its own ({at:#x}, the first at {first:#x})"
            );
        }
    }

    #[test]
    fn requests_carry_a_host_and_an_origin_form_target() {
        for (uri, host) in [
            ("https://10.0.0.1:6443/api/v1/pods?watch=1", "10.0.0.1:6443"),
            (
                "https://kubernetes.default.svc/version",
                "kubernetes.default.svc",
            ),
            ("http://ks-apiserver:80/kapis", "ks-apiserver"),
        ] {
            let mut request = get(&uri.parse().unwrap());
            prepare(&mut request);
            assert_eq!(request.headers()[header::HOST], host, "{uri}");
            let target = uri.split_once("//").unwrap().1;
            let target = &target[target.find('/').unwrap()..];
            assert_eq!(request.uri().to_string(), target);
        }
        // A Host the caller set is kept.
        let mut request = get(&"https://a:6443/x".parse().unwrap());
        request
            .headers_mut()
            .insert(header::HOST, HeaderValue::from_static("b"));
        prepare(&mut request);
        assert_eq!(request.headers()[header::HOST], "b");
    }
}
