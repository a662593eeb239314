//! Identity headers on every target: a caller cannot impersonate anyone through a target
//! that has no credentials of the agent's (ks-apiserver proxies with its own privileged
//! one), front-proxy identity headers (`X-Remote-*`) never reach a target, and
//! `X-Forwarded-For` carries the address the frontend saw, not the caller's claim.

use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc;
use std::time::Duration;

use tower_e2e::{Https, Member, Server, agent, server};

/// A stand-in ks-apiserver that sends every request's header lines (lowercased) to the
/// test and answers 200.
fn kubesphere_sink() -> (String, mpsc::Receiver<Vec<String>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let (seen, requests) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut headers = Vec::new();
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                headers.push(line.trim_end().to_ascii_lowercase());
                line.clear();
            }
            let _ = seen.send(headers);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            );
        }
    });
    (addr, requests)
}

#[test]
fn no_caller_chooses_an_identity_or_an_origin_on_any_target() {
    let (ks, requests) = kubesphere_sink();
    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1")
        .args(&["--kubesphere-service", &ks])
        .connect(&server);
    let token = Server::minter().user_token("alice", &[], None);
    let https = Https::frontend(&server);
    let path = "/clusters/member-1/targets/kubesphere/kapis/resources.kubesphere.io/v1alpha3/nodes";

    for asked in [
        ("Impersonate-User", "admin"),
        ("Impersonate-Group", "system:masters"),
        ("Impersonate-Uid", "0"),
        ("Impersonate-Extra-Scopes", "all"),
    ] {
        let reply = https.request("GET", path, Some(&token), &[asked]);
        assert_eq!(reply.status, 403, "{asked:?}: {}", reply.body);
        assert!(
            reply
                .body
                .contains("Impersonate-* headers are not accepted"),
            "{}",
            reply.body
        );
    }
    assert!(
        requests.try_recv().is_err(),
        "a refused request never reaches ks-apiserver"
    );

    let reply = https.request(
        "GET",
        path,
        Some(&token),
        &[
            ("X-Remote-User", "admin"),
            ("X-Remote-Group", "system:masters"),
            ("X-Remote-Extra-Scopes", "all"),
            ("X-Forwarded-For", "203.0.113.66"),
            ("Forwarded", "for=203.0.113.66"),
            ("X-Real-Ip", "203.0.113.66"),
        ],
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let headers = requests
        .recv_timeout(Duration::from_secs(10))
        .expect("the request reached ks-apiserver");
    for line in &headers {
        assert!(
            !line.starts_with("x-remote-")
                && !line.starts_with("forwarded:")
                && !line.starts_with("x-real-ip:")
                && !line.contains("203.0.113.66"),
            "{line:?} reached ks-apiserver: {headers:#?}"
        );
    }
    assert!(
        headers.iter().any(|l| l == "x-forwarded-for: 127.0.0.1"),
        "the frontend's view of the caller: {headers:#?}"
    );
    assert!(
        headers
            .iter()
            .any(|l| *l == format!("authorization: bearer {}", token.to_ascii_lowercase())),
        "the caller's own token is forwarded to ks-apiserver: {headers:#?}"
    );
    // The server's identity assertion is for the agent alone.
    assert!(
        headers.iter().all(|l| !l.starts_with("tower-identity:")),
        "{headers:#?}"
    );
}

/// `--pass-through-unknown-tokens`: a member ServiceAccount token (what kubefed stores
/// for a joined member) reaches the member's API server as it is, which authenticates
/// it; Tower adds no identity of its own. Without the flag it is refused at the door.
#[test]
fn a_member_credential_passes_through_only_when_asked_for() {
    let member = Member::start_strict();
    let objects = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: kube-federation-system\n---\n\
        apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: member-1-kubefed\n  namespace: kube-federation-system\n---\n\
        apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: member-1-kubefed\n\
        roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: cluster-admin\n\
        subjects:\n- kind: ServiceAccount\n  name: member-1-kubefed\n  namespace: kube-federation-system\n";
    tower_e2e::kubectl_with_input(
        &member.kubeconfig,
        &["apply", "-f", "-"],
        objects.as_bytes(),
    )
    .success();
    let sa_token = tower_e2e::kubectl(
        &member.kubeconfig,
        &[
            "create",
            "token",
            "member-1-kubefed",
            "-n",
            "kube-federation-system",
        ],
    )
    .success()
    .trim()
    .to_owned();
    let path = "/clusters/member-1/api/v1/namespaces/default/pods";

    let strict = server().start();
    let _agent = agent(&strict, &member, "member-1").connect(&strict);
    let refused = Https::frontend(&strict).get(path, Some(&sa_token));
    assert_eq!(refused.status, 401, "{}", refused.body);
    // Not KubeSphere's by its algorithm: the stand-in signs ES256, as kube-apiserver does
    // with an EC service-account key.
    assert!(
        refused.body.contains("ES256") && refused.body.contains("refused: only HS256"),
        "{}",
        refused.body
    );

    let open = server().args(&["--pass-through-unknown-tokens"]).start();
    let _agent = agent(&open, &member, "member-1").connect(&open);
    let https = Https::frontend(&open);
    let before = member.api.calls().len();
    let reply = https.get(path, Some(&sa_token));
    assert_eq!(reply.status, 200, "{}", reply.body);
    let calls = member.api.calls();
    let call = calls[before..]
        .iter()
        .find(|c| {
            c.path_and_query
                .starts_with("/api/v1/namespaces/default/pods")
        })
        .expect("the request reached the member");
    assert_eq!(
        call.credential, "serviceaccount:kube-federation-system/member-1-kubefed",
        "the member authenticated the caller's own credential: {call:?}"
    );
    assert_eq!(call.impersonate_user, None, "{call:?}");
    // A credential the member does not know: its own 401, not Tower's.
    let unknown = https.get(path, Some("not-a-credential-of-anyone"));
    assert_eq!(unknown.status, 401, "{}", unknown.body);
    assert!(!unknown.body.contains("tower"), "{}", unknown.body);
    // Tokens this host signed are still judged here: an expired one never passes.
    let expired = Server::minter().sign(&serde_json::json!({
        "username": "alice", "token_type": "access_token", "exp": 1_000_000_000u64
    }));
    let reply = https.get(path, Some(&expired));
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert!(reply.body.contains("token expired"), "{}", reply.body);
    // And impersonation stays refused for a passed-through credential too.
    let reply = https.request(
        "GET",
        path,
        Some(&sa_token),
        &[("Impersonate-User", "admin")],
    );
    assert_eq!(reply.status, 403, "{}", reply.body);
}
