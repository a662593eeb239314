//! The stand-in's HTTP semantics, driven by a plain HTTPS client: status codes and bodies,
//! watches (replay, timeout, 410, fan-out, disconnects, shutdown) and `/debug/bytes`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Client, EventReader, Harness, TOKEN, body_bytes, body_json, eventually};
use http_body_util::BodyExt as _;
use serde_json::json;

const TEST_DEADLINE: Duration = Duration::from_secs(120);
const EVENT_DEADLINE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_401_and_no_credential_is_the_anonymous_user() {
    let h = Harness::start().await;
    let mut c = h.connect().await;
    // A bearer token nobody accepts: 401, whatever anonymous could do.
    let resp = c
        .request(
            "GET",
            "/api/v1/namespaces/default/pods",
            Some("wrong"),
            None,
        )
        .await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        body_json(resp).await,
        json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
               "message":"Unauthorized","reason":"Unauthorized","code":401})
    );
    let resp = c.request("GET", "/version", Some("wrong"), None).await;
    assert_eq!(resp.status(), 401);
    // No credential: system:anonymous, which the bootstrap policy lets read /version and
    // /healthz and nothing else (the fixture binding is for authenticated users only).
    let resp = c
        .request("GET", "/api/v1/namespaces/default/pods", None, None)
        .await;
    assert_eq!(resp.status(), 403);
    assert_eq!(
        body_json(resp).await,
        json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
               "message":"pods is forbidden: User \"system:anonymous\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\"",
               "reason":"Forbidden","details":{"kind":"pods"},"code":403})
    );
    for path in ["/version", "/healthz"] {
        assert_eq!(
            c.request("GET", path, None, None).await.status(),
            200,
            "{path}"
        );
    }
    let resp = c.request("GET", "/api", None, None).await;
    assert_eq!(resp.status(), 403);
    assert_eq!(
        body_json(resp).await["message"],
        "forbidden: User \"system:anonymous\" cannot get path \"/api\""
    );
    let resp = c.get("/version").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body_json(resp).await["gitVersion"], "v1.32.0");
    let calls = h.stand_in.calls();
    assert_eq!(calls.len(), 7);
    assert_eq!(calls[0].credential, "anonymous");
    assert!(calls[0].saw_authorization);
    assert_eq!(calls[0].user, None, "a refused token runs as nobody");
    assert_eq!(calls[2].credential, "anonymous");
    assert!(!calls[2].saw_authorization);
    assert_eq!(calls[2].user.as_deref(), Some("system:anonymous"));
    assert_eq!(calls[2].groups, ["system:unauthenticated"]);
    let last = &calls[6];
    assert_eq!(last.credential, "token");
    assert_eq!(last.path_and_query, "/version");
    assert_eq!(last.user.as_deref(), Some(tower_kube_stand_in::ADMIN_USER));
    assert_eq!(last.groups, ["system:masters", "system:authenticated"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_status_objects_with_the_right_codes() {
    let h = Harness::start().await;
    let mut c = h.connect().await;
    let cases = [
        (
            "GET",
            "/api/v1/namespaces/default/pods/nope",
            None,
            404,
            "NotFound",
        ),
        ("GET", "/api/v1/widgets", None, 404, "NotFound"),
        ("GET", "/nothing/here", None, 404, "NotFound"),
        (
            "POST",
            "/api/v1/namespaces/default/pods",
            Some(json!({"metadata": {"name": "web-0"}})),
            409,
            "AlreadyExists",
        ),
        (
            "PUT",
            "/api/v1/namespaces/default/configmaps/settings",
            Some(json!({"metadata": {"name": "settings", "resourceVersion": "1"}})),
            409,
            "Conflict",
        ),
        (
            "POST",
            "/api/v1/namespaces/default/configmaps",
            Some(json!(["not", "an", "object"])),
            400,
            "BadRequest",
        ),
        (
            "POST",
            "/api/v1/namespaces/missing/configmaps",
            Some(json!({"metadata": {"name": "x"}})),
            404,
            "NotFound",
        ),
        ("PUT", "/version", None, 405, "MethodNotAllowed"),
        (
            "DELETE",
            "/api/v1/namespaces/default/configmaps/nope",
            None,
            404,
            "NotFound",
        ),
    ];
    for (method, path, body, code, reason) in cases {
        let resp = c.request(method, path, Some(TOKEN), body).await;
        assert_eq!(resp.status(), code, "{method} {path}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/json",
            "{method} {path}"
        );
        let status = body_json(resp).await;
        assert_eq!(status["kind"], "Status", "{method} {path}");
        assert_eq!(status["reason"], reason, "{method} {path}");
        assert_eq!(status["code"], code, "{method} {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_have_metadata_and_lists_a_resource_version() {
    let h = Harness::start().await;
    let mut c = h.connect().await;
    let resp = c
        .request(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            Some(TOKEN),
            Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "fresh"}, "data": {"a": "b"}})),
        )
        .await;
    assert_eq!(resp.status(), 201);
    let created = body_json(resp).await;
    let meta = &created["metadata"];
    assert_eq!(meta["namespace"], "default");
    assert!(meta["uid"].as_str().is_some_and(|u| u.len() == 36));
    assert!(
        meta["creationTimestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let rv: u64 = meta["resourceVersion"].as_str().unwrap().parse().unwrap();

    let list = body_json(c.get("/api/v1/namespaces/default/configmaps").await).await;
    assert_eq!(list["kind"], "ConfigMapList");
    let list_rv: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(list_rv >= rv);

    let deleted = c
        .request(
            "DELETE",
            "/api/v1/namespaces/default/configmaps/fresh",
            Some(TOKEN),
            None,
        )
        .await;
    assert_eq!(deleted.status(), 200);
    assert_eq!(body_json(deleted).await["metadata"]["name"], "fresh");

    let bulk = c.get("/api/v1/namespaces/bulk/configmaps").await;
    assert_eq!(bulk.status(), 200);
    let bulk = body_bytes(bulk).await;
    assert!(
        bulk.len() >= 55_000_000,
        "bulk list is {} bytes",
        bulk.len()
    );
    let bulk: serde_json::Value = serde_json::from_slice(&bulk).unwrap();
    assert_eq!(bulk["items"].as_array().unwrap().len(), 550);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_replays_from_a_resource_version_then_times_out() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let mut c = h.connect().await;
        let list = body_json(c.get("/api/v1/namespaces/default/pods").await).await;
        let rv = list["metadata"]["resourceVersion"].as_str().unwrap().to_owned();
        let mut c2 = Client::connect(&h.stand_in).await;
        let resp = c2
            .request(
                "DELETE",
                "/api/v1/namespaces/default/pods/web-1",
                Some(TOKEN),
                None,
            )
            .await;
        assert_eq!(resp.status(), 200);

        let started = std::time::Instant::now();
        let resp = c
            .get(&format!(
                "/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}&timeoutSeconds=1"
            ))
            .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let mut events = EventReader::new(resp);
        let event = events.next(EVENT_DEADLINE).await.unwrap();
        assert_eq!(event["type"], "DELETED");
        assert_eq!(event["object"]["metadata"]["name"], "web-1");
        assert!(events.next(EVENT_DEADLINE).await.is_none(), "ends at timeoutSeconds");
        assert!(started.elapsed() >= Duration::from_millis(900));

        // No resourceVersion: the current state first, as ADDED events.
        let resp = c
            .get("/api/v1/pods?watch=1&timeoutSeconds=1&fieldSelector=metadata.name%3Dweb-0")
            .await;
        let mut events = EventReader::new(resp);
        let event = events.next(EVENT_DEADLINE).await.unwrap();
        assert_eq!((event["type"].as_str(), event["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("web-0")));
        assert!(events.next(EVENT_DEADLINE).await.is_none());

        // The watch-list protocol: initial events, then the bookmark that ends them.
        let resp = c
            .get("/api/v1/namespaces/default/pods?watch=1&sendInitialEvents=true&allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=1")
            .await;
        let mut events = EventReader::new(resp);
        let event = events.next(EVENT_DEADLINE).await.unwrap();
        assert_eq!((event["type"].as_str(), event["object"]["metadata"]["name"].as_str()), (Some("ADDED"), Some("web-0")));
        let bookmark = events.next(EVENT_DEADLINE).await.unwrap();
        assert_eq!(bookmark["type"], "BOOKMARK");
        assert_eq!(bookmark["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
        assert!(events.next(EVENT_DEADLINE).await.is_none());

        // Too old: an ERROR event carrying 410 Expired, then the end.
        let resp = c
            .get("/api/v1/namespaces/default/pods?watch=true&resourceVersion=1")
            .await;
        assert_eq!(resp.status(), 200);
        let mut events = EventReader::new(resp);
        let event = events.next(EVENT_DEADLINE).await.unwrap();
        assert_eq!(event["type"], "ERROR");
        assert_eq!(event["object"]["code"], 410);
        assert_eq!(event["object"]["reason"], "Expired");
        assert!(events.next(EVENT_DEADLINE).await.is_none());
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_watches_share_one_event_and_end_when_clients_leave() {
    const WATCHES: usize = 100;
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let rv = h_rv(&h).await;
        let mut readers = Vec::new();
        for i in 0..WATCHES {
            let mut c = h.connect().await;
            // Half namespaced, half all-namespaces; all filtered to configmaps.
            let path = if i % 2 == 0 {
                format!("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={rv}")
            } else {
                format!("/api/v1/configmaps?watch=true&resourceVersion={rv}")
            };
            let resp = c.get(&path).await;
            assert_eq!(resp.status(), 200);
            readers.push((c, EventReader::new(resp)));
        }
        eventually("all watches to be open", EVENT_DEADLINE, || {
            h.stand_in.open_streams() == WATCHES
        })
        .await;
        let mut c = h.connect().await;
        let resp = c
            .request(
                "POST",
                "/api/v1/namespaces/default/configmaps",
                Some(TOKEN),
                Some(json!({"metadata": {"name": "fanout"}})),
            )
            .await;
        assert_eq!(resp.status(), 201);
        for (_, events) in &mut readers {
            let event = events.next(EVENT_DEADLINE).await.unwrap();
            assert_eq!(event["type"], "ADDED");
            assert_eq!(event["object"]["metadata"]["name"], "fanout");
        }
        drop(readers);
        eventually(
            "watches to end after their clients left",
            EVENT_DEADLINE,
            || h.stand_in.open_streams() == 0,
        )
        .await;
    })
    .await
    .expect("test deadline");
}

async fn h_rv(h: &Harness) -> String {
    let mut c = h.connect().await;
    let list = body_json(c.get("/api/v1/namespaces/default/configmaps").await).await;
    list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_watches() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let h = Harness::start().await;
        let mut c = h.connect().await;
        let resp = c.get("/api/v1/namespaces/default/pods?watch=true").await;
        let mut events = EventReader::new(resp);
        for _ in 0..2 {
            assert_eq!(events.next(EVENT_DEADLINE).await.unwrap()["type"], "ADDED");
        }
        h.stand_in.shutdown();
        assert!(events.next(EVENT_DEADLINE).await.is_none());
        tokio::time::timeout(EVENT_DEADLINE, h.stand_in.wait_stopped())
            .await
            .expect("every task ends after shutdown");
        assert_eq!(h.stand_in.open_streams(), 0);
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_bytes_streams_the_pattern_with_and_without_length() {
    let h = Harness::start().await;
    let mut c = h.connect().await;
    let size = 1_000_003usize;
    for chunked in [false, true] {
        let path = if chunked {
            format!("/debug/bytes?size={size}&chunked=1")
        } else {
            format!("/debug/bytes?size={size}")
        };
        let resp = c.get(&path).await;
        assert_eq!(resp.status(), 200);
        let length = resp.headers().get("content-length").cloned();
        if chunked {
            assert!(length.is_none());
            assert_eq!(resp.headers()["transfer-encoding"], "chunked");
        } else {
            assert_eq!(length.unwrap(), size.to_string().as_str());
        }
        let mut body = resp.into_body();
        let mut offset = 0usize;
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            for (i, b) in data.iter().enumerate() {
                assert_eq!(usize::from(*b), (offset + i) % 251, "byte {}", offset + i);
            }
            offset += data.len();
        }
        assert_eq!(offset, size);
    }
    // A non-resource URL no role grants to anonymous.
    let resp = c.request("GET", "/debug/bytes?size=10", None, None).await;
    assert_eq!(resp.status(), 403);
}
