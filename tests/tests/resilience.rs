//! Agent and server restarts: streams end with an error the client sees, never a silent
//! truncation, and the tunnel comes back by itself.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tower_e2e::{
    Https, KubectlStream, Member, Server, agent, kubectl, server, wait_for, wait_for_with,
};

/// Opens a raw watch of member-1's configmaps as alice on a thread of its own, and waits
/// until the member serves it.
fn open_raw_watch(
    server: &Server,
    member: &Member,
) -> std::thread::JoinHandle<Result<tower_e2e::Reply, String>> {
    let https = Https::frontend(server);
    let user = Server::minter().user_token("alice", &[], None);
    let raw = std::thread::spawn(move || {
        https.try_request(
            "GET",
            "/clusters/member-1/api/v1/namespaces/default/configmaps?watch=1",
            Some(&user),
            &[],
        )
    });
    wait_for("the raw watch to be open", Duration::from_secs(10), || {
        member
            .api
            .calls()
            .iter()
            .any(|c| {
                c.path_and_query.contains("watch=1")
                    && !c.path_and_query.contains("fieldSelector")
                    && c.impersonate_user.is_some()
            })
            .then_some(())
    });
    raw
}

/// Waits for a raw watch whose tunnel went away: its body must end in an error, never
/// look complete.
fn assert_cut(raw: std::thread::JoinHandle<Result<tower_e2e::Reply, String>>, what: &str) {
    match raw.join().expect("raw watch thread") {
        Err(e) => assert!(
            e.starts_with("body of a 200 response failed"),
            "{what} must end in a body error: {e}"
        ),
        Ok(reply) => panic!("{what} looked complete: {reply:?}"),
    }
}

#[test]
fn killing_the_agent_mid_watch_is_an_error_and_a_new_agent_serves_at_once() {
    let member = Member::start();
    let server = server().start();
    let mut first = agent(&server, &member, "member-1").connect(&server);
    let kc = server.kubeconfig("member-1", "alice", &[]);

    let watch = KubectlStream::spawn(
        &kc,
        &["get", "configmaps", "-n", "default", "-w", "-o", "name"],
    );
    watch.wait_line("the initial list", Duration::from_secs(30), |l| {
        l == "configmap/settings"
    });

    // A raw watch too: its chunked body must end in an error, not a clean end.
    let raw = open_raw_watch(&server, &member);

    first.process.kill();
    let killed = Instant::now();
    // The body must fail (a cut chunked stream), promptly: neither a clean end nor a
    // hang until the client's own 30 s deadline.
    assert_cut(raw, "a watch cut by a dead agent");
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "the cut reached the client only after {:?}",
        killed.elapsed()
    );
    // kubectl itself treats any end of a watch as the end (it exits 0 even on an
    // unexpected EOF); what matters is that it ends instead of hanging.
    let (_code, _stderr) = watch.wait_exit(Duration::from_secs(30));

    wait_for("the server to notice", Duration::from_secs(10), || {
        (!server.connected("member-1")).then_some(())
    });
    let down = kubectl(&kc, &["get", "pods"]);
    assert_ne!(down.code(), Some(0));
    assert!(
        down.stderr().contains("no agent connected"),
        "{}",
        down.stderr()
    );
    // With no clusters file (this server's registry is open), a name no agent ever
    // used is the same to the server as one whose agent is away: 503, retry, not 404,
    // which clients would take for "this cluster does not exist".
    let never = Https::frontend(&server).get(
        "/clusters/never-seen/api",
        Some(&Server::minter().user_token("alice", &[], None)),
    );
    assert_eq!(never.status, 503, "{}", never.body);
    assert!(never.body.contains("no agent connected"), "{}", never.body);

    let _second = agent(&server, &member, "member-1").connect(&server);
    assert!(
        kubectl(&kc, &["get", "pods", "-o", "name"])
            .success()
            .contains("pod/web-0")
    );
}

#[test]
fn the_agent_comes_back_within_its_backoff_cap_after_a_server_restart() {
    let member = Member::start();
    let mut server = server().start();
    let agent = agent(&server, &member, "member-1").connect(&server);
    let kc = server.kubeconfig("member-1", "alice", &[]);
    kubectl(&kc, &["get", "pods"]).success();

    server.restart();
    let restarted = Instant::now();
    // The agent runs with --reconnect-max 2s; allow the dial and handshake on top, on a
    // loaded machine (the default cap would be far longer).
    wait_for("the agent to reconnect", Duration::from_secs(10), || {
        server.connected("member-1").then_some(())
    });
    eprintln!(
        "agent back {:?} after the server restart",
        restarted.elapsed()
    );
    // The same kubeconfig works: the CA and certificates were reused from the state dir.
    assert!(
        kubectl(&kc, &["get", "pods", "-o", "name"])
            .success()
            .contains("pod/web-0")
    );
    assert!(agent.process.log().contains("tunnel up"));
}

/// A one-connection-at-a-time HTTP CONNECT proxy on loopback that counts what it relayed.
fn connect_proxy() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let tunnels = Arc::new(AtomicUsize::new(0));
    let count = tunnels.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read_exact(&mut byte).is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let Some(target) = head
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split_whitespace().next())
                else {
                    let _ = client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n");
                    return;
                };
                // Loopback only: this proxy relays to nothing else.
                if !target.starts_with("127.0.0.1:") {
                    let _ = client.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n");
                    return;
                }
                let Ok(upstream) = std::net::TcpStream::connect(target) else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                let (mut c2, mut u2) = (
                    client.try_clone().expect("clone"),
                    upstream.try_clone().expect("clone"),
                );
                let mut upstream = upstream;
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut upstream);
                    let _ = upstream.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut u2, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, tunnels)
}

#[test]
fn the_agent_dials_through_https_proxy_and_authenticates_with_a_client_certificate() {
    let member = Member::start_with(tower_kube_stand_in::KubeconfigAuth::ClientCert);
    let server = server().start();
    let (port, relayed) = connect_proxy();
    let _agent = agent(&server, &member, "member-1")
        .env("HTTPS_PROXY", &format!("http://127.0.0.1:{port}"))
        .connect(&server);
    assert_eq!(
        relayed.load(Ordering::SeqCst),
        1,
        "the tunnel went through the proxy"
    );
    let kc = server.kubeconfig("member-1", "dave", &["qa"]);
    assert!(
        kubectl(&kc, &["get", "pods", "-o", "name"])
            .success()
            .contains("pod/web-0")
    );
    let calls = member.api.calls();
    assert!(
        calls
            .iter()
            .all(|c| c.credential.starts_with("client-cert:")),
        "{calls:?}"
    );
    assert!(
        calls
            .iter()
            .all(|c| c.impersonate_user.as_deref() == Some("dave") && !c.saw_authorization),
        "{calls:?}"
    );
}

#[test]
fn no_proxy_bypasses_the_proxy_and_the_flag_names_one_without_the_environment() {
    let member = Member::start();
    let server = server().start();
    let (port, relayed) = connect_proxy();
    let proxy = format!("http://127.0.0.1:{port}");
    // The server's address is inside a NO_PROXY CIDR block: dialed directly.
    let direct = agent(&server, &member, "member-1")
        .env("HTTPS_PROXY", &proxy)
        .env("NO_PROXY", "tower.example, 127.0.0.0/8")
        .connect(&server);
    assert_eq!(relayed.load(Ordering::SeqCst), 0, "NO_PROXY was ignored");
    drop(direct);
    // --https-proxy names a proxy with no environment at all.
    let _flagged = agent(&server, &member, "member-2")
        .args(&["--https-proxy", &proxy])
        .connect(&server);
    assert_eq!(
        relayed.load(Ordering::SeqCst),
        1,
        "--https-proxy was ignored"
    );
}

#[test]
fn a_blackholed_tunnel_is_noticed_on_both_sides_and_replaced() {
    let member = Member::start();
    let server = server().start();
    let relay = tower_e2e::Relay::start(server.tunnel);
    let agent = agent(&server, &member, "member-1")
        .proxy_server(relay.addr)
        .connect(&server);
    let kc = server.kubeconfig("member-1", "alice", &[]);
    kubectl(&kc, &["get", "pods"]).success();
    // The agent redials at once, so "disconnected" may never be visible between two
    // polls; the tunnel is told apart by the relay port the server sees it from.
    let remote = |server: &Server| {
        server.cluster_details().as_array().and_then(|list| {
            list.iter()
                .find(|c| c["name"] == "member-1" && c["connected"] == true)
                .and_then(|c| c["remote_address"].as_str().map(str::to_owned))
        })
    };
    let silent = remote(&server).expect("member-1 connected");
    // A watch open on the tunnel that goes silent.
    let raw = open_raw_watch(&server, &member);

    relay.freeze();
    let frozen = Instant::now();
    let logs = || {
        format!(
            "server log:\n{}\nagent log:\n{}",
            server.process.log(),
            agent.process.log()
        )
    };
    // Keepalive is 2 s on both sides, so a pong is due within 2 s of a ping: 4 s at most.
    wait_for_with(
        "the server to drop the silent tunnel",
        Duration::from_secs(20),
        || (remote(&server).as_ref() != Some(&silent)).then_some(()),
        logs,
    );
    let server_noticed = frozen.elapsed();
    // The server closed the tunnel, and the watch on it ends in an error then: it does not
    // wait for the client's own 30 s deadline (or the server's idle timeout, hours).
    assert_cut(raw, "a watch on a dead tunnel");
    let watch_ended = frozen.elapsed();
    assert!(
        watch_ended < server_noticed + Duration::from_secs(10),
        "the watch ended {watch_ended:?} after the freeze, the tunnel was dropped after {server_noticed:?}"
    );
    wait_for_with(
        "the agent to notice",
        Duration::from_secs(20),
        || {
            agent
                .process
                .log()
                .contains("control stream failed")
                .then_some(())
        },
        logs,
    );
    let agent_noticed = frozen.elapsed();
    // New connections through the relay flow again: the agent dials a fresh tunnel.
    wait_for_with(
        "the agent to be back",
        Duration::from_secs(20),
        || remote(&server).filter(|r| *r != silent).map(|_| ()),
        logs,
    );
    eprintln!(
        "dead link noticed by the server after {server_noticed:?} (its watch ended after {watch_ended:?}), by the agent after {agent_noticed:?}, back after {:?}",
        frozen.elapsed()
    );
    assert!(
        kubectl(&kc, &["get", "pods", "-o", "name"])
            .success()
            .contains("pod/web-0")
    );
}

#[test]
fn sigterm_lets_a_download_in_flight_finish_then_exits() {
    let member = Member::start();
    let mut server = server().args(&["--shutdown-grace", "60s"]).start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let https = Https::frontend(&server);
    let user = Server::minter().user_token("alice", &[], None);
    let size: u64 = 96 << 20;
    let download = std::thread::spawn(move || {
        https.download_checked(
            &format!("/clusters/member-1/debug/bytes?size={size}"),
            &user,
        )
    });
    wait_for("the download to start", Duration::from_secs(10), || {
        member
            .api
            .calls()
            .iter()
            .any(|c| c.path_and_query.starts_with("/debug/bytes"))
            .then_some(())
    });
    server.process.terminate();
    let got = download.join().expect("the download completes");
    assert_eq!(got, size);
    let started = Instant::now();
    assert_eq!(server.process.wait_exit(Duration::from_secs(30)), Some(0));
    eprintln!(
        "server exited {:?} after the download finished",
        started.elapsed()
    );
}
