//! Which clusters may connect and which tunnel serves each.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use foldhash::{HashMap, HashMapExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tower_proto::ControlMessage;
use tower_proto::names::validate_cluster_name;
use tower_tunnel::SessionHandle;

use crate::http2::Http2Channel;
use crate::metrics::ClusterMetrics;

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
    /// The token the agent authenticated with (a rotated Cluster token revokes it).
    pub token: Arc<str>,
    /// The replicas the agent holds tunnels to, this one included.
    pub replicas: Arc<RwLock<Vec<String>>>,
    /// HTTP/2 connections inside the tunnel, when the agent serves them.
    pub http2: Option<Arc<Http2Channel>>,
    /// Pongs and round trip of the tunnel's control stream.
    pub health: Arc<tower_tunnel::control::LinkHealth>,
    /// Where the frontend sends this tunnel's requests to the kubernetes target, made
    /// once instead of per request.
    pub(crate) kubernetes: Option<crate::frontend::PoolAddress>,
}

/// What `/v1/clusters` shows of one cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The cluster name.
    pub name: String,
    /// Whether a tunnel is up.
    pub connected: bool,
    /// When the current tunnel was accepted (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_since: Option<String>,
    /// The agent's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The agent's address as seen by this replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_address: Option<String>,
    /// Targets the agent serves.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Streams open on the tunnel now.
    #[serde(default)]
    pub streams: usize,
    /// The tower-server replicas the agent holds a tunnel to (as the agent last said).
    #[serde(default)]
    pub replicas: Vec<String>,
}

/// Why a cluster cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Not in the registry (and, for an open registry, never connected).
    Unknown,
    /// Known, but no agent is connected.
    Disconnected,
}

/// Where the list of clusters that may connect comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Any agent with a valid token registers its cluster.
    Open,
    /// A `--clusters` file.
    File,
    /// `Cluster` objects in Kubernetes.
    Kubernetes,
}

/// A cluster that may connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    /// Targets callers may reach besides `kubernetes`; empty = whatever the agent serves.
    pub targets: Vec<String>,
    /// When set, the agent's token must be exactly this (a Cluster's `spec.connection.token`).
    pub token: Option<String>,
    /// The SHA-256 (hex) of the token `token` renewed: still accepted until its own
    /// `exp`, and an agent that dials with it is given `token`.
    pub previous_token_sha256: Option<String>,
}

impl Entry {
    /// Whether `token` is this entry's current token.
    fn is_current(&self, token: &str) -> bool {
        self.token
            .as_ref()
            .is_none_or(|t| tower_auth::constant_time_eq(t.as_bytes(), token.as_bytes()))
    }

    /// Whether `token` is the one this entry's token renewed.
    fn is_previous(&self, token: &str) -> bool {
        self.previous_token_sha256.as_ref().is_some_and(|hash| {
            tower_auth::constant_time_eq(hash.as_bytes(), token_sha256(token).as_bytes())
        })
    }
}

/// Hex SHA-256 of an agent token: how a renewed token is remembered.
pub fn token_sha256(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// Why an agent may not connect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The cluster is not registered.
    #[error("{0}")]
    NotRegistered(String),
    /// The token is valid but not the one registered for the cluster.
    #[error(
        "the agent's token is not the one in Cluster {0:?} spec.connection.token (rotated?): give the agent the current token"
    )]
    TokenMismatch(String),
}

/// The cluster table.
///
/// Its maps hash with foldhash, not SipHash: routing looks a cluster up in two or three
/// of them on every request. Their keys are names the operator listed or an agent token
/// admitted, never ones a caller chooses.
#[derive(Debug)]
pub struct Registry {
    source: Source,
    allowed: RwLock<HashMap<String, Entry>>,
    /// Shared, so that routing a request takes a reference count, not a copy of the
    /// tunnel's strings.
    tunnels: RwLock<HashMap<String, Arc<Tunnel>>>,
    seen: RwLock<HashSet<String>>,
    next_id: AtomicU64,
    changed: Notify,
    /// Whether the first full list is in ([`Registry::wait_synced`] waits on it).
    synced: tokio::sync::watch::Sender<bool>,
    /// The last second agent refused per cluster while its live tunnel answered, until a
    /// tunnel is accepted for it again.
    conflicts: RwLock<HashMap<String, Conflict>>,
    /// The figures of every cluster the registry knows (the names `status` lists): made
    /// when a cluster registers, dropped when it goes, so the per-cluster series are
    /// bounded by the registry, never by what callers ask for.
    metrics: RwLock<HashMap<String, Arc<ClusterMetrics>>>,
    /// Clusters whose tunnel, entry or conflict changed since [`Registry::take_touched`]
    /// (kept only for Kubernetes, whose controller takes them: it looks at those alone).
    touched: std::sync::Mutex<HashSet<String>>,
}

/// A second agent refused for a cluster whose live tunnel answered a ping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The refused agent's address.
    pub newcomer: String,
    /// The live tunnel's agent address.
    pub live: String,
    /// When (RFC 3339).
    pub at: String,
}

impl Registry {
    /// A registry that admits only `clusters`, or any validly-tokened agent for `None`.
    pub fn new(clusters: Option<Vec<ClusterSpec>>) -> Arc<Self> {
        match clusters {
            None => Self::with_source(Source::Open),
            Some(list) => {
                let registry = Self::with_source(Source::File);
                for spec in list {
                    registry.upsert(
                        &spec.name,
                        Entry {
                            targets: spec.targets,
                            token: None,
                            previous_token_sha256: None,
                        },
                    );
                }
                registry
            }
        }
    }

    /// An empty registry fed from `source`.
    pub fn with_source(source: Source) -> Arc<Self> {
        Arc::new(Registry {
            source,
            allowed: RwLock::new(HashMap::new()),
            tunnels: RwLock::new(HashMap::new()),
            seen: RwLock::new(HashSet::new()),
            next_id: AtomicU64::new(1),
            changed: Notify::new(),
            // Only Kubernetes has to list its clusters before it knows them.
            synced: tokio::sync::watch::Sender::new(source != Source::Kubernetes),
            conflicts: RwLock::new(HashMap::new()),
            metrics: RwLock::new(HashMap::new()),
            touched: std::sync::Mutex::new(HashSet::new()),
        })
    }

    /// Whether the registry has its first full list of clusters.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits at most `limit` for the first full list: whether it is in.
    pub async fn wait_synced(&self, limit: Duration) -> bool {
        let mut synced = self.synced.subscribe();
        matches!(
            tokio::time::timeout(limit, synced.wait_for(|s| *s)).await,
            Ok(Ok(_))
        )
    }

    /// Notes that `name` changed, for [`Registry::take_touched`].
    fn touch(&self, name: &str) {
        if self.source == Source::Kubernetes {
            self.touched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_owned());
        }
    }

    /// The clusters whose tunnel, entry or conflict changed since the last call (only
    /// with Kubernetes as the source; else none).
    pub fn take_touched(&self) -> Vec<String> {
        let mut touched = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        touched.drain().collect()
    }

    /// The clusters for which a second agent was refused since their last tunnel.
    pub fn conflicted(&self) -> Vec<String> {
        read(&self.conflicts).keys().cloned().collect()
    }

    /// Marks the first full list as received.
    pub fn set_synced(&self) {
        self.synced.send_replace(true);
    }

    /// Where the registry's clusters come from.
    pub fn source(&self) -> Source {
        self.source
    }

    /// Whether an agent for `name` holding `token` may connect.
    pub fn admits(&self, name: &str, token: &str) -> Result<(), Denied> {
        if self.source == Source::Open {
            return Ok(());
        }
        let allowed = read(&self.allowed);
        let Some(entry) = allowed.get(name) else {
            return Err(self.not_registered(name));
        };
        if entry.is_current(token) || entry.is_previous(token) {
            Ok(())
        } else {
            Err(Denied::TokenMismatch(name.to_owned()))
        }
    }

    /// The token an agent of `name` that dialed with `token` should dial with from now
    /// on, when `token` is the one the current token renewed.
    pub fn renewed_token(&self, name: &str, token: &str) -> Option<String> {
        let allowed = read(&self.allowed);
        let entry = allowed.get(name)?;
        (!entry.is_current(token) && entry.is_previous(token))
            .then(|| entry.token.clone())
            .flatten()
    }

    /// Why `name` may not connect when it is not registered, in the registry's own terms.
    pub fn not_registered(&self, name: &str) -> Denied {
        Denied::NotRegistered(match self.source {
            Source::Kubernetes => format!(
                "there is no Cluster {name:?} with spec.connection.type \"proxy\" on this host"
            ),
            _ => format!("cluster {name:?} is not in this server's clusters file"),
        })
    }

    /// Registers or updates `name`. A tunnel whose token no longer matches is closed.
    /// A tunnel that used the token the new one renewed stays, and its agent is given
    /// the new token.
    pub fn upsert(&self, name: &str, entry: Entry) {
        let tunnel = read(&self.tunnels).get(name).cloned();
        let changed =
            write(&self.allowed).insert(name.to_owned(), entry.clone()) != Some(entry.clone());
        self.ensure_metrics(name);
        if let Some(tunnel) = tunnel.filter(|t| !entry.is_current(&t.token)) {
            match &entry.token {
                Some(token) if entry.is_previous(&tunnel.token) => {
                    if changed {
                        tracing::info!(cluster = %name, tunnel = tunnel.id, "the cluster's token was renewed: giving the agent the new one");
                        let _ = tunnel.control.try_send(ControlMessage::Token {
                            token: token.clone(),
                        });
                    }
                }
                _ => {
                    tracing::warn!(cluster = %name, tunnel = tunnel.id, "the cluster's token changed: closing the tunnel that used the old one");
                    tunnel.session.close();
                }
            }
        }
        if changed {
            self.touch(name);
            self.changed.notify_waiters();
        }
    }

    /// Unregisters `name` and closes its tunnel.
    pub fn forget(&self, name: &str) {
        let was = write(&self.allowed).remove(name).is_some();
        write(&self.seen).remove(name);
        write(&self.metrics).remove(name);
        if let Some(tunnel) = read(&self.tunnels).get(name) {
            tracing::info!(cluster = %name, tunnel = tunnel.id, "the cluster is no longer registered: closing its tunnel");
            tunnel.session.close();
        }
        if was {
            self.touch(name);
            self.changed.notify_waiters();
        }
    }

    /// Every registered cluster name.
    pub fn registered(&self) -> Vec<String> {
        read(&self.allowed).keys().cloned().collect()
    }

    /// The registered entry of `name`.
    pub fn entry(&self, name: &str) -> Option<Entry> {
        read(&self.allowed).get(name).cloned()
    }

    /// Resolves when a tunnel comes or goes or the registered set changes. Register
    /// interest (`enable`) before looking at the state, so no change is missed.
    pub fn changed(&self) -> &Notify {
        &self.changed
    }

    /// Whether callers may reach `target` of `name` (the agent still has the last word).
    pub fn target_allowed(&self, name: &str, target: &str) -> bool {
        target == tower_proto::preamble::KUBERNETES_TARGET
            || read(&self.allowed).get(name).is_none_or(|entry| {
                entry.targets.is_empty() || entry.targets.iter().any(|t| t == target)
            })
    }

    /// A fresh tunnel id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Records that a second agent for `name` was refused.
    pub fn record_conflict(&self, name: &str, conflict: Conflict) {
        write(&self.conflicts).insert(name.to_owned(), conflict);
        self.touch(name);
        self.changed.notify_waiters();
    }

    /// The last second agent refused for `name` since a tunnel was last accepted.
    pub fn conflict(&self, name: &str) -> Option<Conflict> {
        read(&self.conflicts).get(name).cloned()
    }

    /// Installs `tunnel` for `name`; returns the tunnel it replaces, and whether the
    /// cluster had connected before.
    pub fn insert(&self, name: &str, tunnel: Arc<Tunnel>) -> (Option<Arc<Tunnel>>, bool) {
        let before = !write(&self.seen).insert(name.to_owned());
        write(&self.conflicts).remove(name);
        let old = write(&self.tunnels).insert(name.to_owned(), tunnel);
        // With no list of clusters, a cluster registers with its first tunnel (whose
        // token was verified); otherwise it registered already.
        if self.source == Source::Open || read(&self.allowed).contains_key(name) {
            self.ensure_metrics(name).state_changed();
        }
        self.touch(name);
        self.changed.notify_waiters();
        (old, before)
    }

    /// Removes the tunnel `id` of `name` if it is still the current one.
    pub fn remove(&self, name: &str, id: u64) -> bool {
        let removed = {
            let mut tunnels = write(&self.tunnels);
            if tunnels.get(name).is_some_and(|t| t.id == id) {
                tunnels.remove(name);
                true
            } else {
                false
            }
        };
        if removed {
            if let Some(metrics) = read(&self.metrics).get(name) {
                metrics.state_changed();
            }
            self.touch(name);
            self.changed.notify_waiters();
        }
        removed
    }

    /// The figures of `name`, when the registry knows it.
    pub fn metrics_of(&self, name: &str) -> Option<Arc<ClusterMetrics>> {
        read(&self.metrics).get(name).cloned()
    }

    /// Every known cluster's figures, sorted by name.
    pub fn cluster_metrics(&self) -> Vec<(String, Arc<ClusterMetrics>)> {
        let mut all: Vec<_> = read(&self.metrics)
            .iter()
            .map(|(name, m)| (name.clone(), m.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Whether `name` had a tunnel to this replica since it registered (or this process
    /// started).
    pub fn ever_connected(&self, name: &str) -> bool {
        read(&self.seen).contains(name)
    }

    fn ensure_metrics(&self, name: &str) -> Arc<ClusterMetrics> {
        if let Some(metrics) = read(&self.metrics).get(name) {
            return metrics.clone();
        }
        write(&self.metrics)
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Whether `name` has a live tunnel on this replica.
    pub fn is_connected(&self, name: &str) -> bool {
        read(&self.tunnels)
            .get(name)
            .is_some_and(|t| !t.session.is_closed())
    }

    /// The live tunnel of `name`, or why there is none.
    pub fn tunnel(&self, name: &str) -> Result<Arc<Tunnel>, Lookup> {
        if let Some(t) = read(&self.tunnels)
            .get(name)
            .filter(|t| !t.session.is_closed())
        {
            return Ok(t.clone());
        }
        // With no list of clusters, an unknown name may be a cluster whose agent has not
        // (re)connected yet, after a restart say: 503 (retry), never 404, which clients
        // read as "this object does not exist".
        let known = match self.source {
            Source::Open => true,
            _ => read(&self.allowed).contains_key(name),
        };
        Err(if known {
            Lookup::Disconnected
        } else {
            Lookup::Unknown
        })
    }

    /// Every live tunnel.
    pub fn tunnels(&self) -> Vec<Arc<Tunnel>> {
        read(&self.tunnels).values().cloned().collect()
    }

    /// Status of every known cluster, sorted by name.
    pub fn status(&self) -> Vec<ClusterStatus> {
        let tunnels = read(&self.tunnels);
        let mut names: Vec<String> = match self.source {
            Source::Open => read(&self.seen).iter().cloned().collect(),
            _ => read(&self.allowed).keys().cloned().collect(),
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
                        replicas: read(&t.replicas).clone(),
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
                        replicas: Vec::new(),
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
