//! The OpenAPI documents kubectl fetches.
//!
//! kubectl 1.32 validates `create`/`replace`/`apply -f` server-side when the OpenAPI v3
//! document says the PATCH operation of the object's kind takes the `fieldValidation` query
//! parameter; otherwise it falls back to client-side validation, which needs the full
//! protobuf OpenAPI v2 schema. So `/openapi/v3/api/v1` declares exactly that (and the
//! stand-in accepts and ignores `fieldValidation`), and `/openapi/v2` is not served (404).
//! The PATCH operations list no strategic-merge-patch body, so `kubectl apply` computes its
//! strategic merge patch from the types compiled into kubectl instead of from a schema.

use serde_json::{Value, json};

/// The `hash` kubectl echoes back when it fetches the group-version document.
const HASH: &str = "5354414e442d494e";

/// `/openapi/v3`: where the document of each group-version lives.
pub(crate) fn v3_root() -> String {
    json!({"paths": {"api/v1": {"serverRelativeURL": format!("/openapi/v3/api/v1?hash={HASH}")}}})
        .to_string()
}

/// `/openapi/v3/api/v1`: one path per object, with the PATCH operation's kind and parameters.
pub(crate) fn v3_core() -> String {
    let mut paths = serde_json::Map::new();
    for (kind, path) in [
        ("Namespace", "/api/v1/namespaces/{name}"),
        ("Pod", "/api/v1/namespaces/{namespace}/pods/{name}"),
        (
            "ConfigMap",
            "/api/v1/namespaces/{namespace}/configmaps/{name}",
        ),
    ] {
        paths.insert(path.to_owned(), path_item(kind));
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": {}},
    })
    .to_string()
}

fn path_item(kind: &str) -> Value {
    let gvk = json!({"group": "", "version": "v1", "kind": kind});
    let query = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let operation = |action: &str, id: &str| {
        json!({
            "operationId": format!("{id}CoreV1{kind}"),
            "parameters": [query("dryRun"), query("fieldManager"), query("fieldValidation")],
            "responses": {"200": {"description": "OK"}},
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": gvk,
        })
    };
    let mut patch = operation("patch", "patch");
    patch["requestBody"] = json!({"content": {
        "application/merge-patch+json": {"schema": {"type": "object"}},
        "application/json-patch+json": {"schema": {"type": "object"}},
    }});
    json!({
        "put": operation("put", "replace"),
        "patch": patch,
    })
}
