//! The agent on its own: in-cluster mode (ServiceAccount token and CA from a directory,
//! the kube-apiserver from `KUBERNETES_SERVICE_HOST`/`PORT`) with token rotation,
//! `/readyz` following the tunnel, a server that goes silent right after the upgrade, and
//! callers who ask to impersonate someone else.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tower_e2e::{
    Https, Member, Process, Server, TempDir, agent, bin_path, kubectl, server, wait_for,
    wait_for_with,
};

/// An in-cluster agent: no `--kubeconfig`; the member's address in the service
/// environment and its credentials in a ServiceAccount directory.
struct InClusterAgent {
    process: Process,
    admin: Option<SocketAddr>,
    _dir: TempDir,
}

/// The ServiceAccount directory of a pod: `token` and `ca.crt`.
fn service_account_dir(member: &Member, token: &str) -> TempDir {
    let dir = TempDir::new("serviceaccount");
    std::fs::write(dir.path().join("token"), token).expect("token");
    std::fs::write(dir.path().join("ca.crt"), member.api.ca_pem()).expect("ca.crt");
    dir
}

/// Replaces the token the way kubelet rotates a projected token: a new file renamed over
/// the old one.
fn rotate_token(dir: &Path, token: &str) {
    let next = dir.join("..token.next");
    std::fs::write(&next, token).expect("new token");
    std::fs::rename(&next, dir.join("token")).expect("rotate the token");
}

/// The agent command for `server` as cluster `name`, with neither a kubeconfig nor any
/// in-cluster environment of the machine running the test.
fn agent_command(server: &Server, name: &str) -> Command {
    let mut command = agent_command_without_token(server, name);
    command.args(["--token", &Server::minter().agent_token(name, None)]);
    command
}

/// [`agent_command`] before its `--token`.
fn agent_command_without_token(server: &Server, name: &str) -> Command {
    let mut command = Command::new(bin_path("tower-agent"));
    command
        .args(["--name", name])
        .env_remove("TOWER_TOKEN")
        .arg("--proxy-server")
        .arg(format!("https://{}", server.tunnel))
        .arg("--ca-file")
        .arg(&server.ca_file)
        .arg("--jwt-secret-file")
        .arg(&server.secret_file)
        .args(["--admin-addr", "127.0.0.1:0", "--keepalive", "2s"])
        .args(["--reconnect-max", "2s"])
        .env_remove("TOWER_KUBECONFIG")
        .env_remove("KUBECONFIG")
        .env_remove("TOWER_KUBERNETES_SERVICE")
        .env_remove("TOWER_SERVICE_ACCOUNT_DIR")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env("TOWER_LOG", "info,tower_agent=debug");
    command
}

fn spawn_in_cluster(server: &Server, member: &Member, sa: TempDir) -> InClusterAgent {
    let mut command = agent_command(server, "member-1");
    command
        .arg("--service-account-dir")
        .arg(sa.path())
        .env(
            "KUBERNETES_SERVICE_HOST",
            member.api.addr().ip().to_string(),
        )
        .env(
            "KUBERNETES_SERVICE_PORT",
            member.api.addr().port().to_string(),
        );
    let (process, stdout) = Process::spawn(command, sa.path().join("agent.log"));
    let mut line = String::new();
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
    let admin = serde_json::from_str::<serde_json::Value>(&line)
        .ok()
        .and_then(|v| v["admin"].as_str().and_then(|a| a.parse().ok()));
    InClusterAgent {
        process,
        admin,
        _dir: sa,
    }
}

#[test]
fn in_cluster_the_agent_uses_the_service_account_and_follows_its_rotation() {
    let member = Member::start();
    let server = server().start();
    let sa = service_account_dir(&member, member.api.token());
    let sa_path = sa.path().to_path_buf();
    let agent = spawn_in_cluster(&server, &member, sa);
    assert!(agent.admin.is_some(), "{}", agent.process.log());
    wait_for_with(
        "the in-cluster agent to connect",
        Duration::from_secs(20),
        || server.connected("member-1").then_some(()),
        || agent.process.log(),
    );

    let https = Https::frontend(&server);
    let alice = Server::minter().user_token("alice", &["devs".into()], None);
    let path = "/clusters/member-1/api/v1/namespaces/default/configmaps";
    let reply = https.get(path, Some(&alice));
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(reply.body.contains("settings"), "{}", reply.body);
    let calls = member.api.calls();
    let call = calls
        .iter()
        .rev()
        .find(|c| c.path_and_query.ends_with("/configmaps"))
        .expect("the member saw the request");
    assert_eq!(
        call.credential, "token",
        "the ServiceAccount token: {call:?}"
    );
    assert_eq!(call.impersonate_user.as_deref(), Some("alice"), "{call:?}");
    assert_eq!(call.impersonate_groups, ["devs"], "{call:?}");

    // Rotate, as kubelet does, to a new token the member also accepts: within about a
    // second every request carries the new one.
    member.api.accept_token("rotated-sa-token");
    let seen = member.api.calls().len();
    rotate_token(&sa_path, "rotated-sa-token");
    let rotated = Instant::now();
    wait_for_with(
        "a request with the rotated token",
        Duration::from_secs(10),
        || {
            let reply = https.get(path, Some(&alice));
            assert_eq!(reply.status, 200, "{}", reply.body);
            let calls = member.api.calls();
            let last = calls[seen..].last().expect("the member saw the request");
            (last.credential == "token#1").then_some(())
        },
        || agent.process.log(),
    );
    // The agent looks every second; the margin is for a loaded machine.
    assert!(
        rotated.elapsed() < Duration::from_secs(6),
        "the rotation took {:?} to be used",
        rotated.elapsed()
    );
    // From then on, only the new token, still impersonating the caller.
    let seen = member.api.calls().len();
    for _ in 0..3 {
        assert_eq!(https.get(path, Some(&alice)).status, 200);
    }
    for call in &member.api.calls()[seen..] {
        assert_eq!(call.credential, "token#1", "{call:?}");
        assert_eq!(call.impersonate_user.as_deref(), Some("alice"), "{call:?}");
    }

    // A rotation to a token the member does not accept (revoked, say) reaches it too:
    // the member's 401 is what the caller sees.
    let seen = member.api.calls().len();
    rotate_token(&sa_path, "revoked-sa-token");
    let refused = wait_for_with(
        "a request with the revoked token",
        Duration::from_secs(10),
        || {
            let reply = https.get(path, Some(&alice));
            member.api.calls()[seen..]
                .iter()
                .any(|c| c.saw_authorization && c.credential == "anonymous")
                .then_some(reply)
        },
        || agent.process.log(),
    );
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert!(
        agent.process.log().contains("token file rotated"),
        "{}",
        agent.process.log()
    );
}

#[test]
fn token_file_and_kubernetes_service_flags_replace_the_token_and_the_environment() {
    let member = Member::start();
    let server = server().start();
    let sa = service_account_dir(&member, member.api.token());
    // The agent token from a file, as agent.yaml mounts it (with a trailing newline),
    // and the kube-apiserver from --kubernetes-service, with no service environment.
    let token_file = sa.path().join("agent-token");
    std::fs::write(
        &token_file,
        format!("{}\n", Server::minter().agent_token("member-1", None)),
    )
    .expect("token file");
    let mut command = agent_command_without_token(&server, "member-1");
    command
        .arg("--token-file")
        .arg(&token_file)
        .arg("--service-account-dir")
        .arg(sa.path())
        .arg("--kubernetes-service")
        .arg(member.api.addr().to_string());
    let (process, _stdout) = Process::spawn(command, sa.path().join("agent.log"));
    wait_for_with(
        "the agent to connect",
        Duration::from_secs(20),
        || server.connected("member-1").then_some(()),
        || process.log(),
    );
    let kc = server.kubeconfig("member-1", "erin", &[]);
    let pods = kubectl(&kc, &["get", "pods", "-o", "name"]).success();
    assert!(pods.contains("pod/web-0"), "{pods}");
    let calls = member.api.calls();
    assert!(
        calls
            .iter()
            .all(|c| c.credential == "token" && c.impersonate_user.as_deref() == Some("erin")),
        "{calls:?}"
    );
}

#[test]
fn in_cluster_without_the_environment_or_the_files_is_a_usage_error() {
    let member = Member::start();
    let server = server().start();
    let run = |command: &mut Command| {
        let out = command.output().expect("run tower-agent");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let sa = service_account_dir(&member, member.api.token());

    // No service environment: both variables named.
    let (code, stderr) = run(agent_command(&server, "member-1")
        .arg("--service-account-dir")
        .arg(sa.path()));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set"),
        "{stderr}"
    );

    // The environment but no ServiceAccount files: the token's path named.
    let empty = TempDir::new("no-serviceaccount");
    let (code, stderr) = run(agent_command(&server, "member-1")
        .arg("--service-account-dir")
        .arg(empty.path())
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", "6443"));
    assert_eq!(code, Some(2), "{stderr}");
    let token = empty.path().join("token");
    assert!(
        stderr.contains("ServiceAccount token") && stderr.contains(&*token.to_string_lossy()),
        "{stderr}"
    );

    // The flag's env var works too; a token but no CA: the CA's path named.
    std::fs::write(&token, "t").expect("token");
    let (code, stderr) = run(agent_command(&server, "member-1")
        .env("TOWER_SERVICE_ACCOUNT_DIR", empty.path())
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", "6443"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&*empty.path().join("ca.crt").to_string_lossy()),
        "{stderr}"
    );

    // --help says what the flag is for.
    let (code, help) = {
        let out = Command::new(bin_path("tower-agent"))
            .arg("--help")
            .output()
            .expect("help");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(code, Some(0));
    assert!(
        help.contains("--service-account-dir")
            && help.contains("TOWER_SERVICE_ACCOUNT_DIR")
            && help.contains("Only for tests and unusual mounts"),
        "{help}"
    );
}

#[test]
fn readyz_follows_the_tunnel_when_the_server_dies_and_comes_back() {
    let member = Member::start();
    let mut server = server().start();
    let agent = agent(&server, &member, "member-1").connect(&server);
    wait_for("/readyz 200", Duration::from_secs(10), || {
        (agent.readyz() == 200).then_some(())
    });

    server.process.kill();
    wait_for_with(
        "/readyz 503 once the server is gone",
        Duration::from_secs(10),
        || (agent.readyz() == 503).then_some(()),
        || agent.process.log(),
    );
    // It stays down while there is no server to dial.
    for _ in 0..5 {
        assert_eq!(agent.readyz(), 503);
    }

    server.restart();
    // The agent is ready once it has read the server's preamble, which the server writes
    // before it registers the tunnel: both are waited for.
    wait_for_with(
        "/readyz 200 and the tunnel registered once the agent reconnected",
        Duration::from_secs(20),
        || (agent.readyz() == 200 && server.connected("member-1")).then_some(()),
        || agent.process.log(),
    );
}

/// A tunnel server that answers every upgrade with a valid 101 and then says nothing
/// more, holding the connection open: a link that went silent right after the upgrade.
struct SilentServer {
    addr: SocketAddr,
    /// When each connection was answered.
    answered: Arc<Mutex<Vec<Instant>>>,
}

impl SilentServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let answered = Arc::new(Mutex::new(Vec::new()));
        let log = answered.clone();
        std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            for tcp in listener.incoming() {
                let Ok(mut tcp) = tcp else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match tcp.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let _ = tcp.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                      upgrade: tower-tunnel/1\r\ntower-server-id: silent-0\r\n\
                      tower-server-count: 1\r\ntower-keepalive-ms: 1000\r\n\r\n",
                );
                log.lock().expect("lock").push(Instant::now());
                // Whatever the agent sends from now on goes unread and unanswered.
                held.push(tcp);
            }
        });
        SilentServer { addr, answered }
    }

    fn answered(&self) -> Vec<Instant> {
        self.answered.lock().expect("lock").clone()
    }
}

#[test]
fn a_server_silent_after_the_upgrade_is_dropped_and_redialed() {
    let member = Member::start();
    let silent = SilentServer::start();
    let dir = TempDir::new("silent");
    let mut command = Command::new(bin_path("tower-agent"));
    command
        .args(["--name", "member-1"])
        .args(["--token", &Server::minter().agent_token("member-1", None)])
        .arg("--proxy-server")
        .arg(format!("http://{}", silent.addr))
        .arg("--insecure-plaintext-tunnel")
        .arg("--kubeconfig")
        .arg(&member.kubeconfig)
        .args(["--jwt-secret", tower_e2e::SECRET])
        // Control stream deadline: 1 s ping interval + 2 s pong deadline.
        .args(["--admin-addr", "127.0.0.1:0", "--keepalive", "1s"])
        .args(["--reconnect-max", "1s"])
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env("TOWER_LOG", "info,tower_agent=debug");
    let (process, stdout) = Process::spawn(command, dir.path().join("agent.log"));
    let mut line = String::new();
    let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
    let admin: SocketAddr = serde_json::from_str::<serde_json::Value>(&line)
        .ok()
        .and_then(|v| v["admin"].as_str().and_then(|a| a.parse().ok()))
        .unwrap_or_else(|| panic!("admin address in {line:?}\n{}", process.log()));

    let first = wait_for_with(
        "the first upgrade",
        Duration::from_secs(10),
        || silent.answered().first().copied(),
        || process.log(),
    );
    // Until the tunnel is dropped and dialed again, /readyz must never say ready: a
    // tunnel without a control stream has no keepalive and is not up.
    let second = wait_for_with(
        "the agent to drop the silent tunnel and dial again",
        Duration::from_secs(10),
        || {
            let (code, _) = tower_e2e::admin_get(admin, "/readyz");
            assert_eq!(
                code,
                503,
                "a silent tunnel counted as ready\n{}",
                process.log()
            );
            silent.answered().get(1).copied()
        },
        || process.log(),
    );
    let waited = second - first;
    assert!(
        waited >= Duration::from_millis(2500) && waited < Duration::from_secs(6),
        "redialed {waited:?} after the upgrade; expected about the 3 s deadline\n{}",
        process.log()
    );
    let log = process.log();
    assert!(log.contains("tunnel up"), "the 101 was accepted: {log}");
    assert!(log.contains("no control stream"), "{log}");
    // And again: every silent tunnel is dropped.
    wait_for("a third dial", Duration::from_secs(10), || {
        silent.answered().get(2).copied()
    });
}

#[test]
fn kubectl_as_is_refused_with_a_reason() {
    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let kc = server.kubeconfig("member-1", "alice", &["devs"]);

    let spoofed = kubectl(
        &kc,
        &[
            "get",
            "pods",
            "--as",
            "root",
            "--as-group",
            "system:masters",
        ],
    );
    assert_eq!(spoofed.code(), Some(1), "{}", spoofed.stderr());
    assert!(
        spoofed.stderr().contains(
            "Error from server (Forbidden): tower-agent: Tower impersonates the user of your token (\"alice\") itself; \
             kubectl --as/--as-group/--as-uid and Impersonate-* headers are not accepted"
        ),
        "{}",
        spoofed.stderr()
    );
    // Nothing reached the member with the caller's choice of identity.
    assert!(
        member
            .api
            .calls()
            .iter()
            .all(|c| c.impersonate_user.as_deref() == Some("alice")),
        "{:?}",
        member.api.calls()
    );

    // A raw request with only a group, uid or extra: the same 403 Status.
    let https = Https::frontend(&server);
    let alice = Server::minter().user_token("alice", &[], None);
    for header in [
        "impersonate-group",
        "impersonate-uid",
        "impersonate-extra-scopes",
    ] {
        let reply = https.request(
            "GET",
            "/clusters/member-1/api/v1/namespaces/default/pods",
            Some(&alice),
            &[(header, "x")],
        );
        assert_eq!(reply.status, 403, "{header}: {}", reply.body);
        let status: serde_json::Value = serde_json::from_str(&reply.body).expect("Status JSON");
        assert_eq!(status["kind"], "Status", "{}", reply.body);
        assert_eq!(status["reason"], "Forbidden", "{}", reply.body);
        assert!(
            status["message"]
                .as_str()
                .is_some_and(|m| m.contains(header)),
            "{}",
            reply.body
        );
    }

    // Without them, alice as herself.
    kubectl(&kc, &["get", "pods", "-o", "name"]).success();
}

/// KubeSphere's old agent's flags: what the console's Deployment passes is accepted (see
/// deploy_flow.rs); the old agent's others are refused with what to use instead, and a
/// token that pins no CA is refused without a CA flag unless the operator says
/// --insecure-skip-tls-verify.
#[test]
fn the_old_agents_other_flags_and_an_unpinned_token_are_refused_with_the_reason() {
    let server = server().start();
    let run = |command: &mut Command| {
        let out = command.output().expect("run tower-agent");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (flag, says) in [
        ("--max-retry=5", "tower-agent dials again for ever"),
        ("--max-retry-interval=5m", "use --reconnect-max"),
        // klog's, which the old agent registered too: named as such, with what to use.
        ("--log-dir=/var/log/agent", "writes no log files"),
        ("--log-file=/var/log/agent.log", "writes no log files"),
        ("--logtostderr=false", "writes no log files"),
        ("--vmodule=agent=4", "use TOWER_LOG"),
        ("--skip-headers", "--log-format text|json"),
    ] {
        let (code, stderr) = run(agent_command(&server, "member-1").arg(flag));
        assert_eq!(code, Some(2), "{flag}: {stderr}");
        assert!(stderr.contains(says), "{flag}: {stderr}");
        if !flag.starts_with("--max-retry") {
            assert!(stderr.contains("one of klog's flags"), "{flag}: {stderr}");
        }
    }
    // klog's flags that ask for what tower-agent does anyway pass, each with a line
    // saying so; the agent goes on to its next check (here: no API server to serve).
    let (code, stderr) = run(agent_command(&server, "member-1").args([
        "--logtostderr",
        "--alsologtostderr=true",
        "--stderrthreshold=INFO",
    ]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("tower-agent logs to standard error anyway")
            && stderr.contains("--alsologtostderr=true")
            && stderr.contains("--stderrthreshold=INFO")
            && stderr.contains("not running in a cluster"),
        "{stderr}"
    );
    // A worker count that is not one is configuration, refused before anything runs.
    for bad in ["0", "two"] {
        let (code, stderr) =
            run(agent_command(&server, "member-1").env("TOKIO_WORKER_THREADS", bad));
        assert_eq!(code, Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("TOKIO_WORKER_THREADS"), "{bad}: {stderr}");
    }
    // A hex token of KubeSphere's old tower: not silently dialed with.
    let (code, stderr) = run(agent_command_without_token(&server, "member-1")
        .args(["--token", "0123456789abcdef0123456789abcdef"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("KubeSphere's old tower"), "{stderr}");

    // No --ca-file and a token that pins nothing.
    let unpinned = Server::minter().agent_token("member-1", None);
    let mut without_ca = Command::new(bin_path("tower-agent"));
    without_ca
        .args(["--name", "member-1", "--token", &unpinned])
        .arg("--proxy-server")
        .arg(format!("https://{}", server.tunnel))
        .arg("--jwt-secret-file")
        .arg(&server.secret_file)
        .arg("--kubernetes-service")
        .arg("127.0.0.1:1")
        .arg("--service-account-dir")
        .arg(TempDir::new("none").path());
    let (code, stderr) = run(&mut without_ca);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("no CA to trust") && stderr.contains("--insecure-skip-tls-verify"),
        "{stderr}"
    );
}

/// An explicit --ca-file wins over the pin inside the token: a token whose pin names
/// another CA still connects when the operator gives the right CA file.
#[test]
fn an_explicit_ca_file_wins_over_the_tokens_pin() {
    let member = Member::start();
    let server = server().start();
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let token = Server::minter().agent_token_pinned("member-1", None, Some(&wrong));
    let _agent = agent(&server, &member, "member-1")
        .token(&token)
        .connect(&server);
    assert!(server.connected("member-1"));
}

/// The `sha256:` pin of `server`'s CA, as Tower writes it into tokens.
fn ca_pin(server: &Server) -> String {
    let ca = tower_tunnel::tls::certs_from_pem(server.ca_pem.as_bytes()).expect("CA");
    tower_tunnel::tls::spki_pin(&ca[0]).expect("pin")
}

/// `pods` listed through the frontend as alice: the tunnel serves requests.
fn serves(server: &Server) {
    let kc = server.kubeconfig("member-1", "alice", &[]);
    let pods = kubectl(&kc, &["get", "pods", "-o", "name"]).success();
    assert!(pods.contains("pod/web-0"), "{pods}");
}

/// Waits until the agent's log says it refused the server for not holding `pin`.
fn wait_refused_for(agent: &tower_e2e::Agent, pin: &str) {
    let expected = format!("does not contain the pinned CA: expected {pin}");
    wait_for_with(
        "the agent to refuse the server's certificate",
        Duration::from_secs(20),
        || agent.process.log().contains(&expected).then_some(()),
        || agent.process.log(),
    );
}

/// An explicit --ca-hash wins over the pin inside the token, both ways: a token pinned to
/// another CA connects with the right --ca-hash, and a token pinned to the right CA is
/// refused with a wrong one.
#[test]
fn an_explicit_ca_hash_wins_over_the_tokens_pin() {
    let member = Member::start();
    let server = server().start();
    let right = ca_pin(&server);
    let wrong = format!("sha256:{}", "ab".repeat(32));

    let token = Server::minter().agent_token_pinned("member-1", None, Some(&wrong));
    let agent_right = agent(&server, &member, "member-1")
        .token(&token)
        .args(&[&format!("--ca-hash={right}")])
        .connect(&server);
    serves(&server);
    drop(agent_right);
    wait_for(
        "the first agent's tunnel to close",
        Duration::from_secs(10),
        || (!server.connected("member-1")).then_some(()),
    );

    let token = Server::minter().agent_token_pinned("member-1", None, Some(&right));
    let agent_wrong = agent(&server, &member, "member-1")
        .token(&token)
        .args(&[&format!("--ca-hash={wrong}")])
        .spawn();
    wait_refused_for(&agent_wrong, &wrong);
    assert_eq!(agent_wrong.readyz(), 503);
    assert!(!server.connected("member-1"));
}

/// A token that pins no CA connects with --insecure-skip-tls-verify, serves, and says
/// loudly that the server is not checked; a token that pins one keeps its pin with the
/// flag (a wrong pin is still refused) and the log says the flag was ignored.
#[test]
fn insecure_skip_tls_verify_dials_an_unpinned_token_and_never_overrides_a_pin() {
    let member = Member::start();
    let server = server().start();
    let unpinned = Server::minter().agent_token("member-1", None);
    let insecure = agent(&server, &member, "member-1")
        .token(&unpinned)
        .args(&["--insecure-skip-tls-verify"])
        .connect(&server);
    serves(&server);
    let log = insecure.process.log();
    let warning = log
        .lines()
        .find(|l| {
            l.contains(
                "--insecure-skip-tls-verify: the agent token pins no CA and no --ca-file or \
                 --ca-hash is given, so the server's certificate is not checked",
            )
        })
        .unwrap_or_else(|| panic!("no warning about the unchecked server:\n{log}"));
    assert!(warning.contains("WARN"), "{warning}");
    drop(insecure);
    wait_for(
        "the first agent's tunnel to close",
        Duration::from_secs(10),
        || (!server.connected("member-1")).then_some(()),
    );

    let wrong = format!("sha256:{}", "ab".repeat(32));
    let pinned = Server::minter().agent_token_pinned("member-1", None, Some(&wrong));
    let kept = agent(&server, &member, "member-1")
        .token(&pinned)
        .args(&["--insecure-skip-tls-verify"])
        .spawn();
    wait_refused_for(&kept, &wrong);
    let log = kept.process.log();
    let ignored = log
        .lines()
        .find(|l| {
            l.contains(
                "--insecure-skip-tls-verify is ignored: the agent token pins the server's CA",
            )
        })
        .unwrap_or_else(|| panic!("no line saying the flag was ignored:\n{log}"));
    assert!(
        ignored.contains("WARN") && ignored.contains(&wrong),
        "{ignored}"
    );
    assert!(!server.connected("member-1"));
}
