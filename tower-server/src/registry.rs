//! Which clusters may connect and which tunnel serves each.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tower_proto::ControlMessage;
use tower_proto::names::validate_cluster_name;
use tower_tunnel::SessionHandle;

/// One entry of a `--clusters` file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// The cluster's name (DNS-1123 subdomain).
    pub name: String,
    /// Targets callers may reach besides `kubernetes`; empty = whatever the agent serves.
    #[serde(default)]
    pub targets: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClustersFile {
    clusters: Vec<ClusterSpec>,
}

/// Reads and validates a `--clusters` file.
pub fn load_clusters_file(path: &Path) -> Result<Vec<ClusterSpec>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading clusters file {}: {e}", path.display()))?;
    let file: ClustersFile = serde_yaml::from_str(&text)
        .map_err(|e| format!("clusters file {}: {e}", path.display()))?;
    let mut seen = HashSet::new();
    for spec in &file.clusters {
        validate_cluster_name(&spec.name)
            .map_err(|e| format!("clusters file {}: {e}", path.display()))?;
        if !seen.insert(spec.name.clone()) {
            return Err(format!(
                "clusters file {}: cluster {:?} is listed twice",
                path.display(),
                spec.name
            ));
        }
    }
    Ok(file.clusters)
}

/// A live tunnel.
#[derive(Debug, Clone)]
pub struct Tunnel {
    /// Unique per accepted tunnel.
    pub id: u64,
    /// The session.
    pub session: SessionHandle,
    /// Messages for the agent (drain).
    pub control: mpsc::Sender<ControlMessage>,
    /// When it was accepted.
    pub since: SystemTime,
    /// The agent's version.
    pub agent_version: String,
    /// The agent's address as seen here.
    pub remote_addr: String,
    /// Targets the agent announced.
    pub targets: Vec<String>,
}

/// What `/v1/clusters` shows of one cluster.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// The cluster name.
    pub name: String,
    /// Whether a tunnel is up.
    pub connected: bool,
    /// When the current tunnel was accepted (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<String>,
    /// The agent's version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The agent's address as seen by this replica.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_address: Option<String>,
    /// Targets the agent serves.
    pub targets: Vec<String>,
    /// Streams open on the tunnel now.
    pub streams: usize,
}

/// Why a cluster cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Not in the registry (and, for an open registry, never connected).
    Unknown,
    /// Known, but no agent is connected.
    Disconnected,
}

/// The cluster table.
#[derive(Debug)]
pub struct Registry {
    allowed: Option<HashMap<String, ClusterSpec>>,
    tunnels: RwLock<HashMap<String, Tunnel>>,
    seen: RwLock<HashSet<String>>,
    next_id: AtomicU64,
}

impl Registry {
    /// A registry that admits only `clusters`, or any validly-tokened agent for `None`.
    pub fn new(clusters: Option<Vec<ClusterSpec>>) -> Arc<Self> {
        Arc::new(Registry {
            allowed: clusters.map(|list| list.into_iter().map(|c| (c.name.clone(), c)).collect()),
            tunnels: RwLock::new(HashMap::new()),
            seen: RwLock::new(HashSet::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Whether an agent for `name` may connect.
    pub fn admits(&self, name: &str) -> bool {
        self.allowed
            .as_ref()
            .is_none_or(|allowed| allowed.contains_key(name))
    }

    /// Whether callers may reach `target` of `name` (the agent still has the last word).
    pub fn target_allowed(&self, name: &str, target: &str) -> bool {
        target == tower_proto::preamble::KUBERNETES_TARGET
            || self
                .allowed
                .as_ref()
                .and_then(|allowed| allowed.get(name))
                .is_none_or(|spec| {
                    spec.targets.is_empty() || spec.targets.iter().any(|t| t == target)
                })
    }

    /// A fresh tunnel id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Installs `tunnel` for `name`; returns the tunnel it replaces, and whether the
    /// cluster had connected before.
    pub fn insert(&self, name: &str, tunnel: Tunnel) -> (Option<Tunnel>, bool) {
        let before = !self.seen_insert(name);
        let old = write(&self.tunnels).insert(name.to_owned(), tunnel);
        (old, before)
    }

    fn seen_insert(&self, name: &str) -> bool {
        write(&self.seen).insert(name.to_owned())
    }

    /// Removes the tunnel `id` of `name` if it is still the current one.
    pub fn remove(&self, name: &str, id: u64) -> bool {
        let mut tunnels = write(&self.tunnels);
        if tunnels.get(name).is_some_and(|t| t.id == id) {
            tunnels.remove(name);
            true
        } else {
            false
        }
    }

    /// The live tunnel of `name`, or why there is none.
    pub fn tunnel(&self, name: &str) -> Result<Tunnel, Lookup> {
        if let Some(t) = read(&self.tunnels)
            .get(name)
            .filter(|t| !t.session.is_closed())
        {
            return Ok(t.clone());
        }
        let known = match &self.allowed {
            Some(allowed) => allowed.contains_key(name),
            None => read(&self.seen).contains(name),
        };
        Err(if known {
            Lookup::Disconnected
        } else {
            Lookup::Unknown
        })
    }

    /// Every live tunnel.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        read(&self.tunnels).values().cloned().collect()
    }

    /// Status of every known cluster, sorted by name.
    pub fn status(&self) -> Vec<ClusterStatus> {
        let tunnels = read(&self.tunnels);
        let mut names: Vec<String> = match &self.allowed {
            Some(allowed) => allowed.keys().cloned().collect(),
            None => read(&self.seen).iter().cloned().collect(),
        };
        names.sort();
        names
            .into_iter()
            .map(
                |name| match tunnels.get(&name).filter(|t| !t.session.is_closed()) {
                    Some(t) => ClusterStatus {
                        connected: true,
                        connected_since: Some(
                            humantime::format_rfc3339_seconds(t.since).to_string(),
                        ),
                        agent_version: Some(t.agent_version.clone()),
                        remote_address: Some(t.remote_addr.clone()),
                        targets: t.targets.clone(),
                        streams: t.session.open_streams(),
                        name,
                    },
                    None => ClusterStatus {
                        name,
                        connected: false,
                        connected_since: None,
                        agent_version: None,
                        remote_address: None,
                        targets: Vec::new(),
                        streams: 0,
                    },
                },
            )
            .collect()
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
