//! A second agent with a valid token for a cluster whose tunnel is alive does not replace
//! that tunnel (and so never receives callers' requests and tokens): it is refused with
//! 409, counted, logged and, in Kubernetes mode, shown as a Cluster condition. A real
//! restart (the old agent gone without a word) gets through once the old tunnel fails to
//! answer a ping.

use std::time::{Duration, Instant};

use tower_e2e::{
    Https, Member, Relay, Server, admin_get, agent, kubectl, kubectl_with_input, server, wait_for,
    wait_for_with,
};

fn refusals(server: &Server) -> usize {
    admin_get(server.admin, "/metrics")
        .1
        .lines()
        .filter(|l| {
            l.starts_with("tower_tunnel_refusals_total") && l.contains("reason=\"conflict\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as usize
}

/// Requests through the frontend that reached `member` (by the path only this test uses).
fn reached(member: &Member, path: &str) -> usize {
    member
        .api
        .calls()
        .iter()
        .filter(|c| c.path_and_query.starts_with(path))
        .count()
}

#[test]
fn a_second_agent_is_refused_while_the_first_answers_and_a_restart_gets_through() {
    // The server pings every 30 s: on its own it would notice a dead link after a
    // minute, so a fast takeover below is the probe's doing.
    let server = server().args(&["--keepalive", "30s"]).start();
    let first_member = Member::start();
    let second_member = Member::start();
    // The first agent reaches the server through a relay the test can blackhole.
    let link = Relay::start(server.tunnel);
    let mut first = agent(&server, &first_member, "member-1")
        .proxy_server(link.addr)
        .connect(&server);
    // The same cluster's token, from another member (a copied Secret).
    let second = agent(&server, &second_member, "member-1").spawn();
    wait_for_with(
        "the second agent to be refused",
        Duration::from_secs(20),
        || (refusals(&server) >= 2).then_some(()),
        || second.process.log(),
    );
    assert!(
        second
            .process
            .log()
            .contains("another agent holds this cluster's tunnel"),
        "{}",
        second.process.log()
    );
    assert!(server.process.log().contains("refused a second agent"));

    // Every caller's request goes to the first agent's member, none to the second's.
    let token = Server::minter().user_token("alice", &[], None);
    let https = Https::frontend(&server);
    let path = "/api/v1/namespaces/default/configmaps";
    for _ in 0..60 {
        let reply = https.get(&format!("/clusters/member-1{path}"), Some(&token));
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    assert_eq!(reached(&first_member, path), 60);
    assert_eq!(
        reached(&second_member, path),
        0,
        "the second agent got requests"
    );

    // The first agent's link goes dark and the agent dies without a word: the server
    // still holds a half-open tunnel. The second gets through as soon as that tunnel
    // fails to answer a ping, well before the keepalive would have noticed.
    link.freeze();
    first.process.kill();
    let killed = Instant::now();
    wait_for_with(
        "the second agent to take over",
        Duration::from_secs(20),
        || {
            let reply = https.get(&format!("/clusters/member-1{path}"), Some(&token));
            (reply.status == 200 && reached(&second_member, path) > 0).then_some(())
        },
        || format!("{}\n---\n{}", server.process.log(), second.process.log()),
    );
    eprintln!(
        "the second agent took over {:?} after the first died",
        killed.elapsed()
    );
    assert!(
        server
            .process
            .log()
            .contains("did not answer a ping: the newcomer replaces it")
    );
}

#[test]
fn in_kubernetes_mode_the_refusal_is_a_cluster_condition() {
    let host = Member::start();
    let kubeconfig = host.kubeconfig.to_str().expect("path").to_owned();
    let server = server()
        .args(&["--kubernetes", "--kubeconfig", &kubeconfig])
        .start();
    wait_for(
        "the first list of Clusters",
        Duration::from_secs(20),
        || (admin_get(server.admin, "/readyz").0 == 200).then_some(()),
    );
    let cluster = "apiVersion: cluster.kubesphere.io/v1alpha1\nkind: Cluster\nmetadata:\n  name: member-1\nspec:\n  connection:\n    type: proxy\n";
    kubectl_with_input(&host.kubeconfig, &["create", "-f", "-"], cluster.as_bytes()).success();
    let field = |jsonpath: &str| {
        let out = kubectl(
            &host.kubeconfig,
            &[
                "get",
                "cluster",
                "member-1",
                "-o",
                &format!("jsonpath={jsonpath}"),
            ],
        );
        String::from_utf8_lossy(&out.0.stdout).into_owned()
    };
    let token = wait_for("the Cluster's token", Duration::from_secs(20), || {
        Some(field("{.spec.connection.token}")).filter(|t| !t.is_empty())
    });
    let first_member = Member::start();
    let second_member = Member::start();
    let _first = agent(&server, &first_member, "member-1")
        .token(&token)
        .connect(&server);
    let second = agent(&server, &second_member, "member-1")
        .token(&token)
        .spawn();
    let conflict = r#"{.status.conditions[?(@.type=="AgentConflict")]}"#;
    let condition = wait_for_with(
        "AgentConflict=True",
        Duration::from_secs(30),
        || {
            let c: serde_json::Value = serde_json::from_str(&field(conflict)).ok()?;
            (c["status"] == "True").then_some(c)
        },
        || second.process.log(),
    );
    assert_eq!(condition["reason"], "SecondAgentRefused");
    let message = condition["message"].as_str().expect("message");
    assert!(
        message.contains("refused a second agent from 127.0.0.1:"),
        "{message}"
    );
    // The first agent stays the one that serves. Its True is written in its own turn of
    // the controller, in no set order with the conflict's: waited for, not read once.
    wait_for_with(
        "AgentAvailable=True beside the conflict",
        Duration::from_secs(30),
        || {
            (field(r#"{.status.conditions[?(@.type=="AgentAvailable")].status}"#) == "True")
                .then_some(())
        },
        || second.process.log(),
    );
}

/// A tunnel does not outlive its agent token: at `exp` the server drains it (requests in
/// flight get the grace period) and the agent dials again with its token file read anew,
/// where an expired token is refused with the reason.
#[test]
fn a_tunnel_is_drained_when_its_agent_token_expires() {
    let server = server().start();
    let member = Member::start();
    // Long enough for the agent to start and be admitted on a loaded machine (the token
    // must still be valid then), short enough to wait for.
    let lifetime = Duration::from_secs(8);
    let token = Server::minter().agent_token("member-1", Some(lifetime));
    let agent = agent(&server, &member, "member-1")
        .token(&token)
        .via_token_file()
        .connect(&server);
    let connected = Instant::now();
    wait_for_with(
        "the tunnel to be drained at the token's exp",
        Duration::from_secs(30),
        || (!server.connected("member-1")).then_some(()),
        || server.process.log(),
    );
    assert!(
        connected.elapsed() < lifetime + Duration::from_secs(10),
        "{:?}",
        connected.elapsed()
    );
    assert!(
        server
            .process
            .log()
            .contains("the agent token expired: draining the tunnel"),
        "{}",
        server.process.log()
    );
    // The agent's next dial names the reason.
    wait_for_with(
        "the agent to be refused with the reason",
        Duration::from_secs(20),
        || {
            agent
                .process
                .log()
                .contains("agent token refused: token expired")
                .then_some(())
        },
        || agent.process.log(),
    );
    // A rotated token in the file (as Kubernetes updates a mounted Secret) reconnects.
    let fresh = Server::minter().agent_token("member-1", Some(Duration::from_secs(3600)));
    std::fs::write(&agent.token_file, format!("{fresh}\n")).expect("rotate the token file");
    wait_for_with(
        "the agent to reconnect with the rotated token",
        Duration::from_secs(30),
        || server.connected("member-1").then_some(()),
        || agent.process.log(),
    );
}
