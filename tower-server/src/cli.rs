//! The `serve` flags (a public contract, see DESIGN.md §8) and their validation into a
//! [`Config`]. Shared by the binary and by tools that embed the server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tower_auth::Secret;
use tower_tunnel::control::Keepalive;

use tower_proto::names::validate_cluster_name;

use crate::{Config, ConnectionLimits, Limits, RegistryConfig, pki, registry};

/// Where the jwtSecret comes from.
#[derive(Args, Debug)]
pub struct SecretArgs {
    /// File holding the jwtSecret shared by host and members.
    #[arg(long, env = "TOWER_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// The jwtSecret itself (prefer the file).
    #[arg(long, env = "TOWER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
}

impl SecretArgs {
    /// Reads the secret from the file or the variable.
    pub fn load(&self) -> Result<Secret, String> {
        let bytes = match (&self.jwt_secret_file, &self.jwt_secret) {
            (Some(path), _) => std::fs::read(path)
                .map_err(|e| format!("reading --jwt-secret-file {}: {e}", path.display()))?,
            (None, Some(secret)) => secret.clone().into_bytes(),
            (None, None) => {
                return Err(
                    "a jwtSecret is required: --jwt-secret-file PATH or TOWER_JWT_SECRET".into(),
                );
            }
        };
        Secret::new(bytes).ok_or_else(|| "the jwtSecret is empty".into())
    }
}

/// Names of the platform's objects: Kuberix Enterprise's by default, KubeSphere's with
/// `--platform-namespace kubesphere-system --platform-config kubesphere-config
/// --platform-apiserver ks-apiserver`.
#[derive(Args, Debug, Clone)]
pub struct PlatformArgs {
    /// The platform's namespace (KubeSphere: kubesphere-system).
    #[arg(long, env = "TOWER_PLATFORM_NAMESPACE", default_value = "ke-system")]
    pub platform_namespace: String,
    /// The platform's config ConfigMap, whose kubesphere.yaml may set
    /// multicluster.proxyPublishAddress (KubeSphere: kubesphere-config).
    #[arg(long, env = "TOWER_PLATFORM_CONFIG", default_value = "ke-config")]
    pub platform_config: String,
    /// The platform's API server, the one caller of the kubesphere endpoints (KubeSphere:
    /// ks-apiserver).
    #[arg(long, env = "TOWER_PLATFORM_APISERVER", default_value = "ke-apiserver")]
    pub platform_apiserver: String,
}

impl PlatformArgs {
    /// The validated names.
    pub fn names(&self) -> Result<crate::platform::PlatformNames, String> {
        for (flag, value) in [
            ("--platform-namespace", &self.platform_namespace),
            ("--platform-config", &self.platform_config),
            ("--platform-apiserver", &self.platform_apiserver),
        ] {
            validate_cluster_name(value).map_err(|e| format!("{flag}: {e}"))?;
        }
        Ok(crate::platform::PlatformNames {
            namespace: self.platform_namespace.clone(),
            config: self.platform_config.clone(),
            apiserver: self.platform_apiserver.clone(),
        })
    }
}

/// `tower-server serve` flags.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Where agents dial in (TLS).
    #[arg(long, env = "TOWER_TUNNEL_ADDR", default_value = "0.0.0.0:8080")]
    pub tunnel_addr: SocketAddr,
    /// Where callers reach /clusters/{name}/… (TLS).
    #[arg(long, env = "TOWER_PROXY_ADDR", default_value = "0.0.0.0:9443")]
    pub proxy_addr: SocketAddr,
    /// Health, readiness, metrics and the cluster table (plain HTTP).
    #[arg(long, env = "TOWER_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,
    /// The jwtSecret.
    #[command(flatten)]
    pub secret: SecretArgs,
    /// Where a generated CA and serving certificate are kept.
    #[arg(long, env = "TOWER_STATE_DIR", default_value = "/var/lib/tower")]
    pub state_dir: PathBuf,
    /// Serving certificate (PEM) instead of a generated one; needs --tls-key and --ca-cert.
    #[arg(long, env = "TOWER_TLS_CERT", requires_all = ["tls_key", "ca_cert"])]
    pub tls_cert: Option<PathBuf>,
    /// Key of --tls-cert.
    #[arg(long, env = "TOWER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA that signed --tls-cert (what agents trust).
    #[arg(long, env = "TOWER_CA_CERT", requires = "tls_cert")]
    pub ca_cert: Option<PathBuf>,
    /// Extra names or IPs for the generated certificate.
    #[arg(long = "tls-san", env = "TOWER_TLS_SANS", value_delimiter = ',')]
    pub tls_sans: Vec<String>,
    /// YAML list of clusters that may connect; without it any valid agent token may.
    #[arg(long, env = "TOWER_CLUSTERS", conflicts_with = "kubernetes")]
    pub clusters: Option<PathBuf>,
    /// Take clusters from Cluster objects in Kubernetes.
    #[arg(long, env = "TOWER_KUBERNETES")]
    pub kubernetes: bool,
    /// Kubeconfig for --kubernetes (else in-cluster).
    #[arg(long, env = "TOWER_KUBECONFIG", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of tower's own objects.
    #[arg(long, env = "TOWER_NAMESPACE", default_value = "ke-system")]
    pub namespace: String,
    /// With --kubernetes: requests per second to the API server, every request counted
    /// (the Cluster list and watch, condition and spec writes), as client-go's QPS.
    #[arg(long, env = "TOWER_KUBE_API_QPS", default_value_t = 50.0)]
    pub kube_api_qps: f64,
    /// With --kubernetes: requests that may go at once after a quiet spell (client-go's
    /// Burst).
    #[arg(long, env = "TOWER_KUBE_API_BURST", default_value_t = 100)]
    pub kube_api_burst: u32,
    /// With --kubernetes: how long after a start a Cluster whose AgentAvailable is True
    /// waits for its agent to dial again before it is written False (agents redial
    /// within their --reconnect-max, 30 s by default).
    #[arg(long, env = "TOWER_AGENT_RETURN_GRACE", default_value = "40s", value_parser = humantime::parse_duration)]
    pub agent_return_grace: Duration,
    /// The address members dial, https://HOST:PORT (goes into agent.yaml and the
    /// certificate's names); with --kubernetes, the `tower` Service's LoadBalancer
    /// ingress is used only when neither this nor the platform config sets one.
    #[arg(long, env = "TOWER_PROXY_PUBLISH_ADDRESS")]
    pub proxy_publish_address: Option<String>,
    /// This server's frontend as the host reaches it; Clusters get
    /// {URL}/clusters/{name} as kubernetesAPIEndpoint (default: the tower-proxy Service).
    #[arg(long, env = "TOWER_FRONTEND_URL")]
    pub frontend_url: Option<String>,
    /// The image agent.yaml tells members to run.
    #[arg(long, env = "TOWER_AGENT_IMAGE")]
    pub agent_image: Option<String>,
    /// The platform's names.
    #[command(flatten)]
    pub platform: PlatformArgs,
    /// The user of the kubeconfig written into each proxy Cluster (what KubeSphere's
    /// cluster controller acts as on the member; the agent impersonates it).
    #[arg(
        long,
        env = "TOWER_CLUSTER_KUBECONFIG_USER",
        default_value = "kubesphere"
    )]
    pub cluster_kubeconfig_user: String,
    /// Its groups (repeat, or a comma-separated list); joining a member needs
    /// cluster-admin there.
    #[arg(
        long = "cluster-kubeconfig-group",
        env = "TOWER_CLUSTER_KUBECONFIG_GROUPS",
        value_delimiter = ',',
        default_value = "system:masters"
    )]
    pub cluster_kubeconfig_groups: Vec<String>,
    /// Lifetime of its token; a new one is written when a third of it is left.
    #[arg(long, env = "TOWER_CLUSTER_KUBECONFIG_TTL", default_value = "365days", value_parser = humantime::parse_duration)]
    pub cluster_kubeconfig_ttl: Duration,
    /// With --kubernetes: the ports handed out to proxy Clusters for their
    /// kubesphereAPIEndpoint (FIRST-LAST; every replica listens on each), or `off`.
    #[arg(long, env = "TOWER_KUBESPHERE_PORTS", default_value = "16000-16999")]
    pub kubesphere_ports: String,
    /// Where those ports listen (plain HTTP unless --kubesphere-tls: keep them inside
    /// the host cluster).
    #[arg(long, env = "TOWER_KUBESPHERE_BIND_ADDRESS", default_value = "0.0.0.0")]
    pub kubesphere_bind_address: std::net::IpAddr,
    /// Serve those ports over TLS with the frontend's certificate and write
    /// https://HOST:PORT. Only for callers that trust the Tower CA: KubeSphere's
    /// ks-apiserver dispatches with Go's default transport (system roots only), so it
    /// needs the CA added to its image's roots first.
    #[arg(long, env = "TOWER_KUBESPHERE_TLS")]
    pub kubesphere_tls: bool,
    /// The host written into kubesphereAPIEndpoint (http://HOST:PORT); default: the
    /// cluster's own Service, mc-{name}.{namespace}.svc.
    #[arg(long, env = "TOWER_KUBESPHERE_ENDPOINT_HOST")]
    pub kubesphere_endpoint_host: Option<String>,
    /// Users in this group may fetch agent.yaml from the admin listener.
    #[arg(long, env = "TOWER_ADMIN_GROUP", default_value = "system:masters")]
    pub admin_group: String,
    /// This replica's id (default: the host name).
    #[arg(long, env = "TOWER_SERVER_ID")]
    pub server_id: Option<String>,
    /// How many replicas serve the published address (default 1; with --kubernetes,
    /// spec.replicas of --deployment, followed as it scales).
    #[arg(long, env = "TOWER_SERVER_COUNT")]
    pub server_count: Option<u16>,
    /// With --kubernetes: the Deployment in --namespace whose replicas serve the
    /// published address.
    #[arg(long, env = "TOWER_DEPLOYMENT", default_value = "tower")]
    pub deployment: String,
    /// Keepalive ping interval on tunnels; a pong may take as long again.
    #[arg(long, env = "TOWER_KEEPALIVE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive: Duration,
    /// How long in-flight requests get on SIGTERM.
    #[arg(long, env = "TOWER_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Accept agents without TLS: only behind a load balancer that terminates TLS.
    #[arg(long, env = "TOWER_TUNNEL_PLAINTEXT")]
    pub tunnel_plaintext: bool,
    /// How long a TLS handshake may take (agents and callers).
    #[arg(long, env = "TOWER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once on each listener; connections past it wait
    /// (accepted, their handshake deadline not yet running) for one to finish. 0 (the
    /// default) = no bound: B9 measured 10,000 agents back sooner without one.
    #[arg(long, env = "TOWER_MAX_CONCURRENT_HANDSHAKES", default_value_t = crate::DEFAULT_MAX_CONCURRENT_HANDSHAKES)]
    pub max_concurrent_handshakes: usize,
    /// How long a client may take to send its request headers; a connection that sends
    /// no request this long after it opens (HTTP/1.1 and HTTP/2), or between two requests
    /// (HTTP/1.1), is closed.
    #[arg(long, env = "TOWER_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// An HTTP/2 connection (frontend) with no request open this long is closed with a
    /// GOAWAY; clients open a new one when they need it.
    #[arg(long, env = "TOWER_IDLE_CONNECTION_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_connection_timeout: Duration,
    /// Most connections the tunnel listener holds; one more is closed at once (default:
    /// 10000, less when the open-file limit is lower: see README, Interfaces).
    #[arg(long, env = "TOWER_MAX_TUNNEL_CONNECTIONS")]
    pub max_tunnel_connections: Option<usize>,
    /// Most connections the frontend listener holds (default as --max-tunnel-connections).
    #[arg(long, env = "TOWER_MAX_FRONTEND_CONNECTIONS")]
    pub max_frontend_connections: Option<usize>,
    /// Most connections the admin listener holds (default 64): kept apart, so probes get
    /// in while the other listeners are full.
    #[arg(long, env = "TOWER_MAX_ADMIN_CONNECTIONS")]
    pub max_admin_connections: Option<usize>,
    /// Most connections one source address (IPv6: one /64) holds on each listener; 0 = no
    /// such limit (behind a load balancer that hides callers' addresses).
    #[arg(long, env = "TOWER_MAX_CONNECTIONS_PER_SOURCE", default_value_t = crate::ConnectionLimits::DEFAULT_PER_SOURCE)]
    pub max_connections_per_source: usize,
    /// Largest request header block, in bytes.
    #[arg(long, env = "TOWER_MAX_HEADER_BYTES", default_value_t = 65536)]
    pub max_header_bytes: usize,
    /// Most concurrent streams on one tunnel (beyond it: 503); each watch on the tunnel's
    /// shared HTTP/2 stream counts as one. At most 32768.
    #[arg(long, env = "TOWER_MAX_STREAMS_PER_TUNNEL", default_value_t = 16384)]
    pub max_streams_per_tunnel: usize,
    /// Most requests in flight to one cluster through this server, watches included
    /// (beyond it: 429).
    #[arg(long, env = "TOWER_MAX_REQUESTS_PER_CLUSTER", default_value_t = 16384)]
    pub max_requests_per_cluster: usize,
    /// Most requests in flight from one user (the token's) to one cluster through this
    /// server, watches included (beyond it: 429), so that no one caller holds all of
    /// --max-requests-per-cluster.
    #[arg(long, env = "TOWER_MAX_REQUESTS_PER_USER", default_value_t = crate::DEFAULT_MAX_REQUESTS_PER_USER)]
    pub max_requests_per_user: usize,
    /// How long the agent tokens tower mints into Clusters are valid (0: for ever). With
    /// a third of it left a token is renewed: the connected agent is handed the new one
    /// over its tunnel, and the old one keeps working until it expires, so an agent
    /// restarted with it (the console's Deployment carries it) still connects and is
    /// handed the new one. An agent down for the whole last third needs the current token.
    #[arg(long, env = "TOWER_AGENT_TOKEN_LIFETIME", default_value = "90d", value_parser = humantime::parse_duration)]
    pub agent_token_lifetime: Duration,
    /// Forward a bearer token that this host did not sign (not a jwtSecret-signed user
    /// token: a member ServiceAccount token, as kubefed stores them for joined members)
    /// unchanged to the member's API server, which authenticates it; Tower then adds no
    /// identity and no credential of its own. Off by default: with it, anyone who reaches
    /// the frontend may present member credentials through Tower.
    #[arg(long, env = "TOWER_PASS_THROUGH_UNKNOWN_TOKENS")]
    pub pass_through_unknown_tokens: bool,
    /// A proxied request whose bytes stop moving this long is ended: 504 before the
    /// member answers, a cut body after (the kubelet's streaming idle timeout is 4h too).
    #[arg(long, env = "TOWER_STREAM_IDLE_TIMEOUT", default_value = "4h", value_parser = humantime::parse_duration)]
    pub stream_idle_timeout: Duration,
}

/// Validates the flags into a [`Config`]; the error says which flag is wrong.
pub fn build_config(args: &ServeArgs) -> Result<Config, String> {
    let secret = args.secret.load()?;
    let registry = match (&args.clusters, args.kubernetes) {
        (Some(path), _) => RegistryConfig::File(registry::load_clusters_file(path)?),
        (None, true) => {
            validate_cluster_name(&args.namespace).map_err(|e| format!("--namespace: {e}"))?;
            if !(args.kube_api_qps > 0.0 && args.kube_api_qps.is_finite()) {
                return Err(format!(
                    "--kube-api-qps {} must be a number above 0",
                    args.kube_api_qps
                ));
            }
            if args.kube_api_burst == 0 {
                return Err("--kube-api-burst must be at least 1".into());
            }
            RegistryConfig::Kubernetes {
                kubeconfig: args.kubeconfig.clone(),
                namespace: args.namespace.clone(),
                api_rate: crate::api_pace::ApiRate {
                    qps: args.kube_api_qps,
                    burst: args.kube_api_burst,
                },
                agent_return_grace: args.agent_return_grace,
            }
        }
        (None, false) => RegistryConfig::Open,
    };
    let frontend_url = args
        .frontend_url
        .clone()
        .unwrap_or_else(|| format!("https://tower-proxy.{}.svc:9443", args.namespace));
    if !frontend_url.starts_with("https://") {
        return Err(format!(
            "--frontend-url {frontend_url:?} must be an https:// URL"
        ));
    }
    let publish_address = args
        .proxy_publish_address
        .as_deref()
        .map(|a| {
            crate::manifest::normalize_publish_address(a)
                .map(|(a, _)| a)
                .map_err(|e| format!("--proxy-publish-address: {e}"))
        })
        .transpose()?;
    let own = match (&args.tls_cert, &args.tls_key, &args.ca_cert) {
        (Some(cert), Some(key), Some(ca)) => Some(pki::OwnFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        }),
        _ => None,
    };
    let mut extra_sans = args.tls_sans.clone();
    if let Some(address) = &publish_address {
        let parsed = tower_tunnel::dial::ServerAddress::parse(address)
            .map_err(|e| format!("--proxy-publish-address: {e}"))?;
        extra_sans.push(parsed.host);
    }
    if args.server_count == Some(0) {
        return Err("--server-count must be at least 1".into());
    }
    let keepalive = Keepalive::from_flag(args.keepalive)?;
    if args.max_streams_per_tunnel == 0
        || args.max_streams_per_tunnel > tower_tunnel::session::AGENT_MAX_REQUESTS
    {
        return Err(format!(
            "--max-streams-per-tunnel must be between 1 and {} (what an agent accepts)",
            tower_tunnel::session::AGENT_MAX_REQUESTS
        ));
    }
    if args.handshake_timeout < Duration::from_millis(100) {
        return Err("--handshake-timeout must be at least 100ms".into());
    }
    if !(1..=1_000_000).contains(&args.max_requests_per_cluster) {
        return Err("--max-requests-per-cluster must be between 1 and 1000000".into());
    }
    if !(1..=1_000_000).contains(&args.max_requests_per_user) {
        return Err("--max-requests-per-user must be between 1 and 1000000".into());
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(30 * 24 * 3600))
        .contains(&args.stream_idle_timeout)
    {
        return Err("--stream-idle-timeout must be between 1s and 30days".into());
    }
    if !(Duration::from_millis(100)..=Duration::from_secs(24 * 3600))
        .contains(&args.idle_connection_timeout)
    {
        return Err("--idle-connection-timeout must be between 100ms and 24h".into());
    }
    let connections = connection_limits(args, crate::connections::open_file_limit())?;
    let platform = args.platform.names()?;
    if args.cluster_kubeconfig_user.trim().is_empty() {
        return Err("--cluster-kubeconfig-user must not be empty".into());
    }
    if args.cluster_kubeconfig_ttl < Duration::from_secs(10) {
        return Err("--cluster-kubeconfig-ttl must be at least 10s (KubeSphere rebuilds its clients at each renewal: keep it long)".into());
    }
    let kubesphere = match parse_port_range(&args.kubesphere_ports)? {
        Some(ports) if args.kubernetes => Some(crate::ks_endpoint::KubeSphereEndpointConfig {
            ports,
            bind: args.kubesphere_bind_address,
            tls: args.kubesphere_tls,
            host: args
                .kubesphere_endpoint_host
                .clone()
                .map(|h| validate_endpoint_host(&h))
                .transpose()?,
        }),
        _ => None,
    };
    if args.kubesphere_tls && args.kubesphere_endpoint_host.is_none() {
        // The generated certificate covers every cluster's Service, mc-NAME.NAMESPACE.svc.
        extra_sans.push(format!("*.{}.svc", args.namespace));
    }
    // Last of the checks: it may write the state directory.
    let tls = pki::load_or_generate(
        own.as_ref(),
        &args.state_dir,
        &pki::default_sans(&extra_sans),
    )?;
    let server_id = match &args.server_id {
        Some(id) if !id.trim().is_empty() => id.clone(),
        Some(_) => return Err("--server-id must not be empty".into()),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "tower-0".into()),
    };
    Ok(Config {
        secret,
        tls,
        registry,
        publish_address,
        frontend_url,
        agent_image: args
            .agent_image
            .clone()
            .unwrap_or_else(crate::manifest::default_image),
        admin_group: args.admin_group.clone(),
        server_id,
        server_count: args.server_count.unwrap_or(1),
        server_count_from: (args.kubernetes && args.server_count.is_none())
            .then(|| args.deployment.clone()),
        keepalive,
        shutdown_grace: args.shutdown_grace,
        plaintext_tunnel: args.tunnel_plaintext,
        cluster_kubeconfig: crate::ClusterKubeconfig {
            user: args.cluster_kubeconfig_user.clone(),
            groups: args.cluster_kubeconfig_groups.clone(),
            ttl: args.cluster_kubeconfig_ttl,
        },
        kubesphere,
        platform,
        pass_through_unknown_tokens: args.pass_through_unknown_tokens,
        agent_token_lifetime: (!args.agent_token_lifetime.is_zero())
            .then_some(args.agent_token_lifetime),
        limits: Limits {
            handshake_timeout: args.handshake_timeout,
            max_concurrent_handshakes: args.max_concurrent_handshakes,
            header_read_timeout: args.header_read_timeout,
            idle_connection_timeout: args.idle_connection_timeout,
            connections,
            max_header_bytes: args.max_header_bytes,
            max_streams: args.max_streams_per_tunnel,
            max_requests_per_cluster: args.max_requests_per_cluster,
            max_requests_per_user: args.max_requests_per_user,
            stream_idle_timeout: args.stream_idle_timeout,
        },
    })
}

/// `FIRST-LAST` (inclusive), or `off`.
fn parse_port_range(text: &str) -> Result<Option<std::ops::RangeInclusive<u16>>, String> {
    if text.trim() == "off" {
        return Ok(None);
    }
    let bad = || format!("--kubesphere-ports {text:?}: want FIRST-LAST (e.g. 16000-16999) or off");
    let (first, last) = text.trim().split_once('-').ok_or_else(bad)?;
    let first: u16 = first.trim().parse().map_err(|_| bad())?;
    let last: u16 = last.trim().parse().map_err(|_| bad())?;
    if first == 0 || first > last {
        return Err(bad());
    }
    Ok(Some(first..=last))
}

/// A host name or IP address for `http://HOST:PORT` (IPv6 in brackets).
fn validate_endpoint_host(host: &str) -> Result<String, String> {
    let host = host.trim();
    let url = format!("http://{host}:1/");
    match url.parse::<http::Uri>() {
        Ok(uri) if uri.host().is_some() && !host.contains(['/', '@', '?', '#']) => {
            Ok(host.to_owned())
        }
        _ => Err(format!(
            "--kubesphere-endpoint-host {host:?}: want a host name or IP address"
        )),
    }
}

/// The connection limits the flags ask for, the unset ones sized for a process that may
/// open `open_files` descriptors.
fn connection_limits(
    args: &ServeArgs,
    open_files: Option<u64>,
) -> Result<ConnectionLimits, String> {
    let defaults = ConnectionLimits::defaults_for(open_files);
    let limits = ConnectionLimits {
        tunnel: args.max_tunnel_connections.unwrap_or(defaults.tunnel),
        frontend: args.max_frontend_connections.unwrap_or(defaults.frontend),
        admin: args.max_admin_connections.unwrap_or(defaults.admin),
        per_source: args.max_connections_per_source,
    };
    for (flag, value) in [
        ("--max-tunnel-connections", limits.tunnel),
        ("--max-frontend-connections", limits.frontend),
        ("--max-admin-connections", limits.admin),
    ] {
        if !(1..=1_000_000).contains(&value) {
            return Err(format!("{flag} must be between 1 and 1000000"));
        }
    }
    if let Some(open_files) = open_files
        && limits.descriptors() > open_files
    {
        tracing::warn!(
            open_files,
            needed = limits.descriptors(),
            "the connection limits add up to more file descriptors than this process may open: a flood may exhaust them (raise the limit, or lower --max-…-connections)"
        );
    }
    Ok(limits)
}
