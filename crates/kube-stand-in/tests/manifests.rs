//! Tower's own manifests go into the stand-in as into a real cluster: the host's
//! `kubectl apply -k deploy/host` and a member's `kubectl create -f agent.yaml` (rendered
//! by the built `tower-server`), and the RBAC they carry means what it says.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Harness, workspace_bin};
use serde_json::Value;

const TEST_DEADLINE: Duration = Duration::from_secs(180);

fn deploy_host() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/host")
        .to_str()
        .unwrap()
        .to_owned()
}

fn forbidden(stderr: &[u8], message: &str) {
    let stderr = String::from_utf8_lossy(stderr);
    assert!(
        stderr.contains(&format!("Error from server (Forbidden): {message}")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_k_deploy_host_creates_every_object_and_its_rbac_holds() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start_strict().await;
        let dir = deploy_host();
        let out = h.ok(&["apply", "-k", &dir]).await;
        // One line per object kustomize renders, each created.
        let rendered = h.ok(&["kustomize", &dir]).await;
        let objects = rendered.split("\n---\n").count();
        assert_eq!(out.lines().count(), objects, "{out}");
        assert!(out.lines().all(|l| l.ends_with(" created")), "{out}");
        for object in [
            "namespace/ke-system",
            "serviceaccount/tower",
            "clusterrole.rbac.authorization.k8s.io/tower",
            "clusterrolebinding.rbac.authorization.k8s.io/tower",
            "role.rbac.authorization.k8s.io/tower",
            "rolebinding.rbac.authorization.k8s.io/tower",
            "service/tower",
            "deployment.apps/tower",
            "poddisruptionbudget.policy/tower",
        ] {
            assert!(out.contains(&format!("{object} created\n")), "{object}: {out}");
        }
        // Applied again: nothing to change, except that a PodDisruptionBudget's selector has
        // patchStrategy "replace" in policy/v1, so kubectl's patch for it is never empty and
        // it reports "configured" against a real apiserver too.
        let again = h.ok(&["apply", "-k", &dir]).await;
        for line in again.lines() {
            if line.starts_with("poddisruptionbudget.policy/") {
                assert_eq!(line, "poddisruptionbudget.policy/tower configured");
            } else {
                assert!(line.ends_with(" unchanged"), "{again}");
            }
        }

        // Server-side apply of the same objects works too.
        let ssa = h
            .ok(&["apply", "--server-side", "--force-conflicts", "-k", &dir])
            .await;
        assert_eq!(ssa.lines().count(), objects, "{ssa}");
        assert!(ssa.lines().all(|l| l.ends_with(" serverside-applied")), "{ssa}");

        // Read back.
        let get = |kind: &'static str| {
            let h = &h;
            async move {
                let json = h.ok(&["get", kind, "tower", "-n", "ke-system", "-o", "json"]).await;
                serde_json::from_str::<Value>(&json).unwrap()
            }
        };
        let pdb = get("poddisruptionbudget").await;
        assert_eq!(pdb["apiVersion"], "policy/v1");
        assert_eq!(pdb["spec"]["minAvailable"], 1);
        assert!(pdb["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"].is_string());
        let role = get("role").await;
        assert_eq!(role["rules"][1]["resources"][0], "deployments");
        let binding = get("clusterrolebinding").await;
        assert_eq!(binding["subjects"][0]["namespace"], "ke-system");
        assert!(binding["metadata"].get("namespace").is_none());
        assert_eq!(get("serviceaccount").await["metadata"]["namespace"], "ke-system");
        assert_eq!(get("deployment").await["spec"]["replicas"], 2);
        assert_eq!(get("service").await["spec"]["type"], "LoadBalancer");
        let pdbs = h.ok(&["get", "pdb", "-n", "ke-system"]).await;
        let header: Vec<&str> = pdbs.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["NAME", "MIN", "AVAILABLE", "MAX", "UNAVAILABLE", "ALLOWED", "DISRUPTIONS", "AGE"]);
        assert!(pdbs.lines().nth(1).unwrap().starts_with("tower"), "{pdbs}");

        // tower-server's ServiceAccount may do what rbac.yaml grants, and nothing else.
        let token = h.ok(&["create", "token", "tower", "-n", "ke-system"]).await;
        let kc = h.kubeconfig_for_token("tower.kubeconfig", token.trim());
        h.ok_with(&kc, &["get", "clusters.cluster.kubesphere.io"]).await;
        h.ok_with(&kc, &["get", "svc", "tower", "-n", "ke-system"]).await;
        h.ok_with(&kc, &["get", "deploy", "tower", "-n", "ke-system"]).await;
        // A watch of the one Deployment by name, as tower-server's replica counter.
        h.ok_with(
            &kc,
            &["get", "deploy", "-n", "ke-system", "--field-selector", "metadata.name=tower"],
        )
        .await;
        // Other Deployments and Services are not its business.
        let out = h.run_with(&kc, &["get", "deploy", "-n", "ke-system"]).await;
        forbidden(
            &out.stderr,
            r#"deployments.apps is forbidden: User "system:serviceaccount:ke-system:tower" cannot list resource "deployments" in API group "apps" in the namespace "ke-system""#,
        );
        let out = h.run_with(&kc, &["get", "svc", "-n", "default"]).await;
        forbidden(
            &out.stderr,
            r#"services is forbidden: User "system:serviceaccount:ke-system:tower" cannot list resource "services" in API group "" in the namespace "default""#,
        );
        let out = h.run_with(&kc, &["delete", "deploy", "tower", "-n", "ke-system"]).await;
        forbidden(
            &out.stderr,
            r#"deployments.apps "tower" is forbidden: User "system:serviceaccount:ke-system:tower" cannot delete resource "deployments" in API group "apps" in the namespace "ke-system""#,
        );
        let out = h.run_with(&kc, &["get", "secrets", "-n", "ke-system"]).await;
        forbidden(
            &out.stderr,
            r#"secrets is forbidden: User "system:serviceaccount:ke-system:tower" cannot list resource "secrets" in API group "" in the namespace "ke-system""#,
        );
    })
    .await
    .expect("test deadline");
}

/// Runs the built `tower-server` with `args`; returns stdout.
fn tower_server(args: &[&str]) -> String {
    let out = std::process::Command::new(workspace_bin("tower-server"))
        .args(args)
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tower-server {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_f_agent_yaml_and_the_agent_may_impersonate_users_and_groups_only() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start_strict().await;
        let secret = h.write("jwt-secret", "0123456789abcdef0123456789abcdef");
        let ca = h.write("ca.crt", h.stand_in.ca_pem());
        let (secret, ca) = (secret.to_str().unwrap(), ca.to_str().unwrap());
        let token = tower_server(&["token", "--jwt-secret-file", secret, "--cluster", "member-1"]);
        let manifest = tower_server(&[
            "agent-manifest",
            "--cluster",
            "member-1",
            "--proxy-publish-address",
            "https://203.0.113.10:8080",
            "--jwt-secret-file",
            secret,
            "--ca-cert",
            ca,
            "--token",
            token.trim(),
        ]);
        let file = h.write("agent.yaml", &manifest);
        let out = h.ok(&["create", "-f", file.to_str().unwrap()]).await;
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            [
                "namespace/ke-system created",
                "serviceaccount/tower-agent created",
                "clusterrole.rbac.authorization.k8s.io/tower-agent created",
                "clusterrolebinding.rbac.authorization.k8s.io/tower-agent created",
                "secret/tower-agent created",
                "deployment.apps/tower-agent created",
            ],
        );
        let secret: Value = serde_json::from_str(
            &h.ok(&["get", "secret", "tower-agent", "-n", "ke-system", "-o", "json"]).await,
        )
        .unwrap();
        let mut keys: Vec<&str> = secret["data"].as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["ca.crt", "cluster-key", "token"]);
        assert_eq!(secret["type"], "Opaque");
        let role: Value = serde_json::from_str(&h.ok(&["get", "clusterrole", "tower-agent", "-o", "json"]).await).unwrap();
        assert_eq!(role["rules"][0]["verbs"][0], "impersonate");

        // The agent's own token, as its pod would have it.
        let sa_token = h.ok(&["create", "token", "tower-agent", "-n", "ke-system"]).await;
        let kc = h.kubeconfig_for_token("agent.kubeconfig", sa_token.trim());
        const AGENT: &str = "system:serviceaccount:ke-system:tower-agent";
        // Impersonating a user the member has no binding for: refused as that user.
        let out = h.run_with(&kc, &["--as", "alice", "--as-group", "devs", "get", "pods"]).await;
        forbidden(
            &out.stderr,
            r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "default""#,
        );
        h.ok(&["create", "rolebinding", "alice-admin", "--clusterrole=cluster-admin", "--user=alice"]).await;
        let pods = h.ok_with(&kc, &["--as", "alice", "--as-group", "devs", "get", "pods", "-o", "name"]).await;
        assert_eq!(pods, "pod/web-0\npod/web-1\n");
        let call = h.stand_in.calls().pop().unwrap();
        assert_eq!(call.credential, "serviceaccount:ke-system/tower-agent");
        assert_eq!(call.user.as_deref(), Some("alice"));
        assert_eq!(call.groups, ["devs", "system:authenticated"]);
        // The binding is in `default` only.
        let out = h.run_with(&kc, &["--as", "alice", "get", "pods", "-n", "ke-system"]).await;
        forbidden(
            &out.stderr,
            r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "ke-system""#,
        );
        // Not granted by agent.yaml: ServiceAccounts and UIDs.
        let out = h.run_with(&kc, &["--as", "system:serviceaccount:ke-system:tower-agent", "get", "pods"]).await;
        forbidden(
            &out.stderr,
            &format!(r#"serviceaccounts "tower-agent" is forbidden: User "{AGENT}" cannot impersonate resource "serviceaccounts" in API group "" in the namespace "ke-system""#),
        );
        let out = h.run_with(&kc, &["--as", "alice", "--as-uid", "u-1", "get", "pods"]).await;
        forbidden(
            &out.stderr,
            &format!(r#"uids.authentication.k8s.io "u-1" is forbidden: User "{AGENT}" cannot impersonate resource "uids" in API group "authentication.k8s.io" at the cluster scope"#),
        );
    })
    .await
    .expect("test deadline");
}
