//! `tower-server`: parse flags, build a validated [`tower_server::Config`], run, drain on
//! SIGTERM. Exit codes: 0 ok, 2 bad usage or configuration, 1 runtime failure.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tower_server::Listeners;
use tower_server::cli::{ServeArgs, build_config};
use tower_server::commands::agent_manifest::{AgentManifestArgs, agent_manifest};
use tower_server::commands::clusters::{ClustersArgs, clusters};
use tower_server::commands::kubeconfig::{KubeconfigArgs, kubeconfig};
use tower_server::commands::tokens::{TokenArgs, UserTokenArgs, token, user_token};
use tower_telemetry::LogArgs;

#[derive(Parser)]
#[command(
    name = "tower-server",
    version,
    about = "Tower's host side: accepts agent tunnels and proxies the Kubernetes API through them"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// `--log-format`, accepted before or after the subcommand.
    #[command(flatten)]
    log: LogArgs,
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
    /// Print a member cluster's agent.yaml (kubectl create -f it on the member).
    AgentManifest(Box<AgentManifestArgs>),
    /// Print what a running server sees: a table of clusters.
    Clusters(ClustersArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = tower_telemetry::init(cli.log.log_format) {
        eprintln!("tower-server: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Serve(args) => return serve(*args),
        Command::Token(args) => token(args),
        Command::UserToken(args) => user_token(args),
        Command::Kubeconfig(args) => kubeconfig(args),
        Command::AgentManifest(args) => block_on(agent_manifest(*args)),
        Command::Clusters(args) => {
            // The server being unreachable is a runtime failure (1), not bad usage (2).
            return match block_on(clusters(args)) {
                Ok(table) => {
                    print!("{table}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tower-server: {e}");
                    ExitCode::from(1)
                }
            };
        }
    };
    match result {
        Ok(out) => {
            println!("{}", out.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tower-server: {e}");
            ExitCode::from(2)
        }
    }
}

fn block_on<T>(future: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?
        .block_on(future)
}

fn serve(args: ServeArgs) -> ExitCode {
    // Every connection is a file descriptor: take all the process may have before the
    // connection limits are sized below it.
    match tower_server::connections::raise_open_file_limit() {
        Ok((before, after)) if before != after => {
            tracing::info!(
                ?before,
                ?after,
                "raised the open-file limit to its hard limit"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let config = match build_config(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("tower-server: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tower_tunnel::runtime::build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tower-server: starting the runtime: {e}");
            // A bad TOKIO_WORKER_THREADS is configuration (2); tokio failing, a runtime failure.
            let bad_setting = e.kind() == std::io::ErrorKind::InvalidInput;
            return ExitCode::from(if bad_setting { 2 } else { 1 });
        }
    };
    runtime.block_on(async move {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            tower_server::listen(addr)
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
        let shutdown = CancellationToken::new();
        if let Err(e) = tower_tunnel::shutdown::cancel_on_signal(shutdown.clone()) {
            eprintln!("tower-server: installing the signal handlers: {e}");
            return ExitCode::from(1);
        }
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
            open_files = ?tower_server::connections::open_file_limit(),
            max_connections = ?config.limits.connections,
            "tower-server listening"
        );
        match tower_server::run(config, listeners, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tower-server: {e}");
                ExitCode::from(1)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use clap::CommandFactory;

    /// DESIGN §8: every flag has an env var, named TOWER_ and the flag (a repeated flag's
    /// takes the plural, comma-separated).
    #[test]
    fn every_flag_of_every_subcommand_has_its_env_var() {
        let cli = Cli::command();
        let mut checked = 0;
        // The root command too: its global flags (--log-format) work with every subcommand.
        for sub in std::iter::once(&cli).chain(cli.get_subcommands()) {
            for arg in sub.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if matches!(long, "help" | "version") {
                    continue;
                }
                let env = arg
                    .get_env()
                    .unwrap_or_else(|| panic!("{} --{long} has no env var", sub.get_name()));
                let mut expected = format!("TOWER_{}", long.replace('-', "_").to_uppercase());
                if matches!(arg.get_action(), clap::ArgAction::Append) {
                    expected.push('S');
                }
                // The same setting as serve's --agent-image, under the same variable.
                if (sub.get_name(), long) == ("agent-manifest", "image") {
                    expected = "TOWER_AGENT_IMAGE".into();
                }
                assert_eq!(
                    env.to_str(),
                    Some(expected.as_str()),
                    "{} --{long}",
                    sub.get_name()
                );
                checked += 1;
            }
        }
        assert!(checked > 40, "{checked} flags checked");
        assert!(
            cli.get_arguments()
                .any(|a| a.get_long() == Some("log-format") && a.is_global_set()),
            "--log-format is a global flag"
        );
    }
}
