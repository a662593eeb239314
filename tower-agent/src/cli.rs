//! The agent's flags and their validation into a [`Config`], shared by the binary and by
//! tools that embed the agent.
//!
//! KubeSphere's old agent's flags, and what tower-agent makes of them, are in `old_agent`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tower_auth::{AgentClaims, Secret};
use tower_proto::names::validate_cluster_name;
use tower_tunnel::control::Keepalive;
use tower_tunnel::dial::{DialConfig, ProxyUrl, ServerAddress};
use tower_tunnel::tls::{self, CaTrust};

use crate::identity::{IdentityKeys, KeySource, PLATFORM_CONFIGMAPS};
use crate::upstream::{TokenFile, Upstream};
use crate::{Backoff, Config};

mod old_agent;

pub use old_agent::OldAgentFlags;
use old_agent::old_agent_flags;

/// The agent's flags (a public contract: existing agent.yaml files use them, and so does
/// the agent Deployment that KubeSphere's console renders for its own agent, started as
/// `/agent --name= --token= --proxy-server= --keepalive=10s --kubesphere-service=
/// --kubernetes-service= --v=0`: every one of those is accepted here).
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
    /// CA certificate (PEM) that signed the server's certificate [default: the CA the
    /// agent token pins].
    #[arg(long, env = "TOWER_CA_FILE", conflicts_with = "ca_hash")]
    pub ca_file: Option<PathBuf>,
    /// Pin of the server's CA: sha256:HEX of its SubjectPublicKeyInfo or certificate
    /// [default: the pin in the agent token].
    #[arg(long, env = "TOWER_CA_HASH")]
    pub ca_hash: Option<String>,
    /// Dial even though neither a flag nor the agent token names a CA: the server's
    /// certificate is then not checked, and anyone on the path can read every request.
    /// Ignored, with a warning, when the agent token pins a CA.
    #[arg(long, env = "TOWER_INSECURE_SKIP_TLS_VERIFY", conflicts_with_all = ["ca_file", "ca_hash"])]
    pub insecure_skip_tls_verify: bool,
    /// Kubeconfig for the member's kube-apiserver (else in-cluster config:
    /// KUBERNETES_SERVICE_HOST/PORT and the ServiceAccount's token and ca.crt).
    #[arg(long, env = "TOWER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// In-cluster mode (no --kubeconfig): the directory holding the ServiceAccount's
    /// `token` and `ca.crt` [default: /var/run/secrets/kubernetes.io/serviceaccount].
    /// Only for tests and unusual mounts: pods get the default path.
    #[arg(long, env = "TOWER_SERVICE_ACCOUNT_DIR", value_name = "DIR")]
    pub service_account_dir: Option<PathBuf>,
    /// This cluster's key (what Tower's agent.yaml mounts), to check the server's
    /// identity assertions: who each caller is.
    #[arg(long, env = "TOWER_CLUSTER_KEY_FILE", conflicts_with_all = ["jwt_secret_file", "jwt_secret"])]
    pub cluster_key_file: Option<PathBuf>,
    /// A jwtSecret shared with the host, to derive this cluster's key from.
    #[arg(long, env = "TOWER_JWT_SECRET_FILE", conflicts_with = "jwt_secret")]
    pub jwt_secret_file: Option<PathBuf>,
    /// The jwtSecret itself (prefer a file).
    #[arg(long, env = "TOWER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Without a key or a jwtSecret: the KubeSphere configuration ConfigMap to read the
    /// member's jwtSecret from (key kubesphere.yaml, authentication.jwtSecret), as
    /// [NAMESPACE/]NAME [default: the first found of ke-config and kubesphere-config in
    /// the agent's namespace, ke-system/ke-config, kubesphere-system/kubesphere-config].
    #[arg(long, env = "TOWER_PLATFORM_CONFIG", value_name = "[NAMESPACE/]NAME")]
    pub platform_config: Option<String>,
    /// Keepalive ping interval (a pong may take as long again); a Go duration (`10s`,
    /// `1m30s`, `1.5h`) or a humantime one (`10 s`).
    #[arg(long, env = "TOWER_KEEPALIVE", default_value = "10s", value_parser = parse_duration)]
    pub keepalive: Duration,
    /// Log verbosity as klog's --v (KubeSphere's agent Deployment passes --v=0): 0-1
    /// info, 2-3 Tower's debug lines, 4-5 all debug, 6+ trace. TOWER_LOG, when set, wins.
    #[arg(long = "v", value_name = "N", env = "TOWER_V")]
    pub verbosity: Option<u8>,
    /// KubeSphere's old agent's other flags: refused with what to use instead, or, where
    /// tower-agent already does what they ask, accepted with a line saying so.
    #[command(flatten)]
    pub old_agent: OldAgentFlags,
    /// Serve /healthz and /readyz here.
    #[arg(long, env = "TOWER_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// The kube-apiserver's HOST:PORT, overriding the kubeconfig's address, or the
    /// in-cluster address when not in a pod. In a pod (KUBERNETES_SERVICE_HOST and _PORT
    /// set) the pod's own address wins, as it did for KubeSphere's agent.
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
    #[arg(long, env = "TOWER_RECONNECT_MAX", default_value = "30s", value_parser = parse_duration)]
    pub reconnect_max: Duration,
    /// On SIGTERM, how long requests in flight get to finish (watches end at once,
    /// cleanly); keep it below the pod's terminationGracePeriodSeconds (30s default).
    #[arg(long, env = "TOWER_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
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
    for (flag, why) in old_agent_flags(&cli.old_agent)? {
        tracing::info!(flag = %flag, "{why}");
    }
    // The token is the agent's own: its claims are read (its cluster, the CA it pins),
    // not verified; the server verifies it.
    let claims = AgentClaims::read_unverified(&token).map_err(|e| {
        format!(
            "agent token: {e} (a hex token is one of KubeSphere's old tower: Tower writes a \
             new token into the Cluster's spec.connection.token; copy the agent Deployment \
             or agent.yaml again)"
        )
    })?;
    if claims.sub != cli.name {
        return Err(format!(
            "--name {:?} does not match the token, which is for cluster {:?}",
            cli.name, claims.sub
        ));
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
        let trust = match (&cli.ca_file, &cli.ca_hash, &claims.ca) {
            (Some(path), _, _) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("reading --ca-file {}: {e}", path.display()))?;
                CaTrust::Certificates(
                    tls::certs_from_pem(&pem).map_err(|e| format!("--ca-file: {e}"))?,
                )
            }
            (None, Some(pin), _) => {
                CaTrust::parse_pin(pin).map_err(|e| format!("--ca-hash: {e}"))?
            }
            (None, None, Some(pin)) => {
                if cli.insecure_skip_tls_verify {
                    // The token says whom to trust: the flag, which is for a token that
                    // does not, must not turn that check off.
                    tracing::warn!(
                        ca_pin = %pin,
                        "--insecure-skip-tls-verify is ignored: the agent token pins the server's CA, and the server is checked against that pin"
                    );
                }
                CaTrust::parse_pin(pin)
                    .map_err(|e| format!("the agent token's CA pin (claim ca): {e}"))?
            }
            (None, None, None) if cli.insecure_skip_tls_verify => {
                tracing::warn!(
                    "--insecure-skip-tls-verify: the agent token pins no CA and no --ca-file or --ca-hash is given, so the server's certificate is not checked: anyone on the path can read every request"
                );
                CaTrust::InsecureAnyServer
            }
            (None, None, None) => {
                return Err(
                    "no CA to trust: the agent token pins none (it was minted without \
                     one), and neither --ca-file nor --ca-hash is given. Mint a token that \
                     pins the Tower CA (tower-server token --ca-cert, or let tower write \
                     the Cluster's token), give --ca-hash, or, knowing that anyone on the \
                     path could then read every request, --insecure-skip-tls-verify"
                        .into(),
                );
            }
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
    let service_account_dir = cli
        .service_account_dir
        .as_deref()
        .unwrap_or(Path::new(DEFAULT_SERVICE_ACCOUNT_DIR));
    let service_env = (
        std::env::var(SERVICE_HOST_ENV).ok(),
        std::env::var(SERVICE_PORT_ENV).ok(),
    );
    let set = |v: &Option<String>| v.as_deref().is_some_and(|v| !v.trim().is_empty());
    let in_pod = cli.kubeconfig.is_none() && set(&service_env.0) && set(&service_env.1);
    // In a pod, the pod's own API server address wins, as it did for KubeSphere's agent
    // (whose Deployment passes --kubernetes-service=kubernetes.default.svc:443 anyway).
    let kubernetes_service = cli.kubernetes_service.as_deref().filter(|_| !in_pod);
    if in_pod && cli.kubernetes_service.is_some() {
        tracing::info!(
            "in a pod: calling the API server at KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT, not --kubernetes-service"
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
            kubernetes_service.is_none().then_some(service_env),
            service_account_dir,
        )?,
    };

    let mut targets = HashMap::new();
    targets.insert(
        tower_proto::preamble::KUBERNETES_TARGET.to_owned(),
        Upstream::kubernetes(
            &kube_config,
            kubernetes_service,
            cli.upstream_streams_per_connection,
        )?,
    );
    if let Some(address) = &cli.kubesphere_service {
        targets.insert("kubesphere".to_owned(), Upstream::named(address)?);
    }
    let mut target_names: Vec<String> = targets.keys().cloned().collect();
    target_names.sort();
    let keepalive = Keepalive::from_flag(cli.keepalive)?;
    // The namespace the pod runs in, as Kubernetes mounts it beside the token.
    let namespace_file = service_account_dir.join("namespace");
    let own_namespace = std::fs::read_to_string(&namespace_file)
        .ok()
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty());
    let key_source = key_source(cli, own_namespace.as_deref(), &namespace_file, || {
        // The agent's own calls (reading its key) say what made them, for the member's
        // audit log; what it relays keeps its caller's User-Agent.
        let mut own = kube_config.clone();
        own.headers.push((
            http::header::USER_AGENT,
            http::HeaderValue::from_static(concat!("tower-agent/", env!("CARGO_PKG_VERSION"))),
        ));
        kube::Client::try_from(own)
            .map_err(|e| format!("a client for the member's API server: {e}"))
    })?;
    let key = key_source.read(&cli.name).await;
    match (&key_source, &key) {
        // A file or a secret given on the command line that cannot be read is a mistake
        // in the agent's configuration: said at once.
        (KeySource::PlatformConfig { .. }, _) | (_, Ok(_)) => {}
        (_, Err(e)) => return Err(e.clone()),
    }
    if let Err(e) = &key {
        tracing::error!(error = %e, "no identity key: connecting, but refusing every request with 503 until there is one");
    }
    let identity = Arc::new(IdentityKeys::new(&cli.name, key));
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
        renewed_token: crate::RenewedToken::default(),
        identity,
        key_source,
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

/// Where the key that checks the server's identity assertions comes from: the first of
/// --cluster-key-file, --jwt-secret-file, TOWER_JWT_SECRET, else the member's KubeSphere
/// configuration ([`platform_config_candidates`]), read with a client `client` builds.
/// The namespace the agent runs in is `own_namespace` (read from `namespace_file`).
fn key_source(
    cli: &Cli,
    own_namespace: Option<&str>,
    namespace_file: &Path,
    client: impl FnOnce() -> Result<kube::Client, String>,
) -> Result<KeySource, String> {
    if let Some(path) = &cli.cluster_key_file {
        return Ok(KeySource::ClusterKeyFile(path.clone()));
    }
    if let Some(path) = &cli.jwt_secret_file {
        if let Some(given) = &cli.platform_config {
            tracing::info!(platform_config = %given, "--jwt-secret-file gives the jwtSecret: --platform-config is not read");
        }
        return Ok(KeySource::JwtSecretFile(path.clone()));
    }
    if let Some(secret) = &cli.jwt_secret {
        return Secret::new(secret)
            .map(KeySource::JwtSecret)
            .ok_or_else(|| "TOWER_JWT_SECRET is empty".into());
    }
    let candidates = platform_config_candidates(
        cli.platform_config.as_deref(),
        own_namespace,
        namespace_file,
    )?;
    Ok(KeySource::PlatformConfig {
        client: client()?,
        candidates,
    })
}

/// The ConfigMaps (namespace, name) the member's jwtSecret is looked for in, in order (the
/// first that exists is read: [`KeySource::read`]): `--platform-config` alone when given
/// (`NAMESPACE/NAME`, or `NAME` in the agent's own namespace), else `ke-config` then
/// `kubesphere-config` in the agent's own namespace (when known), then
/// `ke-system/ke-config` (Kuberix Enterprise's) and `kubesphere-system/kubesphere-config`
/// (KubeSphere's), each once.
fn platform_config_candidates(
    given: Option<&str>,
    own_namespace: Option<&str>,
    namespace_file: &Path,
) -> Result<Vec<(String, String)>, String> {
    if let Some(given) = given {
        return match (given.split_once('/'), own_namespace) {
            (Some((namespace, name)), _) => Ok(vec![(namespace.to_owned(), name.to_owned())]),
            (None, Some(own)) => Ok(vec![(own.to_owned(), given.to_owned())]),
            (None, None) => Err(format!(
                "--platform-config {given:?} names no namespace, and the agent's own \
                 ({}) cannot be read: give NAMESPACE/NAME",
                namespace_file.display()
            )),
        };
    }
    let mut candidates: Vec<(String, String)> = own_namespace
        .iter()
        .flat_map(|ns| {
            PLATFORM_CONFIGMAPS
                .iter()
                .map(|n| ((*ns).to_owned(), (*n).to_owned()))
        })
        .collect();
    for fallback in [
        ("ke-system", "ke-config"),
        ("kubesphere-system", "kubesphere-config"),
    ] {
        let fallback = (fallback.0.to_owned(), fallback.1.to_owned());
        if !candidates.contains(&fallback) {
            candidates.push(fallback);
        }
    }
    Ok(candidates)
}

/// A duration as Go writes it (`10s`, `1m30s`, `1.5h`, `300ms`, `2us`; the `--keepalive`
/// of KubeSphere's agent Deployment) or as humantime does (`10 s`, `2min`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    parse_go_duration(text.trim())
        .or_else(|| humantime::parse_duration(text).ok())
        .ok_or_else(|| format!("{text:?} is not a duration (e.g. 10s, 1m30s, 500ms)"))
}

/// Go's `time.ParseDuration`, for non-negative durations: decimal numbers, each with a
/// unit (ns, us, µs, ms, s, m, h); `0` alone is zero.
fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * nanos_per_unit;
    }
    (total.is_finite() && total < u64::MAX as f64).then(|| Duration::from_nanos(total as u64))
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

    /// The agent's flags as parsed from `args` after the required ones.
    fn cli(args: &[&str]) -> Cli {
        let mut argv = vec![
            "tower-agent",
            "--name=c1",
            "--token=t",
            "--proxy-server=https://tower:8080",
        ];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap()
    }

    fn no_client() -> Result<kube::Client, String> {
        Err("would read the platform ConfigMap".into())
    }

    #[test]
    fn a_key_or_jwt_secret_file_wins_over_the_platform_config() {
        let file = Path::new("/sa/namespace");
        let given = |args: &[&str]| {
            key_source(&cli(args), Some("kubesphere-system"), file, || {
                panic!("a key given as a flag builds no client")
            })
            .unwrap()
            .describe()
        };
        assert_eq!(
            given(&[
                "--jwt-secret-file=/etc/jwt",
                "--platform-config=kubesphere-system/kubesphere-config"
            ]),
            "--jwt-secret-file /etc/jwt"
        );
        assert_eq!(
            given(&["--jwt-secret-file=/etc/jwt"]),
            "--jwt-secret-file /etc/jwt"
        );
        assert_eq!(
            given(&["--cluster-key-file=/etc/key", "--platform-config=x/y"]),
            "--cluster-key-file /etc/key"
        );
        // Without one, the member's configuration, in the agent's own namespace first.
        let error = key_source(&cli(&[]), Some("kubesphere-system"), file, no_client).unwrap_err();
        assert_eq!(error, "would read the platform ConfigMap");
    }

    #[test]
    fn the_platform_config_is_looked_for_in_the_agents_namespace_then_the_platforms() {
        let file = Path::new("/sa/namespace");
        let names = |given: Option<&str>, own: Option<&str>| {
            platform_config_candidates(given, own, file).map(|c| {
                c.into_iter()
                    .map(|(ns, name)| format!("{ns}/{name}"))
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            names(None, Some("my-ns")).unwrap(),
            [
                "my-ns/ke-config",
                "my-ns/kubesphere-config",
                "ke-system/ke-config",
                "kubesphere-system/kubesphere-config"
            ]
        );
        // The console's Deployment runs in kubesphere-system: each ConfigMap once.
        assert_eq!(
            names(None, Some("kubesphere-system")).unwrap(),
            [
                "kubesphere-system/ke-config",
                "kubesphere-system/kubesphere-config",
                "ke-system/ke-config"
            ]
        );
        assert_eq!(
            names(None, None).unwrap(),
            ["ke-system/ke-config", "kubesphere-system/kubesphere-config"]
        );
        // --platform-config alone when given.
        assert_eq!(
            names(Some("ops/platform"), Some("my-ns")).unwrap(),
            ["ops/platform"]
        );
        assert_eq!(
            names(Some("platform"), Some("my-ns")).unwrap(),
            ["my-ns/platform"]
        );
        let error = names(Some("platform"), None).unwrap_err();
        assert!(
            error.contains("names no namespace") && error.contains("/sa/namespace"),
            "{error}"
        );
    }

    #[test]
    fn the_old_agents_klog_flags_are_refused_with_what_to_use_or_accepted_with_a_note() {
        let judged = |args: &[&str]| old_agent_flags(&cli(args).old_agent);
        for (args, says) in [
            (&["--log-dir=/var/log/agent"][..], "writes no log files"),
            (
                &["--log-dir", "/var/log/agent"][..],
                "--log-dir=/var/log/agent",
            ),
            (
                &["--log-file=/var/log/agent.log"][..],
                "writes no log files",
            ),
            (&["--log-file-max-size=100"][..], "writes no log files"),
            (&["--logtostderr=false"][..], "writes no log files"),
            (&["--one-output"][..], "writes no log files"),
            (&["--skip-log-headers=true"][..], "writes no log files"),
            (&["--skip-headers"][..], "--log-format"),
            (&["--add-dir-header=1"][..], "--log-format"),
            (&["--vmodule=agent=4"][..], "TOWER_LOG"),
            (&["--log-backtrace-at=agent.go:10"][..], "TOWER_LOG"),
            (&["--logtostderr=maybe"][..], "not a boolean"),
            (&["--max-retry=5"][..], "dials again for ever"),
            (&["--max-retry-interval=5m"][..], "--reconnect-max"),
        ] {
            let error = judged(args).unwrap_err();
            assert!(error.contains(says), "{args:?}: {error}");
            if !args[0].starts_with("--max-retry") && !error.contains("not a boolean") {
                assert!(error.contains("one of klog's flags"), "{args:?}: {error}");
            }
        }
        // What tower-agent does anyway: accepted, each with a line saying so.
        let accepted = judged(&[
            "--logtostderr",
            "--alsologtostderr=true",
            "--stderrthreshold=INFO",
            "--skip-headers=false",
            "--v=2",
        ])
        .unwrap();
        let flags: Vec<&str> = accepted.iter().map(|(flag, _)| flag.as_str()).collect();
        assert_eq!(
            flags,
            [
                "--skip-headers",
                "--logtostderr",
                "--alsologtostderr",
                "--stderrthreshold"
            ]
        );
        assert!(accepted[1].1.contains("logs to standard error anyway"));
        assert!(judged(&[]).unwrap().is_empty());
        // --log-flush-frequency is component-base's, never the old agent's: clap's error.
        let mut argv = vec!["tower-agent", "--name=c1", "--token=t", "--proxy-server=x"];
        argv.push("--log-flush-frequency=5s");
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[test]
    fn durations_read_as_go_writes_them_and_as_humantime_does() {
        let ok = |t: &str| parse_duration(t).unwrap();
        assert_eq!(ok("10s"), Duration::from_secs(10));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("1h0m0s"), Duration::from_secs(3600));
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("2us"), Duration::from_micros(2));
        assert_eq!(ok("2µs"), Duration::from_micros(2));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("10 s"), Duration::from_secs(10));
        assert_eq!(ok("2min"), Duration::from_secs(120));
        for bad in ["", "10", "-1s", "1d2x", "s", "1..5s", "ten seconds"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("is not a duration"), "{bad:?}: {e}");
        }
    }
}
