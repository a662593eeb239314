//! `tower-server`: the host side of Tower.
//!
//! Agents dial the **tunnel** listener and are upgraded to yamux sessions
//! ([`agents`](crate::agents)); callers reach `/clusters/{name}/…` on the **frontend**
//! listener, are checked against the jwtSecret and proxied through that cluster's tunnel
//! ([`frontend`](crate::frontend)); the **admin** listener serves health, metrics and the
//! cluster table. [`run`] wires them together on listeners the caller has bound.
//!
//! Key types: [`Config`], [`Listeners`], [`registry::Registry`], [`metrics::Metrics`].

#![forbid(unsafe_code)]

mod admin;
mod agents;
pub mod api_pace;
pub mod cli;
pub mod cluster_label;
pub mod cluster_spec;
pub mod commands;
pub mod connections;
mod dashboard;
mod frontend;
pub mod history;
pub mod http2;
mod idle;
pub mod ks_endpoint;
pub mod ks_ports;
pub mod kubeconfig;
pub mod kubernetes;
mod linger;
mod listener;
pub mod manifest;
pub mod metrics;
pub mod pki;
pub mod platform;
pub mod registry;
mod status;
pub mod users;

use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_auth::{Minter, Secret, Verifier};
use tower_proto::ControlMessage;
use tower_proto::handshake::ServerHello;
use tower_tunnel::SessionConfig;
use tower_tunnel::control::Keepalive;

pub use crate::connections::ConnectionLimits;
use crate::connections::{Admission, Peer};
pub use crate::listener::{ACCEPT_BACKLOG, Listeners, listen};
use crate::listener::{Connections, serve};
use crate::pki::TlsMaterial;
use crate::registry::{ClusterSpec, Registry, Source};

/// [`Limits::max_requests_per_user`] by default: room for a controller's informers
/// (a few hundred watches) many times over, a sixteenth of a cluster's default limit.
pub const DEFAULT_MAX_REQUESTS_PER_USER: usize = 1024;

/// [`Limits::max_concurrent_handshakes`] by default: no bound. Measured in B9 (10,000
/// agents redialing after a restart, release build, 3 rounds each): bounded at 256 they
/// were all back in 9.1-9.4 s (median), unbounded in 5.3 s, with fewer failed dials (250
/// against 406-779): a permit is held across the client's half of the handshake, so on
/// a busy client side the bound throttles more than it protects.
pub const DEFAULT_MAX_CONCURRENT_HANDSHAKES: usize = 0;

/// Limits on what callers and agents may send.
#[derive(Debug, Clone)]
pub struct Limits {
    /// TLS handshake deadline.
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once per listener (0: no bound).
    pub max_concurrent_handshakes: usize,
    /// How long a client may take to send its request headers; also how long a
    /// connection may go without its first request, and (HTTP/1.1) between requests.
    pub header_read_timeout: Duration,
    /// An HTTP/2 connection with no request open this long is closed (GOAWAY).
    pub idle_connection_timeout: Duration,
    /// Connections each listener takes.
    pub connections: ConnectionLimits,
    /// Largest request header block (beyond it: 431).
    pub max_header_bytes: usize,
    /// Streams per tunnel.
    pub max_streams: usize,
    /// Requests in flight per cluster (beyond it: 429).
    pub max_requests_per_cluster: usize,
    /// Requests in flight per user (the JWT's) to one cluster (beyond it: 429).
    pub max_requests_per_user: usize,
    /// A proxied request whose bytes stop moving this long is ended (504 or cut).
    pub stream_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_handshakes: DEFAULT_MAX_CONCURRENT_HANDSHAKES,
            header_read_timeout: Duration::from_secs(10),
            idle_connection_timeout: Duration::from_secs(60),
            connections: ConnectionLimits::default(),
            max_header_bytes: 64 * 1024,
            max_streams: SessionConfig::default().max_streams,
            max_requests_per_cluster: SessionConfig::default().max_streams,
            max_requests_per_user: DEFAULT_MAX_REQUESTS_PER_USER,
            stream_idle_timeout: Duration::from_secs(4 * 3600),
        }
    }
}

/// Everything `run` needs, validated.
#[derive(Debug)]
pub struct Config {
    /// The jwtSecret.
    pub secret: Secret,
    /// Serving certificates.
    pub tls: TlsMaterial,
    /// Which clusters may connect.
    pub registry: RegistryConfig,
    /// The address members dial, when configured (`proxyPublishAddress`).
    pub publish_address: Option<String>,
    /// This server's frontend as the host reaches it (Clusters' kubernetesAPIEndpoint).
    pub frontend_url: String,
    /// The image agent.yaml tells members to run.
    pub agent_image: String,
    /// Callers in this group may fetch agent.yaml from the admin listener.
    pub admin_group: String,
    /// This replica's id.
    pub server_id: String,
    /// How many replicas serve the published address (at start, with
    /// `server_count_from`).
    pub server_count: u16,
    /// With `--kubernetes` and no `--server-count`: the Deployment whose `spec.replicas`
    /// is the replica count.
    pub server_count_from: Option<String>,
    /// Keepalive on tunnels.
    pub keepalive: Keepalive,
    /// How long in-flight requests get on shutdown.
    pub shutdown_grace: Duration,
    /// Accept agents without TLS (only behind a load balancer that terminates TLS).
    pub plaintext_tunnel: bool,
    /// Forward bearer tokens this host did not sign to the member's API server as they
    /// are (`--pass-through-unknown-tokens`).
    pub pass_through_unknown_tokens: bool,
    /// How long minted agent tokens are valid (`None`: for ever).
    pub agent_token_lifetime: Option<Duration>,
    /// Limits.
    pub limits: Limits,
    /// The identity of the kubeconfig written into proxy Clusters.
    pub cluster_kubeconfig: ClusterKubeconfig,
    /// The clusters' kubesphere endpoints (with `--kubernetes`; `None` when turned off).
    pub kubesphere: Option<ks_endpoint::KubeSphereEndpointConfig>,
    /// Where the platform (KubeSphere or Kuberix Enterprise) keeps its settings.
    pub platform: platform::PlatformNames,
}

/// The identity of the kubeconfig written into proxy Clusters: the user and groups the
/// agent impersonates for KubeSphere's cluster controller on the member.
#[derive(Debug, Clone)]
pub struct ClusterKubeconfig {
    /// `--cluster-kubeconfig-user`.
    pub user: String,
    /// `--cluster-kubeconfig-group`.
    pub groups: Vec<String>,
    /// `--cluster-kubeconfig-ttl`: renewed when a third of it is left.
    pub ttl: Duration,
}

/// Where the list of clusters comes from.
#[derive(Debug, Clone)]
pub enum RegistryConfig {
    /// Any agent with a valid token registers its cluster.
    Open,
    /// The entries of a `--clusters` file.
    File(Vec<ClusterSpec>),
    /// `Cluster` objects, read with this kubeconfig (else in-cluster); tower's own objects
    /// (the `tower` Service) live in `namespace`.
    Kubernetes {
        /// `--kubeconfig`.
        kubeconfig: Option<std::path::PathBuf>,
        /// `--namespace`.
        namespace: String,
        /// `--kube-api-qps` and `--kube-api-burst`: the pace of every request to the API.
        api_rate: api_pace::ApiRate,
        /// `--agent-return-grace`: how long after this server starts a Cluster whose
        /// `AgentAvailable` is `True` keeps it without a tunnel here (its agent redials
        /// with its backoff); then it is written `False`.
        agent_return_grace: Duration,
    },
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The TLS configuration is unusable.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The Kubernetes API cannot be used.
    #[error("{0}")]
    Kubernetes(String),
}

/// Runs the server until `shutdown` is cancelled, then drains: refuses new tunnels, tells
/// agents to go, gives in-flight requests up to the grace period, and closes.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let tls =
        tower_tunnel::tls::server_config(config.tls.chain.clone(), config.tls.key.clone_key())
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    // Callers may multiplex over HTTP/2 (as kubectl and client-go do when offered);
    // agents' tunnels are an HTTP/1.1 upgrade.
    let mut frontend_tls = (*tls).clone();
    frontend_tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let frontend_acceptor = TlsAcceptor::from(Arc::new(frontend_tls));
    let acceptor = TlsAcceptor::from(tls);
    let verifier = Verifier::new(&config.secret);
    let ca_pin = config.tls.ca_pin();
    let (registry, kube) = match &config.registry {
        RegistryConfig::Open => (Registry::new(None), None),
        RegistryConfig::File(list) => (Registry::new(Some(list.clone())), None),
        RegistryConfig::Kubernetes {
            kubeconfig,
            namespace,
            api_rate,
            ..
        } => {
            let client = kubernetes::client(kubeconfig.as_deref(), *api_rate)
                .await
                .map_err(ServerError::Kubernetes)?;
            (
                Registry::with_source(Source::Kubernetes),
                Some((client, namespace.clone())),
            )
        }
    };
    let controller_stop = CancellationToken::new();
    let publish_address = platform::PublishAddress::new(config.publish_address.clone());
    let platform_follower = kube.as_ref().map(|(client, _)| {
        tokio::spawn(platform::follow_publish_address(
            client.clone(),
            config.platform.clone(),
            publish_address.clone(),
            controller_stop.clone(),
        ))
    });
    let users = kube.as_ref().map(|(client, _)| {
        let users = Arc::new(users::KubeSphereUsers::default());
        tokio::spawn(
            users
                .clone()
                .follow(client.clone(), controller_stop.clone()),
        );
        users
    });
    let server_count = Arc::new(std::sync::atomic::AtomicU16::new(config.server_count));
    let replica_counter = match (&kube, &config.server_count_from) {
        (Some((client, namespace)), Some(deployment)) => {
            Some(tokio::spawn(kubernetes::follow_replica_count(
                client.clone(),
                namespace.clone(),
                deployment.clone(),
                server_count.clone(),
                registry.clone(),
                config.server_id.clone(),
                controller_stop.clone(),
            )))
        }
        _ => None,
    };
    let metrics = Arc::new(metrics::Metrics::default());
    let mut metrics_registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut metrics_registry);
    let draining = CancellationToken::new();
    metrics_registry
        .sub_registry_with_prefix("tower")
        .register_collector(Box::new(metrics::ClusterCollector {
            registry: registry.clone(),
            draining: draining.clone(),
        }));
    let history = Arc::new(history::History::default());
    let sessions = TaskTracker::new();

    let agents = Arc::new(agents::Acceptor {
        server_count: server_count.clone(),
        registry: registry.clone(),
        verifier: verifier.clone(),
        metrics: metrics.clone(),
        hello: ServerHello {
            server_id: config.server_id.clone(),
            server_count: config.server_count,
            keepalive_ms: config.keepalive.interval.as_millis() as u64,
        },
        keepalive: config.keepalive,
        session: SessionConfig {
            max_streams: config.limits.max_streams,
            ..SessionConfig::default()
        },
        draining: draining.clone(),
        sessions: sessions.clone(),
        grace: config.shutdown_grace,
    });
    let frontend = Arc::new(frontend::Frontend::new(
        registry.clone(),
        frontend::CallerAuth {
            verifier: verifier.clone(),
            asserter: tower_auth::identity::Asserter::new(&config.secret),
            pass_through: config.pass_through_unknown_tokens,
            users: users.clone(),
        },
        metrics.clone(),
        config.server_id.clone(),
        &config.limits,
        draining.clone(),
    ));
    let admin = Arc::new(admin::Admin {
        registry: registry.clone(),
        counters: metrics.clone(),
        metrics: metrics_registry,
        draining: draining.clone(),
        manifests: admin::Manifests {
            verifier: verifier.clone(),
            minter: Minter::new(&config.secret),
            secret: config.secret.clone(),
            ca_pem: config.tls.ca_pem.clone(),
            ca_pin: ca_pin.clone(),
            image: config.agent_image.clone(),
            publish_address: publish_address.clone(),
            kube: kube.clone(),
            admin_group: config.admin_group.clone(),
        },
        history: history.clone(),
        server_id: config.server_id.clone(),
    });

    let stop_accepting = CancellationToken::new();
    let frontend_conns = Connections::default();
    let other_conns = Connections::default();
    let limits = &config.limits;
    let admission =
        |listener, max| Admission::new(listener, max, limits.connections.per_source, &metrics);
    let loops = TaskTracker::new();
    // Each proxy Cluster's kubesphere endpoint: a listener (plain HTTP, or TLS with the
    // frontend's certificate) whose requests are the frontend's, under
    // /clusters/{name}/targets/kubesphere.
    let kubesphere = match (&kube, &config.kubesphere) {
        (Some((client, namespace)), Some(ks)) => {
            let frontend = frontend.clone();
            let tls = ks.tls.then(|| frontend_acceptor.clone());
            let admission = admission("kubesphere", limits.connections.frontend);
            let (limits, stop_accepting, conns, metrics) = (
                config.limits.clone(),
                stop_accepting.clone(),
                frontend_conns.clone(),
                metrics.clone(),
            );
            let serve_listener: ks_endpoint::ServeListener =
                Arc::new(move |listener, cluster: String, stop: CancellationToken| {
                    let frontend = frontend.clone();
                    // Closed when the server stops accepting, or when the cluster goes.
                    let stop_accepting = stop_accepting.clone();
                    let stop_both = stop.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            () = stop_accepting.cancelled() => stop.cancel(),
                            () = stop.cancelled() => {}
                        }
                    });
                    let cluster: Arc<str> = cluster.into();
                    tokio::spawn(serve(
                        listener,
                        tls.clone(),
                        admission.clone(),
                        limits.clone(),
                        stop_both,
                        conns.clone(),
                        metrics.clone(),
                        move |req, peer: Peer| {
                            let req = ks_endpoint::to_frontend(req, &cluster);
                            frontend.clone().handle(req, peer)
                        },
                    ));
                });
            Some(Arc::new(ks_endpoint::KubeSphereEndpoints::new(
                client.clone(),
                namespace,
                &config.platform.namespace,
                ks.clone(),
                serve_listener,
            )))
        }
        _ => None,
    };
    let agent_return_grace = match &config.registry {
        RegistryConfig::Kubernetes {
            agent_return_grace, ..
        } => *agent_return_grace,
        _ => Duration::ZERO,
    };
    let controller = kube.as_ref().map(|(client, _)| {
        tokio::spawn(
            kubernetes::Controller {
                client: client.clone(),
                registry: registry.clone(),
                minter: Minter::new(&config.secret),
                verifier: Verifier::new(&config.secret),
                ca_pin: ca_pin.clone(),
                agent_token_lifetime: config.agent_token_lifetime,
                frontend_url: config.frontend_url.clone(),
                server_id: config.server_id.clone(),
                credential: kubeconfig::ClusterCredential {
                    user: config.cluster_kubeconfig.user.clone(),
                    groups: config.cluster_kubeconfig.groups.clone(),
                    ttl: config.cluster_kubeconfig.ttl,
                    ca_pem: config.tls.ca_pem.clone(),
                },
                kubesphere: kubesphere.clone(),
                rewrites: Default::default(),
                repins: Default::default(),
                agent_return_grace,
            }
            .run(controller_stop.clone()),
        )
    });
    let tunnel_tls = (!config.plaintext_tunnel).then(|| acceptor.clone());
    loops.spawn(serve(
        listeners.tunnel,
        tunnel_tls,
        admission("tunnel", limits.connections.tunnel),
        config.limits.clone(),
        stop_accepting.clone(),
        other_conns.clone(),
        metrics.clone(),
        move |req, peer: Peer| agents.clone().handle(req, peer.remote),
    ));
    loops.spawn(serve(
        listeners.frontend,
        Some(frontend_acceptor),
        admission("frontend", limits.connections.frontend),
        config.limits.clone(),
        stop_accepting.clone(),
        frontend_conns.clone(),
        metrics.clone(),
        move |req, peer: Peer| frontend.clone().handle(req, peer),
    ));
    // The admin listener stays up while the server drains: /readyz answers 503 with the
    // reason (rather than refusing connections) and /metrics can still be scraped.
    let admin_stop = CancellationToken::new();
    // Samples every cluster's figures for the status page's rates and charts.
    let sampler = {
        let (registry, stop) = (registry.clone(), admin_stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(history::SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => history.sample(&registry),
                }
            }
        })
    };
    let admin_loop = tokio::spawn(serve(
        listeners.admin,
        None,
        admission("admin", limits.connections.admin),
        config.limits.clone(),
        admin_stop.clone(),
        other_conns.clone(),
        metrics.clone(),
        move |req, peer| admin.clone().handle(req, peer),
    ));
    loops.close();

    shutdown.cancelled().await;
    tracing::info!(grace = ?config.shutdown_grace, "shutting down: draining tunnels");
    draining.cancel();
    let grace_ms = config.shutdown_grace.as_millis().min(u128::from(u32::MAX)) as u32;
    for tunnel in registry.tunnels() {
        let _ = tunnel.control.try_send(ControlMessage::Drain { grace_ms });
    }
    stop_accepting.cancel();
    loops.wait().await;
    frontend_conns.finish.cancel();
    frontend_conns.tracker.close();
    if tokio::time::timeout(config.shutdown_grace, frontend_conns.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over: closing requests still in flight");
    }
    for tunnel in registry.tunnels() {
        tunnel.session.close();
    }
    sessions.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), sessions.wait()).await;
    controller_stop.cancel();
    if let Some(controller) = controller {
        let _ = tokio::time::timeout(Duration::from_secs(5), controller).await;
    }
    if let Some(counter) = replica_counter {
        let _ = counter.await;
    }
    if let Some(follower) = platform_follower {
        let _ = follower.await;
    }
    admin_stop.cancel();
    let _ = admin_loop.await;
    let _ = sampler.await;
    Ok(())
}
