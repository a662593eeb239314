//! Ports of the kubesphere endpoints: each proxy Cluster gets one port, the same on every
//! replica, recorded in its `spec.connection.kubesphereAPIServerPort`.
//!
//! The API server is the arbiter. One ConfigMap, [`TABLE`], maps each taken port to its
//! cluster; a replica claims a port by writing that ConfigMap with the resourceVersion it
//! read, so of two replicas claiming at once one gets a conflict, reads again and sees the
//! other's claim. A cluster asking again gets the port it already holds, so two replicas
//! working on the same Cluster agree. (KubeSphere's old tower checked new ports against the
//! wrong field and could hand one port to two clusters; a Cluster it imported keeps its
//! port here unless another Cluster holds it already.)
//!
//! Each port is also a Service, `mc-{cluster}` like the old tower's, that selects the tower
//! pods and is owned by the Cluster (ownerReference), so it goes when the Cluster goes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{ConfigMap, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};

pub use crate::cluster_label::CLUSTER_LABEL;
use crate::cluster_label::cluster_label;

/// The ConfigMap (in tower's namespace) whose `data` maps each taken port to its cluster.
pub const TABLE: &str = "tower-kubesphere-ports";
/// How often a claim is retried after conflicts before it waits for the next round.
const CLAIM_ATTEMPTS: usize = 50;

/// Port claims in [`TABLE`], with what this replica already knows it holds.
pub struct PortTable {
    api: Api<ConfigMap>,
    range: RangeInclusive<u16>,
    /// Cluster → port, as last read or written.
    held: Mutex<HashMap<String, u16>>,
}

impl PortTable {
    /// The table in `namespace`, handing out ports in `range`.
    pub fn new(client: Client, namespace: &str, range: RangeInclusive<u16>) -> Self {
        PortTable {
            api: Api::namespaced(client, namespace),
            range,
            held: Mutex::new(HashMap::new()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, u16>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The port of `cluster`: the one it holds, else `wanted` (the Cluster's recorded port)
    /// when it is in range and free, else the lowest free one.
    pub async fn claim(&self, cluster: &str, wanted: Option<u16>) -> Result<u16, String> {
        if let Some(port) = self.held().get(cluster) {
            return Ok(*port);
        }
        for _ in 0..CLAIM_ATTEMPTS {
            let mut table = self.read().await?;
            let taken = ports_of(&table);
            if let Some((port, _)) = taken.iter().find(|(_, c)| c.as_str() == cluster) {
                self.held().insert(cluster.to_owned(), *port);
                return Ok(*port);
            }
            let port = wanted
                .filter(|p| self.range.contains(p) && !taken.contains_key(p))
                .or_else(|| self.range.clone().find(|p| !taken.contains_key(p)))
                .ok_or_else(|| {
                    format!(
                        "every port of --kubesphere-ports {}-{} is taken: widen the range",
                        self.range.start(),
                        self.range.end()
                    )
                })?;
            table
                .data
                .get_or_insert_default()
                .insert(port.to_string(), cluster.to_owned());
            match self
                .api
                .replace(TABLE, &PostParams::default(), &table)
                .await
            {
                Ok(_) => {
                    tracing::info!(cluster, port, "claimed a kubesphere endpoint port");
                    self.held().insert(cluster.to_owned(), port);
                    return Ok(port);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(format!("writing ConfigMap {TABLE}: {e}")),
            }
        }
        Err(format!(
            "ConfigMap {TABLE} kept changing: {CLAIM_ATTEMPTS} claims in a row conflicted"
        ))
    }

    /// Forgets what this replica holds that the table no longer says (someone deleted or
    /// edited the ConfigMap): those clusters claim again on their next round, so a port
    /// the table lost is never served for two clusters. Returns those clusters.
    pub async fn refresh(&self) -> Vec<String> {
        let table = match self.api.get_opt(TABLE).await {
            Ok(table) => table,
            Err(e) => {
                tracing::debug!(error = %e, "reading the kubesphere port table");
                return Vec::new();
            }
        };
        let recorded = table.as_ref().map(ports_of).unwrap_or_default();
        let mut lost = Vec::new();
        self.held().retain(|cluster, port| {
            let kept = recorded.get(port) == Some(cluster);
            if !kept {
                lost.push(cluster.clone());
                tracing::warn!(
                    cluster,
                    port,
                    "the port table no longer says this cluster holds its port: claiming again"
                );
            }
            kept
        });
        lost
    }

    /// Frees the ports of `cluster`.
    pub async fn release(&self, cluster: &str) -> Result<(), String> {
        self.held().remove(cluster);
        self.release_where(|c| c == cluster).await
    }

    /// Frees the ports of clusters `exists` says are gone (checked one by one against the
    /// API server: a list may be older than another replica's claim).
    pub async fn release_absent(
        &self,
        present: &HashSet<String>,
        clusters: &Api<crate::kubernetes::Cluster>,
    ) {
        let table = match self.read().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "reading the kubesphere port table");
                return;
            }
        };
        let mut gone = HashSet::new();
        for cluster in ports_of(&table).into_values() {
            if present.contains(&cluster) || gone.contains(&cluster) {
                continue;
            }
            if let Ok(None) = clusters.get_opt(&cluster).await {
                gone.insert(cluster);
            }
        }
        if gone.is_empty() {
            return;
        }
        self.held().retain(|c, _| !gone.contains(c));
        if let Err(e) = self.release_where(|c| gone.contains(c)).await {
            tracing::warn!(error = %e, "freeing the ports of deleted Clusters");
        } else {
            tracing::info!(clusters = ?gone, "freed the ports of Clusters deleted meanwhile");
        }
    }

    async fn release_where(&self, gone: impl Fn(&str) -> bool) -> Result<(), String> {
        for _ in 0..CLAIM_ATTEMPTS {
            let mut table = self.read().await?;
            let data = table.data.get_or_insert_default();
            let before = data.len();
            data.retain(|_, c| !gone(c));
            if data.len() == before {
                return Ok(());
            }
            match self
                .api
                .replace(TABLE, &PostParams::default(), &table)
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(format!("writing ConfigMap {TABLE}: {e}")),
            }
        }
        Err(format!("ConfigMap {TABLE} kept changing"))
    }

    /// The table, created empty when missing.
    async fn read(&self) -> Result<ConfigMap, String> {
        loop {
            match self.api.get_opt(TABLE).await {
                Ok(Some(table)) => return Ok(table),
                Ok(None) => {}
                Err(e) => return Err(format!("reading ConfigMap {TABLE}: {e}")),
            }
            let empty = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(TABLE.into()),
                    labels: Some(part_of_tower()),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::new()),
                ..ConfigMap::default()
            };
            match self.api.create(&PostParams::default(), &empty).await {
                Ok(table) => return Ok(table),
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(e) => return Err(format!("creating ConfigMap {TABLE}: {e}")),
            }
        }
    }
}

/// Port → cluster, for the entries that are ports.
fn ports_of(table: &ConfigMap) -> HashMap<u16, String> {
    table
        .data
        .iter()
        .flatten()
        .filter_map(|(port, cluster)| Some((port.parse().ok()?, cluster.clone())))
        .collect()
}

fn part_of_tower() -> BTreeMap<String, String> {
    BTreeMap::from([("app.kubernetes.io/part-of".into(), "tower".into())])
}

/// `mc-{cluster}`, the old tower's Service name, made a DNS label (dots become dashes; a
/// name too long is cut and given a hash of the whole).
pub fn service_name(cluster: &str) -> String {
    crate::cluster_label::within_63(format!("mc-{}", cluster.replace('.', "-")), cluster)
}

/// Keeps each cluster's Service: `mc-{cluster}` in tower's namespace, port = target port
/// = the cluster's port, selecting the pods the `tower` Service selects, owned by the
/// Cluster. An old tower's Service of that name is taken over (its ports replaced).
pub struct Services {
    api: Api<Service>,
    /// The platform's namespace when it is not tower's: where KubeSphere's old tower left
    /// its `mc-` Services.
    legacy: Option<Api<Service>>,
    /// The `tower` Service's selector, read once.
    selector: tokio::sync::OnceCell<BTreeMap<String, String>>,
    /// Cluster → (uid, port) of the Service as last written or found.
    done: Mutex<HashMap<String, (String, u16)>>,
}

impl Services {
    /// Services in `namespace`; the old tower's in `platform_namespace` are removed.
    pub fn new(client: Client, namespace: &str, platform_namespace: &str) -> Self {
        Services {
            legacy: (platform_namespace != namespace)
                .then(|| Api::namespaced(client.clone(), platform_namespace)),
            api: Api::namespaced(client, namespace),
            selector: tokio::sync::OnceCell::new(),
            done: Mutex::new(HashMap::new()),
        }
    }

    async fn selector(&self) -> BTreeMap<String, String> {
        self.selector
            .get_or_init(|| async {
                let fallback =
                    BTreeMap::from([("app.kubernetes.io/name".to_owned(), "tower".to_owned())]);
                match self.api.get_opt(crate::kubernetes::TOWER_SERVICE).await {
                    Ok(Some(s)) => s
                        .spec
                        .and_then(|s| s.selector)
                        .filter(|s| !s.is_empty())
                        .unwrap_or(fallback),
                    _ => fallback,
                }
            })
            .await
            .clone()
    }

    /// Creates or corrects the Service of `cluster` (uid `uid`) for `port`.
    pub async fn ensure(&self, cluster: &str, uid: &str, port: u16) -> Result<(), String> {
        let done = |s: &Self| {
            s.done
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(cluster)
                .is_some_and(|(u, p)| u == uid && *p == port)
        };
        if done(self) {
            return Ok(());
        }
        let name = service_name(cluster);
        self.remove_legacy(cluster, &name).await;
        let selector = self.selector().await;
        let mut labels = part_of_tower();
        labels.insert(
            "app.kubernetes.io/component".into(),
            "kubesphere-endpoint".into(),
        );
        labels.insert(CLUSTER_LABEL.into(), cluster_label(cluster));
        let owner = OwnerReference {
            api_version: format!(
                "{}/{}",
                crate::kubernetes::GROUP,
                crate::kubernetes::VERSION
            ),
            kind: "Cluster".into(),
            name: cluster.into(),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: None,
        };
        let ports = vec![ServicePort {
            name: Some("kubesphere".into()),
            port: i32::from(port),
            target_port: Some(IntOrString::Int(i32::from(port))),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        }];
        let existing = self
            .api
            .get_opt(&name)
            .await
            .map_err(|e| format!("reading Service {name}: {e}"))?;
        let result = match existing {
            None => {
                let service = Service {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(labels),
                        owner_references: Some(vec![owner]),
                        ..ObjectMeta::default()
                    },
                    spec: Some(ServiceSpec {
                        type_: Some("ClusterIP".into()),
                        selector: Some(selector),
                        ports: Some(ports),
                        ..ServiceSpec::default()
                    }),
                    ..Service::default()
                };
                self.api.create(&PostParams::default(), &service).await
            }
            Some(mut service) => {
                let spec = service.spec.get_or_insert_default();
                let current = service.metadata.owner_references.as_deref()
                    == Some(std::slice::from_ref(&owner))
                    && spec.ports.as_ref() == Some(&ports)
                    && spec.selector.as_ref() == Some(&selector)
                    && spec.type_.as_deref() == Some("ClusterIP");
                if current {
                    self.mark(cluster, uid, port);
                    return Ok(());
                }
                // An old tower's `mc-` Service (its kube port, NodePorts) or ours for an
                // earlier port: replaced in place, its cluster IP kept.
                tracing::info!(cluster, service = %name, port, "taking over the cluster's Service");
                spec.type_ = Some("ClusterIP".into());
                spec.selector = Some(selector);
                spec.ports = Some(ports);
                spec.external_traffic_policy = None;
                spec.load_balancer_ip = None;
                spec.load_balancer_source_ranges = None;
                spec.load_balancer_class = None;
                spec.allocate_load_balancer_node_ports = None;
                spec.health_check_node_port = None;
                service
                    .metadata
                    .labels
                    .get_or_insert_default()
                    .extend(labels);
                service.metadata.owner_references = Some(vec![owner]);
                service.status = None;
                self.api
                    .replace(&name, &PostParams::default(), &service)
                    .await
            }
        };
        match result {
            Ok(_) => {
                self.mark(cluster, uid, port);
                Ok(())
            }
            // Another replica wrote it meanwhile: judged again next round.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(format!("writing Service {name}: {e}")),
        }
    }

    /// Deletes the old tower's `mc-{cluster}` in the platform's namespace (it selects pods
    /// that are gone, on ports nobody serves); one that is tower's own stays.
    async fn remove_legacy(&self, cluster: &str, name: &str) {
        let Some(legacy) = &self.legacy else { return };
        let old = match legacy.get_opt(name).await {
            Ok(Some(s)) => s,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(cluster, error = %e, "looking for the old tower's Service in the platform namespace");
                return;
            }
        };
        let ours = old
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(CLUSTER_LABEL));
        if ours {
            return;
        }
        match legacy.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(cluster, service = %name, namespace = ?old.metadata.namespace, "deleted the old tower's Service")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => tracing::warn!(cluster, error = %e, "deleting the old tower's Service"),
        }
    }

    fn mark(&self, cluster: &str, uid: &str, port: u16) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cluster.to_owned(), (uid.to_owned(), port));
    }

    /// Deletes the Service of `cluster` when it is tower's (garbage collection does too,
    /// through the ownerReference; this frees it at once, and where no collector runs).
    pub async fn remove(&self, cluster: &str) {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(cluster);
        let name = service_name(cluster);
        let ours = match self.api.get_opt(&name).await {
            Ok(Some(s)) => s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(CLUSTER_LABEL))
                .is_some_and(|c| *c == cluster_label(cluster)),
            _ => false,
        };
        if ours {
            match self.api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => tracing::info!(cluster, service = %name, "deleted the cluster's Service"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => tracing::warn!(cluster, error = %e, "deleting the cluster's Service"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_are_dns_labels() {
        assert_eq!(service_name("member-1"), "mc-member-1");
        assert_eq!(service_name("eu.prod-1"), "mc-eu-prod-1");
        let long = service_name(&"a".repeat(200));
        assert!(long.len() <= 63, "{long}");
        assert_ne!(long, service_name(&format!("{}b", "a".repeat(199))));
    }
}
