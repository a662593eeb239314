//! `tower-server kubeconfig`: a kubeconfig that reaches one member through the frontend,
//! as a user token.

use std::path::PathBuf;

use base64::Engine;
use clap::Args;
use tower_proto::names::validate_cluster_name;

/// `kubeconfig`'s flags.
#[derive(Args)]
pub struct KubeconfigArgs {
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

/// A kubeconfig whose one cluster is `{server}/clusters/{cluster}`, with the user's token
/// and, when given, the CA as `certificate-authority-data`.
pub fn kubeconfig(args: KubeconfigArgs) -> Result<String, String> {
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
    crate::kubeconfig::Config::new(
        &args.cluster,
        &server,
        &args.token,
        certificate_authority_data,
    )
    .to_yaml()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

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
