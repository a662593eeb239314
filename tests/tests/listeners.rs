//! What the listeners let in and for how long, against the real server.
//!
//! An HTTP/2 connection that sends its preface, answers pings and never a request is
//! closed after the first-request deadline, one whose last request ended after the idle
//! deadline (hyper closes neither by itself); an HTTP/1.1 one whose next request does not
//! come within the header read timeout, but never during a long request. A flood of
//! connections past the frontend's limit is closed as soon as accepted, counted and
//! logged a line per interval, while the admin listener keeps answering the kubelet's
//! probes and agents keep connecting.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_e2e::{Https, Member, Server, admin_get, agent, server, wait_for};

/// A metric's value (an exact name, labels included), 0 when absent.
fn metric(server: &Server, name: &str) -> f64 {
    tower_e2e::metric_value(server.admin, name).unwrap_or(0.0)
}

/// TLS to `addr` offering only `h2`, as a client that means to speak HTTP/2.
async fn h2_tls(
    addr: SocketAddr,
    https: &Https,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut tls = https.tls().clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("localhost".try_into().expect("name"), tcp)
        .await
        .expect("TLS");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    stream
}

const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const ACK: u8 = 1;

fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags, 0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}

/// What an idle HTTP/2 client saw before the server closed its connection.
#[derive(Debug)]
struct Closed {
    after: Duration,
    goaway: bool,
}

/// Sends the HTTP/2 preface and SETTINGS, then only answers (SETTINGS and PING acks)
/// until the server closes the connection, or `limit` passes (`None`).
async fn idle_h2_client(addr: SocketAddr, https: &Https, limit: Duration) -> Option<Closed> {
    let mut stream = h2_tls(addr, https).await;
    let start = Instant::now();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    stream
        .write_all(&frame(SETTINGS, 0, &[]))
        .await
        .expect("settings");
    let mut goaway = false;
    let read = async {
        let mut head = [0u8; 9];
        loop {
            if stream.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if stream.read_exact(&mut payload).await.is_err() {
                return;
            }
            let answer = match (head[3], head[4] & ACK) {
                (SETTINGS, 0) => Some(frame(SETTINGS, ACK, &[])),
                (PING, 0) => Some(frame(PING, ACK, &payload)),
                (GOAWAY, _) => {
                    goaway = true;
                    None
                }
                _ => None,
            };
            if let Some(answer) = answer
                && stream.write_all(&answer).await.is_err()
            {
                return;
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some(Closed {
        after: start.elapsed(),
        goaway,
    })
}

#[test]
fn http2_connections_without_requests_are_closed_after_the_first_request_and_idle_deadlines() {
    const IDLE_CLIENTS: usize = 20;
    let server = server()
        .args(&[
            "--header-read-timeout",
            "1s",
            "--idle-connection-timeout",
            "2s",
        ])
        .start();
    let https = Https::frontend(&server);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let limit = Duration::from_secs(8);
    let closed = runtime.block_on(async {
        let clients = (0..IDLE_CLIENTS).map(|_| idle_h2_client(server.frontend, &https, limit));
        futures::future::join_all(clients).await
    });
    for (i, seen) in closed.iter().enumerate() {
        let seen = seen.as_ref().unwrap_or_else(|| {
            panic!("idle HTTP/2 client {i} was still connected after {limit:?}")
        });
        assert!(seen.goaway, "client {i} was told why (GOAWAY): {seen:?}");
        assert!(
            seen.after >= Duration::from_millis(900) && seen.after < Duration::from_secs(6),
            "client {i} closed after {:?}, not about the 1 s first-request deadline: {seen:?}",
            seen.after
        );
    }
    wait_for("the closes to be counted", Duration::from_secs(5), || {
        (metric(
            &server,
            "tower_requests_limited_total{reason=\"first_request_timeout\"}",
        ) >= IDLE_CLIENTS as f64)
            .then_some(())
    });

    // One request, then nothing: closed the idle deadline after the request ended.
    let (answered, closed_after) = runtime.block_on(async {
        let stream = h2_tls(server.frontend, &https).await;
        let (mut sender, connection) =
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .expect("handshake");
        let connection = tokio::spawn(connection);
        let response = sender
            .send_request(
                http::Request::get("https://localhost/clusters/member-1/version")
                    .body(Empty::new())
                    .expect("request"),
            )
            .await
            .expect("response");
        let status = response.status();
        response.into_body().collect().await.expect("body");
        let ended = Instant::now();
        tokio::time::timeout(limit, connection)
            .await
            .expect("the idle connection to be closed")
            .expect("connection task")
            .expect("a clean close (GOAWAY)");
        (status, ended.elapsed())
    });
    assert_eq!(answered, 401, "no token");
    assert!(
        closed_after >= Duration::from_millis(1800) && closed_after < Duration::from_secs(6),
        "closed {closed_after:?} after its request; the idle deadline is 2 s"
    );
    assert!(
        metric(
            &server,
            "tower_requests_limited_total{reason=\"connection_idle_timeout\"}"
        ) >= 1.0
    );
}

/// An HTTP/1.1 connection is closed once no request came for --header-read-timeout after
/// its last response ended, but never while a request runs longer than that (a watch).
/// The server keeps one timer per connection for this, not hyper's one per request.
#[test]
fn http1_connections_close_when_idle_between_requests_never_during_one() {
    let member = Member::start();
    let server = server().args(&["--header-read-timeout", "1s"]).start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let https = Https::frontend(&server);
    let user = Server::minter().user_token("alice", &[], None);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (status, body, took, closed_after) = runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(server.frontend)
            .await
            .expect("connect");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(https.tls().clone()))
            .connect("localhost".try_into().expect("name"), tcp)
            .await
            .expect("TLS");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("handshake");
        let connection = tokio::spawn(connection);
        let started = Instant::now();
        let response = sender
            .send_request(
                http::Request::get(
                    "/clusters/member-1/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=2",
                )
                .header("host", "localhost")
                .header("authorization", format!("Bearer {user}"))
                .body(Empty::<Bytes>::new())
                .expect("request"),
            )
            .await
            .expect("response");
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes());
        let ended = Instant::now();
        tokio::time::timeout(Duration::from_secs(8), connection)
            .await
            .expect("the idle connection to be closed")
            .expect("connection task")
            .expect("a clean close between requests");
        (status, body, ended - started, ended.elapsed())
    });
    assert_eq!(status, 200);
    body.expect("the watch's body, whole: not cut at the 1 s header read timeout");
    assert!(
        took >= Duration::from_millis(1900),
        "the watch ended after {took:?}, before its own 2 s"
    );
    assert!(
        closed_after >= Duration::from_millis(900) && closed_after < Duration::from_secs(5),
        "closed {closed_after:?} after its response ended; the deadline is 1 s"
    );
    assert!(
        metric(
            &server,
            "tower_requests_limited_total{reason=\"header_read_timeout\"}"
        ) >= 1.0
    );
}

/// A TCP connection to `addr` from `source` (any 127.0.0.0/8 address is this host's).
async fn connect_from(source: &str, addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{source}:0").parse().expect("source"))
        .expect("bind the source");
    socket.connect(addr).await.expect("connect")
}

/// Whether the server closed `tcp` within `within` (a refused connection is closed as
/// soon as it is accepted).
async fn closed_within(tcp: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[test]
fn a_flooded_frontend_leaves_probes_and_agents_served_and_logs_a_line_not_a_flood() {
    const PER_SOURCE: usize = 30;
    const LISTENER: usize = 40;
    const FLOOD: usize = 200;
    let member = Member::start();
    let server = server()
        .args(&[
            "--max-frontend-connections",
            &LISTENER.to_string(),
            "--max-connections-per-source",
            &PER_SOURCE.to_string(),
            // The held connections never start TLS: keep them for the whole test.
            "--handshake-timeout",
            "120s",
        ])
        .start();
    let frontend = server.frontend;
    let open = "tower_connections{listener=\"frontend\"}";
    let runtime = tokio::runtime::Runtime::new().expect("runtime");

    // One source fills its share; the next connection from it is closed at once.
    let mut held = runtime.block_on(async {
        let mut held = Vec::new();
        for _ in 0..PER_SOURCE {
            held.push(connect_from("127.0.0.1", frontend).await);
        }
        held
    });
    wait_for(
        "the first source's connections",
        Duration::from_secs(10),
        || (metric(&server, open) == PER_SOURCE as f64).then_some(()),
    );
    runtime.block_on(async {
        let mut extra = connect_from("127.0.0.1", frontend).await;
        assert!(
            closed_within(&mut extra, Duration::from_secs(5)).await,
            "a connection past --max-connections-per-source was kept"
        );
    });
    // Another source fills the listener; then everything is closed at once.
    runtime.block_on(async {
        for _ in PER_SOURCE..LISTENER {
            held.push(connect_from("127.0.0.2", frontend).await);
        }
    });
    wait_for("the listener to be full", Duration::from_secs(10), || {
        (metric(&server, open) == LISTENER as f64).then_some(())
    });
    let flood_started = Instant::now();
    let refused = runtime.block_on(async {
        let flood = (0..FLOOD).map(|i| async move {
            let source = if i % 2 == 0 { "127.0.0.2" } else { "127.0.0.3" };
            let mut tcp = connect_from(source, frontend).await;
            closed_within(&mut tcp, Duration::from_secs(5)).await
        });
        futures::future::join_all(flood).await
    });
    let flood_took = flood_started.elapsed();
    assert!(
        refused.iter().all(|closed| *closed),
        "{} of {FLOOD} connections past --max-frontend-connections were kept",
        refused.iter().filter(|c| !**c).count()
    );
    assert_eq!(metric(&server, open), LISTENER as f64);

    // While the frontend is full: the kubelet's probes, metrics, and a new agent's
    // tunnel handshake all get in.
    assert_eq!(admin_get(server.admin, "/healthz").0, 200);
    assert_eq!(admin_get(server.admin, "/readyz").0, 200);
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let handshake = Https::to(&server, server.tunnel).get("/healthz", None);
    assert_eq!(handshake.status, 200);

    let refused_total = |reason: &str| {
        metric(
            &server,
            &format!(
                "tower_connections_refused_total{{listener=\"frontend\",reason=\"{reason}\"}}"
            ),
        )
    };
    assert!(refused_total("source_limit") >= 1.0);
    assert!(refused_total("listener_limit") >= FLOOD as f64);
    assert_eq!(
        metric(
            &server,
            "tower_connections_refused_total{listener=\"admin\",reason=\"listener_limit\"}"
        ),
        0.0
    );

    // A line per interval (10 s), with the count it left out, not one per connection.
    let log = server.process.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection refused"))
        .collect();
    let allowed = 1 + (flood_took.as_secs() / 10) as usize + 1;
    assert!(
        !lines.is_empty() && lines.len() <= allowed,
        "{} refusal lines for {} refusals in {flood_took:?}:\n{}",
        lines.len(),
        FLOOD + 1,
        lines.join("\n")
    );
    assert!(lines[0].contains("frontend"), "{}", lines[0]);

    // The flood gone, callers get in again.
    drop(held);
    wait_for(
        "the held connections to be let go",
        Duration::from_secs(10),
        || (metric(&server, open) == 0.0).then_some(()),
    );
    let user = Server::minter().user_token("alice", &[], None);
    let reply = Https::frontend(&server).get("/clusters/member-1/version", Some(&user));
    assert_eq!(reply.status, 200, "{}", reply.body);
}
