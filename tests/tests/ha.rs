//! High availability end to end through a real load balancer: three tower-server
//! replicas behind HAProxy (TCP mode, round robin), one agent dialing HAProxy. The agent
//! holds a tunnel to every replica; losing one replica costs the others nothing; a new
//! replica added to HAProxy with a soft reload (`-sf`, old flows keep going) gets its
//! tunnel within seconds.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tower_e2e::{
    Fetched, Https, Member, OperatorPki, Process, Server, TempDir, agent, free_port, server,
    wait_for, wait_for_with,
};

/// A replica with the shared operator certificates.
fn replica(pki: &OperatorPki, id: &str) -> Server {
    server()
        .args(&["--server-id", id, "--server-count", "3"])
        .args(&pki.flags())
        .start()
}

/// The HAProxy binary: on PATH, or where Debian puts it (/usr/sbin, which a non-root
/// PATH may lack). A missing HAProxy fails the test, in CI and out of it: a test that
/// passes without running proves nothing (.ci/run installs it).
fn haproxy_binary() -> PathBuf {
    ["haproxy", "/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        .into_iter()
        .map(PathBuf::from)
        .find(|bin| {
            Command::new(bin)
                .arg("-v")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("haproxy is not installed: apt-get install -y haproxy, as .ci/run does")
}

/// An HAProxy process (TCP mode, round robin) in front of some replicas' tunnel
/// listeners; killed on drop.
struct HaProxy {
    process: Process,
    _stdout: ChildStdout,
    addr: SocketAddr,
}

impl HaProxy {
    /// Writes a configuration for `servers` (id, tunnel address) listening on `port` into
    /// `dir`, checks it, and starts HAProxy with it; with `replacing`, as a soft reload of
    /// that process (`-sf`: it stops listening but keeps serving its open connections).
    fn start(
        bin: &Path,
        dir: &Path,
        port: u16,
        servers: &[(&str, SocketAddr)],
        replacing: Option<&HaProxy>,
    ) -> HaProxy {
        let lines: String = servers
            .iter()
            .map(|(id, addr)| format!("    server {id} {addr} check inter 500ms fall 2 rise 1\n"))
            .collect();
        let config = format!(
            "global\n    maxconn 4096\n\n\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 1h\n    \
             timeout server 1h\n    retries 3\n    option redispatch 1\n\n\
             frontend tunnel\n    bind 127.0.0.1:{port}\n    default_backend towers\n\n\
             backend towers\n    balance roundrobin\n{lines}"
        );
        let generation = (0..).find(|n| !dir.join(format!("haproxy-{n}.cfg")).exists());
        let generation = generation.unwrap();
        let cfg: PathBuf = dir.join(format!("haproxy-{generation}.cfg"));
        std::fs::write(&cfg, &config).unwrap();
        let check = Command::new(bin).arg("-c").arg("-f").arg(&cfg).output();
        let check = check.unwrap();
        assert!(
            check.status.success(),
            "haproxy rejects its configuration:\n{config}\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let mut command = Command::new(bin);
        command.arg("-f").arg(&cfg).arg("-db");
        if let Some(old) = replacing {
            command.arg("-sf").arg(old.process.pid().to_string());
        }
        let (process, stdout) =
            Process::spawn(command, dir.join(format!("haproxy-{generation}.log")));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        HaProxy {
            process,
            _stdout: stdout,
            addr,
        }
    }
}

/// `/v1/clusters` of a replica: member-1's `replicas` list and `connected_since`.
fn member_1(server: &Server) -> Option<(Vec<String>, serde_json::Value)> {
    let table = server.clusters();
    let entry = table
        .as_array()?
        .iter()
        .find(|c| c["name"] == "member-1" && c["connected"] == true)?;
    let replicas = entry["replicas"]
        .as_array()?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    Some((replicas, entry["connected_since"].clone()))
}

fn holders_are(servers: &[&Server], want: &[&str]) -> bool {
    servers
        .iter()
        .all(|s| member_1(s).is_some_and(|(replicas, _)| replicas == want))
}

#[test]
fn an_agent_behind_haproxy_holds_every_replica_through_a_loss_and_a_reload() {
    let bin = haproxy_binary();
    let member = Member::start();
    let pki = OperatorPki::new();
    let a = replica(&pki, "tower-a");
    let mut b = replica(&pki, "tower-b");
    let c = replica(&pki, "tower-c");
    let dir = TempDir::new("haproxy");
    let port = free_port();
    let mut first = HaProxy::start(
        &bin,
        dir.path(),
        port,
        &[
            ("tower-a", a.tunnel),
            ("tower-b", b.tunnel),
            ("tower-c", c.tunnel),
        ],
        None,
    );
    wait_for_with(
        "haproxy to listen",
        Duration::from_secs(10),
        || std::net::TcpStream::connect(first.addr).ok(),
        || format!("haproxy log:\n{}", first.process.log()),
    );

    let started = Instant::now();
    let agent = agent(&a, &member, "member-1")
        .proxy_server(first.addr)
        .spawn();
    let logs = |servers: &[&Server]| {
        let mut text = format!("agent log:\n{}", agent.process.log());
        for s in servers {
            text.push_str(&format!("\nserver log:\n{}", s.process.log()));
        }
        text
    };
    wait_for_with(
        "a tunnel on every replica through haproxy",
        Duration::from_secs(20),
        || {
            [&a, &b, &c]
                .iter()
                .all(|r| r.connected("member-1"))
                .then_some(())
        },
        || logs(&[&a, &b, &c]),
    );
    let all_three = started.elapsed();
    wait_for(
        "every replica to list all three holders",
        Duration::from_secs(10),
        || holders_are(&[&a, &b, &c], &["tower-a", "tower-b", "tower-c"]).then_some(()),
    );
    eprintln!("through haproxy: tunnels to all 3 replicas after {all_three:?}");
    let user = Server::minter().user_token("alice", &[], Some(Duration::from_secs(3600)));
    for r in [&a, &b, &c] {
        let reply = Https::with_ca(&pki.ca_pem, r.frontend).get(
            "/clusters/member-1/api/v1/namespaces/default/pods",
            Some(&user),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let since_a = member_1(&a).unwrap().1;
    let since_c = member_1(&c).unwrap().1;

    // Steady load on the replicas that will survive, for the rest of the test.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failures) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let load = {
        let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
        let clients: Vec<(&'static str, Https)> = vec![
            ("tower-a", Https::with_ca(&pki.ca_pem, a.frontend)),
            ("tower-c", Https::with_ca(&pki.ca_pem, c.frontend)),
        ];
        let user = user.clone();
        std::thread::spawn(move || {
            let size = 16 * 1024;
            let path = format!("/clusters/member-1/debug/bytes?size={size}");
            let mut n = 0usize;
            while !stop.load(Ordering::SeqCst) {
                let (id, https) = &clients[n % clients.len()];
                n += 1;
                match https.fetch_pattern(&path, &user, Duration::from_secs(10)) {
                    Fetched::Complete {
                        status: 200,
                        received,
                        first_mismatch: None,
                        ..
                    } if received == size => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => failures.lock().unwrap().push(format!("{id}: {other:?}")),
                }
            }
        })
    };
    wait_for("the load to flow", Duration::from_secs(10), || {
        (ok.load(Ordering::SeqCst) >= 20).then_some(())
    });

    // Lose replica b (SIGKILL): the others keep serving, and learn that it is gone.
    b.process.kill();
    let killed = Instant::now();
    wait_for_with(
        "the survivors to list only themselves",
        Duration::from_secs(15),
        || holders_are(&[&a, &c], &["tower-a", "tower-c"]).then_some(()),
        || logs(&[&a, &c]),
    );
    let survivors_knew = killed.elapsed();
    // Keep the load on the survivors going for a while with one replica down.
    let at_kill = ok.load(Ordering::SeqCst);
    wait_for(
        "the load to go on with b down",
        Duration::from_secs(10),
        || (ok.load(Ordering::SeqCst) >= at_kill + 50).then_some(()),
    );

    // A fourth replica, and HAProxy soft-reloaded with it in b's place.
    let d = replica(&pki, "tower-d");
    let reloaded = Instant::now();
    let mut second = HaProxy::start(
        &bin,
        dir.path(),
        port,
        &[
            ("tower-a", a.tunnel),
            ("tower-c", c.tunnel),
            ("tower-d", d.tunnel),
        ],
        Some(&first),
    );
    wait_for_with(
        "a tunnel on the new replica",
        Duration::from_secs(20),
        || d.connected("member-1").then_some(()),
        || {
            format!(
                "{}\nnew haproxy log:\n{}",
                logs(&[&d]),
                second.process.log()
            )
        },
    );
    let fourth_joined = reloaded.elapsed();
    wait_for(
        "every replica to list the new holders",
        Duration::from_secs(10),
        || holders_are(&[&a, &c, &d], &["tower-a", "tower-c", "tower-d"]).then_some(()),
    );
    let full_again = reloaded.elapsed();
    let reply = Https::with_ca(&pki.ca_pem, d.frontend).get(
        "/clusters/member-1/api/v1/namespaces/default/pods",
        Some(&user),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    // A few more requests on the survivors after the reload, then stop the load.
    let after_reload = ok.load(Ordering::SeqCst);
    wait_for(
        "the load to go on after the reload",
        Duration::from_secs(10),
        || (ok.load(Ordering::SeqCst) >= after_reload + 20).then_some(()),
    );
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();

    let ok = ok.load(Ordering::SeqCst);
    let failures = failures.lock().unwrap();
    eprintln!(
        "through haproxy: tunnels to all 3 after {all_three:?}; after killing tower-b the \
         survivors listed only themselves after {survivors_knew:?}; tower-d joined \
         {fourth_joined:?} after the haproxy reload, every replica listed a, c, d after \
         {full_again:?}; load on the survivors: {ok} ok ({at_kill} before the loss), {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "requests through the surviving replicas failed:\n{}",
        failures.join("\n")
    );
    // The survivors' tunnels are the ones from the start: neither losing b nor reloading
    // HAProxy (the old process keeps its flows) cut them.
    assert_eq!(
        member_1(&a).unwrap().1,
        since_a,
        "tower-a's tunnel was replaced"
    );
    assert_eq!(
        member_1(&c).unwrap().1,
        since_c,
        "tower-c's tunnel was replaced"
    );
    assert!(
        first.process.running() && second.process.running(),
        "after a soft reload the old haproxy keeps serving its flows beside the new one"
    );
}
