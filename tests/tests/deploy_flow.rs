//! The seed's flow as README.md's "Deploy on Kubernetes" documents it, with every pod
//! started from the manifests Tower ships, the way a kubelet starts it (`tower_e2e::pod`),
//! against two stand-in API servers that authorize by RBAC: the host's `tower` Deployment
//! (deploy/host, its own ServiceAccount and Roles) fills the Cluster, agent.yaml is
//! generated inside a host pod, created on the member, its pod runs, the Cluster turns
//! `AgentAvailable=True`, and kubectl reaches the member through the frontend as the
//! caller, whom the member's RBAC then judges.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tower_e2e::pod::{ApiServer, Image, Kubelet, Overrides, Pod};
use tower_e2e::{
    Member, OperatorPki, Relay, SECRET, Server, TempDir, kubectl, kubectl_with_input, wait_for_with,
};

const NAMESPACE: &str = "ke-system";
const CLUSTER: &str = "member-1";

/// One host replica: its pod and the addresses it listens on.
struct Replica {
    pod: Pod,
    tunnel: SocketAddr,
    frontend: SocketAddr,
    admin: SocketAddr,
}

/// `kubectl -n ke-system create secret|configmap …`, as README.md writes it.
fn create(host: &Member, args: &[&str]) {
    let mut command = vec!["-n", NAMESPACE, "create"];
    command.extend_from_slice(args);
    kubectl(&host.kubeconfig, &command).success();
}

fn address(line: &serde_json::Value, key: &str) -> SocketAddr {
    line[key]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no {key} address in {line}"))
}

/// Steps 1-3 of the README on the host: deploy/host applied with kubectl, the two
/// Secrets and tower-config created, then every replica of the `tower` Deployment
/// started from what the API server stored.
fn deploy_host(host: &Member, pki: &OperatorPki, publish: SocketAddr) -> Vec<Replica> {
    let deploy_host = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/host");
    let applied = kubectl(
        &host.kubeconfig,
        &["apply", "-k", deploy_host.to_str().expect("path")],
    );
    applied.success();
    let dir = TempDir::new("host-secrets");
    let file = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).expect("write");
        path.to_str().expect("path").to_owned()
    };
    let secret = file("jwt-secret", SECRET);
    create(
        host,
        &[
            "secret",
            "generic",
            "tower-jwt",
            &format!("--from-file=jwt-secret={secret}"),
        ],
    );
    let [_, cert, _, key, _, ca] = pki.flags();
    create(
        host,
        &[
            "secret",
            "generic",
            "tower-tls",
            &format!("--from-file=tls.crt={cert}"),
            &format!("--from-file=tls.key={key}"),
            &format!("--from-file=ca.crt={ca}"),
        ],
    );
    create(
        host,
        &[
            "configmap",
            "tower-config",
            &format!("--from-literal=proxyPublishAddress=https://{publish}"),
        ],
    );

    let kubelet = Kubelet::new(
        ApiServer::stand_in(&host.api, &host.kubeconfig),
        Image::tower(),
    );
    // The manifest leaves the listeners at their defaults (0.0.0.0:8080, :9443, :9090),
    // which are not free here: only they are remapped.
    let overrides = Overrides::default()
        .listen_env("TOWER_TUNNEL_ADDR", "127.0.0.1:0")
        .listen_env("TOWER_PROXY_ADDR", "127.0.0.1:0")
        .listen_env("TOWER_ADMIN_ADDR", "127.0.0.1:0");
    let deployment: serde_json::Value = serde_json::from_str(
        &kubectl(
            &host.kubeconfig,
            &["-n", NAMESPACE, "get", "deployment", "tower", "-o", "json"],
        )
        .success(),
    )
    .expect("deployment json");
    let replicas = deployment["spec"]["replicas"].as_u64().expect("replicas");
    assert_eq!(replicas, 2, "deploy/host runs two replicas");
    (0..replicas)
        .map(|_| {
            let mut pod = kubelet
                .start_deployment(NAMESPACE, "tower", &overrides)
                .unwrap_or_else(|e| panic!("the host pod must start: {e}"));
            let line = pod.first_json_line();
            Replica {
                tunnel: address(&line, "tunnel"),
                frontend: address(&line, "frontend"),
                admin: address(&line, "admin"),
                pod,
            }
        })
        .collect()
}

fn cluster_field(host: &Member, jsonpath: &str) -> String {
    let out = kubectl(
        &host.kubeconfig,
        &[
            "get",
            "cluster",
            CLUSTER,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ],
    );
    if out.0.status.success() {
        String::from_utf8_lossy(&out.0.stdout).into_owned()
    } else {
        String::new()
    }
}

/// Everything the flow brought up: both API servers, the host replicas behind their
/// balancer, and the agent pod.
struct Flow {
    _host: Member,
    member: Member,
    pki: OperatorPki,
    replicas: Vec<Replica>,
    agent: Pod,
    dir: TempDir,
    _balancer: Relay,
}

impl Flow {
    /// A kubeconfig for `user` in `groups` through `frontend`, as `tower-server
    /// kubeconfig` writes it.
    fn kubeconfig(&self, frontend: SocketAddr, user: &str, groups: &[&str]) -> std::path::PathBuf {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let token = Server::minter().user_token(user, &groups, Some(Duration::from_secs(600)));
        let out = std::process::Command::new(tower_e2e::bin_path("tower-server"))
            .args(["kubeconfig", "--cluster", CLUSTER])
            .arg("--server")
            .arg(format!("https://{frontend}"))
            .arg("--ca-cert")
            .arg(self.pki.ca_file())
            .args(["--token", &token])
            .output()
            .expect("tower-server kubeconfig");
        assert!(out.status.success());
        let path = self.dir.path().join(format!("{user}-{}", frontend.port()));
        std::fs::write(&path, out.stdout).expect("write");
        path
    }
}

/// README's steps 1-6, from deploy/host to a running agent pod whose Cluster is
/// `AgentAvailable=True`; `manifest_args` are added to `tower-server agent-manifest`.
fn seed_flow(manifest_args: &[&str]) -> Flow {
    let host = Member::start_strict();
    let member = Member::start_strict();
    let pki = OperatorPki::new();
    // The `tower` LoadBalancer: one address in front of every replica's tunnel port.
    let balancer = Relay::balance(&[]);
    let replicas = deploy_host(&host, &pki, balancer.addr);
    balancer.set_targets(&replicas.iter().map(|r| r.tunnel).collect::<Vec<_>>());
    for replica in &replicas {
        wait_for_with(
            "a host replica to be ready (its readinessProbe)",
            Duration::from_secs(30),
            || replica.pod.http_probe(true, replica.admin).then_some(()),
            || replica.pod.log(),
        );
        assert!(replica.pod.http_probe(false, replica.admin), "liveness");
    }

    // Step 4: import the member; tower fills the Cluster.
    let cluster = format!(
        "apiVersion: cluster.kubesphere.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: {CLUSTER}\n\
         spec:\n  provider: private-idc\n  enable: true\n  joinFederation: false\n  connection:\n    type: proxy\n"
    );
    kubectl_with_input(&host.kubeconfig, &["apply", "-f", "-"], cluster.as_bytes()).success();
    wait_for_with(
        "tower to write spec.connection.token",
        Duration::from_secs(30),
        || (!cluster_field(&host, "{.spec.connection.token}").is_empty()).then_some(()),
        || {
            replicas
                .iter()
                .map(|r| r.pod.log())
                .collect::<Vec<_>>()
                .join("\n---\n")
        },
    );

    // agent.yaml, generated inside a host pod with its own ServiceAccount's rights.
    let mut command = vec![
        "/tower-server",
        "agent-manifest",
        "--kubernetes",
        "--cluster",
        CLUSTER,
    ];
    command.extend_from_slice(manifest_args);
    let manifest = replicas[0].pod.exec(&command);
    assert!(
        manifest.status.success(),
        "agent-manifest in the host pod: {}",
        String::from_utf8_lossy(&manifest.stderr)
    );

    // Step 5: on the member.
    kubectl_with_input(&member.kubeconfig, &["create", "-f", "-"], &manifest.stdout).success();
    let kubelet = Kubelet::new(
        ApiServer::stand_in(&member.api, &member.kubeconfig),
        Image::tower(),
    );
    let mut agent = kubelet
        .start_deployment(
            NAMESPACE,
            "tower-agent",
            &Overrides::default().listen("0.0.0.0:9090", "127.0.0.1:0"),
        )
        .unwrap_or_else(|e| panic!("the agent pod must start: {e}"));
    let agent_admin = address(&agent.first_json_line(), "admin");
    let agent_log = agent.log_file();
    wait_for_with(
        "the agent pod to be ready (its readinessProbe)",
        Duration::from_secs(30),
        || {
            if let Some(code) = agent.exit_code() {
                panic!("the agent exited with {code}:\n{}", agent.log());
            }
            agent.http_probe(true, agent_admin).then_some(())
        },
        || std::fs::read_to_string(&agent_log).unwrap_or_default(),
    );

    // Step 6: the condition, then kubectl through each replica's frontend.
    wait_for_with(
        "AgentAvailable=True",
        Duration::from_secs(30),
        || {
            (cluster_field(
                &host,
                r#"{.status.conditions[?(@.type=="AgentAvailable")].status}"#,
            ) == "True")
                .then_some(())
        },
        || format!("{}\n---\n{}", replicas[0].pod.log(), agent.log()),
    );
    let endpoint = cluster_field(&host, "{.spec.connection.kubernetesAPIEndpoint}");
    assert!(
        endpoint.ends_with(&format!("/clusters/{CLUSTER}")),
        "{endpoint}"
    );
    Flow {
        _host: host,
        member,
        pki,
        replicas,
        agent,
        dir: TempDir::new("seed-flow"),
        _balancer: balancer,
    }
}

#[test]
fn the_seed_flow_runs_from_the_shipped_manifests_to_kubectl_on_the_member() {
    let mut flow = seed_flow(&[]);
    let Flow {
        member, replicas, ..
    } = &flow;
    for replica in replicas {
        let admin = flow.kubeconfig(replica.frontend, "admin", &["system:masters"]);
        wait_for_with(
            "kubectl through this replica",
            Duration::from_secs(20),
            || {
                kubectl(&admin, &["get", "namespaces"])
                    .0
                    .status
                    .success()
                    .then_some(())
            },
            || replica.pod.log(),
        );
        let pods = kubectl(&admin, &["get", "pods", "-n", "default", "-o", "name"]).success();
        assert!(pods.contains("pod/"), "{pods}");
    }
    // The member saw the agent's ServiceAccount impersonate the caller.
    let calls = member.api.calls();
    let call = calls
        .iter()
        .rev()
        .find(|c| {
            c.path_and_query
                .starts_with("/api/v1/namespaces/default/pods")
        })
        .expect("the list reached the member");
    assert_eq!(call.impersonate_user.as_deref(), Some("admin"));
    assert_eq!(call.impersonate_groups, ["system:masters"]);
    assert_eq!(call.user.as_deref(), Some("admin"), "{call:?}");
    assert_eq!(
        call.credential, "serviceaccount:ke-system/tower-agent",
        "{call:?}"
    );

    // Member RBAC applies to the real user: erin has no binding there.
    let erin = flow.kubeconfig(replicas[0].frontend, "erin", &[]);
    let refused = kubectl(&erin, &["get", "pods", "-n", "default"]);
    assert!(!refused.0.status.success());
    let stderr = refused.stderr();
    assert!(
        stderr.contains(r#"User "erin" cannot list resource "pods""#),
        "{stderr}"
    );
    // deploy/host's RBAC grants what tower-server does: no request of a replica was
    // refused by the host API server.
    for replica in replicas {
        let log = replica.pod.log();
        assert!(!log.contains("forbidden"), "{log}");
    }
    assert!(flow.agent.exit_code().is_none(), "the agent keeps running");
}

/// agent.yaml for an agent that may impersonate only some identities: the member
/// itself refuses every other caller, so a stolen agent credential is worth no more.
#[test]
fn a_restricted_agent_impersonates_only_the_identities_its_role_names() {
    let flow = seed_flow(&["--impersonate-user", "alice", "--impersonate-group", "devs"]);
    let frontend = flow.replicas[0].frontend;
    // alice in devs passes impersonation; the member's RBAC then judges her request
    // (she has no binding there, so it is refused as hers).
    let alice = flow.kubeconfig(frontend, "alice", &["devs"]);
    let refused = kubectl(&alice, &["get", "pods", "-n", "default"]);
    assert!(
        refused
            .stderr()
            .contains(r#"User "alice" cannot list resource "pods""#),
        "{}",
        refused.stderr()
    );
    // admin in system:masters is refused before that: the agent may not impersonate him.
    let admin = flow.kubeconfig(frontend, "admin", &["system:masters"]);
    let refused = kubectl(&admin, &["get", "pods", "-n", "default"]);
    let stderr = refused.stderr();
    assert!(!refused.0.status.success());
    assert!(
        stderr.contains("cannot impersonate resource \"users\"") && stderr.contains("admin"),
        "{stderr}"
    );
    let calls = flow.member.api.calls();
    assert!(
        calls.iter().all(|c| c.user.as_deref() != Some("admin")),
        "no request ran as admin: {calls:?}"
    );
}
