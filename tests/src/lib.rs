//! Tower's end-to-end harness.
//!
//! Starts the real `tower-server` and `tower-agent` binaries (built beside the test
//! executable, see [`bin_path`]) against a [`tower_kube_stand_in::StandIn`] member API
//! server, and drives them with real clients: `kubectl` and a small HTTPS client.
//!
//! ```ignore
//! let member = Member::start().await;
//! let server = server().start();
//! let agent = agent(&server, &member, "member-1").connect();
//! let kc = server.kubeconfig("member-1", "alice", &["devs"]);
//! kubectl(&kc, &["get", "pods"]).success();
//! ```
//!
//! [`pod`] starts a container of a pod template from Tower's manifests the way a kubelet
//! does (volumes, file modes, user and groups, read-only root).

#![forbid(unsafe_code)]

pub mod fleet;
pub mod kubesphere;
pub mod pod;
pub mod protobuf_watch;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower_auth::{Minter, Secret};
use tower_kube_stand_in::{KubeconfigAuth, StandIn};

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty directory under the system temp dir.
    pub fn new(prefix: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tower-{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where a workspace binary was built: next to the directory of the test executable.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which .ci/run does)",
        path.display()
    );
    path
}

/// Polls `check` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Like [`wait_for`], with `context` (logs, say) added to the failure message.
pub fn wait_for_with<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
    context: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed on drop, whose stderr goes to a log file.
#[derive(Debug)]
pub struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Spawns `command` with stderr going to `log`; returns its stdout.
    pub fn spawn(mut command: Command, log: PathBuf) -> (Self, ChildStdout) {
        let err = std::fs::File::create(&log).expect("log file");
        command
            .stdout(Stdio::piped())
            .stderr(err)
            .stdin(Stdio::null());
        let mut child = command.spawn().expect("spawn binary");
        let stdout = child.stdout.take().expect("stdout");
        (Process { child, log }, stdout)
    }

    /// The process's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// Sends SIGKILL and reaps.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
    }

    /// The exit code (128 + the signal for a killed process) once it has exited.
    pub fn exited(&mut self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt as _;
        let status = self.child.try_wait().ok().flatten()?;
        status.code().or_else(|| status.signal().map(|s| 128 + s))
    }

    /// Waits for exit up to `timeout`; returns the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = &mut self.child;
        let status = wait_for("process exit", timeout, || child.try_wait().ok().flatten());
        status.code()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resident set size of `pid` in KiB (Linux, from /proc); 0 when it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn first_json_line(stdout: ChildStdout) -> serde_json::Value {
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the address line");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("address line {line:?}: {e}"))
}

/// The member side of a test: the stand-in API server on its own runtime thread.
pub struct Member {
    /// The stand-in.
    pub api: Arc<StandIn>,
    /// Kubeconfig (token auth) for the agent.
    pub kubeconfig: PathBuf,
    _runtime: tokio::runtime::Runtime,
    _dir: TempDir,
}

impl Member {
    /// Starts a stand-in API server on 127.0.0.1:0.
    pub fn start() -> Self {
        Self::start_with(KubeconfigAuth::Token)
    }

    /// Starts one whose agent kubeconfig uses `auth`.
    pub fn start_with(auth: KubeconfigAuth) -> Self {
        Self::start_policy(auth, false)
    }

    /// Starts one with only the bootstrap RBAC policy, as a fresh cluster: its token is
    /// an admin (`system:masters`), every other identity gets only what is bound to it.
    pub fn start_strict() -> Self {
        Self::start_policy(KubeconfigAuth::Token, true)
    }

    fn start_policy(auth: KubeconfigAuth, strict: bool) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let api = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let started = if strict {
                StandIn::start_strict(listener, "member-sa-token").await
            } else {
                StandIn::start(listener, "member-sa-token").await
            };
            started.expect("stand-in")
        });
        let dir = TempDir::new("member");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig_yaml(auth)).expect("write kubeconfig");
        Member {
            api: Arc::new(api),
            kubeconfig,
            _runtime: runtime,
            _dir: dir,
        }
    }
}

/// An operator's own CA and serving certificate (for `localhost` and `127.0.0.1`) in
/// files, for `--tls-cert`/`--tls-key`/`--ca-cert`; replicas share one, as they would
/// from one Secret.
#[derive(Debug)]
pub struct OperatorPki {
    /// The CA (PEM).
    pub ca_pem: String,
    cert: String,
    key: String,
    ca: String,
    _dir: TempDir,
}

impl OperatorPki {
    /// Generates the CA and certificate and writes them out.
    pub fn new() -> Self {
        let dir = TempDir::new("pki");
        let pki = tower_tunnel::tls::GeneratedPki::generate(
            "operator-ca",
            &["localhost".into(), "127.0.0.1".into()],
        )
        .expect("pki");
        let file = |name: &str, content: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).expect("write");
            path.to_str().expect("path").to_owned()
        };
        OperatorPki {
            cert: file("tls.crt", &pki.cert_pem),
            key: file("tls.key", &pki.key_pem),
            ca: file("ca.crt", &pki.ca_cert_pem),
            ca_pem: pki.ca_cert_pem,
            _dir: dir,
        }
    }

    /// The flags that make a server use it.
    pub fn flags(&self) -> [&str; 6] {
        [
            "--tls-cert",
            &self.cert,
            "--tls-key",
            &self.key,
            "--ca-cert",
            &self.ca,
        ]
    }

    /// The CA file.
    pub fn ca_file(&self) -> &Path {
        Path::new(&self.ca)
    }
}

impl Default for OperatorPki {
    fn default() -> Self {
        Self::new()
    }
}

/// A builder for a tower-server process.
#[derive(Debug, Default)]
pub struct ServerBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: Option<TempDir>,
    addrs: Option<(String, String, String)>,
}

/// Starts building a server.
pub fn server() -> ServerBuilder {
    ServerBuilder::default()
}

/// What a pod limited to one CPU gives either binary: one tokio worker
/// (`available_parallelism` follows the cgroup's quota; tokio's variable says the same).
pub const ONE_CPU: (&str, &str) = ("TOKIO_WORKER_THREADS", "1");

/// What either binary logs when it runs the current-thread runtime (one worker).
pub const CURRENT_THREAD_LOG: &str = "scheduler=\"current-thread\"";

/// `tower-server serve`'s (and `tower-local`'s) three listeners, each on a free port of
/// loopback.
pub const ANY_PORTS: [&str; 6] = [
    "--tunnel-addr",
    "127.0.0.1:0",
    "--proxy-addr",
    "127.0.0.1:0",
    "--admin-addr",
    "127.0.0.1:0",
];

/// The shared jwtSecret of every test.
pub const SECRET: &str = "e2e-jwt-secret-shared-by-host-and-members";

impl ServerBuilder {
    /// Adds flags.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Sets an environment variable, after (and over) the test defaults.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs the process as deployed: its pod has one CPU, so one tokio worker and the
    /// current-thread runtime (`tower_tunnel::runtime`).
    pub fn one_cpu(self) -> Self {
        self.env(ONE_CPU.0, ONE_CPU.1)
    }

    /// Listens for the frontend on `addr` (a test that must write the frontend's URL
    /// somewhere before the server starts); the other listeners on port 0.
    pub fn frontend_addr(mut self, addr: SocketAddr) -> Self {
        self.addrs = Some(("127.0.0.1:0".into(), addr.to_string(), "127.0.0.1:0".into()));
        self
    }

    /// Starts the process and waits until it listens.
    pub fn start(self) -> Server {
        let dir = self.dir.unwrap_or_else(|| TempDir::new("server"));
        let state = dir.path().join("state");
        let secret = dir.path().join("jwt-secret");
        std::fs::write(&secret, SECRET).expect("secret");
        let (tunnel, frontend, admin) = self.addrs.unwrap_or_else(|| {
            (
                "127.0.0.1:0".into(),
                "127.0.0.1:0".into(),
                "127.0.0.1:0".into(),
            )
        });
        let mut command = Command::new(bin_path("tower-server"));
        // Short defaults so tests notice things quickly, unless the test sets its own.
        // No fixed ports for the kubesphere endpoints either, unless the test gives its range.
        for (flag, value) in [
            ("--keepalive", "2s"),
            ("--shutdown-grace", "3s"),
            ("--kubesphere-ports", "off"),
        ] {
            if !self.args.iter().any(|a| a.starts_with(flag)) {
                command.env(
                    format!(
                        "TOWER_{}",
                        flag.trim_start_matches("--")
                            .replace('-', "_")
                            .to_uppercase()
                    ),
                    value,
                );
            }
        }
        command
            .arg("serve")
            .args([
                "--tunnel-addr",
                &tunnel,
                "--proxy-addr",
                &frontend,
                "--admin-addr",
                &admin,
            ])
            .arg("--jwt-secret-file")
            .arg(&secret)
            .arg("--state-dir")
            .arg(&state)
            .args(&self.args)
            .env("TOWER_LOG", "info,tower_server=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let log = (0..)
            .map(|n| dir.path().join(format!("server-{n}.log")))
            .find(|p| !p.exists())
            .expect("a free log name");
        let (process, stdout) = Process::spawn(command, log);
        let addrs = first_json_line(stdout);
        let addr = |k: &str| -> SocketAddr {
            addrs[k]
                .as_str()
                .expect("address")
                .parse()
                .expect("socket address")
        };
        // The CA agents and callers trust: the operator's (--ca-cert) or the generated one.
        let ca_file = self
            .args
            .iter()
            .position(|a| a == "--ca-cert")
            .and_then(|i| self.args.get(i + 1))
            .map_or_else(|| state.join("ca.crt"), PathBuf::from);
        let server = Server {
            tunnel: addr("tunnel"),
            frontend: addr("frontend"),
            admin: addr("admin"),
            ca_pem: std::fs::read_to_string(&ca_file).unwrap_or_default(),
            ca_file,
            state,
            secret_file: secret,
            process,
            extra_args: self.args,
            extra_env: self.env,
            dir,
        };
        wait_for("server /healthz", Duration::from_secs(10), || {
            (admin_get(server.admin, "/healthz").0 == 200).then_some(())
        });
        server
    }
}

/// A running tower-server.
#[derive(Debug)]
pub struct Server {
    /// Tunnel listener.
    pub tunnel: SocketAddr,
    /// Frontend listener.
    pub frontend: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Its CA (PEM).
    pub ca_pem: String,
    /// Its CA's file.
    pub ca_file: PathBuf,
    /// Its state dir.
    pub state: PathBuf,
    /// The jwtSecret file.
    pub secret_file: PathBuf,
    /// The process.
    pub process: Process,
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
    dir: TempDir,
}

impl Server {
    /// Mints tokens with the shared secret.
    pub fn minter() -> Minter {
        Minter::new(&Secret::new(SECRET).expect("secret"))
    }

    /// Kills the process and starts it again on the same addresses and state dir.
    pub fn restart(&mut self) {
        self.process.kill();
        let dir = std::mem::replace(&mut self.dir, TempDir::new("placeholder"));
        let builder = ServerBuilder {
            args: self.extra_args.clone(),
            env: self.extra_env.clone(),
            dir: Some(dir),
            addrs: Some((
                self.tunnel.to_string(),
                self.frontend.to_string(),
                self.admin.to_string(),
            )),
        };
        let fresh = builder.start();
        let Server { process, dir, .. } = fresh;
        self.process = process;
        self.dir = dir;
    }

    /// Like [`Server::restart`], with `env` set over the server's own from now on.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.extra_env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.restart();
    }

    /// The `/v1/clusters` table.
    pub fn clusters(&self) -> serde_json::Value {
        let (code, body) = admin_get(self.admin, "/v1/clusters");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("clusters JSON")
    }

    /// Whether `cluster` has a live tunnel.
    pub fn connected(&self, cluster: &str) -> bool {
        self.clusters().as_array().is_some_and(|list| {
            list.iter()
                .any(|c| c["name"] == cluster && c["connected"] == true)
        })
    }

    /// A kubeconfig (written by `tower-server kubeconfig`) for `user` in `groups`.
    pub fn kubeconfig(&self, cluster: &str, user: &str, groups: &[&str]) -> PathBuf {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let token = Self::minter().user_token(user, &groups, Some(Duration::from_secs(3600)));
        self.kubeconfig_with_token(cluster, &token)
    }

    /// A kubeconfig with an arbitrary token.
    pub fn kubeconfig_with_token(&self, cluster: &str, token: &str) -> PathBuf {
        let out = Command::new(bin_path("tower-server"))
            .args(["kubeconfig", "--cluster", cluster])
            .arg("--server")
            .arg(format!("https://{}", self.frontend))
            .args(["--token", token])
            .arg("--ca-cert")
            .arg(&self.ca_file)
            .output()
            .expect("tower-server kubeconfig");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self.dir.path().join(format!("kubeconfig-{cluster}-{n}"));
        std::fs::write(&path, out.stdout).expect("write kubeconfig");
        path
    }
}

/// A builder for a tower-agent process.
#[derive(Debug)]
pub struct AgentBuilder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    name: String,
    token: Option<String>,
    token_in_file: bool,
    kubeconfig: PathBuf,
    tunnel: SocketAddr,
    ca_file: PathBuf,
    secret_file: PathBuf,
}

/// Starts building an agent for `server` that serves `member` as `name`.
pub fn agent(server: &Server, member: &Member, name: &str) -> AgentBuilder {
    AgentBuilder {
        args: Vec::new(),
        env: Vec::new(),
        name: name.to_owned(),
        token: None,
        token_in_file: false,
        kubeconfig: member.kubeconfig.clone(),
        tunnel: server.tunnel,
        ca_file: server.ca_file.clone(),
        secret_file: server.secret_file.clone(),
    }
}

impl AgentBuilder {
    /// Adds flags.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs the process as deployed, on one CPU (see [`ServerBuilder::one_cpu`]).
    pub fn one_cpu(self) -> Self {
        self.env(ONE_CPU.0, ONE_CPU.1)
    }

    /// Dials this address instead of the server's tunnel listener (a relay, a proxy).
    pub fn proxy_server(mut self, addr: SocketAddr) -> Self {
        self.tunnel = addr;
        self
    }

    /// Reaches the member's API server with this kubeconfig instead of the stand-in's.
    pub fn kubeconfig(mut self, path: &Path) -> Self {
        self.kubeconfig = path.to_path_buf();
        self
    }

    /// Trusts this CA file instead of the server's generated one.
    pub fn ca_file(mut self, path: &Path) -> Self {
        self.ca_file = path.to_path_buf();
        self
    }

    /// Uses this token instead of a fresh one for `name`.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    /// Passes the token as `--token-file` (this token, or a fresh one for `name`), in a file
    /// of the agent's own directory: [`Agent::token_file`] says where, to rotate it.
    pub fn via_token_file(mut self) -> Self {
        self.token_in_file = true;
        self
    }

    /// Starts the process (it may or may not manage to connect).
    pub fn spawn(self) -> Agent {
        let token = self
            .token
            .unwrap_or_else(|| Server::minter().agent_token(&self.name, None));
        let dir = TempDir::new("agent");
        let token_file = dir.path().join("token");
        let mut command = Command::new(bin_path("tower-agent"));
        command.args(["--name", &self.name]);
        if self.token_in_file {
            // As agent.yaml mounts it: with a trailing newline.
            std::fs::write(&token_file, format!("{token}\n")).expect("write the token file");
            command.arg("--token-file").arg(&token_file);
        } else {
            command.args(["--token", &token]);
        }
        command
            .arg("--proxy-server")
            .arg(format!("https://{}", self.tunnel))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--jwt-secret-file")
            .arg(&self.secret_file)
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--keepalive",
                "2s",
                "--reconnect-max",
                "2s",
            ])
            // Tests choose the proxy settings; the machine's must not leak in.
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env("TOWER_LOG", "info,tower_agent=debug");
        // --ca-hash and --insecure-skip-tls-verify conflict with --ca-file (and a test
        // that gives one means the agent to do without the file).
        if !self
            .args
            .iter()
            .any(|a| a.starts_with("--ca-hash") || a.starts_with("--insecure-skip-tls-verify"))
        {
            command.arg("--ca-file").arg(&self.ca_file);
        }
        command.args(&self.args);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let (process, stdout) = Process::spawn(command, dir.path().join("agent.log"));
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let admin = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v["admin"].as_str().and_then(|a| a.parse().ok()));
        Agent {
            process,
            admin,
            name: self.name,
            token_file,
            _dir: dir,
        }
    }

    /// Starts the process and waits until `server` shows the cluster connected.
    pub fn connect(self, server: &Server) -> Agent {
        let agent = self.spawn();
        wait_for(
            &format!("cluster {} to connect\n{}", agent.name, agent.process.log()),
            Duration::from_secs(20),
            || server.connected(&agent.name).then_some(()),
        );
        agent
    }
}

/// A running tower-agent.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub process: Process,
    /// Its admin address, once it printed one.
    pub admin: Option<SocketAddr>,
    /// Its cluster name.
    pub name: String,
    /// Where its `--token-file` is (with [`AgentBuilder::via_token_file`]).
    pub token_file: PathBuf,
    _dir: TempDir,
}

impl Agent {
    /// `/readyz` status code.
    pub fn readyz(&self) -> u16 {
        self.admin.map_or(0, |a| admin_get(a, "/readyz").0)
    }
}

/// A plain-HTTP GET to an admin listener: (status, body); (0, error) when unreachable.
pub fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    admin_get_as(addr, path, None)
}

/// [`admin_get`] with a bearer token.
pub fn admin_get_as(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut tcp) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, "connect failed".into());
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Connection: close\r\n\r\n");
    if tcp.write_all(request.as_bytes()).is_err() {
        return (0, "write failed".into());
    }
    let mut response = Vec::new();
    let _ = tcp.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    (code, decode_chunked_if_needed(&text, body))
}

fn decode_chunked_if_needed(head: &str, body: &str) -> String {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_owned();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// The result of a kubectl run.
#[derive(Debug)]
pub struct Kubectl(pub Output);

impl Kubectl {
    /// Asserts success; returns stdout.
    pub fn success(&self) -> String {
        assert!(
            self.0.status.success(),
            "kubectl failed ({}): {}\n{}",
            self.0.status,
            String::from_utf8_lossy(&self.0.stderr),
            String::from_utf8_lossy(&self.0.stdout)
        );
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }

    /// Stderr.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }

    /// Exit code.
    pub fn code(&self) -> Option<i32> {
        self.0.status.code()
    }
}

/// The kubectl binary (from PATH), with a clear failure when it is absent.
pub fn kubectl_command(kubeconfig: &Path) -> Command {
    let mut command = Command::new("kubectl");
    command
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--request-timeout=30s")
        .env_remove("KUBECONFIG")
        .env("HOME", std::env::temp_dir());
    command
}

/// Runs kubectl to completion with `stdin` as input.
pub fn kubectl_with_input(kubeconfig: &Path, args: &[&str], stdin: &[u8]) -> Kubectl {
    let mut command = kubectl_command(kubeconfig);
    command.args(args);
    run_with_input(command, stdin)
}

/// Runs a kubectl `command` (from [`kubectl_command`]) to completion with `stdin` as input.
pub fn run_with_input(mut command: Command, stdin: &[u8]) -> Kubectl {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl must be installed (see README)");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).expect("write stdin");
    drop(input);
    Kubectl(child.wait_with_output().expect("kubectl"))
}

/// Runs kubectl to completion.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> Kubectl {
    kubectl_with_input(kubeconfig, args, b"")
}

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

/// Samples the resident set size of some processes until stopped, keeping the peaks.
pub struct RssPeaks {
    peaks: Arc<std::sync::Mutex<Vec<u64>>>,
    done: Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<()>,
}

impl RssPeaks {
    /// Starts sampling `pids` every 20 ms.
    pub fn start(pids: &[u32]) -> Self {
        let pids = pids.to_vec();
        let peaks = Arc::new(std::sync::Mutex::new(vec![0; pids.len()]));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (peaks, done) = (peaks.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    let now: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
                    let mut peaks = peaks.lock().expect("lock");
                    for (peak, now) in peaks.iter_mut().zip(now) {
                        *peak = (*peak).max(now);
                    }
                    drop(peaks);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        RssPeaks {
            peaks,
            done,
            sampler,
        }
    }

    /// Stops sampling; returns each process's peak in KiB.
    pub fn stop(self) -> Vec<u64> {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.sampler.join();
        self.peaks.lock().expect("lock").clone()
    }
}

/// A long-running kubectl (watch, logs -f, port-forward) whose stdout lines arrive on a
/// channel; killed on drop.
pub struct KubectlStream {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl KubectlStream {
    /// Starts `kubectl args…`.
    pub fn spawn(kubeconfig: &Path, args: &[&str]) -> Self {
        Self::spawn_with_env(kubeconfig, args, &[])
    }

    /// Starts `kubectl args…` with extra environment variables.
    pub fn spawn_with_env(kubeconfig: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = kubectl_command(kubeconfig);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl must be installed (see README)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        KubectlStream { child, lines }
    }

    /// The next stdout line, or `None` after `timeout` or at the end of output.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Waits for a line satisfying `want`, skipping others.
    pub fn wait_line(&self, what: &str, timeout: Duration, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if want(&line) => return line,
                Ok(_) => continue,
                Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
            }
        }
    }

    /// Waits for kubectl to exit; returns (exit code, stderr).
    pub fn wait_exit(mut self, timeout: Duration) -> (Option<i32>, String) {
        use std::io::Read;
        let child = &mut self.child;
        let status = wait_for("kubectl to exit", timeout, || {
            child.try_wait().ok().flatten()
        });
        let mut stderr = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        (status.code(), stderr)
    }
}

impl Drop for KubectlStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay on loopback: a round-robin load balancer over its targets, which the test
/// can also freeze. A frozen connection moves no more bytes in either direction and
/// closes nothing, like a blackholed link or a load balancer that silently dropped the
/// flow. Connections made later flow normally.
pub struct Relay {
    /// Where clients connect.
    pub addr: SocketAddr,
    connections: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
    targets: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
}

impl Relay {
    /// Relays every connection to `target`.
    pub fn start(target: SocketAddr) -> Self {
        Self::balance(&[target])
    }

    /// Spreads connections over `targets`, round robin.
    pub fn balance(targets: &[SocketAddr]) -> Self {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let connections: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>> =
            Arc::default();
        let registry = connections.clone();
        let targets = Arc::new(std::sync::Mutex::new(targets.to_vec()));
        let choices = targets.clone();
        std::thread::spawn(move || {
            let mut next = 0usize;
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let target = {
                    let choices = choices.lock().expect("lock");
                    if choices.is_empty() {
                        continue;
                    }
                    next = next.wrapping_add(1);
                    choices[next % choices.len()]
                };
                let Ok(upstream) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
                registry.lock().expect("lock").push(frozen.clone());
                let pairs = [
                    (
                        client.try_clone().expect("clone"),
                        upstream.try_clone().expect("clone"),
                    ),
                    (upstream, client),
                ];
                for (mut from, mut to) in pairs {
                    let frozen = frozen.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        while let Ok(n) = std::io::Read::read(&mut from, &mut buf) {
                            if frozen.load(std::sync::atomic::Ordering::SeqCst) {
                                // Swallow everything, answer nothing, close nothing (the
                                // socket stays open while the other direction's thread
                                // holds it).
                                if n == 0 {
                                    break;
                                }
                                continue;
                            }
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                let _ = to.shutdown(std::net::Shutdown::Write);
                                break;
                            }
                        }
                    });
                }
            }
        });
        Relay {
            addr,
            connections,
            targets,
        }
    }

    /// Replaces the targets (as a load balancer's health checks would).
    pub fn set_targets(&self, targets: &[SocketAddr]) {
        *self.targets.lock().expect("lock") = targets.to_vec();
    }

    /// Freezes every connection open now.
    pub fn freeze(&self) {
        for frozen in self.connections.lock().expect("lock").iter() {
            frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        }
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

impl Process {
    /// Whether the process is still running (it has not exited, by a panic or otherwise).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// A port on 127.0.0.1 that was free a moment ago (bound on port 0, then released), for
/// programs that cannot be handed a listener (HAProxy).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("addr").port()
}

/// The value of the unlabelled sample `name` on an admin listener's `/metrics`.
pub fn metric_value(admin: SocketAddr, name: &str) -> Option<f64> {
    let (code, text) = admin_get(admin, "/metrics");
    if code != 200 {
        return None;
    }
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .find_map(|rest| rest.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// A user token in tower-server's default `--admin-group` (`system:masters`).
pub fn admin_token() -> String {
    Server::minter().user_token(
        "admin",
        &["system:masters".to_owned()],
        Some(Duration::from_secs(3600)),
    )
}

impl ServerBuilder {
    /// Binds the admin listener on `addr` (e.g. `0.0.0.0:0`, to reach it on a
    /// non-loopback address) instead of `127.0.0.1:0`.
    pub fn admin_addr(mut self, addr: &str) -> Self {
        let (tunnel, frontend, _) = self
            .addrs
            .take()
            .unwrap_or_else(|| ("127.0.0.1:0".into(), "127.0.0.1:0".into(), String::new()));
        self.addrs = Some((tunnel, frontend, addr.into()));
        self
    }
}

impl Server {
    /// `/v1/clusters` with the cluster details, as an admin over loopback sees it.
    pub fn cluster_details(&self) -> serde_json::Value {
        let (code, body) = admin_get_as(self.admin, "/v1/clusters", Some(&admin_token()));
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("clusters JSON")
    }
}

/// An address of this host that is not loopback (the one it would send from toward a
/// documentation address), if it has one.
pub fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A pseudo-terminal whose master the test holds, for `kubectl exec -t`: kubectl uses a
/// TTY only when its stdin is a terminal, sends the terminal's size at the start and again
/// on SIGWINCH. `script` (util-linux) would give kubectl a terminal too, but sizes it from
/// its own stdin only when that is a terminal (never under `cargo test`) and offers no way
/// to resize it later; with the master in hand the test sets each size itself.
pub struct Pty {
    master: std::fs::File,
    slave: std::fs::File,
}

impl Pty {
    /// Opens a pseudo-terminal of `cols` × `rows`.
    pub fn open(cols: u16, rows: u16) -> Pty {
        use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
        use std::os::unix::fs::OpenOptionsExt as _;
        let master =
            openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
            .open(name.to_str().expect("a UTF-8 path"))
            .expect("open the terminal");
        let pty = Pty {
            master: std::fs::File::from(master),
            slave,
        };
        pty.resize(cols, rows);
        pty
    }

    /// Sets the terminal's size (what kubectl reads on SIGWINCH).
    pub fn resize(&self, cols: u16, rows: u16) {
        rustix::termios::tcsetwinsize(
            &self.master,
            rustix::termios::Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        )
        .expect("set the window size");
    }

    /// The terminal side, for a child's stdin, stdout or stderr.
    pub fn terminal(&self) -> Stdio {
        Stdio::from(self.slave.try_clone().expect("dup the terminal"))
    }

    /// The master side: what the terminal's user types and reads.
    pub fn master(&self) -> std::fs::File {
        self.master.try_clone().expect("dup the master")
    }
}

/// Sends SIGWINCH to a process (as a terminal does to its foreground process when resized).
pub fn signal_window_change(child: &Child) {
    rustix::process::kill_process(
        rustix::process::Pid::from_child(child),
        rustix::process::Signal::WINCH,
    )
    .expect("send SIGWINCH");
}
