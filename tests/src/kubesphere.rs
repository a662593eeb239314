//! Stand-ins for KubeSphere's host components, modelled on KubeSphere's source
//! (kubesphere/kubesphere, release-3.4), for tests of what Tower writes into a proxy
//! Cluster:
//!
//! - [`ClusterControllerClient`] models pkg/controller/cluster/cluster_controller.go
//!   (v3.4.1), `syncCluster`: it builds its client from `spec.connection.kubeconfig`
//!   **alone** (`clientcmd.RESTConfigFromKubeConfig`) and, in its order, joins the member
//!   to kubefed (a namespace, a ServiceAccount and a ClusterRole created **on the member**),
//!   reads `/version`, lists nodes, reads the member's ks-apiserver's configz and version
//!   through the apiserver's service proxy (`proxyFormat`, over `rest.TransportFor`), reads
//!   the `kube-system` namespace's UID, writes the cluster's name into the member's
//!   `kubesphere-config` (`setClusterNameInConfigMap`) and lists the ClusterRoleBindings
//!   that name KubeSphere users (`syncClusterMembers`). Its client is kubectl (client-go)
//!   with the decoded kubeconfig and nothing else, and for the two service-proxy reads, an
//!   HTTPS client with that kubeconfig's server, CA and token.
//! - [`install_member_kubesphere`]: what a KubeSphere install puts on the member that
//!   `syncCluster` reads.
//! - [`dispatch`] and [`dispatch_websocket`] model pkg/apiserver/dispatch/dispatch.go,
//!   `clusterDispatch.Dispatch`: of kubesphereAPIEndpoint only the scheme and host:port are
//!   kept (`u.Host = innCluster.KubesphereURL.Host`, `u.Scheme = …Scheme`), the path is
//!   the caller's with `/clusters/NAME` cut, the query, the caller's `Host` header and
//!   `Authorization` (the user's JWT) go through unchanged, over Go's default transport
//!   (plain HTTP here), and upgrades are proxied (`proxy.NewUpgradeAwareHandler`).
//! - [`KsApiServer`] is the member's ks-apiserver behind the agent's `kubesphere` target,
//!   which records what reaches it and echoes WebSocket messages.
//! - [`set_cluster_finalizers`] and [`delete_held`]: a Cluster's deletion as `syncCluster`
//!   meets it. The controller puts [`CLUSTER_FINALIZER`] on every Cluster; a deleted one
//!   stays, terminating, while it cleans up on the member through the agent, until it
//!   removes the finalizer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::{Kubectl, TempDir, kubectl};

/// The finalizer KubeSphere's cluster controller puts on every Cluster.
pub const CLUSTER_FINALIZER: &str = "finalizer.cluster.kubesphere.io";

/// Sets Cluster `name`'s finalizers (`[]`: none) with a merge patch, as the controller's
/// `Update` does.
pub fn set_cluster_finalizers(kubeconfig: &Path, name: &str, finalizers: &[&str]) {
    let patch = serde_json::json!({"metadata": {"finalizers": finalizers}});
    kubectl(
        kubeconfig,
        &[
            "patch",
            "cluster",
            name,
            "--type",
            "merge",
            "-p",
            &patch.to_string(),
        ],
    )
    .success();
}

/// Deletes Cluster `name`, which a finalizer holds, and returns it once it is terminating.
pub fn delete_held(kubeconfig: &Path, name: &str) -> serde_json::Value {
    kubectl(kubeconfig, &["delete", "cluster", name, "--wait=false"]).success();
    crate::wait_for(
        "the Cluster to be terminating",
        std::time::Duration::from_secs(20),
        || {
            let out = kubectl(kubeconfig, &["get", "cluster", name, "-o", "json"]);
            let cluster: serde_json::Value = serde_json::from_str(&out.success()).ok()?;
            cluster["metadata"]["deletionTimestamp"]
                .is_string()
                .then_some(cluster)
        },
    )
}

/// Creates `namespace` (a JSON body: the stand-in reads protobuf for a few kinds only).
pub fn create_namespace(kubeconfig: &Path, namespace: &str) {
    let yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n");
    crate::kubectl_with_input(kubeconfig, &["create", "-f", "-"], yaml.as_bytes()).success();
}

/// One request as the ks-apiserver stand-in saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The `Host` header.
    pub host: String,
    /// The `Authorization` header.
    pub authorization: String,
    /// The body's length.
    pub body_len: usize,
    /// Headers whose names start with `impersonate-` or `x-remote-`.
    pub identity_headers: Vec<String>,
}

/// The member's ks-apiserver: answers its configz and version (which it serves to anyone:
/// v3.4.1 pkg/apiserver/apiserver.go, `excludedPaths`) as [`CONFIGZ`] and [`VERSION`],
/// `{"seen": N}` (the request's number) to every other plain request, echoes each
/// WebSocket message, and records every request.
pub struct KsApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    _runtime: tokio::runtime::Runtime,
}

impl KsApiServer {
    /// Starts it on 127.0.0.1:0.
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let recorded = seen.clone();
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let recorded = recorded.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(req, &recorded).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        KsApiServer {
            addr,
            seen,
            _runtime: runtime,
        }
    }

    /// What reached it so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

async fn answer(
    mut req: http::Request<Incoming>,
    recorded: &Mutex<Vec<Seen>>,
) -> http::Response<Full<Bytes>> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut seen = Seen {
        method: req.method().to_string(),
        path: req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        host: header("host"),
        authorization: header("authorization"),
        body_len: 0,
        identity_headers: req
            .headers()
            .keys()
            .map(|k| k.as_str().to_owned())
            .filter(|k| k.starts_with("impersonate-") || k.starts_with("x-remote-"))
            .collect(),
    };
    if let Some(key) = req.headers().get("sec-websocket-key").cloned() {
        let protocol = req.headers().get("sec-websocket-protocol").cloned();
        recorded.lock().expect("seen").push(seen);
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                None,
            )
            .await;
            while let Some(Ok(message)) = ws.next().await {
                let echo = matches!(message, Message::Binary(_) | Message::Text(_));
                if matches!(message, Message::Close(_)) || (echo && ws.send(message).await.is_err())
                {
                    return;
                }
            }
        });
        let mut response = http::Response::builder()
            .status(101)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()));
        if let Some(protocol) = protocol {
            // The first offered protocol, as the apiserver picks v4.channel.k8s.io.
            let first = protocol
                .to_str()
                .unwrap_or_default()
                .split(',')
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned();
            response = response.header("sec-websocket-protocol", first);
        }
        return response.body(Full::new(Bytes::new())).expect("101");
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    seen.body_len = body.len();
    let fixed = match seen.path.as_str() {
        "/kapis/config.kubesphere.io/v1alpha2/configs/configz" => Some(CONFIGZ),
        "/kapis/version" => Some(VERSION),
        _ => None,
    };
    let n = {
        let mut all = recorded.lock().expect("seen");
        all.push(seen);
        all.len()
    };
    let body = fixed.map_or_else(
        || format!("{{\"seen\":{n},\"bodyBytes\":{}}}", body.len()),
        str::to_owned,
    );
    http::Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

/// What the member's ks-apiserver answers at `/kapis/config.kubesphere.io/v1alpha2/configs/configz`
/// (`Config.ToMap`: each component, enabled or not).
pub const CONFIGZ: &str = r#"{"alerting":false,"auditing":false,"devops":false,"events":false,"logging":false,"monitoring":true,"multicluster":true,"network":false,"network.ippool":false,"network.topology":false,"notification":true,"openpitrix":true,"servicemesh":false}"#;

/// What it answers at `/kapis/version` (a `version.Info`).
pub const VERSION: &str = r#"{"gitVersion":"v3.4.1","gitMajor":"3","gitMinor":"4","gitTreeState":"clean","goVersion":"go1.19","compiler":"gc","platform":"linux/amd64"}"#;

/// What a KubeSphere install (ks-installer) puts on a member that `syncCluster` reads
/// through the agent: namespace `kubesphere-system`; Service `ks-apiserver`, port 80 to
/// 9090, unnamed, with Endpoints at `ks` (the stand-in has no endpoints controller: they
/// are written here as it would write them); and ConfigMap `kubesphere-config`, whose
/// `kubesphere.yaml` says this is a member.
pub fn install_member_kubesphere(member: &Path, ks: &KsApiServer) {
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: kubesphere-system\n---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: ks-apiserver\n  namespace: kubesphere-system\n\
         spec:\n  selector:\n    app: ks-apiserver\n  ports:\n  - protocol: TCP\n    port: 80\n    targetPort: 9090\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata:\n  name: ks-apiserver\n  namespace: kubesphere-system\n\
         subsets:\n- addresses:\n  - ip: {ip}\n  ports:\n  - port: {port}\n    protocol: TCP\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kubesphere-config\n  namespace: kubesphere-system\n\
         data:\n  kubesphere.yaml: |\n    monitoring:\n      endpoint: http://prometheus-operated.kubesphere-monitoring-system.svc:9090\n    multicluster:\n      clusterRole: member\n",
        ip = ks.addr.ip(),
        port = ks.addr.port(),
    );
    crate::kubectl_with_input(member, &["create", "-f", "-"], yaml.as_bytes()).success();
}

/// scheme://host:port of a kubesphereAPIEndpoint: all the dispatcher keeps of it.
pub fn endpoint_base(endpoint: &str) -> String {
    let uri: http::Uri = endpoint.parse().expect("kubesphereAPIEndpoint is a URL");
    format!(
        "{}://{}",
        uri.scheme_str().expect("a scheme"),
        uri.authority().expect("host:port")
    )
}

/// What the dispatcher got back: status and body.
#[derive(Debug)]
pub struct Dispatched {
    /// Status.
    pub status: u16,
    /// Body.
    pub body: String,
}

/// A request of a caller that reached the host's ks-apiserver at `/…/clusters/NAME{path}`
/// with `host` as its Host header, forwarded as the dispatcher does to `endpoint`.
pub fn dispatch(
    endpoint: &str,
    method: &str,
    path: &str,
    host: &str,
    jwt: &str,
    body: &[u8],
) -> Dispatched {
    let base: http::Uri = endpoint_base(endpoint).parse().expect("uri");
    assert_eq!(
        base.scheme_str(),
        Some("http"),
        "Go's default transport has no CA for Tower: the endpoint must be plain HTTP"
    );
    let addr = base.authority().expect("authority").to_string();
    let request = dispatched_request(method, path, host, jwt, body);
    runtime().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        exchange(tcp, request).await
    })
}

/// [`dispatch`] by a dispatcher whose roots include the Tower CA (`ca_pem`), to an https
/// `endpoint` whose host resolves to `addr`: the certificate must cover the endpoint's
/// host, as Go's transport checks it.
pub fn dispatch_tls(
    endpoint: &str,
    ca_pem: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    jwt: &str,
) -> Result<Dispatched, String> {
    let base: http::Uri = endpoint_base(endpoint).parse().expect("uri");
    assert_eq!(base.scheme_str(), Some("https"), "{endpoint}");
    let name = rustls::pki_types::ServerName::try_from(base.host().expect("host").to_owned())
        .map_err(|e| e.to_string())?;
    let roots = tower_tunnel::tls::certs_from_pem(ca_pem.as_bytes()).expect("CA");
    let tls = tower_tunnel::tls::client_config(&tower_tunnel::tls::CaTrust::Certificates(roots))
        .expect("TLS client");
    let request = dispatched_request(
        method,
        path,
        base.authority().expect("authority").as_str(),
        jwt,
        b"",
    );
    runtime().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        Ok(exchange(tls, request).await)
    })
}

fn dispatched_request(
    method: &str,
    path: &str,
    host: &str,
    jwt: &str,
    body: &[u8],
) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("authorization", format!("Bearer {jwt}"))
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request")
}

/// Sends `request` over HTTP/1.1 on `io` and reads the answer whole.
async fn exchange<T>(io: T, request: http::Request<Full<Bytes>>) -> Dispatched
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Dispatched {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A console exec over WebSocket through the dispatcher: opens `path` on `endpoint` with
/// the caller's Host and JWT, sends each of `messages` and returns what came back.
pub fn dispatch_websocket(
    endpoint: &str,
    path: &str,
    host: &str,
    jwt: &str,
    messages: &[&[u8]],
) -> Result<Vec<Vec<u8>>, String> {
    let base = endpoint_base(endpoint);
    let addr = base.trim_start_matches("http://").to_owned();
    let request = http::Request::builder()
        .uri(format!("ws://{addr}{path}"))
        .header("host", host)
        .header("authorization", format!("Bearer {jwt}"))
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header(
            "sec-websocket-key",
            tokio_tungstenite::tungstenite::handshake::client::generate_key(),
        )
        .header("sec-websocket-protocol", "v4.channel.k8s.io")
        .body(())
        .map_err(|e| e.to_string())?;
    let messages: Vec<Vec<u8>> = messages.iter().map(|m| m.to_vec()).collect();
    runtime().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let (mut ws, response) = tokio_tungstenite::client_async(request, tcp)
            .await
            .map_err(|e| format!("WebSocket handshake: {e}"))?;
        if response.status() != 101 {
            return Err(format!("status {}", response.status()));
        }
        let mut echoed = Vec::new();
        for message in messages {
            ws.send(Message::binary(message))
                .await
                .map_err(|e| e.to_string())?;
            let reply = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
                .await
                .map_err(|_| "no echo within 10s".to_owned())?
                .ok_or("closed")?
                .map_err(|e| e.to_string())?;
            echoed.push(reply.into_data().to_vec());
        }
        let _ = ws.close(None).await;
        Ok(echoed)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The cluster controller's client: kubectl with the Cluster's kubeconfig, decoded from
/// `spec.connection.kubeconfig`, and nothing else (no other file, no environment).
pub struct ClusterControllerClient {
    /// The kubeconfig file.
    pub kubeconfig: PathBuf,
    _dir: TempDir,
}

impl ClusterControllerClient {
    /// From a Cluster's `spec.connection.kubeconfig` (base64, as Go's `[]byte` is in JSON).
    pub fn from_cluster(cluster: &serde_json::Value) -> Self {
        let encoded = cluster["spec"]["connection"]["kubeconfig"]
            .as_str()
            .expect("spec.connection.kubeconfig is set");
        let yaml = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("spec.connection.kubeconfig is base64");
        let dir = TempDir::new("ks-controller");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, yaml).expect("write kubeconfig");
        ClusterControllerClient {
            kubeconfig,
            _dir: dir,
        }
    }

    /// kubectl through that client.
    pub fn kubectl(&self, args: &[&str]) -> Kubectl {
        kubectl(&self.kubeconfig, args)
    }

    /// What `syncCluster` does through the client for Cluster `name`, in its order; see
    /// the module's documentation. Each step whose failure fails the sync panics; the two
    /// the controller only logs (configz, KubeSphere's version) are `None` when they fail.
    pub fn sync(&self, name: &str) -> Synced {
        // JSON bodies, as client-go's typed clients send by default.
        let join = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: kube-federation-system\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {name}-kubesphere\n  namespace: kube-federation-system\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: kubefed-controller-manager:{name}-kubesphere\nrules:\n- apiGroups: [\"*\"]\n  resources: [\"*\"]\n  verbs: [\"*\"]\n"
        );
        crate::kubectl_with_input(&self.kubeconfig, &["create", "-f", "-"], join.as_bytes())
            .success();
        // `Discovery().ServerVersion()`: GET {server path}/version (`kubectl get --raw`
        // would drop the server's path, which client-go's AbsPath keeps).
        let version: serde_json::Value =
            serde_json::from_str(&self.kubectl(&["version", "-o", "json"]).success())
                .expect("version JSON");
        let version = &version["serverVersion"];
        let nodes: serde_json::Value =
            serde_json::from_str(&self.kubectl(&["get", "nodes", "-o", "json"]).success())
                .expect("nodes JSON");
        // `tryToFetchKubeSphereComponents` and `tryFetchKubeSphereVersion`.
        let configz = self
            .through_service_proxy("kapis/config.kubesphere.io/v1alpha2/configs/configz")
            .and_then(|v| v.as_object().cloned());
        let kubesphere_version = self
            .through_service_proxy("kapis/version")
            .and_then(|v| v["gitVersion"].as_str().map(str::to_owned));
        let uid = self
            .kubectl(&[
                "get",
                "namespace",
                "kube-system",
                "-o",
                "jsonpath={.metadata.uid}",
            ])
            .success();
        self.set_cluster_name_in_config_map(name);
        // `syncClusterMembers`: the bindings that name KubeSphere users.
        self.kubectl(&[
            "get",
            "clusterrolebindings",
            "-l",
            "iam.kubesphere.io/user-ref",
            "-o",
            "json",
        ])
        .success();
        Synced {
            kubernetes_version: version["gitVersion"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            node_count: nodes["items"].as_array().map_or(0, Vec::len),
            uid: uid.trim().to_owned(),
            configz,
            kubesphere_version,
        }
    }

    /// GET `{server}/api/v1/namespaces/kubesphere-system/services/:ks-apiserver:80/proxy/{path}`
    /// with the kubeconfig's CA and token, as a 200 with JSON, else `None` (the
    /// controller's 5 s client timeout stands for the 30 s of [`crate::Https`]).
    fn through_service_proxy(&self, path: &str) -> Option<serde_json::Value> {
        let config: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&self.kubeconfig).ok()?).ok()?;
        let server: http::Uri = config["clusters"][0]["cluster"]["server"]
            .as_str()?
            .parse()
            .ok()?;
        let ca = base64::engine::general_purpose::STANDARD
            .decode(config["clusters"][0]["cluster"]["certificate-authority-data"].as_str()?)
            .ok()?;
        let token = config["users"][0]["user"]["token"].as_str()?;
        let authority = server.authority()?.as_str();
        let addr = std::net::ToSocketAddrs::to_socket_addrs(authority)
            .ok()?
            .next()?;
        let https = crate::Https::with_ca(std::str::from_utf8(&ca).ok()?, addr);
        let url = format!(
            "{}/api/v1/namespaces/kubesphere-system/services/:ks-apiserver:80/proxy/{path}",
            server.path().trim_end_matches('/')
        );
        let reply = https.try_request("GET", &url, Some(token), &[]).ok()?;
        (reply.status == 200)
            .then(|| serde_json::from_str(&reply.body).ok())
            .flatten()
    }

    /// `setClusterNameInConfigMap`: the member's `kubesphere-config` names the cluster.
    fn set_cluster_name_in_config_map(&self, name: &str) {
        let mut cm = kubesphere_config(&self.kubeconfig);
        let mut config: serde_yaml::Value =
            serde_yaml::from_str(cm["data"]["kubesphere.yaml"].as_str().unwrap_or_default())
                .expect("kubesphere.yaml");
        if config["multicluster"]["clusterName"].as_str() == Some(name) {
            return;
        }
        if !config["multicluster"].is_mapping() {
            config["multicluster"] = serde_yaml::Value::Mapping(serde_yaml::Mapping::new());
        }
        config["multicluster"]["clusterName"] = name.into();
        cm["data"]["kubesphere.yaml"] = serde_yaml::to_string(&config)
            .expect("kubesphere.yaml")
            .into();
        // An `Update`: the object as read, resourceVersion and all.
        crate::kubectl_with_input(
            &self.kubeconfig,
            &["replace", "-f", "-"],
            cm.to_string().as_bytes(),
        )
        .success();
    }
}

/// The member's `kubesphere-system/kubesphere-config` ConfigMap, read with `kubeconfig`.
pub fn kubesphere_config(kubeconfig: &Path) -> serde_json::Value {
    let read = kubectl(
        kubeconfig,
        &[
            "get",
            "configmap",
            "kubesphere-config",
            "-n",
            "kubesphere-system",
            "-o",
            "json",
        ],
    );
    serde_json::from_str(&read.success()).expect("ConfigMap JSON")
}

/// What [`ClusterControllerClient::sync`] read from the member.
#[derive(Debug)]
pub struct Synced {
    /// `status.kubernetesVersion`.
    pub kubernetes_version: String,
    /// `status.nodeCount`.
    pub node_count: usize,
    /// `status.uid`: the member's kube-system namespace's UID.
    pub uid: String,
    /// `status.configz`, when the member's ks-apiserver answered.
    pub configz: Option<serde_json::Map<String, serde_json::Value>>,
    /// `status.kubeSphereVersion`, when the member's ks-apiserver answered.
    pub kubesphere_version: Option<String>,
}

/// A range of `n` ports free on 127.0.0.1 and 127.0.0.2 when looked at (the kubesphere
/// endpoints take fixed ports by design: every replica listens on the same one).
pub fn free_port_range(n: u16) -> std::ops::RangeInclusive<u16> {
    use rand::Rng;
    // Below the kernel's ephemeral ports, as Tower's default range (16000-16999) is: an
    // outgoing connection's local port in the range (the replicas' own watches, kubectl,
    // the tests beside this one) makes a listener's bind there fail while it lasts, and
    // a range drawn up to 60000 met one (a port never listened on in 20 s).
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut rng = rand::rng();
    for _ in 0..200 {
        let first: u16 = rng.random_range(10000..ephemeral.saturating_sub(n).max(10001));
        let last = first + n - 1;
        let free = (first..=last).all(|p| {
            ["127.0.0.1", "127.0.0.2"]
                .iter()
                .all(|ip| std::net::TcpListener::bind((*ip, p)).is_ok())
        });
        if free {
            return first..=last;
        }
    }
    panic!("no {n} free ports in a row on 127.0.0.1 and 127.0.0.2");
}

/// Whether something listens on `addr`.
pub fn listening(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)).is_ok()
}

/// Writes `yaml` to a file in `dir` (for `kubectl create -f`).
pub fn write(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("write");
    path
}
