//! The stand-in's service proxy (`services/{id}/proxy/…`), driven by a plain HTTPS client
//! against a backend of the test's own: where it leads, what the backend sees, and the
//! apiserver's errors.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{Harness, TOKEN, body_json};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

/// What the backend saw of each request: path and query, and its headers.
type Seen = Arc<Mutex<Vec<(String, http::HeaderMap)>>>;

/// A plain HTTP backend on 127.0.0.1 that records each request and answers
/// `{"gitVersion": "v3.4.1"}`; returns its port.
async fn backend(seen: Seen) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let path = req.uri().path_and_query().unwrap().to_string();
                    seen.lock().unwrap().push((path, req.headers().clone()));
                    let mut resp =
                        Response::new(Full::new(Bytes::from_static(br#"{"gitVersion":"v3.4.1"}"#)));
                    resp.headers_mut()
                        .insert("content-type", "application/json".parse().unwrap());
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_proxy_reaches_the_endpoints_address_without_the_callers_credentials() {
    let h = Harness::start().await;
    let mut c = h.connect().await;
    let seen = Seen::default();
    let port = backend(seen.clone()).await;
    let create = |plural: &str, body| (format!("/api/v1/namespaces/default/{plural}"), Some(body));
    for (path, body) in [
        create(
            "services",
            json!({"metadata": {"name": "ks-apiserver"},
                   "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 9090}]}}),
        ),
        create(
            "endpoints",
            json!({"metadata": {"name": "ks-apiserver"},
                   "subsets": [{"addresses": [{"ip": "127.0.0.1"}],
                                "ports": [{"name": "http", "port": port}]}]}),
        ),
    ] {
        let resp = c.request("POST", &path, Some(TOKEN), body).await;
        assert_eq!(resp.status(), 201, "{path}");
    }

    // As KubeSphere's cluster controller asks: no scheme, the port by number.
    let path =
        "/api/v1/namespaces/default/services/:ks-apiserver:80/proxy/kapis/./x/../version?a=1";
    let resp = c
        .request_with(
            "GET",
            path,
            Some(TOKEN),
            &[("impersonate-user", "someone"), ("x-custom", "kept")],
            None,
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body_json(resp).await, json!({"gitVersion": "v3.4.1"}));
    {
        let seen = seen.lock().unwrap();
        let (path, headers) = seen.last().unwrap();
        assert_eq!(path, "/kapis/version?a=1");
        assert!(headers.get("authorization").is_none(), "{headers:?}");
        assert!(headers.get("impersonate-user").is_none(), "{headers:?}");
        assert_eq!(headers["x-custom"], "kept");
    }
    // The port by name, and a trailing slash kept.
    let resp = c
        .get("/api/v1/namespaces/default/services/http:ks-apiserver:http/proxy/kapis/")
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(seen.lock().unwrap().last().unwrap().0, "/kapis/");

    let refused = [
        (
            "/api/v1/namespaces/default/services/ftp:ks-apiserver:80/proxy/",
            400,
            "invalid service request \"ftp:ks-apiserver:80\"",
        ),
        (
            "/api/v1/namespaces/default/services/:ks-apiserver:81/proxy/",
            503,
            "no service port 81 found for service \"ks-apiserver\"",
        ),
        (
            "/api/v1/namespaces/default/services/ks-apiserver:metrics/proxy/",
            503,
            "no endpoints available for service \"ks-apiserver:metrics\"",
        ),
        (
            "/api/v1/namespaces/default/services/nope:80/proxy/",
            404,
            "services \"nope\" not found",
        ),
        (
            "/api/v1/namespaces/default/services/nope:http/proxy/",
            404,
            "endpoints \"nope\" not found",
        ),
    ];
    let before = seen.lock().unwrap().len();
    for (path, code, message) in refused {
        let resp = c.get(path).await;
        assert_eq!(resp.status(), code, "{path}");
        let status = body_json(resp).await;
        assert_eq!(status["message"], message, "{path}");
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "a refused request went through"
    );

    // Endpoints without subsets, then with an address that nothing listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    for (subsets, message) in [
        (
            json!([]),
            "no endpoints available for service \"ks-apiserver\"".to_owned(),
        ),
        (
            json!([{"addresses": [{"ip": "127.0.0.1"}], "ports": [{"name": "http", "port": closed}]}]),
            format!("error trying to reach service: dial tcp 127.0.0.1:{closed}"),
        ),
    ] {
        let resp = c
            .patch(
                "/api/v1/namespaces/default/endpoints/ks-apiserver",
                "application/merge-patch+json",
                &json!({"subsets": subsets}).to_string(),
            )
            .await;
        assert_eq!(resp.status(), 200);
        let resp = c
            .get("/api/v1/namespaces/default/services/:ks-apiserver:80/proxy/kapis/version")
            .await;
        assert_eq!(resp.status(), 503);
        let status = body_json(resp).await;
        let said = status["message"].as_str().unwrap();
        assert!(said.starts_with(&message), "{said}");
    }
}
