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
    CURRENT_THREAD_LOG, Member, OperatorPki, Relay, SECRET, Server, TempDir, kubectl,
    kubectl_with_input, wait_for_with,
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

/// What an operator who enforces the restricted Pod Security Standard on Tower's namespace
/// sets (a security review's first ask): Tower's pods must still be admitted.
fn enforce_restricted(kubeconfig: &Path, namespace: &str) {
    let label = format!("{}=restricted", tower_e2e::pod::security::ENFORCE_LABEL);
    kubectl(
        kubeconfig,
        &["label", "namespace", namespace, &label, "--overwrite"],
    )
    .success();
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
    enforce_restricted(&host.kubeconfig, NAMESPACE);
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

/// The host half of the flow: deploy/host running behind its balancer, and a proxy
/// Cluster imported, whose token tower has written.
struct Host {
    host: Member,
    member: Member,
    pki: OperatorPki,
    replicas: Vec<Replica>,
    balancer: Relay,
}

impl Host {
    fn logs(&self) -> String {
        self.replicas
            .iter()
            .map(|r| r.pod.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// Waits for the Cluster's `AgentAvailable` to be `status`.
    fn wait_available(&self, status: &str, agent: &mut Pod) {
        let agent_log = agent.log_file();
        wait_for_with(
            &format!("AgentAvailable={status}"),
            Duration::from_secs(30),
            || {
                if let Some(code) = agent.exit_code() {
                    panic!("the agent exited with {code}:\n{}", agent.log());
                }
                (cluster_field(
                    &self.host,
                    r#"{.status.conditions[?(@.type=="AgentAvailable")].status}"#,
                ) == status)
                    .then_some(())
            },
            || {
                format!(
                    "{}\n---\n{}",
                    self.replicas[0].pod.log(),
                    std::fs::read_to_string(&agent_log).unwrap_or_default()
                )
            },
        );
    }

    /// The whole flow from here, with `agent` the running agent pod.
    fn with_agent(self, agent: Pod) -> Flow {
        Flow {
            _host: self.host,
            member: self.member,
            pki: self.pki,
            replicas: self.replicas,
            agent,
            dir: TempDir::new("seed-flow"),
            _balancer: self.balancer,
        }
    }
}

/// README's steps 1-4: deploy/host, its replicas ready, a proxy Cluster imported and
/// filled by tower.
fn host_flow() -> Host {
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
    let flow = Host {
        host,
        member,
        pki,
        replicas,
        balancer,
    };
    wait_for_with(
        "tower to write spec.connection.token",
        Duration::from_secs(30),
        || (!cluster_field(&flow.host, "{.spec.connection.token}").is_empty()).then_some(()),
        || flow.logs(),
    );
    flow
}

/// README's steps 1-6, from deploy/host to a running agent pod whose Cluster is
/// `AgentAvailable=True`; `manifest_args` are added to `tower-server agent-manifest`.
fn seed_flow(manifest_args: &[&str]) -> Flow {
    let flow = host_flow();
    let Host {
        member, replicas, ..
    } = &flow;

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
    let text = String::from_utf8_lossy(&manifest.stdout);
    assert!(
        !text.contains("jwt-secret") && !text.contains(SECRET),
        "agent.yaml never carries the jwtSecret"
    );

    // Step 5: on the member.
    kubectl_with_input(&member.kubeconfig, &["create", "-f", "-"], &manifest.stdout).success();
    enforce_restricted(&member.kubeconfig, NAMESPACE);
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
    flow.wait_available("True", &mut agent);
    let endpoint = cluster_field(&flow.host, "{.spec.connection.kubernetesAPIEndpoint}");
    assert!(
        endpoint.ends_with(&format!("/clusters/{CLUSTER}")),
        "{endpoint}"
    );
    flow.with_agent(agent)
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
    // Each pod's limits give it one CPU, so each binary runs tokio's current-thread
    // runtime, as deployed.
    for log in replicas
        .iter()
        .map(|r| r.pod.log())
        .chain([flow.agent.log()])
    {
        assert!(log.contains(CURRENT_THREAD_LOG), "{log}");
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

/// The agent Deployment exactly as KubeSphere 3.4's API server renders it for the
/// console's Add Cluster → Import → Agent connection (kubesphere/kubesphere
/// pkg/kapis/cluster/v1alpha1/handler.go, the expected YAML in its handler_test.go):
/// Deployment `cluster-agent` in `kubesphere-system`, one container `agent` running
/// `/agent` with the Cluster's token and the proxy address as configured (often
/// `http://IP:8080`), ServiceAccount `kubesphere`, no probes, volumes or securityContext.
/// Here the agentImage is Tower's.
fn console_deployment(token: &str, proxy_server: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: cluster-agent
  namespace: kubesphere-system
spec:
  selector:
    matchLabels:
      app: agent
      app.kubernetes.io/part-of: tower
  template:
    metadata:
      labels:
        app: agent
        app.kubernetes.io/part-of: tower
    spec:
      containers:
      - command:
        - /agent
        - --name={CLUSTER}
        - --token={token}
        - --proxy-server={proxy_server}
        - --keepalive=10s
        - --kubesphere-service=ks-apiserver.kubesphere-system.svc:80
        - --kubernetes-service=kubernetes.default.svc:443
        - --v=0
        image: tower:test
        name: agent
        resources:
          limits:
            cpu: "1"
            memory: 200M
          requests:
            cpu: 100m
            memory: 100M
      serviceAccountName: kubesphere
"#
    )
}

/// What a KubeSphere member has before the agent comes: its namespace, the `kubesphere`
/// ServiceAccount bound to cluster-admin (ks-installer's), and the platform
/// configuration, `kubesphere-config`, whose kubesphere.yaml holds `jwt_secret_line`.
fn kubesphere_member(member: &Member, jwt_secret_line: &str) {
    let objects = format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: kubesphere-system
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: kubesphere
  namespace: kubesphere-system
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: kubesphere
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: cluster-admin
subjects:
- kind: ServiceAccount
  name: kubesphere
  namespace: kubesphere-system
---
{}"#,
        kubesphere_config(jwt_secret_line)
    );
    kubectl_with_input(
        &member.kubeconfig,
        &["apply", "-f", "-"],
        objects.as_bytes(),
    )
    .success();
}

/// ConfigMap `kubesphere-config` as ks-installer writes it, cut to what matters here.
fn kubesphere_config(jwt_secret_line: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kubesphere-config\n  namespace: kubesphere-system\n\
         data:\n  kubesphere.yaml: |\n    authentication:\n      authenticateRateLimiterMaxTries: 10\n{jwt_secret_line}\
         \n    multicluster:\n      clusterRole: member\n"
    )
}

/// The console's agent Deployment, created on the member and run by its kubelet.
fn start_console_agent(flow: &Host, token: &str, proxy_server: &str) -> Pod {
    let deployment = console_deployment(token, proxy_server);
    kubectl_with_input(
        &flow.member.kubeconfig,
        &["create", "-f", "-"],
        deployment.as_bytes(),
    )
    .success();
    Kubelet::new(
        ApiServer::stand_in(&flow.member.api, &flow.member.kubeconfig),
        Image::tower(),
    )
    .start_deployment("kubesphere-system", "cluster-agent", &Overrides::default())
    .unwrap_or_else(|e| panic!("the console's agent pod must start: {e}"))
}

#[test]
fn the_consoles_own_agent_deployment_runs_tower_agent_with_only_the_token() {
    let flow = host_flow();
    kubesphere_member(&flow.member, &format!("      jwtSecret: \"{SECRET}\""));
    let token = cluster_field(&flow.host, "{.spec.connection.token}");
    // The address as the seed configures it: http://, which Tower still dials with TLS,
    // verifying the server against the CA pinned in the token.
    let mut agent = start_console_agent(&flow, &token, &format!("http://{}", flow.balancer.addr));
    flow.wait_available("True", &mut agent);
    let log = agent.log();
    assert!(log.contains("tower tunnels use TLS regardless"), "{log}");
    let flow = flow.with_agent(agent);

    let admin = flow.kubeconfig(flow.replicas[0].frontend, "admin", &["system:masters"]);
    let pods = kubectl(&admin, &["get", "pods", "-n", "default", "-o", "name"]).success();
    assert!(pods.contains("pod/"), "{pods}");
    let calls = flow.member.api.calls();
    let call = calls
        .iter()
        .rev()
        .find(|c| {
            c.path_and_query
                .starts_with("/api/v1/namespaces/default/pods")
        })
        .expect("the list reached the member");
    // The member saw the pod's own ServiceAccount (not --kubernetes-service's address,
    // which does not resolve here) impersonate the caller.
    assert_eq!(
        call.credential, "serviceaccount:kubesphere-system/kubesphere",
        "{call:?}"
    );
    assert_eq!(call.impersonate_user.as_deref(), Some("admin"));
    assert_eq!(call.impersonate_groups, ["system:masters"]);
    assert!(
        calls
            .iter()
            .filter(|c| c.impersonate_user.is_some())
            .all(|c| c.credential == "serviceaccount:kubesphere-system/kubesphere"),
        "{calls:?}"
    );
    // The agent read its key from kubesphere-config, as the pod's ServiceAccount, saying
    // what it is (the member's audit log names it); what it relayed kept kubectl's own
    // (`kubectl/…`, `kubectl-dispatcher/…` for its version check).
    assert!(
        calls.iter().any(|c| c.path_and_query
            == "/api/v1/namespaces/kubesphere-system/configmaps/kubesphere-config"
            && c.credential == "serviceaccount:kubesphere-system/kubesphere"
            && c.user_agent
                .as_deref()
                .is_some_and(|ua| ua.starts_with("tower-agent/"))),
        "{calls:?}"
    );
    assert!(
        calls
            .iter()
            .filter(|c| c.impersonate_user.is_some())
            .all(|c| c
                .user_agent
                .as_deref()
                .is_some_and(|ua| ua.starts_with("kubectl"))),
        "{calls:?}"
    );
}

#[test]
fn a_wrong_pin_in_the_token_is_refused_with_what_was_expected_and_what_came() {
    let flow = host_flow();
    kubesphere_member(&flow.member, &format!("      jwtSecret: \"{SECRET}\""));
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let token = Server::minter().agent_token_pinned(CLUSTER, None, Some(&wrong));
    let mut agent = start_console_agent(&flow, &token, &format!("https://{}", flow.balancer.addr));
    let expected = format!("expected {wrong}");
    wait_for_with(
        "the agent to refuse the server's certificate",
        Duration::from_secs(30),
        || agent.log().contains(&expected).then_some(()),
        || agent.log(),
    );
    let log = agent.log();
    assert!(
        log.contains("does not contain the pinned CA")
            && log.contains("the chain's keys are sha256:"),
        "{log}"
    );
    assert!(agent.exit_code().is_none(), "it keeps trying: {log}");
    assert_ne!(
        cluster_field(
            &flow.host,
            r#"{.status.conditions[?(@.type=="AgentAvailable")].status}"#
        ),
        "True"
    );
    // No replica ever saw a tunnel from it.
    assert!(!flow.logs().contains("tunnel up"), "{}", flow.logs());
}

#[test]
fn without_a_jwt_secret_on_the_member_the_agent_connects_but_serves_no_one_until_it_has_one() {
    let flow = host_flow();
    // A KubeSphere member whose configuration has no jwtSecret (yet).
    kubesphere_member(&flow.member, "");
    let token = cluster_field(&flow.host, "{.spec.connection.token}");
    let mut agent = start_console_agent(&flow, &token, &format!("https://{}", flow.balancer.addr));
    flow.wait_available("True", &mut agent);
    assert!(
        agent.log().contains(
            "kubesphere-system/kubesphere-config: kubesphere.yaml has no authentication.jwtSecret"
        ),
        "{}",
        agent.log()
    );
    let flow = flow.with_agent(agent);
    let admin = flow.kubeconfig(flow.replicas[0].frontend, "admin", &["system:masters"]);
    // (--raw, whose path ignores the server URL's: kubectl's discovery would show a 503
    // only as "unable to handle".)
    let raw = format!("/clusters/{CLUSTER}/api/v1/namespaces/default/pods");
    let refused = kubectl(&admin, &["get", "--raw", &raw]);
    assert!(!refused.0.status.success());
    let stderr = refused.stderr();
    assert!(
        stderr.contains("ServiceUnavailable")
            && stderr.contains("cannot check who callers are")
            && stderr.contains("no authentication.jwtSecret"),
        "{stderr}"
    );
    assert!(
        flow.member.api.calls().iter().all(|c| !c
            .path_and_query
            .starts_with("/api/v1/namespaces/default/pods")),
        "nothing reached the member's pods"
    );
    // The operator fixes the configuration: the agent follows it without a restart.
    kubectl_with_input(
        &flow.member.kubeconfig,
        &["apply", "-f", "-"],
        kubesphere_config(&format!("      jwtSecret: \"{SECRET}\"")).as_bytes(),
    )
    .success();
    wait_for_with(
        "the agent to take up the jwtSecret (and say so: it logs once the key is in use)",
        Duration::from_secs(30),
        || {
            (kubectl(&admin, &["get", "pods", "-n", "default", "-o", "name"])
                .0
                .status
                .success()
                && flow.agent.log().contains("identity key (re)loaded"))
            .then_some(())
        },
        || flow.agent.log(),
    );
}
