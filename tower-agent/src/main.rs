//! `tower-agent`: parse flags, build a validated [`tower_agent::Config`], run until
//! SIGTERM. Exit codes: 0 ok, 2 bad usage or configuration, 1 runtime failure.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tower_agent::cli::{Cli, build_config};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOWER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tower-agent: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let config = match build_config(&cli).await {
            Ok(config) => config,
            Err(e) => {
                eprintln!("tower-agent: {e}");
                return ExitCode::from(2);
            }
        };
        let admin = match cli.admin_addr {
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("tower-agent: binding --admin-addr {addr}: {e}");
                    return ExitCode::from(1);
                }
            },
            None => None,
        };
        let admin_addr = admin
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string());
        println!("{}", serde_json::json!({ "admin": admin_addr }));
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_to(shutdown.clone()));
        match tower_agent::run(config, admin, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tower-agent: {e}");
                ExitCode::from(1)
            }
        }
    })
}

async fn signal_to(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            shutdown.cancel();
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    shutdown.cancel();
}
