//! `tower-server`: parse flags, build a validated [`tower_server::Config`], run, drain on
//! SIGTERM. Exit codes: 0 ok, 2 bad usage or configuration, 1 runtime failure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tower_auth::Minter;
use tower_proto::names::validate_cluster_name;
use tower_server::Listeners;
use tower_server::cli::{SecretArgs, ServeArgs, build_config};

#[derive(Parser)]
#[command(
    name = "tower-server",
    version,
    about = "Tower's host side: accepts agent tunnels and proxies the Kubernetes API through them"
)]
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
        let local =
            |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
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
