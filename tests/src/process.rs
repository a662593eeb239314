//! Child processes, scratch directories and polling: the plumbing under every harness
//! piece that runs a binary.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

    /// The most its resident set has been since it started, in KiB (`VmHWM`); 0 when it
    /// is gone.
    pub fn peak_rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmHWM:")
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

    /// Whether the process is still running (it has not exited, by a panic or otherwise).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Resident set size of `pid` in KiB (Linux, from /proc); 0 when it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A `… kB` line of `/proc/{pid}/status`; 0 when the process is gone.
fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
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

/// A port on 127.0.0.1 that was free a moment ago (bound on port 0, then released), for
/// programs that cannot be handed a listener (HAProxy).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("addr").port()
}
