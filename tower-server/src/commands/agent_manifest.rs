//! `tower-server agent-manifest`: a member's agent.yaml, from flags or, with
//! `--kubernetes`, from the Cluster object, the `tower` Service and the platform config.

use std::path::PathBuf;

use clap::Args;
use tower_auth::Minter;
use tower_proto::names::validate_cluster_name;

use super::tokens::ca_pin_of;
use crate::cli::SecretArgs;
use crate::kubernetes;
use crate::manifest::{AgentManifest, normalize_publish_address};

/// `agent-manifest`'s flags.
#[derive(Args)]
pub struct AgentManifestArgs {
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
    platform: crate::cli::PlatformArgs,
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

/// The member's agent.yaml ([`AgentManifest`]): the address it dials from the flag or
/// (`--kubernetes`) the platform config and the `tower` Service; its token from the flag,
/// the Cluster's `spec.connection.token`, or freshly minted pinning the CA.
pub async fn agent_manifest(args: AgentManifestArgs) -> Result<String, String> {
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
            crate::api_pace::ApiRate::default(),
        )
        .await?;
        let configured = match &args.proxy_publish_address {
            Some(address) => Some(address.clone()),
            None => crate::platform::read_publish_address(&client, &args.platform.names()?).await,
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
        image: &args.image.unwrap_or_else(crate::manifest::default_image),
        impersonable: if args.impersonate_users.is_empty() {
            crate::manifest::Impersonable::Anyone
        } else {
            crate::manifest::Impersonable::Only {
                users: &args.impersonate_users,
                groups: &args.impersonate_groups,
            }
        },
    }
    .render()
}
