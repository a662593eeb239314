//! Pod Security admission, as kube-apiserver's built-in `PodSecurity` plugin enforces it
//! (kubernetes/kubernetes `staging/src/k8s.io/pod-security-admission`): the namespace's
//! `pod-security.kubernetes.io/enforce` label picks the level (none: `privileged`, the
//! default `AdmissionConfiguration`'s), and a pod that fails a check of that level is
//! refused with `violates PodSecurity "LEVEL:latest": reason (detail), …`
//! (`admission/admission.go`, `policy.AggregateCheckResult.ForbiddenDetail`).
//!
//! The checks, in the order of `policy.DefaultChecks`, each as its `policy/check_*.go`:
//! - baseline: `hostNamespaces`, `hostPathVolumes` (replaced by `restrictedVolumes` at
//!   restricted), `hostPorts`, `privileged`, `capabilities_baseline` (replaced by
//!   `capabilities_restricted` at restricted), `seccompProfile_baseline` (replaced by
//!   `seccompProfile_restricted`);
//! - restricted: `allowPrivilegeEscalation`, `capabilities_restricted`,
//!   `restrictedVolumes`, `runAsNonRoot`, `runAsUser`, `seccompProfile_restricted`.
//!
//! Not modelled: AppArmor, SELinux options, `procMount`, sysctls and Windows host
//! processes (no manifest of Tower's sets them), user namespaces, exemptions, and the
//! `warn` and `audit` modes.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, PodSpec};

/// The label that sets a namespace's enforced level.
pub const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";

/// The capabilities `capabilities_baseline` allows to be added (the container runtimes'
/// defaults).
const BASELINE_CAPABILITIES: [&str; 14] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
    "NET_RAW",
];

/// Admits `spec` (pod `name`) into a namespace labelled `labels`, or says why not, as the
/// apiserver's answer to the pod's creation.
pub fn admit(name: &str, labels: &BTreeMap<String, String>, spec: &PodSpec) -> Result<(), String> {
    // `api.PolicyToEvaluate`: a level it cannot parse is enforced as restricted.
    let restricted = match labels.get(ENFORCE_LABEL).map(String::as_str) {
        None | Some("privileged") => return Ok(()),
        Some("baseline") => false,
        Some(_) => true,
    };
    let failures = evaluate(restricted, spec);
    if failures.is_empty() {
        return Ok(());
    }
    let detail: Vec<String> = failures
        .iter()
        .map(|(reason, detail)| format!("{reason} ({detail})"))
        .collect();
    Err(format!(
        "pods \"{name}\" is forbidden: violates PodSecurity \"{}:latest\": {}",
        if restricted { "restricted" } else { "baseline" },
        detail.join(", ")
    ))
}

/// `(ForbiddenReason, ForbiddenDetail)` of every check of the baseline or the restricted
/// level the pod fails.
fn evaluate(restricted: bool, spec: &PodSpec) -> Vec<(&'static str, String)> {
    let mut failures = Vec::new();
    let mut fail = |reason: &'static str, detail: Option<String>| {
        if let Some(detail) = detail {
            failures.push((reason, detail));
        }
    };
    fail("host namespaces", host_namespaces(spec));
    if !restricted {
        fail("hostPath volumes", host_path_volumes(spec));
    }
    fail("hostPort", host_ports(spec));
    fail("privileged", privileged(spec));
    if !restricted {
        fail("non-default capabilities", baseline_capabilities(spec));
        fail("seccompProfile", unconfined_seccomp(spec));
        return failures;
    }
    fail(
        "allowPrivilegeEscalation != false",
        containers_where(spec, |c| {
            c.security_context
                .as_ref()
                .and_then(|s| s.allow_privilege_escalation)
                != Some(false)
        })
        .map(|names| format!("{names} must set securityContext.allowPrivilegeEscalation=false")),
    );
    fail("unrestricted capabilities", restricted_capabilities(spec));
    fail("restricted volume types", restricted_volumes(spec));
    fail("runAsNonRoot != true", run_as_non_root(spec));
    fail("runAsUser=0", run_as_user(spec));
    fail("seccompProfile", restricted_seccomp(spec));
    failures
}

fn containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
}

/// `container "a"` or `containers "a", "b"` (`pluralize` and `joinQuote`).
fn quoted(kind: &str, names: &[String]) -> String {
    let list = names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() == 1 {
        format!("{kind} {list}")
    } else {
        format!("{kind}s {list}")
    }
}

/// `containers "a", "b"` for the containers `bad` picks, if any.
fn containers_where(spec: &PodSpec, bad: impl Fn(&Container) -> bool) -> Option<String> {
    let names: Vec<String> = containers(spec)
        .filter(|c| bad(c))
        .map(|c| c.name.clone())
        .collect();
    (!names.is_empty()).then(|| quoted("container", &names))
}

fn host_namespaces(spec: &PodSpec) -> Option<String> {
    let set: Vec<&str> = [
        (spec.host_network, "hostNetwork=true"),
        (spec.host_pid, "hostPID=true"),
        (spec.host_ipc, "hostIPC=true"),
    ]
    .into_iter()
    .filter_map(|(on, what)| (on == Some(true)).then_some(what))
    .collect();
    (!set.is_empty()).then(|| set.join(", "))
}

fn host_path_volumes(spec: &PodSpec) -> Option<String> {
    let names: Vec<String> = spec
        .volumes
        .iter()
        .flatten()
        .filter(|v| v.host_path.is_some())
        .map(|v| v.name.clone())
        .collect();
    (!names.is_empty()).then(|| quoted("volume", &names))
}

fn host_ports(spec: &PodSpec) -> Option<String> {
    let mut names = Vec::new();
    let mut ports = BTreeSet::new();
    for container in containers(spec) {
        let used: Vec<i32> = container
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.host_port.filter(|port| *port != 0))
            .collect();
        if !used.is_empty() {
            names.push(container.name.clone());
            ports.extend(used);
        }
    }
    if names.is_empty() {
        return None;
    }
    let list = ports
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let (verb, noun) = match (names.len(), ports.len()) {
        (1, 1) => ("uses", "hostPort"),
        (1, _) => ("uses", "hostPorts"),
        (_, 1) => ("use", "hostPort"),
        _ => ("use", "hostPorts"),
    };
    Some(format!(
        "{} {verb} {noun} {list}",
        quoted("container", &names)
    ))
}

fn privileged(spec: &PodSpec) -> Option<String> {
    containers_where(spec, |c| {
        c.security_context.as_ref().and_then(|s| s.privileged) == Some(true)
    })
    .map(|names| format!("{names} must not set securityContext.privileged=true"))
}

/// The capabilities the containers add that `allowed` does not hold, and who adds them.
fn added_capabilities(spec: &PodSpec, allowed: &[&str]) -> Option<(Vec<String>, BTreeSet<String>)> {
    let mut names = Vec::new();
    let mut added = BTreeSet::new();
    for container in containers(spec) {
        let extra: Vec<String> = container
            .security_context
            .as_ref()
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| !allowed.contains(&c.as_str()))
            .collect();
        if !extra.is_empty() {
            names.push(container.name.clone());
            added.extend(extra);
        }
    }
    (!names.is_empty()).then_some((names, added))
}

fn quoted_set(set: &BTreeSet<String>) -> String {
    set.iter()
        .map(|c| format!("{c:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn baseline_capabilities(spec: &PodSpec) -> Option<String> {
    let (names, added) = added_capabilities(spec, &BASELINE_CAPABILITIES)?;
    Some(format!(
        "{} must not include {} in securityContext.capabilities.add",
        quoted("container", &names),
        quoted_set(&added)
    ))
}

fn restricted_capabilities(spec: &PodSpec) -> Option<String> {
    let mut details = Vec::new();
    if let Some(names) = containers_where(spec, |c| {
        !c.security_context
            .as_ref()
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.drop.as_ref())
            .is_some_and(|drop| drop.iter().any(|d| d == "ALL"))
    }) {
        details.push(format!(
            r#"{names} must set securityContext.capabilities.drop=["ALL"]"#
        ));
    }
    if let Some((names, added)) = added_capabilities(spec, &["NET_BIND_SERVICE"]) {
        details.push(format!(
            "{} must not include {} in securityContext.capabilities.add",
            quoted("container", &names),
            quoted_set(&added)
        ));
    }
    (!details.is_empty()).then(|| details.join("; "))
}

fn restricted_volumes(spec: &PodSpec) -> Option<String> {
    let mut names = Vec::new();
    let mut types = BTreeSet::new();
    for volume in spec.volumes.iter().flatten() {
        let allowed = volume.config_map.is_some()
            || volume.csi.is_some()
            || volume.downward_api.is_some()
            || volume.empty_dir.is_some()
            || volume.ephemeral.is_some()
            || volume.persistent_volume_claim.is_some()
            || volume.projected.is_some()
            || volume.secret.is_some();
        if allowed {
            continue;
        }
        names.push(volume.name.clone());
        types.insert(volume_type(volume).to_owned());
    }
    if names.is_empty() {
        return None;
    }
    let verb = if names.len() == 1 { "uses" } else { "use" };
    let noun = if types.len() == 1 {
        "restricted volume type"
    } else {
        "restricted volume types"
    };
    Some(format!(
        "{} {verb} {noun} {}",
        quoted("volume", &names),
        quoted_set(&types)
    ))
}

/// The name of a volume's source, as `restrictedVolumes` reports it.
fn volume_type(volume: &k8s_openapi::api::core::v1::Volume) -> &'static str {
    let sources: [(bool, &'static str); 10] = [
        (volume.host_path.is_some(), "hostPath"),
        (volume.nfs.is_some(), "nfs"),
        (volume.iscsi.is_some(), "iscsi"),
        (volume.git_repo.is_some(), "gitRepo"),
        (volume.rbd.is_some(), "rbd"),
        (volume.cephfs.is_some(), "cephfs"),
        (volume.glusterfs.is_some(), "glusterfs"),
        (volume.fc.is_some(), "fc"),
        (volume.flex_volume.is_some(), "flexVolume"),
        (volume.azure_disk.is_some(), "azureDisk"),
    ];
    sources
        .into_iter()
        .find_map(|(set, name)| set.then_some(name))
        .unwrap_or("unknown")
}

fn run_as_non_root(spec: &PodSpec) -> Option<String> {
    let pod = spec
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_non_root);
    let mut bad_setters = Vec::new();
    if pod == Some(false) {
        bad_setters.push("pod".to_owned());
    }
    let container_setting =
        |c: &Container| c.security_context.as_ref().and_then(|s| s.run_as_non_root);
    if let Some(names) = containers_where(spec, |c| container_setting(c) == Some(false)) {
        bad_setters.push(names);
    }
    if !bad_setters.is_empty() {
        return Some(format!(
            "{} must not set securityContext.runAsNonRoot=false",
            bad_setters.join(" and ")
        ));
    }
    containers_where(spec, |c| {
        container_setting(c).is_none() && pod != Some(true)
    })
    .map(|names| format!("pod or {names} must set securityContext.runAsNonRoot=true"))
}

fn run_as_user(spec: &PodSpec) -> Option<String> {
    let mut setters = Vec::new();
    if spec.security_context.as_ref().and_then(|s| s.run_as_user) == Some(0) {
        setters.push("pod".to_owned());
    }
    if let Some(names) = containers_where(spec, |c| {
        c.security_context.as_ref().and_then(|s| s.run_as_user) == Some(0)
    }) {
        setters.push(names);
    }
    (!setters.is_empty()).then(|| format!("{} must not set runAsUser=0", setters.join(" and ")))
}

fn seccomp_type(profile: Option<&k8s_openapi::api::core::v1::SeccompProfile>) -> Option<&str> {
    profile.map(|p| p.type_.as_str())
}

fn unconfined_seccomp(spec: &PodSpec) -> Option<String> {
    let mut setters = Vec::new();
    if seccomp_type(
        spec.security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.as_ref()),
    ) == Some("Unconfined")
    {
        setters.push("pod".to_owned());
    }
    if let Some(names) = containers_where(spec, |c| {
        seccomp_type(
            c.security_context
                .as_ref()
                .and_then(|s| s.seccomp_profile.as_ref()),
        ) == Some("Unconfined")
    }) {
        setters.push(names);
    }
    (!setters.is_empty()).then(|| {
        format!(
            r#"{} must not set securityContext.seccompProfile.type to "Unconfined""#,
            setters.join(" and ")
        )
    })
}

fn restricted_seccomp(spec: &PodSpec) -> Option<String> {
    let valid = |t: &str| t == "RuntimeDefault" || t == "Localhost";
    let pod = seccomp_type(
        spec.security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.as_ref()),
    );
    let mut bad_setters = Vec::new();
    let mut bad_values = BTreeSet::new();
    if let Some(t) = pod.filter(|t| !valid(t)) {
        bad_setters.push("pod".to_owned());
        bad_values.insert(t.to_owned());
    }
    let container_type = |c: &Container| {
        seccomp_type(
            c.security_context
                .as_ref()
                .and_then(|s| s.seccomp_profile.as_ref()),
        )
        .map(str::to_owned)
    };
    if let Some(names) = containers_where(spec, |c| container_type(c).is_some_and(|t| !valid(&t))) {
        bad_setters.push(names);
        bad_values.extend(
            containers(spec)
                .filter_map(container_type)
                .filter(|t| !valid(t)),
        );
    }
    if !bad_setters.is_empty() {
        return Some(format!(
            "{} must not set securityContext.seccompProfile.type to {}",
            bad_setters.join(" and "),
            quoted_set(&bad_values)
        ));
    }
    let pod_set = pod.is_some_and(valid);
    containers_where(spec, |c| container_type(c).is_none() && !pod_set).map(|names| {
        format!(
            r#"pod or {names} must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost""#
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec(yaml: &str) -> PodSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn restricted() -> BTreeMap<String, String> {
        BTreeMap::from([(ENFORCE_LABEL.to_owned(), "restricted".to_owned())])
    }

    const GOOD: &str = r#"
securityContext:
  runAsNonRoot: true
  seccompProfile: {type: RuntimeDefault}
containers:
- name: agent
  image: x
  securityContext:
    allowPrivilegeEscalation: false
    capabilities: {drop: [ALL]}
volumes:
- name: token
  secret: {secretName: tower}
"#;

    #[test]
    fn a_pod_that_meets_restricted_is_admitted_and_any_pod_without_the_label() {
        assert_eq!(admit("p", &restricted(), &spec(GOOD)), Ok(()));
        let bare = spec("containers: [{name: agent, image: x}]");
        assert_eq!(admit("p", &BTreeMap::new(), &bare), Ok(()));
    }

    #[test]
    fn a_bare_pod_is_refused_with_the_apiservers_message() {
        let bare = spec("containers: [{name: agent, image: x}]");
        let refused = admit("tower-agent-abc", &restricted(), &bare).unwrap_err();
        assert_eq!(
            refused,
            concat!(
                r#"pods "tower-agent-abc" is forbidden: violates PodSecurity "restricted:latest": "#,
                r#"allowPrivilegeEscalation != false (container "agent" must set securityContext.allowPrivilegeEscalation=false), "#,
                r#"unrestricted capabilities (container "agent" must set securityContext.capabilities.drop=["ALL"]), "#,
                r#"runAsNonRoot != true (pod or container "agent" must set securityContext.runAsNonRoot=true), "#,
                r#"seccompProfile (pod or container "agent" must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")"#,
            )
        );
    }

    #[test]
    fn each_restricted_field_taken_away_is_refused() {
        let cases = [
            (
                "allowPrivilegeEscalation: false",
                "allowPrivilegeEscalation: true",
                "allowPrivilegeEscalation != false",
            ),
            (
                "drop: [ALL]",
                "drop: [NET_RAW]",
                "unrestricted capabilities",
            ),
            (
                "drop: [ALL]",
                "drop: [ALL], add: [SYS_ADMIN]",
                r#"must not include "SYS_ADMIN""#,
            ),
            (
                "runAsNonRoot: true",
                "runAsNonRoot: false",
                "pod must not set securityContext.runAsNonRoot=false",
            ),
            (
                "seccompProfile: {type: RuntimeDefault}",
                "seccompProfile: {type: Unconfined}",
                r#"pod must not set securityContext.seccompProfile.type to "Unconfined""#,
            ),
            (
                "secret: {secretName: tower}",
                "hostPath: {path: /etc}",
                r#"volume "token" uses restricted volume type "hostPath""#,
            ),
            (
                "  runAsNonRoot: true\n",
                "  runAsNonRoot: true\n  runAsUser: 0\n",
                "runAsUser=0 (pod must not set runAsUser=0)",
            ),
            (
                "containers:\n",
                "hostNetwork: true\ncontainers:\n",
                "host namespaces (hostNetwork=true)",
            ),
        ];
        for (from, to, want) in cases {
            assert!(GOOD.contains(from), "{from}");
            let changed = spec(&GOOD.replacen(from, to, 1));
            let refused = admit("p", &restricted(), &changed).unwrap_err();
            assert!(refused.contains(want), "{to}: {refused}");
        }
    }

    #[test]
    fn baseline_refuses_only_the_baseline_checks() {
        let baseline = BTreeMap::from([(ENFORCE_LABEL.to_owned(), "baseline".to_owned())]);
        let bare = spec("containers: [{name: agent, image: x}]");
        assert_eq!(admit("p", &baseline, &bare), Ok(()));
        let privileged = spec(
            "containers: [{name: agent, image: x, securityContext: {privileged: true, capabilities: {add: [NET_ADMIN]}}}]",
        );
        let refused = admit("p", &baseline, &privileged).unwrap_err();
        assert!(refused.contains(r#"violates PodSecurity "baseline:latest": privileged (container "agent" must not set securityContext.privileged=true), non-default capabilities (container "agent" must not include "NET_ADMIN" in securityContext.capabilities.add)"#), "{refused}");
    }
}
