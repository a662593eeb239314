//! A small HTTPS client for the frontend: requests read whole or as they stream, and the
//! `/debug/bytes` pattern that lets a test tell a whole body from a cut one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::Server;

/// A minimal HTTPS client for the frontend, trusting the server's CA.
pub struct Https {
    runtime: tokio::runtime::Runtime,
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
}

/// An HTTP/1.1 connection over TLS (server name `localhost`, TCP_NODELAY) to `addr`,
/// its connection task spawned on the current runtime.
pub async fn http1_over_tls<B>(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> hyper::client::conn::http1::SendRequest<B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect("localhost".try_into().expect("name"), tcp)
        .await
        .expect("TLS");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// An HTTP/2 connection over TLS (ALPN `h2`, which the server must choose; server name
/// `localhost`) to `addr`, its connection task spawned on the current runtime.
pub async fn http2_over_tls<B>(
    addr: SocketAddr,
    tls: &rustls::ClientConfig,
) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().expect("name"), tcp)
        .await
        .expect("TLS");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "the server chose HTTP/2"
    );
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// Reads `response` whole; a body that ends in an error is an `Err`, never a short reply.
async fn read_reply(response: http::Response<hyper::body::Incoming>) -> Result<Reply, String> {
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body of a {status} response failed: {e}"))?
        .to_bytes();
    Ok(Reply::new(status, parts.headers, body))
}

/// A response whose body is read as it arrives ([`Https::stream`]); dropping it closes
/// the connection.
pub struct Streaming {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: http::HeaderMap,
    chunks: std::sync::mpsc::Receiver<Chunk>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// What a streamed body delivered.
#[derive(Debug)]
pub enum Chunk {
    /// Bytes, as they came.
    Data(Bytes),
    /// The body ended cleanly.
    End,
    /// The body ended in an error (cut).
    Failed(String),
}

impl Streaming {
    /// The next chunk, or `None` when none came within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Chunk> {
        match self.chunks.recv_timeout(timeout) {
            Ok(chunk) => Some(chunk),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Some(Chunk::End),
        }
    }

    /// A header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A response whose head was read and whose body is left open ([`Https::open`]).
pub struct OpenResponse {
    /// Status.
    pub status: u16,
    /// The head as received (and the start of the body when the status is not 200).
    pub head: String,
    _stream: rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>,
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body text (lossy UTF-8 of [`Reply::bytes`]).
    pub body: String,
    /// The body as received, byte for byte (still compressed, when it was).
    pub bytes: Bytes,
}

impl Reply {
    fn new(status: u16, headers: http::HeaderMap, bytes: Bytes) -> Reply {
        Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
        }
    }

    /// A header's value as text, if present (and text).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Https {
    /// The TLS configuration this client dials with (trusting the server's CA).
    pub fn tls(&self) -> &rustls::ClientConfig {
        &self.tls
    }

    /// A client for `server`'s frontend.
    pub fn frontend(server: &Server) -> Self {
        Self::to(server, server.frontend)
    }

    /// A client for `addr`, trusting `server`'s CA.
    pub fn to(server: &Server, addr: SocketAddr) -> Self {
        Self::with_ca(&server.ca_pem, addr)
    }

    /// A client for `addr`, trusting the CA in `ca_pem`.
    pub fn with_ca(ca_pem: &str, addr: SocketAddr) -> Self {
        let certs = tower_tunnel::tls::certs_from_pem(ca_pem.as_bytes()).expect("CA");
        let tls =
            tower_tunnel::tls::client_config(&tower_tunnel::tls::CaTrust::Certificates(certs))
                .expect("tls");
        Https {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            tls,
            addr,
        }
    }

    /// An HTTP/1.1 connection over TLS to the address, ready for requests.
    async fn connect<B>(&self) -> hyper::client::conn::http1::SendRequest<B>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        http1_over_tls(self.addr, self.tls.clone()).await
    }

    /// Sends a request with optional bearer token and extra headers; reads it whole.
    /// Panics if the answer takes more than 30 s (tower must never hang a caller).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Reply {
        match self.try_request(method, path, token, headers) {
            Ok(reply) => reply,
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    /// Like [`Https::request`], but a body that ends in an error (a truncated stream)
    /// is an `Err` rather than a panic.
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        let exchange = async {
            let mut sender = self.connect().await;
            let mut builder = http::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "localhost");
            if let Some(token) = token {
                builder = builder.header("authorization", format!("Bearer {token}"));
            }
            for (k, v) in headers {
                builder = builder.header(*k, *v);
            }
            let response = sender
                .send_request(builder.body(Empty::<Bytes>::new()).expect("request"))
                .await
                .expect("response");
            read_reply(response).await
        };
        self.runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), exchange)
                .await
                .map_err(|_| "no complete answer within 30 s".to_string())?
        })
    }

    /// Downloads `path` (the stand-in's `/debug/bytes` pattern: byte i = i % 251),
    /// checking every byte as it streams in; returns the count. Panics on a mismatch or
    /// a body that ends in an error.
    pub fn download_checked(&self, path: &str, token: &str) -> u64 {
        self.runtime.block_on(async {
            let mut sender = self.connect().await;
            let request = http::Request::get(path)
                .header("host", "localhost")
                .header("authorization", format!("Bearer {token}"))
                .body(Empty::<Bytes>::new())
                .expect("request");
            let response = sender.send_request(request).await.expect("response");
            assert_eq!(response.status(), 200);
            let mut body = response.into_body();
            let mut offset: u64 = 0;
            while let Some(frame) = body.frame().await {
                let frame = frame.expect("the body must not end in an error");
                if let Some(data) = frame.data_ref() {
                    if let Some(at) = pattern_mismatch(offset, data) {
                        panic!("byte {at} is wrong");
                    }
                    offset += data.len() as u64;
                }
            }
            offset
        })
    }

    /// Sends a GET with `headers` over its own HTTP/1.1 connection, on a thread of its own,
    /// and returns once the response head is in; the body is read as it arrives
    /// ([`Streaming::next`]) until the returned value is dropped.
    pub fn stream(&self, path: &str, token: &str, headers: &[(&str, &str)]) -> Streaming {
        let (addr, tls) = (self.addr, self.tls.clone());
        let mut request = http::Request::get(path)
            .header("host", "localhost")
            .header("authorization", format!("Bearer {token}"));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request.body(Empty::<Bytes>::new()).expect("request");
        let (head_tx, head_rx) = std::sync::mpsc::channel();
        let (chunk_tx, chunks) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let path = path.to_owned();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let mut sender = http1_over_tls(addr, tls).await;
                let response = match sender.send_request(request).await {
                    Ok(response) => response,
                    Err(e) => {
                        let _ = head_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let (parts, mut body) = response.into_parts();
                let _ = head_tx.send(Ok((parts.status.as_u16(), parts.headers)));
                tokio::pin!(stopped);
                loop {
                    let frame = tokio::select! {
                        _ = &mut stopped => return,
                        frame = body.frame() => frame,
                    };
                    let chunk = match frame {
                        None => Chunk::End,
                        Some(Err(e)) => Chunk::Failed(e.to_string()),
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) => Chunk::Data(data),
                            Err(_) => continue,
                        },
                    };
                    let last = !matches!(chunk, Chunk::Data(_));
                    if chunk_tx.send(chunk).is_err() || last {
                        return;
                    }
                }
            });
        });
        let (status, headers) = head_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("GET {path}: no response head within 30 s ({e})"))
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        Streaming {
            status,
            headers,
            chunks,
            _stop: stop,
        }
    }

    /// Sends a GET over its own HTTP/1.1 connection and reads only the response head;
    /// the response (a watch, say) stays open until the returned value is dropped.
    pub fn open(&self, path: &str, token: &str) -> OpenResponse {
        use std::io::{Read, Write};
        let tcp = std::net::TcpStream::connect(self.addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let connection =
            rustls::ClientConnection::new(self.tls.clone(), "localhost".try_into().expect("name"))
                .expect("TLS");
        let mut stream = rustls::StreamOwned::new(connection, tcp);
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .expect("send");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                other => panic!("GET {path}: the head ended early ({other:?})"),
            }
        }
        let mut head = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("GET {path}: no status in {head:?}"));
        if status != 200 {
            // An error's body is short: keep its first bytes for the message.
            let mut body = [0u8; 1024];
            if let Ok(n) = stream.read(&mut body) {
                head.push_str(&String::from_utf8_lossy(&body[..n]));
            }
        }
        OpenResponse {
            status,
            head,
            _stream: stream,
        }
    }

    /// Opens TLS, sends `partial` (headers that never end) and reads until the server
    /// closes; returns what it answered. Fails if it keeps the connection past 20 s.
    pub fn stall(&self, partial: &[u8]) -> Result<Vec<u8>, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.runtime.block_on(async {
            let tcp = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|e| e.to_string())?;
            let mut tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect("localhost".try_into().expect("name"), tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(partial).await.map_err(|e| e.to_string())?;
            let mut answer = Vec::new();
            match tokio::time::timeout(Duration::from_secs(20), tls.read_to_end(&mut answer)).await
            {
                Ok(_) => Ok(answer),
                Err(_) => Err("the server kept a stalled connection open".into()),
            }
        })
    }

    /// POSTs `size` generated bytes (byte i = i % 251) to `path` as a streamed body,
    /// never holding more than 64 KiB of it; returns the reply.
    pub fn upload(&self, path: &str, token: &str, size: u64) -> Reply {
        use http_body_util::StreamBody;
        self.runtime.block_on(async {
            let mut sender = self.connect().await;
            const CHUNK: u64 = 64 * 1024;
            let mut offset = 0u64;
            let chunks = futures::stream::poll_fn(move |_| {
                if offset >= size {
                    return std::task::Poll::Ready(None);
                }
                let n = CHUNK.min(size - offset);
                let data: Vec<u8> = (offset..offset + n).map(|i| (i % 251) as u8).collect();
                offset += n;
                std::task::Poll::Ready(Some(Ok::<_, std::convert::Infallible>(
                    hyper::body::Frame::data(Bytes::from(data)),
                )))
            });
            let request = http::Request::post(path)
                .header("host", "localhost")
                .header("authorization", format!("Bearer {token}"))
                .header("content-length", size.to_string())
                .body(StreamBody::new(chunks))
                .expect("request");
            let response = sender.send_request(request).await.expect("response");
            let status = response.status().as_u16();
            let (parts, body) = response.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            Reply::new(status, parts.headers, body)
        })
    }

    /// GET with a token.
    pub fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.request("GET", path, token, &[])
    }
}

// Helpers for the chaos, bad-input-after-the-upgrade and HAProxy suites.

/// How a GET of the stand-in's `/debug/bytes` pattern ended, as the caller saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// No response: connect, TLS or the exchange failed before a status line came.
    NoResponse(String),
    /// A response whose body ended in an error the client sees (a cut stream).
    Cut {
        /// Its status.
        status: u16,
        /// Body bytes that came before the error.
        received: u64,
        /// The error.
        error: String,
    },
    /// A response whose body ended cleanly.
    Complete {
        /// Its status.
        status: u16,
        /// Body bytes received.
        received: u64,
        /// The offset of the first byte that is not the pattern (200 responses only).
        first_mismatch: Option<u64>,
        /// How the body was delimited.
        framing: Framing,
        /// The start of a non-200 body (a `Status` message, say); empty for a 200.
        excerpt: String,
    },
    /// No complete answer within the deadline.
    TimedOut {
        /// Body bytes that came before the deadline.
        received: u64,
    },
}

/// How an HTTP/1.1 response body was delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Neither: the body ends where the connection does, so a cut looks like an end.
    UntilClose,
}

/// `len` bytes of the `/debug/bytes` pattern (byte i = i % 251) starting at `offset`;
/// `len` is at most 64 KiB.
pub fn pattern_slice(offset: u64, len: usize) -> &'static [u8] {
    static PATTERN: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    const MAX: usize = 64 * 1024;
    assert!(len <= MAX, "pattern slices are at most 64 KiB");
    let pattern = PATTERN.get_or_init(|| (0..MAX + 251).map(|i| (i % 251) as u8).collect());
    let start = (offset % 251) as usize;
    &pattern[start..start + len]
}

/// The offset of the first byte of `data` (which starts at `offset` of a body) that is
/// not the pattern; compares 64 KiB slices, so it is fast even in a debug build.
pub fn pattern_mismatch(offset: u64, data: &[u8]) -> Option<u64> {
    let mut at = 0usize;
    for piece in data.chunks(64 * 1024) {
        let want = pattern_slice(offset + at as u64, piece.len());
        if piece != want {
            let i = piece
                .iter()
                .zip(want)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Some(offset + (at + i) as u64);
        }
        at += piece.len();
    }
    None
}

/// Like [`http1_over_tls`], but a failure to connect is an error rather than a panic.
pub async fn try_http1_over_tls<B>(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<hyper::client::conn::http1::SendRequest<B>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect("localhost".try_into().expect("name"), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

impl Https {
    /// GETs `path` (the stand-in's `/debug/bytes`), checking a 200's body against the
    /// pattern as it streams in, never panicking: every way it can end is a [`Fetched`].
    /// A body that hyper ends with an error (short of its `Content-Length`, a chunked
    /// body without its last chunk, a reset) is [`Fetched::Cut`].
    pub fn fetch_pattern(&self, path: &str, token: &str, deadline: Duration) -> Fetched {
        let mut received = 0u64;
        let exchange = async {
            let mut sender = match try_http1_over_tls(self.addr, self.tls.clone()).await {
                Ok(sender) => sender,
                Err(e) => return Fetched::NoResponse(e),
            };
            let request = http::Request::get(path)
                .header("host", "localhost")
                .header("authorization", format!("Bearer {token}"))
                .body(Empty::<Bytes>::new())
                .expect("request");
            let response = match sender.send_request(request).await {
                Ok(response) => response,
                Err(e) => return Fetched::NoResponse(format!("request: {e}")),
            };
            let status = response.status().as_u16();
            let headers = response.headers();
            let framing = if let Some(length) = headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
            {
                Framing::Length(length)
            } else if headers
                .get(http::header::TRANSFER_ENCODING)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
            {
                Framing::Chunked
            } else {
                Framing::UntilClose
            };
            let mut body = response.into_body();
            let mut first_mismatch = None;
            let mut excerpt = Vec::new();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Some(data) = frame.data_ref() {
                            if status == 200 && first_mismatch.is_none() {
                                first_mismatch = pattern_mismatch(received, data);
                            }
                            if status != 200 && excerpt.len() < 300 {
                                excerpt.extend(data.iter().take(300 - excerpt.len()));
                            }
                            received += data.len() as u64;
                        }
                    }
                    Err(e) => {
                        return Fetched::Cut {
                            status,
                            received,
                            error: e.to_string(),
                        };
                    }
                }
            }
            Fetched::Complete {
                status,
                received,
                first_mismatch,
                framing,
                excerpt: String::from_utf8_lossy(&excerpt).into_owned(),
            }
        };
        let outcome = self
            .runtime
            .block_on(async { tokio::time::timeout(deadline, exchange).await });
        outcome.unwrap_or(Fetched::TimedOut { received })
    }

    /// POSTs `size` pattern bytes to `path` like [`Https::upload`], but every failure
    /// (connect, a request body cut, a response cut, the deadline) is an `Err`.
    pub fn try_upload(
        &self,
        path: &str,
        token: &str,
        size: u64,
        deadline: Duration,
    ) -> Result<Reply, String> {
        use http_body_util::StreamBody;
        let exchange = async {
            let mut sender = try_http1_over_tls(self.addr, self.tls.clone()).await?;
            const CHUNK: u64 = 64 * 1024;
            let mut offset = 0u64;
            let chunks = futures::stream::poll_fn(move |_| {
                if offset >= size {
                    return std::task::Poll::Ready(None);
                }
                let n = CHUNK.min(size - offset);
                let data = Bytes::from_static(pattern_slice(offset, n as usize));
                offset += n;
                std::task::Poll::Ready(Some(Ok::<_, std::convert::Infallible>(
                    hyper::body::Frame::data(data),
                )))
            });
            let request = http::Request::post(path)
                .header("host", "localhost")
                .header("authorization", format!("Bearer {token}"))
                .header("content-length", size.to_string())
                .body(StreamBody::new(chunks))
                .expect("request");
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("request: {e}"))?;
            read_reply(response).await
        };
        self.runtime.block_on(async {
            tokio::time::timeout(deadline, exchange)
                .await
                .map_err(|_| format!("no complete answer within {deadline:?}"))?
        })
    }
}
