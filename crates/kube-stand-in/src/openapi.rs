//! The OpenAPI documents kubectl fetches.
//!
//! kubectl 1.32 validates `create`/`replace`/`apply -f` server-side when the OpenAPI v3
//! document says the PATCH operation of the object's kind takes the `fieldValidation` query
//! parameter; otherwise it falls back to client-side validation, which needs the full
//! protobuf OpenAPI v2 schema. So `/openapi/v3/api/v1` and
//! `/openapi/v3/apis/cluster.kubesphere.io/v1alpha1` declare exactly that (and the stand-in
//! accepts and ignores `fieldValidation`), and `/openapi/v2` is not served (404).
//! The PATCH operations list no strategic-merge-patch body, so `kubectl apply` computes its
//! strategic merge patch from the types compiled into kubectl instead of from a schema.

use serde_json::{Value, json};

use crate::store::Resource;

/// The `hash` kubectl echoes back when it fetches the group-version document.
const HASH: &str = "5354414e442d494e";

/// The group-versions with a document, as `/openapi/v3` names them (`api/v1`,
/// `apis/{group}/{version}`), each with its `apiVersion`.
fn group_versions() -> Vec<(String, &'static str)> {
    let mut gvs: Vec<&'static str> = Resource::ALL
        .into_iter()
        .map(Resource::api_version)
        .collect();
    gvs.sort_unstable();
    gvs.dedup();
    gvs.into_iter()
        .map(|gv| {
            let path = if gv.contains('/') {
                format!("apis/{gv}")
            } else {
                format!("api/{gv}")
            };
            (path, gv)
        })
        .collect()
}

/// `/openapi/v3`: where the document of each group-version lives.
pub(crate) fn v3_root() -> String {
    let paths: serde_json::Map<String, Value> = group_versions()
        .into_iter()
        .map(|(path, _)| {
            let url = format!("/openapi/v3/{path}?hash={HASH}");
            (path, json!({"serverRelativeURL": url}))
        })
        .collect();
    json!({"paths": paths}).to_string()
}

/// `/openapi/v3/api/v1` or `/openapi/v3/apis/{group}/{version}` (`group_version` `v1` or
/// `group/version`): one path per object, with the PATCH operation's kind and parameters.
pub(crate) fn v3_group_version(group_version: &str) -> Option<String> {
    let prefix = if group_version.contains('/') {
        format!("/apis/{group_version}")
    } else {
        format!("/api/{group_version}")
    };
    let mut paths = serde_json::Map::new();
    for r in Resource::ALL
        .into_iter()
        .filter(|r| r.api_version() == group_version)
    {
        let path = if r.namespaced() {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.plural())
        } else {
            format!("{prefix}/{}/{{name}}", r.plural())
        };
        paths.insert(path, path_item(r));
    }
    if paths.is_empty() {
        return None;
    }
    Some(
        json!({
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "v1.32.0"},
            "paths": paths,
            "components": {"schemas": {}},
        })
        .to_string(),
    )
}

fn path_item(resource: Resource) -> Value {
    let kind = resource.kind();
    let gvk = json!({"group": resource.group(), "version": resource.version(), "kind": kind});
    // `CoreV1`, `ClusterKubesphereIoV1alpha1`: how the apiserver spells operation ids.
    let mut group_id: String = if resource.group().is_empty() {
        "Core".to_owned()
    } else {
        resource
            .group()
            .split('.')
            .map(|part| {
                let mut chars = part.chars();
                chars.next().map_or_else(String::new, |c| {
                    c.to_ascii_uppercase().to_string() + chars.as_str()
                })
            })
            .collect()
    };
    let mut version = resource.version().chars();
    if let Some(c) = version.next() {
        group_id.push(c.to_ascii_uppercase());
        group_id.push_str(version.as_str());
    }
    let scope = if resource.namespaced() {
        "Namespaced"
    } else {
        ""
    };
    let query = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
    let operation = |action: &str, id: &str| {
        json!({
            "operationId": format!("{id}{group_id}{scope}{kind}"),
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
        "application/apply-patch+yaml": {"schema": {"type": "object"}},
    }});
    json!({
        "put": operation("put", "replace"),
        "patch": patch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_version_has_a_document() {
        let root: Value = serde_json::from_str(&v3_root()).expect("json");
        assert!(root["paths"]["api/v1"]["serverRelativeURL"].is_string());
        assert!(
            root["paths"]["apis/cluster.kubesphere.io/v1alpha1"]["serverRelativeURL"].is_string()
        );
        let doc: Value =
            serde_json::from_str(&v3_group_version("cluster.kubesphere.io/v1alpha1").expect("doc"))
                .expect("json");
        let patch = &doc["paths"]["/apis/cluster.kubesphere.io/v1alpha1/clusters/{name}"]["patch"];
        assert_eq!(
            patch["operationId"],
            "patchClusterKubesphereIoV1alpha1Cluster"
        );
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["group"],
            "cluster.kubesphere.io"
        );
        let core: Value =
            serde_json::from_str(&v3_group_version("v1").expect("doc")).expect("json");
        assert_eq!(
            core["paths"]["/api/v1/namespaces/{namespace}/services/{name}"]["put"]["operationId"],
            "replaceCoreV1NamespacedService"
        );
        assert!(v3_group_version("batch/v1").is_none());
    }
}
