//! The real kubectl (v1.32) against the stand-in: what Tower's end-to-end tests rely on.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Harness, body_json, eventually, run_output};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tower_kube_stand_in::KubeconfigAuth;

const TEST_DEADLINE: Duration = Duration::from_secs(120);

/// Reads lines from a child's stdout until one satisfies `pred` (or the deadline passes).
async fn read_until(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    seen: &mut Vec<String>,
    what: &str,
    pred: impl Fn(&str) -> bool,
) {
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let hit = pred(&line);
            seen.push(line);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "kubectl never printed {what}; saw {seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_list_print_tables_and_json() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let table = h.ok(&["get", "pods"]).await;
        let mut lines = table.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows.len(), 2, "{table}");
        assert_eq!(&rows[0][..3], ["web-0", "1/1", "Running"]);
        assert_eq!(&rows[1][..3], ["web-1", "1/1", "Running"]);

        let json: serde_json::Value =
            serde_json::from_str(&h.ok(&["get", "pods", "-o", "json"]).await).unwrap();
        let items = json["items"].as_array().unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0]["spec"]["containers"][0]["name"], "app");
        assert!(
            items[0]["status"]["podIP"]
                .as_str()
                .unwrap()
                .starts_with("10.244.")
        );

        let all = h
            .ok(&["get", "pods", "--all-namespaces", "-o", "name"])
            .await;
        assert_eq!(all.lines().collect::<Vec<_>>(), ["pod/web-0", "pod/web-1"]);
        let ns = h.ok(&["get", "ns", "-o", "name"]).await;
        assert_eq!(
            ns.lines().collect::<Vec<_>>(),
            [
                "namespace/bulk",
                "namespace/default",
                "namespace/kube-system"
            ]
        );
        let cm = h
            .ok(&["get", "cm", "settings", "-o", "jsonpath={.data.mode}"])
            .await;
        assert_eq!(cm, "stand-in");

        let missing = h.run(&["get", "pod", "nope"]).await;
        assert!(!missing.status.success());
        let stderr = String::from_utf8_lossy(&missing.stderr);
        assert!(
            stderr.contains("(NotFound)") && stderr.contains("pods \"nope\" not found"),
            "{stderr}"
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_events_that_happen_while_open() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let mut watch = h.kubectl();
        watch.args(["get", "pods", "-w"]);
        let mut child = watch.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = Vec::new();
        read_until(&mut lines, &mut seen, "the initial list", |l| l.starts_with("web-1")).await;

        let pod = h.write(
            "pod.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: watched\nspec:\n  containers:\n  - name: app\n    image: nginx\n",
        );
        h.ok(&["create", "-f", pod.to_str().unwrap()]).await;
        read_until(&mut lines, &mut seen, "the new pod", |l| l.starts_with("watched ")).await;
        h.ok(&["label", "pod", "web-0", "watched=yes"]).await;
        read_until(&mut lines, &mut seen, "the relabelled pod", |l| l.starts_with("web-0 ")).await;
        h.ok(&["delete", "pod", "watched"]).await;
        read_until(&mut lines, &mut seen, "the deletion", |l| l.starts_with("watched ")).await;

        child.start_kill().unwrap();
        let _ = child.wait().await;
        eventually("the watch to end after kubectl exits", Duration::from_secs(10), || {
            h.stand_in.open_streams() == 0
        })
        .await;
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_replace_apply_label_delete_from_files() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let manifest = |value: &str| {
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: demo\n  namespace: default\ndata:\n  key: \"{value}\"\n")
        };
        let file = h.write("cm.yaml", &manifest("one"));
        let file = file.to_str().unwrap();
        // Plain `create -f`: kubectl validates server-side (fieldValidation=Strict) thanks
        // to the OpenAPI v3 document; no --validate=false needed.
        assert_eq!(h.ok(&["create", "-f", file]).await.trim(), "configmap/demo created");
        let again = h.run(&["create", "-f", file]).await;
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("AlreadyExists"));

        h.write("cm.yaml", &manifest("two"));
        assert_eq!(h.ok(&["replace", "-f", file]).await.trim(), "configmap/demo replaced");
        assert_eq!(h.ok(&["get", "cm", "demo", "-o", "jsonpath={.data.key}"]).await, "two");

        h.write("cm.yaml", &manifest("three"));
        assert_eq!(h.ok(&["apply", "-f", file]).await.trim(), "configmap/demo configured");
        assert_eq!(h.ok(&["get", "cm", "demo", "-o", "jsonpath={.data.key}"]).await, "three");

        h.ok(&["label", "cm", "demo", "team=tower"]).await;
        h.ok(&["annotate", "cm", "demo", "note=hi"]).await;
        h.ok(&["patch", "cm", "demo", "--type=json", "-p", r#"[{"op":"add","path":"/data/extra","value":"x"}]"#]).await;
        let got: serde_json::Value =
            serde_json::from_str(&h.ok(&["get", "cm", "demo", "-o", "json"]).await).unwrap();
        assert_eq!(got["metadata"]["labels"]["team"], "tower");
        assert_eq!(got["metadata"]["annotations"]["note"], "hi");
        assert_eq!(got["data"]["extra"], "x");

        assert_eq!(h.ok(&["delete", "-f", file]).await.trim(), "configmap \"demo\" deleted");
        let gone = h.run(&["get", "cm", "demo"]).await;
        assert!(!gone.status.success());

        // `apply` of something new creates it.
        let pod = h.write(
            "pod.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: applied\nspec:\n  containers:\n  - name: app\n    image: nginx\n",
        );
        assert_eq!(
            h.ok(&["apply", "-f", pod.to_str().unwrap()]).await.trim(),
            "pod/applied created"
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_creates_then_merges() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let manifest = |value: &str| {
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\n  namespace: default\ndata:\n  key: \"{value}\"\n")
        };
        let file = h.write("ssa.yaml", &manifest("one"));
        let file = file.to_str().unwrap();
        let apply = ["apply", "--server-side", "-f", file];
        assert_eq!(h.ok(&apply).await.trim(), "configmap/ssa serverside-applied");
        assert_eq!(h.ok(&["get", "cm", "ssa", "-o", "jsonpath={.data.key}"]).await, "one");
        h.write("ssa.yaml", &manifest("two"));
        assert_eq!(h.ok(&apply).await.trim(), "configmap/ssa serverside-applied");
        assert_eq!(h.ok(&["get", "cm", "ssa", "-o", "jsonpath={.data.key}"]).await, "two");
        let applies: Vec<_> = h
            .stand_in
            .calls()
            .into_iter()
            .filter(|c| c.method == "PATCH")
            .collect();
        assert_eq!(applies.len(), 2, "{applies:?}");
        assert!(
            applies.iter().all(|c| c.path_and_query.contains("fieldManager=kubectl")),
            "{applies:?}"
        );

        // The apiserver's own refusals: an apply configuration needs its type, and an
        // apply a field manager.
        let mut client = h.connect().await;
        for (body, query, code, message) in [
            (r#"{"metadata":{"name":"ssa"}}"#, "?fieldManager=me", 400, "apiVersion must be set"),
            (r#"{"apiVersion":"v1","kind":"ConfigMap"}"#, "", 422, "fieldManager: Required value"),
            (
                r#"{"apiVersion":"v1","kind":"ConfigMap"}"#,
                "?fieldManager=me&fieldValidation=Loose",
                422,
                r#"fieldValidation: Unsupported value: "Loose""#,
            ),
            (
                r#"{"apiVersion":"v1","kind":"ConfigMap"}"#,
                "?fieldManager=me&dryRun=Maybe",
                422,
                r#"dryRun: Unsupported value: []string{"Maybe"}: supported values: "All""#,
            ),
            (
                r#"{"apiVersion":"v1","kind":"ConfigMap","data":{"key":"x"}}"#,
                "?fieldManager=me",
                409,
                r#"Apply failed with 1 conflict: conflict with "kubectl": .data.key"#,
            ),
        ] {
            let path = format!("/api/v1/namespaces/default/configmaps/ssa{query}");
            let resp = client.patch(&path, "application/apply-patch+yaml", body).await;
            assert_eq!(resp.status(), code, "{path}");
            let status = body_json(resp).await;
            assert!(status["message"].as_str().unwrap().contains(message), "{status}");
        }
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_follow() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let logs = h.ok(&["logs", "web-0"]).await;
        assert_eq!(logs.lines().count(), 20);
        assert_eq!(logs.lines().next(), Some("log line 1 from web-0"));
        let tail = h.ok(&["logs", "web-1", "--tail=2"]).await;
        assert_eq!(tail, "log line 19 from web-1\nlog line 20 from web-1\n");

        let mut follow = h.kubectl();
        follow.args(["logs", "-f", "web-0", "--tail=1"]);
        let mut child = follow.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = Vec::new();
        read_until(&mut lines, &mut seen, "five followed lines", |l| {
            l == "log line 25 from web-0"
        })
        .await;
        assert_eq!(
            seen.first().map(String::as_str),
            Some("log line 20 from web-0")
        );
        assert_eq!(h.stand_in.open_streams(), 1);
        child.start_kill().unwrap();
        let _ = child.wait().await;
        eventually(
            "the log stream to end after kubectl exits",
            Duration::from_secs(10),
            || h.stand_in.open_streams() == 0,
        )
        .await;

        let missing = h.run(&["logs", "nope"]).await;
        assert!(String::from_utf8_lossy(&missing.stderr).contains("NotFound"));
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_round_trips_stdin_and_reports_exit_codes() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let input = "hello\nworld\n".repeat(1000);
        let mut cat = h.kubectl();
        cat.args(["exec", "-i", "web-0", "--", "cat"])
            .stdin(Stdio::piped());
        let mut child = cat.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = {
            let input = input.clone();
            tokio::spawn(async move {
                stdin.write_all(input.as_bytes()).await.unwrap();
                stdin.shutdown().await.unwrap();
            })
        };
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        writer.await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8(out.stdout).unwrap(), input);

        let exit = h.run(&["exec", "web-0", "--", "sh", "-c", "exit 3"]).await;
        assert_eq!(
            exit.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&exit.stderr)
        );

        let echo = h.ok(&["exec", "web-1", "--", "echo", "a", "b"]).await;
        assert_eq!(echo, "a b\n");
        let err = h.run(&["exec", "web-1", "--", "stderr", "oops"]).await;
        assert!(err.status.success());
        assert_eq!(String::from_utf8_lossy(&err.stderr), "oops\n");
        let missing = h.run(&["exec", "nope", "--", "true"]).await;
        assert!(!missing.status.success());
        eventually("exec sessions to end", Duration::from_secs(10), || {
            h.stand_in.open_streams() == 0
        })
        .await;
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_list_of_55_megabytes() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let names = h.ok(&["get", "cm", "-n", "bulk", "-o", "name"]).await;
        let names: Vec<&str> = names.lines().collect();
        assert_eq!(names.len(), 550);
        assert_eq!(names[0], "configmap/bulk-0000");
        assert_eq!(names[549], "configmap/bulk-0549");
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_client_cert_and_impersonation() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;

        // A wrong token is refused.
        let bad = h.write(
            "bad.kubeconfig",
            &h.stand_in
                .kubeconfig_yaml(KubeconfigAuth::Token)
                .replace(h.stand_in.token(), "not-the-token"),
        );
        let mut cmd = h.kubectl_with(&bad);
        cmd.args(["get", "pods"]);
        let out = run_output(cmd, &["get", "pods"]).await;
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("You must be logged in to the server"),
            "{stderr}"
        );
        assert!(
            h.stand_in
                .calls()
                .iter()
                .all(|c| c.credential == "anonymous")
        );

        // The client certificate works instead of the token.
        let cert = h.write(
            "cert.kubeconfig",
            &h.stand_in.kubeconfig_yaml(KubeconfigAuth::ClientCert),
        );
        let mut cmd = h.kubectl_with(&cert);
        cmd.args(["get", "pods", "-o", "name"]);
        let out = run_output(cmd, &["get", "pods"]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cert_call = h
            .stand_in
            .calls()
            .into_iter()
            .rfind(|c| {
                c.path_and_query
                    .starts_with("/api/v1/namespaces/default/pods")
            })
            .unwrap();
        assert_eq!(cert_call.credential, "client-cert:tower-agent-client");
        assert!(!cert_call.saw_authorization);

        // Impersonation headers are recorded, and exec runs as the impersonated user.
        h.ok(&[
            "--as",
            "alice",
            "--as-group",
            "devs",
            "--as-group",
            "ops",
            "get",
            "pods",
        ])
        .await;
        let call = h
            .stand_in
            .calls()
            .into_iter()
            .rfind(|c| {
                c.path_and_query
                    .starts_with("/api/v1/namespaces/default/pods")
            })
            .unwrap();
        assert_eq!(call.credential, "token");
        assert!(call.saw_authorization);
        assert_eq!(call.impersonate_user.as_deref(), Some("alice"));
        assert_eq!(call.impersonate_groups, ["devs", "ops"]);
        let who = h
            .ok(&["--as", "alice", "exec", "web-0", "--", "whoami"])
            .await;
        assert_eq!(who, "alice\n");
    })
    .await
    .expect("test deadline");
}
