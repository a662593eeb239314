//! Who a caller is: the agent checks the server's identity assertion (header
//! [`IDENTITY_HEADER`]) with this cluster's key, and impersonates whom it names.
//!
//! The key comes from one of (the first given wins):
//! * `--cluster-key-file`: the key itself, as Tower's agent.yaml mounts it;
//! * `--jwt-secret-file` / `TOWER_JWT_SECRET`: a jwtSecret, from which the key is derived;
//! * the member's own KubeSphere configuration (ConfigMap `ke-config` or
//!   `kubesphere-config` in the pod's namespace, key `kubesphere.yaml`,
//!   `authentication.jwtSecret`), read with the pod's ServiceAccount: the agent
//!   Deployment that KubeSphere's console renders carries no secret of its own, and a
//!   KubeSphere member already holds the host's jwtSecret there for its ks-apiserver, so
//!   reading it widens nothing.
//!
//! Files and the ConfigMap are read again every [`FOLLOW_INTERVAL`], so a rotated secret
//! is followed without a restart. While no key can be had, the agent stays connected and
//! answers every request with a 503 Status that says why ([`IdentityKeys::verify`]).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use tokio_util::sync::CancellationToken;
use tower_auth::identity::{Asserted, ClusterVerifier};
use tower_auth::{AuthError, Secret};

pub use tower_auth::identity::IDENTITY_HEADER;

/// How often a key's source is read again.
pub const FOLLOW_INTERVAL: Duration = Duration::from_secs(10);

/// The ConfigMaps that hold a KubeSphere platform's configuration, Kuberix Enterprise's
/// first, looked for in the agent's own namespace.
pub const PLATFORM_CONFIGMAPS: &[&str] = &["ke-config", "kubesphere-config"];

/// Where the agent's key comes from.
#[derive(Clone)]
pub enum KeySource {
    /// A cluster key, as is.
    ClusterKeyFile(PathBuf),
    /// A jwtSecret in a file: the key is derived from it.
    JwtSecretFile(PathBuf),
    /// A jwtSecret given directly (`TOWER_JWT_SECRET`).
    JwtSecret(Secret),
    /// The platform ConfigMap, read through the member's API server.
    PlatformConfig {
        /// The API server, with the pod's ServiceAccount.
        client: kube::Client,
        /// (namespace, name) of the ConfigMaps to try, in order.
        candidates: Vec<(String, String)>,
    },
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl KeySource {
    /// Where this source reads from, for messages.
    pub fn describe(&self) -> String {
        match self {
            KeySource::ClusterKeyFile(path) => format!("--cluster-key-file {}", path.display()),
            KeySource::JwtSecretFile(path) => format!("--jwt-secret-file {}", path.display()),
            KeySource::JwtSecret(_) => "TOWER_JWT_SECRET".into(),
            KeySource::PlatformConfig { candidates, .. } => format!(
                "ConfigMap {} (key kubesphere.yaml, authentication.jwtSecret)",
                candidates
                    .iter()
                    .map(|(namespace, name)| format!("{namespace}/{name}"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        }
    }

    /// Reads the cluster key of `cluster` from this source; the error says what is
    /// missing and where.
    pub async fn read(&self, cluster: &str) -> Result<Secret, String> {
        match self {
            KeySource::ClusterKeyFile(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| format!("reading --cluster-key-file {}: {e}", path.display()))?;
                Secret::new(bytes)
                    .ok_or_else(|| format!("--cluster-key-file {} is empty", path.display()))
            }
            KeySource::JwtSecretFile(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| format!("reading --jwt-secret-file {}: {e}", path.display()))?;
                let secret = Secret::new(bytes)
                    .ok_or_else(|| format!("--jwt-secret-file {} is empty", path.display()))?;
                Ok(secret.cluster_key(cluster))
            }
            KeySource::JwtSecret(secret) => Ok(secret.cluster_key(cluster)),
            KeySource::PlatformConfig { client, candidates } => {
                let secret = jwt_secret_from_platform_config(candidates, |namespace, name| {
                    let api: kube::Api<ConfigMap> =
                        kube::Api::namespaced(client.clone(), &namespace);
                    async move { api.get_opt(&name).await.map_err(|e| e.to_string()) }
                })
                .await?;
                Ok(secret.cluster_key(cluster))
            }
        }
    }
}

/// The jwtSecret of the first of `candidates` (namespace, name) that `get` finds: one
/// that is not found, or cannot be read, is passed over; the first found is the
/// member's configuration, and is read or the error says what it lacks (a later one is
/// not looked at: it would be another platform's). The error lists every one tried.
async fn jwt_secret_from_platform_config<F, Fut>(
    candidates: &[(String, String)],
    mut get: F,
) -> Result<Secret, String>
where
    F: FnMut(String, String) -> Fut,
    Fut: std::future::Future<Output = Result<Option<ConfigMap>, String>>,
{
    let mut tried = Vec::new();
    for (namespace, name) in candidates {
        match get(namespace.clone(), name.clone()).await {
            Ok(Some(map)) => {
                return jwt_secret_of(&map)
                    .map_err(|why| format!("ConfigMap {namespace}/{name}: {why}"));
            }
            Ok(None) => tried.push(format!("{namespace}/{name}: not found")),
            Err(e) => tried.push(format!("{namespace}/{name}: {e}")),
        }
    }
    Err(format!(
        "no KubeSphere configuration to take the jwtSecret from ({}); \
         give --cluster-key-file or --jwt-secret-file",
        tried.join("; ")
    ))
}

/// The jwtSecret in a platform ConfigMap: `authentication.jwtSecret` of its
/// `kubesphere.yaml`.
fn jwt_secret_of(map: &ConfigMap) -> Result<Secret, String> {
    let text = map
        .data
        .as_ref()
        .and_then(|data| data.get("kubesphere.yaml"))
        .ok_or("it has no key kubesphere.yaml")?;
    let config: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| format!("kubesphere.yaml is not YAML: {e}"))?;
    let secret = config
        .get("authentication")
        .and_then(|a| a.get("jwtSecret"))
        .and_then(serde_yaml::Value::as_str)
        .ok_or("kubesphere.yaml has no authentication.jwtSecret")?;
    Secret::new(secret).ok_or_else(|| "authentication.jwtSecret is empty".into())
}

/// Why a request's identity cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityError {
    /// No key: the agent cannot check anyone (503).
    NoKey(String),
    /// The request carries no assertion (401).
    Missing,
    /// The assertion does not verify (401).
    Refused(AuthError),
}

impl std::fmt::Display for IdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentityError::NoKey(why) => write!(
                f,
                "tower-agent cannot check who callers are, so it serves no one: {why}"
            ),
            IdentityError::Missing => write!(
                f,
                "tower-agent: no identity assertion ({IDENTITY_HEADER}): requests reach \
                 members only through tower-server"
            ),
            IdentityError::Refused(AuthError::BadSignature) => write!(
                f,
                "tower-agent: the server's identity assertion does not verify with this \
                 member's key: the member's jwtSecret (or cluster key) differs from the host's"
            ),
            IdentityError::Refused(e) => {
                write!(f, "tower-agent: identity assertion refused: {e}")
            }
        }
    }
}

/// The agent's current key, or why it has none.
#[derive(Debug)]
pub struct IdentityKeys {
    cluster: String,
    /// The key's verifier (and its bytes, to tell whether a re-read changed it).
    current: RwLock<Result<(Arc<ClusterVerifier>, Secret), String>>,
}

impl IdentityKeys {
    /// Keys for `cluster`, starting with `key` (or, on `Err`, why there is none).
    pub fn new(cluster: &str, key: Result<Secret, String>) -> Self {
        let keys = IdentityKeys {
            cluster: cluster.to_owned(),
            current: RwLock::new(Err(String::new())),
        };
        keys.set(key);
        keys
    }

    /// Replaces the key; returns whether anything changed (a key, or the reason for
    /// having none).
    fn set(&self, key: Result<Secret, String>) -> bool {
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let same = match (&*current, &key) {
            (Ok((_, held)), Ok(key)) => held.expose() == key.expose(),
            (Err(a), Err(b)) => a == b,
            _ => false,
        };
        if !same {
            *current = key.map(|key| (Arc::new(ClusterVerifier::new(&self.cluster, &key)), key));
        }
        !same
    }

    /// Whether a key is in hand.
    pub fn ready(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_ok()
    }

    /// What `assertion` (the header's value, if any) says of the caller.
    pub fn verify(&self, assertion: Option<&str>) -> Result<Asserted, IdentityError> {
        let verifier = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(verifier, _)| verifier.clone())
            .map_err(|why| IdentityError::NoKey(why.clone()))?;
        let assertion = assertion
            .filter(|a| !a.trim().is_empty())
            .ok_or(IdentityError::Missing)?;
        verifier.verify(assertion).map_err(IdentityError::Refused)
    }

    /// Reads `source` every [`FOLLOW_INTERVAL`] until `stop`, taking up a changed key
    /// and logging each change of state once.
    pub async fn follow(self: Arc<Self>, source: KeySource, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(FOLLOW_INTERVAL) => {}
            }
            let key = source.read(&self.cluster).await;
            let problem = key.as_ref().err().cloned();
            if self.set(key) {
                match problem {
                    None => {
                        tracing::info!(source = %source.describe(), "identity key (re)loaded: serving callers")
                    }
                    Some(why) => {
                        tracing::error!(error = %why, "no identity key: refusing every request with 503 until there is one")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;
    use tower_auth::Identity;
    use tower_auth::identity::Asserter;

    fn config_map(yaml: Option<&str>) -> ConfigMap {
        ConfigMap {
            data: yaml.map(|y| [("kubesphere.yaml".to_owned(), y.to_owned())].into()),
            ..ConfigMap::default()
        }
    }

    #[test]
    fn the_jwt_secret_is_read_from_kubesphere_yaml() {
        let yaml = "authentication:\n  authenticateRateLimiterMaxTries: 10\n  jwtSecret: \"s3cret\"\nmulticluster:\n  clusterRole: member\n";
        assert_eq!(
            jwt_secret_of(&config_map(Some(yaml))).unwrap().expose(),
            b"s3cret"
        );
        for (yaml, why) in [
            (None, "no key kubesphere.yaml"),
            (Some("authentication: {}\n"), "no authentication.jwtSecret"),
            (Some("authentication:\n  jwtSecret: \"\"\n"), "is empty"),
            (Some(": : :\n\t- ["), "not YAML"),
        ] {
            let error = jwt_secret_of(&config_map(yaml)).unwrap_err();
            assert!(error.contains(why), "{yaml:?}: {error}");
        }
    }

    /// The member's ConfigMaps as a lookup: (namespace, name) → its jwtSecret line.
    async fn lookup(
        maps: &[(&str, &str, &str)],
        candidates: &[(&str, &str)],
    ) -> (Result<Secret, String>, Vec<String>) {
        let maps: HashMap<(String, String), ConfigMap> = maps
            .iter()
            .map(|(ns, name, line)| {
                let yaml = format!("authentication:\n{line}\n");
                ((ns.to_string(), name.to_string()), config_map(Some(&yaml)))
            })
            .collect();
        let candidates: Vec<(String, String)> = candidates
            .iter()
            .map(|(ns, name)| (ns.to_string(), name.to_string()))
            .collect();
        let asked = std::sync::Mutex::new(Vec::new());
        let found = jwt_secret_from_platform_config(&candidates, |ns, name| {
            asked.lock().unwrap().push(format!("{ns}/{name}"));
            let map = if ns == "forbidden" {
                Err("configmaps is forbidden".to_owned())
            } else {
                Ok(maps.get(&(ns, name)).cloned())
            };
            async move { map }
        })
        .await;
        (found, asked.into_inner().unwrap())
    }

    #[tokio::test]
    async fn the_first_platform_config_found_in_order_gives_the_jwt_secret() {
        let order = [
            ("my-ns", "ke-config"),
            ("my-ns", "kubesphere-config"),
            ("ke-system", "ke-config"),
            ("kubesphere-system", "kubesphere-config"),
        ];
        // Only KubeSphere's own: every earlier one is asked for first.
        let (found, asked) = lookup(
            &[("kubesphere-system", "kubesphere-config", "  jwtSecret: ks")],
            &order,
        )
        .await;
        assert_eq!(found.unwrap().expose(), b"ks");
        assert_eq!(
            asked,
            [
                "my-ns/ke-config",
                "my-ns/kubesphere-config",
                "ke-system/ke-config",
                "kubesphere-system/kubesphere-config"
            ]
        );
        // The agent's own namespace before the platforms' namespaces, and Kuberix
        // Enterprise's name before KubeSphere's: the first found is read, no later one.
        let (found, asked) = lookup(
            &[
                ("my-ns", "kubesphere-config", "  jwtSecret: own"),
                ("ke-system", "ke-config", "  jwtSecret: ke"),
                ("kubesphere-system", "kubesphere-config", "  jwtSecret: ks"),
            ],
            &order,
        )
        .await;
        assert_eq!(found.unwrap().expose(), b"own");
        assert_eq!(asked, ["my-ns/ke-config", "my-ns/kubesphere-config"]);
        let (found, _) = lookup(
            &[
                ("ke-system", "ke-config", "  jwtSecret: ke"),
                ("kubesphere-system", "kubesphere-config", "  jwtSecret: ks"),
            ],
            &order,
        )
        .await;
        assert_eq!(found.unwrap().expose(), b"ke");
        // The first found without a jwtSecret is an error naming it: a later one is
        // another platform's.
        let (found, asked) = lookup(
            &[
                ("ke-system", "ke-config", "  other: x"),
                ("kubesphere-system", "kubesphere-config", "  jwtSecret: ks"),
            ],
            &order,
        )
        .await;
        let error = found.unwrap_err();
        assert!(
            error.contains(
                "ConfigMap ke-system/ke-config: kubesphere.yaml has no authentication.jwtSecret"
            ),
            "{error}"
        );
        assert_eq!(asked.len(), 3);
        // One that cannot be read is passed over; none found lists every one tried.
        let (found, _) = lookup(
            &[("kubesphere-system", "kubesphere-config", "  jwtSecret: ks")],
            &[
                ("forbidden", "ke-config"),
                ("kubesphere-system", "kubesphere-config"),
            ],
        )
        .await;
        assert_eq!(found.unwrap().expose(), b"ks");
        let error = lookup(&[], &order[2..]).await.0.unwrap_err();
        assert!(
            error.contains(
                "(ke-system/ke-config: not found; kubesphere-system/kubesphere-config: not found)"
            ),
            "{error}"
        );
    }

    #[test]
    fn without_a_key_every_request_is_refused_with_the_reason_and_a_key_later_serves() {
        let secret = Secret::new("jwt").unwrap();
        let keys = IdentityKeys::new("c1", Err("ConfigMap x: not found".into()));
        let alice = Identity {
            user: "alice".into(),
            groups: vec![],
        };
        let made = Asserter::new(&secret).assert("c1", &alice);
        let assertion = made.to_str().unwrap();
        let refused = keys.verify(Some(assertion)).unwrap_err();
        assert!(matches!(refused, IdentityError::NoKey(_)));
        assert!(refused.to_string().contains("ConfigMap x: not found"));
        assert!(keys.set(Ok(secret.cluster_key("c1"))));
        assert!(
            !keys.set(Ok(secret.cluster_key("c1"))),
            "same key: no change"
        );
        assert_eq!(
            keys.verify(Some(assertion)).unwrap(),
            Asserted::User(alice.clone())
        );
        assert_eq!(keys.verify(None).unwrap_err(), IdentityError::Missing);
        // Another secret on the member: the assertion does not verify, and the message
        // says where to look.
        assert!(keys.set(Ok(Secret::new("other").unwrap().cluster_key("c1"))));
        let mismatch = keys.verify(Some(assertion)).unwrap_err();
        assert!(
            mismatch.to_string().contains("differs from the host's"),
            "{mismatch}"
        );
    }
}
