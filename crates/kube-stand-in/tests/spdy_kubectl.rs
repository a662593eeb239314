//! The real `kubectl` against the stand-in's SPDY/3.1 server side: `port-forward` (tunneled
//! in a WebSocket, kubectl's default, and plain SPDY) and `exec` over SPDY.
//!
//! A tiny plain-HTTP API server inside the test answers the discovery and pod reads kubectl
//! needs and routes the upgrades to `tower_kube_stand_in::spdy`.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tower_kube_stand_in::files::PodFiles;
use tower_kube_stand_in::spdy;

const KUBECTL: &str = "/usr/bin/kubectl";
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const POD_PATH: &str = "/api/v1/namespaces/default/pods/web-0";

/// What the test API server saw of the upgrade requests.
type UpgradeLog = Arc<Mutex<Vec<String>>>;

struct ApiServer {
    addr: SocketAddr,
    upgrades: UpgradeLog,
    dir: PathBuf,
}

impl ApiServer {
    async fn start() -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upgrades = UpgradeLog::default();
        let log = upgrades.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(route(req, addr, &log)) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        let dir = unique_dir();
        std::fs::write(
            dir.join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: http://{addr}\nusers:\n- name: t\n  user: {{}}\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: t\n    namespace: default\ncurrent-context: t\n"
            ),
        )
        .unwrap();
        ApiServer {
            addr,
            upgrades,
            dir,
        }
    }

    fn kubectl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(KUBECTL);
        cmd.env("KUBECONFIG", self.dir.join("kubeconfig"))
            .env("HOME", &self.dir)
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    fn upgrades(&self) -> Vec<String> {
        self.upgrades.lock().unwrap().clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique_dir() -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "spdy-kubectl-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn json(body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = json(serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "code": code.as_u16(),
    }));
    *response.status_mut() = code;
    response
}

fn header_has(req: &Request<Incoming>, name: &str, value: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(value)))
}

fn route(req: Request<Incoming>, addr: SocketAddr, log: &UpgradeLog) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let websocket = header_has(&req, "upgrade", "websocket");
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/api") => json(serde_json::json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string()}],
        })),
        (Method::GET, "/apis") => json(serde_json::json!({
            "kind": "APIGroupList", "apiVersion": "v1", "groups": [],
        })),
        (Method::GET, "/api/v1") => json(serde_json::json!({
            "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
            "resources": [
                {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
                 "verbs": ["get", "list"], "shortNames": ["po"]},
                {"name": "pods/exec", "singularName": "", "namespaced": true, "kind": "PodExecOptions",
                 "verbs": ["create", "get"]},
                {"name": "pods/portforward", "singularName": "", "namespaced": true,
                 "kind": "PodPortForwardOptions", "verbs": ["create", "get"]},
            ],
        })),
        (Method::GET, "/version") => json(serde_json::json!({
            "major": "1", "minor": "32", "gitVersion": "v1.32.0", "platform": "linux/amd64",
        })),
        (Method::GET, POD_PATH) => json(serde_json::json!({
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": "web-0", "namespace": "default", "uid": "0d9f4c1e-0000-4000-8000-000000000001"},
            "spec": {"containers": [{"name": "app", "image": "stand-in", "ports": [{"containerPort": 80, "protocol": "TCP"}]}]},
            "status": {"phase": "Running"},
        })),
        (method, p) if p == format!("{POD_PATH}/portforward") => {
            log.lock().unwrap().push(format!(
                "{method} portforward {}",
                if websocket { "websocket" } else { "spdy" }
            ));
            spdy::portforward(req, ())
        }
        (method, p) if p == format!("{POD_PATH}/exec") => {
            log.lock().unwrap().push(format!(
                "{method} exec {}",
                if websocket { "websocket" } else { "spdy" }
            ));
            if websocket {
                return status(
                    StatusCode::BAD_REQUEST,
                    "this test serves exec over SPDY only",
                );
            }
            let command = query_values(req.uri().query().unwrap_or_default(), "command");
            spdy::exec(
                req,
                command,
                "tester".to_owned(),
                PodFiles::new(),
                tower_kube_stand_in::Resizes::default(),
                (),
            )
        }
        _ => status(StatusCode::NOT_FOUND, &format!("{path} not found")),
    }
}

/// The values of `key` in a form-encoded query (Go encodes spaces as `+`).
fn query_values(query: &str, key: &str) -> Vec<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// Starts `kubectl port-forward pod/web-0 :80` and returns it with the local port it chose.
async fn start_port_forward(server: &ApiServer, websockets: bool) -> (Child, u16) {
    let mut cmd = server.kubectl(&["port-forward", "pod/web-0", ":80", "-v=4"]);
    if !websockets {
        cmd.env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false");
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let port = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("kubectl port-forward exited before forwarding");
        if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
            let port = rest.split_whitespace().next().unwrap();
            assert!(line.ends_with("-> 80"), "unexpected line {line:?}");
            break port.parse::<u16>().unwrap();
        }
    };
    // Keep draining stdout so kubectl never blocks on it ("Handling connection for 80").
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let stderr = child.stderr.take().unwrap();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("kubectl: {line}");
        }
    });
    (child, port)
}

/// Sends `payload` through the forwarded port, half-closes, and reads the echo to EOF.
async fn round_trip(port: u16, payload: Vec<u8>) -> Vec<u8> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&payload).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    });
    let mut echoed = Vec::new();
    rd.read_to_end(&mut echoed).await.unwrap();
    drop(writer.await.unwrap());
    echoed
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

async fn port_forward_echoes(websockets: bool) {
    let server = ApiServer::start().await;
    let (mut child, port) = start_port_forward(&server, websockets).await;

    let small = pattern(4096 + 123, 1);
    assert_eq!(round_trip(port, small.clone()).await, small);

    let big = pattern(1536 * 1024 + 7, 2);
    assert_eq!(round_trip(port, big.clone()).await, big);

    // Several connections at once share the one SPDY connection.
    let parallel: Vec<_> = (0..4u8)
        .map(|i| {
            let payload = pattern(64 * 1024 + usize::from(i), i + 10);
            tokio::spawn(async move { (round_trip(port, payload.clone()).await, payload) })
        })
        .collect();
    for task in parallel {
        let (echoed, payload) = task.await.unwrap();
        assert_eq!(echoed, payload);
    }

    // A connection that closes without sending anything.
    assert!(round_trip(port, Vec::new()).await.is_empty());

    // A client that hangs up without reading its echo leaves the session usable.
    let mut rude = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    rude.write_all(&pattern(256 * 1024, 3)).await.unwrap();
    drop(rude);
    let after = pattern(10_000, 4);
    assert_eq!(round_trip(port, after.clone()).await, after);

    child.kill().await.unwrap();
    let upgrades = server.upgrades();
    let expected = if websockets {
        "GET portforward websocket"
    } else {
        "POST portforward spdy"
    };
    assert!(!upgrades.is_empty());
    assert!(
        upgrades.iter().all(|u| u == expected),
        "upgrades seen: {upgrades:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_over_websocket_tunnel_echoes() {
    tokio::time::timeout(TEST_TIMEOUT, port_forward_echoes(true))
        .await
        .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_over_plain_spdy_echoes() {
    tokio::time::timeout(TEST_TIMEOUT, port_forward_echoes(false))
        .await
        .expect("test timed out");
}

/// Runs `kubectl exec` over SPDY with `stdin` and returns (exit code, stdout, stderr).
async fn exec_spdy(
    server: &ApiServer,
    args: &[&str],
    stdin: Option<Vec<u8>>,
) -> (i32, Vec<u8>, String) {
    let mut full = vec!["exec"];
    full.extend_from_slice(args);
    let mut cmd = server.kubectl(&full);
    cmd.env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false");
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().unwrap();
    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().unwrap();
        tokio::spawn(async move {
            pipe.write_all(&data).await.unwrap();
            pipe.shutdown().await.unwrap();
        })
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (a, b) = tokio::join!(out.read_to_end(&mut stdout), err.read_to_end(&mut stderr));
    a.unwrap();
    b.unwrap();
    let code = child.wait().await.unwrap().code().unwrap_or(-1);
    if let Some(feeder) = feeder {
        feeder.await.unwrap();
    }
    (code, stdout, String::from_utf8_lossy(&stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_spdy_round_trips_stdin_and_exit_codes() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let server = ApiServer::start().await;

        let input = pattern(300 * 1024, 5);
        let (code, stdout, stderr) =
            exec_spdy(&server, &["-i", "web-0", "--", "cat"], Some(input.clone())).await;
        assert_eq!(code, 0, "stderr: {stderr}");
        assert_eq!(stdout, input);

        let (code, stdout, stderr) =
            exec_spdy(&server, &["web-0", "--", "echo", "hi", "there"], None).await;
        assert_eq!(code, 0, "stderr: {stderr}");
        assert_eq!(stdout, b"hi there\n");

        let (code, _, stderr) = exec_spdy(&server, &["web-0", "--", "stderr", "oops"], None).await;
        assert_eq!(code, 0);
        assert!(stderr.contains("oops"), "stderr: {stderr}");

        let (code, _, stderr) =
            exec_spdy(&server, &["web-0", "--", "sh", "-c", "exit 3"], None).await;
        assert_eq!(code, 3, "stderr: {stderr}");
        assert!(
            stderr.contains("command terminated with exit code 3"),
            "stderr: {stderr}"
        );

        let upgrades = server.upgrades();
        assert_eq!(upgrades.len(), 4);
        assert!(
            upgrades.iter().all(|u| u == "POST exec spdy"),
            "{upgrades:?}"
        );
    })
    .await
    .expect("test timed out");
}

/// Sends one raw HTTP/1.1 request and returns the response head (status line and headers).
async fn raw_request(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n");
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tcp.read(&mut byte).await.unwrap(),
            1,
            "connection closed mid-head"
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap().to_ascii_lowercase()
}

#[tokio::test]
async fn upgrades_are_negotiated_or_refused_with_400() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let server = ApiServer::start().await;
        let pf = format!("{POD_PATH}/portforward");
        let exec = format!("{POD_PATH}/exec?command=true&stdout=true");
        let spdy = ["Connection: Upgrade", "Upgrade: SPDY/3.1"];

        let head = raw_request(server.addr, "POST", &pf, &[]).await;
        assert!(head.starts_with("http/1.1 400"), "{head}");
        let head = raw_request(
            server.addr,
            "GET",
            &pf,
            &[
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Protocol: v4.channel.k8s.io",
            ],
        )
        .await;
        assert!(head.starts_with("http/1.1 400"), "{head}");
        let head = raw_request(
            server.addr,
            "GET",
            &pf,
            &[
                "Connection: Upgrade",
                "Upgrade: websocket",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Protocol: v4.channel.k8s.io, SPDY/3.1+portforward.k8s.io",
            ],
        )
        .await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(
            head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        assert!(
            head.contains("sec-websocket-protocol: spdy/3.1+portforward.k8s.io"),
            "{head}"
        );
        let head = raw_request(
            server.addr,
            "POST",
            &pf,
            &[
                spdy[0],
                spdy[1],
                "X-Stream-Protocol-Version: v4.channel.k8s.io",
            ],
        )
        .await;
        assert!(head.starts_with("http/1.1 400"), "{head}");
        let head = raw_request(
            server.addr,
            "POST",
            &pf,
            &[
                spdy[0],
                spdy[1],
                "X-Stream-Protocol-Version: portforward.k8s.io",
            ],
        )
        .await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: spdy/3.1"), "{head}");
        assert!(
            head.contains("x-stream-protocol-version: portforward.k8s.io"),
            "{head}"
        );

        let head = raw_request(server.addr, "POST", &exec, &[]).await;
        assert!(head.starts_with("http/1.1 400"), "{head}");
        let head = raw_request(
            server.addr,
            "POST",
            &exec,
            &[
                spdy[0],
                spdy[1],
                "X-Stream-Protocol-Version: v5.channel.k8s.io",
            ],
        )
        .await;
        assert!(head.starts_with("http/1.1 400"), "{head}");
        let head = raw_request(
            server.addr,
            "POST",
            &exec,
            &[
                spdy[0],
                spdy[1],
                "X-Stream-Protocol-Version: v5.channel.k8s.io",
                "X-Stream-Protocol-Version: v3.channel.k8s.io",
                "X-Stream-Protocol-Version: v2.channel.k8s.io",
            ],
        )
        .await;
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(
            head.contains("x-stream-protocol-version: v3.channel.k8s.io"),
            "{head}"
        );
    })
    .await
    .expect("test timed out");
}
