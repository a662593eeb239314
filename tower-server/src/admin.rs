//! The admin listener (plain HTTP): `/healthz`, `/readyz`, `/metrics`, `GET /v1/clusters`,
//! `GET /v1/clusters/{name}/agent.yaml`, and the status page (`/`, `/clusters/{name}`,
//! its icon `/favicon.svg`, see [`crate::dashboard`]).
//!
//! It listens on the pod's address, for the kubelet's probes and Prometheus: health,
//! readiness, metrics and the cluster table's summary (name, connected, since, the
//! replicas holding it) are open. What would help an attacker is not: the agents'
//! addresses, versions and targets (`/v1/clusters` with a token) and agent.yaml (it holds
//! the jwtSecret) need a user token in `--admin-group`, and are answered only on a
//! connection to a loopback address (`kubectl port-forward`, `kubectl exec … tower-server
//! clusters`), so that neither the token nor the answer crosses the network in clear.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio_util::sync::CancellationToken;

use crate::connections::Peer;
use crate::kubernetes;
use crate::manifest::AgentManifest;
use crate::registry::{ClusterStatus, Registry, Source};
use crate::status::{Body, full, text};

/// Serves admin requests.
pub(crate) struct Admin {
    pub(crate) registry: Arc<Registry>,
    pub(crate) counters: Arc<crate::metrics::Metrics>,
    pub(crate) metrics: MetricsRegistry,
    pub(crate) draining: CancellationToken,
    pub(crate) manifests: Manifests,
    /// The figures of the last minutes, for the status page.
    pub(crate) history: Arc<crate::history::History>,
    /// This replica's id.
    pub(crate) server_id: String,
}

/// What agent.yaml is made from.
pub(crate) struct Manifests {
    pub(crate) verifier: tower_auth::Verifier,
    pub(crate) minter: tower_auth::Minter,
    pub(crate) secret: tower_auth::Secret,
    pub(crate) ca_pem: String,
    pub(crate) ca_pin: Option<String>,
    pub(crate) image: String,
    pub(crate) publish_address: crate::platform::PublishAddress,
    pub(crate) kube: Option<(kube::Client, String)>,
    pub(crate) admin_group: String,
}

impl Admin {
    pub(crate) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Peer,
    ) -> Response<Body> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET");
        }
        match req.uri().path() {
            "/healthz" | "/livez" => text(StatusCode::OK, "ok"),
            "/readyz" if self.draining.is_cancelled() => {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining")
            }
            "/readyz" if !self.registry.is_synced() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "waiting for the first list of Cluster objects",
            ),
            "/readyz" => text(StatusCode::OK, "ok"),
            "/metrics" => {
                let tasks = tokio::runtime::Handle::current()
                    .metrics()
                    .num_alive_tasks();
                self.counters
                    .live_tasks
                    .set(i64::try_from(tasks).unwrap_or(i64::MAX));
                let mut out = String::new();
                if prometheus_client::encoding::text::encode(&mut out, &self.metrics).is_err() {
                    return text(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed");
                }
                let mut response = Response::new(full(out));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            "/v1/clusters" => {
                let table = self.registry.status();
                // Without a token: the summary. With one: all of it, or why not.
                let body = if req.headers().contains_key(header::AUTHORIZATION) {
                    if let Err((code, message)) =
                        self.manifests
                            .authorize(&req, peer, "the agents' addresses and versions")
                    {
                        return text(code, message);
                    }
                    serde_json::to_string_pretty(&table)
                } else {
                    serde_json::to_string_pretty(&table.iter().map(Summary::of).collect::<Vec<_>>())
                }
                .unwrap_or_else(|_| "[]".into());
                let mut response = Response::new(full(body));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                response
            }
            "/" => self.status_page(&req, peer, None),
            crate::dashboard::ICON_PATH => {
                let mut response = Response::new(full(crate::dashboard::ICON));
                let headers = response.headers_mut();
                for (name, value) in [
                    (header::CONTENT_TYPE, "image/svg+xml"),
                    (header::CACHE_CONTROL, "max-age=86400"),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                ] {
                    headers.insert(name, header::HeaderValue::from_static(value));
                }
                response
            }
            path if path.starts_with("/clusters/") => {
                let name = &path["/clusters/".len()..];
                self.status_page(&req, peer, Some(name))
            }
            path => match path
                .strip_prefix("/v1/clusters/")
                .and_then(|rest| rest.strip_suffix("/agent.yaml"))
            {
                Some(name) => match self.agent_yaml(&req, peer, name).await {
                    Ok(yaml) => {
                        let mut response = Response::new(full(yaml));
                        response.headers_mut().insert(
                            header::CONTENT_TYPE,
                            header::HeaderValue::from_static("application/yaml"),
                        );
                        response
                    }
                    Err((code, message)) => text(code, message),
                },
                None => text(
                    StatusCode::NOT_FOUND,
                    "admin endpoints: / (status page) /clusters/{name} /healthz /readyz /metrics /v1/clusters /v1/clusters/{name}/agent.yaml",
                ),
            },
        }
    }
}

impl Admin {
    /// The status page: every cluster (`only` = `None`) or one. Open, like the summary of
    /// `/v1/clusters` and `/metrics`; with a token (sent by the page's script), an admin
    /// on loopback also sees the agents' versions, and anyone else the reason not.
    fn status_page(
        &self,
        req: &Request<Incoming>,
        peer: Peer,
        only: Option<&str>,
    ) -> Response<Body> {
        let admin = req.headers().contains_key(header::AUTHORIZATION);
        if admin && let Err((code, message)) = self.manifests.authorize(req, peer, "agent versions")
        {
            return text(code, message);
        }
        let ctx = crate::dashboard::Context {
            server_id: &self.server_id,
            now: std::time::SystemTime::now(),
            admin,
        };
        let rows = crate::dashboard::rows(&self.registry, &self.history, only, admin);
        let (code, html) = match only {
            None => (StatusCode::OK, crate::dashboard::overview(&ctx, &rows)),
            Some(name) => match rows.first() {
                Some(row) => (
                    StatusCode::OK,
                    crate::dashboard::cluster(&ctx, row, &self.history.points(name)),
                ),
                None => (
                    StatusCode::NOT_FOUND,
                    crate::dashboard::not_found(&ctx, name),
                ),
            },
        };
        let mut response = Response::new(full(html));
        *response.status_mut() = code;
        let headers = response.headers_mut();
        for (name, value) in [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ] {
            headers.insert(name, header::HeaderValue::from_static(value));
        }
        if let Ok(csp) = header::HeaderValue::from_str(&crate::dashboard::CSP) {
            headers.insert(header::CONTENT_SECURITY_POLICY, csp);
        }
        response
    }

    /// agent.yaml for `name`, for a caller whose user token puts it in the admin group:
    /// the file holds the jwtSecret, so it is as sensitive as the secret itself.
    async fn agent_yaml(
        &self,
        req: &Request<Incoming>,
        peer: Peer,
        name: &str,
    ) -> Result<String, (StatusCode, String)> {
        let m = &self.manifests;
        m.authorize(
            req,
            peer,
            "agent.yaml (it holds the agent token and the cluster key)",
        )?;
        tower_proto::names::validate_cluster_name(name)
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        let source = self.registry.source();
        let entry = match source {
            Source::Open => Default::default(),
            Source::File | Source::Kubernetes => self.registry.entry(name).ok_or_else(|| {
                (
                    StatusCode::NOT_FOUND,
                    self.registry.not_registered(name).to_string(),
                )
            })?,
        };
        let token = match entry.token {
            Some(token) => token,
            // Kubernetes: the Cluster's token is the only one accepted; tower writes it.
            None if source == Source::Kubernetes => {
                return Err((
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("Cluster {name:?} has no token yet: try again in a moment"),
                ));
            }
            None => m.minter.agent_token_pinned(name, None, m.ca_pin.as_deref()),
        };
        let publish_address = m.publish_address.get();
        let proxy_server = match &m.kube {
            Some((client, namespace)) => {
                kubernetes::publish_address(client, namespace, publish_address.as_deref()).await
            }
            None => match &publish_address {
                Some(address) => {
                    crate::manifest::normalize_publish_address(address).map(|(a, _)| a)
                }
                None => Err("no publish address: set --proxy-publish-address (proxyPublishAddress) to the https://HOST:PORT that members dial".into()),
            },
        }
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?;
        AgentManifest {
            cluster: name,
            proxy_server: &proxy_server,
            token: &token,
            cluster_key: &m.secret.cluster_key(name),
            ca_pem: &m.ca_pem,
            image: &m.image,
            impersonable: crate::manifest::Impersonable::Anyone,
        }
        .render()
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e))
    }
}

impl Manifests {
    /// Lets `req` see `what` when it came to a loopback address with a user token in the
    /// admin group; else the status and the reason.
    fn authorize(
        &self,
        req: &Request<Incoming>,
        peer: Peer,
        what: &str,
    ) -> Result<(), (StatusCode, String)> {
        on_loopback(peer, what)?;
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let token = tower_auth::bearer(header).ok_or((
            StatusCode::UNAUTHORIZED,
            tower_auth::AuthError::Missing.to_string(),
        ))?;
        let identity = self
            .verifier
            .verify_user(token)
            .map_err(|e| (StatusCode::UNAUTHORIZED, format!("user token refused: {e}")))?;
        if !identity.groups.contains(&self.admin_group) {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "user {:?} is not in group {:?} (--admin-group), which {what} requires",
                    identity.user, self.admin_group
                ),
            ));
        }
        Ok(())
    }
}

/// Whether `peer` dialed a loopback address: from inside the pod, or through `kubectl
/// port-forward` (which connects inside the pod). The kernel delivers nothing addressed to
/// 127.0.0.0/8 or ::1 that arrives from the network.
fn on_loopback(peer: Peer, what: &str) -> Result<(), (StatusCode, String)> {
    if peer.local.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    Err((
        StatusCode::FORBIDDEN,
        format!(
            "{what}: only on a loopback address, never in clear over the network: use `kubectl port-forward` to this port and 127.0.0.1, or `kubectl exec … tower-server clusters`"
        ),
    ))
}

/// What `/v1/clusters` shows without a token: whether each cluster is up, since when and
/// through which replicas; not the agent's address, version or targets.
#[derive(Debug, serde::Serialize)]
struct Summary<'a> {
    name: &'a str,
    connected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    connected_since: Option<&'a str>,
    replicas: &'a [String],
}

impl<'a> Summary<'a> {
    fn of(status: &'a ClusterStatus) -> Self {
        Summary {
            name: &status.name,
            connected: status.connected,
            connected_since: status.connected_since.as_deref(),
            replicas: &status.replicas,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn peer(local: &str) -> Peer {
        Peer::new("192.0.2.9:40000".parse().unwrap(), local.parse().unwrap())
    }

    #[test]
    fn secrets_are_served_only_on_loopback() {
        for local in [
            "127.0.0.1:9090",
            "127.0.0.5:9090",
            "[::1]:9090",
            "[::ffff:127.0.0.1]:9090",
        ] {
            assert!(on_loopback(peer(local), "x").is_ok(), "{local}");
        }
        for local in [
            "10.244.1.7:9090",
            "[fd00::7]:9090",
            "[::ffff:10.0.0.1]:9090",
        ] {
            let (code, message) = on_loopback(peer(local), "agent.yaml").unwrap_err();
            assert_eq!(code, StatusCode::FORBIDDEN, "{local}");
            assert!(message.contains("port-forward"), "{message}");
        }
    }
}
