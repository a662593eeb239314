//! Limits: requests per cluster (429), streams per tunnel (503), idle streams (504 or cut),
//! each a clear status counted in `/metrics`, the refusals with `Retry-After`; and nothing
//! left behind once callers are gone.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tower_e2e::{
    Agent, Https, KubectlStream, Member, OpenResponse, Relay, Server, TempDir, agent, kubectl,
    kubectl_with_input, server, wait_for,
};

/// A metric's value (an exact name, labels included), 0 when absent.
fn metric(server: &Server, name: &str) -> f64 {
    tower_e2e::metric_value(server.admin, name).unwrap_or(0.0)
}

/// A stand-in member, a server with `flags`, member-1's agent, and alice's ways in. Bind
/// `_agent` when destructuring: fields left to `..` are dropped at once.
struct Rig {
    member: Member,
    server: Server,
    _agent: Agent,
    kc: PathBuf,
    https: Https,
    user: String,
}

fn rig(flags: &[&str]) -> Rig {
    let member = Member::start();
    let server = server().args(flags).start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    Rig {
        kc: server.kubeconfig("member-1", "alice", &[]),
        https: Https::frontend(&server),
        user: Server::minter().user_token("alice", &[], None),
        member,
        server,
        _agent,
    }
}

/// Opens a `kubectl get -w` and waits until its watch is open at the member.
fn open_watch(kc: &std::path::Path, member: &Member, namespace: &str) -> KubectlStream {
    let before = watches(member, namespace);
    let watch = KubectlStream::spawn(kc, &["get", "configmaps", "-n", namespace, "-w"]);
    wait_for("the watch to open", Duration::from_secs(30), || {
        (watches(member, namespace) > before).then_some(())
    });
    watch
}

/// Opens a watch on member-1's configmaps in `namespace` as `user`, straight over HTTPS,
/// and waits until it is open at the member.
fn open_raw_watch(https: &Https, member: &Member, user: &str, namespace: &str) -> OpenResponse {
    let before = watches(member, namespace);
    let open = https.open(
        &format!("/clusters/member-1/api/v1/namespaces/{namespace}/configmaps?watch=1"),
        user,
    );
    assert_eq!(open.status, 200, "{}", open.head);
    wait_for(
        "the watch to reach the member",
        Duration::from_secs(10),
        || (watches(member, namespace) > before).then_some(()),
    );
    open
}

fn watches(member: &Member, namespace: &str) -> usize {
    member
        .api
        .calls()
        .iter()
        .filter(|c| {
            c.path_and_query
                .starts_with(&format!("/api/v1/namespaces/{namespace}/configmaps?"))
                && c.path_and_query.contains("watch=")
        })
        .count()
}

/// A refusal a caller should retry: `Retry-After: 1` (kubectl and client-go wait that long
/// and retry), and a `Status` with `reason`.
fn assert_retry_after(reply: &tower_e2e::Reply, reason: &str) {
    assert_eq!(reply.header("retry-after"), Some("1"), "{reply:?}");
    let status: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(status["reason"], reason, "{status}");
    assert_eq!(status["code"], reply.status, "{status}");
}

/// member-1's `/version`, as `user`: a small request that needs a place of its own.
fn version(https: &Https, user: &str) -> tower_e2e::Reply {
    https.get("/clusters/member-1/version", Some(user))
}

/// Waits until member-1 serves a request again (a place came back).
fn wait_until_served(https: &Https, user: &str, what: &str) {
    wait_for(what, Duration::from_secs(10), || {
        (version(https, user).status == 200).then_some(())
    });
}

#[test]
fn requests_beyond_the_per_cluster_limit_get_429_and_the_slot_comes_back() {
    let Rig {
        member,
        server,
        kc,
        https,
        user,
        _agent,
        ..
    } = rig(&["--max-requests-per-cluster", "2"]);

    let first = open_watch(&kc, &member, "default");
    let second = open_watch(&kc, &member, "kube-system");
    let refused = version(&https, &user);
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(
        refused.body.contains("--max-requests-per-cluster"),
        "{}",
        refused.body
    );
    assert_retry_after(&refused, "TooManyRequests");
    // At least this one (the watching kubectls may have been turned away too).
    assert!(
        metric(
            &server,
            "tower_requests_limited_total{reason=\"cluster_concurrency\"}"
        ) >= 1.0
    );
    // kubectl shows the reason too.
    let out = kubectl(&kc, &["get", "pods"]);
    assert_ne!(out.code(), Some(0));

    drop(first);
    wait_until_served(&https, &user, "a slot to come back");
    drop(second);
}

#[test]
fn one_user_past_the_per_user_limit_gets_429_while_others_are_served() {
    let Rig {
        member,
        server,
        https,
        user,
        _agent,
        ..
    } = rig(&["--max-requests-per-user", "2"]);
    let watch = |namespace: &str| open_raw_watch(&https, &member, &user, namespace);
    let first = watch("default");
    let _second = watch("kube-system");

    // Alice's third request is refused at once, with the reason kubectl shows and a
    // Retry-After.
    let refused = https.open("/clusters/member-1/version", &user);
    assert_eq!(refused.status, 429, "{}", refused.head);
    assert!(
        refused
            .head
            .to_ascii_lowercase()
            .contains("retry-after: 1\r\n"),
        "{}",
        refused.head
    );
    let refused = version(&https, &user);
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_retry_after(&refused, "TooManyRequests");
    let status: serde_json::Value = serde_json::from_str(&refused.body).unwrap();
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "TooManyRequests");
    assert_eq!(status["code"], 429);
    let message = status["message"].as_str().unwrap();
    assert!(
        message.contains("\"alice\"") && message.contains("--max-requests-per-user"),
        "{message}"
    );
    assert_eq!(
        metric(
            &server,
            "tower_requests_limited_total{reason=\"user_concurrency\"}"
        ),
        2.0
    );

    // Bob is served all the while.
    let bob = Server::minter().user_token("bob", &[], None);
    let served = version(&https, &bob);
    assert_eq!(served.status, 200, "{}", served.body);

    // A place alice gives back is hers again.
    drop(first);
    wait_until_served(&https, &user, "alice's place to come back");
}

#[test]
fn a_full_tunnel_answers_503_and_recovers() {
    // The control stream takes one of the three, each watch one (watches share one
    // HTTP/2 stream toward the agent, which takes none itself).
    let Rig {
        member,
        server,
        https,
        user,
        _agent,
        ..
    } = rig(&["--max-streams-per-tunnel", "3"]);
    let watch = |namespace: &str| open_raw_watch(&https, &member, &user, namespace);
    let first = watch("default");
    let second = watch("kube-system");
    let refused = version(&https, &user);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.body.contains("concurrent streams"),
        "{}",
        refused.body
    );
    assert_retry_after(&refused, "ServiceUnavailable");
    let third = https.open(
        "/clusters/member-1/api/v1/namespaces/default/configmaps?watch=1",
        &user,
    );
    assert_eq!(third.status, 503, "a watch is refused too: {}", third.head);
    assert!(
        metric(
            &server,
            "tower_requests_limited_total{reason=\"stream_limit\"}"
        ) >= 2.0
    );
    drop(first);
    drop(second);
    wait_until_served(&https, &user, "a stream to come back");
}

#[test]
fn a_cluster_without_its_agent_answers_503_with_retry_after() {
    let server = server().start();
    let user = Server::minter().user_token("alice", &[], None);
    let refused = version(&Https::frontend(&server), &user);
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.body.contains("no agent connected"),
        "{}",
        refused.body
    );
    assert_retry_after(&refused, "ServiceUnavailable");
}

#[test]
fn a_member_that_never_answers_gets_504_at_the_idle_timeout() {
    // The agent reaches its member through a relay the test can silence.
    let member = Member::start();
    let relay = Relay::start(member.api.addr());
    let dir = TempDir::new("silent-member");
    let kubeconfig = dir.path().join("kubeconfig");
    let original = std::fs::read_to_string(&member.kubeconfig).unwrap();
    let through_relay = original.replace(&member.api.url(), &format!("https://{}", relay.addr));
    assert_ne!(
        original,
        through_relay,
        "the kubeconfig names {}",
        member.api.url()
    );
    std::fs::write(&kubeconfig, through_relay).unwrap();
    let server = server().args(&["--stream-idle-timeout", "2s"]).start();
    let _agent = agent(&server, &member, "member-1")
        .kubeconfig(&kubeconfig)
        .connect(&server);
    let https = Https::frontend(&server);
    let user = Server::minter().user_token("alice", &[], None);
    let answered = version(&https, &user);
    assert_eq!(answered.status, 200, "{}", answered.body);

    // The member goes silent: the connections the agent holds move nothing more, and new
    // ones reach a listener that accepts and never answers (a hung apiserver).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    relay.set_targets(&[silent.local_addr().unwrap()]);
    relay.freeze();
    let started = Instant::now();
    let timed_out = version(&https, &user);
    let waited = started.elapsed();
    assert_eq!(timed_out.status, 504, "{}", timed_out.body);
    let status: serde_json::Value = serde_json::from_str(&timed_out.body).unwrap();
    assert_eq!(status["reason"], "Timeout", "{status}");
    assert_eq!(status["code"], 504, "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{status}"
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(12),
        "answered after {waited:?}, the idle timeout is 2 s"
    );
    assert_eq!(
        metric(
            &server,
            "tower_requests_limited_total{reason=\"idle_timeout\"}"
        ),
        1.0
    );
}

#[test]
fn a_silent_stream_is_cut_at_the_idle_timeout_and_a_busy_one_is_not() {
    // 3 s: well above the gaps between the events below, even on a loaded machine.
    let Rig {
        member,
        server,
        https,
        user,
        _agent,
        ..
    } = rig(&["--stream-idle-timeout", "3s"]);

    // Nothing happens in the namespace: the watch is cut, and the caller sees an error.
    let started = Instant::now();
    let silent = https.try_request(
        "GET",
        "/clusters/member-1/api/v1/namespaces/kube-system/configmaps?watch=1&timeoutSeconds=30",
        Some(&user),
        &[],
    );
    let lasted = started.elapsed();
    assert!(
        silent.is_err(),
        "a cut watch must not look complete: {silent:?}"
    );
    assert!(
        lasted >= Duration::from_secs(3) && lasted < Duration::from_secs(12),
        "cut after {lasted:?}"
    );
    assert_eq!(
        metric(
            &server,
            "tower_requests_limited_total{reason=\"idle_timeout\"}"
        ),
        1.0
    );

    // Events every half second (and a kubectl run, under a second even on a loaded
    // machine) keep a watch alive past the timeout, to its own clean end.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let pacer = {
        let kubeconfig = member.kubeconfig.clone();
        let watching = watching.clone();
        std::thread::spawn(move || {
            let mut i = 0;
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(500));
                let yaml = format!(
                    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: tick-{i}\n  namespace: default\n"
                );
                kubectl_with_input(&kubeconfig, &["create", "-f", "-"], yaml.as_bytes()).success();
                i += 1;
            }
        })
    };
    let busy = https.try_request(
        "GET",
        "/clusters/member-1/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=8",
        Some(&user),
        &[],
    );
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    pacer.join().unwrap();
    let busy = busy.expect("a busy watch ends cleanly");
    assert_eq!(busy.status, 200);
    assert!(busy.body.contains("tick-2"), "{}", busy.body);
    assert_eq!(
        metric(
            &server,
            "tower_requests_limited_total{reason=\"idle_timeout\"}"
        ),
        1.0
    );
}

#[test]
fn an_exec_holds_its_cluster_slot_and_ends_when_idle() {
    use std::io::{BufRead as _, BufReader, Write as _};
    // Two places: kubectl's discovery takes two at once before the exec.
    let Rig {
        member,
        server,
        kc,
        https,
        user,
        _agent,
    } = rig(&[
        "--max-requests-per-cluster",
        "2",
        "--stream-idle-timeout",
        "3s",
    ]);
    let mut exec = tower_e2e::kubectl_command(&kc)
        .args(["exec", "-i", "web-0", "--", "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl");
    let mut stdin = exec.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(exec.stdout.take().expect("stdout"));
    // A line round-trips: the session is up, past its 101. Its last byte crosses the
    // server after this instant.
    let last_byte = Instant::now();
    stdin.write_all(b"through the upgrade\n").unwrap();
    let mut echoed = String::new();
    stdout.read_line(&mut echoed).unwrap();
    assert_eq!(echoed, "through the upgrade\n");

    // A followed log (a line every 100 ms, never idle) takes the other place.
    let follower = Https::frontend(&server);
    let follow_user = user.clone();
    std::thread::spawn(move || {
        let _ = follower.try_request(
            "GET",
            "/clusters/member-1/api/v1/namespaces/default/pods/web-1/log?follow=true",
            Some(&follow_user),
            &[],
        );
    });
    wait_for("the log to be followed", Duration::from_secs(10), || {
        member
            .api
            .calls()
            .iter()
            .any(|c| c.path_and_query.contains("web-1/log?follow"))
            .then_some(())
    });
    // The upgraded session still holds its place and counts in flight, though hyper
    // dropped the 101's body long ago.
    let refused = version(&https, &user);
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(metric(&server, "tower_requests_in_flight"), 2.0);

    // Nobody types: after the idle timeout the session ends, kubectl with it, and its
    // place comes back.
    let status = wait_for("the idle exec to end", Duration::from_secs(20), || {
        exec.try_wait().ok().flatten()
    });
    let lasted = last_byte.elapsed();
    assert!(
        lasted >= Duration::from_secs(3),
        "ended {lasted:?} after its last byte: {status}"
    );
    wait_until_served(&https, &user, "the place to come back");
    drop(stdin);
}

#[test]
fn callers_that_stop_reading_lose_their_places_after_the_idle_timeout() {
    let Rig {
        member: _member,
        server,
        https,
        user,
        _agent,
        ..
    } = rig(&[
        "--max-requests-per-cluster",
        "2",
        "--stream-idle-timeout",
        "3s",
    ]);
    // Two callers take a large download's head, then read nothing more and keep their
    // connections open: their sockets fill, and hyper stops asking for the body.
    let path = "/clusters/member-1/debug/bytes?size=2000000000";
    let stalled: Vec<_> = (0..2).map(|_| https.open(path, &user)).collect();
    for response in &stalled {
        assert_eq!(response.status, 200, "{}", response.head);
    }
    let stalled_at = Instant::now();
    let refused = version(&https, &user);
    assert_eq!(refused.status, 429, "{}", refused.body);

    // Past the idle timeout their connections are closed, and the places come back.
    let idle_cuts = || {
        metric(
            &server,
            "tower_requests_limited_total{reason=\"idle_timeout\"}",
        )
    };
    wait_for(
        "both unread responses to be cut",
        Duration::from_secs(20),
        || (idle_cuts() >= 2.0).then_some(()),
    );
    let waited = stalled_at.elapsed();
    assert!(
        waited >= Duration::from_secs(3),
        "cut after only {waited:?}"
    );
    let served = version(&https, &user);
    assert_eq!(served.status, 200, "{}", served.body);
    wait_for("nothing in flight", Duration::from_secs(10), || {
        (metric(&server, "tower_requests_in_flight") == 0.0).then_some(())
    });
    drop(stalled);
}

#[test]
fn tasks_streams_and_requests_return_to_their_baseline() {
    let Rig {
        member,
        server,
        kc,
        https,
        _agent,
        ..
    } = rig(&[]);
    // Pooled tunnel streams each keep one connection task; count tasks net of them.
    let net_tasks = |s: &Server| metric(s, "tower_live_tasks") - metric(s, "tower_streams");
    let settle = |what: &str| {
        wait_for(what, Duration::from_secs(15), || {
            (metric(&server, "tower_requests_in_flight") == 0.0).then_some(())
        })
    };
    // Warm up both kinds of stream: pooled HTTP/1.1 ones, and the HTTP/2 one that
    // watches share (its connection runs two tasks for its one stream).
    kubectl(&kc, &["get", "pods"]).success();
    drop(open_watch(&kc, &member, "default"));
    settle("warm-up");
    let baseline = net_tasks(&server);
    assert!(baseline > 0.0, "tower_live_tasks is exported");

    for _ in 0..3 {
        kubectl(&kc, &["get", "pods", "-A"]).success();
        let watch = open_watch(&kc, &member, "default");
        drop(watch);
        kubectl(&kc, &["logs", "web-0", "--tail", "1"]).success();
        let exec = kubectl(&kc, &["exec", "web-0", "--", "echo", "hi"]);
        assert!(exec.success().contains("hi"));
        let _ = kubectl(&kc, &["get", "pods", "nope"]);
    }
    let unauthorized = https.get("/clusters/member-1/version", Some("x"));
    assert_eq!(unauthorized.status, 401);
    settle("the requests to finish");
    wait_for(
        "live tasks to return to their baseline",
        Duration::from_secs(20),
        || (net_tasks(&server) <= baseline).then_some(()),
    );
    eprintln!(
        "live tasks net of pooled streams: baseline {baseline}, after {} (tasks {}, streams {})",
        net_tasks(&server),
        metric(&server, "tower_live_tasks"),
        metric(&server, "tower_streams")
    );
    assert_eq!(metric(&server, "tower_tunnels"), 1.0);
}

#[test]
fn a_client_that_never_finishes_its_tls_handshake_is_dropped_and_counted() {
    use std::io::Read;
    let server = server().args(&["--handshake-timeout", "1s"]).start();
    let mut silent = std::net::TcpStream::connect(server.frontend).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    // Closed by the server: end of stream (or a reset), not our own read timeout.
    match silent.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0),
        Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    wait_for("the timeout to be counted", Duration::from_secs(5), || {
        (metric(
            &server,
            "tower_requests_limited_total{reason=\"tls_handshake_timeout\"}",
        ) >= 1.0)
            .then_some(())
    });
}

#[test]
fn a_stream_limit_above_what_agents_accept_is_refused_with_the_bound() {
    let state = tower_e2e::TempDir::new("bound");
    for value in ["0", "40000"] {
        let out = std::process::Command::new(tower_e2e::bin_path("tower-server"))
            .args(["serve", "--max-streams-per-tunnel", value])
            .args([
                "--tunnel-addr",
                "127.0.0.1:0",
                "--proxy-addr",
                "127.0.0.1:0",
            ])
            .args(["--admin-addr", "127.0.0.1:0", "--state-dir"])
            .arg(state.path())
            .env("TOWER_JWT_SECRET", tower_e2e::SECRET)
            .output()
            .expect("tower-server");
        assert!(!out.status.success(), "--max-streams-per-tunnel {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--max-streams-per-tunnel must be between 1 and 32768"),
            "{stderr}"
        );
    }
}

#[test]
fn a_body_past_the_members_limit_gets_its_413_through_the_tunnel_and_the_tunnel_serves_on() {
    let Rig {
        member: _member,
        server: _server,
        kc,
        https,
        user,
        _agent,
    } = rig(&[]);
    let dir = TempDir::new("big-bodies");
    let create = |name: &str, len: usize| {
        let path = dir.path().join(name);
        std::fs::write(&path, vec![b'x'; len]).unwrap();
        let from = format!("--from-file={}", path.display());
        kubectl(&kc, &["create", "configmap", name, &from])
    };
    // Past kube-apiserver's 3 MiB the member answers 413 once it has read 3 MiB and a byte,
    // while kubectl is still sending the rest; Tower brings the answer back whole.
    let out = create("huge", 4 << 20);
    assert!(
        out.stderr().contains(
            "error: failed to create configmap: Request entity too large: limit is 3145728"
        ),
        "{}",
        out.stderr()
    );
    // The same streamed over HTTP/1.1: the 413 and its words, not a cut connection.
    let reply = https
        .try_upload(
            "/clusters/member-1/api/v1/namespaces/default/configmaps",
            &user,
            8 << 20,
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(reply.status, 413, "{}", reply.body);
    assert!(
        reply
            .body
            .contains("Request entity too large: limit is 3145728"),
        "{}",
        reply.body
    );
    // tower-agent itself refuses impersonation before it reads the body (403) and resets
    // the tunnel stream the rest of the body was coming on: the answer still arrives.
    let huge = dir.path().join("huge");
    let from = format!("--from-file={}", huge.display());
    for _ in 0..3 {
        let out = kubectl(
            &kc,
            &["create", "configmap", "as-bob", &from, "--as", "bob"],
        );
        assert!(
            out.stderr()
                .contains("Tower impersonates the user of your token"),
            "{}",
            out.stderr()
        );
    }
    // Under 3 MiB but past what a ConfigMap's values may hold: the member's validation.
    let out = create("big", (1 << 20) + 1);
    assert!(
        out.stderr().contains(
            r#"ConfigMap "big" is invalid: []: Too long: may not be more than 1048576 bytes"#
        ),
        "{}",
        out.stderr()
    );
    // 1 MiB fits, whole, and the tunnel serves on.
    create("fits", 1 << 20).success();
    let value = kubectl(
        &kc,
        &["get", "configmap", "fits", "-o", "jsonpath={.data.fits}"],
    )
    .success();
    assert_eq!(value.len(), 1 << 20);
    assert_eq!(version(&https, &user).status, 200);
}
