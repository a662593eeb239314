//! What this server writes into a proxy Cluster's `spec.connection`, for KubeSphere's host
//! components to use (KubeSphere release-3.4, pkg/apis/cluster/v1alpha1/cluster_types.go):
//!
//! - `token`: the agent token (minted when empty or not one this server accepts for the
//!   cluster: KubeSphere's old tower wrote a hex string no agent of ours can present;
//!   renewed a third before it expires, and re-pinned when it pins no CA or another than
//!   this server's, the one it replaces remembered in an annotation either way);
//! - `kubernetesAPIEndpoint`: `{--frontend-url}/clusters/{name}`;
//! - `kubeconfig`: that endpoint, Tower's CA and a user token
//!   ([`crate::kubeconfig::ClusterCredential`]). KubeSphere's cluster controller
//!   (pkg/controller/cluster/cluster_controller.go, `syncCluster`) skips a Cluster until
//!   this is set, then builds its client from it alone
//!   (`clientcmd.RESTConfigFromKubeConfig`) to join and probe the member. Kept as long as
//!   it is valid, so replicas and restarts leave it alone;
//! - `kubesphereAPIEndpoint` and `kubesphereAPIServerPort` ([`crate::ks_endpoint`]);
//! - `kubernetesAPIServerPort` removed: the old tower's unauthenticated kube port is served
//!   by nobody now.
//!
//! One merge patch carries what differs, guarded by the resourceVersion it was computed
//! from: two replicas never both mint; the loser sees the winner's values next event.
//! Nothing is written into a Cluster that is being deleted (it stays routed meanwhile).

use std::time::Duration;

use base64::Engine;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Map, Value, json};

use crate::kubernetes::{Cluster, Controller, PREVIOUS_TOKEN_ANNOTATION, RETRY, TokenAction};

impl Controller {
    /// Writes whatever of the Cluster's connection differs from what it should be;
    /// returns when to check it again though it did not change: soon after anything
    /// failed or was held back, else in time for the next renewal ([`Self::recheck_every`]).
    pub(crate) async fn reconcile_spec(&self, api: &Api<Cluster>, cluster: &Cluster) -> Duration {
        let mut recheck_in = self.recheck_every();
        let name = cluster.metadata.name.as_deref().unwrap_or_default();
        if cluster.metadata.deletion_timestamp.is_some() {
            // Terminating: KubeSphere's finalizer holds the Cluster while its cluster
            // controller cleans up on the member through the agent, so it stays routed.
            // Nothing is written into it: no token is minted for a cluster on its way out,
            // and no write races the controller's Update that removes the finalizer.
            tracing::info!(cluster = %name, "the Cluster is being deleted: routing it until it is gone, writing nothing into its spec");
            if let Some(ks) = &self.kubesphere
                && !ks.keep_serving(cluster)
            {
                return RETRY;
            }
            return recheck_in;
        }
        let mut retry = || recheck_in = recheck_in.min(RETRY);
        let current = &cluster.spec.connection;
        let endpoint = format!(
            "{}/clusters/{name}",
            self.frontend_url.trim_end_matches('/')
        );
        let mut connection = Map::new();
        if current.kubernetes_api_endpoint != endpoint {
            connection.insert("kubernetesAPIEndpoint".into(), endpoint.clone().into());
        }
        let mut metadata = json!({ "resourceVersion": cluster.metadata.resource_version });
        let mut action = self.token_action(name, &current.token);
        // Replicas that disagree on the CA (each generated its own instead of sharing
        // tower-tls) would re-pin each other's tokens for ever: one re-pin a minute.
        if action == TokenAction::Repin && !self.repins.may(name, REWRITE_EVERY) {
            tracing::warn!(
                cluster = %name,
                "the Cluster's token changed to one pinning another CA within a minute of this replica's own re-pin: do all replicas share the CA (Secret tower-tls)?"
            );
            action = TokenAction::Keep;
            retry();
        }
        if action != TokenAction::Keep {
            let token = self.minter.agent_token_pinned(
                name,
                self.agent_token_lifetime,
                self.ca_pin.as_deref(),
            );
            // A renewed token stays accepted until it expires; one that was replaced
            // (unacceptable) does not. The note names the token that renewed it, so a
            // token an operator writes by hand later (a revocation) ends it.
            let previous = matches!(action, TokenAction::Renew | TokenAction::Repin)
                .then(|| crate::kubernetes::previous_token_note(&current.token, &token));
            metadata["annotations"] = json!({ PREVIOUS_TOKEN_ANNOTATION: previous });
            connection.insert("token".into(), token.into());
        }
        let kubeconfig = base64::engine::general_purpose::STANDARD
            .decode(current.kubeconfig.as_bytes())
            .unwrap_or_default();
        let keeps = self
            .credential
            .keeps(&self.verifier, &kubeconfig, &endpoint);
        let mut kubeconfig_written = false;
        if !keeps && !self.may_rewrite_kubeconfig(name) {
            retry();
        } else if !keeps {
            match self.credential.render(&self.minter, name, &endpoint) {
                Ok(yaml) => {
                    connection.insert(
                        "kubeconfig".into(),
                        base64::engine::general_purpose::STANDARD
                            .encode(yaml)
                            .into(),
                    );
                    kubeconfig_written = true;
                }
                Err(e) => {
                    tracing::warn!(cluster = %name, error = %e, "rendering the kubeconfig");
                    retry();
                }
            }
        }
        if let Some(ks) = &self.kubesphere {
            match ks.reconcile(cluster).await {
                Ok(crate::ks_endpoint::Endpoint {
                    port,
                    url,
                    listening,
                }) => {
                    if !listening {
                        retry();
                    }
                    if current.kubesphere_api_server_port != Some(i64::from(port)) {
                        connection.insert("kubesphereAPIServerPort".into(), port.into());
                    }
                    if current.kubesphere_api_endpoint != url {
                        connection.insert("kubesphereAPIEndpoint".into(), url.into());
                    }
                }
                Err(e) => {
                    tracing::warn!(cluster = %name, error = %e, "the cluster's kubesphere endpoint; retrying");
                    retry();
                }
            }
        }
        if current.kubernetes_api_server_port.is_some() {
            connection.insert("kubernetesAPIServerPort".into(), Value::Null);
        }
        if connection.is_empty() {
            return recheck_in;
        }
        let fields: Vec<String> = connection.keys().cloned().collect();
        let patch = json!({
            "metadata": metadata,
            "spec": { "connection": connection },
        });
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(cluster = %name, ?fields, "wrote the Cluster's connection");
                // Only writes that landed count toward the spacing: one that lost to a
                // concurrent change (409) is made again at the next event.
                if action == TokenAction::Repin {
                    self.repins.wrote(name);
                }
                if kubeconfig_written {
                    self.rewrites.wrote(name);
                }
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::debug!(cluster = %name, "Cluster changed meanwhile; the next event brings it");
            }
            Err(e) => {
                tracing::warn!(cluster = %name, error = %e, "writing the Cluster's connection");
                retry();
            }
        }
        recheck_in
    }

    /// How often an unchanged Cluster's spec is checked: often enough that its agent
    /// token and its kubeconfig are renewed between a third and a sixth of their lifetime
    /// before they expire, and at least every [`RECHECK_MAX`] (what no event announces:
    /// a kubesphere port claim lost from the table is announced by the table's refresh).
    fn recheck_every(&self) -> Duration {
        recheck_every(self.credential.ttl, self.agent_token_lifetime)
    }
}

/// [`Controller::recheck_every`] for a kubeconfig lifetime of `kubeconfig_ttl` and an agent
/// token lifetime of `token_lifetime` (`None`: for ever).
fn recheck_every(kubeconfig_ttl: Duration, token_lifetime: Option<Duration>) -> Duration {
    let mut every = RECHECK_MAX.min(kubeconfig_ttl / 6);
    if let Some(lifetime) = token_lifetime {
        every = every.min(lifetime / 6);
    }
    every.max(RETRY)
}

/// The longest an unchanged Cluster's spec goes unchecked.
const RECHECK_MAX: Duration = Duration::from_secs(300);

impl Controller {
    /// Whether this replica may write the Cluster's kubeconfig now: one write a minute per
    /// cluster (a sixth of the user token's lifetime when that is shorter, so renewals
    /// always pass); another within that time is refused with a warning that says why.
    fn may_rewrite_kubeconfig(&self, name: &str) -> bool {
        let allowed = self
            .rewrites
            .may(name, REWRITE_EVERY.min(self.credential.ttl / 6));
        if !allowed {
            tracing::warn!(
                cluster = name,
                "the Cluster's kubeconfig changed to one this replica would not write, within a minute of its own write: do all replicas share --frontend-url and the CA (Secret tower-tls)?"
            );
        }
        allowed
    }
}

/// When this replica last wrote something of each Cluster that replicas could disagree
/// on: its kubeconfig (another --frontend-url, another CA: each replica generated its own
/// instead of sharing tower-tls), or its token's CA pin. Replicas that disagree would
/// rewrite it in turn forever, and KubeSphere rebuilds its clients on every write, so
/// such writes are spaced out ([`Rewrites::may`]).
#[derive(Debug, Default)]
pub struct Rewrites(std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>);

/// The least time between two kubeconfig writes, or two token re-pins, of one Cluster by
/// one replica.
const REWRITE_EVERY: Duration = Duration::from_secs(60);

impl Rewrites {
    /// Whether `cluster` may be written now: `every` has passed since this replica's
    /// last write of it ([`Rewrites::wrote`]).
    fn may(&self, cluster: &str, every: Duration) -> bool {
        let last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        last.get(cluster).is_none_or(|at| at.elapsed() >= every)
    }

    /// Notes that this replica wrote `cluster` now.
    fn wrote(&self, cluster: &str) {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        last.insert(cluster.to_owned(), std::time::Instant::now());
    }

    /// Forgets `cluster` (deleted, or no longer of type proxy).
    pub(crate) fn forget(&self, cluster: &str) {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        last.remove(cluster);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_spec_is_rechecked_in_time_for_renewals_and_at_least_every_five_minutes() {
        let day = Duration::from_secs(86_400);
        // The defaults (a year's kubeconfig, 90 days' tokens): the safety net.
        assert_eq!(recheck_every(365 * day, Some(90 * day)), RECHECK_MAX);
        assert_eq!(recheck_every(365 * day, None), RECHECK_MAX);
        // Short lifetimes: a sixth of the shorter, so a renewal (due with a third left)
        // happens with at least a sixth left.
        let s = Duration::from_secs;
        assert_eq!(recheck_every(s(600), Some(s(1_200))), s(100));
        assert_eq!(recheck_every(365 * day, Some(s(60))), s(10));
        // Never more often than failed writes are retried.
        assert_eq!(recheck_every(s(10), Some(s(12))), RETRY);
    }
}
