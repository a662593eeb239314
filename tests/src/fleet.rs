//! Many agents in one process: [`Fleet`] runs `tower_agent::run` (what the binary runs)
//! for each of a list of clusters on one two-thread runtime, every agent with its own
//! name and token and all sharing one [`Metrics`], whose count of tunnels up says how
//! many are connected without asking the server. Thousands of agent processes would
//! measure the machine, not the server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser as _;
use tokio_util::sync::CancellationToken;
use tower_agent::metrics::Metrics;

use crate::{Member, Server};

/// Agents running in this process.
pub struct Fleet {
    runtime: tokio::runtime::Runtime,
    metrics: Arc<Metrics>,
    agents: Vec<Running>,
}

struct Running {
    name: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// `n` cluster names `{prefix}-00000`… with agent tokens minted with the shared secret.
pub fn clusters(prefix: &str, n: usize) -> Vec<(String, String)> {
    let minter = Server::minter();
    (0..n)
        .map(|i| {
            let name = format!("{prefix}-{i:05}");
            let token = minter.agent_token(&name, None);
            (name, token)
        })
        .collect()
}

/// The configuration `tower-agent` builds from its flags for cluster `name` with `token`,
/// dialing `server` and serving `member`'s API server (built on `runtime`, as the binary
/// builds it on its own).
pub fn agent_config(
    runtime: &tokio::runtime::Runtime,
    server: &Server,
    member: &Member,
    name: &str,
    token: &str,
) -> tower_agent::Config {
    let proxy_server = format!("https://{}", server.tunnel);
    let ca_file = server.ca_file.display().to_string();
    let kubeconfig = member.kubeconfig.display().to_string();
    let secret_file = server.secret_file.display().to_string();
    let flags = [
        ("--name", name),
        ("--token", token),
        ("--proxy-server", &proxy_server),
        ("--ca-file", &ca_file),
        ("--kubeconfig", &kubeconfig),
        ("--jwt-secret-file", &secret_file),
        ("--shutdown-grace", "1s"),
    ];
    let args = std::iter::once("tower-agent").chain(flags.iter().flat_map(|(k, v)| [*k, *v]));
    let cli = tower_agent::cli::Cli::try_parse_from(args).expect("agent flags");
    runtime
        .block_on(tower_agent::cli::build_config(&cli))
        .expect("agent config")
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}

impl Fleet {
    /// No agents yet.
    pub fn new() -> Fleet {
        Fleet {
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("agents' runtime"),
            metrics: Arc::new(Metrics::default()),
            agents: Vec::new(),
        }
    }

    /// Starts an agent for each (name, token) of `clusters`, dialing `server` and
    /// serving `member`'s API server.
    pub fn start(&mut self, server: &Server, member: &Member, clusters: &[(String, String)]) {
        for (name, token) in clusters {
            let mut config = agent_config(&self.runtime, server, member, name, token);
            config.metrics = self.metrics.clone();
            let stop = CancellationToken::new();
            let task = self.runtime.spawn({
                let stop = stop.clone();
                async move {
                    let _ = tower_agent::run(config, None, stop).await;
                }
            });
            self.agents.push(Running {
                name: name.clone(),
                stop,
                task,
            });
        }
    }

    /// Tunnels up now, over every agent.
    pub fn tunnels_up(&self) -> usize {
        self.metrics.tunnels_up()
    }

    /// Dials that failed so far, over every agent.
    pub fn dials_failed(&self) -> u64 {
        self.metrics.dials_failed()
    }

    /// Waits until `n` tunnels are up or `limit` passes: how long it took, if they did.
    pub fn wait_up(&self, n: usize, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        loop {
            if self.tunnels_up() >= n {
                return Some(started.elapsed());
            }
            if started.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the agents of `names` and waits for them (each at most its grace).
    pub fn stop_agents(&mut self, names: &[String]) {
        let (stopping, kept): (Vec<Running>, Vec<Running>) = std::mem::take(&mut self.agents)
            .into_iter()
            .partition(|a| names.contains(&a.name));
        self.agents = kept;
        self.join(stopping);
    }

    fn join(&self, agents: Vec<Running>) {
        for agent in &agents {
            agent.stop.cancel();
        }
        self.runtime.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                for agent in agents {
                    let _ = agent.task.await;
                }
            })
            .await;
        });
    }

    /// Stops every agent and the runtime.
    pub fn stop(mut self) {
        let agents = std::mem::take(&mut self.agents);
        self.join(agents);
        self.runtime.shutdown_timeout(Duration::from_secs(5));
    }
}

/// A stand-in host API server holding KubeSphere `Cluster` objects, written and read
/// over its HTTP API (kubectl would take a process per call).
pub struct ClusterHost<'a> {
    host: &'a Member,
    tls: Arc<rustls::ClientConfig>,
    runtime: tokio::runtime::Runtime,
}

/// The Cluster API's path.
const CLUSTERS: &str = "/apis/cluster.kubesphere.io/v1alpha1/clusters";

impl<'a> ClusterHost<'a> {
    /// Speaks to `host`'s stand-in with its own token.
    pub fn new(host: &'a Member) -> Self {
        let ca = tower_tunnel::tls::certs_from_pem(host.api.ca_pem().as_bytes()).expect("CA");
        let tls = tower_tunnel::tls::client_config(&tower_tunnel::tls::CaTrust::Certificates(ca))
            .expect("TLS config");
        ClusterHost {
            host,
            tls,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
        }
    }

    /// A kubeconfig for the host whose token the stand-in records as its own credential
    /// (`token#N` in [`tower_kube_stand_in::Call`]), so a server's calls can be told
    /// from the test's; written under `dir`.
    pub fn kubeconfig_with_token(&self, token: &str, dir: &std::path::Path) -> std::path::PathBuf {
        self.host.api.accept_token(token);
        let yaml = std::fs::read_to_string(&self.host.kubeconfig).expect("host kubeconfig");
        let own = serde_json::Value::String(self.host.api.token().to_owned()).to_string();
        let theirs = serde_json::Value::String(token.to_owned()).to_string();
        let path = dir.join("host-kubeconfig");
        std::fs::write(&path, yaml.replace(&own, &theirs)).expect("write kubeconfig");
        path
    }

    /// Creates a proxy Cluster for each (name, token), `spec.connection.token` set, with
    /// the `metadata.managedFields` a real API server would hold for it ([`MANAGED_FIELDS`]).
    pub fn create_proxy_clusters(&self, clusters: &[(String, String)]) {
        let managed: serde_json::Value =
            serde_json::from_str(MANAGED_FIELDS).expect("MANAGED_FIELDS is JSON");
        let (addr, token) = (self.host.api.addr(), self.host.api.token().to_owned());
        self.runtime.block_on(async {
            let mut sender =
                crate::http1_over_tls::<http_body_util::Full<bytes::Bytes>>(addr, self.tls.clone())
                    .await;
            for (name, agent_token) in clusters {
                let body = serde_json::json!({
                    "apiVersion": "cluster.kubesphere.io/v1alpha1",
                    "kind": "Cluster",
                    "metadata": {"name": name, "managedFields": managed},
                    "spec": {"joinFederation": true, "connection": {"type": "proxy", "token": agent_token}},
                });
                // Created as the console creates them: through ks-apiserver.
                let request = http::Request::post(format!("{CLUSTERS}?fieldManager=ks-apiserver"))
                    .header("host", "localhost")
                    .header("authorization", format!("Bearer {token}"))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
                    .expect("request");
                sender.ready().await.expect("connection");
                let response = sender.send_request(request).await.expect("create Cluster");
                let status = response.status();
                use http_body_util::BodyExt as _;
                let body = response.into_body().collect().await.expect("body").to_bytes();
                assert_eq!(status, 201, "creating Cluster {name}: {}", String::from_utf8_lossy(&body));
            }
        });
    }

    /// Every Cluster's `AgentAvailable` status (`None`: no such condition), and whether
    /// its `spec.connection.kubeconfig` is written (what KubeSphere's cluster controller
    /// waits for before it uses the Cluster).
    pub fn agent_available(&self) -> std::collections::HashMap<String, (Option<String>, bool)> {
        let (addr, token) = (self.host.api.addr(), self.host.api.token().to_owned());
        let body = self.runtime.block_on(async {
            let mut sender = crate::http1_over_tls::<http_body_util::Empty<bytes::Bytes>>(
                addr,
                self.tls.clone(),
            )
            .await;
            let request = http::Request::get(CLUSTERS)
                .header("host", "localhost")
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Empty::new())
                .expect("request");
            let response = sender.send_request(request).await.expect("list Clusters");
            use http_body_util::BodyExt as _;
            response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes()
        });
        let list: serde_json::Value = serde_json::from_slice(&body).expect("Cluster list");
        list["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|c| {
                        let name = c["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        let status = c["status"]["conditions"].as_array().and_then(|cs| {
                            cs.iter()
                                .find(|c| c["type"] == "AgentAvailable")
                                .and_then(|c| c["status"].as_str().map(str::to_owned))
                        });
                        let kubeconfig = c["spec"]["connection"]["kubeconfig"]
                            .as_str()
                            .is_some_and(|k| !k.is_empty());
                        (name, (status, kubeconfig))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The clusters of `want` whose `AgentAvailable` is not `want[name]` (`True` or
    /// `False`), or whose kubeconfig is not written yet.
    pub fn wrong(&self, want: &std::collections::HashMap<String, &str>) -> Vec<String> {
        let now = self.agent_available();
        let mut wrong: Vec<String> = want
            .iter()
            .filter(|(name, status)| match now.get(*name) {
                Some((Some(is), true)) => is != **status,
                _ => true,
            })
            .map(|(name, _)| name.clone())
            .collect();
        wrong.sort();
        wrong
    }
}

/// The most of `times` (sorted) that fall within any `window`.
pub fn most_within(times: &[Instant], window: Duration) -> usize {
    let mut most = 0;
    let mut from = 0;
    for (i, at) in times.iter().enumerate() {
        while *at - times[from] > window {
            from += 1;
        }
        most = most.max(i + 1 - from);
    }
    most
}

/// The `metadata.managedFields` a real API server keeps on a proxy Cluster that
/// KubeSphere's console created, its cluster controller and tower-server wrote to: one
/// entry per writer, each the set of fields it set (FieldsV1). The Cluster CRD (ks-core's
/// `cluster.kubesphere.io_clusters.yaml`, v3.4.1) has no list markers, so its conditions
/// are one atomic field. [`ClusterHost::create_proxy_clusters`] creates each Cluster with
/// these, as a host that has run for a while holds them; the stand-in records the writes
/// made after (tower-server's own condition writes among them) as the apiserver does.
pub const MANAGED_FIELDS: &str = r#"[
 {"manager":"ks-apiserver","operation":"Update","apiVersion":"cluster.kubesphere.io/v1alpha1","time":"2026-12-07T00:00:00Z","fieldsType":"FieldsV1",
  "fieldsV1":{"f:metadata":{"f:annotations":{".":{},"f:kubesphere.io/creator":{},"f:kubesphere.io/description":{}},"f:labels":{".":{},"f:cluster.kubesphere.io/group":{},"f:cluster-role.kubesphere.io/member":{}}},
   "f:spec":{".":{},"f:connection":{".":{},"f:type":{},"f:token":{}},"f:enable":{},"f:joinFederation":{},"f:provider":{}}}},
 {"manager":"controller-manager","operation":"Update","apiVersion":"cluster.kubesphere.io/v1alpha1","time":"2026-12-07T00:00:05Z","fieldsType":"FieldsV1",
  "fieldsV1":{"f:metadata":{"f:finalizers":{".":{},"v:\"finalizer.cluster.kubesphere.io\"":{}}},
   "f:status":{".":{},"f:conditions":{},
    "f:configz":{".":{},"f:alerting":{},"f:auditing":{},"f:devops":{},"f:events":{},"f:logging":{},"f:monitoring":{},"f:multicluster":{},"f:network":{},"f:network.ippool":{},"f:network.topology":{},"f:notification":{},"f:openpitrix":{},"f:servicemesh":{}},
    "f:kubeSphereVersion":{},"f:kubernetesVersion":{},"f:nodeCount":{},"f:uid":{}}}},
 {"manager":"tower-server","operation":"Update","apiVersion":"cluster.kubesphere.io/v1alpha1","time":"2026-12-07T00:00:01Z","fieldsType":"FieldsV1",
  "fieldsV1":{"f:metadata":{"f:annotations":{"f:tower.kubesphere.io/previous-token":{}}},
   "f:spec":{"f:connection":{"f:kubeconfig":{},"f:kubernetesAPIEndpoint":{},"f:kubesphereAPIEndpoint":{},"f:kubesphereAPIServerPort":{}}}}}
]"#;
