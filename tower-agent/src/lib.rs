//! `tower-agent`: the member side of Tower.
//!
//! The agent dials *out* to tower-server ([`tower_tunnel::dial`]), holds the tunnel, and
//! serves each stream the server opens: a control stream (keepalive, drain), an HTTP/1.1
//! stream for one of its targets, or an HTTP/2 stream that carries many requests (the
//! server's watches) for one of its targets (`tunnel`). Each request says who the
//! caller is in the server's identity assertion, signed with this cluster's own key
//! ([`identity`]); the agent refuses requests that ask to impersonate someone else
//! (`kubectl --as`, `Impersonate-*` headers) and, for the `kubernetes` target, calls its
//! kube-apiserver with its own credentials plus `Impersonate-User`/`Impersonate-Group`,
//! so member RBAC applies to the real user (`request`). Other targets exist only when
//! configured ([`Config::targets`]); anything else is refused. The agent never opens
//! streams toward the host.
//!
//! Modules: [`cli`] (flags → [`Config`]), `backoff`, `tunnel`, `request`,
//! [`identity`], [`upstream`], `admin`. Entry point [`run`].

#![forbid(unsafe_code)]

mod admin;
mod backoff;
pub mod cli;
mod http2;
pub mod identity;
pub mod metrics;
mod pace;
mod request;
mod tunnel;
pub mod upstream;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_proto::handshake::Refusal;
use tower_tunnel::control::Keepalive;
use tower_tunnel::dial::{self, DialConfig};

pub use crate::backoff::Backoff;
use crate::backoff::{Ended, Reconnects, duplicate_delay};
use crate::identity::{IdentityKeys, KeySource};
use crate::upstream::{TokenFile, Upstream};

/// Everything `run` needs, validated.
pub struct Config {
    /// How to reach the server.
    pub dial: DialConfig,
    /// Where `dial.token` came from, if a file: read again before each dial.
    pub token_file: Option<TokenFile>,
    /// The token the server handed over when it renewed this cluster's (control message
    /// `Token`): dialed with while it is newer than the file's.
    pub renewed_token: RenewedToken,
    /// Checks the server's identity assertions.
    pub identity: Arc<IdentityKeys>,
    /// Where the identity key comes from: followed while the agent runs.
    pub key_source: KeySource,
    /// The targets this agent serves; always holds `kubernetes`.
    pub targets: HashMap<String, Upstream>,
    /// Keepalive on the tunnel (the server's wish wins when it asks for more often).
    pub keepalive: Keepalive,
    /// Reconnect policy.
    pub backoff: Backoff,
    /// On shutdown, how long requests in flight get to finish (watches end at once,
    /// cleanly).
    pub shutdown_grace: Duration,
    /// What `/metrics` on the admin listener shows.
    pub metrics: Arc<metrics::Metrics>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("server", &format!("{}:{}", self.dial.host, self.dial.port))
            .field("cluster", &self.dial.cluster)
            .field("targets", &self.targets.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A renewed agent token the server handed over, if any.
#[derive(Debug, Default)]
pub struct RenewedToken(std::sync::Mutex<Option<String>>);

impl RenewedToken {
    /// Takes `token` from the server, if it is an agent token for `cluster`; says why not.
    pub fn offer(&self, cluster: &str, token: String) -> Result<Option<u64>, String> {
        let claims = tower_auth::AgentClaims::read_unverified(&token)
            .map_err(|e| format!("the server's renewed token: {e}"))?;
        if claims.sub != cluster {
            return Err(format!(
                "the server's renewed token is for cluster {:?}, not this one",
                claims.sub
            ));
        }
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
        Ok(claims.exp)
    }

    /// The renewed token, when there is one issued after `current` (a token rotated in
    /// the agent's own file later wins over it).
    pub fn newer_than(&self, current: &str) -> Option<String> {
        let renewed = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let iat = |t: &str| tower_auth::AgentClaims::read_unverified(t).map_or(0, |c| c.iat);
        (iat(&renewed) > iat(current)).then_some(renewed)
    }
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Serving the admin listener failed.
    #[error("admin listener: {0}")]
    Admin(std::io::Error),
}

/// Runs the agent until `shutdown`: keeps a tunnel up, and serves `/healthz` and
/// `/readyz` (ready = at least one tunnel up, i.e. with its control stream open) on
/// `admin`. Holds one tunnel per server
/// replica behind the published address.
pub async fn run(
    config: Config,
    admin: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let up = config.metrics.up.clone();
    if let Some(listener) = admin {
        let metrics = config.metrics.clone();
        tokio::spawn(admin::serve_admin(
            listener,
            up.clone(),
            metrics,
            shutdown.clone(),
        ));
    }
    tokio::spawn(
        config
            .identity
            .clone()
            .follow(config.key_source.clone(), shutdown.clone()),
    );
    let config = Arc::new(config);
    let server = format!("{}:{}", config.dial.host, config.dial.port);
    // One tunnel per server replica behind the one published address: the 101 names the
    // replica and how many there are; dial until every one holds a tunnel.
    let mut held: HashSet<String> = HashSet::new();
    // Every tunnel's control stream tells its replica which replicas are held now.
    let (held_tx, _) = watch::channel(Vec::<String>::new());
    let publish_held = |held: &HashSet<String>| {
        let mut ids: Vec<String> = held.iter().cloned().collect();
        ids.sort();
        held_tx.send_replace(ids);
    };
    let mut replicas: usize = 1;
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(String, Ended, Duration)>();
    let tunnels = TaskTracker::new();
    let (count_tx, mut count_rx) = mpsc::unbounded_channel::<usize>();
    let mut reconnects = Reconnects::default();
    let mut dial_config = config.dial.clone();
    let mut duplicates: u32 = 0;
    let mut delay = Duration::ZERO;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(count) = count_rx.recv() => {
                if count != replicas {
                    tracing::info!(replicas = count, tunnels = held.len(), "the server count changed");
                    replicas = count;
                }
                continue;
            }
            Some((server_id, ended, lasted)) = ended_rx.recv() => {
                held.remove(&server_id);
                publish_held(&held);
                delay = reconnects
                    .tunnel_ended(&ended, lasted, config.backoff.healthy_after)
                    .map_or(Duration::ZERO, |step| config.backoff.delay(step));
                tracing::info!(server_id = server_id.as_str(), ?delay, tunnels = held.len(), "tunnel ended; reconnecting");
                continue;
            }
            () = tokio::time::sleep(delay), if held.len() < replicas => {}
        }
        if let Some(file) = &config.token_file {
            dial_config.token = file.token();
        }
        if let Some(renewed) = config.renewed_token.newer_than(&dial_config.token) {
            dial_config.token = renewed;
        }
        let held_ids: Vec<String> = held.iter().cloned().collect();
        let dialed = tokio::select! {
            dialed = dial::dial(&dial_config, &held_ids) => dialed,
            () = shutdown.cancelled() => break,
        };
        if let Err(e) = &dialed {
            config.metrics.dial_error(e);
        }
        match dialed {
            Ok(dialed) => {
                replicas = usize::from(dialed.hello.server_count.max(1));
                let server_id = dialed.hello.server_id.clone();
                if held.contains(&server_id) {
                    // The load balancer sent us to a replica we already hold: drop this
                    // one and try again soon (jittered, so we do not hammer it).
                    duplicates = duplicates.saturating_add(1);
                    delay = duplicate_delay(&config.backoff, duplicates);
                    tracing::debug!(
                        server_id = server_id.as_str(),
                        "duplicate tunnel to a replica already held: closed"
                    );
                    continue;
                }
                duplicates = 0;
                tracing::info!(%server, server_id = server_id.as_str(), replicas, tunnels = held.len() + 1, "tunnel up");
                held.insert(server_id.clone());
                publish_held(&held);
                delay = Duration::ZERO;
                let (config, shutdown, up, ended_tx, held_rx, count_tx) = (
                    config.clone(),
                    shutdown.clone(),
                    up.clone(),
                    ended_tx.clone(),
                    held_tx.subscribe(),
                    count_tx.clone(),
                );
                tunnels.spawn(async move {
                    let started = Instant::now();
                    let ended =
                        tunnel::hold_tunnel(dialed, config, shutdown, held_rx, count_tx, &up).await;
                    let _ = ended_tx.send((server_id, ended, started.elapsed()));
                });
            }
            Err(tower_tunnel::TunnelError::Refused {
                status: 409,
                reason,
                refusal: Some(refusal),
            }) if refusal == Refusal::Conflict.as_str() => {
                // Another agent for this cluster holds a live tunnel: the server will not
                // let this one replace it while it answers. Back off as for any failure;
                // once that tunnel is gone (a restart), the next dial gets through.
                // The server's words, as it sent them: a string field, escaped.
                tracing::warn!(%server, reason = reason.as_str(), "another agent holds this cluster's tunnel");
                delay = config.backoff.delay(reconnects.dial_failed());
            }
            Err(tower_tunnel::TunnelError::Refused { status: 409, .. }) => {
                // The load balancer sent us to a replica we already hold, which said so
                // before touching its tunnel: try again soon, jittered.
                duplicates = duplicates.saturating_add(1);
                delay = duplicate_delay(&config.backoff, duplicates);
                continue;
            }
            Err(e) => {
                // The error may quote the server's (or a proxy's) refusal: escaped.
                tracing::warn!(%server, error = %tower_telemetry::Escaped(&e), "dialing tower-server failed");
                delay = config.backoff.delay(reconnects.dial_failed());
            }
        }
    }
    // Every tunnel drains on the same signal: wait for them (each bounds its own wait).
    tunnels.close();
    tunnels.wait().await;
    Ok(())
}
