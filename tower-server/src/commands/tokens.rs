//! `tower-server token` and `user-token`: JWTs minted from the jwtSecret, for an agent
//! (optionally pinning the CA it is to trust) and for a user.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tower_auth::Minter;
use tower_proto::names::validate_cluster_name;

use crate::cli::SecretArgs;

/// `token`'s flags.
#[derive(Args)]
pub struct TokenArgs {
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

/// `user-token`'s flags.
#[derive(Args)]
pub struct UserTokenArgs {
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

/// A token's lifetime: a humantime duration of at most 100 years, so `exp` is a date.
fn parse_ttl(text: &str) -> Result<Duration, String> {
    const MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let ttl = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if ttl > MAX {
        return Err("a token lifetime must be at most 100 years (omit --ttl for a token that does not expire)".into());
    }
    Ok(ttl)
}

/// An agent token for the cluster, pinning the CA when `--ca-cert` is given.
pub fn token(args: TokenArgs) -> Result<String, String> {
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
pub(crate) fn ca_pin_of(pem: &str) -> Result<String, String> {
    let certs = tower_tunnel::tls::certs_from_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
    let first = certs.first().ok_or("no certificate in it")?;
    tower_tunnel::tls::spki_pin(first).map_err(|e| e.to_string())
}

/// A user token (KubeSphere's shape) for the user and groups.
pub fn user_token(args: UserTokenArgs) -> Result<String, String> {
    if args.user.trim().is_empty() {
        return Err("--user must not be empty".into());
    }
    Ok(Minter::new(&args.secret.load()?).user_token(&args.user, &args.groups, Some(args.ttl)))
}
