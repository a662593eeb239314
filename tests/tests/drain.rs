//! Drain on SIGTERM, on both sides: downloads in flight finish, open watches end cleanly
//! (at an event boundary, as kube-apiserver ends them on shutdown: a JSON line, a protobuf
//! frame), nothing new is routed to the one going away, and the process exits without
//! waiting out its grace period.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tower_e2e::{Https, Member, Server, agent, kubectl_with_input, server, wait_for};

/// What client-go's informers ask for with protobuf.
const PROTOBUF_WATCH: &str = "application/vnd.kubernetes.protobuf;stream=watch";

/// A watch `raw_watch` opened, in a thread of its own: its whole reply, or why it was cut.
type RawWatch = std::thread::JoinHandle<Result<tower_e2e::Reply, String>>;

/// A raw watch on configmaps of `default` (in protobuf with `protobuf`), asked for with
/// the query `watch` (`watch=1`, say), read to its end on a thread, once it is open.
///
/// kube-apiserver takes any value of `watch` but `0` and `false` for true, none too
/// (`Convert_Slice_string_To_bool`), so Tower must know the watch by every spelling to
/// end it cleanly: one it took for a plain request would hold the drain until the grace
/// period ran out, and be cut then.
fn raw_watch(server: &Server, member: &Member, protobuf: bool, watch: &str) -> RawWatch {
    let https = Https::frontend(server);
    let user = Server::minter().user_token("alice", &[], None);
    let accept: &[(&str, &str)] = if protobuf {
        &[("accept", PROTOBUF_WATCH)]
    } else {
        &[]
    };
    let path = format!("/clusters/member-1/api/v1/namespaces/default/configmaps?{watch}");
    once_called(member, &format!("configmaps?{watch}"), move || {
        https.try_request("GET", &path, Some(&user), accept)
    })
}

/// Creates configmaps in `default` one after another (through the member's own API, not
/// the tunnel) until dropped, so that watches have events in flight when a drain begins.
struct Churn {
    stop: Arc<AtomicBool>,
    made: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Churn {
    /// Starts creating, and returns once two configmaps are made (their events are on
    /// their way to the watches).
    fn start(member: &Member) -> Churn {
        let kubeconfig = member.kubeconfig.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let made = Arc::new(AtomicUsize::new(0));
        let (stopped, counted) = (stop.clone(), made.clone());
        let thread = std::thread::spawn(move || {
            let mut made = 0;
            while !stopped.load(Ordering::SeqCst) {
                // Newlines in the value: 0x0A bytes inside a protobuf frame, too.
                let yaml = format!(
                    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: churn-{made}\n  namespace: default\ndata:\n  v: \"a\\nb\\n\"\n"
                );
                kubectl_with_input(&kubeconfig, &["create", "-f", "-"], yaml.as_bytes()).success();
                made += 1;
                counted.store(made, Ordering::SeqCst);
            }
            made
        });
        wait_for("the churn to begin", Duration::from_secs(30), || {
            (made.load(Ordering::SeqCst) >= 2).then_some(())
        });
        Churn {
            stop,
            made,
            thread: Some(thread),
        }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let before = self.made.load(Ordering::SeqCst);
            let made = thread.join().unwrap_or_default();
            eprintln!("{made} configmaps created, {before} when the watches had ended");
        }
    }
}

/// The protobuf watch delivered events, and its body is whole frames of whole events.
fn assert_whole_frames(reply: &tower_e2e::Reply) {
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.headers.get("content-type").unwrap(),
        PROTOBUF_WATCH,
        "{reply:?}"
    );
    let events = tower_e2e::protobuf_watch::decode_body(&reply.bytes)
        .unwrap_or_else(|e| panic!("a protobuf watch cut mid-event: {e}"));
    assert!(!events.is_empty(), "an empty watch body proves nothing");
    assert!(events.iter().any(|e| e.name == "settings"), "{events:?}");
    eprintln!(
        "the protobuf watch ended after {} whole events",
        events.len()
    );
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

/// The bytes `download` got; when its thread panicked (a cut body), the logs from `logs`
/// go with the failure, the processes' own account of why.
fn completed(download: std::thread::JoinHandle<u64>, logs: impl Fn() -> String) -> u64 {
    download
        .join()
        .unwrap_or_else(|_| panic!("the download was cut (its panic is above)\n{}", logs()))
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

/// Both of `raw_watch`'s watches, JSON and protobuf, ended cleanly: whole events, whole
/// frames, not cut.
fn assert_watches_end_cleanly(json: RawWatch, protobuf: RawWatch) {
    let watched = json
        .join()
        .unwrap()
        .expect("the watch ends cleanly, not cut");
    assert_eq!(watched.status, 200);
    assert_whole_events(&watched.body);
    assert_whole_frames(
        &protobuf
            .join()
            .unwrap()
            .expect("the protobuf watch ends cleanly, not cut"),
    );
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
    let watch = raw_watch(&server, &member, false, "watch");
    let protobuf_watch = raw_watch(&server, &member, true, "watch=1");
    let size: u64 = 256 << 20;
    let download = download(&server, &member, size);

    let churn = Churn::start(&member);

    // Drained mid-flight, or the test proves nothing.
    assert!(!download.is_finished(), "the download ended before SIGTERM");
    let terminated = Instant::now();
    server.process.terminate();
    assert_watches_end_cleanly(watch, protobuf_watch);
    drop(churn);
    assert_eq!(completed(download, || server.process.log()), size);
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
    let watch = raw_watch(&server, &member, false, "watch=yes");
    let protobuf_watch = raw_watch(&server, &member, true, "watch=1");
    let size: u64 = 256 << 20;
    let download = download(&server, &member, size);
    let churn = Churn::start(&member);

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

    assert_watches_end_cleanly(watch, protobuf_watch);
    drop(churn);
    assert_eq!(
        completed(download, || format!(
            "agent log:\n{}\nserver log:\n{}",
            agent.process.log(),
            server.process.log()
        )),
        size
    );
    assert_eq!(agent.process.wait_exit(Duration::from_secs(30)), Some(0));
    let exited = terminated.elapsed();
    eprintln!("agent drained and exited {exited:?} after SIGTERM (grace 60s)");
    assert!(exited < Duration::from_secs(30), "{exited:?}");
    wait_for("the tunnel to be gone", Duration::from_secs(10), || {
        (!server.connected("member-1")).then_some(())
    });
}
