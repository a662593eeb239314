//! `tower-local`: Tower's main job on one machine. Starts tower-server and tower-agent
//! (in this process), with the agent serving either your own cluster (`--kubeconfig`)
//! or a stand-in member API server, and writes a kubeconfig that reaches that cluster
//! through the tunnel. Then: `kubectl --kubeconfig <dir>/kubeconfig get pods -A`.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "tower-local",
    about = "Run tower-server + tower-agent + an upstream locally"
)]
struct Args {
    /// Your member cluster's kubeconfig (else a stand-in API server is started).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The member's name.
    #[arg(long, default_value = "local")]
    cluster: String,
    /// The user the kubeconfig's token names (the agent impersonates it upstream).
    #[arg(long, default_value = "admin")]
    user: String,
    /// Groups of that user.
    #[arg(long = "group", default_values_t = ["system:masters".to_string()])]
    groups: Vec<String>,
    /// Where to keep the CA, secret and kubeconfig.
    #[arg(long, default_value = "tower-local")]
    dir: PathBuf,
    /// Tunnel listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    tunnel_addr: String,
    /// Frontend listener.
    #[arg(long, default_value = "127.0.0.1:9443")]
    proxy_addr: String,
    /// Admin listener.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_addr: String,
    /// Check that `kubectl version` works through the tunnel, then exit.
    #[arg(long)]
    check: bool,
}

#[derive(Parser)]
struct Serve {
    #[command(flatten)]
    args: tower_server::cli::ServeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber_init();
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::fs::canonicalize(&args.dir)?;
    let secret_file = dir.join("jwt-secret");
    if !secret_file.exists() {
        let secret: [u8; 24] = rand::random();
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&secret_file, hex)?;
    }

    let (member_kubeconfig, _stand_in) = match &args.kubeconfig {
        Some(path) => (path.clone(), None),
        None => {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let api = tower_kube_stand_in::StandIn::start(listener, "stand-in-sa-token").await?;
            let path = dir.join("member-kubeconfig");
            std::fs::write(
                &path,
                api.kubeconfig_yaml(tower_kube_stand_in::KubeconfigAuth::Token),
            )?;
            eprintln!(
                "tower-local: no --kubeconfig given: serving a stand-in member API server at {}",
                api.url()
            );
            (path, Some(api))
        }
    };

    let state = dir.join("state");
    let serve = Serve::try_parse_from([
        "serve".as_ref(),
        "--tunnel-addr".as_ref(),
        args.tunnel_addr.as_ref(),
        "--proxy-addr".as_ref(),
        args.proxy_addr.as_ref(),
        "--admin-addr".as_ref(),
        args.admin_addr.as_ref(),
        "--jwt-secret-file".as_ref(),
        secret_file.as_os_str(),
        "--state-dir".as_ref(),
        state.as_os_str(),
    ])?;
    let config = tower_server::cli::build_config(&serve.args).map_err(anyhow::Error::msg)?;
    let listeners = tower_server::Listeners {
        tunnel: tokio::net::TcpListener::bind(&args.tunnel_addr).await?,
        frontend: tokio::net::TcpListener::bind(&args.proxy_addr).await?,
        admin: tokio::net::TcpListener::bind(&args.admin_addr).await?,
    };
    let tunnel = listeners.tunnel.local_addr()?;
    let frontend = listeners.frontend.local_addr()?;
    let admin = listeners.admin.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(tower_server::run(config, listeners, shutdown.clone()));

    let secret = tower_auth::Secret::new(std::fs::read(&secret_file)?)
        .ok_or_else(|| anyhow::anyhow!("empty secret"))?;
    let minter = tower_auth::Minter::new(&secret);
    let agent_token = minter.agent_token(&args.cluster, None);
    let agent_cli = tower_agent::cli::Cli::try_parse_from([
        "tower-agent".as_ref(),
        "--name".as_ref(),
        args.cluster.as_ref(),
        "--token".as_ref(),
        agent_token.as_ref(),
        "--proxy-server".as_ref(),
        format!("https://{tunnel}").as_ref(),
        "--ca-file".as_ref(),
        state.join("ca.crt").as_os_str(),
        "--kubeconfig".as_ref(),
        member_kubeconfig.as_os_str(),
        "--jwt-secret-file".as_ref(),
        secret_file.as_os_str(),
    ] as [&std::ffi::OsStr; 13])?;
    let agent_config = tower_agent::cli::build_config(&agent_cli)
        .await
        .map_err(anyhow::Error::msg)?;
    let agent = tokio::spawn(tower_agent::run(agent_config, None, shutdown.clone()));

    let user_token = minter.user_token(
        &args.user,
        &args.groups,
        Some(Duration::from_secs(24 * 3600)),
    );
    let kubeconfig = dir.join("kubeconfig");
    let ca = base64_encode(&std::fs::read(state.join("ca.crt"))?);
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {c}\n  cluster:\n    server: https://{frontend}/clusters/{c}\n    certificate-authority-data: {ca}\nusers:\n- name: {u}\n  user:\n    token: {user_token}\ncontexts:\n- name: {c}\n  context:\n    cluster: {c}\n    user: {u}\ncurrent-context: {c}\n",
            c = args.cluster,
            u = args.user
        ),
    )?;
    eprintln!(
        "tower-local: tunnel {tunnel}, frontend {frontend}, admin http://{admin}/v1/clusters"
    );
    eprintln!(
        "tower-local: try  kubectl --kubeconfig {} get pods -A",
        kubeconfig.display()
    );

    if args.check {
        let ok = check(&kubeconfig).await;
        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = agent.await;
            let _ = server.await;
        })
        .await;
        anyhow::ensure!(ok, "kubectl through the tunnel did not succeed");
        println!("tower-local: kubectl works through the tunnel");
        return Ok(());
    }
    tokio::signal::ctrl_c().await?;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = agent.await;
        let _ = server.await;
    })
    .await;
    Ok(())
}

/// Runs `kubectl version` through the tunnel until it succeeds (the agent needs a moment).
async fn check(kubeconfig: &std::path::Path) -> bool {
    for _ in 0..100 {
        let out = tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["version", "-o", "json", "--request-timeout=5s"])
            .output()
            .await;
        match out {
            Ok(out) if out.status.success() => {
                print!("{}", String::from_utf8_lossy(&out.stdout));
                return true;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => {
                eprintln!("tower-local: cannot run kubectl: {e}");
                return false;
            }
        }
    }
    false
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn tracing_subscriber_init() {
    // The libraries log through `tracing`; show their info lines on stderr.
    let filter = std::env::var("TOWER_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}
