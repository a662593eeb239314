//! Legacy (unaggregated) discovery documents: `/api/v1`, `/apis`, `/apis/{group}` and
//! `/apis/{group}/{version}`, all generated from [`Resource`].
//!
//! Aggregated discovery (`Accept: …;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList`) is
//! not implemented: the answer is always `Content-Type: application/json`, which client-go
//! (kubectl) takes as "no aggregated discovery here" and reads as the legacy document,
//! before fetching each group-version's resource list.

use serde_json::{Value, json};

use crate::review;
use crate::store::Resource;

/// Verbs of every served resource.
const VERBS: [&str; 7] = [
    "create", "delete", "get", "list", "patch", "update", "watch",
];
/// Verbs of a `status` subresource.
const STATUS_VERBS: [&str; 3] = ["get", "patch", "update"];

/// The non-core groups served, each with its one version.
fn groups() -> Vec<(&'static str, &'static str)> {
    let mut groups: Vec<(&str, &str)> = Resource::ALL
        .into_iter()
        .filter(|r| !r.group().is_empty())
        .map(|r| (r.group(), r.version()))
        .chain(review::RESOURCES.iter().map(|(g, v, _, _)| (*g, *v)))
        .collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

fn group_json(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"name": group, "versions": [gv], "preferredVersion": gv})
}

/// `/apis`: an `APIGroupList`.
pub(crate) fn api_group_list_json() -> String {
    let groups: Vec<Value> = groups()
        .into_iter()
        .map(|(g, v)| group_json(g, v))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}).to_string()
}

/// `/apis/{group}`: an `APIGroup`, if the group is served.
pub(crate) fn api_group_json(group: &str) -> Option<String> {
    let (group, version) = groups().into_iter().find(|(g, _)| *g == group)?;
    let mut doc = group_json(group, version);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    Some(doc.to_string())
}

/// The `storageVersionHash` a real apiserver reports for the built-in resources.
fn storage_version_hash(resource: Resource) -> Option<&'static str> {
    match resource {
        Resource::ConfigMaps => Some("qFsyl6wFWjQ="),
        Resource::Namespaces => Some("Q3oi5N2YM8M="),
        Resource::Pods => Some("xPOwRZ+Yhw8="),
        Resource::Services => Some("0/CO1lhkEBI="),
        Resource::Deployments => Some("8aSe+NMegvE="),
        // Not modelled: kubectl does not read it.
        _ => None,
    }
}

/// `/api/v1` or `/apis/{group}/{version}`: an `APIResourceList`, if the group-version is
/// served.
pub(crate) fn api_resources_json(group_version: &str) -> Option<String> {
    let mut resources = Vec::new();
    for r in Resource::ALL
        .into_iter()
        .filter(|r| r.api_version() == group_version)
    {
        let mut entry = json!({
            "name": r.plural(),
            "singularName": r.singular(),
            "namespaced": r.namespaced(),
            "kind": r.kind(),
            "verbs": VERBS,
        });
        if !r.short_names().is_empty() {
            entry["shortNames"] = json!(r.short_names());
        }
        if matches!(r, Resource::Pods | Resource::Services) {
            entry["categories"] = json!(["all"]);
        }
        if let Some(hash) = storage_version_hash(r) {
            entry["storageVersionHash"] = json!(hash);
        }
        resources.push(entry);
        let sub = |name: &str, kind: &str, verbs: &[&str]| {
            json!({"name": format!("{}/{name}", r.plural()), "singularName": "",
                   "namespaced": r.namespaced(), "kind": kind, "verbs": verbs})
        };
        if r == Resource::Pods {
            resources.push(sub("attach", "PodAttachOptions", &["create", "get"]));
            resources.push(sub("exec", "PodExecOptions", &["create", "get"]));
            resources.push(sub("log", "Pod", &["get"]));
            resources.push(sub(
                "portforward",
                "PodPortForwardOptions",
                &["create", "get"],
            ));
        }
        if r == Resource::Services {
            resources.push(sub(
                "proxy",
                "ServiceProxyOptions",
                &["create", "delete", "get", "patch", "update"],
            ));
        }
        if r == Resource::ServiceAccounts {
            let mut token = sub("token", "TokenRequest", &["create"]);
            token["group"] = json!("authentication.k8s.io");
            token["version"] = json!("v1");
            resources.push(token);
        }
        if r.has_status_subresource() {
            resources.push(sub("status", r.kind(), &STATUS_VERBS));
        }
    }
    for (group, version, plural, kind) in review::RESOURCES {
        if format!("{group}/{version}") == group_version {
            resources.push(
                json!({"name": plural, "singularName": "", "namespaced": false,
                                  "kind": kind, "verbs": ["create"]}),
            );
        }
    }
    if resources.is_empty() {
        return None;
    }
    Some(
        json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        })
        .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).expect("json")
    }

    #[test]
    fn the_kubesphere_group_is_discoverable() {
        let list = parse(&api_group_list_json());
        let kubesphere = list["groups"]
            .as_array()
            .and_then(|groups| groups.iter().find(|g| g["name"] == "cluster.kubesphere.io"))
            .expect("the kubesphere group is listed")
            .clone();
        assert_eq!(
            kubesphere["preferredVersion"]["groupVersion"],
            "cluster.kubesphere.io/v1alpha1"
        );
        let group = parse(&api_group_json("cluster.kubesphere.io").expect("served"));
        assert_eq!(group["kind"], "APIGroup");
        assert_eq!(group["versions"][0]["version"], "v1alpha1");
        assert!(api_group_json("batch").is_none());

        let resources =
            parse(&api_resources_json("cluster.kubesphere.io/v1alpha1").expect("served"));
        let names: Vec<&str> = resources["resources"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert_eq!(names, ["clusters", "clusters/status"]);
        assert_eq!(resources["resources"][0]["namespaced"], false);
        assert_eq!(resources["resources"][1]["verbs"], json!(STATUS_VERBS));
        assert!(api_resources_json("cluster.kubesphere.io/v1").is_none());
    }

    #[test]
    fn core_lists_services_and_their_status() {
        let core = parse(&api_resources_json("v1").expect("served"));
        let names: Vec<&str> = core["resources"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        assert_eq!(
            names,
            [
                "configmaps",
                "endpoints",
                "namespaces",
                "nodes",
                "pods",
                "pods/attach",
                "pods/exec",
                "pods/log",
                "pods/portforward",
                "secrets",
                "serviceaccounts",
                "serviceaccounts/token",
                "services",
                "services/proxy",
                "services/status"
            ]
        );
        let token = &core["resources"][11];
        assert_eq!(token["kind"], "TokenRequest");
        assert_eq!(token["group"], "authentication.k8s.io");
        assert_eq!(token["verbs"], json!(["create"]));
        let svc = &core["resources"][12];
        assert_eq!(svc["shortNames"], json!(["svc"]));
        assert_eq!(svc["namespaced"], true);
        let proxy = &core["resources"][13];
        assert_eq!(proxy["kind"], "ServiceProxyOptions");
        assert_eq!(
            proxy["verbs"],
            json!(["create", "delete", "get", "patch", "update"])
        );
    }
}
