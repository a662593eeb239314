//! `tower-agent`: parse flags, build a validated [`tower_agent::Config`], run until
//! SIGTERM. Exit codes: 0 ok, 2 bad usage or configuration, 1 runtime failure.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches};
use tokio_util::sync::CancellationToken;
use tower_agent::cli::{Cli, build_config};
use tower_telemetry::LogArgs;

/// The agent's flags ([`Cli`], shared with tools that embed the agent) plus the binary's
/// own `--log-format`; exits like `Cli::parse` (2 with clap's message) on bad usage.
fn parse() -> (Cli, LogArgs) {
    let mut command = LogArgs::augment_args(Cli::command());
    let mut matches = command.get_matches_mut();
    let parsed = Cli::from_arg_matches_mut(&mut matches)
        .and_then(|cli| Ok((cli, LogArgs::from_arg_matches_mut(&mut matches)?)));
    parsed.unwrap_or_else(|e| e.format(&mut command).exit())
}

fn main() -> ExitCode {
    let (cli, log) = parse();
    // KubeSphere's agent Deployment passes klog's --v; TOWER_LOG still wins.
    let default_filter = cli.verbosity.map_or_else(
        || tower_telemetry::DEFAULT_FILTER.to_owned(),
        tower_telemetry::klog_filter,
    );
    if let Err(e) = tower_telemetry::init_with_default(log.log_format, &default_filter) {
        eprintln!("tower-agent: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tower_tunnel::runtime::build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tower-agent: starting the runtime: {e}");
            // A bad TOKIO_WORKER_THREADS is configuration (2); tokio failing, a runtime failure.
            let bad_setting = e.kind() == std::io::ErrorKind::InvalidInput;
            return ExitCode::from(if bad_setting { 2 } else { 1 });
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
        let shutdown = CancellationToken::new();
        if let Err(e) = tower_tunnel::shutdown::cancel_on_signal(shutdown.clone()) {
            eprintln!("tower-agent: installing the signal handlers: {e}");
            return ExitCode::from(1);
        }
        println!("{}", serde_json::json!({ "admin": admin_addr }));
        match tower_agent::run(config, admin, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tower-agent: {e}");
                ExitCode::from(1)
            }
        }
    })
}
