//! The agent's flags and their validation into a [`Config`], shared by the binary and by
//! tools that embed the agent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tower_auth::{Secret, Verifier};
use tower_proto::names::validate_cluster_name;
use tower_tunnel::control::Keepalive;
use tower_tunnel::dial::{DialConfig, ProxyUrl, ServerAddress};
use tower_tunnel::tls::{self, CaTrust};

use crate::upstream::Upstream;
use crate::{Backoff, Config};

/// The agent's flags (a public contract: existing agent.yaml files use them).
#[derive(Parser, Debug)]
#[command(
    name = "tower-agent",
    version,
    about = "Tower's member side: dials out to tower-server and serves this cluster's API through the tunnel"
)]
pub struct Cli {
    /// This member cluster's name (must equal the token's subject).
    #[arg(long, env = "TOWER_NAME")]
    pub name: String,
    /// The agent token (JWT).
    #[arg(
        long,
        env = "TOWER_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file",
        required_unless_present = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the agent token.
    #[arg(long, env = "TOWER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The server's published tunnel address, e.g. https://139.198.120.120:8080
    #[arg(long, env = "TOWER_PROXY_SERVER")]
    pub proxy_server: String,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long, env = "TOWER_CA_FILE", conflicts_with = "ca_hash", required_unless_present_any = ["ca_hash", "insecure_plaintext_tunnel"])]
    pub ca_file: Option<PathBuf>,
    /// Pin of the server's CA: sha256:HEX of its SubjectPublicKeyInfo or certificate.
    #[arg(long, env = "TOWER_CA_HASH")]
    pub ca_hash: Option<String>,
    /// Kubeconfig for the member's kube-apiserver (else in-cluster config).
    #[arg(long, env = "TOWER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The jwtSecret shared with the host, to verify callers again here.
    #[arg(long, env = "TOWER_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// The jwtSecret itself (prefer the file).
    #[arg(long, env = "TOWER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Keepalive ping interval (a pong may take as long again).
    #[arg(long, env = "TOWER_KEEPALIVE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive: Duration,
    /// Serve /healthz and /readyz here.
    #[arg(long, env = "TOWER_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// The kube-apiserver's HOST:PORT, overriding the kubeconfig's or in-cluster address.
    #[arg(long, env = "TOWER_KUBERNETES_SERVICE")]
    pub kubernetes_service: Option<String>,
    /// Watches multiplexed on one HTTP/2 connection to the kube-apiserver before another
    /// connection is opened (keep it at or below the apiserver's
    /// --http2-max-streams-per-connection); 0 = HTTP/1.1 only, one connection per watch.
    #[arg(long, env = "TOWER_UPSTREAM_STREAMS_PER_CONNECTION", default_value_t = crate::upstream::DEFAULT_STREAMS_PER_CONNECTION)]
    pub upstream_streams_per_connection: usize,
    /// KubeSphere's API (HOST:PORT, plain HTTP inside the member): enables target `kubesphere`.
    #[arg(long, env = "TOWER_KUBESPHERE_SERVICE")]
    pub kubesphere_service: Option<String>,
    /// HTTP CONNECT proxy toward the server (else HTTPS_PROXY/NO_PROXY).
    #[arg(long, env = "TOWER_HTTPS_PROXY")]
    pub https_proxy: Option<String>,
    /// Largest reconnect delay.
    #[arg(long, env = "TOWER_RECONNECT_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
    pub reconnect_max: Duration,
    /// On SIGTERM, how long requests in flight get to finish (watches end at once,
    /// cleanly); keep it below the pod's terminationGracePeriodSeconds (30s default).
    #[arg(long, env = "TOWER_SHUTDOWN_GRACE", default_value = "20s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Dial without TLS: only when a load balancer in front of the server terminates TLS.
    #[arg(long, env = "TOWER_INSECURE_PLAINTEXT_TUNNEL")]
    pub insecure_plaintext_tunnel: bool,
}

/// Validates the flags into a [`Config`]; the error says which flag is wrong.
pub async fn build_config(cli: &Cli) -> Result<Config, String> {
    validate_cluster_name(&cli.name).map_err(|e| format!("--name: {e}"))?;
    let token = match (&cli.token, &cli.token_file) {
        (Some(token), _) => token.trim().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| format!("reading --token-file {}: {e}", path.display()))?
            .trim()
            .to_owned(),
        (None, None) => return Err("--token or --token-file is required".into()),
    };
    let secret_bytes = match (&cli.jwt_secret_file, &cli.jwt_secret) {
        (Some(path), _) => std::fs::read(path)
            .map_err(|e| format!("reading --jwt-secret-file {}: {e}", path.display()))?,
        (None, Some(secret)) => secret.clone().into_bytes(),
        (None, None) => {
            return Err("the jwtSecret is required to verify callers: --jwt-secret-file PATH or TOWER_JWT_SECRET".into());
        }
    };
    let secret = Secret::new(secret_bytes).ok_or("the jwtSecret is empty")?;
    let verifier = Verifier::new(&secret);
    // Catch a token for another cluster (or another secret) before dialing.
    match verifier.verify_agent(&token) {
        Ok(claims) if claims.sub != cli.name => {
            return Err(format!(
                "--name {:?} does not match the token, which is for cluster {:?}",
                cli.name, claims.sub
            ));
        }
        Ok(_) => {}
        Err(e) => return Err(format!("agent token refused: {e}")),
    }
    let address =
        ServerAddress::parse(&cli.proxy_server).map_err(|e| format!("--proxy-server: {e}"))?;
    let tls = if cli.insecure_plaintext_tunnel {
        tracing::warn!("--insecure-plaintext-tunnel: the tunnel is not encrypted by tower");
        None
    } else {
        if address.plaintext_scheme {
            tracing::info!(proxy_server = %cli.proxy_server, "the proxy address says http://; tower tunnels use TLS regardless");
        }
        let trust = match (&cli.ca_file, &cli.ca_hash) {
            (Some(path), _) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("reading --ca-file {}: {e}", path.display()))?;
                CaTrust::Certificates(
                    tls::certs_from_pem(&pem).map_err(|e| format!("--ca-file: {e}"))?,
                )
            }
            (None, Some(pin)) => CaTrust::parse_pin(pin).map_err(|e| format!("--ca-hash: {e}"))?,
            (None, None) => return Err("--ca-file or --ca-hash is required".into()),
        };
        Some(tls::client_config(&trust).map_err(|e| e.to_string())?)
    };
    let proxy = match &cli.https_proxy {
        Some(url) => Some(ProxyUrl::parse(url)?),
        None => ProxyUrl::from_env(&address.host)?,
    };
    let kube_config = match &cli.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("reading --kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|e| format!("--kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::incluster()
            .map_err(|e| format!("no --kubeconfig and not running in a cluster: {e}"))?,
    };
    let mut targets = HashMap::new();
    targets.insert(
        tower_proto::preamble::KUBERNETES_TARGET.to_owned(),
        Upstream::kubernetes(
            &kube_config,
            cli.kubernetes_service.as_deref(),
            cli.upstream_streams_per_connection,
        )?,
    );
    if let Some(address) = &cli.kubesphere_service {
        targets.insert("kubesphere".to_owned(), Upstream::named(address)?);
    }
    let mut target_names: Vec<String> = targets.keys().cloned().collect();
    target_names.sort();
    if cli.keepalive < Duration::from_millis(100) {
        return Err("--keepalive must be at least 100ms".into());
    }
    Ok(Config {
        dial: DialConfig {
            host: address.host,
            port: address.port,
            tls,
            proxy,
            token,
            cluster: cli.name.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            targets: target_names,
            timeout: Duration::from_secs(15),
        },
        verifier,
        targets,
        keepalive: Keepalive::new(cli.keepalive),
        shutdown_grace: cli.shutdown_grace,
        backoff: Backoff {
            max: cli.reconnect_max.max(Duration::from_millis(100)),
            ..Backoff::default()
        },
    })
}
