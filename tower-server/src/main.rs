//! `tower-server`: parse flags, build a validated [`tower_server::Config`], run, drain on
//! SIGTERM. Exit codes: 0 ok, 2 bad usage or configuration, 1 runtime failure.

#![forbid(unsafe_code)]

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
use tower_server::kubernetes;
use tower_server::manifest::{AgentManifest, normalize_publish_address};
use tower_server::registry::ClusterStatus;
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

#[derive(Args)]
struct AgentManifestArgs {
    /// The member cluster.
    #[arg(long, env = "TOWER_CLUSTER")]
    cluster: String,
    /// The address members dial, https://HOST:PORT (with --kubernetes, the `tower`
    /// Service's LoadBalancer ingress is used only when this is unset).
    #[arg(long, env = "TOWER_PROXY_PUBLISH_ADDRESS")]
    proxy_publish_address: Option<String>,
    #[command(flatten)]
    secret: SecretArgs,
    /// The CA agents trust (PEM); else the one in --state-dir.
    #[arg(long, env = "TOWER_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Where `serve` keeps its generated CA.
    #[arg(long, env = "TOWER_STATE_DIR", default_value = "/var/lib/tower")]
    state_dir: PathBuf,
    /// The agent token; else the Cluster's spec.connection.token (--kubernetes), else a
    /// freshly minted one.
    #[arg(long, env = "TOWER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The image holding /tower-agent.
    #[arg(long, env = "TOWER_AGENT_IMAGE")]
    image: Option<String>,
    /// Read the Cluster and the `tower` Service from Kubernetes.
    #[arg(long, env = "TOWER_KUBERNETES")]
    kubernetes: bool,
    /// Kubeconfig for --kubernetes (else in-cluster).
    #[arg(long, env = "TOWER_KUBECONFIG", requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of tower's own objects.
    #[arg(long, env = "TOWER_NAMESPACE", default_value = "ke-system")]
    namespace: String,
    /// With --kubernetes and no --proxy-publish-address, the platform config's
    /// multicluster.proxyPublishAddress is used.
    #[command(flatten)]
    platform: tower_server::cli::PlatformArgs,
    /// Let the agent impersonate only these users on the member (repeat, or a
    /// comma-separated list); without it, any user and group (cluster-admin equivalent).
    #[arg(
        long = "impersonate-user",
        env = "TOWER_IMPERSONATE_USERS",
        value_delimiter = ','
    )]
    impersonate_users: Vec<String>,
    /// With --impersonate-user: the groups it may impersonate (none when not given).
    #[arg(
        long = "impersonate-group",
        env = "TOWER_IMPERSONATE_GROUPS",
        value_delimiter = ',',
        requires = "impersonate_users"
    )]
    impersonate_groups: Vec<String>,
}

#[derive(Args)]
struct ClustersArgs {
    /// The server's admin listener: the agents' versions and addresses are served only on
    /// a loopback address (run this in the pod, or through `kubectl port-forward`).
    #[arg(long, env = "TOWER_ADMIN_URL", default_value = "http://127.0.0.1:9090")]
    admin_url: String,
    /// Print the JSON instead of a table.
    #[arg(long, env = "TOWER_JSON")]
    json: bool,
    /// A user token in the admin group; else one is minted from the jwtSecret when given;
    /// with neither, the table leaves out the agents' versions.
    #[arg(long, env = "TOWER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The jwtSecret, to mint a short-lived token in --admin-group (in the host's pod,
    /// TOWER_JWT_SECRET_FILE is set).
    #[command(flatten)]
    secret: SecretArgs,
    /// The group the server's --admin-group names, for the minted token.
    #[arg(long, env = "TOWER_ADMIN_GROUP", default_value = "system:masters")]
    admin_group: String,
}

#[derive(Args)]
struct TokenArgs {
    #[command(flatten)]
    secret: SecretArgs,
    /// The cluster the agent serves.
    #[arg(long, env = "TOWER_CLUSTER")]
    cluster: String,
    /// Lifetime (e.g. 24h); forever when omitted.
    #[arg(long, env = "TOWER_TTL", value_parser = parse_ttl)]
    ttl: Option<Duration>,
    /// The Tower CA (PEM; a server's --state-dir holds it as ca.crt): its pin goes into
    /// the token, so an agent given only the token knows whom to trust.
    #[arg(long, env = "TOWER_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

#[derive(Args)]
struct UserTokenArgs {
    #[command(flatten)]
    secret: SecretArgs,
    /// The user.
    #[arg(long, env = "TOWER_USER")]
    user: String,
    /// A group (repeat for more; TOWER_GROUPS takes a comma-separated list).
    #[arg(long = "group", env = "TOWER_GROUPS", value_delimiter = ',')]
    groups: Vec<String>,
    /// Lifetime.
    #[arg(long, env = "TOWER_TTL", default_value = "24h", value_parser = parse_ttl)]
    ttl: Duration,
}

#[derive(Args)]
struct KubeconfigArgs {
    /// The member cluster.
    #[arg(long, env = "TOWER_CLUSTER")]
    cluster: String,
    /// The frontend's URL, e.g. https://tower.example.com:9443
    #[arg(long, env = "TOWER_SERVER")]
    server: String,
    /// The user token.
    #[arg(long, env = "TOWER_TOKEN", hide_env_values = true)]
    token: String,
    /// CA to trust for the frontend (PEM); else the system's roots.
    #[arg(long, env = "TOWER_CA_CERT")]
    ca_cert: Option<PathBuf>,
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

async fn agent_manifest(args: AgentManifestArgs) -> Result<String, String> {
    validate_cluster_name(&args.cluster).map_err(|e| e.to_string())?;
    let secret = args.secret.load()?;
    let ca_path = args
        .ca_cert
        .clone()
        .unwrap_or_else(|| args.state_dir.join("ca.crt"));
    let ca_pem = std::fs::read_to_string(&ca_path).map_err(|e| {
        format!(
            "reading the CA {} (give --ca-cert, or --state-dir of a server that has run): {e}",
            ca_path.display()
        )
    })?;
    let ca_pin = ca_pin_of(&ca_pem).map_err(|e| format!("{}: {e}", ca_path.display()))?;
    let (proxy_server, cluster_token) = if args.kubernetes {
        let client = kubernetes::client(
            args.kubeconfig.as_deref(),
            tower_server::api_pace::ApiRate::default(),
        )
        .await?;
        let configured = match &args.proxy_publish_address {
            Some(address) => Some(address.clone()),
            None => {
                tower_server::platform::read_publish_address(&client, &args.platform.names()?).await
            }
        };
        let address =
            kubernetes::publish_address(&client, &args.namespace, configured.as_deref()).await?;
        let clusters: kube::Api<kubernetes::Cluster> = kube::Api::all(client);
        let cluster = clusters
            .get_opt(&args.cluster)
            .await
            .map_err(|e| format!("reading Cluster {}: {e}", args.cluster))?
            .ok_or_else(|| format!("there is no Cluster {:?}: create it first", args.cluster))?;
        if !cluster.is_proxy() {
            return Err(format!(
                "Cluster {:?} has spec.connection.type {:?}; agents serve only type \"proxy\"",
                args.cluster, cluster.spec.connection.type_
            ));
        }
        let token = Some(cluster.spec.connection.token).filter(|t| !t.is_empty());
        if token.is_none() && args.token.is_none() {
            return Err(format!(
                "Cluster {:?} has no spec.connection.token yet (tower-server writes one within seconds of seeing the Cluster): try again, or pass --token",
                args.cluster
            ));
        }
        (address, token)
    } else {
        let address = args.proxy_publish_address.as_deref().ok_or(
            "no publish address: give --proxy-publish-address https://HOST:PORT (what members dial), or --kubernetes to read the tower Service",
        )?;
        let (address, rewritten) = normalize_publish_address(address)?;
        if rewritten {
            eprintln!("tower-server: the tunnel is TLS: writing the address as {address}");
        }
        (address, None)
    };
    let token = args.token.or(cluster_token).unwrap_or_else(|| {
        Minter::new(&secret).agent_token_pinned(&args.cluster, None, Some(&ca_pin))
    });
    AgentManifest {
        cluster: &args.cluster,
        proxy_server: &proxy_server,
        token: &token,
        cluster_key: &secret.cluster_key(&args.cluster),
        ca_pem: &ca_pem,
        image: &args
            .image
            .unwrap_or_else(tower_server::manifest::default_image),
        impersonable: if args.impersonate_users.is_empty() {
            tower_server::manifest::Impersonable::Anyone
        } else {
            tower_server::manifest::Impersonable::Only {
                users: &args.impersonate_users,
                groups: &args.impersonate_groups,
            }
        },
    }
    .render()
}

async fn clusters(args: ClustersArgs) -> Result<String, String> {
    use http_body_util::BodyExt;
    let url = format!("{}/v1/clusters", args.admin_url.trim_end_matches('/'));
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("--admin-url {:?}: {e}", args.admin_url))?;
    let token = match (&args.token, &args.secret) {
        (Some(token), _) => Some(token.clone()),
        (None, secret) if secret.jwt_secret_file.is_some() || secret.jwt_secret.is_some() => {
            Some(Minter::new(&secret.load()?).user_token(
                "tower-server-clusters",
                std::slice::from_ref(&args.admin_group),
                Some(Duration::from_secs(60)),
            ))
        }
        (None, _) => None,
    };
    let mut request = http::Request::get(uri);
    if let Some(token) = &token {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    } else {
        eprintln!(
            "tower-server: no --token or jwtSecret (--jwt-secret-file): the agents' versions are left out"
        );
    }
    let request = request
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("--token: {e}"))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .map_err(|_| format!("{url}: no answer within 10s"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "{url}: {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    if args.json {
        return Ok(String::from_utf8_lossy(&body).into_owned());
    }
    let list: Vec<ClusterStatus> =
        serde_json::from_slice(&body).map_err(|e| format!("{url}: not a cluster list: {e}"))?;
    Ok(cluster_table(&list))
}

/// NAME CONNECTED SINCE REPLICAS VERSION, aligned like kubectl's tables.
fn cluster_table(list: &[ClusterStatus]) -> String {
    let mut rows = vec![[
        "NAME".to_owned(),
        "CONNECTED".to_owned(),
        "SINCE".to_owned(),
        "REPLICAS".to_owned(),
        "VERSION".to_owned(),
    ]];
    for c in list {
        let dash = || "-".to_owned();
        rows.push([
            c.name.clone(),
            c.connected.to_string(),
            c.connected_since.clone().unwrap_or_else(dash),
            if c.replicas.is_empty() {
                dash()
            } else {
                c.replicas.join(",")
            },
            c.agent_version.clone().unwrap_or_else(dash),
        ]);
    }
    // Versions and replica ids are what agents said: nothing in them drives the terminal.
    for cell in rows.iter_mut().flatten() {
        *cell = tower_telemetry::Escaped(cell.as_str()).to_string();
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

/// A token's lifetime: a humantime duration of at most 100 years, so `exp` is a date.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    const MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl > MAX {
        return Err("a token lifetime must be at most 100 years (omit --ttl for a token that does not expire)".into());
    }
    Ok(ttl)
}

fn token(args: TokenArgs) -> Result<String, String> {
    validate_cluster_name(&args.cluster).map_err(|e| e.to_string())?;
    let ca_pin = match &args.ca_cert {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| format!("reading --ca-cert {}: {e}", path.display()))?;
            Some(ca_pin_of(&pem).map_err(|e| format!("--ca-cert {}: {e}", path.display()))?)
        }
        None => None,
    };
    Ok(Minter::new(&args.secret.load()?).agent_token_pinned(
        &args.cluster,
        args.ttl,
        ca_pin.as_deref(),
    ))
}

/// The pin of the first certificate in `pem`.
fn ca_pin_of(pem: &str) -> Result<String, String> {
    let certs = tower_tunnel::tls::certs_from_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
    let first = certs.first().ok_or("no certificate in it")?;
    tower_tunnel::tls::spki_pin(first).map_err(|e| e.to_string())
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
    if base.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "--server {base:?} must not hold spaces or control characters"
        ));
    }
    if args
        .token
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("--token must not hold spaces or control characters (it goes into an Authorization header)".into());
    }
    let suffix = format!("/clusters/{}", args.cluster);
    let server = if base.ends_with(&suffix) {
        base.to_owned()
    } else {
        format!("{base}{suffix}")
    };
    let certificate_authority_data = match &args.ca_cert {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("reading --ca-cert {}: {e}", path.display()))?;
            tower_tunnel::tls::certs_from_pem(&pem)
                .map_err(|e| format!("--ca-cert {}: {e}", path.display()))?;
            Some(base64::engine::general_purpose::STANDARD.encode(pem))
        }
        None => None,
    };
    tower_server::kubeconfig::Config::new(
        &args.cluster,
        &server,
        &args.token,
        certificate_authority_data,
    )
    .to_yaml()
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

    fn args(server: &str, token: &str, ca_cert: Option<PathBuf>) -> KubeconfigArgs {
        KubeconfigArgs {
            cluster: "member-1".into(),
            server: server.into(),
            token: token.into(),
            ca_cert,
        }
    }

    fn parse(yaml: &str) -> serde_yaml::Value {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }

    #[test]
    fn kubeconfig_values_come_back_as_given_whatever_yaml_makes_of_them() {
        let servers = [
            "https://tower.example.com:9443",
            "https://[::1]:9443/a'b\"c#d&e*f!g%h@i{j}[k],l|m>n?o:",
            "https://x:1/ #not-a-comment",
        ];
        let tokens = [
            "*alias",
            "&anchor",
            "!!binary",
            "'half-quoted",
            "\"half-quoted",
            "#comment",
            "null",
            "true",
            "0x12",
            "1e3",
            "~",
            "-",
            "a:b#c{d}[e]|f>g%h@i`j,k",
            "key:",
            "%YAML",
        ];
        for server in servers.iter().filter(|s| !s.contains(' ')) {
            for token in tokens {
                let yaml = kubeconfig(args(server, token, None)).unwrap();
                let config = parse(&yaml);
                assert_eq!(
                    config["clusters"][0]["cluster"]["server"].as_str(),
                    Some(format!("{server}/clusters/member-1").as_str()),
                    "{yaml}"
                );
                assert_eq!(
                    config["users"][0]["user"]["token"].as_str(),
                    Some(token),
                    "{yaml}"
                );
                assert_eq!(config["current-context"].as_str(), Some("member-1"));
                assert_eq!(
                    config["contexts"][0]["context"]["user"].as_str(),
                    Some("member-1-user")
                );
                assert_eq!(config["users"][0]["name"].as_str(), Some("member-1-user"));
                assert!(
                    config["clusters"][0]["cluster"]
                        .get("certificate-authority-data")
                        .is_none(),
                    "no CA given, none written: {yaml}"
                );
            }
        }
        // Spaces and control characters have no place in a URL or a bearer token.
        for (server, token) in [(servers[2], "t"), (servers[0], "a b"), (servers[0], "a\nb")] {
            let e = kubeconfig(args(server, token, None)).unwrap_err();
            assert!(e.contains("spaces or control characters"), "{e}");
        }
        let e = kubeconfig(args("http://x", "t", None)).unwrap_err();
        assert!(e.contains("https://"), "{e}");
    }

    #[test]
    fn kubeconfig_embeds_the_ca() {
        let pki = tower_tunnel::tls::GeneratedPki::generate("t", &["localhost".into()]).unwrap();
        let path = std::env::temp_dir().join(format!("tower-kubeconfig-ca-{}", std::process::id()));
        std::fs::write(&path, &pki.ca_cert_pem).unwrap();
        let yaml = kubeconfig(args("https://h:9443/", "tok", Some(path.clone()))).unwrap();
        let _ = std::fs::remove_file(&path);
        let config = parse(&yaml);
        let cluster = &config["clusters"][0]["cluster"];
        assert_eq!(
            cluster["server"].as_str(),
            Some("https://h:9443/clusters/member-1")
        );
        let data = cluster["certificate-authority-data"].as_str().unwrap();
        let pem = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        assert_eq!(pem, pki.ca_cert_pem.as_bytes());
    }
}
