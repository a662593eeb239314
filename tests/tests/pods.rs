//! The pod runner (`tower_e2e::pod`) follows a kubelet's rules: each rule that Tower's
//! manifests depend on is checked here with a small container (`/bin/sh` as the pod's
//! user), against the stand-in API server.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::PodTemplateSpec;
use tower_e2e::pod::{ApiServer, Image, Kubelet, Overrides, SERVICE_ACCOUNT_DIR};
use tower_e2e::{Member, kubectl_with_input};

const NS: &str = "pods";
const UID: u32 = 65532;

/// A member stand-in with namespace `pods`, ServiceAccount `runner`, a Secret `tower`
/// (key `token`), a ConfigMap `settings` (key `greeting`) and a Service `tower`.
fn cluster() -> (Member, Kubelet) {
    let member = Member::start();
    let objects = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: runner, namespace: {NS}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: tower, namespace: {NS}}}
stringData: {{token: s3cret-token}}
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: settings, namespace: {NS}}}
data: {{greeting: hello}}
---
apiVersion: v1
kind: Service
metadata: {{name: tower, namespace: {NS}}}
spec:
  ports: [{{name: tunnel, port: 8080, protocol: TCP}}]
"#
    );
    kubectl_with_input(
        &member.kubeconfig,
        &["create", "-f", "-"],
        objects.as_bytes(),
    )
    .success();
    let api = ApiServer::stand_in(&member.api, &member.kubeconfig);
    let kubelet = Kubelet::new(api, Image::host_tools((UID, UID)));
    (member, kubelet)
}

/// A pod template running `script` with `/bin/sh -c` as uid 65532, with `extra` merged
/// into its spec and `container` into its container.
fn template(
    script: &str,
    spec: serde_json::Value,
    container: serde_json::Value,
) -> PodTemplateSpec {
    let mut pod = serde_json::json!({
        "metadata": {"labels": {"app": "runner-test"}},
        "spec": {
            "serviceAccountName": "runner",
            "securityContext": {"runAsUser": UID, "runAsGroup": UID, "runAsNonRoot": true},
            "containers": [{"name": "main", "image": "host-tools", "command": ["/bin/sh", "-c", script]}],
        },
    });
    merge(&mut pod["spec"], spec);
    merge(&mut pod["spec"]["containers"][0], container);
    serde_json::from_value(pod).expect("a pod template")
}

fn merge(target: &mut serde_json::Value, patch: serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (t, p) => *t = p,
    }
}

fn secret_volume(mode: u32) -> serde_json::Value {
    serde_json::json!({
        "volumes": [{"name": "tower", "secret": {"secretName": "tower", "defaultMode": mode}}],
    })
}

fn mount_tower() -> serde_json::Value {
    serde_json::json!({"volumeMounts": [{"name": "tower", "mountPath": "/etc/tower", "readOnly": true}]})
}

/// Runs `template` to its exit: (exit code, stdout, log).
fn run(kubelet: &Kubelet, template: &PodTemplateSpec) -> (i32, String, String) {
    let mut pod = kubelet
        .start(NS, "runner-test", template, &Overrides::default())
        .unwrap_or_else(|e| panic!("the pod should start: {e}"));
    let (code, stdout) = pod.wait_output(Duration::from_secs(20));
    (code, stdout, pod.log())
}

#[test]
fn a_0440_secret_is_unreadable_to_uid_65532_without_fs_group_and_readable_with_it() {
    let (_member, kubelet) = cluster();
    let script = "id -u; cat /etc/tower/token";
    let (code, stdout, log) = run(
        &kubelet,
        &template(script, secret_volume(0o440), mount_tower()),
    );
    assert_eq!(
        stdout.lines().next(),
        Some("65532"),
        "runs as the pod's user"
    );
    assert_ne!(code, 0, "the read must fail: {stdout}{log}");
    assert!(log.contains("Permission denied"), "{log}");

    let mut with_group = secret_volume(0o440);
    with_group["securityContext"] = serde_json::json!({"fsGroup": UID});
    let script = "id -G; stat -c '%a %u:%g' /etc/tower/..data/token; cat /etc/tower/token";
    let (code, stdout, log) = run(&kubelet, &template(script, with_group, mount_tower()));
    assert_eq!(code, 0, "{stdout}{log}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].split(' ').any(|g| g == "65532"),
        "fsGroup is a supplementary group: {}",
        lines[0]
    );
    assert_eq!(
        lines[1], "440 0:65532",
        "root-owned, group fsGroup, mode kept"
    );
    assert_eq!(lines[2], "s3cret-token");
}

#[test]
fn a_read_only_root_refuses_writes_outside_empty_dir_and_secret_mounts_are_read_only() {
    let (_member, kubelet) = cluster();
    let mut spec = secret_volume(0o444);
    spec["volumes"]
        .as_array_mut()
        .expect("volumes")
        .push(serde_json::json!({"name": "scratch", "emptyDir": {}}));
    let container = serde_json::json!({
        "securityContext": {"readOnlyRootFilesystem": true},
        "volumeMounts": [
            {"name": "tower", "mountPath": "/etc/tower"},
            {"name": "scratch", "mountPath": "/var/lib/tower-scratch"},
        ],
    });
    let script = "touch /tmp/tower-pod-root-write 2>&1 || echo root-refused; \
                  touch /etc/tower/new 2>&1 || echo secret-refused; \
                  echo kept > /var/lib/tower-scratch/file && cat /var/lib/tower-scratch/file";
    let (code, stdout, log) = run(&kubelet, &template(script, spec, container));
    assert_eq!(code, 0, "{stdout}{log}");
    assert!(stdout.contains("Read-only file system"), "{stdout}");
    assert!(stdout.contains("root-refused"), "{stdout}");
    assert!(stdout.contains("secret-refused"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("kept"),
        "emptyDir is writable: {stdout}"
    );
    assert!(!Path::new("/tmp/tower-pod-root-write").exists());

    // Without readOnlyRootFilesystem the same root write works (and is cleaned up).
    let script = "touch /tmp/tower-pod-root-write-$$ && echo root-written && rm /tmp/tower-pod-root-write-$$";
    let (code, stdout, log) = run(
        &kubelet,
        &template(script, serde_json::json!({}), serde_json::json!({})),
    );
    assert_eq!((code, stdout.trim()), (0, "root-written"), "{log}");
}

#[test]
fn a_missing_required_config_map_key_refuses_to_start_and_an_optional_one_is_left_out() {
    let (_member, kubelet) = cluster();
    let env = |key: &str, optional: bool| serde_json::json!({"env": [{"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": key, "optional": optional}}}]});
    let script = "echo \"${GREETING-unset}\"";
    let error = kubelet
        .start(
            NS,
            "t",
            &template(script, serde_json::json!({}), env("absent", false)),
            &Overrides::default(),
        )
        .expect_err("a missing required key must refuse the container");
    assert!(error.contains("CreateContainerConfigError"), "{error}");
    assert!(
        error.contains("couldn't find key absent in ConfigMap pods/settings"),
        "{error}"
    );

    let (code, stdout, _) = run(
        &kubelet,
        &template(script, serde_json::json!({}), env("absent", true)),
    );
    assert_eq!((code, stdout.trim()), (0, "unset"));
    let (code, stdout, _) = run(
        &kubelet,
        &template(script, serde_json::json!({}), env("greeting", false)),
    );
    assert_eq!((code, stdout.trim()), (0, "hello"));

    // secretKeyRef follows the same rules.
    let secret_env = |key: &str| serde_json::json!({"env": [{"name": "GREETING", "valueFrom": {"secretKeyRef": {"name": "tower", "key": key}}}]});
    let error = kubelet
        .start(
            NS,
            "t",
            &template(script, serde_json::json!({}), secret_env("absent")),
            &Overrides::default(),
        )
        .expect_err("a missing required Secret key must refuse the container");
    assert!(
        error.contains("couldn't find key absent in Secret pods/tower"),
        "{error}"
    );
    let (code, stdout, _) = run(
        &kubelet,
        &template(script, serde_json::json!({}), secret_env("token")),
    );
    assert_eq!((code, stdout.trim()), (0, "s3cret-token"));
}

#[test]
fn items_choose_paths_and_their_own_modes_over_default_mode() {
    let (_member, kubelet) = cluster();
    let spec = serde_json::json!({"volumes": [{"name": "tower", "secret": {
        "secretName": "tower",
        "defaultMode": 0o444,
        "items": [{"key": "token", "path": "nested/tok", "mode": 0o400}],
    }}]});
    let script =
        "stat -c '%a %u:%g' /etc/tower/..data/nested/tok; ls /etc/tower; cat /etc/tower/nested/tok";
    let (code, stdout, log) = run(&kubelet, &template(script, spec, mount_tower()));
    // 0400 root-owned: uid 65532 sees the file but cannot read it.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"400 0:0"), "{stdout}{log}");
    assert_eq!(
        lines.get(1),
        Some(&"nested"),
        "only the item's path: {stdout}"
    );
    assert_ne!(code, 0);
    assert!(log.contains("Permission denied"), "{log}");
}

#[test]
fn what_kubelet_refuses_is_refused() {
    let (_member, kubelet) = cluster();
    let start = |t: PodTemplateSpec| kubelet.start(NS, "t", &t, &Overrides::default());
    let root = template(
        "true",
        serde_json::json!({"securityContext": {"runAsUser": 0}}),
        serde_json::json!({}),
    );
    let error = start(root).expect_err("runAsNonRoot with uid 0");
    assert!(
        error.contains("runAsNonRoot and image will run as root"),
        "{error}"
    );

    let mut missing_secret = secret_volume(0o440);
    missing_secret["volumes"][0]["secret"]["secretName"] = "nope".into();
    let error = start(template("true", missing_secret, mount_tower())).expect_err("missing Secret");
    assert!(error.contains("secret \"nope\" not found"), "{error}");

    let mut optional_secret = secret_volume(0o440);
    optional_secret["volumes"][0]["secret"] =
        serde_json::json!({"secretName": "nope", "optional": true});
    let (code, stdout, log) = run(
        &kubelet,
        &template("ls /etc/tower | wc -l", optional_secret, mount_tower()),
    );
    assert_eq!(
        (code, stdout.trim()),
        (0, "0"),
        "an optional missing Secret is an empty volume: {log}"
    );

    let ghost = template(
        "true",
        serde_json::json!({"serviceAccountName": "ghost"}),
        serde_json::json!({}),
    );
    let error = start(ghost).expect_err("missing ServiceAccount");
    assert!(
        error.contains("serviceaccount \"ghost\" not found"),
        "{error}"
    );
}

#[test]
fn environment_service_links_and_the_service_account_token() {
    let (member, kubelet) = cluster();
    let container = serde_json::json!({"env": [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "WHERE", "value": "$(POD_NAMESPACE)/$(POD_NAME) $$(kept)"},
        // Only service links and the container's own env are named: not the image's ENV,
        // nor HOSTNAME, which the runtime adds.
        {"name": "NAMED", "value": "$(TOWER_SERVICE_PORT) $(PATH) $(HOSTNAME)"},
    ]});
    let script = format!(
        "env | sort; stat -c 'mode %a' {SERVICE_ACCOUNT_DIR}/..data/token; \
         echo ns=$(cat {SERVICE_ACCOUNT_DIR}/namespace); echo token=$(cat {SERVICE_ACCOUNT_DIR}/token); \
         grep -c 'BEGIN CERTIFICATE' {SERVICE_ACCOUNT_DIR}/ca.crt"
    );
    let (code, stdout, log) = run(
        &kubelet,
        &template(&script, serde_json::json!({}), container.clone()),
    );
    assert_eq!(code, 0, "{stdout}{log}");
    let lines: BTreeSet<&str> = stdout.lines().collect();
    for want in [
        "POD_NAME=runner-test",
        "POD_NAMESPACE=pods",
        "WHERE=pods/runner-test $(kept)",
        "NAMED=8080 $(PATH) $(HOSTNAME)",
        "HOSTNAME=runner-test",
        "TOWER_SERVICE_PORT=8080",
        "TOWER_SERVICE_PORT_TUNNEL=8080",
        "mode 644",
        "ns=pods",
        "1",
    ] {
        assert!(lines.contains(want), "{want:?} missing from:\n{stdout}");
    }
    let host = format!("KUBERNETES_SERVICE_HOST={}", member.api.addr().ip());
    let port = format!("KUBERNETES_SERVICE_PORT={}", member.api.addr().port());
    assert!(
        lines.contains(host.as_str()) && lines.contains(port.as_str()),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("TOWER_SERVICE_HOST=")),
        "{stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("TOWER_PORT_8080_TCP=tcp://")),
        "{stdout}"
    );

    // The mounted token is a TokenRequest token of the pod's ServiceAccount.
    let token = stdout
        .lines()
        .find_map(|l| l.strip_prefix("token="))
        .expect("a token line");
    assert!(!token.is_empty());
    let tls = tower_e2e::Https::with_ca(member.api.ca_pem(), member.api.addr());
    let reply = tls.get("/api/v1/namespaces/pods/pods", Some(token));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let call = member.api.calls().pop().expect("a call");
    assert_eq!(call.credential, "serviceaccount:pods/runner", "{call:?}");
    assert_eq!(
        call.user.as_deref(),
        Some("system:serviceaccount:pods:runner")
    );

    // enableServiceLinks: false keeps the Service's variables out, the master's in.
    let (code, stdout, _) = run(
        &kubelet,
        &template(
            "env | sort",
            serde_json::json!({"enableServiceLinks": false}),
            container,
        ),
    );
    assert_eq!(code, 0);
    assert!(!stdout.lines().any(|l| l.starts_with("TOWER_")), "{stdout}");
    assert!(
        stdout.contains("NAMED=$(TOWER_SERVICE_PORT) $(PATH) $(HOSTNAME)"),
        "{stdout}"
    );
    assert!(stdout.contains("KUBERNETES_SERVICE_HOST="), "{stdout}");
}

#[test]
fn the_machine_keeps_its_own_mounts_and_directories() {
    let mounts = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .expect("mountinfo")
            .lines()
            .map(|l| l.split(' ').skip(4).take(2).collect::<Vec<_>>().join(" "))
            .collect::<BTreeSet<String>>()
    };
    let before = mounts();
    let (_member, kubelet) = cluster();
    let mut spec = secret_volume(0o440);
    spec["securityContext"] = serde_json::json!({"fsGroup": UID});
    spec["volumes"]
        .as_array_mut()
        .expect("volumes")
        .push(serde_json::json!({"name": "state", "emptyDir": {}}));
    let container = serde_json::json!({
        "securityContext": {"readOnlyRootFilesystem": true},
        "volumeMounts": [
            {"name": "tower", "mountPath": "/etc/tower", "readOnly": true},
            {"name": "state", "mountPath": "/var/lib/tower"},
        ],
    });
    let (code, stdout, log) = run(
        &kubelet,
        &template(
            "cat /etc/tower/token /var/run/secrets/kubernetes.io/serviceaccount/namespace",
            spec,
            container,
        ),
    );
    assert_eq!((code, stdout.as_str()), (0, "s3cret-tokenpods"), "{log}");
    assert_eq!(mounts(), before, "the machine's mounts changed");
    for path in ["/etc/tower", "/var/lib/tower", "/run/secrets/kubernetes.io"] {
        assert!(!Path::new(path).exists(), "{path} was left on the machine");
    }
}

#[test]
fn a_namespace_that_enforces_restricted_admits_only_pods_that_meet_it() {
    let (member, kubelet) = cluster();
    let label = format!("{}=restricted", tower_e2e::pod::security::ENFORCE_LABEL);
    tower_e2e::kubectl(&member.kubeconfig, &["label", "namespace", NS, &label]).success();

    let bare = template("id -u", serde_json::json!({}), serde_json::json!({}));
    let refused = kubelet
        .start(NS, "runner-test", &bare, &Overrides::default())
        .expect_err("a pod short of restricted is refused");
    assert!(
        refused.starts_with(r#"pods "runner-test" is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false"#),
        "{refused}"
    );

    let hardened = template(
        "id -u",
        serde_json::json!({"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}}),
        serde_json::json!({"securityContext": {
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
        }}),
    );
    let (code, stdout, log) = run(&kubelet, &hardened);
    assert_eq!((code, stdout.trim()), (0, "65532"), "{log}");
}

/// `limits.memory` is the limit of the container's cgroup: a buffer past it is the
/// kernel's to kill (OOMKilled, exit 137), and the same command under a larger limit runs.
#[test]
fn a_container_past_its_memory_limit_is_killed() {
    let (_member, kubelet) = cluster();
    // A 128 MiB buffer, written by dd as it reads.
    let script = "dd if=/dev/zero of=/dev/null bs=128M count=1";
    let limited = |memory: &str| {
        template(
            script,
            serde_json::json!({}),
            serde_json::json!({"resources": {"limits": {"memory": memory}}}),
        )
    };
    let (code, _, log) = run(&kubelet, &limited("512Mi"));
    assert_eq!(code, 0, "{log}");
    let (code, _, log) = run(&kubelet, &limited("64Mi"));
    assert_eq!(code, 137, "OOMKilled: {log}");
    // What `kubectl exec` runs counts against the limit too.
    let pod = kubelet
        .start(
            NS,
            "runner-test",
            &template(
                "sleep 60",
                serde_json::json!({}),
                serde_json::json!({"resources": {"limits": {"memory": "64Mi"}}}),
            ),
            &Overrides::default(),
        )
        .unwrap_or_else(|e| panic!("the pod should start: {e}"));
    let small = pod.exec(&[
        "/bin/dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=16M",
        "count=1",
    ]);
    assert!(small.status.success(), "{small:?}");
    let large = pod.exec(&[
        "/bin/dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=128M",
        "count=1",
    ]);
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(large.status.signal(), Some(9), "OOMKilled: {large:?}");
}
