//! Kubeconfigs that reach a cluster through Tower's frontend: the one `tower-server
//! kubeconfig` prints, and the one written into a proxy Cluster's
//! `spec.connection.kubeconfig` ([`ClusterCredential`]), which KubeSphere's cluster
//! controller builds its client from.

use serde::{Deserialize, Serialize};

/// A kubeconfig with one cluster, one user (a bearer token) and one context, field by
/// field in kubectl's order.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// `v1`.
    pub api_version: String,
    /// `Config`.
    pub kind: String,
    /// The one cluster.
    pub clusters: Vec<Named>,
    /// The one user.
    pub users: Vec<NamedUser>,
    /// The one context.
    pub contexts: Vec<NamedContext>,
    /// The context's name.
    #[serde(rename = "current-context")]
    pub current_context: String,
}

/// `clusters[]`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Named {
    /// Its name.
    pub name: String,
    /// Where it is.
    pub cluster: Cluster,
}

/// `clusters[].cluster`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Cluster {
    /// Its URL.
    pub server: String,
    /// The CA to trust (PEM, base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority_data: Option<String>,
}

/// `users[]`.
#[derive(Debug, Serialize, Deserialize)]
pub struct NamedUser {
    /// Its name.
    pub name: String,
    /// Its credential.
    pub user: User,
}

/// `users[].user`: only a bearer token is written (a client certificate, as KubeSphere's
/// old tower wrote, reads as no token).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct User {
    /// The bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// `contexts[]`.
#[derive(Debug, Serialize, Deserialize)]
pub struct NamedContext {
    /// Its name.
    pub name: String,
    /// What it joins.
    pub context: Context,
}

/// `contexts[].context`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Context {
    /// The cluster's name.
    pub cluster: String,
    /// The user's name.
    pub user: String,
}

impl Config {
    /// A kubeconfig for cluster `name` at `server` with `token`, trusting `ca_base64`
    /// (else the system's roots).
    pub fn new(name: &str, server: &str, token: &str, ca_base64: Option<String>) -> Config {
        let user = format!("{name}-user");
        Config {
            api_version: "v1".into(),
            kind: "Config".into(),
            clusters: vec![Named {
                name: name.into(),
                cluster: Cluster {
                    server: server.into(),
                    certificate_authority_data: ca_base64,
                },
            }],
            users: vec![NamedUser {
                name: user.clone(),
                user: User {
                    token: Some(token.into()),
                },
            }],
            contexts: vec![NamedContext {
                name: name.into(),
                context: Context {
                    cluster: name.into(),
                    user,
                },
            }],
            current_context: name.into(),
        }
    }

    /// The YAML (serde_yaml quotes and escapes whatever needs it).
    pub fn to_yaml(&self) -> Result<String, String> {
        serde_yaml::to_string(self).map_err(|e| format!("writing the kubeconfig: {e}"))
    }

    /// The server and token of its current context, if it has both.
    fn current(&self) -> Option<(&Cluster, &str)> {
        let context = self
            .contexts
            .iter()
            .find(|c| c.name == self.current_context)?;
        let cluster = self
            .clusters
            .iter()
            .find(|c| c.name == context.context.cluster)?;
        let user = self.users.iter().find(|u| u.name == context.context.user)?;
        Some((&cluster.cluster, user.user.token.as_deref()?))
    }
}

/// What a proxy Cluster's `spec.connection.kubeconfig` must say: the Cluster's
/// kubernetesAPIEndpoint, Tower's CA, and a user token for `user` in `groups` (the
/// identity the agent impersonates on the member; KubeSphere's cluster controller joins
/// the member through it, so it needs cluster-admin there).
#[derive(Debug, Clone)]
pub struct ClusterCredential {
    /// The user of the minted token.
    pub user: String,
    /// Its groups.
    pub groups: Vec<String>,
    /// Its lifetime.
    pub ttl: std::time::Duration,
    /// Tower's CA, PEM.
    pub ca_pem: String,
}

impl ClusterCredential {
    /// A fresh kubeconfig for cluster `name` at `server`, its token minted by `minter`.
    pub fn render(
        &self,
        minter: &tower_auth::Minter,
        name: &str,
        server: &str,
    ) -> Result<String, String> {
        use base64::Engine;
        let token = minter.user_token(&self.user, &self.groups, Some(self.ttl));
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        Config::new(name, server, &token, Some(ca)).to_yaml()
    }

    /// Whether `existing` (the Cluster's kubeconfig as stored) is one this server would
    /// keep: it points at `server`, trusts this CA, and carries a token this server
    /// accepts for the configured user and groups with more than a third of its
    /// lifetime left. Replicas judge alike, so none rewrites another's (KubeSphere
    /// rebuilds its clients on every spec change); an old tower's client-certificate
    /// kubeconfig fails here and is replaced.
    pub fn keeps(&self, verifier: &tower_auth::Verifier, existing: &[u8], server: &str) -> bool {
        use base64::Engine;
        let Ok(config) = serde_yaml::from_slice::<Config>(existing) else {
            return false;
        };
        let Some((cluster, token)) = config.current() else {
            return false;
        };
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        if cluster.server != server || cluster.certificate_authority_data.as_deref() != Some(&ca) {
            return false;
        }
        let Ok(identity) = verifier.verify_user(token) else {
            return false;
        };
        if identity.user != self.user || identity.groups != self.groups {
            return false;
        }
        let Some(exp) = token_exp(token) else {
            return false;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        exp > now.saturating_add(self.ttl.as_secs() / 3)
    }
}

/// The `exp` claim of a JWT (read after it verified; the signature is not checked here).
fn token_exp(token: &str) -> Option<u64> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_u64()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;
    use tower_auth::{Minter, Secret, Verifier};

    fn credential(ttl: Duration) -> ClusterCredential {
        ClusterCredential {
            user: "kubesphere".into(),
            groups: vec!["system:masters".into()],
            ttl,
            ca_pem: "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n".into(),
        }
    }

    #[test]
    fn a_fresh_kubeconfig_is_kept_and_every_difference_is_not() {
        let secret = Secret::new("s").unwrap();
        let (minter, verifier) = (Minter::new(&secret), Verifier::new(&secret));
        let ttl = Duration::from_secs(3600);
        let ours = credential(ttl);
        let server = "https://tower-proxy.ke-system.svc:9443/clusters/m";
        let yaml = ours.render(&minter, "m", server).unwrap();
        assert!(ours.keeps(&verifier, yaml.as_bytes(), server));
        // Another server, another user, another CA, another secret, no token at all.
        assert!(!ours.keeps(&verifier, yaml.as_bytes(), "https://elsewhere/clusters/m"));
        let mut other_user = credential(ttl);
        other_user.user = "admin".into();
        assert!(!other_user.keeps(&verifier, yaml.as_bytes(), server));
        let mut other_ca = credential(ttl);
        other_ca.ca_pem = "other".into();
        assert!(!other_ca.keeps(&verifier, yaml.as_bytes(), server));
        let stranger = Verifier::new(&Secret::new("t").unwrap());
        assert!(!ours.keeps(&stranger, yaml.as_bytes(), server));
        let client_cert = "apiVersion: v1\nkind: Config\nclusters:\n- name: m\n  cluster:\n    server: https://x\ncontexts:\n- name: m\n  context:\n    cluster: m\n    user: m\ncurrent-context: m\nusers:\n- name: m\n  user:\n    client-certificate-data: AAAA\n    client-key-data: AAAA\n";
        assert!(!ours.keeps(&verifier, client_cert.as_bytes(), server));
        // A token with less than a third of its lifetime left is renewed.
        let short = credential(Duration::from_secs(30)).render(&minter, "m", server);
        assert!(!ours.keeps(&verifier, short.unwrap().as_bytes(), server));
    }
}
