//! Callers that speak HTTP/2 to the frontend (as kubectl and client-go do when offered):
//! many watches on one connection, each event delivered to every watch, carried through
//! the tunnel on one shared HTTP/2 stream, and multiplexed on HTTP/2 by the agent to the
//! member past one connection's stream cap.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower_e2e::{Https, Member, Server, agent, server};

/// More than the agent's 100 watches per connection to the member.
const WATCHES: usize = 150;
const WAIT: Duration = Duration::from_secs(20);

#[test]
fn many_watches_share_one_http2_connection_and_all_see_an_event() {
    let member = Member::start();
    let server = server().start();
    let _agent = agent(&server, &member, "member-1").connect(&server);
    let user = Server::minter().user_token("alice", &["devs".to_owned()], None);
    let https = Https::frontend(&server);
    let base = "https://localhost/clusters/member-1/api/v1/namespaces/default/configmaps";
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut h2 = tower_e2e::http2_over_tls::<Full<Bytes>>(server.frontend, https.tls()).await;
        let request = |method: &str, uri: String, body: &str| {
            http::Request::builder()
                .method(method)
                .uri(uri)
                .header("authorization", format!("Bearer {user}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_owned())))
                .expect("request")
        };
        // Watch from the list's resourceVersion: only what happens next arrives.
        let list = h2
            .send_request(request("GET", base.into(), ""))
            .await
            .expect("list");
        assert_eq!(list.version(), http::Version::HTTP_2);
        assert_eq!(list.status(), 200);
        let list: serde_json::Value = serde_json::from_slice(
            &list
                .into_body()
                .collect()
                .await
                .expect("list body")
                .to_bytes(),
        )
        .expect("list JSON");
        let version = list["metadata"]["resourceVersion"]
            .as_str()
            .expect("resourceVersion");

        let mut watches = Vec::new();
        for _ in 0..WATCHES {
            let uri = format!("{base}?watch=1&resourceVersion={version}");
            watches.push(h2.send_request(request("GET", uri, "")));
        }
        let mut bodies = Vec::new();
        for watch in watches {
            let response = tokio::time::timeout(WAIT, watch)
                .await
                .expect("the watch opens in time")
                .expect("watch");
            assert_eq!(response.status(), 200);
            assert_eq!(response.version(), http::Version::HTTP_2);
            bodies.push(response.into_body());
        }
        // Through the tunnel they share one HTTP/2 stream; the list before them left one
        // pooled HTTP/1.1 stream. A stream each would be 150.
        let streams = tower_e2e::metric_value(server.admin, "tower_streams");
        assert_eq!(
            streams,
            Some(2.0),
            "tunnel streams with {WATCHES} watches open"
        );

        let created = h2
            .send_request(request(
                "POST",
                base.into(),
                r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"over-h2"}}"#,
            ))
            .await
            .expect("create");
        assert_eq!(created.status(), 201);
        for (i, mut body) in bodies.into_iter().enumerate() {
            let mut seen = Vec::new();
            while !String::from_utf8_lossy(&seen).contains("\"over-h2\"") {
                let frame = tokio::time::timeout(WAIT, body.frame())
                    .await
                    .unwrap_or_else(|_| panic!("watch {i} saw no event"))
                    .expect("the watch is still open")
                    .expect("the watch body has no error");
                if let Some(data) = frame.data_ref() {
                    seen.extend_from_slice(data);
                }
            }
            assert!(String::from_utf8_lossy(&seen).starts_with("{\"type\":\"ADDED\""));
        }
    });

    // The member saw every watch over HTTP/2 from the agent.
    let calls = member.api.calls();
    let watches: Vec<_> = calls
        .iter()
        .filter(|c| c.path_and_query.contains("watch=1"))
        .collect();
    assert_eq!(watches.len(), WATCHES);
    assert!(watches.iter().all(|c| c.version == http::Version::HTTP_2));
    assert!(
        watches
            .iter()
            .all(|c| c.impersonate_user.as_deref() == Some("alice"))
    );
}
