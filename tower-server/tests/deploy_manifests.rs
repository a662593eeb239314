//! The manifests under `deploy/` parse into typed Kubernetes objects and say what
//! tower-server relies on.
//!
//! Each YAML document is deserialized into its k8s-openapi type and serialized back; the
//! result must equal the original, so a misspelt or misplaced field (which serde, like the
//! API server, would drop without a word) fails here instead of in a cluster. Then the
//! objects are checked against each other and against DESIGN.md: the replica count left
//! to the Deployment, probes on the admin port, Service ports that resolve to container
//! ports, files passed as flags that the volumes really provide, RBAC that grants exactly
//! what tower uses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use serde::de::{Deserialize, DeserializeOwned};
use serde_json::Value;

const NAMESPACE: &str = "ke-system";
/// Deliberately left out of the kustomization (it would patch KubeSphere's own CRD).
const CRD_FILE: &str = "crd-cluster.yaml";
/// Alert rules: the PrometheusRule needs the Prometheus Operator's CRD, so it is applied on
/// its own, not by the kustomization; the plain rules file and its promtool tests are not
/// Kubernetes objects (tests/tests/alerts.rs checks them with promtool).
const MONITORING_DIR: &str = "monitoring/";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn host_dir() -> PathBuf {
    deploy_dir().join("host")
}

/// Every `.yaml`/`.yml` file under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The non-empty documents of a YAML stream, as JSON values.
fn documents(source: &str, origin: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(source)
        .enumerate()
        .map(|(index, document)| {
            Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{origin}: document {index} is not valid YAML: {e}"))
        })
        .filter(|value| !value.is_null())
        .collect()
}

/// Where two JSON values differ: one line per difference, starting with its path.
fn differences(path: &str, original: &Value, round_trip: &Value, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for key in a.keys().chain(b.keys()).collect::<BTreeSet<_>>() {
                let here = format!("{path}.{key}");
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => differences(&here, x, y, out),
                    (Some(x), None) => out.push(format!("{here}: {x} is dropped by the type")),
                    (None, Some(y)) => out.push(format!("{here}: {y} appears on the way back")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                differences(&format!("{path}[{i}]"), x, y, out);
            }
        }
        // A quantity may be written as a number (`cpu: 1`); the type keeps it as text.
        (Value::Number(n), Value::String(s)) if n.to_string() == *s => {}
        (a, b) if a != b => out.push(format!("{path}: {a} comes back as {b}")),
        _ => {}
    }
}

/// Deserializes `document` as `T` and insists that nothing was lost or added on the way
/// back; the error lists the differences.
fn round_trip<T: DeserializeOwned + Serialize>(document: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(document.clone())
        .map_err(|e| format!("does not deserialize: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("does not serialize: {e}"))?;
    let mut diff = Vec::new();
    differences("", document, &back, &mut diff);
    if diff.is_empty() {
        Ok(typed)
    } else {
        Err(format!(
            "does not survive a round trip through its type (a misspelt or misplaced field?):\n  {}",
            diff.join("\n  ")
        ))
    }
}

fn strict<T: DeserializeOwned + Serialize>(document: &Value, origin: &str) -> T {
    round_trip(document).unwrap_or_else(|e| panic!("{origin}: {e}"))
}

/// The objects of a set of manifests, by kind.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    crds: Vec<CustomResourceDefinition>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    disruption_budgets: Vec<PodDisruptionBudget>,
    network_policies: Vec<NetworkPolicy>,
    /// Kustomization documents, untyped (k8s-openapi has no type for them).
    kustomizations: Vec<Value>,
    /// PrometheusRule documents, untyped (no type in k8s-openapi either).
    prometheus_rules: Vec<Value>,
    /// PodMonitor documents (the Prometheus Operator's), untyped.
    pod_monitors: Vec<Value>,
    /// For each object, its kind, name and namespace (None for cluster-scoped kinds).
    identities: Vec<(String, String, Option<String>)>,
}

impl Objects {
    /// Adds one document; panics on a kind this test does not know.
    fn add(&mut self, document: &Value, origin: &str) {
        // A Prometheus rules file (`groups`) or promtool's tests of one (`rule_files`):
        // not Kubernetes objects.
        if document.get("kind").is_none()
            && (document.get("groups").is_some() || document.get("rule_files").is_some())
        {
            return;
        }
        let api_version = document["apiVersion"].as_str().unwrap_or_default();
        let kind = document["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{origin}: no kind"));
        if kind != "Kustomization" {
            let name = document["metadata"]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("{origin}: no metadata.name"));
            let namespace = document["metadata"]["namespace"]
                .as_str()
                .map(str::to_owned);
            self.identities
                .push((kind.to_owned(), name.to_owned(), namespace));
        }
        match (api_version, kind) {
            ("v1", "Namespace") => self.namespaces.push(strict(document, origin)),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                self.crds.push(strict(document, origin))
            }
            ("v1", "ServiceAccount") => self.service_accounts.push(strict(document, origin)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                self.cluster_roles.push(strict(document, origin))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                self.cluster_role_bindings.push(strict(document, origin))
            }
            ("rbac.authorization.k8s.io/v1", "Role") => self.roles.push(strict(document, origin)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                self.role_bindings.push(strict(document, origin))
            }
            ("apps/v1", "Deployment") => self.deployments.push(strict(document, origin)),
            ("v1", "Service") => self.services.push(strict(document, origin)),
            ("policy/v1", "PodDisruptionBudget") => {
                self.disruption_budgets.push(strict(document, origin))
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                self.network_policies.push(strict(document, origin))
            }
            ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
                self.kustomizations.push(document.clone())
            }
            ("monitoring.coreos.com/v1", "PrometheusRule") => {
                let keys: Vec<&String> = document["spec"]
                    .as_object()
                    .map(|spec| spec.keys().collect())
                    .unwrap_or_default();
                assert_eq!(keys, ["groups"], "{origin}: spec holds only groups");
                self.prometheus_rules.push(document.clone())
            }
            ("monitoring.coreos.com/v1", "PodMonitor") => self.pod_monitors.push(document.clone()),
            _ => panic!(
                "{origin}: {api_version} {kind} is not a kind this test knows; teach it \
                 (deserialize it strictly) before shipping it"
            ),
        }
    }

    fn deployment(&self, name: &str) -> &Deployment {
        self.deployments
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no Deployment {name}"))
    }

    fn service(&self, name: &str) -> &Service {
        self.services
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no Service {name}"))
    }
}

/// Every document of every YAML file under `dir`, and which kinds each file holds.
fn load(dir: &Path) -> (Objects, BTreeMap<String, Vec<String>>) {
    let mut objects = Objects::default();
    let mut kinds_by_file = BTreeMap::new();
    let files = yaml_files(dir);
    assert!(!files.is_empty(), "no manifests under {}", dir.display());
    for path in files {
        let relative = path
            .strip_prefix(dir)
            .expect("under dir")
            .to_string_lossy()
            .into_owned();
        let source = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let docs = documents(&source, &relative);
        assert!(!docs.is_empty(), "{relative}: no documents");
        let mut kinds = Vec::new();
        for (index, document) in docs.iter().enumerate() {
            objects.add(document, &format!("{relative} document {index}"));
            kinds.push(
                document["kind"]
                    .as_str()
                    .unwrap_or("PrometheusRules")
                    .to_owned(),
            );
        }
        kinds_by_file.insert(relative, kinds);
    }
    (objects, kinds_by_file)
}

fn host() -> Objects {
    load(&host_dir()).0
}

fn tower_pod(objects: &Objects) -> &PodSpec {
    objects
        .deployment("tower")
        .spec
        .template
        .spec
        .as_ref()
        .expect("Deployment tower has a pod spec")
}

fn tower_container(pod: &PodSpec) -> &Container {
    assert_eq!(pod.containers.len(), 1, "one container");
    &pod.containers[0]
}

/// The value after `flag` in the container's args (`--flag value` or `--flag=value`).
fn flag<'a>(container: &'a Container, flag: &str) -> Option<&'a str> {
    let args = container.args.as_deref().unwrap_or_default();
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            arg.strip_prefix(flag)
                .and_then(|rest| rest.strip_prefix('='))
        }
    })
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// (apiGroup, resource, verb) triples a set of rules grants; panics on anything that
/// widens a rule beyond that (resource names, non-resource URLs, wildcards).
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut granted = BTreeSet::new();
    for rule in rules {
        assert!(rule.non_resource_urls.is_none(), "no non-resource URLs");
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                for verb in &rule.verbs {
                    assert!(
                        ![group, resource, verb].iter().any(|s| s.contains('*')),
                        "no wildcards: {group}/{resource} {verb}"
                    );
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    granted
}

fn triples(group: &str, resource: &str, verbs: &[&str]) -> Vec<(String, String, String)> {
    verbs
        .iter()
        .map(|verb| (group.to_owned(), resource.to_owned(), (*verb).to_owned()))
        .collect()
}

fn assert_binds_tower(role_ref: &RoleRef, subjects: Option<&[Subject]>, kind: &str) {
    assert_eq!(
        role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(role_ref.kind, kind);
    assert_eq!(role_ref.name, "tower");
    let subjects = subjects.expect("subjects");
    assert_eq!(subjects.len(), 1, "only tower's ServiceAccount is bound");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, "tower");
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn every_manifest_parses_strictly_into_its_kubernetes_type() {
    // The whole of deploy/, not only host/: a new directory is held to the same rule.
    let (objects, kinds_by_file) = load(&deploy_dir());
    assert!(!objects.deployments.is_empty() && !objects.crds.is_empty());
    for (file, kinds) in &kinds_by_file {
        assert!(!kinds.is_empty(), "{file}");
    }
}

#[test]
fn the_strict_check_catches_a_misspelt_field() {
    let misspelt = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": "tower" },
        "spec": { "type": "LoadBalancer", "sessionAfinity": "None" },
    });
    let error = round_trip::<Service>(&misspelt).expect_err("a dropped field must fail");
    assert!(error.contains(".spec.sessionAfinity"), "{error}");
}

#[test]
fn kustomization_lists_every_host_manifest_but_the_crd() {
    let dir = host_dir();
    let (objects, kinds_by_file) = load(&dir);
    assert_eq!(objects.kustomizations.len(), 1, "one kustomization.yaml");
    let kustomization = &objects.kustomizations[0];
    assert_eq!(kustomization["namespace"], NAMESPACE);
    let resources: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("resources: is a list")
        .iter()
        .map(|r| r.as_str().expect("a resource is a path").to_owned())
        .collect();
    for resource in &resources {
        assert!(
            dir.join(resource).is_file(),
            "kustomization.yaml lists {resource}, which does not exist"
        );
    }
    let manifests: BTreeSet<String> = kinds_by_file
        .iter()
        .filter(|(_, kinds)| !kinds.iter().any(|k| k == "Kustomization"))
        .map(|(file, _)| file.clone())
        .collect();
    let expected: BTreeSet<String> = manifests
        .into_iter()
        .filter(|file| file != CRD_FILE && !file.starts_with(MONITORING_DIR))
        .collect();
    assert_eq!(resources, expected, "kustomization.yaml resources");
    assert!(
        kinds_by_file.contains_key(CRD_FILE),
        "{CRD_FILE} ships beside them"
    );
    // The alert rules and the scrape configuration ship beside them too, applied on
    // their own. The PodMonitor scrapes the tower pods' admin port, where /metrics is.
    assert_eq!(objects.prometheus_rules.len(), 1, "one PrometheusRule");
    assert_eq!(objects.pod_monitors.len(), 1, "one PodMonitor");
    let monitor = &objects.pod_monitors[0];
    let pod = tower_pod(&objects);
    let pod_labels: BTreeMap<String, String> = objects
        .deployment("tower")
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("pod labels");
    let selector: BTreeMap<String, String> =
        serde_json::from_value(monitor["spec"]["selector"]["matchLabels"].clone())
            .expect("matchLabels");
    assert!(
        labels_match(&selector, &pod_labels),
        "the PodMonitor selects the tower pods"
    );
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let port = endpoint["port"].as_str().expect("port name");
    let container = tower_container(pod);
    let admin = container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(port))
        .unwrap_or_else(|| panic!("no container port {port:?}"));
    assert_eq!(admin.container_port, 9090, "the admin listener");
    assert_eq!(
        kinds_by_file.get("monitoring/prometheusrule.yaml"),
        Some(&vec!["PrometheusRule".to_owned()])
    );

    // The image the kustomization rewrites is the one the Deployment names.
    let images = kustomization["images"]
        .as_array()
        .expect("images: is a list");
    let container = tower_container(tower_pod(&objects));
    let image = container.image.as_deref().expect("image");
    assert_eq!(image, "tower:latest");
    assert!(images.iter().any(|i| i["name"] == "tower"));

    // Everything namespaced lives in ke-system (kustomize would move it there anyway,
    // but `kubectl apply -f` would not).
    for (kind, name, namespace) in &objects.identities {
        let cluster_scoped = matches!(
            kind.as_str(),
            "Namespace" | "CustomResourceDefinition" | "ClusterRole" | "ClusterRoleBinding"
        );
        if cluster_scoped {
            assert_eq!(
                namespace.as_deref(),
                None,
                "{kind} {name} is cluster-scoped"
            );
        } else {
            assert_eq!(namespace.as_deref(), Some(NAMESPACE), "{kind} {name}");
        }
    }
    assert!(
        objects
            .namespaces
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some(NAMESPACE))
    );
}

#[test]
fn deployment_runs_two_hardened_replicas_that_agree_on_the_count() {
    let objects = host();
    let deployment = objects.deployment("tower");
    let spec = &deployment.spec;
    assert_eq!(spec.replicas, Some(2));
    let pod = tower_pod(&objects);
    let container = tower_container(pod);
    assert_eq!(
        container.command.as_deref(),
        Some(&["/tower-server".to_owned()][..])
    );
    let args = container.args.as_deref().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("serve"));
    assert!(args.iter().any(|a| a == "--kubernetes"));
    assert_eq!(flag(container, "--namespace"), Some(NAMESPACE));
    assert_eq!(
        flag(container, "--server-count"),
        None,
        "no --server-count: the replica count follows this Deployment's replicas"
    );

    // Selector, pod labels, Service account.
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    assert!(labels_match(&selector, &pod_labels));
    assert_eq!(pod.service_account_name.as_deref(), Some("tower"));
    assert!(
        objects
            .service_accounts
            .iter()
            .any(|sa| sa.metadata.name.as_deref() == Some("tower"))
    );
    assert_eq!(
        pod.enable_service_links,
        Some(false),
        "Service `tower` would inject TOWER_* variables"
    );

    // Security: non-root, read-only root, no privilege escalation, no capabilities.
    let pod_security = pod.security_context.clone().unwrap_or_default();
    let security = container.security_context.clone().unwrap_or_default();
    assert_eq!(
        security.run_as_non_root.or(pod_security.run_as_non_root),
        Some(true)
    );
    assert_eq!(
        security.run_as_user.or(pod_security.run_as_user),
        Some(65532)
    );
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.and_then(|c| c.drop),
        Some(vec!["ALL".to_owned()])
    );
    let seccomp = security
        .seccomp_profile
        .or(pod_security.seccomp_profile)
        .expect("seccompProfile");
    assert_eq!(seccomp.type_, "RuntimeDefault");

    // Probes on the admin port.
    let ports: BTreeMap<String, i32> = container
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    let expected_ports = [("tunnel", 8080), ("proxy", 9443), ("admin", 9090)];
    assert_eq!(
        ports,
        expected_ports
            .iter()
            .map(|(n, p)| ((*n).to_owned(), *p))
            .collect()
    );
    for (probe, path) in [
        (&container.liveness_probe, "/healthz"),
        (&container.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("an httpGet probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(9090), "{path} on the admin port");
    }

    // Resources: requests and limits for both CPU and memory.
    let resources = container.resources.as_ref().expect("resources");
    for (what, set) in [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ] {
        let set = set.as_ref().unwrap_or_else(|| panic!("resources.{what}"));
        assert!(
            set.contains_key("cpu") && set.contains_key("memory"),
            "{what}"
        );
    }
    let limits = resources.limits.as_ref().expect("limits");
    assert_eq!(limits["cpu"].0, "1");
    assert_eq!(limits["memory"].0, "512Mi");

    // SIGTERM drains for --shutdown-grace (30s by default); the pod must get longer.
    assert!(flag(container, "--shutdown-grace").is_none());
    assert!(pod.termination_grace_period_seconds.unwrap_or(30) > 30);

    // Replicas spread over nodes.
    let anti = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("preferred podAntiAffinity");
    assert!(anti.iter().any(|term| {
        let t = &term.pod_affinity_term;
        t.topology_key == "kubernetes.io/hostname"
            && t.label_selector
                .as_ref()
                .and_then(|s| s.match_labels.as_ref())
                .is_some_and(|s| labels_match(s, &pod_labels))
    }));

    // The disruption budget covers these pods and leaves one running.
    let budget = objects
        .disruption_budgets
        .first()
        .and_then(|b| b.spec.as_ref())
        .expect("a PodDisruptionBudget");
    assert_eq!(budget.min_available, Some(IntOrString::Int(1)));
    let budget_selector = budget
        .selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default();
    assert!(labels_match(&budget_selector, &pod_labels));
}

#[test]
fn deployment_mounts_every_file_its_flags_name() {
    let objects = host();
    let pod = tower_pod(&objects);
    let container = tower_container(pod);
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let volumes = pod.volumes.as_deref().unwrap_or_default();

    // The files: where each comes from (Secret, key).
    let files = [
        (
            "--jwt-secret-file",
            "/etc/tower/jwt-secret",
            "tower-jwt",
            "jwt-secret",
        ),
        (
            "--tls-cert",
            "/etc/tower/tls/tls.crt",
            "tower-tls",
            "tls.crt",
        ),
        (
            "--tls-key",
            "/etc/tower/tls/tls.key",
            "tower-tls",
            "tls.key",
        ),
        ("--ca-cert", "/etc/tower/tls/ca.crt", "tower-tls", "ca.crt"),
    ];
    for (name, path, secret, key) in files {
        assert_eq!(flag(container, name), Some(path), "{name}");
        let mount = mounts
            .iter()
            .find(|m| path.starts_with(&format!("{}/", m.mount_path.trim_end_matches('/'))))
            .unwrap_or_else(|| panic!("no volume mounted above {path}"));
        assert_eq!(mount.read_only, Some(true), "{path} is mounted read-only");
        let relative = &path[mount.mount_path.trim_end_matches('/').len() + 1..];
        let volume = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("no volume {}", mount.name));
        let projected = volume
            .projected
            .as_ref()
            .unwrap_or_else(|| panic!("{} is a projected volume", volume.name));
        // 0440: the group (fsGroup) reads, nobody writes. YAML 1.1 (the API server)
        // and 1.2 (serde_yaml) read `0440` differently, hence the decimal in the file.
        assert_eq!(projected.default_mode, Some(0o440));
        let provided = projected
            .sources
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s.secret.as_ref())
            .filter(|s| s.name == secret && s.optional != Some(true))
            .flat_map(|s| s.items.as_deref().unwrap_or_default())
            .any(|item| item.key == key && item.path == relative);
        assert!(provided, "{path} comes from Secret {secret} key {key}");
    }

    // The state directory is writable although the root filesystem is not.
    let state = flag(container, "--state-dir").expect("--state-dir");
    let mount = mounts
        .iter()
        .find(|m| m.mount_path == state)
        .expect("a volume at --state-dir");
    assert_ne!(mount.read_only, Some(true));
    let volume = volumes
        .iter()
        .find(|v| v.name == mount.name)
        .expect("volume");
    assert!(volume.empty_dir.is_some(), "--state-dir is an emptyDir");

    // The replica's id is its pod's name; the publish address is optional.
    let env = container.env.as_deref().unwrap_or_default();
    let var = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref())
            .unwrap_or_else(|| panic!("env {name} from a reference"))
    };
    let server_id = var("TOWER_SERVER_ID").field_ref.as_ref().expect("fieldRef");
    assert_eq!(server_id.field_path, "metadata.name");
    for (name, key) in [
        ("TOWER_PROXY_PUBLISH_ADDRESS", "proxyPublishAddress"),
        ("TOWER_AGENT_IMAGE", "agentImage"),
    ] {
        let from = var(name)
            .config_map_key_ref
            .as_ref()
            .expect("configMapKeyRef");
        assert_eq!(from.name, "tower-config", "{name}");
        assert_eq!(from.key, key, "{name}");
        assert_eq!(
            from.optional,
            Some(true),
            "{name}: the ConfigMap may be absent"
        );
    }
    // `kubectl exec deploy/tower -- /tower-server agent-manifest|token|user-token` find
    // the secret and the CA without flags.
    let plain = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
            .unwrap_or_else(|| panic!("env {name}"))
    };
    assert_eq!(
        Some(plain("TOWER_JWT_SECRET_FILE")),
        flag(container, "--jwt-secret-file")
    );
    assert_eq!(Some(plain("TOWER_CA_CERT")), flag(container, "--ca-cert"));
}

#[test]
fn services_publish_the_tunnel_and_the_frontend() {
    let objects = host();
    let pod = tower_pod(&objects);
    let container = tower_container(pod);
    let pod_labels = objects
        .deployment("tower")
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let container_port = |target: &IntOrString| match target {
        IntOrString::Int(port) => *port,
        IntOrString::String(name) => {
            container
                .ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("targetPort {name} names no container port"))
                .container_port
        }
    };

    for (name, kind, port_name, port) in [
        ("tower", "LoadBalancer", "tunnel", 8080),
        ("tower-proxy", "ClusterIP", "https", 9443),
    ] {
        let spec = objects.service(name).spec.as_ref().expect("spec");
        assert_eq!(spec.type_.as_deref(), Some(kind), "Service {name} type");
        let selector = spec.selector.clone().unwrap_or_default();
        assert!(
            labels_match(&selector, &pod_labels),
            "Service {name} selects tower's pods"
        );
        let ports = spec.ports.as_deref().unwrap_or_default();
        assert_eq!(ports.len(), 1, "Service {name} has one port");
        assert_eq!(ports[0].name.as_deref(), Some(port_name));
        assert_eq!(ports[0].port, port);
        let target = ports[0]
            .target_port
            .clone()
            .unwrap_or(IntOrString::Int(port));
        assert_eq!(
            container_port(&target),
            port,
            "Service {name} reaches :{port}"
        );
        // An agent dials until it holds a tunnel to every replica; ClientIP affinity
        // would send all its dials to one.
        assert_ne!(spec.session_affinity.as_deref(), Some("ClientIP"));
    }
}

#[test]
fn network_policy_opens_the_tunnel_to_all_the_frontend_to_the_cluster_and_admin_to_monitoring() {
    let objects = host();
    assert_eq!(objects.network_policies.len(), 1);
    let policy = &objects.network_policies[0];
    let spec = policy.spec.as_ref().expect("spec");
    let pod_labels = objects
        .deployment("tower")
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let selector = spec
        .pod_selector
        .as_ref()
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default();
    assert!(
        !selector.is_empty() && labels_match(&selector, &pod_labels),
        "the policy selects tower's pods"
    );
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_owned()][..])
    );
    let container = tower_container(tower_pod(&objects));
    let named_port = |port: &IntOrString| match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            container
                .ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .find(|p| p.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("port {name} names no container port"))
                .container_port
        }
    };
    // Each rule: the ports it opens, and from where.
    let rules = spec.ingress.as_deref().unwrap_or_default();
    let mut opened = BTreeMap::new();
    for rule in rules {
        let ports = rule.ports.as_deref().unwrap_or_default();
        assert!(!ports.is_empty(), "a rule without ports opens every port");
        for port in ports {
            let number = named_port(port.port.as_ref().expect("a port"));
            assert_eq!(port.protocol.as_deref(), Some("TCP"));
            assert!(
                opened.insert(number, rule.from.clone()).is_none(),
                "port {number} in one rule only"
            );
        }
    }
    assert_eq!(
        opened.keys().copied().collect::<Vec<_>>(),
        [8080, 9090, 9443, 16000],
        "the three listeners and the kubesphere endpoints, nothing else"
    );
    // The kubesphere endpoints (plain HTTP): --kubesphere-ports' default range, from the
    // platform's API server pods only.
    let ks_rule = rules
        .iter()
        .find(|r| {
            r.ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|p| p.port == Some(IntOrString::Int(16000)))
        })
        .expect("the kubesphere rule");
    assert_eq!(
        ks_rule.ports.as_deref().unwrap_or_default()[0].end_port,
        Some(16999)
    );
    let from = ks_rule.from.as_deref().unwrap_or_default();
    assert_eq!(from.len(), 1);
    assert_eq!(
        from[0]
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone()),
        Some(BTreeMap::from([(
            "app".to_owned(),
            "ke-apiserver".to_owned()
        )]))
    );
    assert_eq!(
        from[0]
            .namespace_selector
            .as_ref()
            .and_then(|s| s.match_labels.clone()),
        Some(BTreeMap::from([(
            "kubernetes.io/metadata.name".to_owned(),
            "ke-system".to_owned()
        )]))
    );
    assert!(
        opened[&8080].is_none(),
        "the tunnel is open to every source"
    );
    let peers = |port: i32| opened[&port].clone().unwrap_or_default();
    let frontend = peers(9443);
    assert_eq!(frontend.len(), 1);
    let in_cluster = frontend[0].namespace_selector.as_ref().expect("namespaces");
    assert!(
        in_cluster.match_labels.is_none() && in_cluster.match_expressions.is_none(),
        "the frontend: every namespace of the cluster"
    );
    assert!(frontend[0].ip_block.is_none() && frontend[0].pod_selector.is_none());
    let admin = peers(9090);
    assert!(!admin.is_empty(), "the admin port is not open to all");
    for peer in &admin {
        assert!(peer.ip_block.is_none(), "admin: no address ranges");
        let namespaces = peer.namespace_selector.as_ref().expect("namespaces");
        assert!(
            namespaces.match_labels.is_some() || namespaces.match_expressions.is_some(),
            "admin: named namespaces only, not every one"
        );
    }
    // The probes the policy must not break are on the admin port (from the node).
    for probe in [&container.liveness_probe, &container.readiness_probe] {
        let port = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|g| named_port(&g.port));
        assert_eq!(port, Some(9090));
    }
}

#[test]
fn rbac_grants_exactly_what_tower_uses() {
    let objects = host();
    assert_eq!(objects.cluster_roles.len(), 1);
    assert_eq!(objects.roles.len(), 1);

    let cluster_role = &objects.cluster_roles[0];
    assert_eq!(cluster_role.metadata.name.as_deref(), Some("tower"));
    assert!(cluster_role.aggregation_rule.is_none());
    let expected: BTreeSet<_> = [
        triples(
            "cluster.kubesphere.io",
            "clusters",
            &["get", "list", "watch", "patch"],
        ),
        triples("cluster.kubesphere.io", "clusters/status", &["patch"]),
        // KubeSphere's Users, against which callers resolve.
        triples("iam.kubesphere.io", "users", &["list", "watch"]),
    ]
    .concat()
    .into_iter()
    .collect();
    let rules = cluster_role.rules.as_deref().unwrap_or_default();
    assert_eq!(grants(rules), expected, "ClusterRole tower");
    assert!(rules.iter().all(|r| r.resource_names.is_none()));

    let role = &objects.roles[0];
    assert_eq!(role.metadata.name.as_deref(), Some("tower"));
    assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
    // By name: the `tower` Service and Deployment, the port table, the platform config;
    // by any name only what must be: creating, and the clusters' Services (mc-{cluster}).
    let rules = role.rules.as_deref().unwrap_or_default();
    for rule in rules {
        let names = rule.resource_names.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        if names.is_empty() {
            assert!(
                rule.verbs == ["create"]
                    || (resources == ["services"]
                        && !rule.verbs.iter().any(|v| v == "list" || v == "watch")),
                "{rule:?}"
            );
        } else {
            assert!(
                [
                    &["tower".to_owned()][..],
                    &["tower-kubesphere-ports".to_owned()],
                    &["ke-config".to_owned()]
                ]
                .contains(&names.as_slice()),
                "{rule:?}"
            );
        }
    }
    let expected: BTreeSet<_> = [
        triples("", "services", &["get", "create", "update", "delete"]),
        triples(
            "",
            "configmaps",
            &["get", "update", "create", "list", "watch"],
        ),
        triples("apps", "deployments", &["get", "list", "watch"]),
    ]
    .concat()
    .into_iter()
    .collect();
    assert_eq!(
        grants(role.rules.as_deref().unwrap_or_default()),
        expected,
        "Role tower"
    );

    assert_eq!(objects.cluster_role_bindings.len(), 1);
    let binding = &objects.cluster_role_bindings[0];
    assert_binds_tower(
        &binding.role_ref,
        binding.subjects.as_deref(),
        "ClusterRole",
    );
    assert_eq!(objects.role_bindings.len(), 1);
    let binding = &objects.role_bindings[0];
    assert_eq!(binding.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_binds_tower(&binding.role_ref, binding.subjects.as_deref(), "Role");
}

#[test]
fn crd_is_kubesphere_cluster_with_status_and_the_connection_fields() {
    let objects = host();
    assert_eq!(objects.crds.len(), 1);
    let crd = &objects.crds[0];
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("clusters.cluster.kubesphere.io")
    );
    let spec = &crd.spec;
    assert_eq!(spec.group, "cluster.kubesphere.io");
    assert_eq!(spec.scope, "Cluster");
    assert_eq!(spec.names.kind, "Cluster");
    assert_eq!(spec.names.list_kind.as_deref(), Some("ClusterList"));
    assert_eq!(spec.names.plural, "clusters");
    assert_eq!(spec.names.singular.as_deref(), Some("cluster"));
    assert_eq!(spec.versions.len(), 1);
    let version = &spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    assert!(version.served && version.storage);
    assert!(
        version
            .subresources
            .as_ref()
            .is_some_and(|s| s.status.is_some()),
        "the status subresource"
    );
    let columns: Vec<(&str, &str)> = version
        .additional_printer_columns
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|c| (c.name.as_str(), c.json_path.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("Federated", ".spec.joinFederation"),
            ("Provider", ".spec.provider"),
            ("Active", ".spec.enable"),
            ("Version", ".status.kubernetesVersion"),
            ("Age", ".metadata.creationTimestamp"),
        ]
    );

    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("openAPIV3Schema");
    let property = |schema: &JSONSchemaProps, path: &str| -> JSONSchemaProps {
        path.split('.').fold(schema.clone(), |at, name| {
            at.properties
                .as_ref()
                .and_then(|p| p.get(name))
                .cloned()
                .unwrap_or_else(|| panic!("the schema has no {path} (at {name})"))
        })
    };
    let type_of = |path: &str| property(schema, path).type_.unwrap_or_default();
    let connection_type = property(schema, "spec.connection.type");
    assert_eq!(connection_type.type_.as_deref(), Some("string"));
    let allowed: Vec<Value> = connection_type
        .enum_
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.0)
        .collect();
    assert_eq!(allowed, [Value::from("direct"), Value::from("proxy")]);
    for (path, kind) in [
        ("spec.connection.token", "string"),
        ("spec.connection.kubernetesAPIEndpoint", "string"),
        ("spec.connection.kubeconfig", "string"),
        ("spec.connection.kubernetesAPIServerPort", "integer"),
        ("spec.joinFederation", "boolean"),
        ("spec.enable", "boolean"),
        ("status.conditions", "array"),
        ("status.kubernetesVersion", "string"),
        ("status.nodeCount", "integer"),
    ] {
        assert_eq!(type_of(path), kind, "{path}");
    }
    assert_eq!(
        property(schema, "spec.connection.kubeconfig")
            .format
            .as_deref(),
        Some("byte")
    );
    let condition = property(schema, "status.conditions")
        .items
        .and_then(|items| match items {
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s) => Some(*s),
            _ => None,
        })
        .expect("conditions items");
    for field in [
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "lastUpdateTime",
    ] {
        assert_eq!(
            property(&condition, field).type_.as_deref(),
            Some("string"),
            "{field}"
        );
    }
    // KubeSphere's objects carry fields tower does not know; they must survive.
    for path in ["spec", "spec.connection", "status"] {
        assert_eq!(
            property(schema, path).x_kubernetes_preserve_unknown_fields,
            Some(true),
            "{path}"
        );
    }
}

/// `kubectl kustomize` renders offline (unlike `kubectl apply --dry-run=client`, which
/// needs an API server for discovery); what it renders must parse as strictly.
#[test]
fn kubectl_kustomize_renders_the_host_manifests() {
    let output = match Command::new("kubectl")
        .arg("kustomize")
        .arg(host_dir())
        .env("KUBECONFIG", "/dev/null")
        .output()
    {
        Ok(output) => output,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: kubectl is not runnable here ({e}); CI installs it");
            return;
        }
        Err(e) => panic!("kubectl: {e}"),
    };
    assert!(
        output.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rendered = String::from_utf8(output.stdout).expect("UTF-8");
    let mut objects = Objects::default();
    for (index, document) in documents(&rendered, "kustomize output").iter().enumerate() {
        objects.add(document, &format!("kustomize output document {index}"));
    }
    let kinds: BTreeSet<&str> = objects
        .identities
        .iter()
        .map(|(k, _, _)| k.as_str())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
            "PodDisruptionBudget",
            "NetworkPolicy",
        ]),
        "the CRD stays out"
    );
    assert!(objects.crds.is_empty());
    let pod = tower_pod(&objects);
    assert_eq!(tower_container(pod).image.as_deref(), Some("tower:latest"));
}
