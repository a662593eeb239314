//! kubectl as a test runs it: to completion, as a long-running stream, or on a terminal.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::wait_for;

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
