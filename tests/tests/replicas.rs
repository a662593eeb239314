//! Several tower-server replicas behind one address: the agent holds a tunnel to each,
//! so every replica routes every cluster, and losing one costs nothing but its tunnel.

use std::time::{Duration, Instant};

use tower_e2e::{Https, Member, OperatorPki, Relay, Server, agent, server, wait_for};

/// A replica with the shared operator certificates.
fn replica(pki: &OperatorPki, id: &str, count: &str) -> Server {
    server()
        .args(&["--server-id", id, "--server-count", count])
        .args(&pki.flags())
        .start()
}

#[test]
fn an_agent_holds_one_tunnel_per_replica_and_survives_losing_one() {
    let member = Member::start();
    let pki = OperatorPki::new();
    let mut replicas: Vec<Server> = ["tower-a", "tower-b", "tower-c"]
        .iter()
        .map(|id| replica(&pki, id, "3"))
        .collect();
    let balancer = Relay::balance(&replicas.iter().map(|r| r.tunnel).collect::<Vec<_>>());
    let _agent = agent(&replicas[0], &member, "member-1")
        .proxy_server(balancer.addr)
        .spawn();
    let started = Instant::now();
    wait_for("a tunnel on every replica", Duration::from_secs(20), || {
        replicas
            .iter()
            .all(|r| r.connected("member-1"))
            .then_some(())
    });
    eprintln!("tunnels to all 3 replicas after {:?}", started.elapsed());
    // Every replica knows, from the agent, which replicas serve the cluster.
    let holders = |r: &Server| r.clusters()[0]["replicas"].clone();
    wait_for(
        "every replica to see all holders",
        Duration::from_secs(10),
        || {
            replicas
                .iter()
                .all(|r| holders(r) == serde_json::json!(["tower-a", "tower-b", "tower-c"]))
                .then_some(())
        },
    );

    // Each replica's tunnel is the one it got first: landing on a replica it already holds
    // makes the agent back off (409), never replaces a working tunnel.
    let since = |r: &Server| r.clusters()[0]["connected_since"].clone();
    let first: Vec<_> = replicas.iter().map(since).collect();

    let user = Server::minter().user_token("alice", &[], None);
    for r in &replicas {
        let reply = Https::frontend(r).get(
            "/clusters/member-1/api/v1/namespaces/default/pods",
            Some(&user),
        );
        assert_eq!(reply.status, 200, "{}", reply.body);
        let table = r.clusters();
        assert_eq!(table[0]["connected"], true);
    }

    // Lose one replica: the others keep serving, with no new dial needed.
    let mut lost = replicas.remove(1);
    lost.process.kill();
    balancer.set_targets(&replicas.iter().map(|r| r.tunnel).collect::<Vec<_>>());
    for r in &replicas {
        let reply = Https::frontend(r).get("/clusters/member-1/version", Some(&user));
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    // A replacement replica appears behind the balancer: the agent finds it.
    let fresh = replica(&pki, "tower-d", "3");
    let mut targets: Vec<_> = replicas.iter().map(|r| r.tunnel).collect();
    targets.push(fresh.tunnel);
    balancer.set_targets(&targets);
    let appeared = Instant::now();
    wait_for(
        "a tunnel on the new replica",
        Duration::from_secs(15),
        || fresh.connected("member-1").then_some(()),
    );
    eprintln!("tunnel to the new replica after {:?}", appeared.elapsed());
    let reply = Https::frontend(&fresh).get("/clusters/member-1/version", Some(&user));
    assert_eq!(reply.status, 200, "{}", reply.body);
    wait_for(
        "the holders to follow the loss and the newcomer",
        Duration::from_secs(10),
        || {
            replicas
                .iter()
                .chain([&fresh])
                .all(|r| holders(r) == serde_json::json!(["tower-a", "tower-c", "tower-d"]))
                .then_some(())
        },
    );
    let kept: Vec<_> = [&first[0], &first[2]].into_iter().cloned().collect();
    let now: Vec<_> = replicas.iter().map(since).collect();
    assert_eq!(now, kept, "the surviving replicas kept their first tunnels");
    for r in &replicas {
        let (_, metrics) = tower_e2e::admin_get(r.admin, "/metrics");
        assert!(
            metrics.contains("tower_tunnel_reconnects_total 0"),
            "{metrics}"
        );
    }
}
