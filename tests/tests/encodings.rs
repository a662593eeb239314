//! What real clients ask a kube-apiserver for besides JSON, relayed through the tunnel
//! untouched: protobuf (client-go informers list and watch in
//! `application/vnd.kubernetes.protobuf`) and gzip (kubectl and client-go send
//! `Accept-Encoding: gzip`, and the apiserver compresses answers over 128 KiB).

#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::time::{Duration, Instant};

use tower_e2e::protobuf_watch::{self, Frames, WatchEvent};
use tower_e2e::{Chunk, Https, Member, Server, Streaming, agent, kubectl_with_input, server};

const WAIT: Duration = Duration::from_secs(30);
/// The media type of a protobuf watch's answer (handlers/watch.go adds `;stream=watch`).
const PROTOBUF_WATCH: &str = "application/vnd.kubernetes.protobuf;stream=watch";
/// What client-go sends with a protobuf content type, watches included (rest/request.go:
/// `ContentType + ", */*"`).
const CLIENT_GO_PROTOBUF: &str = "application/vnd.kubernetes.protobuf, */*";

/// Reads frames off a streamed protobuf watch until `want` events have come.
fn next_events(watch: &Streaming, frames: &mut Frames, want: usize) -> Vec<WatchEvent> {
    let deadline = Instant::now() + WAIT;
    let mut events = Vec::new();
    while events.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match watch.next(left) {
            Some(Chunk::Data(data)) => {
                for frame in frames.push(&data) {
                    events.push(protobuf_watch::decode(&frame).expect("a whole, valid event"));
                }
            }
            other => panic!("wanted {want} events, had {events:?}, then {other:?}"),
        }
    }
    events
}

fn create_configmap(member: &Member, name: &str, value: &str) {
    let yaml = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: default\ndata:\n  value: \"{value}\"\n"
    );
    kubectl_with_input(&member.kubeconfig, &["create", "-f", "-"], yaml.as_bytes()).success();
}

#[test]
fn a_protobuf_watch_is_relayed_event_by_event() {
    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let user = Server::minter().user_token("alice", &[], None);
    let https = Https::frontend(&server);

    let watch = https.stream(
        "/clusters/member-1/api/v1/namespaces/default/configmaps?watch=1",
        &user,
        &[("accept", CLIENT_GO_PROTOBUF)],
    );
    assert_eq!(watch.status, 200);
    assert_eq!(watch.header("content-type"), Some(PROTOBUF_WATCH));
    let mut frames = Frames::default();
    // The current state first: `default` holds one configmap.
    let initial = next_events(&watch, &mut frames, 1);
    assert_eq!(
        (initial[0].event_type.as_str(), initial[0].kind.as_str()),
        ("ADDED", "ConfigMap")
    );
    assert_eq!(initial[0].api_version, "v1");
    assert_eq!(initial[0].name, "settings");
    assert_eq!(initial[0].data["mode"], "stand-in");

    // Each change arrives as its own event, before the next one is made; values holding
    // newlines (0x0A, JSON's event boundary) and the length prefix's own bytes included.
    for (i, value) in ["plain", "two\\nlines", "\\n\\n\\n"].iter().enumerate() {
        let name = format!("pb-{i}");
        create_configmap(&member, &name, value);
        let event = &next_events(&watch, &mut frames, 1)[0];
        assert_eq!(event.event_type, "ADDED", "{event:?}");
        assert_eq!(event.name, name);
        assert_eq!(event.namespace, "default");
        assert_eq!(event.data["value"], value.replace("\\n", "\n"));
        assert_eq!(frames.partial(), 0, "nothing of a later event came early");
    }
    kubectl_with_input(
        &member.kubeconfig,
        &["delete", "configmap", "pb-1", "-n", "default"],
        b"",
    )
    .success();
    let deleted = &next_events(&watch, &mut frames, 1)[0];
    assert_eq!(
        (deleted.event_type.as_str(), deleted.name.as_str()),
        ("DELETED", "pb-1")
    );

    // The agent asked the member for what the caller asked for.
    let calls = member.api.calls();
    let watched = calls
        .iter()
        .find(|c| c.path_and_query.contains("configmaps?watch=1"))
        .expect("the watch reached the member");
    assert_eq!(watched.accept.as_deref(), Some(CLIENT_GO_PROTOBUF));
    drop(watch);
    tower_e2e::wait_for("the watch to close at the member", WAIT, || {
        (member.api.open_streams() == 0).then_some(())
    });
}

#[test]
fn protobuf_gets_and_lists_and_a_client_that_takes_no_json() {
    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let user = Server::minter().user_token("alice", &[], None);
    let https = Https::frontend(&server);
    let accept = [("accept", CLIENT_GO_PROTOBUF)];

    let direct = Https::with_ca(member.api.ca_pem(), member.api.addr());
    for path in [
        "/api/v1/namespaces/default/configmaps/settings",
        "/api/v1/namespaces/default/configmaps",
    ] {
        let relayed = https.request(
            "GET",
            &format!("/clusters/member-1{path}"),
            Some(&user),
            &accept,
        );
        assert_eq!(relayed.status, 200, "{}", relayed.body);
        assert_eq!(
            relayed.header("content-type"),
            Some("application/vnd.kubernetes.protobuf")
        );
        assert!(
            relayed.bytes.starts_with(b"k8s\0"),
            "{:?}",
            &relayed.bytes[..16]
        );
        let original = direct.request("GET", path, Some(member.api.token()), &accept);
        assert_eq!(
            relayed.bytes, original.bytes,
            "{path} relayed byte for byte"
        );
    }
    // A kind the stand-in writes only in JSON: JSON for a client that takes it...
    let pods = https.request(
        "GET",
        "/clusters/member-1/api/v1/namespaces/default/pods",
        Some(&user),
        &accept,
    );
    assert_eq!(
        (pods.status, pods.header("content-type")),
        (200, Some("application/json"))
    );
    // ...406 for one that takes nothing else, as the apiserver refuses what it cannot serve.
    let refused = https.request(
        "GET",
        "/clusters/member-1/api/v1/namespaces/default/pods",
        Some(&user),
        &[("accept", "application/vnd.kubernetes.protobuf")],
    );
    assert_eq!(refused.status, 406, "{}", refused.body);
    assert!(refused.body.contains("NotAcceptable"), "{}", refused.body);
}

#[test]
fn a_large_gzipped_list_is_relayed_byte_for_byte() {
    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let user = Server::minter().user_token("alice", &[], None);
    let https = Https::frontend(&server);
    let gzip = [("accept-encoding", "gzip")];

    // More than 55 MB of configmaps: the member gzips it.
    let path = "/api/v1/namespaces/bulk/configmaps";
    let relayed = https.request(
        "GET",
        &format!("/clusters/member-1{path}"),
        Some(&user),
        &gzip,
    );
    assert_eq!(relayed.status, 200);
    assert_eq!(relayed.header("content-encoding"), Some("gzip"));
    assert_eq!(relayed.header("vary"), Some("Accept-Encoding"));
    assert_eq!(relayed.header("content-type"), Some("application/json"));
    assert_eq!(member.api.gzipped_responses(), 1);
    let direct = Https::with_ca(member.api.ca_pem(), member.api.addr()).request(
        "GET",
        path,
        Some(member.api.token()),
        &gzip,
    );
    assert_eq!(direct.header("content-encoding"), Some("gzip"));
    assert!(
        relayed.bytes == direct.bytes,
        "the compressed body arrives as the member sent it ({} bytes relayed, {} sent)",
        relayed.bytes.len(),
        direct.bytes.len()
    );
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&relayed.bytes[..])
        .read_to_end(&mut json)
        .expect("valid gzip");
    assert!(json.len() > 55_000_000, "{} bytes", json.len());
    let list: serde_json::Value = serde_json::from_slice(&json).expect("the whole list");
    assert_eq!(list["items"].as_array().unwrap().len(), 550);

    // 128 KiB and less stays plain, and so does every watch.
    let small = https.request(
        "GET",
        "/clusters/member-1/api/v1/namespaces/default/configmaps",
        Some(&user),
        &gzip,
    );
    assert_eq!(small.status, 200);
    assert_eq!(small.header("content-encoding"), None);
    let watch = https.stream(
        "/clusters/member-1/api/v1/namespaces/bulk/configmaps?watch=1",
        &user,
        &gzip,
    );
    assert_eq!(watch.status, 200);
    assert_eq!(watch.header("content-encoding"), None);
    match watch.next(WAIT) {
        Some(Chunk::Data(data)) => assert!(data.starts_with(b"{\"type\":\"ADDED\""), "{data:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        member.api.gzipped_responses(),
        2,
        "only the two large lists"
    );
}
