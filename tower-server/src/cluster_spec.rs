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

use base64::Engine;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Map, Value, json};

use crate::kubernetes::{Cluster, Controller, PREVIOUS_TOKEN_ANNOTATION, TokenAction};

impl Controller {
    /// Writes whatever of the Cluster's connection differs from what it should be.
    pub(crate) async fn reconcile_spec(&self, api: &Api<Cluster>, cluster: &Cluster) {
        let name = cluster.metadata.name.as_deref().unwrap_or_default();
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
        if action == TokenAction::Repin && !self.repins.allow(name, REWRITE_EVERY) {
            tracing::warn!(
                cluster = %name,
                "the Cluster's token changed to one pinning another CA within a minute of this replica's own re-pin: do all replicas share the CA (Secret tower-tls)?"
            );
            action = TokenAction::Keep;
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
        if !self
            .credential
            .keeps(&self.verifier, &kubeconfig, &endpoint)
            && self.allow_kubeconfig_rewrite(name)
        {
            match self.credential.render(&self.minter, name, &endpoint) {
                Ok(yaml) => {
                    connection.insert(
                        "kubeconfig".into(),
                        base64::engine::general_purpose::STANDARD
                            .encode(yaml)
                            .into(),
                    );
                }
                Err(e) => tracing::warn!(cluster = %name, error = %e, "rendering the kubeconfig"),
            }
        }
        if let Some(ks) = &self.kubesphere {
            match ks.reconcile(cluster).await {
                Ok((port, url)) => {
                    if current.kubesphere_api_server_port != Some(i64::from(port)) {
                        connection.insert("kubesphereAPIServerPort".into(), port.into());
                    }
                    if current.kubesphere_api_endpoint != url {
                        connection.insert("kubesphereAPIEndpoint".into(), url.into());
                    }
                }
                Err(e) => {
                    tracing::warn!(cluster = %name, error = %e, "the cluster's kubesphere endpoint; retrying")
                }
            }
        }
        if current.kubernetes_api_server_port.is_some() {
            connection.insert("kubernetesAPIServerPort".into(), Value::Null);
        }
        if connection.is_empty() {
            return;
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
            Ok(_) => tracing::info!(cluster = %name, ?fields, "wrote the Cluster's connection"),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                tracing::debug!(cluster = %name, "Cluster changed meanwhile; the next event brings it");
            }
            Err(e) => {
                tracing::warn!(cluster = %name, error = %e, "writing the Cluster's connection")
            }
        }
    }
}

impl Controller {
    /// Whether this replica may write the Cluster's kubeconfig now: one write a minute per
    /// cluster (a sixth of the user token's lifetime when that is shorter, so renewals
    /// always pass); another within that time is refused with a warning that says why.
    fn allow_kubeconfig_rewrite(&self, name: &str) -> bool {
        let allowed = self
            .rewrites
            .allow(name, REWRITE_EVERY.min(self.credential.ttl / 6));
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
/// such writes are spaced out ([`Rewrites::allow`]).
#[derive(Debug, Default)]
pub struct Rewrites(std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>);

/// The least time between two kubeconfig writes, or two token re-pins, of one Cluster by
/// one replica.
const REWRITE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl Rewrites {
    /// Whether `cluster` may be written now, `every` after this replica's last write of
    /// it (which this call then becomes).
    fn allow(&self, cluster: &str, every: std::time::Duration) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        match last.get(cluster) {
            Some(at) if now.duration_since(*at) < every => false,
            _ => {
                last.insert(cluster.to_owned(), now);
                true
            }
        }
    }
}
