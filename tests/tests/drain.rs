//! Drain on SIGTERM, on both sides: downloads in flight finish, open watches end cleanly
//! (at an event boundary, as kube-apiserver ends them on shutdown), nothing new is routed
//! to the one going away, and the process exits without waiting out its grace period.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use tower_e2e::{Https, Member, Server, agent, server, wait_for};

/// A raw watch on configmaps of `default`, read to its end on a thread, once it is open.
fn raw_watch(
    server: &Server,
    member: &Member,
) -> std::thread::JoinHandle<Result<tower_e2e::Reply, String>> {
    let https = Https::frontend(server);
    let user = Server::minter().user_token("alice", &[], None);
    once_called(member, "configmaps?watch=1", move || {
        https.try_request(
            "GET",
            "/clusters/member-1/api/v1/namespaces/default/configmaps?watch=1",
            Some(&user),
            &[],
        )
    })
}

/// A byte-checked download of `size` bytes, on a thread, once it has started.
fn download(server: &Server, member: &Member, size: u64) -> std::thread::JoinHandle<u64> {
    let https = Https::frontend(server);
    let user = Server::minter().user_token("alice", &[], None);
    once_called(member, "/debug/bytes", move || {
        https.download_checked(
            &format!("/clusters/member-1/debug/bytes?size={size}"),
            &user,
        )
    })
}

/// Runs `request` on a thread and returns once the member has seen one more call whose
/// path contains `path`.
fn once_called<T: Send + 'static>(
    member: &Member,
    path: &str,
    request: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let calls = || {
        member
            .api
            .calls()
            .iter()
            .filter(|c| c.path_and_query.contains(path))
            .count()
    };
    let before = calls();
    let thread = std::thread::spawn(request);
    wait_for(
        &format!("a call to {path}"),
        Duration::from_secs(10),
        || (calls() > before).then_some(()),
    );
    thread
}

/// The watch delivered events (the initial ADDED ones at least: `default` holds
/// configmaps), and every line of its body is a whole JSON event.
fn assert_whole_events(body: &str) {
    assert!(!body.is_empty(), "an empty watch body proves nothing");
    assert!(body.ends_with('\n'), "{body:?}");
    for line in body.lines() {
        let event: serde_json::Value = serde_json::from_str(line).expect("a whole event");
        assert!(event["type"].is_string(), "{line}");
    }
}

#[test]
fn a_draining_server_ends_watches_cleanly_and_exits_without_waiting_out_its_grace() {
    let member = Member::start();
    let mut server = server().args(&["--shutdown-grace", "60s"]).start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let watch = raw_watch(&server, &member);
    let size: u64 = 256 << 20;
    let download = download(&server, &member, size);

    // Drained mid-flight, or the test proves nothing.
    assert!(!download.is_finished(), "the download ended before SIGTERM");
    let terminated = Instant::now();
    server.process.terminate();
    let watched = watch
        .join()
        .unwrap()
        .expect("the watch ends cleanly, not cut");
    assert_eq!(watched.status, 200);
    assert_whole_events(&watched.body);
    assert_eq!(download.join().expect("the download completes"), size);
    assert_eq!(server.process.wait_exit(Duration::from_secs(30)), Some(0));
    let exited = terminated.elapsed();
    eprintln!("server drained and exited {exited:?} after SIGTERM (grace 60s)");
    assert!(exited < Duration::from_secs(30), "{exited:?}");
}

#[test]
fn a_draining_agent_finishes_its_requests_ends_watches_cleanly_and_exits() {
    let member = Member::start();
    let server = server().start();
    let mut agent = agent(&server, &member, "member-1")
        .args(&["--shutdown-grace", "60s"])
        .connect(&server);
    let watch = raw_watch(&server, &member);
    let size: u64 = 256 << 20;
    let download = download(&server, &member, size);

    assert!(!download.is_finished(), "the download ended before SIGTERM");
    let terminated = Instant::now();
    agent.process.terminate();
    // The server stops routing to it at once: new requests get 503, not a dying tunnel.
    wait_for(
        "the server to unroute the draining agent",
        Duration::from_secs(10),
        || {
            server
                .process
                .log()
                .contains("agent is draining")
                .then_some(())
        },
    );
    let user = Server::minter().user_token("alice", &[], None);
    let fresh = Https::frontend(&server).get("/clusters/member-1/version", Some(&user));
    assert_eq!(fresh.status, 503, "{}", fresh.body);

    let watched = watch
        .join()
        .unwrap()
        .expect("the watch ends cleanly, not cut");
    assert_eq!(watched.status, 200);
    assert_whole_events(&watched.body);
    assert_eq!(download.join().expect("the download completes"), size);
    assert_eq!(agent.process.wait_exit(Duration::from_secs(30)), Some(0));
    let exited = terminated.elapsed();
    eprintln!("agent drained and exited {exited:?} after SIGTERM (grace 60s)");
    assert!(exited < Duration::from_secs(30), "{exited:?}");
    wait_for("the tunnel to be gone", Duration::from_secs(10), || {
        (!server.connected("member-1")).then_some(())
    });
}
