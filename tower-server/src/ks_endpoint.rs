//! `spec.connection.kubesphereAPIEndpoint`: an address per proxy Cluster that forwards
//! everything to the member's `kubesphere` target: plain HTTP, or with `--kubesphere-tls`
//! TLS with the frontend's certificate (for callers that trust the Tower CA).
//!
//! KubeSphere's ks-apiserver dispatcher (release-3.4, pkg/apiserver/dispatch/dispatch.go)
//! forwards `/{api,apis,kapis}/clusters/NAME/…` for a proxy Cluster to its
//! kubesphereAPIEndpoint keeping **only the scheme and host:port** (`u.Host =
//! innCluster.KubesphereURL.Host`), with `/clusters/NAME` cut from the path, the query,
//! the caller's `Authorization` and the original `Host` header kept, through Go's default
//! transport (system roots, no client credential), upgrades included
//! (`proxy.NewUpgradeAwareHandler`). So the cluster is told by the port alone: every
//! replica listens on each cluster's port ([`crate::ks_ports`] hands them out), and a
//! request there becomes the frontend request `/clusters/NAME/targets/kubesphere/…`,
//! served with the frontend's checks and limits.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use http::Request;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ks_ports::{PortTable, Services, service_name};
use crate::kubernetes::Cluster;

/// Serves one cluster's listener until the token is cancelled.
pub type ServeListener = Arc<dyn Fn(TcpListener, String, CancellationToken) + Send + Sync>;

/// The frontend request for `req`, which reached cluster `cluster`'s kubesphere port:
/// the same request, its path under `/clusters/{cluster}/targets/kubesphere`.
pub(crate) fn to_frontend<B>(mut req: Request<B>, cluster: &str) -> Request<B> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let path = if path.starts_with('/') {
        path
    } else {
        // `OPTIONS *` and the like: nothing the member serves.
        "/".to_owned()
    };
    match format!("/clusters/{cluster}/targets/kubesphere{path}").parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(e) => tracing::debug!(cluster, error = %e, "unroutable kubesphere path"),
    }
    req
}

/// Settings of the kubesphere endpoints.
#[derive(Debug, Clone)]
pub struct KubeSphereEndpointConfig {
    /// Ports handed out (`--kubesphere-ports`).
    pub ports: std::ops::RangeInclusive<u16>,
    /// Where this replica listens on them (`--kubesphere-bind-address`).
    pub bind: IpAddr,
    /// TLS with the frontend's certificate, and `https://` endpoints (`--kubesphere-tls`).
    pub tls: bool,
    /// The host written into kubesphereAPIEndpoint (`--kubesphere-endpoint-host`); else
    /// the cluster's Service, `mc-{cluster}.{namespace}.svc`.
    pub host: Option<String>,
}

/// A Cluster's kubesphere endpoint, as [`KubeSphereEndpoints::reconcile`] left it.
pub struct Endpoint {
    /// The cluster's port (the same on every replica).
    pub port: u16,
    /// The URL to record as `kubesphereAPIEndpoint`.
    pub url: String,
    /// Whether this replica listens on the port (else it tries again soon).
    pub listening: bool,
}

/// The kernel's range of local ports for outgoing connections ("LOW HIGH").
const EPHEMERAL_PORTS: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// The part of `ports` inside `ephemeral` (the text of [`EPHEMERAL_PORTS`]). A listener's
/// bind on a port an established connection uses as its local port fails (EADDRINUSE,
/// SO_REUSEADDR or not) for as long as that connection lives.
fn ephemeral_overlap(ports: &std::ops::RangeInclusive<u16>, ephemeral: &str) -> Option<(u16, u16)> {
    let mut bounds = ephemeral.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(low)), Some(Ok(high))) = (bounds.next(), bounds.next()) else {
        return None;
    };
    let (first, last) = ((*ports.start()).max(low), (*ports.end()).min(high));
    (first <= last).then_some((first, last))
}

/// The clusters' ports, Services and this replica's listeners.
pub struct KubeSphereEndpoints {
    config: KubeSphereEndpointConfig,
    namespace: String,
    ports: PortTable,
    services: Services,
    serve: ServeListener,
    /// Cluster → (port, stop) of the listeners open on this replica.
    open: Mutex<HashMap<String, (u16, CancellationToken)>>,
}

impl KubeSphereEndpoints {
    /// The endpoints of Clusters, kept in tower's `namespace` (the old tower's leftovers
    /// in `platform_namespace` are removed).
    pub fn new(
        client: kube::Client,
        namespace: &str,
        platform_namespace: &str,
        config: KubeSphereEndpointConfig,
        serve: ServeListener,
    ) -> Self {
        if let Some((first, last)) = std::fs::read_to_string(EPHEMERAL_PORTS)
            .ok()
            .and_then(|ephemeral| ephemeral_overlap(&config.ports, &ephemeral))
        {
            tracing::warn!(
                first,
                last,
                "--kubesphere-ports overlaps the ports the kernel hands to outgoing connections ({EPHEMERAL_PORTS}): a cluster's port held by one of them cannot be listened on until it closes; choose a range below them"
            );
        }
        KubeSphereEndpoints {
            ports: PortTable::new(client.clone(), namespace, config.ports.clone()),
            services: Services::new(client, namespace, platform_namespace),
            namespace: namespace.to_owned(),
            config,
            serve,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Claims `cluster`'s port, keeps its Service and listens on it; returns the port and
    /// the endpoint URL to record, and whether this replica listens on it.
    pub async fn reconcile(&self, cluster: &Cluster) -> Result<Endpoint, String> {
        let name = cluster.metadata.name.as_deref().unwrap_or_default();
        let port = self.ports.claim(name, recorded_port(cluster)).await?;
        // The port is the cluster's on every replica: one that cannot listen says so (and
        // tries again next round) without taking the endpoint from the others.
        let listening = match self.listen(name, port) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(cluster = name, error = %e, "cannot serve the cluster's kubesphere endpoint on this replica; retrying");
                false
            }
        };
        if let Some(uid) = cluster.metadata.uid.as_deref() {
            self.services.ensure(name, uid, port).await?;
        }
        let host = match &self.config.host {
            Some(host) => host.clone(),
            None => format!("{}.{}.svc", service_name(name), self.namespace),
        };
        let scheme = if self.config.tls { "https" } else { "http" };
        Ok(Endpoint {
            port,
            url: format!("{scheme}://{host}:{port}"),
            listening,
        })
    }

    /// Serves `cluster`'s kubesphere endpoint on the port its Cluster records, claiming
    /// nothing and writing nothing (a Cluster that is being deleted); false when it
    /// records a port this replica cannot listen on.
    pub fn keep_serving(&self, cluster: &Cluster) -> bool {
        let name = cluster.metadata.name.as_deref().unwrap_or_default();
        let Some(port) = recorded_port(cluster) else {
            return true;
        };
        match self.listen(name, port) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(cluster = name, error = %e, "cannot serve the cluster's kubesphere endpoint on this replica; retrying");
                false
            }
        }
    }

    /// Opens this replica's listener for `cluster` on `port` (closing one on another port).
    fn listen(&self, cluster: &str, port: u16) -> Result<(), String> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((current, stop)) = open.get(cluster) {
            if *current == port {
                return Ok(());
            }
            stop.cancel();
            open.remove(cluster);
        }
        let addr = SocketAddr::new(self.config.bind, port);
        let listener = crate::listen(addr).map_err(|e| {
            format!("listening for cluster {cluster:?}'s kubesphere endpoint on {addr}: {e}")
        })?;
        tracing::info!(cluster, %addr, "serving the cluster's kubesphere endpoint");
        let stop = CancellationToken::new();
        (self.serve)(listener, cluster.to_owned(), stop.clone());
        open.insert(cluster.to_owned(), (port, stop));
        Ok(())
    }

    /// Checks what this replica holds against the port table (once a round).
    pub async fn refresh(&self) -> Vec<String> {
        self.ports.refresh().await
    }

    /// Stops serving `cluster` here, and frees its port and Service.
    pub async fn forget(&self, cluster: &str) {
        if let Some((port, stop)) = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(cluster)
        {
            tracing::info!(cluster, port, "closed the cluster's kubesphere endpoint");
            stop.cancel();
        }
        if let Err(e) = self.ports.release(cluster).await {
            tracing::warn!(cluster, error = %e, "freeing the cluster's kubesphere port");
        }
        self.services.remove(cluster).await;
    }

    /// Frees the ports of Clusters deleted while no replica watched.
    pub async fn release_absent(
        &self,
        present: &std::collections::HashSet<String>,
        clusters: &kube::Api<Cluster>,
    ) {
        self.ports.release_absent(present, clusters).await;
    }

    /// Closes every listener (the server is stopping).
    pub fn close_all(&self) {
        for (_, (_, stop)) in self.open.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            stop.cancel();
        }
    }
}

/// The kubesphere port the Cluster records, if any.
fn recorded_port(cluster: &Cluster) -> Option<u16> {
    cluster
        .spec
        .connection
        .kubesphere_api_server_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn routed(uri: &str) -> String {
        let req = Request::get(uri).body(()).unwrap();
        to_frontend(req, "member-1").uri().to_string()
    }

    #[test]
    fn a_range_among_the_ephemeral_ports_is_found() {
        let linux = "32768\t60999\n";
        assert_eq!(ephemeral_overlap(&(16000..=16999), linux), None);
        assert_eq!(
            ephemeral_overlap(&(40000..=40999), linux),
            Some((40000, 40999))
        );
        assert_eq!(
            ephemeral_overlap(&(32000..=33000), linux),
            Some((32768, 33000))
        );
        assert_eq!(
            ephemeral_overlap(&(60000..=65535), linux),
            Some((60000, 60999))
        );
        assert_eq!(ephemeral_overlap(&(40000..=40999), "garbage"), None);
    }

    #[test]
    fn every_path_and_query_goes_to_the_clusters_kubesphere_target() {
        assert_eq!(
            routed("/kapis/resources.kubesphere.io/v1alpha3/namespaces?limit=1"),
            "/clusters/member-1/targets/kubesphere/kapis/resources.kubesphere.io/v1alpha3/namespaces?limit=1"
        );
        assert_eq!(routed("/"), "/clusters/member-1/targets/kubesphere/");
        // An absolute-form target keeps only its path: the cluster is the port's.
        assert_eq!(
            routed("http://elsewhere:80/api/v1/pods"),
            "/clusters/member-1/targets/kubesphere/api/v1/pods"
        );
        assert_eq!(routed("*"), "/clusters/member-1/targets/kubesphere/");
    }
}
