//! Authentication, RBAC authorization and impersonation as a real kube-apiserver does them,
//! driven by the real kubectl (and a plain HTTPS client where kubectl has no flag).

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Harness, TOKEN, body_bytes, body_json};
use serde_json::{Value, json};
use tower_kube_stand_in::{ADMIN_USER, FIXTURE_BINDING};

const TEST_DEADLINE: Duration = Duration::from_secs(180);

fn forbidden_line(message: &str) -> String {
    format!("Error from server (Forbidden): {message}")
}

/// Roles and bindings for alice (namespace `default` only), bob (one configmap by name)
/// and carol (non-resource URLs), created by the admin.
const POLICY: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: team
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: cm-editor
  namespace: default
rules:
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: alice-cm-editor
  namespace: default
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: cm-editor
subjects:
- kind: User
  name: alice
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: settings-reader
rules:
- apiGroups: [""]
  resources: [configmaps]
  resourceNames: [settings]
  verbs: [get, delete]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: bob-settings
  namespace: default
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: settings-reader
subjects:
- kind: Group
  name: readers
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: debug-viewer
rules:
- nonResourceURLs: ["/debug/*"]
  verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: carol-debug
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: debug-viewer
subjects:
- kind: User
  name: carol
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_allows_what_roles_grant_and_refuses_the_rest_with_the_apiservers_message() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start_strict().await;
        let policy = h.write("policy.yaml", POLICY);
        h.ok(&["create", "-f", policy.to_str().unwrap()]).await;

        // The bootstrap policy is there to list, and the fixture binding is not.
        let roles = h.ok(&["get", "clusterroles", "-o", "name"]).await;
        for role in ["cluster-admin", "system:discovery", "system:basic-user", "system:public-info-viewer"] {
            assert!(roles.contains(&format!("clusterrole.rbac.authorization.k8s.io/{role}\n")), "{roles}");
        }
        let bindings = h.ok(&["get", "clusterrolebindings", "-o", "name"]).await;
        assert!(bindings.contains("clusterrolebinding.rbac.authorization.k8s.io/system:public-info-viewer\n"), "{bindings}");
        assert!(!bindings.contains(FIXTURE_BINDING), "{bindings}");
        let table = h.ok(&["get", "rolebinding", "alice-cm-editor", "-o", "wide"]).await;
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(header[..3], ["NAME", "ROLE", "AGE"]);
        assert!(table.contains("Role/cm-editor"), "{table}");

        // alice: get, list, create and patch configmaps in `default` (a RoleBinding), nothing
        // in `team`, and no delete.
        fn as_alice<'a>(args: &[&'a str]) -> Vec<&'a str> {
            let mut all = vec!["--as", "alice"];
            all.extend_from_slice(args);
            all
        }
        assert!(h.ok(&as_alice(&["get", "cm", "-o", "name"])).await.contains("configmap/settings"));
        h.ok(&as_alice(&["get", "cm", "settings"])).await;
        h.ok(&as_alice(&["create", "configmap", "made-by-alice", "--from-literal=a=b"])).await;
        h.ok(&as_alice(&["patch", "cm", "made-by-alice", "-p", r#"{"data":{"a":"c"}}"#])).await;
        let stderr = h.fails(&as_alice(&["get", "cm", "-n", "team"])).await;
        assert!(
            stderr.contains(&forbidden_line(
                r#"configmaps is forbidden: User "alice" cannot list resource "configmaps" in API group "" in the namespace "team""#
            )),
            "{stderr}"
        );
        let stderr = h.fails(&as_alice(&["delete", "cm", "made-by-alice"])).await;
        assert!(
            stderr.contains(&forbidden_line(
                r#"configmaps "made-by-alice" is forbidden: User "alice" cannot delete resource "configmaps" in API group "" in the namespace "default""#
            )),
            "{stderr}"
        );
        let stderr = h.fails(&as_alice(&["get", "pods"])).await;
        assert!(stderr.contains(r#"User "alice" cannot list resource "pods""#), "{stderr}");
        let stderr = h.fails(&as_alice(&["get", "ns"])).await;
        assert!(
            stderr.contains(&forbidden_line(
                r#"namespaces is forbidden: User "alice" cannot list resource "namespaces" in API group "" at the cluster scope"#
            )),
            "{stderr}"
        );

        // Watches are authorized as `watch`: alice may in default, not in team.
        let mut c = h.connect().await;
        let alice = [("impersonate-user", "alice")];
        let resp = c
            .request_with("GET", "/api/v1/namespaces/default/configmaps?watch=1&timeoutSeconds=1", Some(TOKEN), &alice, None)
            .await;
        assert_eq!(resp.status(), 200);
        let _ = body_bytes(resp).await;
        let resp = c
            .request_with("GET", "/api/v1/watch/namespaces/team/configmaps", Some(TOKEN), &alice, None)
            .await;
        assert_eq!(resp.status(), 403);
        let status = body_json(resp).await;
        assert_eq!(
            status,
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                   "message": "configmaps is forbidden: User \"alice\" cannot watch resource \"configmaps\" in API group \"\" in the namespace \"team\"",
                   "reason": "Forbidden", "details": {"kind": "configmaps"}, "code": 403})
        );

        // bob, through his group: one configmap by name, not the others, and no list.
        fn as_bob<'a>(args: &[&'a str]) -> Vec<&'a str> {
            let mut all = vec!["--as", "bob", "--as-group", "readers"];
            all.extend_from_slice(args);
            all
        }
        h.ok(&as_bob(&["get", "cm", "settings"])).await;
        // The call records who it ran as.
        let call = h.stand_in.calls().pop().unwrap();
        assert_eq!(call.credential, "token");
        assert_eq!(call.user.as_deref(), Some("bob"));
        assert_eq!(call.groups, ["readers", "system:authenticated"]);
        let stderr = h.fails(&as_bob(&["get", "cm", "made-by-alice"])).await;
        assert!(
            stderr.contains(&forbidden_line(
                r#"configmaps "made-by-alice" is forbidden: User "bob" cannot get resource "configmaps" in API group "" in the namespace "default""#
            )),
            "{stderr}"
        );
        let stderr = h.fails(&as_bob(&["get", "cm"])).await;
        assert!(stderr.contains(r#"User "bob" cannot list resource "configmaps""#), "{stderr}");
        // A ClusterRole bound by a RoleBinding grants in that namespace only.
        let stderr = h.fails(&as_bob(&["get", "cm", "settings", "-n", "team"])).await;
        assert!(stderr.contains(r#"in the namespace "team""#), "{stderr}");
        // Without the group, bob is nobody.
        let stderr = h.fails(&["--as", "bob", "get", "cm", "settings"]).await;
        assert!(stderr.contains(r#"configmaps "settings" is forbidden: User "bob""#), "{stderr}");

        // carol: non-resource URLs under /debug/, nothing else.
        let bytes = h.ok(&["--as", "carol", "get", "--raw", "/debug/bytes?size=3"]).await;
        assert_eq!(bytes.as_bytes(), [0, 1, 2]);
        let stderr = h.fails(&["--as", "carol", "get", "--raw", "/logs/"]).await;
        assert!(
            stderr.contains(r#"forbidden: User "carol" cannot get path "/logs/""#),
            "{stderr}"
        );
        let stderr = h.fails(&["--as", "alice", "get", "--raw", "/debug/bytes?size=3"]).await;
        assert!(stderr.contains(r#"User "alice" cannot get path "/debug/bytes""#), "{stderr}");
        // Every authenticated user may discover and read /version (bootstrap policy).
        h.ok(&["--as", "nobody", "get", "--raw", "/apis"]).await;
        h.ok(&["--as", "nobody", "version"]).await;

        // Deleting the RoleBinding takes alice's rights away at once.
        h.ok(&["delete", "rolebinding", "alice-cm-editor"]).await;
        let stderr = h.fails(&as_alice(&["get", "cm", "settings"])).await;
        assert!(stderr.contains("(Forbidden)"), "{stderr}");
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fixture_binding_is_an_ordinary_object() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        // StandIn::start: anyone authenticated is cluster-admin, through a binding one can see.
        h.ok(&["--as", "alice", "get", "pods"]).await;
        let binding: Value = serde_json::from_str(
            &h.ok(&["get", "clusterrolebinding", FIXTURE_BINDING, "-o", "json"]).await,
        )
        .unwrap();
        assert_eq!(binding["roleRef"]["name"], "cluster-admin");
        assert_eq!(binding["subjects"][0]["name"], "system:authenticated");
        h.ok(&["delete", "clusterrolebinding", FIXTURE_BINDING]).await;
        let stderr = h.fails(&["--as", "alice", "get", "pods"]).await;
        assert!(
            stderr.contains(&forbidden_line(
                r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "default""#
            )),
            "{stderr}"
        );
        // The admin token is in system:masters, which RBAC never refuses.
        h.ok(&["get", "pods"]).await;
        let call = h.stand_in.calls().pop().unwrap();
        assert_eq!(call.user.as_deref(), Some(ADMIN_USER));
        assert_eq!(call.groups, ["system:masters", "system:authenticated"]);
    })
    .await
    .expect("test deadline");
}

/// An agent's ServiceAccount, with agent.yaml's ClusterRole (impersonate users and groups),
/// and a token for it.
const IMPERSONATOR: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: ke-system
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: impersonator
  namespace: ke-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: impersonator
rules:
- apiGroups: [""]
  resources: [users, groups]
  verbs: [impersonate]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: impersonator
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: impersonator
subjects:
- kind: ServiceAccount
  name: impersonator
  namespace: ke-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: pod-reader
rules:
- apiGroups: [""]
  resources: [pods, pods/log]
  verbs: [get, list, watch]
"#;

const SA: &str = "system:serviceaccount:ke-system:impersonator";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_is_authorized_per_user_group_serviceaccount_uid_and_extra() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start_strict().await;
        let file = h.write("impersonator.yaml", IMPERSONATOR);
        h.ok(&["create", "-f", file.to_str().unwrap()]).await;
        let token = h.ok(&["create", "token", "impersonator", "-n", "ke-system"]).await;
        let token = token.trim();
        let kc = h.kubeconfig_for_token("impersonator.kubeconfig", token);

        // Its own identity may do nothing but discovery.
        let out = h.run_with(&kc, &["get", "pods"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&forbidden_line(&format!(
                r#"pods is forbidden: User "{SA}" cannot list resource "pods" in API group "" in the namespace "default""#
            ))),
            "{stderr}"
        );

        // It may impersonate alice, but alice may do nothing yet: the refusal names alice.
        let out = h.run_with(&kc, &["--as", "alice", "--as-group", "devs", "get", "pods"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&forbidden_line(
                r#"pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "default""#
            )),
            "{stderr}"
        );
        let call = h.stand_in.calls().pop().unwrap();
        assert_eq!(call.credential, "serviceaccount:ke-system/impersonator");
        assert_eq!(call.user.as_deref(), Some("alice"));
        assert_eq!(call.groups, ["devs", "system:authenticated"]);

        // Bind the group: now alice reads pods, as alice.
        h.ok(&["create", "clusterrolebinding", "devs-read-pods", "--clusterrole=pod-reader", "--group=devs"]).await;
        let names = h.ok_with(&kc, &["--as", "alice", "--as-group", "devs", "get", "pods", "-o", "name"]).await;
        assert_eq!(names, "pod/web-0\npod/web-1\n");
        h.ok_with(&kc, &["--as", "alice", "--as-group", "devs", "logs", "web-0", "--tail=1"]).await;
        // …but not more than the role says, and not without the group.
        let out = h.run_with(&kc, &["--as", "alice", "--as-group", "devs", "delete", "pod", "web-0"]).await;
        assert!(String::from_utf8_lossy(&out.stderr).contains(r#"User "alice" cannot delete resource "pods""#));
        let out = h.run_with(&kc, &["--as", "alice", "get", "pods"]).await;
        assert!(String::from_utf8_lossy(&out.stderr).contains(r#"User "alice" cannot list resource "pods""#));

        // Things the ClusterRole does not grant: ServiceAccounts, UIDs, extras.
        let out = h.run_with(&kc, &["--as", "system:serviceaccount:default:default", "get", "pods"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&forbidden_line(&format!(
                r#"serviceaccounts "default" is forbidden: User "{SA}" cannot impersonate resource "serviceaccounts" in API group "" in the namespace "default""#
            ))),
            "{stderr}"
        );
        let out = h.run_with(&kc, &["--as", "alice", "--as-uid", "1234", "get", "pods"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&forbidden_line(&format!(
                r#"uids.authentication.k8s.io "1234" is forbidden: User "{SA}" cannot impersonate resource "uids" in API group "authentication.k8s.io" at the cluster scope"#
            ))),
            "{stderr}"
        );
        let mut c = h.connect().await;
        let resp = c
            .request_with(
                "GET",
                "/api/v1/namespaces/default/pods",
                Some(token),
                &[("impersonate-user", "alice"), ("impersonate-extra-scopes", "view")],
                None,
            )
            .await;
        assert_eq!(resp.status(), 403);
        let status = body_json(resp).await;
        assert_eq!(
            status["message"],
            format!(r#"userextras.authentication.k8s.io "view" is forbidden: User "{SA}" cannot impersonate resource "userextras/scopes" in API group "authentication.k8s.io" at the cluster scope"#)
        );
        assert_eq!(status["details"], json!({"name": "view", "group": "authentication.k8s.io", "kind": "userextras"}));
        // A group without a user is the apiserver's plain-text 500.
        let resp = c
            .request_with("GET", "/api/v1/namespaces/default/pods", Some(token), &[("impersonate-group", "devs")], None)
            .await;
        assert_eq!(resp.status(), 500);
        let text = String::from_utf8(body_bytes(resp).await.to_vec()).unwrap();
        assert_eq!(
            text,
            "Internal Server Error: \"/api/v1/namespaces/default/pods\": requested [{Group  devs    }] without impersonating a user\n"
        );

        // Grant the rest: a ServiceAccount impersonated without groups gets its own.
        let more = h.write(
            "more.yaml",
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: sa-impersonator\nrules:\n- apiGroups: [\"\"]\n  resources: [serviceaccounts]\n  verbs: [impersonate]\n- apiGroups: [authentication.k8s.io]\n  resources: [uids, userextras/scopes]\n  verbs: [impersonate]\n",
        );
        h.ok(&["create", "-f", more.to_str().unwrap()]).await;
        h.ok(&["create", "clusterrolebinding", "sa-impersonator", "--clusterrole=sa-impersonator", "--serviceaccount=ke-system:impersonator"]).await;
        let out = h.run_with(&kc, &["--as", "system:serviceaccount:default:default", "get", "pods"]).await;
        assert!(String::from_utf8_lossy(&out.stderr).contains(r#"User "system:serviceaccount:default:default" cannot list resource "pods""#));
        let call = h.stand_in.calls().pop().unwrap();
        assert_eq!(call.user.as_deref(), Some("system:serviceaccount:default:default"));
        assert_eq!(call.groups, ["system:serviceaccounts", "system:serviceaccounts:default", "system:authenticated"]);
        h.ok_with(&kc, &["--as", "alice", "--as-group", "devs", "--as-uid", "1234", "get", "pods"]).await;
        let resp = c
            .request_with(
                "GET",
                "/api/v1/namespaces/default/pods",
                Some(token),
                &[("impersonate-user", "alice"), ("impersonate-group", "devs"), ("impersonate-extra-scopes", "view")],
                None,
            )
            .await;
        assert_eq!(resp.status(), 200);

        // A user who may not impersonate at all: the default ServiceAccount.
        let default_token = h.ok(&["create", "token", "default"]).await;
        let mut c = h.connect().await;
        let resp = c
            .request_with("GET", "/api/v1/namespaces/default/pods", Some(default_token.trim()), &[("impersonate-user", "bob")], None)
            .await;
        assert_eq!(resp.status(), 403);
        assert_eq!(
            body_json(resp).await["message"],
            r#"users "bob" is forbidden: User "system:serviceaccount:default:default" cannot impersonate resource "users" in API group "" at the cluster scope"#
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_request_tokens_authenticate_as_their_service_account_until_it_goes() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start_strict().await;
        h.ok(&["create", "serviceaccount", "robot"]).await;
        let sa = h.ok(&["get", "sa", "-o", "name"]).await;
        assert_eq!(sa, "serviceaccount/default\nserviceaccount/robot\n", "every namespace has a default one");
        let token = h.ok(&["create", "token", "robot"]).await;
        let token = token.trim().to_owned();
        assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
        let kc = h.kubeconfig_for_token("robot.kubeconfig", &token);

        // It authenticates as the ServiceAccount, which may discover but not list pods.
        h.ok_with(&kc, &["get", "--raw", "/api"]).await;
        let out = h.run_with(&kc, &["get", "pods"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&forbidden_line(
                r#"pods is forbidden: User "system:serviceaccount:default:robot" cannot list resource "pods" in API group "" in the namespace "default""#
            )),
            "{stderr}"
        );
        let call = h.stand_in.calls().pop().unwrap();
        assert_eq!(call.credential, "serviceaccount:default/robot");
        assert_eq!(call.user.as_deref(), Some("system:serviceaccount:default:robot"));
        assert_eq!(call.groups, ["system:serviceaccounts", "system:serviceaccounts:default", "system:authenticated"]);
        // A RoleBinding to the ServiceAccount (subject namespace defaulted) lets it.
        h.ok(&["create", "role", "pod-reader", "--verb=list", "--resource=pods"]).await;
        h.ok(&["create", "rolebinding", "robot-reads", "--role=pod-reader", "--serviceaccount=default:robot"]).await;
        assert_eq!(h.ok_with(&kc, &["get", "pods", "-o", "name"]).await, "pod/web-0\npod/web-1\n");

        // The TokenRequest itself, as the API returns it.
        let mut c = h.connect().await;
        let resp = c
            .request("POST", "/api/v1/namespaces/default/serviceaccounts/robot/token", Some(TOKEN),
                     Some(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}})))
            .await;
        assert_eq!(resp.status(), 201);
        let tr = body_json(resp).await;
        assert_eq!(tr["kind"], "TokenRequest");
        assert_eq!(tr["spec"]["expirationSeconds"], 3600);
        assert!(tr["status"]["expirationTimestamp"].as_str().unwrap().ends_with('Z'));
        // Shorter than ten minutes is refused.
        let out = h.run(&["create", "token", "robot", "--duration=5m"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("may not specify a duration less than 10 minutes"), "{stderr}");
        let out = h.run(&["create", "token", "nobody"]).await;
        assert!(String::from_utf8_lossy(&out.stderr).contains(r#"serviceaccounts "nobody" not found"#));

        // Expired: 401.
        let short = h.ok(&["create", "token", "robot", "--duration=10m"]).await;
        let short_kc = h.kubeconfig_for_token("short.kubeconfig", short.trim());
        h.ok_with(&short_kc, &["get", "pods", "-o", "name"]).await;
        h.stand_in.advance_clock(Duration::from_secs(601));
        let out = h.run_with(&short_kc, &["get", "pods"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("You must be logged in to the server"), "{stderr}");
        h.ok_with(&kc, &["get", "pods", "-o", "name"]).await;

        // A token bound to a Secret dies with the Secret.
        h.ok(&["create", "secret", "generic", "binder"]).await;
        let bound = h
            .ok(&["create", "token", "robot", "--bound-object-kind=Secret", "--bound-object-name=binder"])
            .await;
        let bound_kc = h.kubeconfig_for_token("bound.kubeconfig", bound.trim());
        h.ok_with(&bound_kc, &["get", "pods", "-o", "name"]).await;
        h.ok(&["delete", "secret", "binder"]).await;
        let out = h.run_with(&bound_kc, &["get", "pods"]).await;
        assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthorized"));

        // Deleting the ServiceAccount kills its tokens, even if it comes back by name.
        h.ok(&["delete", "sa", "robot"]).await;
        let out = h.run_with(&kc, &["get", "pods"]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error: You must be logged in to the server (Unauthorized)"), "{stderr}");
        let call = h.stand_in.calls().pop().unwrap();
        assert_eq!((call.credential.as_str(), call.user.as_deref()), ("anonymous", None));
        h.ok(&["create", "serviceaccount", "robot"]).await;
        let out = h.run_with(&kc, &["get", "pods"]).await;
        assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthorized"));
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_fold_string_data_into_base64_data() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let file = h.write(
            "secret.yaml",
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\nstringData:\n  user: admin\n  note: \"a b\"\ndata:\n  user: b2xk\n  raw: AAEC\n",
        );
        h.ok(&["create", "-f", file.to_str().unwrap()]).await;
        let got: Value = serde_json::from_str(&h.ok(&["get", "secret", "creds", "-o", "json"]).await).unwrap();
        assert_eq!(got["type"], "Opaque");
        // stringData wins over data for the same key, and is not stored.
        assert_eq!(got["data"], json!({"user": "YWRtaW4=", "note": "YSBi", "raw": "AAEC"}));
        assert!(got.get("stringData").is_none(), "{got}");
        let table = h.ok(&["get", "secrets"]).await;
        let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0], ["NAME", "TYPE", "DATA", "AGE"]);
        assert_eq!(rows[1][..3], ["creds", "Opaque", "3"]);

        // Watches see secrets like any other kind.
        let mut c = h.connect().await;
        let resp = c
            .get("/api/v1/namespaces/default/secrets?watch=1&timeoutSeconds=1")
            .await;
        let mut events = common::EventReader::new(resp);
        let added = events.next(Duration::from_secs(10)).await.unwrap();
        assert_eq!((added["type"].as_str(), added["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("creds")));
        assert!(events.next(Duration::from_secs(10)).await.is_none());

        // The same on patch and with kubectl's own generator.
        h.ok(&["patch", "secret", "creds", "-p", r#"{"stringData":{"extra":"x"}}"#]).await;
        let extra = h.ok(&["get", "secret", "creds", "-o", "jsonpath={.data.extra}"]).await;
        assert_eq!(extra, "eA==");
        h.ok(&["create", "secret", "generic", "gen", "--from-literal=k=v"]).await;
        assert_eq!(h.ok(&["get", "secret", "gen", "-o", "jsonpath={.data.k}"]).await, "dg==");

        // The apiserver's refusals: bad base64, a changed type, a TLS secret without its keys.
        let bad = h.write("bad.yaml", "apiVersion: v1\nkind: Secret\nmetadata:\n  name: bad\ndata:\n  k: \"not base64!\"\n");
        let stderr = h.fails(&["create", "-f", bad.to_str().unwrap()]).await;
        assert!(stderr.contains("cannot be handled as a Secret: illegal base64 data at input byte 3"), "{stderr}");
        let stderr = h.fails(&["patch", "secret", "creds", "-p", r#"{"type":"kubernetes.io/tls"}"#]).await;
        assert!(stderr.contains("field is immutable"), "{stderr}");
        let tls = h.write("tls.yaml", "apiVersion: v1\nkind: Secret\nmetadata:\n  name: t\ntype: kubernetes.io/tls\n");
        let stderr = h.fails(&["create", "-f", tls.to_str().unwrap()]).await;
        assert!(
            stderr.contains(r#"Secret "t" is invalid: [data[tls.crt]: Required value, data[tls.key]: Required value]"#),
            "{stderr}"
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_auth_whoami_and_can_i_answer_for_the_caller() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start_strict().await;
        let me: Value =
            serde_json::from_str(&h.ok(&["auth", "whoami", "-o", "json"]).await).unwrap();
        assert_eq!(me["kind"], "SelfSubjectReview");
        assert_eq!(
            me["status"]["userInfo"],
            json!({"username": ADMIN_USER, "groups": ["system:masters", "system:authenticated"]})
        );
        // The impersonated user, as the request runs.
        let alice: Value = serde_json::from_str(
            &h.ok(&[
                "--as",
                "alice",
                "--as-group",
                "devs",
                "auth",
                "whoami",
                "-o",
                "json",
            ])
            .await,
        )
        .unwrap();
        assert_eq!(
            alice["status"]["userInfo"],
            json!({"username": "alice", "groups": ["devs", "system:authenticated"]})
        );

        let can_i = |args: &'static [&'static str]| {
            let h = &h;
            async move {
                let mut all = vec!["--as", "alice", "auth", "can-i"];
                all.extend_from_slice(args);
                let out = h.run(&all).await;
                (
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout).trim().to_owned(),
                )
            }
        };
        assert_eq!(can_i(&["list", "pods"]).await, (Some(1), "no".to_owned()));
        assert_eq!(
            can_i(&["get", "/healthz"]).await,
            (Some(0), "yes".to_owned())
        );
        assert_eq!(
            can_i(&["get", "/metrics"]).await,
            (Some(1), "no".to_owned())
        );
        h.ok(&[
            "create",
            "rolebinding",
            "alice-view",
            "--clusterrole=cluster-admin",
            "--user=alice",
            "-n",
            "kube-system",
        ])
        .await;
        assert_eq!(
            can_i(&["list", "pods", "-n", "kube-system"]).await,
            (Some(0), "yes".to_owned())
        );
        assert_eq!(can_i(&["list", "pods"]).await, (Some(1), "no".to_owned()));
        assert_eq!(
            h.ok(&["auth", "can-i", "*", "*"]).await.trim(),
            "yes",
            "system:masters may do anything"
        );
    })
    .await
    .expect("test deadline");
}

/// alice may manage roles and bindings in `default` and read pods there, nothing more.
const DELEGATE: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: rbac-manager
  namespace: default
rules:
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, create, update, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: alice-rbac-manager
  namespace: default
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: rbac-manager
subjects:
- kind: User
  name: alice
"#;

fn role_yaml(name: &str, verbs: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: {name}\n  namespace: default\nrules:\n- apiGroups: [\"\"]\n  resources: [pods]\n  verbs: [{verbs}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_and_bindings_cannot_grant_more_than_their_writer_holds() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start_strict().await;
        let delegate = h.write("delegate.yaml", DELEGATE);
        h.ok(&["create", "-f", delegate.to_str().unwrap()]).await;

        // A role within alice's own rights: fine.
        let reader = h.write("reader.yaml", &role_yaml("reader", "get, list"));
        h.ok(&["--as", "alice", "create", "-f", reader.to_str().unwrap()]).await;
        // More than she holds: the apiserver's escalation refusal.
        let deleter = h.write("deleter.yaml", &role_yaml("deleter", "get, delete, patch"));
        let stderr = h.fails(&["--as", "alice", "create", "-f", deleter.to_str().unwrap()]).await;
        assert!(
            stderr.contains(concat!(
                r#"roles.rbac.authorization.k8s.io "deleter" is forbidden: user "alice" (groups=["system:authenticated"]) is attempting to grant RBAC permissions not currently held:"#,
                "\n",
                r#"{APIGroups:[""], Resources:["pods"], Verbs:["delete" "patch"]}"#
            )),
            "{stderr}"
        );
        // The same through a patch of the role she may write.
        let stderr = h
            .fails(&["--as", "alice", "patch", "role", "reader", "--type=json", "-p",
                     r#"[{"op":"add","path":"/rules/0/verbs/-","value":"delete"}]"#])
            .await;
        assert!(stderr.contains(r#"roles.rbac.authorization.k8s.io "reader" is forbidden"#), "{stderr}");
        // Binding herself (or anyone) to cluster-admin: refused; to her own reader role: fine.
        let stderr = h
            .fails(&["--as", "alice", "create", "rolebinding", "grab", "--clusterrole=cluster-admin", "--user=alice"])
            .await;
        assert!(
            stderr.contains(r#"rolebindings.rbac.authorization.k8s.io "grab" is forbidden: user "alice" (groups=["system:authenticated"]) is attempting to grant RBAC permissions not currently held:"#),
            "{stderr}"
        );
        h.ok(&["--as", "alice", "create", "rolebinding", "bob-reads", "--role=reader", "--user=bob"]).await;
        h.ok(&["--as", "bob", "get", "pods"]).await;

        // The escalate and bind verbs lift the checks, as on a real apiserver.
        let lift = h.write(
            "lift.yaml",
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: lift\nrules:\n- apiGroups: [rbac.authorization.k8s.io]\n  resources: [roles]\n  verbs: [escalate]\n- apiGroups: [rbac.authorization.k8s.io]\n  resources: [clusterroles]\n  verbs: [bind]\n  resourceNames: [cluster-admin]\n",
        );
        h.ok(&["create", "-f", lift.to_str().unwrap()]).await;
        h.ok(&["create", "rolebinding", "alice-lift", "--clusterrole=lift", "--user=alice"]).await;
        h.ok(&["--as", "alice", "create", "-f", deleter.to_str().unwrap()]).await;
        h.ok(&["--as", "alice", "create", "rolebinding", "grab", "--clusterrole=cluster-admin", "--user=alice"]).await;
        h.ok(&["--as", "alice", "delete", "pod", "web-1"]).await;
    })
    .await
    .expect("test deadline");
}
