//! KubeSphere's `Cluster` (`clusters.cluster.kubesphere.io/v1alpha1`), as much of it as
//! tower reads or writes.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// The API group of KubeSphere's Cluster.
pub const GROUP: &str = "cluster.kubesphere.io";
/// Its version.
pub const VERSION: &str = "v1alpha1";
/// The connection type whose clusters connect through tower.
pub const PROXY: &str = "proxy";

/// A KubeSphere `Cluster` (only the fields tower reads or writes; writes are patches, so
/// fields tower does not know are never lost).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Cluster {
    /// Standard metadata, without `managedFields` ([`without_managed_fields`]).
    #[serde(default, deserialize_with = "without_managed_fields")]
    pub metadata: ObjectMeta,
    /// The spec.
    #[serde(default)]
    pub spec: ClusterSpec,
    /// The status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ClusterStatus>,
}

/// `metadata` as read, `managedFields` dropped. The API server keeps an entry per writer
/// on every Cluster (KubeSphere's console, its cluster controller, tower), each a tree of
/// every field that writer set, and sends them with every list and watch event; tower
/// reads none of it, and the controller keeps every Cluster between events. B9 with
/// 10,000 Clusters carrying the entries a real host holds (tower_e2e::fleet's
/// `MANAGED_FIELDS`): 579 MiB with them kept, past deploy/host's 512 MiB limit.
fn without_managed_fields<'de, D>(deserializer: D) -> Result<ObjectMeta, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let mut metadata = ObjectMeta::deserialize(deserializer)?;
    metadata.managed_fields = None;
    Ok(metadata)
}

/// `Cluster.spec`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// How the host reaches the member.
    #[serde(default)]
    pub connection: Connection,
}

/// `Cluster.spec.connection`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    /// `direct` or `proxy`.
    #[serde(default, rename = "type")]
    pub type_: String,
    /// The agent token (`proxy` only).
    #[serde(default)]
    pub token: String,
    /// Where the host reaches the member's Kubernetes API.
    #[serde(default, rename = "kubernetesAPIEndpoint")]
    pub kubernetes_api_endpoint: String,
    /// A kubeconfig for the member (base64, as Go writes `[]byte`).
    #[serde(default)]
    pub kubeconfig: String,
    /// Where the host's ks-apiserver reaches the member's KubeSphere API.
    #[serde(default, rename = "kubesphereAPIEndpoint")]
    pub kubesphere_api_endpoint: String,
    /// The port of `kubesphere_api_endpoint` on every tower replica.
    #[serde(default, rename = "kubesphereAPIServerPort")]
    pub kubesphere_api_server_port: Option<i64>,
    /// KubeSphere's old tower's kube-apiserver port (unused by this one; removed).
    #[serde(default, rename = "kubernetesAPIServerPort")]
    pub kubernetes_api_server_port: Option<i64>,
}

/// `Cluster.status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Conditions, KubeSphere's shape.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One entry of `Cluster.status.conditions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// E.g. `AgentAvailable`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Last time the condition was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<String>,
    /// Last time `status` changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// A CamelCase reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl kube::Resource for Cluster {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Cluster".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "clusters".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl Cluster {
    pub(super) fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// Whether agents may connect for this cluster.
    pub fn is_proxy(&self) -> bool {
        self.spec.connection.type_ == PROXY
    }

    /// The status of condition `type_`, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_cluster_is_kept_without_its_managed_fields() {
        let cluster: Cluster = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "member-1",
                "resourceVersion": "7",
                "annotations": {"a": "b"},
                "managedFields": [{"manager": "controller-manager", "operation": "Update",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}],
            },
            "spec": {"connection": {"type": "proxy", "token": "t"}},
        }))
        .unwrap();
        assert_eq!(cluster.metadata.managed_fields, None);
        assert_eq!(cluster.name(), "member-1");
        assert_eq!(cluster.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(cluster.metadata.annotations.as_ref().unwrap()["a"], "b");
        assert!(cluster.is_proxy());
    }
}
