//! Faults for clients that must survive an apiserver restart: `drop_connections` cuts open
//! watches (and every other connection) while the listener keeps serving, and
//! `set_available(false)` refuses connections until `set_available(true)`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Client, EventReader, Harness, TOKEN, body_json, eventually, try_tls_connect};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};

const TEST_DEADLINE: Duration = Duration::from_secs(120);
const EVENT_DEADLINE: Duration = Duration::from_secs(10);
const CLUSTERS: &str = "/apis/cluster.kubesphere.io/v1alpha1/clusters";

fn cluster(name: &str) -> Value {
    json!({
        "apiVersion": "cluster.kubesphere.io/v1alpha1",
        "kind": "Cluster",
        "metadata": {"name": name},
        "spec": {"connection": {"type": "proxy"}},
    })
}

/// Reads a watch body to its end: `Ok(lines)` for a clean end, `Err` for a cut connection.
async fn read_to_end(body: &mut hyper::body::Incoming) -> Result<String, hyper::Error> {
    let mut text = Vec::new();
    loop {
        match tokio::time::timeout(EVENT_DEADLINE, body.frame())
            .await
            .expect("the watch ends within the deadline")
        {
            None => return Ok(String::from_utf8(text).unwrap()),
            Some(Err(error)) => return Err(error),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    text.extend_from_slice(&data);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_connections_cuts_watches_and_the_next_request_succeeds() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let mut c = h.connect().await;
        let resp = c
            .request("POST", CLUSTERS, Some(TOKEN), Some(cluster("member-a")))
            .await;
        assert_eq!(resp.status(), 201);

        let mut watcher = h.connect().await;
        let resp = watcher.get(&format!("{CLUSTERS}?watch=true")).await;
        assert_eq!(resp.status(), 200);
        let mut events = EventReader::new(resp);
        let added = events.next(EVENT_DEADLINE).await.unwrap();
        assert_eq!(added["type"], "ADDED");
        let rv = added["object"]["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned();
        // A second watch through the `/watch/` path, read to its end below.
        let mut watcher2 = h.connect().await;
        let resp = watcher2
            .get("/apis/cluster.kubesphere.io/v1alpha1/watch/clusters/member-a")
            .await;
        assert_eq!(resp.status(), 200);
        let mut body2 = resp.into_body();
        eventually("both watches to be open", EVENT_DEADLINE, || {
            h.stand_in.open_streams() == 2
        })
        .await;
        assert!(h.stand_in.open_connections() >= 3);

        h.stand_in.drop_connections();

        // Both watches end with a cut connection, not a clean end of the body.
        let cut = read_to_end(&mut body2).await;
        assert!(cut.is_err(), "the watch ended cleanly: {cut:?}");
        let mut body = events.into_body();
        assert!(read_to_end(&mut body).await.is_err());
        eventually("the watches to end on the server", EVENT_DEADLINE, || {
            h.stand_in.open_streams() == 0
        })
        .await;
        // The idle keep-alive connection was cut as well.
        assert!(
            c.try_request("GET", CLUSTERS, Some(TOKEN), None)
                .await
                .is_err()
        );
        eventually("every cut connection to close", EVENT_DEADLINE, || {
            h.stand_in.open_connections() == 0
        })
        .await;

        // The listener still serves; a watch resuming from the last version sees what
        // happened while it was away.
        let mut c = Client::connect(&h.stand_in).await;
        let resp = c
            .request(
                "PATCH",
                &format!("{CLUSTERS}/member-a/status"),
                Some(TOKEN),
                Some(json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}})),
            )
            .await;
        assert_eq!(resp.status(), 415, "application/json is not a patch type");
        let resp = c
            .request(
                "PUT",
                &format!("{CLUSTERS}/member-a/status"),
                Some(TOKEN),
                Some({
                    let mut body = added["object"].clone();
                    body["status"] = json!({"conditions": [{"type": "Ready", "status": "False"}]});
                    body
                }),
            )
            .await;
        assert_eq!(resp.status(), 200);
        let resp = c
            .get(&format!(
                "{CLUSTERS}?watch=1&resourceVersion={rv}&timeoutSeconds=1"
            ))
            .await;
        let mut events = EventReader::new(resp);
        let modified = events.next(EVENT_DEADLINE).await.unwrap();
        assert_eq!(modified["type"], "MODIFIED");
        assert_eq!(
            modified["object"]["status"]["conditions"][0]["status"],
            "False"
        );
        assert!(events.next(EVENT_DEADLINE).await.is_none());
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_connections_ends_a_kubectl_watch() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        h.connect()
            .await
            .request("POST", CLUSTERS, Some(TOKEN), Some(cluster("member-b")))
            .await;
        let mut watch = h.kubectl();
        watch.args(["get", "clusters", "-w", "-o", "name"]);
        let mut child = watch.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(EVENT_DEADLINE, lines.next_line())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            first.as_deref(),
            Some("cluster.cluster.kubesphere.io/member-b")
        );
        eventually("kubectl's watch to be open", EVENT_DEADLINE, || {
            h.stand_in.open_streams() == 1
        })
        .await;

        h.stand_in.drop_connections();
        eventually("the watch to end on the server", EVENT_DEADLINE, || {
            h.stand_in.open_streams() == 0
        })
        .await;
        // kubectl's watch does not retry: it exits (with status 0, as kubectl 1.32 treats
        // any end of the watch) once its connection is gone.
        tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("kubectl exits after the cut")
            .unwrap();
        // …and the next kubectl works.
        assert_eq!(
            h.ok(&["get", "clusters", "-o", "name"]).await,
            "cluster.cluster.kubesphere.io/member-b\n"
        );
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_refuses_connections_until_available_again() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let mut c = h.connect().await;
        assert_eq!(c.get("/api/v1/namespaces").await.status(), 200);
        assert!(h.stand_in.is_available());

        h.stand_in.set_available(false);
        assert!(!h.stand_in.is_available());
        // The open connection is cut, and new ones are closed before the TLS handshake.
        assert!(
            c.try_request("GET", "/api/v1/namespaces", Some(TOKEN), None)
                .await
                .is_err()
        );
        assert!(try_tls_connect(&h.stand_in).await.is_err());
        assert!(try_tls_connect(&h.stand_in).await.is_err());
        assert_eq!(h.stand_in.refused_connections(), 2);

        // kubectl, started while the stand-in is down, keeps retrying; once it has been
        // refused the stand-in comes back and kubectl's retry succeeds.
        let mut cmd = h.kubectl();
        cmd.args(["get", "ns", "-o", "name"]);
        let child = cmd.spawn().unwrap();
        eventually("kubectl to be refused", Duration::from_secs(30), || {
            h.stand_in.refused_connections() > 2
        })
        .await;
        h.stand_in.set_available(true);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("kubectl finishes")
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "namespace/bulk\nnamespace/default\nnamespace/kube-system\n"
        );

        let mut c = Client::connect(&h.stand_in).await;
        let list = body_json(c.get(CLUSTERS).await).await;
        assert_eq!(list["kind"], "ClusterList");
        assert_eq!(list["apiVersion"], "cluster.kubesphere.io/v1alpha1");
        assert_eq!(list["items"], json!([]));
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_watch_events_arrive_in_order_once_released() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let mut c = h.connect().await;
        let resp = c
            .request("POST", CLUSTERS, Some(TOKEN), Some(cluster("member-a")))
            .await;
        assert_eq!(resp.status(), 201);
        let mut watcher = h.connect().await;
        let mut events = EventReader::new(watcher.get(&format!("{CLUSTERS}?watch=true")).await);
        let added = events.next(EVENT_DEADLINE).await.unwrap();
        assert_eq!(added["type"], "ADDED");

        h.stand_in.hold_watch_events(true);
        let mut object = added["object"].clone();
        for status in ["False", "True"] {
            object["status"] = json!({"conditions": [{"type": "Ready", "status": status}]});
            let resp = c
                .request(
                    "PUT",
                    &format!("{CLUSTERS}/member-a/status"),
                    Some(TOKEN),
                    Some(object.clone()),
                )
                .await;
            assert_eq!(resp.status(), 200);
            object = body_json(resp).await;
        }
        // Reads see the writes; the watch does not, yet.
        let resp = c
            .request("GET", &format!("{CLUSTERS}/member-a"), Some(TOKEN), None)
            .await;
        assert_eq!(
            body_json(resp).await["status"]["conditions"][0]["status"],
            "True"
        );
        let early =
            tokio::time::timeout(Duration::from_millis(300), events.next(EVENT_DEADLINE)).await;
        assert!(early.is_err(), "an event came through the hold: {early:?}");

        h.stand_in.hold_watch_events(false);
        for status in ["False", "True"] {
            let event = events.next(EVENT_DEADLINE).await.unwrap();
            assert_eq!(event["type"], "MODIFIED");
            assert_eq!(event["object"]["status"]["conditions"][0]["status"], status);
        }
    })
    .await
    .expect("test deadline");
}
