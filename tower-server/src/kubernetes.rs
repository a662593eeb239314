//! `serve --kubernetes`: KubeSphere `Cluster` objects are the registry.
//!
//! One task watches `clusters.cluster.kubesphere.io` (kube-runtime's watcher: relists
//! after a lost watch, backs off while the API server is away). A Cluster whose
//! `spec.connection.type` is `proxy` may connect; its `spec.connection.token`, when set,
//! is the only token accepted (rotate it to revoke), and when empty this server mints one
//! and writes it there, together with `spec.connection.kubernetesAPIEndpoint` and what
//! KubeSphere's host components read (the kubeconfig and the kubesphere endpoint, see
//! `cluster_spec`, [`crate::ks_endpoint`]). The same
//! task keeps condition `AgentAvailable` true while this replica holds the cluster's
//! tunnel. The publish address (what members dial) comes from the `tower` Service.
//!
//! The Cluster type is in `cluster`; how a condition is written beside other writers', in
//! `condition`; the client, the publish address and the replica count, which the server
//! reads from its own cluster besides Clusters, in `host`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;
use tower_auth::{Minter, Verifier};
use tower_proto::names::validate_cluster_name;

use crate::registry::{Entry, Registry, token_sha256};
use condition::write_condition;

mod cluster;
mod condition;
mod host;

pub use cluster::{
    Cluster, ClusterSpec, ClusterStatus, Condition, Connection, GROUP, PROXY, VERSION,
};
pub use host::{TOWER_SERVICE, client, follow_replica_count, publish_address};

/// The condition this server keeps.
pub const AGENT_AVAILABLE: &str = "AgentAvailable";
/// `True` while a second agent for the cluster was refused (its live tunnel answered),
/// until a tunnel is accepted for it again.
pub const AGENT_CONFLICT: &str = "AgentConflict";
/// How often failed writes are retried.
pub(crate) const RETRY: Duration = Duration::from_secs(5);

/// The Cluster watch and the writes it drives.
pub struct Controller {
    /// Client for the host's API server.
    pub client: Client,
    /// The registry this replica routes with.
    pub registry: Arc<Registry>,
    /// Mints tokens for Clusters that have none (or one this server cannot verify).
    pub minter: Minter,
    /// Verifies the tokens Clusters hold (agent tokens and kubeconfig user tokens).
    pub verifier: Verifier,
    /// The Tower CA's pin, written into each token so an agent given only the token
    /// knows whom to trust.
    pub ca_pin: Option<String>,
    /// How long a minted agent token is valid (`None`: for ever). A token with less
    /// than a third of it left is renewed; the old one stays accepted until it expires.
    pub agent_token_lifetime: Option<Duration>,
    /// Base URL of this server's frontend as the host reaches it.
    pub frontend_url: String,
    /// This replica's id (in condition messages).
    pub server_id: String,
    /// What goes into the Clusters' `spec.connection.kubeconfig`.
    pub credential: crate::kubeconfig::ClusterCredential,
    /// The Clusters' kubesphere endpoints (off with `--kubesphere-ports off`).
    pub kubesphere: Option<Arc<crate::ks_endpoint::KubeSphereEndpoints>>,
    /// When this replica last wrote each Cluster's kubeconfig.
    pub rewrites: crate::cluster_spec::Rewrites,
    /// When this replica last re-pinned each Cluster's token ([`TokenAction::Repin`]).
    pub repins: crate::cluster_spec::Rewrites,
    /// How long after the first list a Cluster whose `AgentAvailable` is `True` waits
    /// for its agent before this replica writes it `False` (`--agent-return-grace`).
    pub agent_return_grace: Duration,
}

/// What a Cluster's agent token needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenAction {
    /// Nothing.
    Keep,
    /// A new one in place of none or an unacceptable one (which stops working at once).
    Mint,
    /// A new one in place of one that expires soon (which works until it does).
    Renew,
    /// A new one in place of a valid one that pins another CA than this server's, or
    /// none: the Tower CA was replaced, or the token was minted without a pin (by an
    /// older Tower, or by hand). The old one works until it expires, as after a renewal:
    /// nothing is wrong with it but the CA it names, and an agent given its own CA
    /// (agent.yaml's `--ca-file`) still reaches the server with it.
    Repin,
}

/// The annotation that remembers the token a renewal replaced, so every replica accepts
/// it until its own `exp` and hands its agent the new one: `HEX/JTI`, the old token's
/// SHA-256 and the `jti` of the token that renewed it ([`previous_token_note`]).
pub const PREVIOUS_TOKEN_ANNOTATION: &str = "tower.kubesphere.io/previous-agent-token-sha256";

/// The [`PREVIOUS_TOKEN_ANNOTATION`] for `old` renewed by `new`.
pub fn previous_token_note(old: &str, new: &str) -> String {
    format!("{}/{}", token_sha256(old), jti_of(new))
}

/// The old token's SHA-256 from a [`PREVIOUS_TOKEN_ANNOTATION`], if `current` is the
/// token that renewed it: after a token written by hand (a revocation) the old one is
/// no longer accepted.
fn previous_token_of(note: &str, current: &str) -> Option<String> {
    let (hash, jti) = note.split_once('/')?;
    (!jti.is_empty() && jti == jti_of(current)).then(|| hash.to_owned())
}

fn jti_of(token: &str) -> String {
    tower_auth::AgentClaims::read_unverified(token)
        .map(|c| c.jti)
        .unwrap_or_default()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a Cluster's token must be (re)minted: it has none, or one this server does not
/// accept for it (a hex token of KubeSphere's old tower, one signed with the jwtSecret
/// itself by an older Tower or with another secret, one for another name, an expired
/// one): replacing it closes any tunnel that used it. Or it is to be renewed: less than a
/// third of `lifetime` is left at `now`. Or it is to be re-pinned: it pins no CA, or
/// another than `ca_pin` (this server's), so an agent given only the token (the console's
/// Deployment) would refuse this server for ever. A server that knows no CA pin keeps
/// whatever pin a token carries.
pub(crate) fn token_action(
    verifier: &Verifier,
    name: &str,
    token: &str,
    lifetime: Option<Duration>,
    ca_pin: Option<&str>,
    now: u64,
) -> TokenAction {
    if token.is_empty() {
        return TokenAction::Mint;
    }
    let claims = match verifier.verify_agent(token) {
        Ok(claims) if claims.sub == name => claims,
        Ok(claims) => {
            tracing::warn!(cluster = name, token_for = %claims.sub, "the Cluster's token is for another cluster: minting a new one");
            return TokenAction::Mint;
        }
        Err(e) => {
            tracing::warn!(cluster = name, error = %e, "the Cluster's token is not one this server accepts: minting a new one");
            return TokenAction::Mint;
        }
    };
    let renew_within = lifetime.map(|l| l.as_secs() / 3);
    if let (Some(exp), Some(within)) = (claims.exp, renew_within)
        && exp.saturating_sub(now) < within
    {
        return TokenAction::Renew;
    }
    let Some(ca_pin) = ca_pin else {
        return TokenAction::Keep;
    };
    match claims.ca.as_deref() {
        Some(pinned) if same_pin(pinned, ca_pin) => TokenAction::Keep,
        Some(pinned) => {
            tracing::warn!(
                cluster = name,
                token_pins = pinned,
                server_ca = ca_pin,
                "the Cluster's token pins another CA than this server's (was the Tower CA replaced?): writing one that pins this server's CA; the old one is accepted until it expires"
            );
            TokenAction::Repin
        }
        None => {
            tracing::info!(
                cluster = name,
                server_ca = ca_pin,
                "the Cluster's token pins no CA: writing one that pins this server's, so an agent given only the token can check whom it dials; the old one is accepted until it expires"
            );
            TokenAction::Repin
        }
    }
}

/// Whether two `sha256:HEX` pins name the same key (hex in either case).
fn same_pin(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

/// What this replica still has to write into a Cluster's condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    Available,
    Unavailable,
}

/// Cluster names in the order they were queued, each once.
#[derive(Default)]
struct Queue {
    order: VecDeque<String>,
    queued: HashSet<String>,
}

impl Queue {
    fn push(&mut self, name: &str) {
        if self.queued.insert(name.to_owned()) {
            self.order.push_back(name.to_owned());
        }
    }

    fn pop(&mut self) -> Option<String> {
        let name = self.order.pop_front()?;
        self.queued.remove(&name);
        Some(name)
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// When a Cluster's spec was last checked ([`Controller::reconcile_spec`]).
struct Checked {
    /// The resourceVersion checked: an event with the same one needs no new check.
    resource_version: Option<String>,
    /// When to check it again although it did not change (renewals, failed writes).
    recheck_at: tokio::time::Instant,
}

/// The controller's view between events: the Clusters as last seen, and what this
/// replica still owes them.
#[derive(Default)]
struct State {
    clusters: HashMap<String, Cluster>,
    /// The names of the list in progress.
    listing: Option<HashSet<String>>,
    /// Clusters whose tunnel this replica held (and said so).
    held: HashSet<String>,
    /// The `AgentAvailable` each cluster is still owed.
    owed: HashMap<String, Owed>,
    /// Owed clusters in the order they are written.
    due: Queue,
    /// Clusters whose spec is to be checked, one per turn: new or changed ones, and ones
    /// whose recheck is due. A list of 10,000 is taken in (and agents admitted) without
    /// waiting for 10,000 checks, and an unchanged Cluster is not checked again until its
    /// recheck.
    specs: Queue,
    checked: HashMap<String, Checked>,
    /// Whether the last turn's work was a condition write (the next is a spec check).
    spec_turn: bool,
    /// Owed clusters whose last write failed: queued again at the next retry tick.
    failed: Vec<String>,
    /// Clusters whose `AgentConflict` this replica set.
    conflicted: HashSet<String>,
    /// Whether the CRD has a status subresource: `None` until a write tells (KubeSphere's
    /// own has none, so each condition would otherwise cost a refused `/status` patch).
    status_subresource: Option<bool>,
}

impl State {
    fn owe(&mut self, name: &str, owed: Owed) {
        self.owed.insert(name.to_owned(), owed);
        self.due.push(name);
    }
}

impl Controller {
    /// Runs until `stop`: keeps the registry in step with the Cluster objects and the
    /// Cluster objects in step with the tunnels. Each event looks only at the clusters it
    /// touched (a tunnel up or down, a Cluster changed), never at all of them, and owed
    /// conditions are written one per turn, between events: at 10,000 Clusters the
    /// writes after a restart take minutes at the API pace, and the watch keeps being
    /// read meanwhile.
    pub async fn run(self, stop: CancellationToken) {
        let api: Api<Cluster> = Api::all(self.client.clone());
        let mut events = watcher::watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut state = State::default();
        // Once the first list is in: Clusters still `True` without a tunnel here when the
        // grace is over are written `False` (their agents had the grace to come back).
        let mut grace_ends: Option<tokio::time::Instant> = None;
        let mut grace_over = false;
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let changed = self.registry.changed().notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let grace = async {
                match grace_ends {
                    Some(at) if !grace_over => tokio::time::sleep_until(at).await,
                    _ => std::future::pending().await,
                }
            };
            // In this order: the watch first (a list of 10,000 is taken in, and agents
            // admitted, before any write), then the timers, then one write or spec check
            // (in turn, so neither waits for all of the other), then the wake-up for
            // tunnels that changed (handled after every turn anyway).
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                event = events.next() => match event {
                    None => break,
                    Some(Err(e)) => {
                        // The watcher backs off and relists by itself.
                        tracing::warn!(error = %e, "watching Cluster objects");
                        continue;
                    }
                    Some(Ok(event)) => {
                        let listed = matches!(event, Event::InitDone);
                        self.apply(&api, event, &mut state).await;
                        if listed && grace_ends.is_none() {
                            grace_ends = Some(tokio::time::Instant::now() + self.agent_return_grace);
                        }
                    }
                },
                () = grace => {
                    grace_over = true;
                    let names: Vec<String> = state.clusters.keys().cloned().collect();
                    for name in &names {
                        self.assess(name, &mut state);
                        let stale = !self.registry.is_connected(name)
                            && state.clusters.get(name).and_then(|c| c.condition(AGENT_AVAILABLE)).is_some_and(|c| c.status == "True");
                        if stale {
                            state.owe(name, Owed::Unavailable);
                        }
                    }
                    tracing::info!(owed = state.owed.len(), "the agents' grace to come back is over");
                }
                _ = retry.tick() => {
                    // Failed writes again, and the specs whose recheck is due.
                    if let Some(ks) = &self.kubesphere {
                        for name in ks.refresh().await {
                            state.specs.push(&name);
                        }
                    }
                    // Those due before the next tick, so that none waits longer than
                    // its recheck time (renewals are timed by it).
                    let next_tick = tokio::time::Instant::now() + RETRY;
                    for (name, checked) in &state.checked {
                        if checked.recheck_at <= next_tick {
                            state.specs.push(name);
                        }
                    }
                    for name in std::mem::take(&mut state.failed) {
                        if let Some(owed) = state.owed.get(&name).copied() {
                            state.owe(&name, owed);
                        }
                    }
                    let names: Vec<String> = state.clusters.keys().cloned().collect();
                    for name in &names {
                        self.assess(name, &mut state);
                    }
                }
                () = std::future::ready(()), if !state.due.is_empty() || !state.specs.is_empty() => {
                    state.spec_turn = !state.spec_turn;
                    if state.due.is_empty() || (state.spec_turn && !state.specs.is_empty()) {
                        self.check_next_spec(&api, &mut state).await;
                    } else {
                        self.write_next(&api, &mut state).await;
                    }
                }
                () = &mut changed => {}
            }
            for name in self.registry.take_touched() {
                self.assess(&name, &mut state);
            }
            let mut conflicts = self.registry.conflicted();
            conflicts.extend(state.conflicted.iter().cloned());
            conflicts.sort();
            conflicts.dedup();
            self.reconcile_conflicts(&api, &mut state, &conflicts).await;
        }
        // Say so before going: whichever replica still holds a tunnel says it back.
        for name in std::mem::take(&mut state.held) {
            state.owe(&name, Owed::Unavailable);
        }
        let last_words = async {
            while !state.due.is_empty() {
                self.write_next(&api, &mut state).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), last_words).await;
        if let Some(ks) = &self.kubesphere {
            ks.close_all();
        }
    }

    /// What `name`'s `AgentAvailable` should become, from this replica's view: `True`
    /// while it holds the tunnel, `False` once when it loses it (or when the condition is
    /// missing). Replicas that still hold a tunnel see the `False` and write `True` back.
    fn assess(&self, name: &str, state: &mut State) {
        let Some(cluster) = state.clusters.get(name) else {
            state.held.remove(name);
            state.owed.remove(name);
            state.conflicted.remove(name);
            return;
        };
        let missing = cluster.condition(AGENT_AVAILABLE).is_none();
        if self.registry.is_connected(name) {
            state.held.insert(name.to_owned());
            state.owe(name, Owed::Available);
        } else if state.held.remove(name) || missing {
            state.owe(name, Owed::Unavailable);
        } else if state.owed.get(name) == Some(&Owed::Available) {
            state.owed.remove(name);
        }
    }

    /// Checks the next queued Cluster's spec, and when to check it again.
    async fn check_next_spec(&self, api: &Api<Cluster>, state: &mut State) {
        let Some(name) = state.specs.pop() else {
            return;
        };
        let Some(cluster) = state.clusters.get(&name) else {
            return;
        };
        let recheck_in = self.reconcile_spec(api, cluster).await;
        state.checked.insert(
            name,
            Checked {
                resource_version: cluster.metadata.resource_version.clone(),
                recheck_at: tokio::time::Instant::now() + recheck_in,
            },
        );
    }

    /// Writes the next owed condition, unless the Cluster already says it.
    async fn write_next(&self, api: &Api<Cluster>, state: &mut State) {
        let Some(name) = state.due.pop() else {
            return;
        };
        let (Some(want), Some(cluster)) = (
            state.owed.get(&name).copied(),
            state.clusters.get_mut(&name),
        ) else {
            state.owed.remove(&name);
            return;
        };
        let (status, reason, message) = match want {
            Owed::Available => (
                "True",
                "AgentConnected",
                format!(
                    "the agent holds a tunnel to tower-server {}",
                    self.server_id
                ),
            ),
            Owed::Unavailable => (
                "False",
                "AgentNotConnected",
                format!("no agent tunnel on tower-server {}", self.server_id),
            ),
        };
        if cluster
            .condition(AGENT_AVAILABLE)
            .is_some_and(|c| c.status == status)
        {
            state.owed.remove(&name);
            return;
        }
        let written = write_condition(
            api,
            &name,
            cluster,
            AGENT_AVAILABLE,
            (status, reason, &message),
            &mut state.status_subresource,
        )
        .await;
        if written {
            state.owed.remove(&name);
        } else {
            state.failed.push(name);
        }
    }

    async fn apply(&self, api: &Api<Cluster>, event: Event<Cluster>, state: &mut State) {
        match event {
            Event::Init => state.listing = Some(HashSet::new()),
            Event::InitApply(cluster) => {
                let name = cluster.name().to_owned();
                if let Some(listed) = state.listing.as_mut() {
                    listed.insert(name.clone());
                }
                self.upsert(cluster, state).await;
                self.assess(&name, state);
            }
            Event::InitDone => {
                let listed = state.listing.take().unwrap_or_default();
                for name in self.registry.registered() {
                    if !listed.contains(&name) {
                        self.forget(&name, state).await;
                        self.assess(&name, state);
                    }
                }
                if let Some(ks) = &self.kubesphere {
                    let proxies: HashSet<String> = state.clusters.keys().cloned().collect();
                    ks.release_absent(&proxies, api).await;
                }
                if !self.registry.is_synced() {
                    tracing::info!(
                        clusters = self.registry.registered().len(),
                        "listed the Cluster objects: accepting agents"
                    );
                }
                self.registry.set_synced();
            }
            Event::Apply(cluster) => {
                let name = cluster.name().to_owned();
                self.upsert(cluster, state).await;
                self.assess(&name, state);
            }
            Event::Delete(cluster) => {
                self.forget(cluster.name(), state).await;
                self.assess(cluster.name(), state);
            }
        }
    }

    /// Routes by the Cluster at once (its token is the one agents are admitted with),
    /// and queues its spec check unless this resourceVersion was checked.
    async fn upsert(&self, cluster: Cluster, state: &mut State) {
        let name = cluster.name().to_owned();
        if !cluster.is_proxy() {
            self.forget(&name, state).await;
            return;
        }
        if let Err(e) = validate_cluster_name(&name) {
            tracing::warn!(cluster = name.as_str(), error = %e, "ignoring a Cluster whose name tower cannot route");
            return;
        }
        let token = &cluster.spec.connection.token;
        self.registry.upsert(
            &name,
            Entry {
                targets: Vec::new(),
                token: (!token.is_empty()).then(|| token.clone()),
                previous_token_sha256: cluster
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(PREVIOUS_TOKEN_ANNOTATION))
                    .and_then(|note| previous_token_of(note, token)),
            },
        );
        let checked = state
            .checked
            .get(&name)
            .is_some_and(|c| c.resource_version == cluster.metadata.resource_version);
        if !checked {
            state.specs.push(&name);
        }
        state.clusters.insert(name, cluster);
    }

    /// What the Cluster's token needs, as [`token_action`] judges it for this server.
    pub(crate) fn token_action(&self, name: &str, token: &str) -> TokenAction {
        token_action(
            &self.verifier,
            name,
            token,
            self.agent_token_lifetime,
            self.ca_pin.as_deref(),
            unix_now(),
        )
    }

    async fn forget(&self, name: &str, state: &mut State) {
        let known = state.clusters.remove(name).is_some();
        state.checked.remove(name);
        self.rewrites.forget(name);
        self.repins.forget(name);
        if self.registry.entry(name).is_some() {
            tracing::info!(cluster = %name, "Cluster deleted or no longer of type proxy");
            self.registry.forget(name);
        }
        if known && let Some(ks) = &self.kubesphere {
            ks.forget(name).await;
        }
    }

    /// Writes `AgentConflict`: `True` when this replica refused a second agent, `False`
    /// once it accepted a tunnel for that cluster again. A replica that saw no conflict
    /// leaves the condition alone, so replicas never overwrite each other's.
    async fn reconcile_conflicts(&self, api: &Api<Cluster>, state: &mut State, names: &[String]) {
        let State {
            clusters,
            conflicted,
            status_subresource,
            ..
        } = state;
        for name in names {
            let Some(cluster) = clusters.get_mut(name) else {
                continue;
            };
            let (status, reason, message) = match self.registry.conflict(name) {
                Some(c) => (
                    "True",
                    "SecondAgentRefused",
                    format!(
                        "tower-server {} refused a second agent from {} at {}: the live tunnel from {} answered (two agents with this cluster's token?)",
                        self.server_id, c.newcomer, c.at, c.live
                    ),
                ),
                None if conflicted.contains(name) => (
                    "False",
                    "AgentAccepted",
                    format!(
                        "tower-server {} accepted the agent's tunnel",
                        self.server_id
                    ),
                ),
                None => continue,
            };
            let current = cluster.condition(AGENT_CONFLICT);
            if current.is_some_and(|c| c.status == status && c.message.as_deref() == Some(&message))
            {
                continue;
            }
            if write_condition(
                api,
                name,
                cluster,
                AGENT_CONFLICT,
                (status, reason, &message),
                status_subresource,
            )
            .await
            {
                if status == "True" {
                    conflicted.insert(name.clone());
                } else {
                    conflicted.remove(name);
                }
            }
        }
        conflicted.retain(|name| clusters.contains_key(name));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_renewal_note_holds_only_while_the_renewing_token_is_current() {
        let minter = tower_auth::Minter::new(&tower_auth::Secret::new("s").unwrap());
        let old = minter.agent_token("c1", None);
        let renewed = minter.agent_token("c1", None);
        let by_hand = minter.agent_token("c1", None);
        let note = previous_token_note(&old, &renewed);
        assert_eq!(previous_token_of(&note, &renewed), Some(token_sha256(&old)));
        assert_eq!(previous_token_of(&note, &by_hand), None);
        assert_eq!(previous_token_of(&token_sha256(&old), &renewed), None);
    }

    #[test]
    fn a_token_pinning_another_ca_or_none_is_repinned_and_one_pinning_this_servers_kept() {
        let secret = tower_auth::Secret::new("s").unwrap();
        let (minter, verifier) = (Minter::new(&secret), Verifier::new(&secret));
        let ours = format!("sha256:{}", "ab".repeat(32));
        let replaced = format!("sha256:{}", "cd".repeat(32));
        let day = Duration::from_secs(86_400);
        let now = unix_now();
        let action = |token: &str, server_pin: Option<&str>| {
            token_action(&verifier, "c1", token, Some(90 * day), server_pin, now)
        };
        let pinned = |pin: Option<&str>| minter.agent_token_pinned("c1", Some(90 * day), pin);

        assert_eq!(action(&pinned(Some(&ours)), Some(&ours)), TokenAction::Keep);
        // The same pin with its hex in capitals is the same key.
        let upper = format!("sha256:{}", "AB".repeat(32));
        assert_eq!(
            action(&pinned(Some(&upper)), Some(&ours)),
            TokenAction::Keep
        );
        // The Tower CA was replaced: the console's Deployment would fail closed for ever.
        assert_eq!(
            action(&pinned(Some(&replaced)), Some(&ours)),
            TokenAction::Repin
        );
        // Minted without a pin (an older Tower, by hand): given one.
        assert_eq!(action(&pinned(None), Some(&ours)), TokenAction::Repin);
        // A server that knows no pin judges no pin.
        assert_eq!(action(&pinned(Some(&replaced)), None), TokenAction::Keep);
        assert_eq!(action(&pinned(None), None), TokenAction::Keep);

        // What was there before still decides first: none, not acceptable, for another
        // cluster, or due for renewal (whose new token carries the pin anyway).
        assert_eq!(action("", Some(&ours)), TokenAction::Mint);
        assert_eq!(action("0123abcd", Some(&ours)), TokenAction::Mint);
        let other = minter.agent_token_pinned("c2", None, Some(&ours));
        assert_eq!(action(&other, Some(&ours)), TokenAction::Mint);
        let ending = minter.agent_token_pinned("c1", Some(day), Some(&replaced));
        assert_eq!(action(&ending, Some(&ours)), TokenAction::Renew);
    }

    #[test]
    fn a_queue_keeps_each_name_once_in_the_order_first_queued() {
        let mut queue = Queue::default();
        for name in ["b", "a", "b", "c", "a"] {
            queue.push(name);
        }
        let drained: Vec<String> = std::iter::from_fn(|| queue.pop()).collect();
        assert_eq!(drained, ["b", "a", "c"]);
        assert!(queue.is_empty());
        // Once taken, a name may be queued again.
        queue.push("a");
        assert_eq!(queue.pop().as_deref(), Some("a"));
    }
}
