//! Shared test harness: a stand-in on 127.0.0.1:0, a scratch directory, kubectl runners and
//! a small HTTPS client.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::process::Command;
use tower_kube_stand_in::{KubeconfigAuth, StandIn};

pub const TOKEN: &str = "stand-in-test-token";
pub const KUBECTL: &str = "kubectl";
/// Upper bound for any single kubectl invocation.
pub const KUBECTL_DEADLINE: Duration = Duration::from_secs(60);

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A running stand-in plus a scratch directory holding its kubeconfigs.
pub struct Harness {
    pub stand_in: StandIn,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Harness {
    /// A stand-in with the permissive fixture binding ([`StandIn::start`]).
    pub async fn start() -> Harness {
        Harness::start_with(false).await
    }

    /// A stand-in with only the bootstrap policy ([`StandIn::start_strict`]).
    pub async fn start_strict() -> Harness {
        Harness::start_with(true).await
    }

    async fn start_with(strict: bool) -> Harness {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stand_in = if strict {
            StandIn::start_strict(listener, TOKEN).await.unwrap()
        } else {
            StandIn::start(listener, TOKEN).await.unwrap()
        };
        let dir = std::env::temp_dir().join(format!(
            "kube-stand-in-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("token.kubeconfig");
        std::fs::write(&kubeconfig, stand_in.kubeconfig_yaml(KubeconfigAuth::Token)).unwrap();
        Harness {
            stand_in,
            dir,
            kubeconfig,
        }
    }

    /// Writes a file into the scratch directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// A kubeconfig like the token one, with `token` instead of the stand-in's own.
    pub fn kubeconfig_for_token(&self, name: &str, token: &str) -> PathBuf {
        let yaml = self
            .stand_in
            .kubeconfig_yaml(KubeconfigAuth::Token)
            .replace(self.stand_in.token(), token);
        self.write(name, &yaml)
    }

    /// Runs kubectl with the given kubeconfig to completion.
    pub async fn run_with(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        let mut cmd = self.kubectl_with(kubeconfig);
        cmd.args(args);
        run_output(cmd, args).await
    }

    /// Runs kubectl with the given kubeconfig and insists on success; returns stdout.
    pub async fn ok_with(&self, kubeconfig: &Path, args: &[&str]) -> String {
        let out = self.run_with(kubeconfig, args).await;
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs kubectl, insists on failure, and returns its stderr.
    pub async fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            !out.status.success(),
            "kubectl {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// A kubectl command for the token kubeconfig.
    pub fn kubectl(&self) -> Command {
        self.kubectl_with(&self.kubeconfig)
    }

    /// A kubectl command for the given kubeconfig, with its own discovery cache.
    pub fn kubectl_with(&self, kubeconfig: &Path) -> Command {
        let mut cmd = Command::new(KUBECTL);
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .arg("--request-timeout=30s")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs kubectl to completion (bounded by [`KUBECTL_DEADLINE`]).
    pub async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.kubectl();
        cmd.args(args);
        run_output(cmd, args).await
    }

    /// Runs kubectl and insists on success; returns stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// An HTTPS client connection to the stand-in (trusting its CA, no client cert).
    pub async fn connect(&self) -> Client {
        Client::connect(&self.stand_in).await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub async fn run_output(mut cmd: Command, what: &[&str]) -> Output {
    let child = cmd.spawn().unwrap();
    match tokio::time::timeout(KUBECTL_DEADLINE, child.wait_with_output()).await {
        Ok(out) => out.unwrap(),
        Err(_) => panic!("kubectl {what:?} did not finish within {KUBECTL_DEADLINE:?}"),
    }
}

/// Polls `cond` until it holds or `deadline` passes.
pub async fn eventually(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One HTTP/1.1-over-TLS connection.
pub struct Client {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    authority: String,
}

impl Client {
    pub async fn connect(stand_in: &StandIn) -> Client {
        let tls = tls_connect(stand_in).await;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Client {
            send,
            authority: stand_in.addr().to_string(),
        }
    }

    /// Sends a request; `token` adds `Authorization: Bearer`.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> hyper::Response<Incoming> {
        self.try_request(method, path, token, body).await.unwrap()
    }

    /// Sends a request, or says why the connection could not carry it.
    pub async fn try_request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Result<hyper::Response<Incoming>, hyper::Error> {
        self.try_request_with(method, path, token, &[], body).await
    }

    /// Sends a request with extra headers (`Impersonate-*`, say).
    pub async fn request_with(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> hyper::Response<Incoming> {
        self.try_request_with(method, path, token, headers, body)
            .await
            .unwrap()
    }

    async fn try_request_with(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> Result<hyper::Response<Incoming>, hyper::Error> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.authority);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        self.send.ready().await?;
        self.send.send_request(req.body(body).unwrap()).await
    }

    /// PATCH with the token and a body of the given type.
    pub async fn patch(
        &mut self,
        path: &str,
        content_type: &str,
        body: &str,
    ) -> hyper::Response<Incoming> {
        let req = Request::builder()
            .method("PATCH")
            .uri(path)
            .header("host", &self.authority)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        self.send.ready().await.unwrap();
        self.send.send_request(req).await.unwrap()
    }

    /// GET with the token.
    pub async fn get(&mut self, path: &str) -> hyper::Response<Incoming> {
        self.request("GET", path, Some(TOKEN), None).await
    }
}

/// Reads a whole body.
pub async fn body_bytes(resp: hyper::Response<Incoming>) -> Bytes {
    resp.into_body().collect().await.unwrap().to_bytes()
}

/// Reads a whole body as JSON.
pub async fn body_json(resp: hyper::Response<Incoming>) -> serde_json::Value {
    serde_json::from_slice(&body_bytes(resp).await).unwrap()
}

/// Reads newline-delimited JSON events from a streaming body.
pub struct EventReader {
    body: Incoming,
    buf: Vec<u8>,
}

impl EventReader {
    pub fn new(resp: hyper::Response<Incoming>) -> EventReader {
        EventReader {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }

    /// The body, for reading past the events (e.g. to see how the stream ends).
    pub fn into_body(self) -> Incoming {
        self.body
    }

    /// The next event, `None` at the end of the stream; panics after `deadline`.
    pub async fn next(&mut self, deadline: Duration) -> Option<serde_json::Value> {
        tokio::time::timeout(deadline, async {
            loop {
                if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=pos).collect();
                    return Some(serde_json::from_slice(&line).unwrap());
                }
                match self.body.frame().await {
                    Some(frame) => {
                        if let Ok(data) = frame.unwrap().into_data() {
                            self.buf.extend_from_slice(&data);
                        }
                    }
                    None => {
                        assert!(self.buf.is_empty(), "stream ended mid-event");
                        return None;
                    }
                }
            }
        })
        .await
        .expect("watch event within the deadline")
    }
}

/// A TLS stream to the stand-in (trusting its CA).
pub async fn tls_connect(stand_in: &StandIn) -> tokio_rustls::client::TlsStream<TcpStream> {
    try_tls_connect(stand_in).await.unwrap()
}

/// A TLS stream to the stand-in, or why the TCP connect or the handshake failed.
pub async fn try_tls_connect(
    stand_in: &StandIn,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut stand_in.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(stand_in.addr()).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await
}

/// A WebSocket to `path` offering `protocols`; returns the socket and the chosen protocol.
pub async fn ws_connect(
    stand_in: &StandIn,
    path: &str,
    protocols: &str,
) -> (
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>,
    String,
) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut req = format!("wss://{}{path}", stand_in.addr())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    req.headers_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let tls = tls_connect(stand_in).await;
    let (ws, resp) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    let chosen = resp.headers()["sec-websocket-protocol"]
        .to_str()
        .unwrap()
        .to_owned();
    (ws, chosen)
}

/// A binary of the workspace (`tower-server`, say), from the target directory these tests
/// run from; `cargo build --workspace --bins` builds them (CI does so before the tests).
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
        path.display()
    );
    path
}
