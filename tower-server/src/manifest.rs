//! The member's `agent.yaml`: one file that `kubectl create -f` applies on a member
//! unchanged. It is built from the typed Kubernetes objects, so it always parses as them.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HTTPGetAction, Namespace, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, Secret, SecretVolumeSource,
    SecurityContext, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

/// The namespace the agent runs in on the member.
pub const AGENT_NAMESPACE: &str = "ke-system";
/// The name shared by the agent's objects.
pub const AGENT_NAME: &str = "tower-agent";
/// The agent's admin port (probes).
pub const AGENT_ADMIN_PORT: i32 = 9090;
/// Where the agent's Secret is mounted.
const SECRET_DIR: &str = "/etc/tower";
/// The uid and gid the agent runs as: the image's `nonroot` user (deploy/Containerfile).
const AGENT_UID: i64 = 65532;

/// The image the host tells members to run unless told otherwise.
pub fn default_image() -> String {
    format!("tower:{}", env!("CARGO_PKG_VERSION"))
}

/// What goes into a member's agent.yaml.
#[derive(Debug, Clone)]
pub struct AgentManifest<'a> {
    /// The member cluster's name (already validated).
    pub cluster: &'a str,
    /// The published tunnel address, `https://host:port`.
    pub proxy_server: &'a str,
    /// The agent token.
    pub token: &'a str,
    /// This member's cluster key ([`tower_auth::Secret::cluster_key`]): never the
    /// jwtSecret.
    pub cluster_key: &'a tower_auth::Secret,
    /// The CA the agent trusts for the tunnel (PEM).
    pub ca_pem: &'a str,
    /// The container image holding `/tower-agent`.
    pub image: &'a str,
    /// Whom the agent may impersonate on the member.
    pub impersonable: Impersonable<'a>,
}

/// Whom the agent's ClusterRole lets it impersonate.
#[derive(Debug, Clone, Copy, Default)]
pub enum Impersonable<'a> {
    /// Every user and group: the agent's ServiceAccount is then as strong as
    /// cluster-admin on the member (it can impersonate `system:masters`), and whoever
    /// holds its token is too.
    #[default]
    Anyone,
    /// Only these users and groups (`resourceNames`): a caller with any other identity
    /// is refused by the member itself, and a stolen agent credential is worth no more
    /// than the identities listed.
    Only {
        /// User names.
        users: &'a [String],
        /// Group names (none: no group is impersonated, so callers with groups are refused).
        groups: &'a [String],
    },
}

impl AgentManifest<'_> {
    /// The YAML documents, separated by `---`.
    pub fn render(&self) -> Result<String, String> {
        let docs = [
            yaml(&self.namespace())?,
            yaml(&self.service_account())?,
            yaml(&self.cluster_role())?,
            yaml(&self.cluster_role_binding())?,
            yaml(&self.secret())?,
            yaml(&self.deployment())?,
        ];
        Ok(format!(
            "# tower-agent for member cluster {:?}: kubectl create -f this file on the member.\n{}",
            self.cluster,
            docs.join("---\n")
        ))
    }

    fn meta(&self, namespaced: bool) -> ObjectMeta {
        ObjectMeta {
            name: Some(AGENT_NAME.into()),
            namespace: namespaced.then(|| AGENT_NAMESPACE.into()),
            labels: Some(labels(self.cluster)),
            ..ObjectMeta::default()
        }
    }

    fn namespace(&self) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(AGENT_NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        }
    }

    fn service_account(&self) -> ServiceAccount {
        ServiceAccount {
            metadata: self.meta(true),
            ..ServiceAccount::default()
        }
    }

    /// Impersonation of the users and groups that tokens name, and nothing else: every
    /// request the agent forwards is authorised as that user by the member itself.
    fn cluster_role(&self) -> ClusterRole {
        let rule = |resource: &str, names: Option<&[String]>| PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec![resource.into()]),
            resource_names: names.map(<[String]>::to_vec),
            verbs: vec!["impersonate".into()],
            ..PolicyRule::default()
        };
        let rules = match self.impersonable {
            Impersonable::Anyone => vec![PolicyRule {
                resources: Some(vec!["users".into(), "groups".into()]),
                ..rule("users", None)
            }],
            Impersonable::Only { users, groups } => [("users", users), ("groups", groups)]
                .into_iter()
                .filter(|(_, names)| !names.is_empty())
                .map(|(resource, names)| rule(resource, Some(names)))
                .collect(),
        };
        ClusterRole {
            metadata: self.meta(false),
            rules: Some(rules),
            ..ClusterRole::default()
        }
    }

    fn cluster_role_binding(&self) -> ClusterRoleBinding {
        ClusterRoleBinding {
            metadata: self.meta(false),
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "ClusterRole".into(),
                name: AGENT_NAME.into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: AGENT_NAME.into(),
                namespace: Some(AGENT_NAMESPACE.into()),
                ..Subject::default()
            }]),
        }
    }

    fn secret(&self) -> Secret {
        let data = [
            ("token", self.token.as_bytes()),
            ("cluster-key", self.cluster_key.expose()),
            ("ca.crt", self.ca_pem.as_bytes()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.to_vec())))
        .collect();
        Secret {
            metadata: self.meta(true),
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Secret::default()
        }
    }

    fn deployment(&self) -> Deployment {
        let probe = |path: &str, period: i32| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.into()),
                port: IntOrString::Int(AGENT_ADMIN_PORT),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(period),
            failure_threshold: Some(3),
            ..Probe::default()
        };
        let quantities = |cpu: &str, memory: &str| {
            BTreeMap::from([
                ("cpu".to_owned(), Quantity(cpu.into())),
                ("memory".to_owned(), Quantity(memory.into())),
            ])
        };
        let file = |name: &str| format!("{SECRET_DIR}/{name}");
        let args = vec![
            "--name".to_owned(),
            self.cluster.to_owned(),
            "--proxy-server".into(),
            self.proxy_server.to_owned(),
            "--token-file".into(),
            file("token"),
            "--cluster-key-file".into(),
            file("cluster-key"),
            "--ca-file".into(),
            file("ca.crt"),
            "--admin-addr".into(),
            format!("0.0.0.0:{AGENT_ADMIN_PORT}"),
        ];
        let container = Container {
            name: AGENT_NAME.into(),
            image: Some(self.image.to_owned()),
            command: Some(vec!["/tower-agent".into()]),
            args: Some(args),
            ports: Some(vec![ContainerPort {
                name: Some("admin".into()),
                container_port: AGENT_ADMIN_PORT,
                ..ContainerPort::default()
            }]),
            liveness_probe: Some(probe("/healthz", 10)),
            readiness_probe: Some(probe("/readyz", 5)),
            resources: Some(ResourceRequirements {
                requests: Some(quantities("50m", "32Mi")),
                limits: Some(quantities("1", "256Mi")),
                ..ResourceRequirements::default()
            }),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Capabilities::default()
                }),
                ..SecurityContext::default()
            }),
            volume_mounts: Some(vec![VolumeMount {
                name: "tower".into(),
                mount_path: SECRET_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            }]),
            ..Container::default()
        };
        let selector =
            BTreeMap::from([("app.kubernetes.io/name".to_owned(), AGENT_NAME.to_owned())]);
        Deployment {
            metadata: self.meta(true),
            spec: DeploymentSpec {
                replicas: Some(1),
                selector: LabelSelector {
                    match_labels: Some(selector),
                    ..LabelSelector::default()
                },
                // One agent at a time holds the cluster's tunnels; a new one replaces it.
                strategy: Some(DeploymentStrategy {
                    type_: Some("Recreate".into()),
                    ..DeploymentStrategy::default()
                }),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels(self.cluster)),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        service_account_name: Some(AGENT_NAME.into()),
                        // A Service named `tower` on this member (one that also runs the
                        // host) would otherwise put TOWER_PORT, TOWER_SERVICE_HOST, … into
                        // the environment: the prefix of the agent's own settings.
                        enable_service_links: Some(false),
                        security_context: Some(PodSecurityContext {
                            run_as_non_root: Some(true),
                            run_as_user: Some(AGENT_UID),
                            run_as_group: Some(AGENT_UID),
                            // A kubelet writes Secret files root:root with defaultMode and
                            // gives them to a group only for a pod fsGroup: without it uid
                            // 65532 cannot read its 0440 token (EACCES, CrashLoopBackOff).
                            fs_group: Some(AGENT_UID),
                            seccomp_profile: Some(SeccompProfile {
                                type_: "RuntimeDefault".into(),
                                ..SeccompProfile::default()
                            }),
                            ..PodSecurityContext::default()
                        }),
                        containers: vec![container],
                        volumes: Some(vec![Volume {
                            name: "tower".into(),
                            secret: Some(SecretVolumeSource {
                                secret_name: Some(AGENT_NAME.into()),
                                default_mode: Some(0o440),
                                ..SecretVolumeSource::default()
                            }),
                            ..Volume::default()
                        }]),
                        ..PodSpec::default()
                    }),
                },
                ..DeploymentSpec::default()
            },
            ..Deployment::default()
        }
    }
}

fn labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), AGENT_NAME.to_owned()),
        ("app.kubernetes.io/part-of".to_owned(), "tower".to_owned()),
        (
            crate::cluster_label::CLUSTER_LABEL.to_owned(),
            crate::cluster_label::cluster_label(cluster),
        ),
    ])
}

/// One object as a YAML document, with `apiVersion` and `kind` first.
fn yaml<T: Serialize + k8s_openapi::Resource>(object: &T) -> Result<String, String> {
    let mut value = serde_json::to_value(object).map_err(|e| e.to_string())?;
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), T::API_VERSION.into());
        map.insert("kind".into(), T::KIND.into());
    }
    serde_yaml::to_string(&value).map_err(|e| e.to_string())
}

/// Normalises a published tunnel address: `http://` (as older docs wrote it) still gets a
/// TLS tunnel, so it becomes `https://`; a bare `host:port` gains `https://`. Returns the
/// address and whether it was rewritten.
pub fn normalize_publish_address(address: &str) -> Result<(String, bool), String> {
    let address = address.trim();
    let (rest, rewritten) = if let Some(rest) = address.strip_prefix("http://") {
        (rest, true)
    } else if let Some(rest) = address.strip_prefix("https://") {
        (rest, false)
    } else if address.contains("://") {
        return Err(format!(
            "the proxy publish address {address:?} must be https://HOST:PORT"
        ));
    } else {
        (address, true)
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(format!(
            "the proxy publish address {address:?} names no host: use https://HOST:PORT"
        ));
    }
    let normalized = format!("https://{rest}");
    tower_tunnel::dial::ServerAddress::parse(&normalized)
        .map_err(|e| format!("the proxy publish address {address:?}: {e}"))?;
    Ok((normalized, rewritten))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn manifest() -> String {
        AgentManifest {
            cluster: "member-1",
            proxy_server: "https://203.0.113.7:8080",
            token: "tok.en.value",
            cluster_key: &tower_auth::Secret::new("cluster-k3y").unwrap(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            image: "tower:test",
            impersonable: Impersonable::Anyone,
        }
        .render()
        .expect("renders")
    }

    #[test]
    fn a_long_cluster_name_labels_every_object_with_a_valid_label_value() {
        let cluster = format!("{}.{}", "a".repeat(60), "b".repeat(60));
        let text = AgentManifest {
            cluster: &cluster,
            proxy_server: "https://203.0.113.7:8080",
            token: "t",
            cluster_key: &tower_auth::Secret::new("k").unwrap(),
            ca_pem: "",
            image: "tower:test",
            impersonable: Impersonable::Anyone,
        }
        .render()
        .expect("renders");
        let documents: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde_json::Value::deserialize(d).expect("yaml"))
            .collect();
        let mut labelled = 0;
        for document in &documents {
            for labels in [
                &document["metadata"]["labels"],
                &document["spec"]["template"]["metadata"]["labels"],
            ] {
                if let Some(value) = labels[crate::cluster_label::CLUSTER_LABEL].as_str() {
                    assert!(value.len() <= 63, "{value}");
                    assert!(value.starts_with(&"a".repeat(54)), "{value}");
                    labelled += 1;
                }
            }
        }
        assert!(
            labelled >= documents.len(),
            "{labelled} labels in {}",
            documents.len()
        );
    }

    #[test]
    fn a_restricted_agent_may_impersonate_only_the_identities_listed() {
        let users = ["alice".to_owned(), "bob".to_owned()];
        let groups = ["devs".to_owned()];
        let text = AgentManifest {
            cluster: "member-1",
            proxy_server: "https://203.0.113.7:8080",
            token: "t",
            cluster_key: &tower_auth::Secret::new("k").unwrap(),
            ca_pem: "",
            image: "tower:test",
            impersonable: Impersonable::Only {
                users: &users,
                groups: &groups,
            },
        }
        .render()
        .expect("renders");
        let role: ClusterRole = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde_json::Value::deserialize(d).expect("yaml"))
            .find(|d| d["kind"] == "ClusterRole")
            .map(|d| serde_json::from_value(d).expect("typed"))
            .expect("a ClusterRole");
        let rules = role.rules.expect("rules");
        let summary: Vec<(Vec<String>, Vec<String>, Vec<String>)> = rules
            .into_iter()
            .map(|r| (r.resources.unwrap(), r.resource_names.unwrap(), r.verbs))
            .collect();
        assert_eq!(
            summary,
            [
                (
                    vec!["users".into()],
                    users.to_vec(),
                    vec!["impersonate".into()]
                ),
                (
                    vec!["groups".into()],
                    groups.to_vec(),
                    vec!["impersonate".into()]
                ),
            ]
        );
    }

    /// Deserialises a document into `T`, and fails if serde dropped any field (a
    /// misspelt field would otherwise vanish silently).
    fn strict<T>(doc: &serde_json::Value) -> T
    where
        T: serde::de::DeserializeOwned + Serialize + k8s_openapi::Resource,
    {
        let typed: T = serde_json::from_value(doc.clone()).expect("typed");
        let mut back = serde_json::to_value(&typed).expect("serialise");
        back["apiVersion"] = T::API_VERSION.into();
        back["kind"] = T::KIND.into();
        assert_eq!(&back, doc, "{} lost or changed fields", T::KIND);
        typed
    }

    #[test]
    fn every_document_parses_as_its_typed_object() {
        let text = manifest();
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde_json::Value::deserialize(d).expect("yaml"))
            .collect();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Secret",
                "Deployment"
            ]
        );
        strict::<Namespace>(&docs[0]);
        strict::<ServiceAccount>(&docs[1]);
        let role = strict::<ClusterRole>(&docs[2]);
        let rules = role.rules.expect("rules");
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].verbs, ["impersonate"]);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["users".to_owned(), "groups".to_owned()][..])
        );
        strict::<ClusterRoleBinding>(&docs[3]);
        let secret = strict::<Secret>(&docs[4]);
        let data = secret.data.expect("data");
        assert_eq!(data["token"].0, b"tok.en.value");
        assert_eq!(data["cluster-key"].0, b"cluster-k3y");
        assert!(
            !data.contains_key("jwt-secret"),
            "a member never gets the jwtSecret"
        );
        assert!(data["ca.crt"].0.starts_with(b"-----BEGIN CERTIFICATE-----"));
        let deployment = strict::<Deployment>(&docs[5]);
        let pod = deployment.spec.template.spec.unwrap();
        let container = &pod.containers[0];
        let args = container.args.clone().unwrap();
        let flag = |name: &str| {
            let i = args.iter().position(|a| a == name).expect(name);
            args[i + 1].clone()
        };
        assert_eq!(flag("--name"), "member-1");
        assert_eq!(flag("--proxy-server"), "https://203.0.113.7:8080");
        assert_eq!(flag("--token-file"), "/etc/tower/token");
        let security = container.security_context.clone().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.run_as_non_root, Some(true));
        let pod_security = pod.security_context.unwrap();
        assert_eq!(pod_security.run_as_non_root, Some(true));
        // The Secret volume is 0440 root-owned: only fsGroup makes it readable.
        assert_eq!(pod_security.fs_group, pod_security.run_as_user);
        assert_eq!(pod.enable_service_links, Some(false));
        let limits = container.resources.clone().unwrap().limits.unwrap();
        assert!(limits.contains_key("cpu") && limits.contains_key("memory"));
        for (probe, path) in [
            (&container.liveness_probe, "/healthz"),
            (&container.readiness_probe, "/readyz"),
        ] {
            let get = probe.clone().unwrap().http_get.unwrap();
            assert_eq!(get.path.as_deref(), Some(path));
            assert_eq!(get.port, IntOrString::Int(AGENT_ADMIN_PORT));
        }
        // A kubelet probes the pod's IP: the admin listener takes every address.
        assert_eq!(flag("--admin-addr"), format!("0.0.0.0:{AGENT_ADMIN_PORT}"));
    }

    #[test]
    fn publish_addresses_are_normalised_to_https() {
        assert_eq!(
            normalize_publish_address("http://139.198.120.120:8080").unwrap(),
            ("https://139.198.120.120:8080".to_owned(), true)
        );
        assert_eq!(
            normalize_publish_address("https://tower.example.com:8080/").unwrap(),
            ("https://tower.example.com:8080".to_owned(), false)
        );
        assert_eq!(
            normalize_publish_address("10.0.0.1:8080").unwrap(),
            ("https://10.0.0.1:8080".to_owned(), true)
        );
        assert!(normalize_publish_address("ftp://x:1").is_err());
        assert!(normalize_publish_address("https://").is_err());
    }

    use serde::Deserialize;
}
