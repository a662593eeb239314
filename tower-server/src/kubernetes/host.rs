//! What the server reads from its own cluster besides Clusters: the client it calls it
//! with, the address members dial (`proxyPublishAddress` or the `tower` Service), and the
//! replica count agents hold a tunnel to each of.

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use tokio_util::sync::CancellationToken;
use tower_proto::ControlMessage;

use crate::manifest::normalize_publish_address;
use crate::registry::Registry;

/// The Service whose LoadBalancer ingress is the publish address.
pub const TOWER_SERVICE: &str = "tower";
/// The tunnel port when the Service does not say.
const DEFAULT_TUNNEL_PORT: i32 = 8080;

/// What tower-server's requests to the host's API server say they are. The API server
/// names a write's field manager after the User-Agent up to its first `/`
/// (`managerOrUserAgent`), so what tower-server wrote shows as `tower-server` in
/// `metadata.managedFields` (kube-rs sends no User-Agent of its own: the manager would be
/// empty), and audit logs name it too.
const USER_AGENT: &str = concat!("tower-server/", env!("CARGO_PKG_VERSION"));

/// A client from `--kubeconfig`, else in-cluster (or `KUBECONFIG`), whose requests keep
/// to `rate` ([`crate::api_pace`]).
pub async fn client(
    kubeconfig: Option<&Path>,
    rate: crate::api_pace::ApiRate,
) -> Result<Client, String> {
    let mut config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("reading --kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no in-cluster Kubernetes configuration: {e}"))?,
    };
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| format!("Kubernetes client: {e}"))?;
    let pace = crate::api_pace::PaceLayer(crate::api_pace::ApiPace::new(rate));
    Ok(builder.with_layer(&pace).build())
}

/// The address members dial: the configured `proxyPublishAddress`, else the `tower`
/// Service's LoadBalancer ingress, else an error that says what to set.
pub async fn publish_address(
    client: &Client,
    namespace: &str,
    configured: Option<&str>,
) -> Result<String, String> {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    let service = services
        .get_opt(TOWER_SERVICE)
        .await
        .map_err(|e| format!("reading Service {namespace}/{TOWER_SERVICE}: {e}"))?;
    let ingress = service.as_ref().and_then(load_balancer_address);
    choose_publish_address(ingress, configured, namespace, service.is_some())
}

/// The rule of [`publish_address`], without the API call.
fn choose_publish_address(
    ingress: Option<String>,
    configured: Option<&str>,
    namespace: &str,
    service_exists: bool,
) -> Result<String, String> {
    // A configured proxyPublishAddress wins, the LoadBalancer's ingress is the fallback:
    // KubeSphere's API server renders the console's agent Deployment by the same rule
    // (pkg/kapis/cluster/v1alpha1/handler.go: "use service ingress address only when
    // proxyPublishAddress is not provided"), so agent.yaml and that Deployment dial the
    // same address.
    let address = match (ingress, configured) {
        (_, Some(configured)) => configured.to_owned(),
        (Some(ingress), None) => ingress,
        (None, None) if service_exists => {
            return Err(format!(
                "Service {namespace}/{TOWER_SERVICE} has no EXTERNAL-IP yet (its LoadBalancer is pending, or the cluster has none): set proxyPublishAddress (--proxy-publish-address or TOWER_PROXY_PUBLISH_ADDRESS) to an https://HOST:PORT that members can reach"
            ));
        }
        (None, None) => {
            return Err(format!(
                "there is no Service {namespace}/{TOWER_SERVICE} of type LoadBalancer: create it (deploy/host/service.yaml) or set proxyPublishAddress (--proxy-publish-address or TOWER_PROXY_PUBLISH_ADDRESS) to an https://HOST:PORT that members can reach"
            ));
        }
    };
    let (address, rewritten) = normalize_publish_address(&address)?;
    if rewritten {
        tracing::info!(%address, "the publish address gets a TLS tunnel: wrote it as https://");
    }
    Ok(address)
}

/// `https://{ip or hostname}:{port}` from a LoadBalancer Service's first ingress.
fn load_balancer_address(service: &Service) -> Option<String> {
    let ingress = service
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .find_map(|i| {
            i.ip.clone()
                .filter(|s| !s.is_empty())
                .or_else(|| i.hostname.clone().filter(|s| !s.is_empty()))
        })?;
    let ports = service.spec.as_ref()?.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some("tunnel"))
        .or_else(|| ports.first())
        .map_or(DEFAULT_TUNNEL_PORT, |p| p.port);
    let host = if ingress.contains(':') {
        format!("[{ingress}]")
    } else {
        ingress
    };
    Some(format!("https://{host}:{port}"))
}

/// Keeps `count` equal to `spec.replicas` of Deployment `namespace/deployment` (the
/// replicas behind the published address) and tells every agent when it changes, so
/// agents hold one tunnel per replica as the Deployment scales.
pub async fn follow_replica_count(
    client: Client,
    namespace: String,
    deployment: String,
    count: Arc<std::sync::atomic::AtomicU16>,
    registry: Arc<Registry>,
    server_id: String,
    stop: CancellationToken,
) {
    use std::sync::atomic::Ordering;
    let api: Api<Deployment> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={deployment}"));
    let mut events = watcher::watcher(api, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    loop {
        let found = tokio::select! {
            () = stop.cancelled() => return,
            found = events.next() => found,
        };
        let replicas = match found {
            None => return,
            Some(Err(e)) => {
                tracing::warn!(%namespace, %deployment, error = %e, "watching the Deployment for the replica count");
                continue;
            }
            Some(Ok(d)) => d.spec.replicas.unwrap_or(1),
        };
        let replicas = u16::try_from(replicas.max(1)).unwrap_or(u16::MAX);
        if count.swap(replicas, Ordering::Relaxed) != replicas {
            tracing::info!(%deployment, replicas, "replica count changed: telling the agents");
            for tunnel in registry.tunnels() {
                let _ = tunnel.control.try_send(ControlMessage::ServerInfo {
                    server_id: server_id.clone(),
                    server_count: replicas,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServicePort, ServiceSpec, ServiceStatus,
    };

    fn service(ingress: Option<LoadBalancerIngress>) -> Service {
        Service {
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ports: Some(vec![ServicePort {
                    name: Some("tunnel".into()),
                    port: 8080,
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: ingress.map(|i| vec![i]),
                }),
                ..ServiceStatus::default()
            }),
            ..Service::default()
        }
    }

    #[test]
    fn load_balancer_ingress_ip_or_hostname_becomes_the_address() {
        let ip = service(Some(LoadBalancerIngress {
            ip: Some("203.0.113.7".into()),
            ..LoadBalancerIngress::default()
        }));
        assert_eq!(
            load_balancer_address(&ip).as_deref(),
            Some("https://203.0.113.7:8080")
        );
        let host = service(Some(LoadBalancerIngress {
            hostname: Some("lb.example.com".into()),
            ..LoadBalancerIngress::default()
        }));
        assert_eq!(
            load_balancer_address(&host).as_deref(),
            Some("https://lb.example.com:8080")
        );
        assert_eq!(load_balancer_address(&service(None)), None);
    }

    #[test]
    fn publish_address_prefers_the_setting_then_the_ingress_then_says_what_to_do() {
        assert_eq!(
            choose_publish_address(
                Some("https://203.0.113.7:8080".into()),
                Some("https://other:8080"),
                "ke-system",
                true
            )
            .unwrap(),
            "https://other:8080"
        );
        assert_eq!(
            choose_publish_address(
                Some("https://203.0.113.7:8080".into()),
                None,
                "ke-system",
                true
            )
            .unwrap(),
            "https://203.0.113.7:8080"
        );
        assert_eq!(
            choose_publish_address(None, Some("http://139.198.120.120:8080"), "ke-system", true)
                .unwrap(),
            "https://139.198.120.120:8080"
        );
        let pending = choose_publish_address(None, None, "ke-system", true).unwrap_err();
        assert!(pending.contains("no EXTERNAL-IP"), "{pending}");
        assert!(pending.contains("proxyPublishAddress"), "{pending}");
    }
}
