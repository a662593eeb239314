//! `tower-server clusters`: what a running server sees, from its admin listener, as a
//! table (or its JSON).

use std::time::Duration;

use clap::Args;
use tower_auth::Minter;

use crate::cli::SecretArgs;
use crate::registry::ClusterStatus;

/// `clusters`' flags.
#[derive(Args)]
pub struct ClustersArgs {
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

/// The server's cluster list from its admin listener, as a table or as its JSON.
pub async fn clusters(args: ClustersArgs) -> Result<String, String> {
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
