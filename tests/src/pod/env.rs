//! A container's environment, as the kubelet makes it (pkg/kubelet/kubelet_pods.go
//! `makeEnvironmentVariables`, pkg/kubelet/envvars/envvars.go): service links, `env` in
//! order with `$(VAR)` expansion, and `valueFrom`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, ObjectFieldSelector, PodSpec, Secret, Service,
};

use super::{Kubelet, Overrides, PodMeta};

/// Environment variables, in order.
type Env = Vec<(String, String)>;

impl Kubelet {
    /// The container's environment, and what `$(VAR)` in its `env` values, command and
    /// args may name: the service links and the container's own `env`, not the image's
    /// `ENV` nor `HOSTNAME` (`makeEnvironmentVariables` expands with
    /// `expansion.MappingFuncFor(tmpEnv, serviceEnv)` and returns only those; the
    /// runtime adds the image's).
    pub(super) fn environment(
        &self,
        meta: &PodMeta,
        spec: &PodSpec,
        container: &Container,
        overrides: &Overrides,
    ) -> Result<(Env, Env), String> {
        if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
            return Err("envFrom is not modelled by the pod runner".into());
        }
        // Service links first: the container's own env overrides them (kubelet_pods.go).
        let mut services = BTreeMap::new();
        if spec.enable_service_links.unwrap_or(true) {
            let list: serde_json::Value = self
                .get(&["services"], &meta.namespace)?
                .ok_or("listing services failed")?;
            for item in list["items"].as_array().into_iter().flatten() {
                let service: Service =
                    serde_json::from_value(item.clone()).map_err(|e| e.to_string())?;
                services.extend(service_link_env(&service));
            }
        }
        services.insert(
            "KUBERNETES_SERVICE_HOST".into(),
            self.api.service_host.clone(),
        );
        services.insert(
            "KUBERNETES_SERVICE_PORT".into(),
            self.api.service_port.to_string(),
        );
        let mut kubelet: Env = services.into_iter().collect();
        for var in container.env.iter().flatten() {
            if let Some(value) = self.env_value(meta, var, &kubelet)? {
                set(&mut kubelet, &var.name, value);
            }
        }
        for (name, value) in &overrides.env {
            set(&mut kubelet, name, value.clone());
        }
        let kubelet: Env = kubelet
            .into_iter()
            .map(|(k, v)| (k, overrides.apply(v)))
            .collect();
        let mut env: Env = self
            .image
            .env
            .iter()
            .map(|(k, v)| (k.clone(), overrides.apply(v.clone())))
            .collect();
        env.push(("HOSTNAME".into(), meta.name.clone()));
        for (name, value) in &kubelet {
            set(&mut env, name, value.clone());
        }
        Ok((env, kubelet))
    }

    /// One `env` entry's value; `None` for an optional reference that is absent.
    fn env_value(
        &self,
        meta: &PodMeta,
        var: &EnvVar,
        env: &[(String, String)],
    ) -> Result<Option<String>, String> {
        let Some(from) = &var.value_from else {
            return Ok(Some(expand(var.value.as_deref().unwrap_or(""), env)));
        };
        if let Some(field) = &from.field_ref {
            return field_value(meta, field).map(Some);
        }
        if let Some(key_ref) = &from.config_map_key_ref {
            let optional = key_ref.optional.unwrap_or(false);
            let map: Option<ConfigMap> =
                self.get(&["configmap", &key_ref.name], &meta.namespace)?;
            let Some(map) = map else {
                return missing(
                    optional,
                    format!("configmap \"{}\" not found", key_ref.name),
                );
            };
            return match map.data.unwrap_or_default().remove(&key_ref.key) {
                Some(value) => Ok(Some(value)),
                None => missing(
                    optional,
                    format!(
                        "couldn't find key {} in ConfigMap {}/{}",
                        key_ref.key, meta.namespace, key_ref.name
                    ),
                ),
            };
        }
        if let Some(key_ref) = &from.secret_key_ref {
            let optional = key_ref.optional.unwrap_or(false);
            let secret: Option<Secret> = self.get(&["secret", &key_ref.name], &meta.namespace)?;
            let Some(secret) = secret else {
                return missing(optional, format!("secret \"{}\" not found", key_ref.name));
            };
            return match secret.data.unwrap_or_default().remove(&key_ref.key) {
                Some(value) => String::from_utf8(value.0)
                    .map(Some)
                    .map_err(|e| format!("secret {}: {e}", key_ref.name)),
                None => missing(
                    optional,
                    format!(
                        "couldn't find key {} in Secret {}/{}",
                        key_ref.key, meta.namespace, key_ref.name
                    ),
                ),
            };
        }
        Err(format!(
            "env {}: this valueFrom is not modelled by the pod runner",
            var.name
        ))
    }
}

/// envvars.go `FromServices`: for Service `my-svc` with a cluster IP, MY_SVC_SERVICE_HOST,
/// MY_SVC_SERVICE_PORT (first port), MY_SVC_SERVICE_PORT_<NAME> (named ports), and the
/// Docker-link variables MY_SVC_PORT, MY_SVC_PORT_<P>_<PROTO>[_PROTO|_PORT|_ADDR].
fn service_link_env(service: &Service) -> Vec<(String, String)> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let Some(ip) = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| !ip.is_empty() && *ip != "None")
    else {
        return Vec::new();
    };
    let name = service
        .metadata
        .name
        .as_deref()
        .unwrap_or_default()
        .to_uppercase()
        .replace('-', "_");
    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut env = vec![(format!("{name}_SERVICE_HOST"), ip.to_owned())];
    if let Some(first) = ports.first() {
        env.push((format!("{name}_SERVICE_PORT"), first.port.to_string()));
        let protocol = first.protocol.as_deref().unwrap_or("TCP").to_lowercase();
        env.push((
            format!("{name}_PORT"),
            format!("{protocol}://{ip}:{}", first.port),
        ));
    }
    for port in ports {
        if let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) {
            env.push((
                format!(
                    "{name}_SERVICE_PORT_{}",
                    port_name.to_uppercase().replace('-', "_")
                ),
                port.port.to_string(),
            ));
        }
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        let prefix = format!("{name}_PORT_{}_{}", port.port, protocol.to_uppercase());
        let url = format!("{}://{ip}:{}", protocol.to_lowercase(), port.port);
        env.push((prefix.clone(), url));
        env.push((format!("{prefix}_PROTO"), protocol.to_lowercase()));
        env.push((format!("{prefix}_PORT"), port.port.to_string()));
        env.push((format!("{prefix}_ADDR"), ip.to_owned()));
    }
    env
}

/// A `fieldRef`'s value (the fields the downward API offers that the runner knows).
pub(super) fn field_value(meta: &PodMeta, field: &ObjectFieldSelector) -> Result<String, String> {
    let path = field.field_path.as_str();
    if let Some(label) = path
        .strip_prefix("metadata.labels['")
        .and_then(|l| l.strip_suffix("']"))
    {
        return Ok(meta.labels.get(label).cloned().unwrap_or_default());
    }
    match path {
        "metadata.name" => Ok(meta.name.clone()),
        "metadata.namespace" => Ok(meta.namespace.clone()),
        "spec.serviceAccountName" => Ok(meta.service_account.clone()),
        "spec.nodeName" => Ok("stand-in-node".into()),
        "status.podIP" | "status.hostIP" => Ok("127.0.0.1".into()),
        other => Err(format!(
            "fieldRef {other:?} is not modelled by the pod runner"
        )),
    }
}

/// kubelet's `$(VAR)` expansion (third_party/forked/golang/expansion): a defined variable
/// is replaced, `$$` is a literal `$`, anything else stays as written.
pub(super) fn expand(input: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(end) => {
                    let name = &body[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, value)) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &body[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn missing(optional: bool, error: String) -> Result<Option<String>, String> {
    if optional {
        Ok(None)
    } else {
        Err(format!("CreateContainerConfigError: {error}"))
    }
}

fn set(env: &mut Vec<(String, String)>, name: &str, value: String) {
    env.retain(|(k, _)| k != name);
    env.push((name.to_owned(), value));
}
