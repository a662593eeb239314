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

mod https;
mod kubectl;
mod process;
mod relay;

pub use https::{
    Chunk, Fetched, Framing, Https, OpenResponse, Reply, Streaming, http1_over_tls, http2_over_tls,
    pattern_mismatch, pattern_slice, try_http1_over_tls,
};
pub use kubectl::{
    Kubectl, KubectlStream, Pty, kubectl, kubectl_command, kubectl_with_input, run_with_input,
    signal_window_change,
};
pub use process::{
    Process, RssPeaks, TempDir, bin_path, free_port, rss_kib, wait_for, wait_for_with,
};
pub use relay::Relay;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command};
use std::sync::Arc;
use std::time::Duration;

use tower_auth::{Minter, Secret};
use tower_kube_stand_in::{KubeconfigAuth, StandIn};

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

    /// `/v1/clusters` with the cluster details, as an admin over loopback sees it.
    pub fn cluster_details(&self) -> serde_json::Value {
        let (code, body) = admin_get_as(self.admin, "/v1/clusters", Some(&admin_token()));
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("clusters JSON")
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
    get_within(
        addr,
        path,
        token,
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
}

/// A plain-HTTP GET that connects within `connect` and whose every read takes at most
/// `read`: (status, body); (0, error) when it fails or runs out of time.
pub(crate) fn get_within(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    connect: Duration,
    read: Duration,
) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut tcp) = std::net::TcpStream::connect_timeout(&addr, connect) else {
        return (0, "connect failed".into());
    };
    let _ = tcp.set_read_timeout(Some(read));
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

/// An address of this host that is not loopback (the one it would send from toward a
/// documentation address), if it has one.
pub fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}
