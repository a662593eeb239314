//! `serve --kubernetes`: Cluster objects on a host API server (the stand-in, driven with
//! kubectl) decide which agents connect; tower writes the token, the endpoint and the
//! `AgentAvailable` condition back, and produces agent.yaml from the publish address.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::Value;
use tower_e2e::kubesphere::{CLUSTER_FINALIZER, delete_held, set_cluster_finalizers};
use tower_e2e::{
    Agent, Https, Member, SECRET, Server, TempDir, admin_get, admin_get_as, agent, bin_path,
    kubectl, kubectl_with_input, server, wait_for, wait_for_with,
};

const FRONTEND_URL: &str = "https://tower.example.com:9443";

/// A tower-server whose registry is `host`'s Cluster objects, ready (first list done).
fn tower_on(host: &Member, extra: &[&str]) -> Server {
    let kubeconfig = host.kubeconfig.to_str().expect("path");
    let mut args = vec![
        "--kubernetes",
        "--kubeconfig",
        kubeconfig,
        "--frontend-url",
        FRONTEND_URL,
    ];
    args.extend_from_slice(extra);
    let server = server().args(&args).start();
    wait_for(
        "the first list of Clusters",
        Duration::from_secs(20),
        || (admin_get(server.admin, "/readyz").0 == 200).then_some(()),
    );
    server
}

/// The tunnel handshake an agent for `cluster` would send, with `token`.
fn dial_tunnel(server: &Server, cluster: &str, token: &str) -> tower_e2e::Reply {
    let upgrade = [
        ("connection", "Upgrade"),
        ("upgrade", "tower-tunnel/1"),
        ("tower-cluster", cluster),
    ];
    Https::to(server, server.tunnel).request("GET", "/v1/tunnel", Some(token), &upgrade)
}

fn create(host: &Member, yaml: &str) {
    kubectl_with_input(&host.kubeconfig, &["create", "-f", "-"], yaml.as_bytes()).success();
}

fn proxy_cluster(name: &str, token: &str) -> String {
    format!(
        "apiVersion: cluster.kubesphere.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: {name}\nspec:\n  joinFederation: true\n  connection:\n    type: proxy\n    token: \"{token}\"\n"
    )
}

fn cluster(host: &Member, name: &str) -> Option<Value> {
    let out = kubectl(&host.kubeconfig, &["get", "cluster", name, "-o", "json"]);
    (out.code() == Some(0)).then(|| serde_json::from_str(&out.success()).expect("cluster JSON"))
}

/// `AgentAvailable`'s (status, reason).
fn available(cluster: &Value) -> Option<(String, String)> {
    cluster["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "AgentAvailable")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

fn wait_available(host: &Member, server: &Server, name: &str, want: &str) -> Value {
    wait_for_with(
        &format!("Cluster {name} AgentAvailable={want}"),
        Duration::from_secs(20),
        || cluster(host, name).filter(|c| available(c).is_some_and(|(status, _)| status == want)),
        || server.process.log(),
    )
}

fn token_of(cluster: &Value) -> String {
    cluster["spec"]["connection"]["token"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A tower on a host whose Cluster CRD has `status_subresource` or not, and `member-1`'s
/// agent connected to it, its Cluster `AgentAvailable=True`.
struct Connected {
    host: Member,
    server: Server,
    agent: Agent,
    _member: Member,
}

fn connected(status_subresource: bool) -> Connected {
    let host = Member::start();
    host.api.set_cluster_status_subresource(status_subresource);
    let member = Member::start();
    let server = tower_on(&host, &[]);
    let token = Server::minter().agent_token("member-1", None);
    create(&host, &proxy_cluster("member-1", &token));
    wait_available(&host, &server, "member-1", "False");
    let agent = agent(&server, &member, "member-1")
        .token(&token)
        .connect(&server);
    wait_available(&host, &server, "member-1", "True");
    Connected {
        host,
        server,
        agent,
        _member: member,
    }
}

#[test]
fn a_proxy_cluster_gets_a_token_an_endpoint_and_its_condition_follows_the_agent() {
    let host = Member::start();
    let member = Member::start();
    let server = tower_on(&host, &[]);
    create(&host, &proxy_cluster("member-1", ""));

    // Tower mints the token and writes the endpoint; with no agent the condition is False.
    let minted = wait_for_with(
        "the token and endpoint to be written",
        Duration::from_secs(20),
        || {
            cluster(&host, "member-1").filter(|c| {
                !token_of(c).is_empty()
                    && c["spec"]["connection"]["kubernetesAPIEndpoint"]
                        == format!("{FRONTEND_URL}/clusters/member-1")
            })
        },
        || server.process.log(),
    );
    let token = token_of(&minted);
    assert_eq!(
        minted["spec"]["joinFederation"], true,
        "fields tower does not know survive its writes"
    );
    let down = wait_available(&host, &server, "member-1", "False");
    assert_eq!(available(&down).unwrap().1, "AgentNotConnected");

    // Another valid JWT for the same name is not the Cluster's token: refused.
    let other = Server::minter().agent_token("member-1", None);
    let refused = dial_tunnel(&server, "member-1", &other);
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        refused.body.contains("spec.connection.token"),
        "{}",
        refused.body
    );

    // The Cluster's own token connects, the condition turns True, kubectl works.
    let first = agent(&server, &member, "member-1")
        .token(&token)
        .via_token_file()
        .connect(&server);
    let up = wait_available(&host, &server, "member-1", "True");
    let condition = up["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "AgentAvailable")
        .unwrap()
        .clone();
    assert_eq!(condition["reason"], "AgentConnected");
    assert!(condition["lastTransitionTime"].is_string(), "{condition}");
    // The host's API server records tower-server as the writer of what it wrote (named by
    // its User-Agent), beside kubectl, which created the Cluster.
    let out = kubectl(
        &host.kubeconfig,
        &[
            "get",
            "cluster",
            "member-1",
            "--show-managed-fields",
            "-o",
            "json",
        ],
    )
    .success();
    let managed: Value = serde_json::from_str(&out).unwrap();
    let managed = managed["metadata"]["managedFields"].as_array().unwrap();
    let managers: Vec<&str> = managed
        .iter()
        .map(|e| e["manager"].as_str().unwrap())
        .collect();
    assert!(managers.contains(&"kubectl-create"), "{managers:?}");
    assert!(
        !managers.contains(&""),
        "a write with no manager: {managers:?}"
    );
    let towers: Vec<&Value> = managed
        .iter()
        .filter(|e| e["manager"] == "tower-server")
        .map(|e| &e["fieldsV1"])
        .collect();
    assert!(
        towers
            .iter()
            .any(|f| f["f:spec"]["f:connection"]["f:token"].is_object()),
        "{towers:?}"
    );
    assert!(
        towers
            .iter()
            .any(|f| f["f:status"]["f:conditions"].is_object()),
        "{towers:?}"
    );
    let kc = server.kubeconfig("member-1", "alice", &[]);
    assert!(
        kubectl(&kc, &["get", "pods", "-o", "name"])
            .success()
            .contains("pod/web-0")
    );

    // Rotating the token revokes the agent that holds the old one.
    let rotated = Server::minter().agent_token("member-1", Some(Duration::from_secs(7200)));
    kubectl(
        &host.kubeconfig,
        &[
            "patch",
            "cluster",
            "member-1",
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"spec":{{"connection":{{"token":"{rotated}"}}}}}}"#),
        ],
    )
    .success();
    wait_for(
        "the revoked tunnel to close",
        Duration::from_secs(10),
        || (!server.connected("member-1")).then_some(()),
    );
    wait_available(&host, &server, "member-1", "False");
    wait_for(
        "the old agent to be refused",
        Duration::from_secs(10),
        || {
            first
                .process
                .log()
                .contains("spec.connection.token")
                .then_some(())
        },
    );
    assert!(!server.connected("member-1"), "the old token must stay out");
    // The operator re-applies agent.yaml: Kubernetes updates the mounted Secret in place,
    // and the same agent process, which reads its token file before every dial, is back.
    std::fs::write(&first.token_file, format!("{rotated}\n")).expect("rotate the token file");
    wait_for_with(
        "the agent to redial with its rotated token file",
        Duration::from_secs(20),
        || server.connected("member-1").then_some(()),
        || first.process.log(),
    );
    assert!(
        first.process.log().contains("token file rotated"),
        "{}",
        first.process.log()
    );
    wait_available(&host, &server, "member-1", "True");

    // Deleting the Cluster closes its tunnel within seconds, and it stays closed.
    kubectl(&host.kubeconfig, &["delete", "cluster", "member-1"]).success();
    wait_for(
        "the deleted cluster's tunnel to close",
        Duration::from_secs(10),
        || (!server.connected("member-1")).then_some(()),
    );
    let gone = kubectl(&kc, &["get", "pods"]);
    assert_ne!(gone.code(), Some(0));
    assert!(gone.stderr().contains("member-1"), "{}", gone.stderr());
    drop(first);
}

#[test]
fn the_condition_is_written_where_kubesphere_crds_have_no_status_subresource() {
    // False with no agent, then True with it (`connected` waits for both).
    connected(false);
}

/// What KubeSphere's cluster controller does each sync: its condition set on the Cluster it
/// read, written back with an `Update` (a PUT carrying that resourceVersion), as
/// `syncCluster` and `updateClusterCondition` in kubesphere/kubesphere
/// `pkg/controller/cluster/cluster_controller.go` do; to `…/status` where the CRD has
/// a status subresource (KubeSphere's own has none).
fn kubesphere_sets_condition(
    host: &Member,
    status_subresource: bool,
    name: &str,
    type_: &str,
    status: &str,
) {
    let mut read = cluster(host, name).expect("the Cluster");
    let mut conditions: Vec<Value> = read["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    conditions.retain(|c| c["type"] != type_);
    conditions.push(serde_json::json!({
        "type": type_, "status": status, "reason": type_, "message": "set by ks-controller-manager",
        "lastUpdateTime": "2026-12-06T00:00:00Z", "lastTransitionTime": "2026-12-06T00:00:00Z",
    }));
    read["status"]["conditions"] = Value::Array(conditions);
    let mut args = vec!["replace", "-f", "-"];
    if status_subresource {
        args.push("--subresource=status");
    }
    kubectl_with_input(&host.kubeconfig, &args, read.to_string().as_bytes()).success();
}

fn condition_status(cluster: &Value, type_: &str) -> Option<String> {
    cluster["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str())
        .map(str::to_owned)
}

#[test]
fn a_condition_write_keeps_what_kubesphere_wrote_since_towers_copy() {
    for status_subresource in [false, true] {
        let Connected {
            host,
            server,
            agent,
            _member,
        } = connected(status_subresource);

        // Tower's copy of the Cluster stops following (a watch cache that lags), and
        // KubeSphere's controller writes its condition meanwhile.
        host.api.hold_watch_events(true);
        kubesphere_sets_condition(&host, status_subresource, "member-1", "Ready", "True");
        // The agent leaves: tower writes AgentAvailable=False from its stale copy. The API
        // server refuses that copy's resourceVersion; tower reads the Cluster again.
        drop(agent);
        let after = wait_available(&host, &server, "member-1", "False");
        assert_eq!(
            condition_status(&after, "Ready").as_deref(),
            Some("True"),
            "KubeSphere's condition was lost (status subresource {status_subresource}): {}\n{}",
            after["status"],
            server.process.log()
        );
        host.api.hold_watch_events(false);
    }
}

#[test]
fn a_status_subresource_added_under_a_running_tower_is_found() {
    let Connected {
        host,
        server,
        agent,
        _member,
    } = connected(false);
    // KubeSphere's CRD gains a status subresource (an upgrade): a status written with the
    // object is now ignored, with a 200.
    host.api.set_cluster_status_subresource(true);
    drop(agent);
    wait_available(&host, &server, "member-1", "False");
    assert!(
        server
            .process
            .log()
            .contains("trying its status subresource"),
        "{}",
        server.process.log()
    );
}

/// KubeSphere's cluster controller puts `finalizer.cluster.kubesphere.io` on every Cluster;
/// when one is deleted it unjoins the member and cleans up there, through the agent, and
/// only then removes the finalizer (`syncCluster` in kubesphere/kubesphere
/// `pkg/controller/cluster/cluster_controller.go`).
#[test]
fn a_terminating_cluster_stays_routed_and_untouched_until_its_finalizer_is_removed() {
    let host = Member::start();
    let member = Member::start();
    let server = tower_on(&host, &[]);
    let token = Server::minter().agent_token("member-1", None);
    create(&host, &proxy_cluster("member-1", &token));
    set_cluster_finalizers(&host.kubeconfig, "member-1", &[CLUSTER_FINALIZER]);
    let _agent = agent(&server, &member, "member-1")
        .token(&token)
        .connect(&server);
    wait_available(&host, &server, "member-1", "True");
    let kc = server.kubeconfig("member-1", "alice", &[]);

    let terminating = delete_held(&host.kubeconfig, "member-1");
    // The controller's cleanup reaches the member through tower meanwhile.
    assert!(
        kubectl(&kc, &["get", "pods", "-o", "name"])
            .success()
            .contains("pod/web-0")
    );
    // Tower writes nothing into a Cluster on its way out: an endpoint it would otherwise
    // put right at once stays as written.
    let skipped = "the Cluster is being deleted";
    let checks = || server.process.log().matches(skipped).count();
    wait_for("tower to see the deletion", Duration::from_secs(20), || {
        (checks() >= 1).then_some(())
    });
    let before = checks();
    kubectl(
        &host.kubeconfig,
        &[
            "patch",
            "cluster",
            "member-1",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"connection":{"kubernetesAPIEndpoint":"https://elsewhere.example"}}}"#,
        ],
    )
    .success();
    wait_for(
        "tower to check the changed Cluster",
        Duration::from_secs(20),
        || (checks() > before).then_some(()),
    );
    let after = cluster(&host, "member-1").expect("still terminating");
    assert_eq!(
        after["spec"]["connection"]["kubernetesAPIEndpoint"],
        "https://elsewhere.example",
        "{}",
        server.process.log()
    );
    assert_eq!(token_of(&after), token_of(&terminating));

    // The controller is done: it removes its finalizer, the Cluster goes, so does the route.
    set_cluster_finalizers(&host.kubeconfig, "member-1", &[]);
    assert!(cluster(&host, "member-1").is_none());
    wait_for(
        "the deleted cluster's tunnel to close",
        Duration::from_secs(10),
        || (!server.connected("member-1")).then_some(()),
    );
    assert_ne!(kubectl(&kc, &["get", "pods"]).code(), Some(0));
}

#[test]
fn two_replicas_share_one_minted_token_and_keep_the_condition_true_when_one_leaves() {
    let host = Member::start();
    let member = Member::start();
    let pki = tower_e2e::OperatorPki::new();
    let replica = |id: &str| {
        let mut args = vec!["--server-id", id, "--server-count", "2"];
        args.extend(pki.flags());
        tower_on(&host, &args)
    };
    let a = replica("tower-a");
    let b = replica("tower-b");
    create(&host, &proxy_cluster("member-1", ""));
    let minted = wait_for("a token", Duration::from_secs(20), || {
        cluster(&host, "member-1")
            .map(|c| token_of(&c))
            .filter(|t| !t.is_empty())
    });
    let balancer = tower_e2e::Relay::balance(&[a.tunnel, b.tunnel]);
    let _agent = agent(&a, &member, "member-1")
        .token(&minted)
        .proxy_server(balancer.addr)
        .spawn();
    wait_for("tunnels to both replicas", Duration::from_secs(20), || {
        (a.connected("member-1") && b.connected("member-1")).then_some(())
    });
    wait_available(&host, &a, "member-1", "True");
    // Both replicas saw the empty token; only one token was ever written.
    let now = cluster(&host, "member-1").expect("cluster");
    assert_eq!(
        token_of(&now),
        minted,
        "a second replica overwrote the token"
    );

    // Replica a leaves (SIGTERM): it says False on its way out; b still holds the
    // cluster's tunnel and says True again.
    let status_writes = || {
        host.api
            .calls()
            .iter()
            .filter(|c| {
                c.method == "PATCH" && c.path_and_query.contains("/clusters/member-1/status")
            })
            .count()
    };
    let before = status_writes();
    a.process.terminate();
    // The False itself, not only a count of writes: a's last words. a logs them once its
    // PATCH is answered, and b's True (set off by the watch event of that PATCH) may be
    // counted first, so both are waited for.
    wait_for_with(
        "False from a (in its log), then True from b",
        Duration::from_secs(20),
        || {
            (status_writes() >= before + 2
                && a.process
                    .log()
                    .contains("set condition AgentAvailable cluster=member-1 status=False"))
            .then_some(())
        },
        || a.process.log(),
    );
    let after = wait_available(&host, &b, "member-1", "True");
    assert!(b.connected("member-1"));
    eprintln!("condition after replica a left: {:?}", available(&after));
}

#[test]
fn the_replica_count_follows_the_deployment_and_agents_follow_it() {
    let host = Member::start();
    let member = Member::start();
    create(
        &host,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ke-system\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: tower\n  namespace: ke-system\nspec:\n  replicas: 1\n  selector:\n    matchLabels:\n      app: tower\n  template:\n    metadata:\n      labels:\n        app: tower\n    spec:\n      containers:\n      - name: tower\n        image: tower:test\n",
    );
    let pki = tower_e2e::OperatorPki::new();
    // No --server-count: the Deployment says how many replicas there are.
    let replica = |id: &str| {
        let mut args = vec!["--server-id", id];
        args.extend(pki.flags());
        tower_on(&host, &args)
    };
    let token = Server::minter().agent_token("member-1", None);
    create(&host, &proxy_cluster("member-1", &token));
    let a = replica("tower-a");
    let b = replica("tower-b");
    let balancer = tower_e2e::Relay::balance(&[a.tunnel, b.tunnel]);
    let agent = agent(&a, &member, "member-1")
        .token(&token)
        .proxy_server(balancer.addr)
        .spawn();
    wait_for("a first tunnel", Duration::from_secs(20), || {
        (a.connected("member-1") || b.connected("member-1")).then_some(())
    });
    let holders = |s: &Server| s.clusters()[0]["replicas"].clone();
    let one = if a.connected("member-1") { &a } else { &b };
    assert_eq!(holders(one).as_array().map(Vec::len), Some(1));

    // Scale to two: both replicas learn it, tell the agent, and it dials the other one.
    let scaled = std::time::Instant::now();
    kubectl(
        &host.kubeconfig,
        &[
            "-n",
            "ke-system",
            "patch",
            "deployment",
            "tower",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"replicas":2}}"#,
        ],
    )
    .success();
    wait_for_with(
        "a tunnel to each replica",
        Duration::from_secs(15),
        || (a.connected("member-1") && b.connected("member-1")).then_some(()),
        || agent.process.log(),
    );
    eprintln!(
        "tunnels to both replicas {:?} after scaling",
        scaled.elapsed()
    );
    wait_for(
        "both replicas to see both holders",
        Duration::from_secs(10),
        || {
            [&a, &b]
                .iter()
                .all(|s| holders(s) == serde_json::json!(["tower-a", "tower-b"]))
                .then_some(())
        },
    );
}

#[test]
fn only_clusters_of_type_proxy_may_connect() {
    let host = Member::start();
    let member = Member::start();
    let server = tower_on(&host, &[]);
    create(
        &host,
        "apiVersion: cluster.kubesphere.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: direct-1\nspec:\n  connection:\n    type: direct\n",
    );
    let token = Server::minter().agent_token("direct-1", None);
    let refused = dial_tunnel(&server, "direct-1", &token);
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains("proxy"), "{}", refused.body);

    // Turned into a proxy cluster (with a token of the operator's choosing), it connects;
    // turned back, its tunnel closes.
    kubectl(
        &host.kubeconfig,
        &[
            "patch",
            "cluster",
            "direct-1",
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"spec":{{"connection":{{"type":"proxy","token":"{token}"}}}}}}"#),
        ],
    )
    .success();
    let _agent = agent(&server, &member, "direct-1")
        .token(&token)
        .connect(&server);
    kubectl(
        &host.kubeconfig,
        &[
            "patch",
            "cluster",
            "direct-1",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"connection":{"type":"direct"}}}"#,
        ],
    )
    .success();
    wait_for("the tunnel to close", Duration::from_secs(10), || {
        (!server.connected("direct-1")).then_some(())
    });
}

#[test]
fn the_registry_follows_clusters_across_api_server_outages() {
    let host = Member::start();
    let member = Member::start();
    let server = tower_on(&host, &[]);
    // One token per cluster: the agent must present exactly the Cluster's.
    let tokens: std::collections::HashMap<&str, String> = ["member-1", "member-2", "member-3"]
        .into_iter()
        .map(|name| (name, Server::minter().agent_token(name, None)))
        .collect();
    let token = |name: &str| tokens[name].clone();
    create(&host, &proxy_cluster("member-1", &token("member-1")));
    let _one = agent(&server, &member, "member-1")
        .token(&token("member-1"))
        .connect(&server);

    // The API server drops every connection (a restart): the watch resumes, and a Cluster
    // created afterwards is seen.
    host.api.drop_connections();
    create(&host, &proxy_cluster("member-2", &token("member-2")));
    let _two = agent(&server, &member, "member-2")
        .token(&token("member-2"))
        .connect(&server);

    // The API server is away for a while: tunnels keep serving; once it is back, a
    // Cluster created then is seen too.
    let refused_before = host.api.refused_connections();
    host.api.set_available(false);
    let kc = server.kubeconfig("member-1", "alice", &[]);
    let calls_before = host.api.calls().len();
    // Long enough for several watch retries (each a connection the API server refused);
    // the watcher must back off, not spin, and the tunnels serve all along.
    let outage = std::time::Instant::now();
    // The server has four watchers on the API server (Clusters, users, the Deployment, the
    // platform config), all cut at once: three refusals may all be other watchers', so the
    // Cluster watcher's own failure is waited for, not assumed.
    wait_for(
        "three refused retries and the Cluster watcher noticing the outage",
        Duration::from_secs(60),
        || {
            (host.api.refused_connections() >= refused_before + 3
                && server.process.log().contains("watching Cluster objects"))
            .then_some(())
        },
    );
    kubectl(&kc, &["get", "pods"]).success();
    let lasted = outage.elapsed();
    let retries = host.api.refused_connections() - refused_before;
    assert!(
        retries < 60,
        "{retries} connections in {lasted:?}: the watcher spins"
    );
    host.api.set_available(true);
    create(&host, &proxy_cluster("member-3", &token("member-3")));
    let _three = agent(&server, &member, "member-3")
        .token(&token("member-3"))
        .connect(&server);
    let calls = host.api.calls().len() - calls_before;
    eprintln!(
        "outage of {:?}: {calls} calls reached the API server during and after it",
        outage.elapsed()
    );
    assert!(server.connected("member-1") && server.connected("member-2"));
    // Deletions made right after an outage are seen too.
    kubectl(&host.kubeconfig, &["delete", "cluster", "member-2"]).success();
    wait_for("member-2 to be dropped", Duration::from_secs(15), || {
        (!server.connected("member-2")).then_some(())
    });
    let watch_calls = host
        .api
        .calls()
        .iter()
        .filter(|c| c.path_and_query.contains("/clusters?") && c.path_and_query.contains("watch"))
        .count();
    assert!(
        watch_calls < 30,
        "the watcher must back off, not hot-loop: {watch_calls} watch calls"
    );
}

fn agent_manifest_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin_path("tower-server"))
        .arg("agent-manifest")
        .args(args)
        .env("TOWER_JWT_SECRET", SECRET)
        .output()
        .expect("tower-server agent-manifest")
}

#[test]
fn the_publish_address_comes_from_the_setting_then_the_load_balancer_else_an_error() {
    let host = Member::start();
    let server = tower_on(&host, &[]);
    create(
        &host,
        &proxy_cluster("member-1", &Server::minter().agent_token("member-1", None)),
    );
    let kubeconfig = host.kubeconfig.to_str().unwrap();
    let ca = server.ca_file.to_str().unwrap();
    let cli = |extra: &[&str]| {
        let mut args = vec![
            "--cluster",
            "member-1",
            "--kubernetes",
            "--kubeconfig",
            kubeconfig,
            "--ca-cert",
            ca,
        ];
        args.extend_from_slice(extra);
        agent_manifest_cli(&args)
    };

    // No Service at all.
    let none = cli(&[]);
    assert_eq!(none.status.code(), Some(2));
    let message = String::from_utf8_lossy(&none.stderr);
    assert!(message.contains("proxyPublishAddress"), "{message}");

    // The Service exists, its LoadBalancer is pending.
    create(
        &host,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ke-system\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: tower\n  namespace: ke-system\nspec:\n  type: LoadBalancer\n  selector:\n    app.kubernetes.io/name: tower\n  ports:\n  - name: tunnel\n    port: 8080\n    targetPort: 8080\n",
    );
    let pending = cli(&[]);
    assert_eq!(pending.status.code(), Some(2));
    let message = String::from_utf8_lossy(&pending.stderr);
    assert!(
        message.contains("no EXTERNAL-IP yet") && message.contains("proxyPublishAddress"),
        "{message}"
    );

    // proxyPublishAddress, written the old way, still gets a TLS tunnel.
    let configured = cli(&["--proxy-publish-address", "http://139.198.120.120:8080"]);
    assert_eq!(configured.status.code(), Some(0), "{configured:?}");
    let yaml = String::from_utf8_lossy(&configured.stdout);
    assert!(yaml.contains("https://139.198.120.120:8080"), "{yaml}");
    assert!(!yaml.contains("http://139"), "{yaml}");

    // Once the LoadBalancer has an address, it is used when no address is configured;
    // a configured one still wins, as in KubeSphere's own rule.
    kubectl(
        &host.kubeconfig,
        &[
            "-n",
            "ke-system",
            "patch",
            "service",
            "tower",
            "--subresource",
            "status",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.7"}]}}}"#,
        ],
    )
    .success();
    let configured = cli(&["--proxy-publish-address", "https://other.example.com:8080"]);
    assert_eq!(configured.status.code(), Some(0), "{configured:?}");
    let yaml = String::from_utf8_lossy(&configured.stdout);
    assert!(yaml.contains("https://other.example.com:8080"), "{yaml}");
    let balanced = cli(&[]);
    assert_eq!(balanced.status.code(), Some(0), "{balanced:?}");
    let yaml = String::from_utf8_lossy(&balanced.stdout);
    assert!(yaml.contains("https://203.0.113.7:8080"), "{yaml}");
}

/// The documents of a YAML stream.
fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("YAML document"))
        .collect()
}

#[test]
fn agent_yaml_from_the_host_connects_the_member() {
    let host = Member::start();
    let member = Member::start();
    let server = tower_on(
        &host,
        &["--proxy-publish-address", "https://tower.example.com:8080"],
    );
    create(&host, &proxy_cluster("member-1", ""));
    wait_for("the token to be minted", Duration::from_secs(20), || {
        cluster(&host, "member-1").filter(|c| !token_of(c).is_empty())
    });
    let path = "/v1/clusters/member-1/agent.yaml";

    // agent.yaml holds the jwtSecret: only the admin group gets it.
    assert_eq!(admin_get(server.admin, path).0, 401);
    let alice = Server::minter().user_token("alice", &["developers".into()], None);
    let (code, body) = admin_get_as(server.admin, path, Some(&alice));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("system:masters"), "{body}");
    let admin = Server::minter().user_token("admin", &["system:masters".into()], None);
    let (code, body) = admin_get_as(server.admin, "/v1/clusters/nobody/agent.yaml", Some(&admin));
    assert_eq!(code, 404, "{body}");
    // The prefix and the suffix share their slash here: no name, a 404 (this panicked).
    let (code, body) = admin_get_as(server.admin, "/v1/clusters/agent.yaml", Some(&admin));
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("admin endpoints"), "{body}");
    let (code, yaml) = admin_get_as(server.admin, path, Some(&admin));
    assert_eq!(code, 200, "{yaml}");

    // The CLI, reading the same Cluster, says the same thing.
    let cli = agent_manifest_cli(&[
        "--cluster",
        "member-1",
        "--kubernetes",
        "--kubeconfig",
        host.kubeconfig.to_str().unwrap(),
        "--ca-cert",
        server.ca_file.to_str().unwrap(),
        "--proxy-publish-address",
        "https://tower.example.com:8080",
    ]);
    assert_eq!(cli.status.code(), Some(0), "{cli:?}");
    assert_eq!(
        String::from_utf8_lossy(&cli.stdout).trim_end(),
        yaml.trim_end()
    );

    // Run the agent exactly as the Deployment would, with the Secret's files, only the
    // address swapped for this machine's loopback listener.
    let docs = documents(&yaml);
    let secret = docs.iter().find(|d| d["kind"] == "Secret").expect("Secret");
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("Deployment");
    let dir = TempDir::new("agent-yaml");
    let etc = dir.path().join("etc-tower");
    std::fs::create_dir_all(&etc).unwrap();
    for (key, value) in secret["data"].as_object().expect("data") {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().unwrap())
            .expect("base64");
        std::fs::write(etc.join(key), bytes).unwrap();
    }
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            if a == "https://tower.example.com:8080" {
                format!("https://{}", server.tunnel)
            } else if let Some(file) = a.strip_prefix("/etc/tower/") {
                etc.join(file).to_string_lossy().into_owned()
            } else if a.starts_with("0.0.0.0:") {
                "127.0.0.1:0".to_owned()
            } else {
                a.to_owned()
            }
        })
        .collect();
    let mut command = std::process::Command::new(bin_path("tower-agent"));
    command
        .args(&args)
        .arg("--kubeconfig")
        .arg(&member.kubeconfig)
        .env("TOWER_LOG", "info");
    let (_agent, _stdout) = tower_e2e::Process::spawn(command, dir.path().join("agent.log"));
    wait_for("the member to connect", Duration::from_secs(20), || {
        server.connected("member-1").then_some(())
    });
    wait_available(&host, &server, "member-1", "True");

    // And the host's table shows it.
    let table = std::process::Command::new(bin_path("tower-server"))
        .args(["clusters", "--admin-url"])
        .arg(format!("http://{}", server.admin))
        // Versions need an admin token: the CLI mints one from the jwtSecret.
        .arg("--jwt-secret-file")
        .arg(&server.secret_file)
        .output()
        .expect("tower-server clusters");
    assert_eq!(table.status.code(), Some(0), "{table:?}");
    let table = String::from_utf8_lossy(&table.stdout);
    let mut lines = table.lines();
    let head: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(head, ["NAME", "CONNECTED", "SINCE", "REPLICAS", "VERSION"]);
    let row: Vec<&str> = lines.next().expect("a row").split_whitespace().collect();
    assert_eq!(row[0], "member-1");
    assert_eq!(row[1], "true");
    assert_eq!(row[4], env!("CARGO_PKG_VERSION"));
}

/// `--agent-token-lifetime`: tower renews a Cluster's token with a third of its life
/// left, hands the new one to the connected agent over its tunnel (the agent's own file
/// still holds the old one), keeps accepting the old one until it expires, and when the
/// tunnel is drained at that expiry the agent comes back with the new one.
#[test]
fn a_renewed_token_reaches_the_agent_and_the_tunnel_outlives_the_old_one() {
    let host = Member::start();
    let member = Member::start();
    let server = tower_on(&host, &["--agent-token-lifetime", "30s"]);
    create(&host, &proxy_cluster("member-1", ""));
    let minted = wait_for_with(
        "the token to be written",
        Duration::from_secs(20),
        || cluster(&host, "member-1").filter(|c| !token_of(c).is_empty()),
        || server.process.log(),
    );
    let first = token_of(&minted);
    let exp = |token: &str| {
        tower_auth::AgentClaims::read_unverified(token)
            .unwrap()
            .exp
            .expect("a minted token expires")
    };
    let first_exp = exp(&first);
    let agent = agent(&server, &member, "member-1")
        .token(&first)
        .via_token_file()
        .connect(&server);
    wait_available(&host, &server, "member-1", "True");

    // Renewed within its last third (10 s), while the agent is connected.
    let renewed = wait_for_with(
        "the token to be renewed",
        Duration::from_secs(30),
        || cluster(&host, "member-1").filter(|c| token_of(c) != first),
        || server.process.log(),
    );
    let second = token_of(&renewed);
    assert!(exp(&second) > first_exp);
    assert_eq!(
        renewed["metadata"]["annotations"]["tower.kubesphere.io/previous-agent-token-sha256"],
        tower_server::kubernetes::previous_token_note(&first, &second),
        "the old token is remembered, by its hash, for the token that renewed it"
    );
    wait_for_with(
        "the agent to be handed the new token",
        Duration::from_secs(10),
        || {
            agent
                .process
                .log()
                .contains("the server renewed this agent's token")
                .then_some(())
        },
        || server.process.log(),
    );
    assert!(
        !server
            .process
            .log()
            .contains("closing the tunnel that used the old one"),
        "a renewal is no revocation: {}",
        server.process.log()
    );
    // The old token still opens a tunnel until it expires (a restarted agent whose
    // Deployment carries it), and that agent is handed the new one.
    let still = dial_tunnel(&server, "member-1", &first);
    assert_ne!(still.status, 403, "{}", still.body);

    // At the old token's expiry its tunnel is drained; the agent dials again with the
    // new token (its file still holds the old, expired one) and is admitted.
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    wait_for_with(
        "the old token to expire and the agent to be back",
        Duration::from_secs(40),
        || {
            (now() > first_exp + 1
                && server.connected("member-1")
                && agent.process.log().matches("tunnel up").count() >= 2)
                .then_some(())
        },
        || format!("{}\n---\n{}", server.process.log(), agent.process.log()),
    );
    let https = Https::frontend(&server);
    let user = Server::minter().user_token("alice", &[], Some(Duration::from_secs(60)));
    let reply = https.get(
        "/clusters/member-1/api/v1/namespaces/default/pods",
        Some(&user),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// On a KubeSphere host, callers are who KubeSphere's Users say: the user must exist and
/// not be disabled, and the groups impersonated on the member are the User's
/// `spec.groups` plus `system:authenticated`, whatever the token claims. Disabling a
/// User locks it out at once. Tokens Tower minted itself keep their claims.
#[test]
fn callers_resolve_against_kubesphere_users_and_a_disabled_one_is_locked_out() {
    let host = Member::start();
    let member = Member::start();
    let users = "apiVersion: iam.kubesphere.io/v1alpha2\nkind: User\nmetadata:\n  name: alice\n\
        spec:\n  email: alice@example.com\n  groups:\n  - devs\nstatus:\n  state: Active\n---\n\
        apiVersion: iam.kubesphere.io/v1alpha2\nkind: User\nmetadata:\n  name: mallory\n\
        spec:\n  email: mallory@example.com\nstatus:\n  state: Disabled\n";
    kubectl_with_input(
        &host.kubeconfig,
        &["create", "--validate=false", "-f", "-"],
        users.as_bytes(),
    )
    .success();
    let server = tower_on(&host, &[]);
    create(&host, &proxy_cluster("member-1", ""));
    let minted = wait_for_with(
        "the token to be written",
        Duration::from_secs(20),
        || cluster(&host, "member-1").filter(|c| !token_of(c).is_empty()),
        || server.process.log(),
    );
    let _agent = agent(&server, &member, "member-1")
        .token(&token_of(&minted))
        .connect(&server);
    let https = Https::frontend(&server);
    let path = "/clusters/member-1/api/v1/namespaces/default/pods";
    // A token as KubeSphere issues it, claiming more than the User has.
    let kubesphere_token = |user: &str| {
        Server::minter().sign(&serde_json::json!({
            "username": user, "groups": ["system:masters"], "token_type": "access_token",
            "iss": "kubesphere", "exp": 4_000_000_000u64
        }))
    };
    let before = member.api.calls().len();
    let reply = https.get(path, Some(&kubesphere_token("alice")));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let calls = member.api.calls();
    let call = calls[before..]
        .iter()
        .find(|c| {
            c.path_and_query
                .starts_with("/api/v1/namespaces/default/pods")
        })
        .expect("reached the member");
    assert_eq!(call.impersonate_user.as_deref(), Some("alice"));
    assert_eq!(
        call.impersonate_groups,
        ["devs", "system:authenticated"],
        "the User's groups, not the token's claim"
    );
    for (user, why) in [
        ("mallory", "is disabled"),
        ("nobody", "is not a KubeSphere user"),
    ] {
        let refused = https.get(path, Some(&kubesphere_token(user)));
        assert_eq!(refused.status, 401, "{user}: {}", refused.body);
        assert!(refused.body.contains(why), "{user}: {}", refused.body);
    }
    // Tower's own tokens keep their claims.
    let ops = Server::minter().user_token("ops", &["system:masters".into()], None);
    assert_eq!(https.get(path, Some(&ops)).status, 200);

    // Disabled while holding a valid token: locked out without a restart.
    kubectl(
        &host.kubeconfig,
        &[
            "patch",
            "user",
            "alice",
            "--type",
            "merge",
            "-p",
            r#"{"status":{"state":"Disabled"}}"#,
        ],
    )
    .success();
    wait_for_with(
        "alice to be locked out",
        Duration::from_secs(10),
        || (https.get(path, Some(&kubesphere_token("alice"))).status == 401).then_some(()),
        || server.process.log(),
    );
}

/// The server's requests to the host API keep to `--kube-api-qps`/`--kube-api-burst`
/// (the list, the watch, every spec and condition write), and every Cluster still ends
/// with the right `AgentAvailable`: after the first start, and after a restart during
/// which some agents left and some came (the leavers' `True` turns `False` once the
/// agents' grace to come back is over).
/// A server that has not listed its Cluster objects yet (it just started; the API server
/// is away) holds an agent's dial until the list is in, then admits it: a fleet that
/// comes back with a restarted server is admitted as soon as the server knows its
/// Clusters, instead of being refused into its backoff.
#[test]
fn a_dial_before_the_first_list_is_held_until_the_list_is_in_then_admitted() {
    let host = Member::start();
    let token = Server::minter().agent_token("member-1", None);
    create(&host, &proxy_cluster("member-1", &token));
    host.api.set_available(false);
    let kubeconfig = host.kubeconfig.to_str().unwrap();
    let server = server()
        .args(&[
            "--kubernetes",
            "--kubeconfig",
            kubeconfig,
            "--frontend-url",
            FRONTEND_URL,
        ])
        .start();
    assert_eq!(admin_get(server.admin, "/readyz").0, 503);
    let https = Https::to(&server, server.tunnel);
    let dial = std::thread::spawn(move || {
        let upgrade = [
            ("connection", "Upgrade"),
            ("upgrade", "tower-tunnel/1"),
            ("tower-cluster", "member-1"),
            ("tower-capabilities", "identity"),
        ];
        let reply = https.request("GET", "/v1/tunnel", Some(&token), &upgrade);
        (reply, std::time::Instant::now())
    });
    // The server tries the API server and is refused (its watchers back off 0.8 s and
    // more between tries) while the dial waits. Four watchers are refused at once: the
    // Cluster watcher's own failures are what is waited for.
    wait_for_with(
        "the Cluster watcher to be refused twice",
        Duration::from_secs(20),
        || {
            (server
                .process
                .log()
                .matches("watching Cluster objects")
                .count()
                >= 2)
                .then_some(())
        },
        || server.process.log(),
    );
    assert!(!dial.is_finished(), "the dial was answered before the list");
    let available = std::time::Instant::now();
    host.api.set_available(true);
    let (reply, answered) = dial.join().unwrap();
    assert_eq!(
        reply.status,
        101,
        "{}\n{}",
        reply.body,
        server.process.log()
    );
    // This answer waited for the list, which could come only once the API server was back.
    assert!(
        answered > available,
        "answered {:?} before the API server was back",
        available - answered
    );
    assert!(
        !server.process.log().contains("refused a tunnel"),
        "{}",
        server.process.log()
    );
}

#[test]
fn requests_to_the_host_keep_to_the_api_pace_and_every_cluster_converges() {
    use std::collections::HashMap;
    use std::time::Instant;
    use tower_e2e::fleet::{ClusterHost, Fleet, clusters, most_within};

    const QPS: f64 = 20.0;
    const BURST: usize = 5;
    // Arrivals bunched by a quarter-second stall between the server and the stand-in; an
    // unpaced client would send all 100 at once.
    const SLACK: usize = 5;
    let host = Member::start();
    let member = Member::start();
    let hosted = ClusterHost::new(&host);
    let dir = TempDir::new("paced");
    let kubeconfig = hosted.kubeconfig_with_token("paced-tower", dir.path());
    let names = clusters("paced", 50);
    hosted.create_proxy_clusters(&names);
    let started = Instant::now();
    let mut server = server()
        .args(&[
            "--kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--frontend-url",
            FRONTEND_URL,
            "--kube-api-qps",
            "20",
            "--kube-api-burst",
            "5",
            "--agent-return-grace",
            "2s",
        ])
        .start();
    let mut fleet = Fleet::new();
    // Five without an agent.
    fleet.start(&server, &member, &names[5..]);
    let mut want: HashMap<String, &str> = names
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), if i < 5 { "False" } else { "True" }))
        .collect();
    let converged = |want: &HashMap<String, &str>, server: &Server| {
        wait_for_with(
            "every Cluster's AgentAvailable",
            Duration::from_secs(90),
            || hosted.wrong(want).is_empty().then_some(()),
            || format!("wrong: {:?}\n{}", hosted.wrong(want), server.process.log()),
        )
    };
    converged(&want, &server);
    // 50 spec writes (endpoint and kubeconfig), 50 conditions, the list and the watch:
    // at 20 a second after a burst of 5, well over 4 s.
    let calls_of = |since: Instant| -> Vec<Instant> {
        host.api
            .calls()
            .into_iter()
            .filter(|c| c.credential == "token#1" && c.at >= since)
            .map(|c| c.at)
            .collect()
    };
    let first = calls_of(started);
    assert!(first.len() >= 100, "{} requests", first.len());
    let span = *first.last().unwrap() - first[0];
    // Counted where the requests arrive, so a stall in the stand-in (whose process also
    // runs the agents) shifts them: a 10 % margin below, a quarter second's worth above.
    let least = Duration::from_secs_f64((first.len() - BURST) as f64 / QPS * 0.9);
    assert!(
        span >= least,
        "{} requests took {span:?}: the pace was not kept (at least {least:?})",
        first.len()
    );
    let most = most_within(&first, Duration::from_secs(1));
    assert!(
        most <= QPS as usize + BURST + SLACK,
        "{most} requests within one second: over qps + burst"
    );

    // Down: two agents leave, two of the absent ones come; then it starts again.
    let killed = Instant::now();
    server.process.kill();
    let leaving: Vec<String> = names[5..7].iter().map(|(n, _)| n.clone()).collect();
    fleet.stop_agents(&leaving);
    fleet.start(&server, &member, &names[..2]);
    for name in &leaving {
        want.insert(name.clone(), "False");
    }
    for (name, _) in &names[..2] {
        want.insert(name.clone(), "True");
    }
    server.restart();
    converged(&want, &server);
    let after = calls_of(killed);
    let most = most_within(&after, Duration::from_secs(1));
    assert!(
        most <= QPS as usize + BURST + SLACK,
        "{most} requests within one second after the restart"
    );
    fleet.stop();
}

/// A Cluster's token that pins another CA (the Tower CA was replaced) is rewritten with
/// one pinning the server's CA, and the old one is treated as renewed, not revoked: an
/// agent that still holds it gets in and is handed the new one. A token that pins the
/// server's CA is kept.
#[test]
fn a_token_pinning_another_ca_is_repinned_and_its_holder_handed_the_new_one() {
    let host = Member::start();
    let member = Member::start();
    let server = tower_on(&host, &[]);
    let ca = tower_tunnel::tls::certs_from_pem(server.ca_pem.as_bytes()).expect("CA");
    let pin = tower_tunnel::tls::spki_pin(&ca[0]).expect("pin");

    let current = Server::minter().agent_token_pinned("member-2", None, Some(&pin));
    create(&host, &proxy_cluster("member-2", &current));
    let written = wait_for_with(
        "member-2's endpoint to be written",
        Duration::from_secs(20),
        || {
            cluster(&host, "member-2")
                .filter(|c| c["spec"]["connection"]["kubernetesAPIEndpoint"].is_string())
        },
        || server.process.log(),
    );
    assert_eq!(
        token_of(&written),
        current,
        "a token with the right pin is kept"
    );

    let stale = Server::minter().agent_token_pinned(
        "member-1",
        None,
        Some(&format!("sha256:{}", "ab".repeat(32))),
    );
    create(&host, &proxy_cluster("member-1", &stale));
    let repinned = wait_for_with(
        "the token to be re-pinned",
        Duration::from_secs(20),
        || cluster(&host, "member-1").filter(|c| token_of(c) != stale),
        || server.process.log(),
    );
    let new = token_of(&repinned);
    let claims = tower_auth::AgentClaims::read_unverified(&new).unwrap();
    assert_eq!(claims.ca.as_deref(), Some(pin.as_str()));
    assert_eq!(
        repinned["metadata"]["annotations"]["tower.kubesphere.io/previous-agent-token-sha256"],
        tower_server::kubernetes::previous_token_note(&stale, &new),
    );
    assert!(
        server
            .process
            .log()
            .contains("pins another CA than this server's"),
        "{}",
        server.process.log()
    );
    // An agent that trusts the CA by file, with the stale token: admitted and handed the
    // new one.
    let holder = agent(&server, &member, "member-1")
        .token(&stale)
        .connect(&server);
    wait_for_with(
        "the agent to be handed the re-pinned token",
        Duration::from_secs(10),
        || {
            holder
                .process
                .log()
                .contains("the server renewed this agent's token")
                .then_some(())
        },
        || server.process.log(),
    );
}
