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
        Resource::Nodes => json!([
            name,
            column("Status", "string", "", 0, "The status of the node"),
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
        // printers.go's endpointColumnDefinitions: NAME, ENDPOINTS, AGE.
        Resource::Endpoints => json!([
            name,
            column(
                "Endpoints",
                "string",
                "",
                0,
                "The set of all endpoints is the union of all subsets."
            ),
            age
        ]),
        Resource::Services => json!([
            name,
            column(
                "Type",
                "string",
                "",
                0,
                "type determines how the Service is exposed."
            ),
            column(
                "Cluster-IP",
                "string",
                "",
                0,
                "clusterIP is the IP address of the service."
            ),
            column(
                "External-IP",
                "string",
                "",
                0,
                "The list of external IPs of the service, or the load balancer's ingress points."
            ),
            column(
                "Port(s)",
                "string",
                "",
                0,
                "The list of ports that are exposed by this service."
            ),
            age,
            column(
                "Selector",
                "string",
                "",
                1,
                "Route service traffic to pods with label keys and values matching this selector."
            ),
        ]),
        // A custom resource without additionalPrinterColumns: name and age.
        Resource::Users => json!([name, age]),
        // Like a custom resource's additionalPrinterColumns.
        Resource::Clusters => json!([
            name,
            column(
                "Connection",
                "string",
                "",
                0,
                "How the member cluster is reached (spec.connection.type)."
            ),
            column(
                "Ready",
                "string",
                "",
                0,
                "The status of the cluster's Ready condition."
            ),
            column(
                "Age",
                "date",
                "",
                0,
                "Custom resource definition column (in JSONPath format): .metadata.creationTimestamp"
            ),
        ]),
        Resource::Secrets => json!([
            name,
            column("Type", "string", "", 0, "The type of the secret"),
            column("Data", "string", "", 0, "The number of data items"),
            age
        ]),
        Resource::ServiceAccounts => json!([
            name,
            column("Secrets", "string", "", 0, "The number of secrets listed"),
            age
        ]),
        Resource::ClusterRoles | Resource::Roles => json!([
            name,
            column(
                "Created At",
                "string",
                "",
                0,
                "Time at which the object was created"
            ),
        ]),
        Resource::ClusterRoleBindings | Resource::RoleBindings => json!([
            name,
            column("Role", "string", "", 0, "Role referenced by the binding"),
            age,
            column("Users", "string", "", 1, "Users in the binding"),
            column("Groups", "string", "", 1, "Groups in the binding"),
            column(
                "ServiceAccounts",
                "string",
                "",
                1,
                "ServiceAccounts in the binding"
            ),
        ]),
        // kubectl's printers (pkg/printers/internalversion/printers.go): NAME, POD-SELECTOR, AGE.
        Resource::NetworkPolicies => json!([
            name,
            column(
                "Pod-Selector",
                "string",
                "",
                0,
                "The pods this policy selects"
            ),
            age
        ]),
        Resource::PodDisruptionBudgets => json!([
            name,
            column(
                "Min Available",
                "string",
                "",
                0,
                "The minimum number of pods that must be available."
            ),
            column(
                "Max Unavailable",
                "string",
                "",
                0,
                "The maximum number of pods that may be unavailable."
            ),
            column(
                "Allowed Disruptions",
                "integer",
                "",
                0,
                "Calculated number of pods that may be disrupted at this time."
            ),
            age,
        ]),
        Resource::Deployments => json!([
            name,
            column(
                "Replicas",
                "integer",
                "",
                0,
                "Desired pods (spec.replicas)."
            ),
            column(
                "Ready",
                "integer",
                "",
                0,
                "Ready pods (status.readyReplicas)."
            ),
            age,
        ]),
    }
}

/// `EXTERNAL-IP` as kubectl prints it: load balancer ingress (or `<pending>`), external IPs,
/// or the external name.
fn service_external_ip(object: &Value) -> String {
    let spec = &object["spec"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let external_ips = strings(&spec["externalIPs"]);
    match spec["type"].as_str().unwrap_or("ClusterIP") {
        "LoadBalancer" => {
            let mut ips: Vec<String> = object["status"]["loadBalancer"]["ingress"]
                .as_array()
                .map(|ingress| {
                    ingress
                        .iter()
                        .filter_map(|i| i["ip"].as_str().or_else(|| i["hostname"].as_str()))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            ips.extend(external_ips);
            if ips.is_empty() {
                "<pending>".to_owned()
            } else {
                ips.join(",")
            }
        }
        "ExternalName" => spec["externalName"].as_str().unwrap_or("").to_owned(),
        _ if external_ips.is_empty() => "<none>".to_owned(),
        _ => external_ips.join(","),
    }
}

/// `PORT(S)`: `80/TCP`, or `80:31234/TCP` with a node port.
fn service_ports(object: &Value) -> String {
    let ports: Vec<String> = object["spec"]["ports"]
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .map(|p| {
                    let port = p["port"].as_i64().unwrap_or(0);
                    let protocol = p["protocol"].as_str().unwrap_or("TCP");
                    match p["nodePort"].as_i64().filter(|n| *n > 0) {
                        Some(node_port) => format!("{port}:{node_port}/{protocol}"),
                        None => format!("{port}/{protocol}"),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    if ports.is_empty() {
        "<none>".to_owned()
    } else {
        ports.join(",")
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
        Resource::Nodes => json!([name, "Ready", age]),
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
        Resource::Endpoints => json!([name, endpoints_cell(object), age]),
        Resource::Services => {
            let spec = &object["spec"];
            let selector = spec["selector"]
                .as_object()
                .filter(|s| !s.is_empty())
                .map_or_else(
                    || "<none>".to_owned(),
                    |s| {
                        s.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                );
            json!([
                name,
                spec["type"].as_str().unwrap_or("ClusterIP"),
                spec["clusterIP"]
                    .as_str()
                    .filter(|ip| !ip.is_empty())
                    .unwrap_or("<none>"),
                service_external_ip(object),
                service_ports(object),
                age,
                selector,
            ])
        }
        Resource::Users => json!([name, age]),
        Resource::Clusters => {
            // A custom resource's cells: the raw value, or null when the path is missing.
            let ready = object["status"]["conditions"].as_array().and_then(|cs| {
                cs.iter()
                    .find(|c| c["type"] == "Ready")
                    .map(|c| c["status"].clone())
            });
            json!([name, object["spec"]["connection"]["type"], ready, age,])
        }
        Resource::Secrets => {
            let data = object["data"].as_object().map_or(0, |d| d.len());
            json!([
                name,
                object["type"].as_str().unwrap_or("Opaque"),
                data.to_string(),
                age
            ])
        }
        Resource::ServiceAccounts => {
            let secrets = object["secrets"].as_array().map_or(0, Vec::len);
            json!([name, secrets.to_string(), age])
        }
        Resource::ClusterRoles | Resource::Roles => {
            json!([name, meta["creationTimestamp"].as_str().unwrap_or("")])
        }
        Resource::ClusterRoleBindings | Resource::RoleBindings => {
            let role = format!(
                "{}/{}",
                object["roleRef"]["kind"].as_str().unwrap_or(""),
                object["roleRef"]["name"].as_str().unwrap_or("")
            );
            let subjects = |kind: &str| {
                object["subjects"]
                    .as_array()
                    .map(|subjects| {
                        subjects
                            .iter()
                            .filter(|s| s["kind"] == kind)
                            .map(|s| match (kind, s["namespace"].as_str()) {
                                ("ServiceAccount", Some(ns)) => {
                                    format!("{ns}/{}", s["name"].as_str().unwrap_or(""))
                                }
                                _ => s["name"].as_str().unwrap_or("").to_owned(),
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            };
            json!([
                name,
                role,
                age,
                subjects("User"),
                subjects("Group"),
                subjects("ServiceAccount")
            ])
        }
        Resource::NetworkPolicies => {
            let labels = object["spec"]["podSelector"]["matchLabels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "<none>".to_owned());
            json!([name, labels, age])
        }
        Resource::PodDisruptionBudgets => {
            let text = |v: &Value| match v {
                Value::Null => "N/A".to_owned(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            json!([
                name,
                text(&object["spec"]["minAvailable"]),
                text(&object["spec"]["maxUnavailable"]),
                object["status"]["disruptionsAllowed"].as_i64().unwrap_or(0),
                age
            ])
        }
        Resource::Deployments => json!([
            name,
            object["spec"]["replicas"],
            object["status"]["readyReplicas"],
            age,
        ]),
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

/// An Endpoints' cell, as printers.go's `formatEndpoints`: `ip:port` for each port and
/// address of each subset (the address alone where a subset has no ports), the first three,
/// then ` + N more...`.
fn endpoints_cell(object: &Value) -> String {
    const MAX: usize = 3;
    let mut list = Vec::new();
    let mut count = 0;
    for subset in object["subsets"].as_array().into_iter().flatten() {
        let ips: Vec<&str> = subset["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["ip"].as_str())
            .collect();
        let ports: Vec<Option<i64>> = match subset["ports"].as_array() {
            Some(ports) if !ports.is_empty() => ports.iter().map(|p| p["port"].as_i64()).collect(),
            _ => vec![None],
        };
        for port in ports {
            count += ips.len();
            for ip in &ips {
                if list.len() < MAX {
                    list.push(match port {
                        // net.JoinHostPort brackets an IPv6 address.
                        Some(p) if ip.contains(':') => format!("[{ip}]:{p}"),
                        Some(p) => format!("{ip}:{p}"),
                        None => (*ip).to_owned(),
                    });
                }
            }
        }
    }
    match list.len() {
        0 => "<none>".to_owned(),
        n if count > n => format!("{} + {} more...", list.join(","), count - n),
        _ => list.join(","),
    }
}

#[cfg(test)]
mod service_and_cluster_tests {
    use super::*;

    #[test]
    fn endpoints_rows_show_the_first_three_addresses_as_kubectl_does() {
        let cell = |subsets: Value| endpoints_cell(&json!({"subsets": subsets}));
        assert_eq!(cell(json!([])), "<none>");
        assert_eq!(
            cell(
                json!([{"addresses": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
                         "ports": [{"port": 9090}]}])
            ),
            "10.0.0.1:9090,[fd00::1]:9090"
        );
        assert_eq!(
            cell(
                json!([{"addresses": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}],
                         "ports": [{"name": "a", "port": 1}, {"name": "b", "port": 2}]},
                        {"addresses": [{"ip": "10.0.0.3"}]}])
            ),
            "10.0.0.1:1,10.0.0.2:1,10.0.0.1:2 + 2 more..."
        );
    }

    #[test]
    fn service_rows_show_ports_and_ingress() {
        let svc = json!({"metadata": {"name": "tower"},
                         "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.2",
                                  "ports": [{"port": 443, "nodePort": 30001, "protocol": "TCP"},
                                            {"port": 80, "protocol": "UDP"}],
                                  "selector": {"app": "tower"}},
                         "status": {"loadBalancer": {}}});
        let t = table(
            Resource::Services,
            std::slice::from_ref(&svc),
            "1",
            true,
            IncludeObject::None,
        );
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "tower",
                "LoadBalancer",
                "10.96.0.2",
                "<pending>",
                "443:30001/TCP,80/UDP",
                "<unknown>",
                "app=tower"
            ])
        );
        let mut with_ingress = svc;
        with_ingress["status"]["loadBalancer"]["ingress"] =
            json!([{"ip": "203.0.113.7"}, {"hostname": "lb.example"}]);
        assert_eq!(service_external_ip(&with_ingress), "203.0.113.7,lb.example");
        assert_eq!(
            service_external_ip(&json!({"spec": {"type": "ClusterIP"}})),
            "<none>"
        );
    }

    #[test]
    fn cluster_rows_are_raw_values() {
        let cluster = json!({"metadata": {"name": "member", "creationTimestamp": "2020-01-01T00:00:00Z"},
                             "spec": {"connection": {"type": "proxy"}},
                             "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        let t = table(
            Resource::Clusters,
            &[cluster],
            "1",
            true,
            IncludeObject::None,
        );
        assert_eq!(
            t["rows"][0]["cells"],
            json!([
                "member",
                "proxy",
                "True",
                clock::age("2020-01-01T00:00:00Z")
            ])
        );
        let bare = json!({"metadata": {"name": "bare"}});
        let t = table(Resource::Clusters, &[bare], "1", false, IncludeObject::None);
        assert_eq!(
            t["rows"][0]["cells"],
            json!(["bare", null, null, "<unknown>"])
        );
    }
}
