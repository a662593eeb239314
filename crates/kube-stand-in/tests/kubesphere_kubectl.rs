//! The real kubectl (v1.32) against the stand-in's KubeSphere `clusters` and core `services`:
//! discovery of the `cluster.kubesphere.io` group, create from YAML, tables, JSON, merge and
//! status-subresource patches, watches and delete.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Harness;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};

const TEST_DEADLINE: Duration = Duration::from_secs(120);

const CLUSTER_YAML: &str = "\
apiVersion: cluster.kubesphere.io/v1alpha1
kind: Cluster
metadata:
  name: member-a
  labels:
    cluster-role.kubesphere.io/member: \"\"
spec:
  joinFederation: true
  connection:
    type: proxy
    token: agent-token
    kubernetesAPIEndpoint: https://10.0.0.1:6443
";

const SERVICE_YAML: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: ke-system
---
apiVersion: v1
kind: Service
metadata:
  name: tower
  namespace: ke-system
spec:
  type: LoadBalancer
  selector:
    app: tower
  ports:
  - name: tunnel
    port: 8080
    targetPort: 8080
";

/// Splits kubectl's table output into rows of whitespace-separated cells (header first).
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect()
}

fn parse(json: &str) -> Value {
    serde_json::from_str(json).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_create_get_patch_status_and_delete() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let file = h.write("cluster.yaml", CLUSTER_YAML);
        assert_eq!(
            h.ok(&["create", "-f", file.to_str().unwrap()]).await.trim(),
            "cluster.cluster.kubesphere.io/member-a created"
        );
        // kubectl found the group through /apis and validated server-side.
        let create = h
            .stand_in
            .calls()
            .into_iter()
            .find(|c| c.method == "POST")
            .unwrap();
        assert!(
            create
                .path_and_query
                .starts_with("/apis/cluster.kubesphere.io/v1alpha1/clusters?"),
            "{create:?}"
        );
        assert!(create.path_and_query.contains("fieldValidation=Strict"));

        let table = rows(&h.ok(&["get", "clusters"]).await);
        assert_eq!(table[0], ["NAME", "CONNECTION", "READY", "AGE"]);
        assert_eq!(table.len(), 2, "{table:?}");
        assert_eq!(table[1][..2], ["member-a", "proxy"]);

        let got = parse(&h.ok(&["get", "cluster", "member-a", "-o", "json"]).await);
        assert_eq!(got["apiVersion"], "cluster.kubesphere.io/v1alpha1");
        assert_eq!(got["kind"], "Cluster");
        assert_eq!(
            got["spec"]["connection"],
            json!({"type": "proxy", "token": "agent-token", "kubernetesAPIEndpoint": "https://10.0.0.1:6443"})
        );
        assert_eq!(got["spec"]["joinFederation"], true);
        assert_eq!(got["metadata"]["generation"], 1);
        assert!(got["metadata"].get("namespace").is_none());
        assert!(got.get("status").is_none());

        // A merge patch of the spec bumps the generation and keeps the rest of the spec.
        h.ok(&[
            "patch", "cluster", "member-a", "--type", "merge", "-p",
            r#"{"spec":{"connection":{"type":"direct"}}}"#,
        ])
        .await;
        let got = parse(&h.ok(&["get", "cluster", "member-a", "-o", "json"]).await);
        assert_eq!(got["spec"]["connection"]["type"], "direct");
        assert_eq!(got["spec"]["connection"]["token"], "agent-token");
        assert_eq!(got["metadata"]["generation"], 2);

        // Status only through the subresource; a status in a main-object patch is dropped.
        h.ok(&[
            "patch", "cluster", "member-a", "--subresource", "status", "--type", "merge", "-p",
            r#"{"status":{"conditions":[{"type":"Ready","status":"True","reason":"AgentConnected"}]}}"#,
        ])
        .await;
        h.ok(&[
            "patch", "cluster", "member-a", "--type", "merge", "-p",
            r#"{"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#,
        ])
        .await;
        let got = parse(&h.ok(&["get", "cluster", "member-a", "-o", "json"]).await);
        assert_eq!(
            got["status"]["conditions"],
            json!([{"type": "Ready", "status": "True", "reason": "AgentConnected"}])
        );
        assert_eq!(got["metadata"]["generation"], 2);
        let table = rows(&h.ok(&["get", "clusters"]).await);
        assert_eq!(table[1][..3], ["member-a", "direct", "True"]);
        let status = parse(
            &h.ok(&["get", "cluster", "member-a", "--subresource", "status", "-o", "json"])
                .await,
        );
        assert_eq!(status["status"]["conditions"][0]["reason"], "AgentConnected");

        assert_eq!(
            h.ok(&["delete", "cluster", "member-a"]).await.trim(),
            "cluster.cluster.kubesphere.io \"member-a\" deleted"
        );
        let gone = h.run(&["get", "cluster", "member-a"]).await;
        assert!(!gone.status.success());
        let stderr = String::from_utf8_lossy(&gone.stderr);
        assert!(
            stderr.contains("clusters.cluster.kubesphere.io \"member-a\" not found"),
            "{stderr}"
        );
        assert_eq!(
            h.ok(&["get", "clusters", "-o", "name"]).await,
            "",
            "no clusters are left (and none are seeded)"
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_load_balancer_ingress_through_the_status_subresource() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let file = h.write("tower.yaml", SERVICE_YAML);
        assert_eq!(
            h.ok(&["create", "-f", file.to_str().unwrap()]).await,
            "namespace/ke-system created\nservice/tower created\n"
        );
        let table = rows(&h.ok(&["get", "svc", "-n", "ke-system"]).await);
        assert_eq!(
            table[0],
            ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
        );
        assert_eq!(table[1][..4], ["tower", "LoadBalancer", table[1][2].as_str(), "<pending>"]);
        assert!(table[1][2].starts_with("10.96."), "{table:?}");
        assert!(
            table[1][4].starts_with("8080:3") && table[1][4].ends_with("/TCP"),
            "{table:?}"
        );

        h.ok(&[
            "patch", "svc", "tower", "-n", "ke-system", "--subresource", "status", "--type",
            "merge", "-p",
            r#"{"status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.7"}]}}}"#,
        ])
        .await;
        let ip = h
            .ok(&[
                "get", "svc", "tower", "-n", "ke-system", "-o",
                "jsonpath={.status.loadBalancer.ingress[0].ip}",
            ])
            .await;
        assert_eq!(ip, "203.0.113.7");
        let table = rows(&h.ok(&["get", "svc", "tower", "-n", "ke-system"]).await);
        assert_eq!(table[1][3], "203.0.113.7");

        // A label change (a main-object write) keeps the ingress.
        h.ok(&["label", "svc", "tower", "-n", "ke-system", "tier=edge"]).await;
        let svc = parse(&h.ok(&["get", "svc", "tower", "-n", "ke-system", "-o", "json"]).await);
        assert_eq!(svc["metadata"]["labels"]["tier"], "edge");
        assert_eq!(
            svc["status"]["loadBalancer"]["ingress"],
            json!([{"ip": "203.0.113.7"}])
        );

        // A hostname instead (a JSON patch this time).
        h.ok(&[
            "patch", "svc", "tower", "-n", "ke-system", "--subresource", "status", "--type",
            "json", "-p",
            r#"[{"op":"replace","path":"/status/loadBalancer/ingress","value":[{"hostname":"tower.example.com"}]}]"#,
        ])
        .await;
        let table = rows(&h.ok(&["get", "svc", "tower", "-n", "ke-system"]).await);
        assert_eq!(table[1][3], "tower.example.com");

        // The services/status resource is discoverable, `svc` is the short name.
        let resources = h.ok(&["api-resources", "--api-group", ""]).await;
        assert!(
            resources.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["services", "svc", "v1", "true", "Service"]),
            "{resources}"
        );
        let groups = h.ok(&["api-resources", "--api-group", "cluster.kubesphere.io"]).await;
        assert!(
            groups.lines().any(|l| l.split_whitespace().collect::<Vec<_>>()
                == ["clusters", "cluster.kubesphere.io/v1alpha1", "false", "Cluster"]),
            "{groups}"
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_watches_clusters() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let mut watch = h.kubectl();
        watch.args(["get", "clusters", "-w", "--output-watch-events"]);
        let mut child = watch.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // With no clusters kubectl prints nothing until the first event; wait until its
        // watch is open so the creation is seen live.
        common::eventually("kubectl's watch to open", Duration::from_secs(30), || {
            h.stand_in.open_streams() == 1
        })
        .await;
        let file = h.write("cluster.yaml", CLUSTER_YAML);
        h.ok(&["create", "-f", file.to_str().unwrap()]).await;
        h.ok(&[
            "patch",
            "cluster",
            "member-a",
            "--subresource",
            "status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#,
        ])
        .await;
        h.ok(&["delete", "cluster", "member-a"]).await;
        let mut events = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let cells: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
                if cells.first().is_some_and(|c| c != "EVENT") {
                    events.push(cells);
                }
                if events.len() == 3 {
                    break;
                }
            }
        })
        .await;
        assert!(read.is_ok(), "kubectl printed only {events:?}");
        assert_eq!(events[0][..3], ["ADDED", "member-a", "proxy"]);
        assert_eq!(events[1][..4], ["MODIFIED", "member-a", "proxy", "True"]);
        assert_eq!(events[2][..2], ["DELETED", "member-a"]);
        child.start_kill().unwrap();
        let _ = child.wait().await;
    })
    .await
    .expect("test deadline");
}
