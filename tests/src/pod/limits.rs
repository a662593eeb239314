//! A container's resource limits, applied as a kubelet's container runtime applies them: in
//! a cgroup of its own (pkg/kubelet/cm/helpers_linux.go, `MilliCPUToQuota`, and the
//! runtime's `linux.resources`):
//! - `limits.cpu` is a CFS quota over a 100 ms period (`cpu.cfs_quota_us` and
//!   `cpu.cfs_period_us` under cgroup v1, `cpu.max` under v2), at least 1 ms. A process
//!   in it that asks `available_parallelism` (as Tower's runtime does) gets the quota in
//!   whole CPUs, rounded up;
//! - `limits.memory` is the cgroup's memory limit (`memory.limit_in_bytes`, `memory.max`):
//!   past it the kernel kills the container (exit 137, `OOMKilled`).
//!
//! The cgroup is made below this process's own for each cgroup v1 controller, or, on
//! cgroup v2, below the hierarchy's root (a v2 cgroup with processes cannot hand
//! controllers to children), and the container's process joins it before it runs the
//! image's command. A limit that no mounted controller can apply fails the pod's start:
//! a test must not pass with its limits silently dropped.
//!
//! Not modelled: requests (`cpu.shares`, the scheduler's fit), pod-level cgroups and
//! QoS classes.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Container;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// `QuotaPeriod` in helpers_linux.go: 100 ms, in µs.
const QUOTA_PERIOD_US: u64 = 100_000;
/// `MinQuotaPeriod`: the kernel's least quota, 1 ms.
const MIN_QUOTA_US: u64 = 1_000;

/// What a container's `resources.limits` asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Limits {
    /// `limits.cpu` in thousandths of a CPU.
    pub(super) milli_cpu: Option<u64>,
    /// `limits.memory` in bytes.
    pub(super) memory: Option<u64>,
}

impl Limits {
    /// The container's limits.
    pub(super) fn of(container: &Container) -> Result<Limits, String> {
        let limits = container.resources.as_ref().and_then(|r| r.limits.as_ref());
        let get = |name: &str| limits.and_then(|l| l.get(name));
        // A limit of 0 is none: `MilliCPUToQuota` gives no quota for 0, and the runtime
        // sets no memory limit for 0.
        Ok(Limits {
            milli_cpu: get("cpu")
                .map(|q| quantity(q).map(|v| (v * 1000.0).ceil() as u64))
                .transpose()?
                .filter(|m| *m > 0),
            memory: get("memory")
                .map(|q| quantity(q).map(|v| v.ceil() as u64))
                .transpose()?
                .filter(|b| *b > 0),
        })
    }

    /// `MilliCPUToQuota`: the CFS quota for `limits.cpu`, in µs per [`QUOTA_PERIOD_US`].
    fn cpu_quota_us(self) -> Option<u64> {
        self.milli_cpu
            .map(|m| (m * QUOTA_PERIOD_US / 1000).max(MIN_QUOTA_US))
    }
}

/// A resource quantity's value (`resource.Quantity`): a decimal number with a binary
/// (`Ki` … `Ei`) or decimal (`n` … `E`) suffix or an exponent (`e3`, `E6`).
fn quantity(q: &Quantity) -> Result<f64, String> {
    let text = q.0.trim();
    let bad = || format!("quantities must match the regular expression: {text:?}");
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let digits = exponent
                .strip_prefix('e')
                .or_else(|| exponent.strip_prefix('E'))
                .ok_or_else(bad)?;
            10f64.powi(digits.parse().map_err(|_| bad())?)
        }
    };
    if number < 0.0 {
        return Err(format!("must be greater than or equal to 0: {text:?}"));
    }
    Ok(number * scale)
}

/// The container's cgroup: one directory per hierarchy that applies a limit, removed on
/// drop (after the container's process is gone).
#[derive(Debug)]
pub(super) struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// Makes `name`'s cgroup with `limits`; `None` when there are none to apply.
    pub(super) fn create(name: &str, limits: Limits) -> Result<Option<Cgroup>, String> {
        if limits == Limits::default() {
            return Ok(None);
        }
        let hierarchies = Hierarchies::mounted()?;
        let mut cgroup = Cgroup { dirs: Vec::new() };
        if let Some(quota) = limits.cpu_quota_us() {
            let dir = cgroup.dir_for(&hierarchies, "cpu", name)?;
            if hierarchies.v1("cpu").is_some() {
                write(&dir, "cpu.cfs_period_us", &QUOTA_PERIOD_US.to_string())?;
                write(&dir, "cpu.cfs_quota_us", &quota.to_string())?;
            } else {
                write(&dir, "cpu.max", &format!("{quota} {QUOTA_PERIOD_US}"))?;
            }
        }
        if let Some(bytes) = limits.memory {
            let dir = cgroup.dir_for(&hierarchies, "memory", name)?;
            let file = if hierarchies.v1("memory").is_some() {
                "memory.limit_in_bytes"
            } else {
                "memory.max"
            };
            write(&dir, file, &bytes.to_string())?;
        }
        Ok(Some(cgroup))
    }

    /// Shell lines that move the shell (which then execs the container's command) into
    /// the cgroup.
    pub(super) fn join_script(&self) -> String {
        self.dirs
            .iter()
            .map(|d| format!("echo $$ > {}\n", super::quote_path(&d.join("cgroup.procs"))))
            .collect()
    }

    /// The cgroup's directory in the hierarchy that has `controller`, made if needed.
    fn dir_for(
        &mut self,
        hierarchies: &Hierarchies,
        controller: &str,
        name: &str,
    ) -> Result<PathBuf, String> {
        let dir = match hierarchies.v1(controller) {
            Some(own) => own.join("tower-pods").join(name),
            None => {
                let root = hierarchies.v2_with(controller).ok_or_else(|| {
                    format!(
                        "the pod runner applies limits.{controller} through a cgroup {controller} controller (v1 or v2), and none is mounted here"
                    )
                })?;
                // Each level hands the controller down to the next.
                let parent = root.join("tower-pods");
                make(&parent)?;
                for level in [root, parent.as_path()] {
                    write(level, "cgroup.subtree_control", &format!("+{controller}"))?;
                }
                parent.join(name)
            }
        };
        if !self.dirs.contains(&dir) {
            make(&dir)?;
            self.dirs.push(dir.clone());
        }
        Ok(dir)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The cgroup hierarchies mounted here, and where this process is in each.
struct Hierarchies {
    /// (controllers, this process's cgroup directory) of each v1 hierarchy.
    v1: Vec<(Vec<String>, PathBuf)>,
    /// The v2 hierarchy's root directory, with the controllers it offers.
    v2: Option<(PathBuf, Vec<String>)>,
}

impl Hierarchies {
    fn mounted() -> Result<Hierarchies, String> {
        let read = |path: &str| std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"));
        let own = read("/proc/self/cgroup")?;
        let mut hierarchies = Hierarchies {
            v1: Vec::new(),
            v2: None,
        };
        for line in read("/proc/self/mountinfo")?.lines() {
            // id parent dev root mountpoint options [optional…] - fstype source superoptions
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(dash) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            let (Some(root), Some(mountpoint), Some(fstype)) =
                (fields.get(3), fields.get(4), fields.get(dash + 1))
            else {
                continue;
            };
            match *fstype {
                "cgroup" => {
                    let controllers: Vec<String> = fields
                        .get(dash + 3)
                        .unwrap_or(&"")
                        .split(',')
                        .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                        .map(str::to_owned)
                        .collect();
                    // This process's line for the hierarchy: `N:cpu,cpuacct:/path`.
                    let path = own.lines().find_map(|l| {
                        let mut parts = l.splitn(3, ':');
                        let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
                        let names: Vec<&str> = names.split(',').collect();
                        controllers
                            .iter()
                            .all(|c| names.contains(&c.as_str()))
                            .then_some(path)
                    });
                    if let Some(path) = path {
                        hierarchies
                            .v1
                            .push((controllers, under(mountpoint, root, path)));
                    }
                }
                "cgroup2" => {
                    let offered =
                        std::fs::read_to_string(Path::new(mountpoint).join("cgroup.controllers"))
                            .unwrap_or_default();
                    hierarchies.v2 = Some((
                        PathBuf::from(mountpoint),
                        offered.split_whitespace().map(str::to_owned).collect(),
                    ));
                }
                _ => {}
            }
        }
        Ok(hierarchies)
    }

    /// This process's cgroup in the v1 hierarchy that has `controller`.
    fn v1(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(controllers, _)| controllers.iter().any(|c| c == controller))
            .map(|(_, dir)| dir.as_path())
    }

    /// The v2 hierarchy's root, if it offers `controller`.
    fn v2_with(&self, controller: &str) -> Option<&Path> {
        self.v2
            .as_ref()
            .filter(|(_, offered)| offered.iter().any(|c| c == controller))
            .map(|(root, _)| root.as_path())
    }
}

/// `path` (as /proc/self/cgroup names it) under a hierarchy mounted at `mountpoint`
/// whose root is `root`.
fn under(mountpoint: &str, root: &str, path: &str) -> PathBuf {
    let relative = path
        .strip_prefix(root)
        .unwrap_or(path)
        .trim_start_matches('/');
    Path::new(mountpoint).join(relative)
}

fn make(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cgroup {}: {e}", dir.display()))
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), String> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(|e| format!("cgroup {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn limits(cpu: Option<&str>, memory: Option<&str>) -> Limits {
        let mut map = std::collections::BTreeMap::new();
        for (name, value) in [("cpu", cpu), ("memory", memory)] {
            if let Some(v) = value {
                map.insert(name.to_owned(), Quantity(v.to_owned()));
            }
        }
        let container = Container {
            resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
                limits: Some(map),
                ..Default::default()
            }),
            ..Default::default()
        };
        Limits::of(&container).unwrap()
    }

    #[test]
    fn quantities_read_as_the_apiserver_reads_them() {
        let l = limits(Some("1"), Some("256Mi"));
        assert_eq!((l.milli_cpu, l.memory), (Some(1000), Some(256 << 20)));
        assert_eq!(l.cpu_quota_us(), Some(100_000));
        let l = limits(Some("250m"), Some("200M"));
        assert_eq!((l.milli_cpu, l.memory), (Some(250), Some(200_000_000)));
        assert_eq!(l.cpu_quota_us(), Some(25_000));
        let l = limits(Some("0.5"), Some("129e6"));
        assert_eq!((l.milli_cpu, l.memory), (Some(500), Some(129_000_000)));
        // The kernel's least quota.
        assert_eq!(limits(Some("1m"), None).cpu_quota_us(), Some(1_000));
        assert_eq!(limits(None, None), Limits::default());
        assert_eq!(limits(Some("0"), Some("0")), Limits::default());
        for bad in ["1x", "", "-1", "1.2.3"] {
            assert!(quantity(&Quantity(bad.into())).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cgroup_path_is_found_below_its_hierarchys_mount() {
        assert_eq!(
            under("/sys/fs/cgroup/memory", "/", "/process_api/abc"),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")
        );
        // A cgroup namespace's mount: its root is this process's path.
        assert_eq!(
            under("/sys/fs/cgroup", "/kubepods/pod1", "/kubepods/pod1/c"),
            PathBuf::from("/sys/fs/cgroup/c")
        );
    }
}
