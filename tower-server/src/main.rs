//! `tower-server`: parse flags, build a validated [`tower_server::Config`], run, drain on
//! SIGTERM. Exit codes: 0 ok, 2 bad usage or configuration, 1 runtime failure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tower_auth::{Minter, Secret};
use tower_proto::names::validate_cluster_name;
use tower_server::{Config, Limits, Listeners, pki, registry};
use tower_tunnel::control::Keepalive;

#[derive(Parser)]
#[command(name = "tower-server", version, about = "Tower's host side: accepts agent tunnels and proxies the Kubernetes API through them")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Print an agent token (JWT) for a cluster.
    Token(TokenArgs),
    /// Print a user token (JWT, KubeSphere's shape).
    UserToken(UserTokenArgs),
    /// Print a kubeconfig that reaches a cluster through tower.
    Kubeconfig(KubeconfigArgs),
}

#[derive(Args)]
struct SecretArgs {
    /// File holding the jwtSecret shared by host and members.
    #[arg(long, env = "TOWER_JWT_SECRET_FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// The jwtSecret itself (prefer the file).
    #[arg(long, env = "TOWER_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
}

impl SecretArgs {
    fn load(&self) -> Result<Secret, String> {
        let bytes = match (&self.jwt_secret_file, &self.jwt_secret) {
            (Some(path), _) => std::fs::read(path)
                .map_err(|e| format!("reading --jwt-secret-file {}: {e}", path.display()))?,
            (None, Some(secret)) => secret.clone().into_bytes(),
            (None, None) => {
                return Err("a jwtSecret is required: --jwt-secret-file PATH or TOWER_JWT_SECRET".into());
            }
        };
        Secret::new(bytes).ok_or_else(|| "the jwtSecret is empty".into())
    }
}

#[derive(Args)]
struct ServeArgs {
    /// Where agents dial in (TLS).
    #[arg(long, env = "TOWER_TUNNEL_ADDR", default_value = "0.0.0.0:8080")]
    tunnel_addr: SocketAddr,
    /// Where callers reach /clusters/{name}/… (TLS).
    #[arg(long, env = "TOWER_PROXY_ADDR", default_value = "0.0.0.0:9443")]
    proxy_addr: SocketAddr,
    /// Health, readiness, metrics and the cluster table (plain HTTP).
    #[arg(long, env = "TOWER_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    admin_addr: SocketAddr,
    #[command(flatten)]
    secret: SecretArgs,
    /// Where a generated CA and serving certificate are kept.
    #[arg(long, env = "TOWER_STATE_DIR", default_value = "/var/lib/tower")]
    state_dir: PathBuf,
    /// Serving certificate (PEM) instead of a generated one; needs --tls-key and --ca-cert.
    #[arg(long, env = "TOWER_TLS_CERT", requires_all = ["tls_key", "ca_cert"])]
    tls_cert: Option<PathBuf>,
    /// Key of --tls-cert.
    #[arg(long, env = "TOWER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA that signed --tls-cert (what agents trust).
    #[arg(long, env = "TOWER_CA_CERT", requires = "tls_cert")]
    ca_cert: Option<PathBuf>,
    /// Extra names or IPs for the generated certificate.
    #[arg(long = "tls-san", env = "TOWER_TLS_SANS", value_delimiter = ',')]
    tls_sans: Vec<String>,
    /// YAML list of clusters that may connect; without it any valid agent token may.
    #[arg(long, env = "TOWER_CLUSTERS", conflicts_with = "kubernetes")]
    clusters: Option<PathBuf>,
    /// Take clusters from Cluster objects in Kubernetes.
    #[arg(long, env = "TOWER_KUBERNETES")]
    kubernetes: bool,
    /// Kubeconfig for --kubernetes (else in-cluster).
    #[arg(long, env = "TOWER_KUBECONFIG", requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of tower's own objects.
    #[arg(long, env = "TOWER_NAMESPACE", default_value = "ke-system")]
    namespace: String,
    /// The address agents dial (goes into the certificate's names).
    #[arg(long, env = "TOWER_PROXY_PUBLISH_ADDRESS")]
    proxy_publish_address: Option<String>,
    /// This replica's id (default: the host name).
    #[arg(long, env = "TOWER_SERVER_ID")]
    server_id: Option<String>,
    /// How many replicas serve the published address.
    #[arg(long, env = "TOWER_SERVER_COUNT", default_value_t = 1)]
    server_count: u16,
    /// Keepalive ping interval on tunnels; a pong may take as long again.
    #[arg(long, env = "TOWER_KEEPALIVE", default_value = "10s", value_parser = humantime::parse_duration)]
    keepalive: Duration,
    /// How long in-flight requests get on SIGTERM.
    #[arg(long, env = "TOWER_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Accept agents without TLS: only behind a load balancer that terminates TLS.
    #[arg(long, env = "TOWER_TUNNEL_PLAINTEXT")]
    tunnel_plaintext: bool,
    /// How long a client may take to send its request headers.
    #[arg(long, env = "TOWER_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// Largest request header block, in bytes.
    #[arg(long, env = "TOWER_MAX_HEADER_BYTES", default_value_t = 65536)]
    max_header_bytes: usize,
    /// Most concurrent streams on one tunnel.
    #[arg(long, env = "TOWER_MAX_STREAMS_PER_TUNNEL", default_value_t = 16384)]
    max_streams_per_tunnel: usize,
}

#[derive(Args)]
struct TokenArgs {
    #[command(flatten)]
    secret: SecretArgs,
    /// The cluster the agent serves.
    #[arg(long)]
    cluster: String,
    /// Lifetime (e.g. 24h); forever when omitted.
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
}

#[derive(Args)]
struct UserTokenArgs {
    #[command(flatten)]
    secret: SecretArgs,
    /// The user.
    #[arg(long)]
    user: String,
    /// A group (repeat for more).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Lifetime.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

#[derive(Args)]
struct KubeconfigArgs {
    /// The member cluster.
    #[arg(long)]
    cluster: String,
    /// The frontend's URL, e.g. https://tower.example.com:9443
    #[arg(long)]
    server: String,
    /// The user token.
    #[arg(long)]
    token: String,
    /// CA to trust for the frontend (PEM).
    #[arg(long)]
    ca_cert: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOWER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => return serve(*args),
        Command::Token(args) => token(args),
        Command::UserToken(args) => user_token(args),
        Command::Kubeconfig(args) => kubeconfig(args),
    };
    match result {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tower-server: {e}");
            ExitCode::from(2)
        }
    }
}

fn token(args: TokenArgs) -> Result<String, String> {
    validate_cluster_name(&args.cluster).map_err(|e| e.to_string())?;
    Ok(Minter::new(&args.secret.load()?).agent_token(&args.cluster, args.ttl))
}

fn user_token(args: UserTokenArgs) -> Result<String, String> {
    if args.user.trim().is_empty() {
        return Err("--user must not be empty".into());
    }
    Ok(Minter::new(&args.secret.load()?).user_token(&args.user, &args.groups, Some(args.ttl)))
}

fn kubeconfig(args: KubeconfigArgs) -> Result<String, String> {
    validate_cluster_name(&args.cluster).map_err(|e| e.to_string())?;
    let base = args.server.trim_end_matches('/');
    if !base.starts_with("https://") {
        return Err(format!("--server {base:?} must be an https:// URL"));
    }
    let suffix = format!("/clusters/{}", args.cluster);
    let server = if base.ends_with(&suffix) {
        base.to_owned()
    } else {
        format!("{base}{suffix}")
    };
    let ca = match &args.ca_cert {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("reading --ca-cert {}: {e}", path.display()))?;
            tower_tunnel::tls::certs_from_pem(&pem).map_err(|e| e.to_string())?;
            format!(
                "    certificate-authority-data: {}\n",
                base64::engine::general_purpose::STANDARD.encode(pem)
            )
        }
        None => String::new(),
    };
    let name = &args.cluster;
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n{ca}users:\n- name: {name}-user\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}-user\ncurrent-context: {name}\n",
        token = args.token
    ))
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match build_config(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tower-server: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tower-server: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("binding the {what} listener on {addr}: {e}"))
        };
        let listeners = match async {
            Ok::<_, String>(Listeners {
                tunnel: bind(args.tunnel_addr, "tunnel").await?,
                frontend: bind(args.proxy_addr, "frontend").await?,
                admin: bind(args.admin_addr, "admin").await?,
            })
        }
        .await
        {
            Ok(l) => l,
            Err(e) => {
                eprintln!("tower-server: {e}");
                return ExitCode::from(1);
            }
        };
        let local = |l: &tokio::net::TcpListener| {
            l.local_addr().map(|a| a.to_string()).unwrap_or_default()
        };
        // One line on stdout says where everything listens (tests bind port 0).
        println!(
            "{}",
            serde_json::json!({
                "tunnel": local(&listeners.tunnel),
                "frontend": local(&listeners.frontend),
                "admin": local(&listeners.admin),
            })
        );
        tracing::info!(
            tunnel = %local(&listeners.tunnel),
            frontend = %local(&listeners.frontend),
            admin = %local(&listeners.admin),
            server_id = %config.server_id,
            "tower-server listening"
        );
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_to(shutdown.clone()));
        match tower_server::run(config, listeners, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tower-server: {e}");
                ExitCode::from(1)
            }
        }
    })
}

fn build_config(args: &ServeArgs) -> Result<Config, String> {
    if args.kubernetes {
        return Err("--kubernetes (Cluster objects as the registry) is not implemented yet; use --clusters FILE or no registry".into());
    }
    let secret = args.secret.load()?;
    let clusters = args
        .clusters
        .as_deref()
        .map(registry::load_clusters_file)
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
    if let Some(address) = &args.proxy_publish_address {
        let parsed = tower_tunnel::dial::ServerAddress::parse(address)
            .map_err(|e| format!("--proxy-publish-address: {e}"))?;
        extra_sans.push(parsed.host);
    }
    let tls = pki::load_or_generate(own.as_ref(), &args.state_dir, &pki::default_sans(&extra_sans))?;
    if args.server_count == 0 {
        return Err("--server-count must be at least 1".into());
    }
    if args.keepalive < Duration::from_millis(100) {
        return Err("--keepalive must be at least 100ms".into());
    }
    if args.max_streams_per_tunnel == 0 {
        return Err("--max-streams-per-tunnel must be at least 1".into());
    }
    let server_id = match &args.server_id {
        Some(id) if !id.trim().is_empty() => id.clone(),
        Some(_) => return Err("--server-id must not be empty".into()),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "tower-0".into()),
    };
    let _ = &args.namespace;
    let _ = &args.kubeconfig;
    Ok(Config {
        secret,
        tls,
        clusters,
        server_id,
        server_count: args.server_count,
        keepalive: Keepalive::new(args.keepalive),
        shutdown_grace: args.shutdown_grace,
        plaintext_tunnel: args.tunnel_plaintext,
        limits: Limits {
            header_read_timeout: args.header_read_timeout,
            max_header_bytes: args.max_header_bytes,
            max_streams: args.max_streams_per_tunnel,
            ..Limits::default()
        },
    })
}

async fn signal_to(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    shutdown.cancel();
}
