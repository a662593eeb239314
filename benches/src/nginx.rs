//! The upstream of B1, B2, B6, B7 and B8: nginx from the Debian packages, over TLS, serving
//! what the stand-in serves for those scenarios under the same paths: `/version` (the
//! same JSON) and `/debug/bytes?size=N` (N bytes of the stand-in's pattern, from a file
//! written before first use). B4's watches need an API server, so B4 keeps the stand-in;
//! so does B3 (an nginx worker starves its other connections while it serves a fast
//! reader, see `Bench::b3`).
//!
//! nginx cannot be told to listen on port 0, so the bench binds port 0 itself and hands
//! the listening socket over the way nginx's own binary upgrade does: the descriptor is
//! inherited and named in the `NGINX` environment variable, and the `listen` directive
//! names the address it got.

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command};
use std::time::{Duration, Instant};

use tower_e2e::{Https, OperatorPki, Process, TempDir};

/// The body of `/version`: the stand-in's (a kube-apiserver's), byte for byte.
const VERSION: &str = r#"{"major":"1","minor":"32","gitVersion":"v1.32.0","gitCommit":"70d3cc986aa8221cd1dfb1121852688902d3bf53","gitTreeState":"clean","buildDate":"2024-12-11T17:59:15Z","goVersion":"go1.23.3","compiler":"gc","platform":"linux/amd64"}"#;

/// The bearer token the clients and the agent send. nginx ignores it, but sending it
/// keeps the requests the size they are to an API server.
const TOKEN: &str = "bench-nginx-token";

/// How long nginx may take to answer its first request, and to exit.
const START_LIMIT: Duration = Duration::from_secs(10);

/// A running nginx (stopped on drop: SIGTERM to the master, which stops its workers).
pub(crate) struct Nginx {
    process: Process,
    pub(crate) addr: SocketAddr,
    pub(crate) ca_pem: String,
    /// A kubeconfig for the agent, naming nginx as its API server.
    pub(crate) kubeconfig: PathBuf,
    /// `nginx -v`.
    pub(crate) version: String,
    /// The descriptor of its listening socket (in nginx's processes).
    #[cfg(test)]
    listen_fd: i32,
    dir: TempDir,
    _stdout: ChildStdout,
    _pki: OperatorPki,
}

impl Nginx {
    /// The nginx binary: on `PATH`, else Debian's `/usr/sbin/nginx` (which a non-root
    /// `PATH` may lack).
    pub(crate) fn find() -> Option<PathBuf> {
        let on_path = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("nginx"))
                .find(|p| p.is_file())
        });
        on_path.or_else(|| {
            let debian = PathBuf::from("/usr/sbin/nginx");
            debian.is_file().then_some(debian)
        })
    }

    /// Starts `binary` on 127.0.0.1 (a port the kernel chose) and waits until it answers.
    pub(crate) fn start(binary: &Path) -> Result<Nginx, String> {
        let version = Command::new(binary)
            .arg("-v")
            .output()
            .map_err(|e| format!("running {}: {e}", binary.display()))?;
        let version = String::from_utf8_lossy(&version.stderr)
            .trim()
            .trim_start_matches("nginx version: ")
            .to_owned();
        let dir = TempDir::new("bench-nginx");
        let pki = OperatorPki::new();
        std::fs::create_dir_all(dir.path().join("bulk")).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir.path().join("tmp")).map_err(|e| e.to_string())?;
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let config = dir.path().join("nginx.conf");
        std::fs::write(&config, config_text(dir.path(), addr, &pki))
            .map_err(|e| format!("writing {}: {e}", config.display()))?;
        // nginx takes an inherited socket as its old master left it: non-blocking (else a
        // worker that loses the race for a connection blocks in accept(), leaving the
        // connections it holds unserved). It must survive exec too.
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("nonblocking: {e}"))?;
        rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty())
            .map_err(|e| format!("fcntl: {e}"))?;
        let listen_fd = listener.as_raw_fd();
        let mut command = Command::new(binary);
        command
            .arg("-e")
            .arg("stderr")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&config)
            .env("NGINX", format!("{listen_fd};"));
        let (process, stdout) = Process::spawn(command, dir.path().join("nginx.log"));
        // nginx has its own copy now.
        drop(listener);
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(addr, &pki.ca_pem))
            .map_err(|e| format!("writing {}: {e}", kubeconfig.display()))?;
        let nginx = Nginx {
            process,
            addr,
            ca_pem: pki.ca_pem.clone(),
            kubeconfig,
            version,
            #[cfg(test)]
            listen_fd,
            dir,
            _stdout: stdout,
            _pki: pki,
        };
        nginx.wait_ready()?;
        Ok(nginx)
    }

    /// The token to send it.
    pub(crate) fn token(&self) -> &str {
        TOKEN
    }

    /// Writes the file `/debug/bytes?size={size}` serves, unless it is there already.
    pub(crate) fn ensure_bulk(&self, size: u64) {
        let path = self.dir.path().join("bulk").join(format!("bulk-{size}"));
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == size) {
            return;
        }
        let write = || -> std::io::Result<()> {
            let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
            let mut written = 0;
            while written < size {
                let n = (size - written).min(64 * 1024) as usize;
                file.write_all(tower_e2e::pattern_slice(written, n))?;
                written += n as u64;
            }
            file.flush()
        };
        if let Err(e) = write() {
            panic!("writing {}: {e}", path.display());
        }
    }

    /// Waits until `/version` answers 200.
    fn wait_ready(&self) -> Result<(), String> {
        let client = Https::with_ca(&self.ca_pem, self.addr);
        let deadline = Instant::now() + START_LIMIT;
        loop {
            match client.try_request("GET", "/version", Some(TOKEN), &[]) {
                Ok(reply) if reply.status == 200 => return Ok(()),
                Ok(reply) if Instant::now() >= deadline => {
                    return Err(format!(
                        "nginx answered {}\n{}",
                        reply.status,
                        self.process.log()
                    ));
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("nginx did not answer: {e}\n{}", self.process.log()));
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGKILL would leave the workers running: SIGTERM lets the master stop them.
        self.process.terminate();
        let deadline = Instant::now() + START_LIMIT;
        while self.process.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// nginx's configuration: Debian's defaults where they do not hurt a benchmark
/// (`worker_processes auto`), keep-alive without a request limit (the default closes a
/// connection after 1,000 requests, which a load generator counts as an error), and
/// `sendfile_max_chunk` below its 2 MiB default, meant to keep a worker from writing to
/// one fast reader for long (it does not stop the starvation `Bench::b3` describes).
fn config_text(dir: &Path, addr: SocketAddr, pki: &OperatorPki) -> String {
    let flags = pki.flags();
    let (cert, key) = (flags[1], flags[3]);
    let dir = dir.display();
    format!(
        r#"daemon off;
master_process on;
worker_processes auto;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    sendfile_max_chunk 128k;
    server {{
        listen {addr} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location = /version {{
            default_type application/json;
            return 200 '{VERSION}';
        }}
        location = /debug/bytes {{
            default_type application/octet-stream;
            root {dir}/bulk;
            try_files /bulk-$arg_size =404;
        }}
    }}
}}
"#
    )
}

/// A kubeconfig naming nginx, its CA and [`TOKEN`].
fn kubeconfig_text(addr: SocketAddr, ca_pem: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: nginx\n  cluster:\n    server: https://{addr}\n    certificate-authority-data: {ca}\nusers:\n- name: nginx\n  user:\n    token: {TOKEN}\ncontexts:\n- name: nginx\n  context:\n    cluster: nginx\n    user: nginx\ncurrent-context: nginx\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nginx serves the stand-in's `/version` and pattern under the same paths, and
    /// stopping it stops its workers. A missing nginx fails the test, in CI and out of
    /// it (.ci/run installs it).
    #[test]
    fn serves_what_the_stand_in_serves() {
        let binary = Nginx::find()
            .expect("nginx is not installed: apt-get install -y nginx, as .ci/run does");
        let nginx = Nginx::start(&binary).expect("nginx");
        let client = Https::with_ca(&nginx.ca_pem, nginx.addr);
        let reply = client.get("/version", Some(TOKEN));
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, VERSION);
        let size = 3 * 251 * 4096 + 17;
        nginx.ensure_bulk(size);
        let path = format!("/debug/bytes?size={size}");
        assert_eq!(client.download_checked(&path, TOKEN), size);
        assert_eq!(client.get("/debug/bytes?size=5", Some(TOKEN)).status, 404);
        // Keep-alive connections at once, each with more requests than nginx's default
        // keep-alive limit (1,000): none is closed under the load generator.
        let target = crate::load::Target::new(&nginx.ca_pem, nginx.addr, "/version".into(), TOKEN);
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let run = runtime.block_on(async {
            // The counts are what is checked, not the speed: room for a loaded machine.
            let limit = Duration::from_secs(60);
            tokio::time::timeout(limit, crate::load::run(&target, 4, 1_100, limit)).await
        });
        let run = run.expect("a connection went unserved");
        assert_eq!((run.latencies.len(), run.errors), (4 * 1_100, 0));

        let master = nginx.process.pid().to_string();
        let workers = Command::new("pgrep")
            .args(["-P", &master])
            .output()
            .expect("pgrep");
        let workers: Vec<String> = String::from_utf8_lossy(&workers.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert!(!workers.is_empty(), "nginx runs its master with workers");
        // Each worker's listening socket is non-blocking: one that loses the race for a
        // connection must not block in accept() with connections of its own to serve.
        for pid in &workers {
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", nginx.listen_fd))
                .expect("the worker's listening socket");
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .expect("fdinfo flags");
            const O_NONBLOCK: u32 = 0o4000;
            assert_ne!(
                flags & O_NONBLOCK,
                0,
                "worker {pid}'s listening socket blocks"
            );
        }
        drop(nginx);
        for pid in workers.iter().chain([&master]) {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "nginx process {pid} outlived the bench's handle"
            );
        }
    }
}
