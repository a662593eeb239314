//! Tower as KubeSphere's tower (issue 17): what it writes into a proxy Cluster is enough
//! for KubeSphere's own host components to reach the member, proven with stand-ins that
//! behave as those components do (see `tower_e2e::kubesphere` for what was modelled from
//! KubeSphere's source), on KubeSphere's Cluster CRD (no status subresource).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tower_e2e::kubesphere::{
    CLUSTER_FINALIZER, CONFIGZ, ClusterControllerClient, KsApiServer, Seen, create_namespace,
    delete_held, dispatch, dispatch_tls, dispatch_websocket, free_port_range,
    install_member_kubesphere, kubesphere_config, listening, set_cluster_finalizers,
};
use tower_e2e::{
    Member, Server, admin_get, admin_get_as, agent, free_port, kubectl, kubectl_with_input, server,
    wait_for, wait_for_with,
};

/// A host API server as KubeSphere's: its Cluster CRD has no status subresource, and
/// tower's namespace exists.
fn kubesphere_host() -> Member {
    let host = Member::start();
    host.api.set_cluster_status_subresource(false);
    create_namespace(&host.kubeconfig, "ke-system");
    host
}

/// A replica with the kubesphere endpoints on `ports`, listening on `bind` (replicas on
/// one machine take one loopback address each: the port is the same on every replica),
/// written as http://127.0.0.1:PORT (with --kubesphere-tls in `extra`, as the default
/// https://mc-NAME.ke-system.svc:PORT instead).
fn replica(host: &Member, ports: &str, bind: &str, id: &str, extra: &[&str]) -> Server {
    let frontend: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let frontend_url = format!("https://127.0.0.1:{}", frontend.port());
    let mut args = vec![
        "--kubernetes",
        "--kubeconfig",
        host.kubeconfig.to_str().unwrap(),
        "--server-id",
        id,
        "--server-count",
        "1",
        "--kubesphere-ports",
        ports,
        "--kubesphere-bind-address",
        bind,
    ];
    if !extra.contains(&"--kubesphere-tls") {
        args.extend(["--kubesphere-endpoint-host", "127.0.0.1"]);
    }
    args.extend_from_slice(extra);
    // Replicas share one --frontend-url (the tower-proxy Service): with two, each would
    // write its own into the Clusters, in turn.
    if !extra.contains(&"--frontend-url") {
        args.extend(["--frontend-url", &frontend_url]);
    }
    let server = server().args(&args).frontend_addr(frontend).start();
    wait_for(
        "the first list of Clusters",
        Duration::from_secs(20),
        || (admin_get(server.admin, "/readyz").0 == 200).then_some(()),
    );
    server
}

fn range_flag(range: &std::ops::RangeInclusive<u16>) -> String {
    format!("{}-{}", range.start(), range.end())
}

fn cluster(host: &Member, name: &str) -> Option<Value> {
    let out = kubectl(&host.kubeconfig, &["get", "cluster", name, "-o", "json"]);
    (out.code() == Some(0)).then(|| serde_json::from_str(&out.success()).unwrap())
}

fn get_json(host: &Member, args: &[&str]) -> Option<Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let out = kubectl(&host.kubeconfig, &all);
    (out.code() == Some(0)).then(|| serde_json::from_str(&out.success()).unwrap())
}

fn connection<'a>(cluster: &'a Value, field: &str) -> &'a Value {
    &cluster["spec"]["connection"][field]
}

fn proxy_clusters(names: &[String]) -> String {
    names
        .iter()
        .map(|name| {
            format!(
                "apiVersion: cluster.kubesphere.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: {name}\nspec:\n  joinFederation: true\n  enable: true\n  connection:\n    type: proxy\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Creates proxy Cluster `name` on `host`, as an operator importing a member does.
fn create_proxy_cluster(host: &Member, name: &str) {
    kubectl_with_input(
        &host.kubeconfig,
        &["create", "-f", "-"],
        proxy_clusters(&[name.into()]).as_bytes(),
    )
    .success();
}

/// Waits until Cluster `name` has everything tower writes.
fn wait_connection(host: &Member, server: &Server, name: &str) -> Value {
    wait_for_with(
        &format!("Cluster {name}'s connection"),
        Duration::from_secs(30),
        || {
            cluster(host, name).filter(|c| {
                ["token", "kubeconfig", "kubesphereAPIEndpoint"]
                    .iter()
                    .all(|f| connection(c, f).as_str().is_some_and(|s| !s.is_empty()))
                    && connection(c, "kubesphereAPIServerPort").is_u64()
            })
        },
        || server.process.log(),
    )
}

fn port_of(cluster: &Value) -> u16 {
    u16::try_from(
        connection(cluster, "kubesphereAPIServerPort")
            .as_u64()
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn kubesphere_host_components_reach_the_member_through_what_tower_writes() {
    let host = kubesphere_host();
    let member = Member::start();
    let ks = KsApiServer::start();
    let ports = free_port_range(4);
    let mut tower = replica(&host, &range_flag(&ports), "127.0.0.1", "tower-a", &[]);
    create_proxy_cluster(&host, "member-1");
    let written = wait_connection(&host, &tower, "member-1");
    let port = port_of(&written);
    assert!(ports.contains(&port), "{port} in {ports:?}");
    assert_eq!(
        connection(&written, "kubesphereAPIEndpoint"),
        &Value::from(format!("http://127.0.0.1:{port}"))
    );

    // The Service of the port, owned by the Cluster.
    let service = get_json(&host, &["service", "-n", "ke-system", "mc-member-1"])
        .expect("Service mc-member-1");
    assert_eq!(service["spec"]["ports"][0]["port"], port);
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port);
    assert_eq!(
        service["spec"]["selector"]["app.kubernetes.io/name"], "tower",
        "{service}"
    );
    let owner = &service["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "Cluster");
    assert_eq!(owner["uid"], written["metadata"]["uid"]);

    // The agent, with the Cluster's token and a kubesphere target.
    let token = connection(&written, "token").as_str().unwrap().to_owned();
    let ks_target = ks.addr.to_string();
    let _agent = agent(&tower, &member, "member-1")
        .token(&token)
        .args(&["--kubesphere-service", &ks_target])
        .connect(&tower);

    // KubeSphere's cluster controller: a client from the kubeconfig alone.
    install_member_kubesphere(&member.kubeconfig, &ks);
    let controller = ClusterControllerClient::from_cluster(&written);
    let synced = controller.sync("member-1");
    assert!(
        synced.kubernetes_version.starts_with('v'),
        "{}",
        synced.kubernetes_version
    );
    assert_eq!(synced.node_count, 1);
    // The member's ks-apiserver, read through the member's apiserver's service proxy.
    let configz: Value = serde_json::from_str(CONFIGZ).unwrap();
    assert_eq!(
        synced.configz.map(Value::Object),
        Some(configz),
        "{:?}",
        ks.seen()
    );
    assert_eq!(synced.kubesphere_version.as_deref(), Some("v3.4.1"));
    let proxied: Vec<Seen> = ks.seen();
    assert_eq!(
        proxied
            .iter()
            .map(|s| (s.path.as_str(), s.authorization.as_str()))
            .collect::<Vec<_>>(),
        [
            ("/kapis/config.kubesphere.io/v1alpha2/configs/configz", ""),
            ("/kapis/version", "")
        ],
        "the apiserver keeps the caller's credentials to itself"
    );
    // The member now knows its name.
    let config = kubesphere_config(&member.kubeconfig)["data"]["kubesphere.yaml"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(config.contains("clusterName: member-1"), "{config}");
    assert!(config.contains("clusterRole: member"), "{config}");
    let kube_system = kubectl(
        &member.kubeconfig,
        &[
            "get",
            "namespace",
            "kube-system",
            "-o",
            "jsonpath={.metadata.uid}",
        ],
    )
    .success();
    assert_eq!(
        synced.uid,
        kube_system.trim(),
        "the member's kube-system, not the host's"
    );
    // What the join created is on the member.
    kubectl(
        &member.kubeconfig,
        &[
            "get",
            "serviceaccount",
            "-n",
            "kube-federation-system",
            "member-1-kubesphere",
        ],
    )
    .success();
    kubectl(
        &member.kubeconfig,
        &[
            "get",
            "clusterrole",
            "kubefed-controller-manager:member-1-kubesphere",
        ],
    )
    .success();

    // KubeSphere's dispatcher: scheme and host:port of kubesphereAPIEndpoint only, the
    // caller's Host and JWT unchanged.
    let endpoint = connection(&written, "kubesphereAPIEndpoint")
        .as_str()
        .unwrap()
        .to_owned();
    let jwt =
        Server::minter().user_token("alice", &["devs".into()], Some(Duration::from_secs(600)));
    let host_header = "ks-console.example.com:30880";
    let got = dispatch(
        &endpoint,
        "GET",
        "/kapis/resources.kubesphere.io/v1alpha3/namespaces?limit=1&sortBy=name",
        host_header,
        &jwt,
        b"",
    );
    assert_eq!(got.status, 200, "{}", got.body);
    let posted = dispatch(
        &endpoint,
        "POST",
        "/kapis/iam.kubesphere.io/v1alpha2/workspaces",
        host_header,
        &jwt,
        &[b'x'; 100_000],
    );
    assert_eq!(posted.status, 200, "{}", posted.body);
    assert!(
        posted.body.contains("\"bodyBytes\":100000"),
        "{}",
        posted.body
    );
    let echoed = dispatch_websocket(
        &endpoint,
        "/api/v1/namespaces/default/pods/web-0/exec?command=sh&stdin=true&stdout=true&tty=true",
        host_header,
        &jwt,
        &[b"\x00ls\n", b"\x00exit\n"],
    )
    .expect("exec over WebSocket");
    assert_eq!(echoed, vec![b"\x00ls\n".to_vec(), b"\x00exit\n".to_vec()]);
    let seen = ks.seen().split_off(proxied.len());
    assert_eq!(seen.len(), 3, "{seen:?}");
    let (get, post, ws) = (&seen[0], &seen[1], &seen[2]);
    assert_eq!(
        (get.method.as_str(), get.path.as_str()),
        (
            "GET",
            "/kapis/resources.kubesphere.io/v1alpha3/namespaces?limit=1&sortBy=name"
        )
    );
    assert_eq!((post.method.as_str(), post.body_len), ("POST", 100_000));
    assert!(
        ws.path
            .starts_with("/api/v1/namespaces/default/pods/web-0/exec?command=sh"),
        "{ws:?}"
    );
    // The caller's Host (the host's ks-apiserver's, kept by the dispatcher) decided
    // nothing: the port did. What Host the member sees is the agent's upstream's.
    for s in &seen {
        assert_eq!(
            s.authorization,
            format!("Bearer {jwt}"),
            "the caller's JWT, unchanged"
        );
        assert!(
            s.identity_headers.is_empty(),
            "no impersonation toward ks-apiserver: {s:?}"
        );
    }
    // A caller without a valid JWT does not get through.
    let refused = dispatch(&endpoint, "GET", "/kapis/x", host_header, "not-a-jwt", b"");
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert_eq!(ks.seen().len(), proxied.len() + 3);

    // A restart leaves the kubeconfig, token, port and endpoint as they were.
    let before = cluster(&host, "member-1").unwrap();
    tower.restart();
    wait_for(
        "the restarted replica to listen again",
        Duration::from_secs(20),
        || listening(format!("127.0.0.1:{port}").parse().unwrap()).then_some(()),
    );
    wait_for("the agent to be back", Duration::from_secs(20), || {
        tower.connected("member-1").then_some(())
    });
    let after = cluster(&host, "member-1").unwrap();
    assert_eq!(before["spec"], after["spec"], "a restart rewrites nothing");
    let again = dispatch(&endpoint, "GET", "/kapis/again", host_header, &jwt, b"");
    assert_eq!(again.status, 200, "{}", again.body);

    // KubeSphere's cluster controller holds a deleted Cluster with its finalizer while it
    // cleans up on the member (`syncCluster`): a replica that restarts meanwhile serves
    // the port the Cluster records again, though it writes nothing into it.
    set_cluster_finalizers(&host.kubeconfig, "member-1", &[CLUSTER_FINALIZER]);
    delete_held(&host.kubeconfig, "member-1");
    tower.restart();
    wait_for_with(
        "the restarted replica to serve the terminating Cluster's port",
        Duration::from_secs(20),
        || listening(format!("127.0.0.1:{port}").parse().unwrap()).then_some(()),
        || tower.process.log(),
    );
    wait_for("the agent to be back", Duration::from_secs(20), || {
        tower.connected("member-1").then_some(())
    });
    let cleanup = dispatch(&endpoint, "GET", "/kapis/cleanup", host_header, &jwt, b"");
    assert_eq!(cleanup.status, 200, "{}", cleanup.body);

    // The controller is done and removes its finalizer: the Cluster goes, and with it its
    // port and Service, and the listener closes.
    set_cluster_finalizers(&host.kubeconfig, "member-1", &[]);
    wait_for_with(
        "the port, the Service and the listener to go",
        Duration::from_secs(20),
        || {
            let table = get_json(
                &host,
                &["configmap", "-n", "ke-system", "tower-kubesphere-ports"],
            )
            .unwrap();
            let freed = table["data"].as_object().is_none_or(|d| d.is_empty());
            let service_gone =
                get_json(&host, &["service", "-n", "ke-system", "mc-member-1"]).is_none();
            let closed = !listening(format!("127.0.0.1:{port}").parse().unwrap());
            (freed && service_gone && closed).then_some(())
        },
        || tower.process.log(),
    );

    // Deleted while no replica runs: the garbage collector takes the Service (the Cluster
    // owns it), and the first replica to start frees the port.
    create_proxy_cluster(&host, "member-2");
    let second = wait_connection(&host, &tower, "member-2");
    wait_for("Service mc-member-2", Duration::from_secs(20), || {
        get_json(&host, &["service", "-n", "ke-system", "mc-member-2"])
    });
    tower.process.kill();
    kubectl(&host.kubeconfig, &["delete", "cluster", "member-2"]).success();
    assert!(
        get_json(&host, &["service", "-n", "ke-system", "mc-member-2"]).is_none(),
        "collected with its owner"
    );
    let table = get_json(
        &host,
        &["configmap", "-n", "ke-system", "tower-kubesphere-ports"],
    )
    .unwrap();
    assert_eq!(
        table["data"][port_of(&second).to_string()],
        "member-2",
        "still claimed while no replica runs"
    );
    tower.restart();
    wait_for_with(
        "the port of the Cluster deleted meanwhile to be freed",
        Duration::from_secs(20),
        || {
            let table = get_json(
                &host,
                &["configmap", "-n", "ke-system", "tower-kubesphere-ports"],
            )
            .unwrap();
            table["data"]
                .as_object()
                .is_none_or(|d| d.is_empty())
                .then_some(())
        },
        || tower.process.log(),
    );
}

/// `--kubesphere-tls`: the endpoint is https on the cluster's Service name, and a caller
/// that trusts the Tower CA and checks that name (as Go's transport does) reaches the
/// member's ks-apiserver; plain HTTP on the port gets nothing through.
/// A Cluster's name is a DNS subdomain, up to 253 characters; a Service's name and a
/// label's value hold at most 63. A real API server refuses the Service of a longer name
/// otherwise.
#[test]
fn a_cluster_with_a_long_name_gets_its_port_and_service() {
    let host = kubesphere_host();
    let ports = free_port_range(2);
    let tower = replica(&host, &range_flag(&ports), "127.0.0.1", "tower-a", &[]);
    let long = format!(
        "eu-central-1.production.{}.member-{}",
        "region-".repeat(8) + "a",
        "b".repeat(30)
    );
    assert!(long.len() > 100, "{}", long.len());
    create_proxy_cluster(&host, &long);
    let written = wait_connection(&host, &tower, &long);
    let name = tower_server::ks_ports::service_name(&long);
    let service = wait_for_with(
        &format!("Service {name}"),
        Duration::from_secs(20),
        || get_json(&host, &["service", "-n", "ke-system", &name]),
        || tower.process.log(),
    );
    assert_eq!(service["spec"]["ports"][0]["port"], port_of(&written));
    assert_eq!(
        service["metadata"]["ownerReferences"][0]["name"],
        long.as_str()
    );
    let label = service["metadata"]["labels"]["tower.kubesphere.io/cluster"]
        .as_str()
        .unwrap();
    assert!(
        label.len() <= 63 && long.starts_with(&label[..40]),
        "{label}"
    );
    assert!(
        !tower.process.log().contains("is invalid"),
        "{}",
        tower.process.log()
    );
}

#[test]
fn with_kubesphere_tls_the_endpoint_is_https_under_the_tower_ca() {
    let host = kubesphere_host();
    let member = Member::start();
    let ks = KsApiServer::start();
    let ports = free_port_range(2);
    let tower = replica(
        &host,
        &range_flag(&ports),
        "127.0.0.1",
        "tower-a",
        &["--kubesphere-tls"],
    );
    create_proxy_cluster(&host, "member-1");
    let written = wait_connection(&host, &tower, "member-1");
    let port = port_of(&written);
    let endpoint = connection(&written, "kubesphereAPIEndpoint")
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        endpoint,
        format!("https://mc-member-1.ke-system.svc:{port}")
    );
    let token = connection(&written, "token").as_str().unwrap().to_owned();
    let _agent = agent(&tower, &member, "member-1")
        .token(&token)
        .args(&["--kubesphere-service", &ks.addr.to_string()])
        .connect(&tower);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let jwt = Server::minter().user_token("alice", &[], Some(Duration::from_secs(600)));

    let got = dispatch_tls(&endpoint, &tower.ca_pem, addr, "GET", "/kapis/x?y=1", &jwt)
        .unwrap_or_else(|e| panic!("{e}\n{}", tower.process.log()));
    assert_eq!(got.status, 200, "{}", got.body);
    let seen = ks.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/kapis/x?y=1");
    assert_eq!(seen[0].authorization, format!("Bearer {jwt}"));

    // The certificate covers tower's namespace's Services only: the same port under a
    // name in another namespace fails the caller's check.
    let elsewhere = format!("https://mc-member-1.default.svc:{port}");
    let refused = dispatch_tls(&elsewhere, &tower.ca_pem, addr, "GET", "/kapis/x", &jwt)
        .expect_err("a name the certificate does not cover");
    assert!(refused.contains("certificate"), "{refused}");

    // Plain HTTP on a TLS port: a TLS alert at most, never an HTTP answer or a request
    // reaching the member.
    let mut plain = std::net::TcpStream::connect(addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::io::Write::write_all(
        &mut plain,
        format!("GET /kapis/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {jwt}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(ks.seen().len(), 1, "nothing more reached the member");
}

#[test]
fn two_replicas_allocate_ports_for_fifty_clusters_at_once_without_collision() {
    let host = kubesphere_host();
    let ports = free_port_range(60);
    let range = range_flag(&ports);
    // One frontend URL and one CA, as replicas have from one Deployment and Secret.
    let pki = tower_e2e::OperatorPki::new();
    let mut shared = vec!["--frontend-url", "https://tower-proxy.ke-system.svc:9443"];
    shared.extend(pki.flags());
    let a = replica(&host, &range, "127.0.0.1", "tower-a", &shared);
    let b = replica(&host, &range, "127.0.0.2", "tower-b", &shared);
    let names: Vec<String> = (0..50).map(|i| format!("member-{i:02}")).collect();
    let started = Instant::now();
    kubectl_with_input(
        &host.kubeconfig,
        &["create", "-f", "-"],
        proxy_clusters(&names).as_bytes(),
    )
    .success();
    let created = started.elapsed();
    let table_full = |n: usize| {
        get_json(
            &host,
            &["configmap", "-n", "ke-system", "tower-kubesphere-ports"],
        )
        .filter(|t| t["data"].as_object().is_some_and(|d| d.len() == n))
    };
    wait_for_with(
        "50 ports claimed",
        Duration::from_secs(60),
        || table_full(50),
        || format!("{}\n{}", a.process.log(), b.process.log()),
    );
    let claimed = started.elapsed();
    let all = wait_for_with(
        "50 Clusters with their connection written",
        Duration::from_secs(60),
        || {
            let list = get_json(&host, &["clusters"])?;
            let items = list["items"].as_array()?.clone();
            let done = items.iter().all(|c| {
                connection(c, "kubesphereAPIServerPort").is_u64()
                    && connection(c, "kubeconfig").is_string()
                    && connection(c, "kubesphereAPIEndpoint").is_string()
            });
            (items.len() == 50 && done).then_some(items)
        },
        || format!("{}\n{}", a.process.log(), b.process.log()),
    );
    let recorded_at = started.elapsed();
    println!(
        "50 Clusters, 2 replicas: kubectl create took {created:?}; all ports claimed at {claimed:?}; all recorded in the Clusters at {recorded_at:?}"
    );
    let mut by_port: BTreeMap<u16, String> = BTreeMap::new();
    for c in &all {
        let name = c["metadata"]["name"].as_str().unwrap().to_owned();
        let port = port_of(c);
        assert!(ports.contains(&port), "{name}: {port} out of {ports:?}");
        assert_eq!(
            connection(c, "kubesphereAPIEndpoint"),
            &Value::from(format!("http://127.0.0.1:{port}"))
        );
        if let Some(other) = by_port.insert(port, name.clone()) {
            panic!("{name} and {other} share port {port}");
        }
    }
    // The table, the Services and both replicas' listeners agree with the Clusters.
    let table = get_json(
        &host,
        &["configmap", "-n", "ke-system", "tower-kubesphere-ports"],
    )
    .unwrap();
    let recorded: BTreeMap<u16, String> = table["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(p, c)| (p.parse().unwrap(), c.as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(recorded, by_port);
    let services = get_json(&host, &["services", "-n", "ke-system"]).unwrap();
    let service_ports: BTreeMap<u16, String> = services["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| {
            let cluster = s["metadata"]["labels"]["tower.kubesphere.io/cluster"].as_str()?;
            Some((
                u16::try_from(s["spec"]["ports"][0]["port"].as_u64()?).ok()?,
                cluster.to_owned(),
            ))
        })
        .collect();
    assert_eq!(service_ports, by_port);
    // Each port on each replica leads to its own cluster (no agent: the answer names it).
    let jwt = Server::minter().user_token("alice", &[], Some(Duration::from_secs(600)));
    for (port, name) in by_port.iter().step_by(7) {
        for ip in ["127.0.0.1", "127.0.0.2"] {
            let endpoint = format!("http://{ip}:{port}");
            let got = wait_for(
                &format!("{endpoint} to listen"),
                Duration::from_secs(20),
                || {
                    listening(format!("{ip}:{port}").parse().unwrap())
                        .then(|| dispatch(&endpoint, "GET", "/kapis/x", "ks", &jwt, b""))
                },
            );
            assert_eq!(got.status, 503, "{}", got.body);
            assert!(
                got.body.contains(&format!("\\\"{name}\\\""))
                    || got.body.contains(&format!("\"{name}\"")),
                "{endpoint}: {}",
                got.body
            );
        }
    }

    println!("routing checked at {:?}", started.elapsed());
    // Deleting ten frees their ports and Services on both replicas; ten new ones get
    // ports without colliding with the forty left.
    let deleted: Vec<String> = names.iter().take(10).cloned().collect();
    let mut args = vec!["delete", "cluster"];
    args.extend(deleted.iter().map(String::as_str));
    kubectl(&host.kubeconfig, &args).success();
    let freed: HashSet<u16> = by_port
        .iter()
        .filter(|(_, n)| deleted.contains(n))
        .map(|(p, _)| *p)
        .collect();
    wait_for_with(
        "the deleted Clusters' ports, Services and listeners to go",
        Duration::from_secs(30),
        || {
            let table = get_json(
                &host,
                &["configmap", "-n", "ke-system", "tower-kubesphere-ports"],
            )
            .unwrap();
            let data = table["data"].as_object().cloned().unwrap_or_default();
            let ports_freed = freed.iter().all(|p| !data.contains_key(&p.to_string()));
            let services_gone = deleted.iter().all(|n| {
                get_json(&host, &["service", "-n", "ke-system", &format!("mc-{n}")]).is_none()
            });
            let closed = freed.iter().all(|p| {
                !listening(format!("127.0.0.1:{p}").parse().unwrap())
                    && !listening(format!("127.0.0.2:{p}").parse().unwrap())
            });
            (ports_freed && services_gone && closed && data.len() == 40).then_some(())
        },
        || format!("{}\n{}", a.process.log(), b.process.log()),
    );
    println!("ten deleted and freed at {:?}", started.elapsed());
    let fresh: Vec<String> = (50..60).map(|i| format!("member-{i:02}")).collect();
    kubectl_with_input(
        &host.kubeconfig,
        &["create", "-f", "-"],
        proxy_clusters(&fresh).as_bytes(),
    )
    .success();
    let mut now: BTreeMap<u16, String> = by_port
        .into_iter()
        .filter(|(_, n)| !deleted.contains(n))
        .collect();
    for name in &fresh {
        let port = port_of(&wait_connection(&host, &b, name));
        if let Some(other) = now.insert(port, name.clone()) {
            panic!("{name} and {other} share port {port}");
        }
    }
    assert_eq!(now.len(), 50);
    // The table lost (deleted by hand): both replicas claim again, each cluster its own
    // recorded port, and no port changes hands.
    kubectl(
        &host.kubeconfig,
        &[
            "delete",
            "configmap",
            "-n",
            "ke-system",
            "tower-kubesphere-ports",
        ],
    )
    .success();
    wait_for_with(
        "the table rebuilt as it was",
        Duration::from_secs(30),
        || {
            let table = table_full(50)?;
            let rebuilt: BTreeMap<u16, String> = table["data"]
                .as_object()?
                .iter()
                .map(|(p, c)| (p.parse().unwrap(), c.as_str().unwrap().to_owned()))
                .collect();
            (rebuilt == now).then_some(())
        },
        || format!("{}\n{}", a.process.log(), b.process.log()),
    );
    // Written once, by one replica, and left alone by both since: each re-judges a Cluster
    // on every event of it (the other's write, both replicas' condition writes), so a
    // replica that disagreed would have written again. (Not told by the generation: with
    // KubeSphere's CRD, which has no status subresource, the condition writes count too.)
    let survivors = get_json(&host, &["clusters"]).unwrap();
    let logs = format!("{}\n{}", a.process.log(), b.process.log());
    for c in survivors["items"].as_array().unwrap() {
        let name = c["metadata"]["name"].as_str().unwrap();
        if fresh.iter().any(|f| f == name) {
            continue;
        }
        let writes = logs
            .matches(&format!(
                "wrote the Cluster's connection cluster={name} fields="
            ))
            .count();
        assert_eq!(
            writes, 1,
            "{name}'s spec was written {writes} times:\n{logs}"
        );
    }
}

#[test]
fn a_cluster_imported_under_the_old_tower_is_taken_over() {
    let host = kubesphere_host();
    let ports = free_port_range(6);
    let old_port = ports.start() + 2;
    // Two Clusters as the old tower left them: a hex token, a client-certificate
    // kubeconfig, a kube port, and the same kubesphere port (its collision check never
    // caught one), and the old `mc-` Service with both ports as NodePorts.
    let old_kubeconfig = base64_of(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: old\n  cluster:\n    server: https://old-tower:6443\ncontexts:\n- name: old\n  context:\n    cluster: old\n    user: old\ncurrent-context: old\nusers:\n- name: old\n  user:\n    client-certificate-data: AAAA\n    client-key-data: AAAA\n",
    );
    let old = |name: &str| {
        format!(
            "apiVersion: cluster.kubesphere.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: {name}\nspec:\n  joinFederation: true\n  connection:\n    type: proxy\n    token: 7a0c8e5f3b2d41e6a9c8b7d6e5f4a3b2\n    kubernetesAPIEndpoint: https://mc-{name}.kubesphere-system.svc:6443\n    kubesphereAPIEndpoint: http://mc-{name}.kubesphere-system.svc:80\n    kubernetesAPIServerPort: 6001\n    kubesphereAPIServerPort: {old_port}\n    kubeconfig: {old_kubeconfig}\n"
        )
    };
    let service = "apiVersion: v1\nkind: Service\nmetadata:\n  name: mc-old-1\n  namespace: ke-system\nspec:\n  type: NodePort\n  selector:\n    app: tower\n  ports:\n  - name: kubernetes\n    port: 6443\n    targetPort: 6001\n  - name: kubesphere\n    port: 80\n    targetPort: 16001\n";
    // And where the old tower ran, when that is not tower's namespace now.
    create_namespace(&host.kubeconfig, "kubesphere-system");
    let elsewhere = service
        .replace("mc-old-1", "mc-old-2")
        .replace("namespace: ke-system", "namespace: kubesphere-system");
    let all = format!(
        "{}---\n{}---\n{service}---\n{elsewhere}",
        old("old-1"),
        old("old-2")
    );
    kubectl_with_input(&host.kubeconfig, &["create", "-f", "-"], all.as_bytes()).success();

    let tower = replica(
        &host,
        &range_flag(&ports),
        "127.0.0.1",
        "tower-a",
        &["--platform-namespace", "kubesphere-system"],
    );
    let c1 = wait_for_with(
        "old-1 taken over",
        Duration::from_secs(30),
        || {
            cluster(&host, "old-1").filter(|c| {
                connection(c, "token")
                    .as_str()
                    .is_some_and(|t| t.starts_with("ey"))
                    && connection(c, "kubesphereAPIEndpoint")
                        .as_str()
                        .is_some_and(|e| e.starts_with("http://127.0.0.1:"))
            })
        },
        || tower.process.log(),
    );
    let c2 = wait_for("old-2 taken over", Duration::from_secs(30), || {
        cluster(&host, "old-2").filter(|c| {
            connection(c, "kubesphereAPIEndpoint")
                .as_str()
                .is_some_and(|e| e.starts_with("http://127.0.0.1:"))
        })
    });
    let (p1, p2) = (port_of(&c1), port_of(&c2));
    assert_ne!(p1, p2, "the old tower's shared port is shared no more");
    assert!(
        p1 == old_port || p2 == old_port,
        "one keeps its port: {p1} {p2} {old_port}"
    );
    for c in [&c1, &c2] {
        assert!(
            connection(c, "kubernetesAPIServerPort").is_null(),
            "the dead kube port is gone: {c}"
        );
        assert!(
            connection(c, "token").as_str().unwrap().split('.').count() == 3,
            "a JWT"
        );
        assert!(
            connection(c, "kubernetesAPIEndpoint")
                .as_str()
                .unwrap()
                .ends_with(&format!(
                    "/clusters/{}",
                    c["metadata"]["name"].as_str().unwrap()
                )),
            "{c}"
        );
        // A kubeconfig with Tower's CA and a token, no client certificate.
        let controller = ClusterControllerClient::from_cluster(c);
        let yaml = std::fs::read_to_string(&controller.kubeconfig).unwrap();
        assert!(
            yaml.contains("token:") && !yaml.contains("client-certificate"),
            "{yaml}"
        );
        assert!(yaml.contains("certificate-authority-data"), "{yaml}");
    }
    // The old Service is reused: one port, the cluster's, owned by its Cluster.
    let reused = wait_for("mc-old-1 replaced", Duration::from_secs(20), || {
        get_json(&host, &["service", "-n", "ke-system", "mc-old-1"])
            .filter(|s| s["metadata"]["ownerReferences"][0]["uid"] == c1["metadata"]["uid"])
    });
    let svc_ports = reused["spec"]["ports"].as_array().unwrap();
    assert_eq!(svc_ports.len(), 1, "{reused}");
    assert_eq!(svc_ports[0]["port"], p1);
    assert_eq!(svc_ports[0]["targetPort"], p1);
    assert_eq!(reused["spec"]["type"], "ClusterIP");
    assert!(
        svc_ports[0].get("nodePort").is_none_or(Value::is_null),
        "{reused}"
    );
    // The old tower's Service where it ran is gone; tower's own for old-2 is in ke-system.
    wait_for("the old mc-old-2 to go", Duration::from_secs(20), || {
        get_json(&host, &["service", "-n", "kubesphere-system", "mc-old-2"])
            .is_none()
            .then_some(())
    });
    wait_for("tower's mc-old-2", Duration::from_secs(20), || {
        get_json(&host, &["service", "-n", "ke-system", "mc-old-2"])
            .filter(|s| s["spec"]["ports"][0]["port"] == p2)
    });
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[test]
fn the_publish_address_follows_the_platform_config_and_the_flag_wins() {
    let host = kubesphere_host();
    let platform_config = |address: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kubesphere-config\n  namespace: kubesphere-system\ndata:\n  kubesphere.yaml: |\n    authentication:\n      jwtSecret: x\n    multicluster:\n      clusterRole: host\n      proxyPublishAddress: {address}\n"
        )
    };
    create_namespace(&host.kubeconfig, "kubesphere-system");
    kubectl_with_input(
        &host.kubeconfig,
        &["create", "-f", "-"],
        platform_config("http://139.198.120.120:8080").as_bytes(),
    )
    .success();
    let names = [
        "--platform-namespace",
        "kubesphere-system",
        "--platform-config",
        "kubesphere-config",
        "--platform-apiserver",
        "ks-apiserver",
    ];
    let tower = replica(&host, "off", "127.0.0.1", "tower-a", &names);
    create_proxy_cluster(&host, "member-1");
    let admin = Server::minter().user_token(
        "admin",
        &["system:masters".into()],
        Some(Duration::from_secs(600)),
    );
    let manifest = |server: &Server| {
        let (code, body) = admin_get_as(
            server.admin,
            "/v1/clusters/member-1/agent.yaml",
            Some(&admin),
        );
        (code == 200).then_some(body)
    };
    let first = wait_for_with(
        "agent.yaml with the platform's address",
        Duration::from_secs(20),
        || manifest(&tower).filter(|m| m.contains("https://139.198.120.120:8080")),
        || tower.process.log(),
    );
    assert!(!first.contains("203.0.113.9"));
    // The platform's setting changes: agent.yaml follows, no restart.
    kubectl_with_input(
        &host.kubeconfig,
        &["apply", "-f", "-"],
        platform_config("https://203.0.113.9:8080").as_bytes(),
    )
    .success();
    wait_for_with(
        "agent.yaml with the new address",
        Duration::from_secs(20),
        || manifest(&tower).filter(|m| m.contains("https://203.0.113.9:8080")),
        || tower.process.log(),
    );
    // `agent-manifest --kubernetes` reads it too.
    let cli = std::process::Command::new(tower_e2e::bin_path("tower-server"))
        .args([
            "agent-manifest",
            "--kubernetes",
            "--cluster",
            "member-1",
            "--kubeconfig",
        ])
        .arg(&host.kubeconfig)
        .arg("--jwt-secret-file")
        .arg(&tower.secret_file)
        .arg("--state-dir")
        .arg(&tower.state)
        .args(names)
        .env_remove("TOWER_PROXY_PUBLISH_ADDRESS")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&cli.stdout);
    assert!(
        cli.status.success() && printed.contains("https://203.0.113.9:8080"),
        "{}{printed}",
        String::from_utf8_lossy(&cli.stderr)
    );
    // Tower's own setting wins.
    let mut with_flag = names.to_vec();
    with_flag.extend(["--proxy-publish-address", "https://tower.example.com:8080"]);
    let flagged = replica(&host, "off", "127.0.0.1", "tower-b", &with_flag);
    let m = wait_for("agent.yaml", Duration::from_secs(20), || manifest(&flagged));
    assert!(m.contains("https://tower.example.com:8080"), "{m}");
    assert!(!m.contains("203.0.113.9"), "{m}");
}

/// The claims of the token in a Cluster's kubeconfig.
fn kubeconfig_claims(cluster: &Value) -> (String, Value) {
    use base64::Engine;
    let controller = ClusterControllerClient::from_cluster(cluster);
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&controller.kubeconfig).unwrap()).unwrap();
    let token = yaml["users"][0]["user"]["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let payload = token.split('.').nth(1).unwrap();
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    (token, serde_json::from_slice(&claims).unwrap())
}

#[test]
fn the_kubeconfig_is_renewed_a_third_before_it_expires_with_the_configured_identity() {
    let host = kubesphere_host();
    let tower = replica(
        &host,
        "off",
        "127.0.0.1",
        "tower-a",
        &[
            "--cluster-kubeconfig-ttl",
            "30s",
            "--cluster-kubeconfig-user",
            "ks-controller",
            "--cluster-kubeconfig-group",
            "system:masters,ks-admins",
        ],
    );
    create_proxy_cluster(&host, "member-1");
    let first = wait_for_with(
        "the kubeconfig",
        Duration::from_secs(20),
        || cluster(&host, "member-1").filter(|c| connection(c, "kubeconfig").is_string()),
        || tower.process.log(),
    );
    let (token, claims) = kubeconfig_claims(&first);
    assert_eq!(claims["username"], "ks-controller");
    assert_eq!(
        claims["groups"],
        serde_json::json!(["system:masters", "ks-admins"])
    );
    let exp = claims["exp"].as_u64().unwrap();
    let renewed = wait_for_with(
        "the kubeconfig's renewal",
        Duration::from_secs(40),
        || cluster(&host, "member-1").filter(|c| kubeconfig_claims(c).0 != token),
        || tower.process.log(),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        now < exp,
        "renewed before the old token expired ({now} < {exp})"
    );
    let (_, renewed_claims) = kubeconfig_claims(&renewed);
    assert!(renewed_claims["exp"].as_u64().unwrap() > exp);
    // One spec write per renewal: the first and this one. (Not told by the generation:
    // with KubeSphere's CRD, which has no status subresource, condition writes count too.)
    let log = tower.process.log();
    let writes = log
        .matches("wrote the Cluster's connection cluster=member-1 fields=")
        .count();
    assert_eq!(writes, 2, "one write per renewal:\n{log}");
}
