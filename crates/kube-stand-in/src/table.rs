//! Server-side printing: `meta.k8s.io/v1` `Table` objects, which kubectl asks for
//! (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io,…`) when it prints columns.

use serde_json::{Value, json};

use crate::clock;
use crate::store::Resource;

/// What each row's `object` holds (`includeObject` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub(crate) fn from_query(value: Option<&str>) -> IncludeObject {
        match value {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// Whether an `Accept` header asks for a `Table`.
pub(crate) fn wants_table(accept: &str) -> bool {
    // The first acceptable type wins; kubectl puts the Table variants first.
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table") && first.contains("g=meta.k8s.io"))
}

fn column(name: &str, ty: &str, format: &str, priority: u8, description: &str) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
}

fn columns(resource: Resource) -> Value {
    let name = column(
        "Name",
        "string",
        "name",
        0,
        "Name must be unique within a namespace.",
    );
    let age = column(
        "Age",
        "string",
        "",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    );
    match resource {
        Resource::Namespaces => json!([
            name,
            column("Status", "string", "", 0, "The status of the namespace"),
            age
        ]),
        Resource::Pods => json!([
            name,
            column(
                "Ready",
                "string",
                "",
                0,
                "The aggregate readiness state of this pod for accepting traffic."
            ),
            column(
                "Status",
                "string",
                "",
                0,
                "The aggregate status of the containers in this pod."
            ),
            column(
                "Restarts",
                "string",
                "",
                0,
                "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted."
            ),
            age,
            column("IP", "string", "", 1, "IP address allocated to the pod."),
            column(
                "Node",
                "string",
                "",
                1,
                "Name of the node this pod is scheduled on."
            ),
        ]),
        Resource::ConfigMaps => json!([
            name,
            column(
                "Data",
                "integer",
                "",
                0,
                "Data contains the configuration data."
            ),
            age
        ]),
    }
}

fn cells(resource: Resource, object: &Value) -> Value {
    let meta = &object["metadata"];
    let name = meta["name"].as_str().unwrap_or("");
    let age = clock::age(meta["creationTimestamp"].as_str().unwrap_or(""));
    match resource {
        Resource::Namespaces => {
            json!([
                name,
                object["status"]["phase"].as_str().unwrap_or("Active"),
                age
            ])
        }
        Resource::Pods => {
            let containers = object["spec"]["containers"].as_array().map_or(0, Vec::len);
            let ready = object["status"]["containerStatuses"]
                .as_array()
                .map_or(0, |cs| cs.iter().filter(|c| c["ready"] == true).count());
            json!([
                name,
                format!("{ready}/{containers}"),
                object["status"]["phase"].as_str().unwrap_or("Pending"),
                "0",
                age,
                object["status"]["podIP"].as_str().unwrap_or("<none>"),
                object["spec"]["nodeName"].as_str().unwrap_or("<none>"),
            ])
        }
        Resource::ConfigMaps => {
            let data = object["data"].as_object().map_or(0, |d| d.len())
                + object["binaryData"].as_object().map_or(0, |d| d.len());
            json!([name, data, age])
        }
    }
}

/// A `Table` for `objects`; `with_columns` false leaves `columnDefinitions` empty, as the
/// apiserver does after the first event of a watch.
pub(crate) fn table(
    resource: Resource,
    objects: &[Value],
    resource_version: &str,
    with_columns: bool,
    include: IncludeObject,
) -> Value {
    let rows: Vec<Value> = objects
        .iter()
        .map(|object| {
            let mut row = json!({"cells": cells(resource, object)});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": object["metadata"],
                    });
                }
                IncludeObject::Object => row["object"] = object.clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": if with_columns { columns(resource) } else { json!([]) },
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_negotiation() {
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
        assert!(!wants_table("application/json, */*"));
    }

    #[test]
    fn pod_row() {
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": "2020-01-01T00:00:00Z"},
                         "spec": {"containers": [{"name": "a"}]},
                         "status": {"phase": "Running", "containerStatuses": [{"ready": true}]}});
        let t = table(Resource::Pods, &[pod], "7", true, IncludeObject::Metadata);
        assert_eq!(t["rows"][0]["cells"][1], "1/1");
        assert_eq!(t["rows"][0]["object"]["metadata"]["name"], "p");
        assert_eq!(t["columnDefinitions"].as_array().map(Vec::len), Some(7));
    }
}
