//! The agent's flags and their validation into a [`Config`], shared by the binary and by
//! tools that embed the agent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use tower_auth::{Secret, Verifier};
use tower_proto::names::validate_cluster_name;
use tower_tunnel::control::Keepalive;
use tower_tunnel::dial::{DialConfig, ProxyUrl, ServerAddress};
use tower_tunnel::tls::{self, CaTrust};

use crate::upstream::{TokenFile, Upstream};
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
    /// File holding the agent token; read again before every dial, so a token rotated in
    /// its Secret is used without a restart.
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
    /// Kubeconfig for the member's kube-apiserver (else in-cluster config:
    /// KUBERNETES_SERVICE_HOST/PORT and the ServiceAccount's token and ca.crt).
    #[arg(long, env = "TOWER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// In-cluster mode (no --kubeconfig): the directory holding the ServiceAccount's
    /// `token` and `ca.crt` [default: /var/run/secrets/kubernetes.io/serviceaccount].
    /// Only for tests and unusual mounts: pods get the default path.
    #[arg(long, env = "TOWER_SERVICE_ACCOUNT_DIR", value_name = "DIR")]
    pub service_account_dir: Option<PathBuf>,
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
    // A token file is read again before every dial (Kubernetes updates a mounted Secret in
    // place), so it is checked with no interval.
    let token_file = cli
        .token_file
        .as_ref()
        .filter(|_| cli.token.is_none())
        .map(|path| {
            TokenFile::new(path.clone(), Duration::ZERO)
                .map_err(|e| format!("reading --token-file {}: {e}", path.display()))
        })
        .transpose()?;
    let token = match (&cli.token, &token_file) {
        (Some(token), _) => token.trim().to_owned(),
        (None, Some(file)) => file.token(),
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
        None => ProxyUrl::from_env(&address.host, address.port)?,
    };
    if cli.kubeconfig.is_some() && cli.service_account_dir.is_some() {
        return Err(
            "--service-account-dir is for in-cluster mode: it cannot be combined with --kubeconfig"
                .into(),
        );
    }
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
        None => in_cluster_config(
            cli.kubernetes_service.is_none().then(|| {
                (
                    std::env::var(SERVICE_HOST_ENV).ok(),
                    std::env::var(SERVICE_PORT_ENV).ok(),
                )
            }),
            cli.service_account_dir
                .as_deref()
                .unwrap_or(Path::new(DEFAULT_SERVICE_ACCOUNT_DIR)),
        )?,
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
    let keepalive = Keepalive::from_flag(cli.keepalive)?;
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
        token_file,
        verifier,
        targets,
        metrics: Default::default(),
        keepalive,
        shutdown_grace: cli.shutdown_grace,
        backoff: Backoff {
            max: cli.reconnect_max.max(Duration::from_millis(100)),
            ..Backoff::default()
        },
    })
}

/// Where Kubernetes mounts a pod's ServiceAccount credentials.
pub const DEFAULT_SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The kube-apiserver's host, as Kubernetes sets it in every pod.
const SERVICE_HOST_ENV: &str = "KUBERNETES_SERVICE_HOST";
/// The kube-apiserver's port, as Kubernetes sets it in every pod.
const SERVICE_PORT_ENV: &str = "KUBERNETES_SERVICE_PORT";

/// The in-cluster configuration: the kube-apiserver at `service` (the values of
/// `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`; `None` when
/// `--kubernetes-service` gives the address instead), trusted with `dir/ca.crt` (re-read
/// when it rotates) and called with `dir/token` (re-read when it rotates). The error
/// names what is missing.
fn in_cluster_config(
    service: Option<(Option<String>, Option<String>)>,
    dir: &Path,
) -> Result<kube::Config, String> {
    let url = match service {
        Some((host, port)) => in_cluster_url(host, port)?,
        // Replaced by --kubernetes-service; the TLS name comes from there too.
        None => http::Uri::from_static("https://kubernetes.default.svc"),
    };
    let token = dir.join("token");
    let ca = dir.join("ca.crt");
    let no_file = |what: &str, path: &Path, e: &dyn std::fmt::Display| {
        format!(
            "no --kubeconfig, and the in-cluster ServiceAccount {what} {} cannot be read: {e} \
             (mount the ServiceAccount token, or set --service-account-dir or --kubeconfig)",
            path.display()
        )
    };
    match std::fs::read_to_string(&token) {
        Ok(t) if t.trim().is_empty() => {
            return Err(no_file("token", &token, &"the file is empty"));
        }
        Ok(_) => {}
        Err(e) => return Err(no_file("token", &token, &e)),
    }
    let pem = std::fs::read(&ca).map_err(|e| no_file("CA certificate", &ca, &e))?;
    let certs = tls::certs_from_pem(&pem).map_err(|e| no_file("CA certificate", &ca, &e))?;
    let mut config = kube::Config::new(url);
    config.root_cert = Some(certs.iter().map(|c| c.to_vec()).collect());
    // kube re-reads this file to follow a CA rotation, as it does in-cluster.
    config.root_cert_file = Some(ca);
    config.auth_info.token_file = Some(token.to_string_lossy().into_owned());
    Ok(config)
}

/// `https://HOST:PORT` from `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`, an
/// IPv6 host in brackets.
fn in_cluster_url(host: Option<String>, port: Option<String>) -> Result<http::Uri, String> {
    let host = host.filter(|h| !h.trim().is_empty());
    let port = port.filter(|p| !p.trim().is_empty());
    let (host, port) = match (host, port) {
        (Some(host), Some(port)) => (host, port),
        (host, port) => {
            let missing: Vec<&str> = [
                (host.is_none(), SERVICE_HOST_ENV),
                (port.is_none(), SERVICE_PORT_ENV),
            ]
            .into_iter()
            .filter_map(|(missing, name)| missing.then_some(name))
            .collect();
            return Err(format!(
                "no --kubeconfig, and not running in a cluster: {} {} not set \
                 (set --kubeconfig, or --kubernetes-service HOST:PORT)",
                missing.join(" and "),
                if missing.len() == 1 { "is" } else { "are" }
            ));
        }
    };
    let (host, port) = (host.trim(), port.trim());
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{SERVICE_PORT_ENV}={port:?} is not a port number"))?;
    let host = match host.parse::<std::net::Ipv6Addr>() {
        Ok(v6) => format!("[{v6}]"),
        Err(_) => host.to_owned(),
    };
    format!("https://{host}:{port}")
        .parse()
        .map_err(|e| format!("{SERVICE_HOST_ENV}={host:?}: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    #[test]
    fn the_in_cluster_address_comes_from_the_service_environment() {
        let url = |h: &str, p: &str| in_cluster_url(some(h), some(p)).map(|u| u.to_string());
        assert_eq!(url("10.96.0.1", "443").unwrap(), "https://10.96.0.1:443/");
        assert_eq!(url("fd00::1", "6443").unwrap(), "https://[fd00::1]:6443/");
        assert_eq!(url("[fd00::1]", "6443").unwrap(), "https://[fd00::1]:6443/");
        assert_eq!(
            url("kubernetes.default.svc", "443").unwrap(),
            "https://kubernetes.default.svc:443/"
        );
        assert!(
            url("10.96.0.1", "https")
                .unwrap_err()
                .contains("KUBERNETES_SERVICE_PORT=\"https\" is not a port number")
        );
        let neither = in_cluster_url(None, None).unwrap_err();
        assert!(
            neither.contains("KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set"),
            "{neither}"
        );
        let no_port = in_cluster_url(some("10.96.0.1"), some("")).unwrap_err();
        assert!(
            no_port.contains(" KUBERNETES_SERVICE_PORT is not set"),
            "{no_port}"
        );
        assert!(!no_port.contains(SERVICE_HOST_ENV), "{no_port}");
    }

    #[test]
    fn the_in_cluster_credentials_come_from_the_service_account_directory() {
        let dir = std::env::temp_dir().join(format!("tower-sa-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let env = || Some((some("127.0.0.1"), some("6443")));
        let missing = in_cluster_config(env(), &dir).unwrap_err();
        assert!(
            missing.contains("ServiceAccount token")
                && missing.contains(&dir.join("token").display().to_string()),
            "{missing}"
        );
        std::fs::write(dir.join("token"), "sa-token\n").unwrap();
        let no_ca = in_cluster_config(env(), &dir).unwrap_err();
        assert!(
            no_ca.contains("CA certificate")
                && no_ca.contains(&dir.join("ca.crt").display().to_string()),
            "{no_ca}"
        );
        std::fs::write(dir.join("ca.crt"), "not a certificate").unwrap();
        assert!(
            in_cluster_config(env(), &dir)
                .unwrap_err()
                .contains("CA certificate")
        );

        let pki = tls::GeneratedPki::generate("member-ca", &["127.0.0.1".into()]).unwrap();
        std::fs::write(dir.join("ca.crt"), &pki.ca_cert_pem).unwrap();
        let config = in_cluster_config(env(), &dir).unwrap();
        assert_eq!(config.cluster_url.to_string(), "https://127.0.0.1:6443/");
        assert_eq!(config.root_cert.as_ref().map(Vec::len), Some(1));
        assert_eq!(
            config.root_cert_file.as_deref(),
            Some(dir.join("ca.crt").as_path())
        );
        assert_eq!(
            config.auth_info.token_file.as_deref(),
            Some(dir.join("token").to_str().unwrap())
        );
        // The kubernetes upstream then reads the token from that file.
        let upstream = Upstream::kubernetes(&config, None, 0).unwrap();
        match upstream.credentials {
            Some(crate::upstream::Credentials::TokenFile(file)) => {
                assert_eq!(file.token(), "sa-token");
            }
            other => panic!("{other:?}"),
        }
        // With --kubernetes-service, the service environment is not needed.
        assert!(in_cluster_config(None, &dir).is_ok());

        std::fs::write(dir.join("token"), "").unwrap();
        assert!(
            in_cluster_config(env(), &dir)
                .unwrap_err()
                .contains("the file is empty")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
