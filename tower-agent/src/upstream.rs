//! The agent's upstreams: the member's kube-apiserver (with the agent's own credentials
//! and impersonation) and optional named targets.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, header};
use http_body_util::BodyExt as _;
use http_body_util::combinators::BoxBody;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use kube::client::ConfigExt;
use secrecy::ExposeSecret;
use tokio::sync::Semaphore;

use crate::http2::{Http2Pool, Sent};
use tower_tunnel::pool::{Http1Pool, SendError};

/// Request bodies sent upstream.
pub(crate) type UpstreamBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Any body error.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Response bodies from upstream.
pub(crate) type ResponseBody = BoxBody<Bytes, hyper::Error>;

/// Watches multiplexed on one HTTP/2 connection to the kube-apiserver by default:
/// kube-apiserver's own cap since its HTTP/2 rapid-reset fix (kubernetes#121120; it had
/// Go's 250 before), so the pool never asks one connection for more than it may carry.
pub const DEFAULT_STREAMS_PER_CONNECTION: usize = 100;

/// How the agent authenticates to its kube-apiserver.
#[derive(Debug)]
pub enum Credentials {
    /// A client certificate (in the TLS config); nothing to add to requests.
    ClientCertificate,
    /// A fixed bearer token from the kubeconfig, as its `Authorization` value (built once,
    /// not per request).
    Token(http::HeaderValue),
    /// A ServiceAccount token file, re-read when it rotates.
    TokenFile(TokenFile),
    /// No credentials.
    None,
}

/// How often a token file is checked for a rotated token: often enough that a rotation
/// is in use within about a second, rarely enough that a busy agent reads it once a
/// second, not once a request.
pub const TOKEN_FILE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// A token file (a ServiceAccount token, or a kubeconfig's `tokenFile:`), re-read at most
/// once per check interval so a rotated token is used within about that long.
///
/// A re-read that fails or finds the file empty (a writer caught mid-write, a projected
/// volume being swapped) keeps the previous token: the old token usually stays valid for
/// a while after rotation, an empty one never is.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    check_every: Duration,
    cached: Mutex<CachedToken>,
}

#[derive(Debug)]
struct CachedToken {
    token: String,
    /// `Bearer {token}`, marked sensitive.
    authorization: http::HeaderValue,
    checked_at: Instant,
}

impl TokenFile {
    /// Reads `path` now (to fail early: missing, unreadable or empty) and again on use
    /// once `check_every` has passed since the last check.
    pub fn new(path: PathBuf, check_every: Duration) -> Result<Self, String> {
        let token = read_token(&path)?;
        let authorization =
            bearer(&token).map_err(|e| format!("token file {}: {e}", path.display()))?;
        Ok(TokenFile {
            path,
            check_every,
            cached: Mutex::new(CachedToken {
                token,
                authorization,
                checked_at: Instant::now(),
            }),
        })
    }

    /// The current token.
    pub fn token(&self) -> String {
        self.token_at(Instant::now())
    }

    /// The current token as an `Authorization` value.
    pub fn authorization(&self) -> http::HeaderValue {
        self.refreshed(Instant::now(), |c| c.authorization.clone())
    }

    /// The token as of `now` (the clock is a parameter so tests need not sleep).
    fn token_at(&self, now: Instant) -> String {
        self.refreshed(now, |c| c.token.clone())
    }

    /// `take` of the cached token, re-read first if the check interval has passed at `now`.
    fn refreshed<T>(&self, now: Instant, take: impl Fn(&CachedToken) -> T) -> T {
        let lock = || {
            self.cached
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        {
            let mut cached = lock();
            if now.saturating_duration_since(cached.checked_at) < self.check_every {
                return take(&cached);
            }
            // This request re-reads the file, outside the lock: the requests meanwhile
            // keep using the cached token instead of waiting for the read.
            cached.checked_at = now;
        }
        let read = read_token(&self.path).and_then(|token| {
            let authorization =
                bearer(&token).map_err(|e| format!("token file {}: {e}", self.path.display()))?;
            Ok((token, authorization))
        });
        let mut cached = lock();
        match read {
            Ok((token, authorization)) => {
                if token != cached.token {
                    tracing::info!(path = %self.path.display(), "token file rotated: using the new token");
                    cached.token = token;
                    cached.authorization = authorization;
                }
            }
            // At most once per check interval, so this cannot flood the log.
            Err(e) => tracing::warn!(error = %e, "keeping the previous token"),
        }
        take(&cached)
    }
}

/// `Bearer {token}` as a header value, marked sensitive (never logged).
pub fn bearer(token: &str) -> Result<http::HeaderValue, String> {
    let mut value = http::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| "the token holds characters an HTTP header cannot".to_owned())?;
    value.set_sensitive(true);
    Ok(value)
}

/// Reads a token file: trimmed, and never empty.
fn read_token(path: &std::path::Path) -> Result<String, String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("reading token file {}: {e}", path.display()))?
        .trim()
        .to_owned();
    if token.is_empty() {
        return Err(format!("token file {} is empty", path.display()));
    }
    Ok(token)
}

/// Why a request's path cannot be sent to an upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UriError {
    /// A `.` or `..` segment below a base path.
    #[error(
        "the path has a \".\" or \"..\" segment, which this agent does not send below its \
         upstream's base path {0:?}"
    )]
    DotSegment(String),
    /// Not a URI once joined.
    #[error(transparent)]
    Http(#[from] http::Error),
}

/// Whether `path` has a segment that is `.` or `..`, with its dots escaped (`%2e`) or not.
fn has_dot_segment(path: &str) -> bool {
    path.split('/').any(|segment| {
        let unescaped = segment.to_ascii_lowercase().replace("%2e", ".");
        unescaped == "." || unescaped == ".."
    })
}

/// One upstream the agent forwards to.
pub struct Upstream {
    /// Scheme and authority (and any path prefix) of the upstream.
    base: Uri,
    /// The `Host` of every HTTP/1.1 request to it, made once (formatting it per request
    /// cost an allocation and ~400 instructions).
    host: Option<header::HeaderValue>,
    /// HTTP/1.1: everything but watches, plain-HTTP targets, and servers without HTTP/2.
    /// Reads [`UPSTREAM_READ_BUFFER`] at a time.
    client: Http1Pool<HttpsConnector<HttpConnector>, UpstreamBody>,
    /// The same, reading [`WIDE_READ_BUFFER`] at a time, for the responses that hold one
    /// of `wide_slots` (see [`Upstream::send`]).
    wide: Http1Pool<HttpsConnector<HttpConnector>, UpstreamBody>,
    wide_slots: Arc<Semaphore>,
    /// HTTP/2 for watches, when the upstream is the kube-apiserver over TLS.
    http2: Option<Http2Pool>,
    /// Credentials for the kube-apiserver; `None` for named targets, which get the
    /// caller's own Authorization header.
    pub(crate) credentials: Option<Credentials>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// The kube-apiserver described by a kube-rs `Config` (from a kubeconfig or in-cluster).
    /// Watches go over HTTP/2, up to `streams_per_connection` on each connection (0: HTTP/1.1
    /// only), everything else over HTTP/1.1 (see [`Upstream::send`]).
    pub fn kubernetes(
        config: &kube::Config,
        override_address: Option<&str>,
        streams_per_connection: usize,
    ) -> Result<Self, String> {
        let tls = config
            .rustls_client_config()
            .map_err(|e| format!("TLS for the kube-apiserver: {e}"))?;
        let mut http1_tls = tls.clone();
        // Upgrades (exec, port-forward) need HTTP/1.1.
        http1_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let auth = &config.auth_info;
        let credentials = if auth.client_certificate.is_some()
            || auth.client_certificate_data.is_some()
        {
            Credentials::ClientCertificate
        } else if let Some(token) = &auth.token {
            Credentials::Token(
                bearer(token.expose_secret()).map_err(|e| format!("the kubeconfig's user: {e}"))?,
            )
        } else if let Some(path) = &auth.token_file {
            Credentials::TokenFile(TokenFile::new(path.into(), TOKEN_FILE_CHECK_INTERVAL)?)
        } else if auth.exec.is_some() || auth.auth_provider.is_some() {
            return Err("the kubeconfig's user authenticates with an exec plugin or auth provider, which tower-agent does not run: use a token or client certificate".into());
        } else {
            Credentials::None
        };
        let base = match override_address {
            Some(address) => format!("https://{address}")
                .parse()
                .map_err(|e| format!("--kubernetes-service {address:?}: {e}"))?,
            None => config.cluster_url.clone(),
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let http2 = (streams_per_connection > 0 && base.scheme_str() == Some("https"))
            .then(|| Http2Pool::new(&base, tls, streams_per_connection))
            .transpose()?;
        let connector = HttpsConnector::from((http, Arc::new(http1_tls)));
        Ok(Upstream::http1(base, connector, http2, Some(credentials)))
    }

    /// A named target reached over plain HTTP inside the member (`HOST:PORT`).
    pub fn named(address: &str) -> Result<Self, String> {
        let base: Uri = format!("http://{address}")
            .parse()
            .map_err(|e| format!("target address {address:?}: {e}"))?;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let tls = rustls::ClientConfig::builder_with_provider(tower_tunnel::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let connector = HttpsConnector::from((http, Arc::new(tls)));
        Ok(Upstream::http1(base, connector, None, None))
    }

    fn http1(
        base: Uri,
        connector: HttpsConnector<HttpConnector>,
        http2: Option<Http2Pool>,
        credentials: Option<Credentials>,
    ) -> Self {
        Upstream {
            host: tower_tunnel::pool::host_header(&base),
            base,
            client: Http1Pool::new(connector.clone(), Some(UPSTREAM_READ_BUFFER), 256),
            wide: Http1Pool::new(connector, Some(WIDE_READ_BUFFER), WIDE_READERS),
            wide_slots: Arc::new(Semaphore::new(WIDE_READERS)),
            http2,
            credentials,
        }
    }

    /// The upstream URI for a request's path and query.
    ///
    /// Below a base with a path (a kubeconfig's server behind a proxy that routes by path,
    /// as Rancher's `…/k8s/clusters/{id}`), a path with a `.` or `..` segment, escaped or
    /// not, is refused: a hop that normalises the path (nginx does, before it routes)
    /// would take `{prefix}/../{other}` out of the prefix, to whatever else that proxy
    /// serves, with this agent's credentials.
    pub(crate) fn uri_for(&self, path_and_query: &PathAndQuery) -> Result<Uri, UriError> {
        let prefix = self.base.path().trim_end_matches('/');
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(if prefix.is_empty() {
            // The usual base (`https://host:6443`): the request's own, already parsed,
            // where formatting and parsing it again cost ~1 K instructions a request.
            path_and_query.clone()
        } else if has_dot_segment(path_and_query.path()) {
            return Err(UriError::DotSegment(prefix.to_owned()));
        } else {
            format!("{prefix}{path_and_query}")
                .parse()
                .map_err(http::Error::from)?
        });
        Ok(Uri::from_parts(parts).map_err(http::Error::from)?)
    }

    /// Sends a request: a watch (`watch`, as [`tower_proto::request_info::is_watch`]
    /// resolves the member's path) over HTTP/2 when there is a pool, anything else over
    /// HTTP/1.1.
    ///
    /// Watches are the requests that come by the thousand and sit mostly idle for hours:
    /// on HTTP/1.1 each holds a connection and its TLS session. Everything else stays on
    /// pooled HTTP/1.1 connections: on one HTTP/2 connection a small request's response
    /// waits in TCP behind the bytes of a large download or list (B3: probe p99 35 ms
    /// during a download over HTTP/2, 13 ms over HTTP/1.1), and short requests cost the
    /// agent more latency over HTTP/2 (B2 c=1: about +40 us). Over HTTP/1.1, a response
    /// reads its upstream [`WIDE_READ_BUFFER`] at a time while it holds one of the
    /// [`WIDE_READERS`] slots, else [`UPSTREAM_READ_BUFFER`].
    ///
    /// Returns an `async` block rather than being an `async fn`, and takes the request
    /// back from the HTTP/2 pool into the same place: each copy of it would be a quarter
    /// kilobyte more in every request's future (BENCHMARKS.md, "Smaller request futures").
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would hold `request` twice in the future"
    )]
    pub(crate) fn send(
        &self,
        mut request: Request<UpstreamBody>,
        watch: bool,
    ) -> impl Future<Output = Result<Response<ResponseBody>, BoxError>> + '_ {
        async move {
            if let Some(pool) = &self.http2
                && watch
                && !request.headers().contains_key(header::UPGRADE)
            {
                // Boxed: the pool's send may dial (TCP, TLS, the HTTP/2 handshake), a
                // future of kilobytes that would otherwise sit in every request's future
                // and be copied each time one is boxed (callgrind: ~9.6 K instructions of
                // memcpy per small request, a tenth of the agent's work).
                match Box::pin(pool.send(request)).await? {
                    Sent::Response(response) => return Ok(response.map(|b| b.boxed())),
                    Sent::Declined(declined) => request = declined,
                }
            }
            if let Some(host) = &self.host
                && !request.headers().contains_key(header::HOST)
            {
                request.headers_mut().insert(header::HOST, host.clone());
            }
            let slot = (!long_lived(&request, watch))
                .then(|| self.wide_slots.clone().try_acquire_owned().ok())
                .flatten();
            let client = if slot.is_some() {
                &self.wide
            } else {
                &self.client
            };
            let replay = replayable(&request).then(|| head_copy(&request));
            // The second try is awaited after this match, not in it: a match's scrutinee
            // (the first answer, and the copy) would stay in the future across it.
            let again = match client.send(request).await {
                Ok(response) => return Ok(holding(response, slot)),
                Err(e) => match (e, replay) {
                    // Connecting failed: a new connection would meet the same.
                    (e @ SendError::Send(_), Some(replay)) => {
                        tracing::debug!(
                            error = %tower_tunnel::http::error_chain(&e),
                            "a request without a body failed before its answer; sending it once more"
                        );
                        replay
                    }
                    (e, _) => return Err(e.into()),
                },
            };
            Ok(holding(client.send(again).await?, slot))
        }
    }
}

/// `response`, its body holding `slot` (a wide read slot) until it is dropped.
fn holding(
    response: Response<tower_tunnel::pool::PooledBody<UpstreamBody>>,
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Response<ResponseBody> {
    response.map(|body| match slot {
        Some(slot) => body
            .map_frame(move |frame| {
                let _held = &slot;
                frame
            })
            .boxed(),
        None => body.boxed(),
    })
}

/// Whether a response may stream for minutes or hours at the pace of events (a watch,
/// `logs -f`, an upgrade): those never take a wide read slot, which they would hold
/// for their whole life.
fn long_lived<B>(request: &Request<B>, watch: bool) -> bool {
    watch
        || request.headers().contains_key(header::UPGRADE)
        || tower_proto::request_info::query_flag(request.uri().query(), "follow")
}

/// Whether a request that failed before any answer may be sent once more, as Go's HTTP
/// client does (net/http `Request.isReplayable`, used by the transport's
/// `shouldRetryRequest`): an idempotent method and no body. A pooled connection the
/// upstream (or a load balancer before it) closed as idle, just as the request went out
/// on it, fails that way; the request never reached a handler.
fn replayable<B: http_body::Body>(request: &Request<B>) -> bool {
    use http::Method;
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE].contains(request.method())
        && request.body().is_end_stream()
}

/// The same request line and headers, with no body (only for [`replayable`] requests).
fn head_copy(request: &Request<UpstreamBody>) -> Request<UpstreamBody> {
    let mut copy = Request::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Largest read buffer of an HTTP/1.1 connection to an upstream (hyper's default is
/// ~400 KiB, its least 8 KiB): how far a response body is read ahead of its tunnel
/// stream, which for a response nobody reads stays in the agent, and the largest response
/// head taken (nginx's default for proxied response heads, `proxy_buffer_size`, is the
/// same 8 KiB).
const UPSTREAM_READ_BUFFER: usize = 8 * 1024;

/// The read buffer of a response that holds a wide slot: one TLS record's plaintext,
/// which is what one read of a TLS upstream yields. 8 KiB reads cut every record in two,
/// and every chunk costs a yamux frame and a write to the tunnel: a download cost the
/// agent twice the system calls (201 against 102 per MiB, BENCHMARKS.md). But what a
/// response nobody reads holds in the agent grows with it (500 unread downloads, all at
/// 16 KiB: 80-91 MiB over idle, against 55-57 MiB at 8 KiB), so only [`WIDE_READERS`]
/// responses at once read this wide.
const WIDE_READ_BUFFER: usize = 16 * 1024;

/// How many responses per upstream read [`WIDE_READ_BUFFER`] at a time; the rest read
/// [`UPSTREAM_READ_BUFFER`]. A slot is taken when the request is sent, if one is free
/// and the response is not long-lived ([`long_lived`]), and given back when its body is
/// done or dropped.
const WIDE_READERS: usize = 32;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An upstream that answers the first request on each connection and closes the
    /// connection, unanswered, when a second one arrives on it (an idle keep-alive
    /// connection closed just as it was reused); counts those it cut, by method.
    async fn closing_on_reuse() -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(Mutex::new(Vec::new()));
        let seen = cut.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let cut = seen.clone();
                tokio::spawn(async move {
                    let mut served = 0;
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        let method = head.split(' ').next().unwrap_or_default().to_owned();
                        // Each test request's body, if any, is "x" (content-length: 1).
                        let body =
                            usize::from(head.to_ascii_lowercase().contains("content-length: 1"));
                        while buf.len() < end + 4 + body {
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..end + 4 + body);
                        if served == 1 {
                            cut.lock().unwrap().push(method);
                            return;
                        }
                        served += 1;
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tcp.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, cut)
    }

    fn request(upstream: &Upstream, method: &str, body: &'static [u8]) -> Request<UpstreamBody> {
        let mut request = Request::new(
            http_body_util::Full::new(Bytes::from_static(body))
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *request.method_mut() = method.parse().unwrap();
        *request.uri_mut() = upstream.uri_for(&"/x".parse().unwrap()).unwrap();
        request
    }

    #[tokio::test]
    async fn a_request_without_a_body_is_sent_again_when_its_reused_connection_closes() {
        let (addr, cut) = closing_on_reuse().await;
        let upstream = Upstream::named(&addr.to_string()).unwrap();
        // Whether a request goes out on the pooled connection or a new one is the pool's
        // race with the connection's return: go on until a few did.
        for _ in 0..200 {
            let response = upstream.send(request(&upstream, "GET", b""), false).await;
            let response =
                response.unwrap_or_else(|e| panic!("{}", tower_tunnel::http::error_chain(&*e)));
            assert_eq!(response.status(), 200);
            assert_eq!(
                response.into_body().collect().await.unwrap().to_bytes(),
                "ok"
            );
            if cut.lock().unwrap().len() >= 3 {
                break;
            }
        }
        assert!(
            cut.lock().unwrap().len() >= 3,
            "no GET went out on a reused connection"
        );
    }

    #[tokio::test]
    async fn a_request_with_a_body_is_never_sent_twice() {
        let (addr, cut) = closing_on_reuse().await;
        let upstream = Upstream::named(&addr.to_string()).unwrap();
        for _ in 0..200 {
            let first = upstream
                .send(request(&upstream, "GET", b""), false)
                .await
                .unwrap();
            first.into_body().collect().await.unwrap();
            let before = cut.lock().unwrap().len();
            let posted = upstream.send(request(&upstream, "POST", b"x"), false).await;
            let cut_now = cut.lock().unwrap().clone();
            if cut_now.len() > before && cut_now.last().map(String::as_str) == Some("POST") {
                // The POST reached the upstream on a reused connection that closed: it
                // fails, and was not sent on a new one.
                assert!(posted.is_err(), "a POST cut by its upstream was answered");
                return;
            }
            if let Ok(response) = posted {
                response.into_body().collect().await.unwrap();
            }
        }
        panic!("no POST went out on a reused connection");
    }

    /// An upstream that answers every request with `size` bytes, keeping connections.
    async fn big_answers(size: usize) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let body = vec![b'x'; size];
                    loop {
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tcp.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.clear();
                        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n");
                        if tcp.write_all(head.as_bytes()).await.is_err()
                            || tcp.write_all(&body).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn get(upstream: &Upstream, path: &str) -> Request<UpstreamBody> {
        let mut request = request(upstream, "GET", b"");
        *request.uri_mut() = upstream.uri_for(&path.parse().unwrap()).unwrap();
        request
    }

    /// The largest chunk of a response body, and its length.
    async fn chunks(response: Response<ResponseBody>) -> (usize, usize) {
        let mut body = response.into_body();
        let (mut largest, mut total) = (0, 0);
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                largest = largest.max(data.len());
                total += data.len();
            }
        }
        (largest, total)
    }

    #[tokio::test]
    async fn responses_read_wide_while_a_slot_is_free_and_8_kib_after() {
        const SIZE: usize = 1 << 20;
        let addr = big_answers(SIZE).await;
        let upstream = Upstream::named(&addr.to_string()).unwrap();
        let free = || upstream.wide_slots.available_permits();
        // Long-lived responses never take a slot: they would hold it for hours.
        let _watch = upstream
            .send(get(&upstream, "/api/v1/pods?watch=1"), true)
            .await
            .unwrap();
        let _follow = upstream
            .send(
                get(&upstream, "/api/v1/namespaces/d/pods/p/log?follow=true"),
                false,
            )
            .await
            .unwrap();
        assert_eq!(free(), WIDE_READERS, "a watch or logs -f took a wide slot");
        // Responses nobody reads hold their slots, up to all of them.
        let mut unread = Vec::new();
        for _ in 0..WIDE_READERS {
            unread.push(upstream.send(get(&upstream, "/x"), false).await.unwrap());
        }
        assert_eq!(free(), 0);
        // The next is served all the same, 8 KiB at a time.
        let narrow = upstream.send(get(&upstream, "/x"), false).await.unwrap();
        let (largest, total) = chunks(narrow).await;
        assert_eq!(total, SIZE);
        assert!(
            largest <= UPSTREAM_READ_BUFFER,
            "a {largest}-byte chunk without a slot"
        );
        // A response dropped unread gives its slot back; the next reads wider chunks.
        unread.pop();
        assert_eq!(free(), 1);
        let wide = upstream.send(get(&upstream, "/x"), false).await.unwrap();
        assert_eq!(free(), 0);
        let (largest, total) = chunks(wide).await;
        assert_eq!(total, SIZE);
        // (hyper may read a little past its limit into a buffer's spare capacity.)
        assert!(
            largest > UPSTREAM_READ_BUFFER,
            "the largest chunk with a slot was {largest} bytes"
        );
        assert_eq!(free(), 1, "a body read to its end kept its slot");
    }

    /// Writes `content` the way kubelet rotates a projected token: a new file renamed over
    /// the old one.
    fn replace(path: &std::path::Path, content: &str) {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn a_rotated_token_file_is_used_after_at_most_one_check_interval() {
        let dir = std::env::temp_dir().join(format!("tower-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first\n").unwrap();
        let second = TOKEN_FILE_CHECK_INTERVAL;
        assert_eq!(
            second,
            Duration::from_secs(1),
            "a rotation is used within a second"
        );
        let file = TokenFile::new(path.clone(), second).unwrap();
        let t0 = file.cached.lock().unwrap().checked_at;

        replace(&path, "second\n");
        assert_eq!(file.token_at(t0), "first", "checked just now");
        assert_eq!(
            file.token_at(t0 + Duration::from_millis(999)),
            "first",
            "no re-read within the interval"
        );
        assert_eq!(
            file.token_at(t0 + second),
            "second",
            "re-read once the interval has passed"
        );

        // The file changes again right after a check: the next check sees it.
        replace(&path, "third");
        assert_eq!(
            file.token_at(t0 + second + Duration::from_millis(500)),
            "second"
        );
        assert_eq!(file.token_at(t0 + 2 * second), "third");

        // A re-read that fails or finds the file empty keeps the last good token...
        std::fs::write(&path, "  \n").unwrap();
        assert_eq!(file.token_at(t0 + 3 * second), "third", "empty file");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(file.token_at(t0 + 4 * second), "third", "missing file");
        // ...and the file coming back is picked up at the next check.
        replace(&path, "fourth");
        assert_eq!(file.token_at(t0 + 5 * second), "fourth");

        // A clock that goes backwards (the lock taken by an older `now`) re-reads nothing.
        replace(&path, "fifth");
        assert_eq!(file.token_at(t0), "fourth");

        // The Authorization value follows the token, and is marked sensitive.
        let authorization = file.refreshed(t0, |c| c.authorization.clone());
        assert_eq!(authorization, "Bearer fourth");
        assert!(authorization.is_sensitive());
        // A token no header can carry is kept out like an unreadable one.
        replace(&path, "six\nth");
        assert_eq!(file.token_at(t0 + 6 * second), "fourth");
        assert_eq!(
            file.refreshed(t0 + 6 * second, |c| c.authorization.clone()),
            "Bearer fourth"
        );
        replace(&path, "seventh");
        assert_eq!(
            file.refreshed(t0 + 7 * second, |c| c.authorization.clone()),
            "Bearer seventh"
        );

        // Starting without a usable file is an error that names the file.
        std::fs::remove_file(&path).unwrap();
        let missing = TokenFile::new(path.clone(), second).unwrap_err();
        assert!(
            missing.contains("reading token file") && missing.contains("token"),
            "{missing}"
        );
        std::fs::write(&path, "\n").unwrap();
        assert!(
            TokenFile::new(path.clone(), second)
                .unwrap_err()
                .contains("is empty")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn upstream_uris_keep_the_base_path() {
        let uri = |upstream: &Upstream, path: &str| {
            upstream
                .uri_for(&path.parse().unwrap())
                .map(|uri| uri.to_string())
        };
        let config = kube::Config::new("https://10.0.0.1:6443/k8s/clusters/c-1/".parse().unwrap());
        let upstream = Upstream::kubernetes(&config, None, DEFAULT_STREAMS_PER_CONNECTION).unwrap();
        assert_eq!(
            uri(&upstream, "/api/v1/pods?watch=1").unwrap(),
            "https://10.0.0.1:6443/k8s/clusters/c-1/api/v1/pods?watch=1"
        );
        // Nothing leaves the base path: a dot segment below it, escaped or not, is refused.
        for path in [
            "/../c-2/api/v1/secrets",
            "/api/v1/%2e%2E/%2E%2e/c-2/api",
            "/api/./v1",
            "/api/v1/.",
            "/api/v1/%2e",
            "/api/.%2e",
        ] {
            let refused = uri(&upstream, path).unwrap_err();
            assert!(
                refused.to_string().contains("/k8s/clusters/c-1"),
                "{path}: {refused}"
            );
        }
        for path in [
            "/api/v1/namespaces/a..b/pods",
            "/api/...",
            "/api/.x",
            "/api/%2e%2e%2e",
        ] {
            assert!(uri(&upstream, path).is_ok(), "{path}");
        }
        // A query is not a path.
        assert!(uri(&upstream, "/api?x=/../y").is_ok());
        // Without a base path there is nothing to leave: the member's server judges.
        let plain = kube::Config::new("https://10.0.0.1:6443".parse().unwrap());
        let plain = Upstream::kubernetes(&plain, None, DEFAULT_STREAMS_PER_CONNECTION).unwrap();
        assert_eq!(
            uri(&plain, "/api/../x").unwrap(),
            "https://10.0.0.1:6443/api/../x"
        );
        let named = Upstream::named("ks-apiserver.kubesphere-system.svc:80").unwrap();
        assert_eq!(
            uri(&named, "/kapis/x").unwrap(),
            "http://ks-apiserver.kubesphere-system.svc:80/kapis/x"
        );
    }
}
