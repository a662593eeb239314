//! `kube-stand-in`: runs the stand-in kube-apiserver until SIGINT/SIGTERM.
//!
//! ```text
//! kube-stand-in --listen 127.0.0.1:0 --token TOKEN [--kubeconfig-out PATH] [--strict]
//! ```
//! prints `listening on https://127.0.0.1:PORT` on stdout once it serves. The token is the
//! admin (`system:masters`); without `--strict` every authenticated user is also
//! `cluster-admin` through the fixture binding `stand-in:authenticated-cluster-admin`.

#![forbid(unsafe_code)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tower_kube_stand_in::{KubeconfigAuth, StandIn};

/// A stand-in member kube-apiserver for Tower's tests and benchmarks.
#[derive(Debug, Parser)]
#[command(name = "kube-stand-in", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0", env = "KUBE_STAND_IN_LISTEN")]
    listen: SocketAddr,
    /// The bearer token callers must present (or use the client certificate).
    #[arg(long, env = "KUBE_STAND_IN_TOKEN")]
    token: String,
    /// Write a kubeconfig (token auth, CA inline) to this path.
    #[arg(long, env = "KUBE_STAND_IN_KUBECONFIG_OUT")]
    kubeconfig_out: Option<PathBuf>,
    /// Seed only the RBAC bootstrap policy, as a fresh cluster: without it, every
    /// authenticated user is cluster-admin (a test fixture binding).
    #[arg(long, env = "KUBE_STAND_IN_STRICT")]
    strict: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.token.is_empty() {
        eprintln!("error: --token must not be empty");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let stand_in = if args.strict {
        StandIn::start_strict(listener, args.token).await?
    } else {
        StandIn::start(listener, args.token).await?
    };
    if let Some(path) = &args.kubeconfig_out {
        std::fs::write(path, stand_in.kubeconfig_yaml(KubeconfigAuth::Token))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // Installed before the line that tells a parent it may signal us.
    let shutdown = shutdown_signal()?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {}", stand_in.url())?;
        stdout.flush()?;
    }
    shutdown.await;
    stand_in.shutdown();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), stand_in.wait_stopped()).await;
    Ok(())
}

/// Resolves at SIGTERM or SIGINT; both handlers are installed when this returns.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
