//! The platform Tower serves: Kuberix Enterprise (`ke-system`, `ke-config`,
//! `ke-apiserver`, the defaults) or upstream KubeSphere (`kubesphere-system`,
//! `kubesphere-config`, `ks-apiserver`), and the one setting Tower reads from it.
//!
//! The installer writes `proxyPublishAddress` into the platform's config ConfigMap (key
//! `kubesphere.yaml`, `multicluster.proxyPublishAddress`); the platform's API server puts
//! it into the console's agent Deployment. Tower follows the same ConfigMap (a watch, so a
//! change needs no restart) and uses it unless `--proxy-publish-address` (tower-config)
//! says otherwise, so both ways of installing an agent dial the same address.

use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;

/// The key of the platform config ConfigMap that holds its configuration.
pub const CONFIG_KEY: &str = "kubesphere.yaml";

/// Names of the platform's objects on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformNames {
    /// Its namespace (`--platform-namespace`).
    pub namespace: String,
    /// Its config ConfigMap (`--platform-config`).
    pub config: String,
    /// Its API server's name (`--platform-apiserver`): the pods the kubesphere endpoints
    /// are for (deploy/host's NetworkPolicy selects them by this name).
    pub apiserver: String,
}

impl Default for PlatformNames {
    fn default() -> Self {
        PlatformNames {
            namespace: "ke-system".into(),
            config: "ke-config".into(),
            apiserver: "ke-apiserver".into(),
        }
    }
}

/// The publish address: the configured one (flag or tower-config) when set, else the
/// platform's, as last read.
#[derive(Debug, Clone, Default)]
pub struct PublishAddress {
    configured: Option<String>,
    platform: Arc<RwLock<Option<String>>>,
}

impl PublishAddress {
    /// With `configured` (`--proxy-publish-address`), if any.
    pub fn new(configured: Option<String>) -> Self {
        PublishAddress {
            configured,
            platform: Arc::default(),
        }
    }

    /// The address to use now.
    pub fn get(&self) -> Option<String> {
        self.configured.clone().or_else(|| {
            self.platform
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        })
    }

    fn set_platform(&self, address: Option<String>) {
        let mut slot = self.platform.write().unwrap_or_else(|e| e.into_inner());
        if *slot != address {
            tracing::info!(address = ?address, configured = ?self.configured, "the platform's proxyPublishAddress changed");
            *slot = address;
        }
    }
}

/// `multicluster.proxyPublishAddress` of a platform config (`kubesphere.yaml`), normalized
/// as the flag's value is; `None` when unset or empty.
pub fn proxy_publish_address(kubesphere_yaml: &str) -> Result<Option<String>, String> {
    let config: serde_yaml::Value = serde_yaml::from_str(kubesphere_yaml)
        .map_err(|e| format!("{CONFIG_KEY} is not YAML: {e}"))?;
    let Some(address) = config
        .get("multicluster")
        .and_then(|m| m.get("proxyPublishAddress"))
        .and_then(|a| a.as_str())
        .map(str::trim)
        .filter(|a| !a.is_empty())
    else {
        return Ok(None);
    };
    crate::manifest::normalize_publish_address(address)
        .map(|(a, _)| Some(a))
        .map_err(|e| format!("multicluster.proxyPublishAddress: {e}"))
}

fn address_in(config: &ConfigMap) -> Option<String> {
    let yaml = config.data.as_ref()?.get(CONFIG_KEY)?;
    match proxy_publish_address(yaml) {
        Ok(address) => address,
        Err(e) => {
            tracing::warn!(error = %e, "reading the platform config");
            None
        }
    }
}

/// The platform's proxyPublishAddress, read once (`agent-manifest --kubernetes`).
pub async fn read_publish_address(client: &Client, names: &PlatformNames) -> Option<String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &names.namespace);
    match api.get_opt(&names.config).await {
        Ok(config) => config.as_ref().and_then(address_in),
        Err(e) => {
            tracing::debug!(error = %e, "no platform config");
            None
        }
    }
}

/// Keeps `address`'s platform part equal to the platform config's until `stop`.
pub async fn follow_publish_address(
    client: Client,
    names: PlatformNames,
    address: PublishAddress,
    stop: CancellationToken,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &names.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", names.config));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = events.next() => event,
        };
        match event {
            None => return,
            Some(Err(e)) => {
                // Backed off by the watcher; a 403 here means RBAC for the platform
                // namespace is missing (README, "With KubeSphere / Kuberix Enterprise").
                tracing::warn!(namespace = %names.namespace, config = %names.config, error = %e, "watching the platform config for proxyPublishAddress");
            }
            Some(Ok(Event::Apply(c) | Event::InitApply(c))) => address.set_platform(address_in(&c)),
            Some(Ok(Event::Delete(_))) => address.set_platform(None),
            Some(Ok(Event::Init | Event::InitDone)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_address_comes_from_multicluster_and_the_flag_wins() {
        let yaml = "authentication:\n  jwtSecret: x\nmulticluster:\n  clusterRole: host\n  proxyPublishAddress: http://139.198.120.120:8080\n";
        assert_eq!(
            proxy_publish_address(yaml).unwrap().as_deref(),
            Some("https://139.198.120.120:8080")
        );
        assert_eq!(
            proxy_publish_address("multicluster:\n  clusterRole: host\n").unwrap(),
            None
        );
        assert_eq!(
            proxy_publish_address("multicluster:\n  proxyPublishAddress: \"\"\n").unwrap(),
            None
        );
        assert!(proxy_publish_address("multicluster: [").is_err());

        let from_platform = PublishAddress::new(None);
        from_platform.set_platform(Some("https://a:8080".into()));
        assert_eq!(from_platform.get().as_deref(), Some("https://a:8080"));
        let flag = PublishAddress::new(Some("https://b:8080".into()));
        flag.set_platform(Some("https://a:8080".into()));
        assert_eq!(flag.get().as_deref(), Some("https://b:8080"));
    }
}
