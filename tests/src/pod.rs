//! A kubelet for the tests: starts the container of a pod template taken from the
//! manifests Tower ships, the way a kubelet and its container runtime start it, so that a
//! mistake in those manifests (an unreadable Secret, a write to a read-only root, a missing
//! key) fails here as it would on a real node.
//!
//! What is modelled, and from where (kubernetes/kubernetes):
//! - **Admission** (plugin/pkg/admission/serviceaccount/admission.go): the pod's
//!   ServiceAccount must exist, else the pod is refused; unless `automountServiceAccountToken`
//!   is false (pod, then ServiceAccount), a projected `kube-api-access-*` volume (token from
//!   TokenRequest, `ca.crt` from ConfigMap `kube-root-ca.crt`, `namespace` from the downward
//!   API, defaultMode 0644) is mounted read-only at /var/run/secrets/kubernetes.io/serviceaccount.
//!   Then Pod Security admission at the level the namespace's
//!   `pod-security.kubernetes.io/enforce` label sets ([`security`]).
//! - **Environment** (pkg/kubelet/kubelet_pods.go `makeEnvironmentVariables`,
//!   pkg/kubelet/envvars/envvars.go): service-link variables for every Service of the
//!   namespace with a cluster IP unless `enableServiceLinks: false`; the master service's
//!   `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT` always; then `env` in order, with
//!   `$(VAR)` expansion, `value`, `fieldRef` and `configMapKeyRef`/`secretKeyRef` whose
//!   `optional` decides between an absent variable and CreateContainerConfigError.
//! - **Volumes** (pkg/volume/secret, configmap, projected, downwardapi, emptydir;
//!   pkg/volume/util/atomic_writer.go; pkg/volume/volume_linux.go `SetVolumeOwnership`):
//!   files written by root with `items`/`mode`/`defaultMode` (default 0644) under a
//!   timestamped `..DATE` directory behind a `..data` symlink; with a pod `fsGroup`, every
//!   file and directory is given that group and `mode | 0440` (read-only volumes) or
//!   `mode | 0660` (emptyDir), directories setgid and `+0110`; a projected service-account
//!   token is 0600 before that when an fsGroup is set (pkg/volume/projected/projected.go).
//!   Secret, ConfigMap, downward-API and projected volumes are mounted read-only. A missing
//!   Secret or ConfigMap that is not `optional` keeps the pod from starting.
//! - **Identity** (the CRI's runtime spec): `runAsUser`/`runAsGroup` (container over pod over
//!   the image's `USER`), supplementary groups `fsGroup` and `supplementalGroups`,
//!   `runAsNonRoot` refusing uid 0 (pkg/kubelet/kuberuntime/security_context_others.go
//!   `verifyRunAsNonRoot`), no new privileges, no capabilities, and a read-only root when
//!   `readOnlyRootFilesystem` is set (volume mounts keep their own mode).
//!
//! How: the container runs in a private mount namespace (`unshare --mount`), where each
//! volume is bind-mounted at its `mountPath` (a missing mount point is created on an
//! overlay of its nearest existing parent, so the machine's own directories are never
//! touched), every other mount is remounted read-only for `readOnlyRootFilesystem`, and
//! `setpriv` takes the identity. It needs root, as CI has. Pods share the machine's
//! network: only listen addresses may be remapped ([`Overrides`]).
//!
//! Not modelled: images (the [`Image`] maps an entrypoint path to a binary of this
//! workspace; Tower's is read from deploy/Containerfile's final stage, [`FinalStage`]);
//! probes run by a loop (tests call [`Pod::http_probe`] themselves; as pods share the
//! machine's network, it checks that a listen address the manifest writes for the probe's
//! port takes every address, where a kubelet would probe the pod's IP); restarts (an
//! exited container is reported by [`Pod::exit_code`], i.e. CrashLoopBackOff); resource
//! limits; seccomp (but Pod Security admission checks that it is asked for); `subPath`,
//! `envFrom`, and other volume types (refused).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, KeyToPath, Namespace, ObjectFieldSelector, PodSpec,
    PodTemplateSpec, Probe, Secret, Service, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;

use crate::{Process, TempDir, bin_path};

pub mod security;

/// Where ServiceAccount admission mounts the API credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The projected token's lifetime that admission asks for (admission.go).
const TOKEN_EXPIRATION_SECONDS: i64 = 3607;
/// Mount points under these stay as they are with a read-only root, as a runtime mounts
/// its own /proc, /sys and /dev.
const KERNEL_MOUNTS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// One API server as the kubelet of its nodes sees it.
#[derive(Debug, Clone)]
pub struct ApiServer {
    /// A kubeconfig whose credential may read Secrets, ConfigMaps, Services and
    /// ServiceAccounts and request tokens (the node's credential).
    pub kubeconfig: PathBuf,
    /// What pods get as `KUBERNETES_SERVICE_HOST`.
    pub service_host: String,
    /// What pods get as `KUBERNETES_SERVICE_PORT`.
    pub service_port: u16,
    /// The cluster CA, for `ca.crt` when the namespace has no `kube-root-ca.crt` ConfigMap.
    pub ca_pem: String,
}

impl ApiServer {
    /// A stand-in as its nodes see it: pods reach it at its own loopback address.
    pub fn stand_in(api: &tower_kube_stand_in::StandIn, kubeconfig: &Path) -> ApiServer {
        ApiServer {
            kubeconfig: kubeconfig.to_path_buf(),
            service_host: api.addr().ip().to_string(),
            service_port: api.addr().port(),
            ca_pem: api.ca_pem().to_owned(),
        }
    }
}

/// A container image: its user, entrypoint, command and the binaries it holds.
#[derive(Debug, Clone)]
pub struct Image {
    /// The image's `USER` (uid, gid).
    pub user: (u32, u32),
    /// `ENTRYPOINT`.
    pub entrypoint: Vec<String>,
    /// `CMD`.
    pub cmd: Vec<String>,
    /// `ENV`.
    pub env: Vec<(String, String)>,
    /// Path in the image → file on this machine; `None` runs command paths as they are on
    /// this machine (for tests of the harness itself with /bin/sh).
    files: Option<BTreeMap<String, PathBuf>>,
}

impl Image {
    /// Tower's image as deploy/Containerfile builds it: its final stage's `USER`,
    /// `ENTRYPOINT`, `CMD` and the files its `COPY` lines install (/tower-server,
    /// /tower-agent, and /agent, the agent again under the name KubeSphere's console
    /// Deployment runs), each mapped to the workspace binary of the same name. Read from
    /// the Containerfile itself, so a line taken out of it is taken out of the tests' image
    /// too. `ENV` is distroless's (the base image), which the Containerfile does not say.
    pub fn tower() -> Image {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Containerfile");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let stage = FinalStage::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Image {
            user: stage.user,
            entrypoint: stage.entrypoint,
            cmd: stage.cmd,
            env: vec![
                (
                    "PATH".into(),
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                ),
                (
                    "SSL_CERT_FILE".into(),
                    "/etc/ssl/certs/ca-certificates.crt".into(),
                ),
            ],
            files: Some(
                stage
                    .files
                    .into_iter()
                    .map(|(path, name)| (path, bin_path(&name)))
                    .collect(),
            ),
        }
    }

    /// An image whose commands are this machine's own (`/bin/sh`), run as `user`.
    pub fn host_tools(user: (u32, u32)) -> Image {
        Image {
            user,
            entrypoint: vec!["/bin/sh".into()],
            cmd: Vec::new(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            files: None,
        }
    }

    /// The file on this machine behind `path` in the image.
    fn resolve(&self, path: &str) -> Result<PathBuf, String> {
        match &self.files {
            None => Ok(PathBuf::from(path)),
            Some(files) => files.get(path).cloned().ok_or_else(|| {
                format!(
                    "exec: {path:?}: no such file or directory in the image (it has {:?})",
                    files.keys().collect::<Vec<_>>()
                )
            }),
        }
    }
}

/// What the final stage of a Containerfile makes of its image (the stages before it only
/// build what it copies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalStage {
    /// `USER uid:gid` (numeric; distroless has no /etc/passwd to resolve a name).
    pub user: (u32, u32),
    /// `ENTRYPOINT`, in exec (JSON) form.
    pub entrypoint: Vec<String>,
    /// `CMD`, in exec (JSON) form.
    pub cmd: Vec<String>,
    /// Path in the image → the file name `COPY --from=…` took it from (a binary the build
    /// stage put there under the name cargo gave it).
    pub files: BTreeMap<String, String>,
}

impl FinalStage {
    /// Reads the final stage of `containerfile`: line continuations joined, comments
    /// dropped; a `COPY` whose destination ends in `/` installs each source under its own
    /// name there, else its one source under the destination's. What it cannot model (a
    /// `COPY` from the build context, `ADD`, a user name, shell-form commands) is an error.
    pub fn parse(containerfile: &str) -> Result<FinalStage, String> {
        let mut instructions = Vec::new();
        let mut pending = String::new();
        for line in containerfile.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
                continue;
            }
            match trimmed.strip_suffix('\\') {
                Some(part) => {
                    pending.push_str(part);
                    pending.push(' ');
                }
                None => {
                    pending.push_str(trimmed);
                    instructions.push(std::mem::take(&mut pending));
                }
            }
        }
        let last_from = instructions
            .iter()
            .rposition(|i| keyword(i) == "FROM")
            .ok_or("no FROM")?;
        let mut stage = FinalStage {
            user: (0, 0),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            files: BTreeMap::new(),
        };
        for instruction in &instructions[last_from + 1..] {
            let rest = instruction[keyword(instruction).len()..].trim();
            match keyword(instruction).as_str() {
                "COPY" => stage.copy(rest)?,
                "ADD" => return Err(format!("ADD is not modelled: {instruction}")),
                "USER" => {
                    let (uid, gid) = rest.split_once(':').unwrap_or((rest, rest));
                    let id = |v: &str| {
                        v.parse::<u32>()
                            .map_err(|_| format!("USER {rest}: only numeric ids are modelled"))
                    };
                    stage.user = (id(uid)?, id(gid)?);
                }
                "ENTRYPOINT" => stage.entrypoint = exec_form(instruction, rest)?,
                "CMD" => stage.cmd = exec_form(instruction, rest)?,
                _ => {}
            }
        }
        Ok(stage)
    }

    fn copy(&mut self, args: &str) -> Result<(), String> {
        let words: Vec<&str> = args.split_whitespace().collect();
        if !words.iter().any(|w| w.starts_with("--from=")) {
            return Err(format!(
                "COPY {args}: only COPY --from=<stage> (a built binary) is modelled"
            ));
        }
        let paths: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
        let Some((dest, sources)) = paths.split_last().filter(|(_, s)| !s.is_empty()) else {
            return Err(format!("COPY {args}: no source and destination"));
        };
        for source in sources {
            let name = source.rsplit('/').next().unwrap_or(source).to_owned();
            let path = if dest.ends_with('/') {
                format!("{dest}{name}")
            } else if sources.len() == 1 {
                (*dest).to_owned()
            } else {
                return Err(format!(
                    "COPY {args}: several sources need a destination ending in /"
                ));
            };
            self.files.insert(path, name);
        }
        Ok(())
    }
}

/// An instruction's keyword, upper-cased.
fn keyword(instruction: &str) -> String {
    instruction
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

/// `["a", "b"]` as the words of a command; the shell form is an error.
fn exec_form(instruction: &str, rest: &str) -> Result<Vec<String>, String> {
    serde_json::from_str(rest)
        .map_err(|_| format!("{instruction}: only the exec (JSON) form is modelled"))
}

/// What a test may change in a pod: listen addresses only, since every pod shares the
/// machine's network and ports such as 8080 are not free here.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    replace: Vec<(String, String)>,
    env: Vec<(String, String)>,
}

impl Overrides {
    /// Replaces every argument or environment value equal to `from` (e.g. `0.0.0.0:9090`)
    /// with `to` (e.g. `127.0.0.1:0`).
    pub fn listen(mut self, from: &str, to: &str) -> Self {
        assert!(
            from.parse::<std::net::SocketAddr>().is_ok(),
            "only listen addresses may be remapped, not {from:?}"
        );
        self.replace.push((from.into(), to.into()));
        self
    }

    /// Sets a listen-address variable the manifest leaves to its default (e.g.
    /// `TOWER_TUNNEL_ADDR`, default `0.0.0.0:8080`).
    pub fn listen_env(mut self, name: &str, to: &str) -> Self {
        assert!(
            name.ends_with("_ADDR") && to.parse::<std::net::SocketAddr>().is_ok(),
            "only listen addresses may be remapped, not {name}={to}"
        );
        self.env.push((name.into(), to.into()));
        self
    }

    fn apply(&self, value: String) -> String {
        self.replace
            .iter()
            .find(|(from, _)| *from == value)
            .map_or(value, |(_, to)| to.clone())
    }
}

/// Starts pods against one API server.
#[derive(Debug)]
pub struct Kubelet {
    api: ApiServer,
    image: Image,
}

impl Kubelet {
    /// A kubelet for `api`'s nodes, whose pods all run `image`.
    pub fn new(api: ApiServer, image: Image) -> Kubelet {
        assert!(
            is_root(),
            "the pod runner needs root (mount namespaces and setpriv), as CI has"
        );
        Kubelet { api, image }
    }

    /// Starts the pod of Deployment `namespace/name` as read back from the API server (so
    /// what runs is what `kubectl create` stored, after defaulting).
    pub fn start_deployment(
        &self,
        namespace: &str,
        name: &str,
        overrides: &Overrides,
    ) -> Result<Pod, String> {
        let deployment: serde_json::Value = self
            .get(&["deployment", name], namespace)?
            .ok_or_else(|| format!("deployments.apps {name:?} not found"))?;
        let template: PodTemplateSpec =
            serde_json::from_value(deployment["spec"]["template"].clone())
                .map_err(|e| format!("deployment {namespace}/{name}: pod template: {e}"))?;
        let pod_name = format!("{name}-{}", random_suffix());
        self.start(namespace, &pod_name, &template, overrides)
    }

    /// Starts the first container of `template` as pod `namespace/pod_name`.
    pub fn start(
        &self,
        namespace: &str,
        pod_name: &str,
        template: &PodTemplateSpec,
        overrides: &Overrides,
    ) -> Result<Pod, String> {
        let mut spec = template
            .spec
            .clone()
            .ok_or("the pod template has no spec")?;
        let labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let meta = PodMeta {
            name: pod_name.to_owned(),
            namespace: namespace.to_owned(),
            labels,
            service_account: spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".into()),
        };
        self.admit(&meta, &mut spec)?;
        // Validating admission runs after the mutating ServiceAccount admission.
        let namespace: Option<Namespace> = self.get(&["namespace", namespace], namespace)?;
        let labels = namespace
            .and_then(|n| n.metadata.labels)
            .unwrap_or_default();
        security::admit(pod_name, &labels, &spec)?;
        let [container] = &spec.containers[..] else {
            return Err(format!(
                "the pod runner starts pods of one container; this one has {}",
                spec.containers.len()
            ));
        };
        let identity = Identity::of(&spec, container, &self.image)?;
        let env = self.environment(&meta, &spec, container, overrides)?;
        let dir = TempDir::new("pod");
        let mounts = self.volumes(&meta, &spec, container, &identity, dir.path())?;
        let argv = self.argv(container, &env, overrides)?;
        let read_only_root = container
            .security_context
            .as_ref()
            .and_then(|s| s.read_only_root_filesystem)
            .unwrap_or(false);
        let binaries = self
            .image
            .files
            .iter()
            .flatten()
            .map(|(path, binary)| {
                let name = path.trim_start_matches('/').replace('/', "_");
                let mount_point = dir.path().join(format!("image-{name}"));
                (path.clone(), (binary.clone(), mount_point))
            })
            .collect();
        let runtime = Runtime {
            identity,
            env,
            binaries,
            host_paths: self.image.files.is_none(),
        };
        let script = setup_script(dir.path(), &mounts, read_only_root, &runtime, &argv)?;
        let script_path = dir.path().join("start.sh");
        std::fs::write(&script_path, script).map_err(|e| e.to_string())?;
        let mut command = Command::new("/usr/bin/unshare");
        command
            .args(["--mount", "--propagation", "private", "--", "/bin/sh"])
            .arg(&script_path)
            .env_clear()
            .envs(runtime.env.iter().map(|(k, v)| (k, v)));
        let (process, stdout) = Process::spawn(command, dir.path().join("container.log"));
        Ok(Pod {
            name: meta.name,
            namespace: meta.namespace,
            spec,
            process,
            stdout: Some(stdout),
            runtime,
            _dir: dir,
        })
    }

    /// ServiceAccount admission: the account must exist; its token volume is added.
    fn admit(&self, meta: &PodMeta, spec: &mut PodSpec) -> Result<(), String> {
        let account: ServiceAccount = self
            .get(&["serviceaccount", &meta.service_account], &meta.namespace)?
            .ok_or_else(|| {
                format!(
                    "pods \"{}\" is forbidden: error looking up service account {}/{}: serviceaccount \"{}\" not found",
                    meta.name, meta.namespace, meta.service_account, meta.service_account
                )
            })?;
        let automount = spec
            .automount_service_account_token
            .or(account.automount_service_account_token)
            .unwrap_or(true);
        if !automount {
            return Ok(());
        }
        let volume_name = format!("kube-api-access-{}", random_suffix());
        let api_access: Volume = serde_json::from_value(serde_json::json!({
            "name": volume_name,
            "projected": {
                "defaultMode": 0o644,
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": TOKEN_EXPIRATION_SECONDS, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
                ],
            },
        }))
        .map_err(|e| e.to_string())?;
        spec.volumes.get_or_insert_with(Vec::new).push(api_access);
        for container in &mut spec.containers {
            container
                .volume_mounts
                .get_or_insert_with(Vec::new)
                .push(VolumeMount {
                    name: volume_name.clone(),
                    mount_path: SERVICE_ACCOUNT_DIR.into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                });
        }
        Ok(())
    }

    fn environment(
        &self,
        meta: &PodMeta,
        spec: &PodSpec,
        container: &Container,
        overrides: &Overrides,
    ) -> Result<Vec<(String, String)>, String> {
        if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
            return Err("envFrom is not modelled by the pod runner".into());
        }
        let mut env: Vec<(String, String)> = self.image.env.clone();
        env.push(("HOSTNAME".into(), meta.name.clone()));
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
        env.extend(services);
        for var in container.env.iter().flatten() {
            if let Some(value) = self.env_value(meta, var, &env)? {
                set(&mut env, &var.name, value);
            }
        }
        for (name, value) in &overrides.env {
            set(&mut env, name, value.clone());
        }
        Ok(env
            .into_iter()
            .map(|(k, v)| {
                let v = overrides.apply(v);
                (k, v)
            })
            .collect())
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

    /// Writes every volume the container mounts; returns what to mount where.
    fn volumes(
        &self,
        meta: &PodMeta,
        spec: &PodSpec,
        container: &Container,
        identity: &Identity,
        dir: &Path,
    ) -> Result<Vec<Mount>, String> {
        let volumes: BTreeMap<&str, &Volume> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| (v.name.as_str(), v))
            .collect();
        let fs_group = identity.fs_group;
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            if mount.sub_path.is_some() || mount.sub_path_expr.is_some() {
                return Err("subPath is not modelled by the pod runner".into());
            }
            let volume = volumes.get(mount.name.as_str()).ok_or_else(|| {
                format!("volumeMounts: {:?} names no volume of the pod", mount.name)
            })?;
            let root = dir.join("volumes").join(&volume.name);
            let read_only_volume = if volume.empty_dir.is_some() {
                make_dir(&root, 0o777)?;
                false
            } else {
                let files = self.volume_files(meta, volume, fs_group.is_some())?;
                write_atomic(&root, &files)?;
                true
            };
            if let Some(group) = fs_group {
                set_volume_ownership(&root, group, read_only_volume)?;
            }
            mounts.push(Mount {
                source: root,
                target: PathBuf::from(&mount.mount_path),
                read_only: read_only_volume || mount.read_only.unwrap_or(false),
            });
        }
        Ok(mounts)
    }

    /// The files of a Secret, ConfigMap, downward-API or projected volume.
    fn volume_files(
        &self,
        meta: &PodMeta,
        volume: &Volume,
        fs_group: bool,
    ) -> Result<Vec<VolumeFile>, String> {
        let failed = |e: String| {
            format!(
                "MountVolume.SetUp failed for volume \"{}\" : {e}",
                volume.name
            )
        };
        if let Some(source) = &volume.secret {
            let name = source.secret_name.clone().unwrap_or_default();
            let default_mode = source.default_mode.unwrap_or(0o644);
            return self
                .secret_files(
                    meta,
                    &name,
                    source.items.as_deref(),
                    default_mode,
                    source.optional,
                )
                .map_err(failed);
        }
        if let Some(source) = &volume.config_map {
            let default_mode = source.default_mode.unwrap_or(0o644);
            return self
                .config_map_files(
                    meta,
                    &source.name,
                    source.items.as_deref(),
                    default_mode,
                    source.optional,
                )
                .map_err(failed);
        }
        if let Some(source) = &volume.downward_api {
            let default_mode = source.default_mode.unwrap_or(0o644);
            return downward_files(meta, source.items.as_deref(), default_mode);
        }
        if let Some(projected) = &volume.projected {
            let default_mode = projected.default_mode.unwrap_or(0o644);
            let mut files = Vec::new();
            for source in projected.sources.iter().flatten() {
                if let Some(s) = &source.secret {
                    files.extend(
                        self.secret_files(
                            meta,
                            &s.name,
                            s.items.as_deref(),
                            default_mode,
                            s.optional,
                        )
                        .map_err(failed)?,
                    );
                } else if let Some(c) = &source.config_map {
                    files.extend(
                        self.config_map_files(
                            meta,
                            &c.name,
                            c.items.as_deref(),
                            default_mode,
                            c.optional,
                        )
                        .map_err(failed)?,
                    );
                } else if let Some(d) = &source.downward_api {
                    files.extend(downward_files(meta, d.items.as_deref(), default_mode)?);
                } else if let Some(t) = &source.service_account_token {
                    let token = self.token(meta, t.expiration_seconds).map_err(failed)?;
                    files.push(VolumeFile {
                        path: t.path.clone(),
                        data: token.into_bytes(),
                        // projected.go: 0600 when an fsGroup will widen it.
                        mode: if fs_group { 0o600 } else { default_mode },
                    });
                } else {
                    return Err(failed(
                        "this projected source is not modelled by the pod runner".into(),
                    ));
                }
            }
            return Ok(files);
        }
        Err(failed(
            "this volume type is not modelled by the pod runner".into(),
        ))
    }

    fn secret_files(
        &self,
        meta: &PodMeta,
        name: &str,
        items: Option<&[KeyToPath]>,
        default_mode: i32,
        optional: Option<bool>,
    ) -> Result<Vec<VolumeFile>, String> {
        let secret: Option<Secret> = self.get(&["secret", name], &meta.namespace)?;
        let optional = optional.unwrap_or(false);
        let data = match secret {
            Some(secret) => secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
            None if optional => BTreeMap::new(),
            None => return Err(format!("secret \"{name}\" not found")),
        };
        project(data, items, default_mode, optional, "secret", name)
    }

    fn config_map_files(
        &self,
        meta: &PodMeta,
        name: &str,
        items: Option<&[KeyToPath]>,
        default_mode: i32,
        optional: Option<bool>,
    ) -> Result<Vec<VolumeFile>, String> {
        let map: Option<ConfigMap> = self.get(&["configmap", name], &meta.namespace)?;
        let optional = optional.unwrap_or(false);
        let data: BTreeMap<String, Vec<u8>> = match map {
            Some(map) => map
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .chain(
                    map.binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                )
                .collect(),
            // The root CA publisher puts kube-root-ca.crt into every namespace; a stand-in
            // without that controller gets it from the cluster's CA.
            None if name == "kube-root-ca.crt" => {
                BTreeMap::from([("ca.crt".to_owned(), self.api.ca_pem.clone().into_bytes())])
            }
            None if optional => BTreeMap::new(),
            None => return Err(format!("configmap \"{name}\" not found")),
        };
        project(data, items, default_mode, optional, "configmap", name)
    }

    /// A token from TokenRequest (`kubectl create token`), as the kubelet asks for a
    /// projected token.
    fn token(&self, meta: &PodMeta, expiration: Option<i64>) -> Result<String, String> {
        let duration = format!("{}s", expiration.unwrap_or(TOKEN_EXPIRATION_SECONDS));
        let output = self.kubectl(&[
            "create",
            "token",
            &meta.service_account,
            "-n",
            &meta.namespace,
            "--duration",
            &duration,
        ])?;
        if !output.status.success() {
            return Err(format!(
                "requesting a token for serviceaccount {}/{}: {}",
                meta.namespace,
                meta.service_account,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// The container's command line: `command`/`args` over the image's entrypoint and
    /// cmd, `$(VAR)` expanded, the entrypoint resolved in the image.
    fn argv(
        &self,
        container: &Container,
        env: &[(String, String)],
        overrides: &Overrides,
    ) -> Result<Vec<String>, String> {
        let (command, args) = match (&container.command, &container.args) {
            (Some(command), Some(args)) => (command.clone(), args.clone()),
            (Some(command), None) => (command.clone(), Vec::new()),
            (None, Some(args)) => (self.image.entrypoint.clone(), args.clone()),
            (None, None) => (self.image.entrypoint.clone(), self.image.cmd.clone()),
        };
        let argv: Vec<String> = command
            .into_iter()
            .chain(args)
            .map(|a| overrides.apply(expand(&a, env)))
            .collect();
        let first = argv.first().ok_or("the container has no command")?;
        self.image.resolve(first)?;
        Ok(argv)
    }

    /// `kubectl get … -o json` as the node: `None` for NotFound.
    fn get<T: DeserializeOwned>(
        &self,
        what: &[&str],
        namespace: &str,
    ) -> Result<Option<T>, String> {
        let mut args = vec!["get"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-n", namespace, "-o", "json"]);
        let output = self.kubectl(&args)?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            if stderr.contains("(NotFound)") {
                return Ok(None);
            }
            return Err(format!("kubectl {}: {}", args.join(" "), stderr.trim()));
        }
        serde_json::from_slice(&output.stdout)
            .map(Some)
            .map_err(|e| format!("kubectl {}: {e}", args.join(" ")))
    }

    fn kubectl(&self, args: &[&str]) -> Result<Output, String> {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.api.kubeconfig)
            .args(args)
            .output()
            .map_err(|e| format!("running kubectl: {e}"))
    }
}

/// A running pod (its one container).
#[derive(Debug)]
pub struct Pod {
    /// The pod's name.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// The spec it runs, after admission.
    pub spec: PodSpec,
    process: Process,
    stdout: Option<ChildStdout>,
    runtime: Runtime,
    _dir: TempDir,
}

impl Pod {
    /// The container's first line on stdout, as JSON (Tower's binaries print their listen
    /// addresses there). Panics with the log when the container exits first.
    pub fn first_json_line(&mut self) -> serde_json::Value {
        let stdout = self.stdout.take().expect("the first line was read already");
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "pod {}: no JSON line on stdout ({e}: {line:?}); log:\n{}",
                self.name,
                self.log()
            )
        })
    }

    /// Waits up to `timeout` for the container to exit; returns its exit code and
    /// everything it wrote to stdout. Panics with the log on a timeout.
    pub fn wait_output(&mut self, timeout: std::time::Duration) -> (i32, String) {
        let process = &mut self.process;
        let log = self._dir.path().join("container.log");
        let code = crate::wait_for_with(
            &format!("pod {} to exit", self.name),
            timeout,
            || process.exited(),
            || std::fs::read_to_string(&log).unwrap_or_default(),
        );
        let mut stdout = String::new();
        if let Some(mut out) = self.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut out, &mut stdout);
        }
        (code, stdout)
    }

    /// The file [`Pod::log`] reads.
    pub fn log_file(&self) -> PathBuf {
        self._dir.path().join("container.log")
    }

    /// What the container wrote to stderr (and the runtime's own errors).
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The exit code once the container has exited (on a real node: CrashLoopBackOff).
    pub fn exit_code(&mut self) -> Option<i32> {
        self.process.exited()
    }

    /// Runs the container's `httpGet` probe (`readiness` or liveness) against `addr`, the
    /// address its probe port was remapped to: true for a status in 200..400 within the
    /// probe's `timeoutSeconds`, as kubelet; liveness fails only after `failureThreshold`
    /// failures in a row.
    pub fn http_probe(&self, readiness: bool, addr: std::net::SocketAddr) -> bool {
        let container = &self.spec.containers[0];
        let probe: &Probe = if readiness {
            container.readiness_probe.as_ref()
        } else {
            container.liveness_probe.as_ref()
        }
        .expect("the container has that probe");
        let get = probe.http_get.as_ref().expect("an httpGet probe");
        if let IntOrString::Int(port) = &get.port {
            let declared = container
                .ports
                .iter()
                .flatten()
                .any(|p| p.container_port == *port);
            assert!(declared, "probe port {port} is not a container port");
            // A kubelet probes the pod's IP (pkg/probe/http/request.go, `GetProbeUrl`): a
            // listen address for the port in the manifest must take every address. Pods
            // here share the machine's loopback, so the probe itself could not tell.
            let written = container
                .args
                .iter()
                .chain(container.command.iter())
                .flatten()
                .chain(
                    container
                        .env
                        .iter()
                        .flatten()
                        .filter_map(|e| e.value.as_ref()),
                )
                .filter_map(|value| value.parse::<std::net::SocketAddr>().ok())
                .filter(|listen| i32::from(listen.port()) == *port);
            for listen in written {
                assert!(
                    listen.ip().is_unspecified(),
                    "the container listens on {listen} for its probe port: a kubelet probing the pod's IP would fail"
                );
            }
        }
        let path = get.path.as_deref().unwrap_or("/");
        // The kubelet's client gives up after `timeoutSeconds` (default 1): a slower
        // answer is a failed probe (pkg/probe/http/http.go).
        let timeout = Duration::from_secs(
            probe
                .timeout_seconds
                .map_or(1, |s| s.max(1))
                .unsigned_abs()
                .into(),
        );
        let passes = || {
            let started = Instant::now();
            let (code, _) = crate::get_within(addr, path, None, timeout, timeout);
            (200..400).contains(&code) && started.elapsed() <= timeout
        };
        // A container is restarted only after `failureThreshold` (default 3) liveness
        // failures in a row; one readiness success makes it ready.
        let attempts = if readiness {
            1
        } else {
            probe.failure_threshold.map_or(3, |n| n.max(1))
        };
        (0..attempts).any(|_| passes())
    }

    /// Runs `argv` in the container (`kubectl exec`): same mounts, identity and
    /// environment; `argv[0]` is a path in the image.
    pub fn exec(&self, argv: &[&str]) -> Output {
        let binary = self
            .runtime
            .in_pod(argv[0])
            .unwrap_or_else(|e| panic!("exec in pod {}: {e}", self.name));
        let mut command = Command::new("/usr/bin/nsenter");
        command
            .arg("--target")
            .arg(self.process.pid().to_string())
            .args(["--mount", "--"])
            .args(self.runtime.identity.setpriv_args())
            .arg(&binary)
            .args(&argv[1..])
            .env_clear()
            .envs(self.runtime.env.iter().map(|(k, v)| (k, v)));
        command.output().expect("running nsenter")
    }

    /// The container's process id (on this machine).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends SIGTERM, as a kubelet stopping the pod.
    pub fn terminate(&self) {
        self.process.terminate();
    }
}

/// The pod's name, namespace and labels, for fieldRefs.
#[derive(Debug)]
struct PodMeta {
    name: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    service_account: String,
}

/// Who the container runs as.
#[derive(Debug, Clone)]
struct Identity {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    fs_group: Option<u32>,
}

impl Identity {
    fn of(spec: &PodSpec, container: &Container, image: &Image) -> Result<Identity, String> {
        let pod = spec.security_context.clone().unwrap_or_default();
        let own = container.security_context.clone().unwrap_or_default();
        let id = |v: Option<i64>, what: &str| -> Result<Option<u32>, String> {
            v.map(|v| u32::try_from(v).map_err(|_| format!("{what} {v} is out of range")))
                .transpose()
        };
        let uid = id(own.run_as_user.or(pod.run_as_user), "runAsUser")?.unwrap_or(image.user.0);
        let gid = id(own.run_as_group.or(pod.run_as_group), "runAsGroup")?.unwrap_or(image.user.1);
        let non_root = own.run_as_non_root.or(pod.run_as_non_root).unwrap_or(false);
        if non_root && uid == 0 {
            return Err(
                "CreateContainerConfigError: container has runAsNonRoot and image will run as root"
                    .into(),
            );
        }
        let fs_group = id(pod.fs_group, "fsGroup")?;
        let mut groups: Vec<u32> = fs_group.into_iter().collect();
        for g in pod.supplemental_groups.iter().flatten() {
            groups.extend(id(Some(*g), "supplementalGroups")?);
        }
        Ok(Identity {
            uid,
            gid,
            groups,
            fs_group,
        })
    }

    fn setpriv_args(&self) -> Vec<String> {
        let mut args = vec![
            "/usr/bin/setpriv".to_owned(),
            format!("--reuid={}", self.uid),
            format!("--regid={}", self.gid),
        ];
        if self.groups.is_empty() {
            args.push("--clear-groups".into());
        } else {
            let list: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            args.push(format!("--groups={}", list.join(",")));
        }
        args.extend(
            [
                "--no-new-privs",
                "--bounding-set=-all",
                "--inh-caps=-all",
                "--",
            ]
            .map(str::to_owned),
        );
        args
    }
}

/// What the container's processes get: identity, environment and the image's binaries.
#[derive(Debug, Clone)]
struct Runtime {
    identity: Identity,
    env: Vec<(String, String)>,
    /// (binary on this machine, the file in the pod's directory it is mounted on), by
    /// path in the image.
    binaries: BTreeMap<String, (PathBuf, PathBuf)>,
    /// Whether command paths are this machine's own ([`Image::host_tools`]).
    host_paths: bool,
}

impl Runtime {
    /// Where `path` of the image is inside the container's mount namespace.
    fn in_pod(&self, path: &str) -> Result<PathBuf, String> {
        if self.host_paths {
            return Ok(PathBuf::from(path));
        }
        self.binaries
            .get(path)
            .map(|(_, mount_point)| mount_point.clone())
            .ok_or_else(|| format!("exec: {path:?}: no such file or directory in the image"))
    }
}

/// A volume directory and where it is mounted.
#[derive(Debug)]
struct Mount {
    source: PathBuf,
    target: PathBuf,
    read_only: bool,
}

/// One file of a volume.
#[derive(Debug)]
struct VolumeFile {
    path: String,
    data: Vec<u8>,
    mode: i32,
}

/// The shell script run in the new mount namespace: mounts, then `exec setpriv … argv`.
fn setup_script(
    dir: &Path,
    mounts: &[Mount],
    read_only_root: bool,
    runtime: &Runtime,
    argv: &[String],
) -> Result<String, String> {
    let mut script = String::from("set -eu\n");
    let mut overlaid: BTreeSet<PathBuf> = BTreeSet::new();
    let mut sorted: Vec<&Mount> = mounts.iter().collect();
    sorted.sort_by_key(|m| m.target.components().count());
    for (n, mount) in sorted.iter().enumerate() {
        // The nearest existing ancestor, with symlinks resolved (/var/run → /run).
        let mut existing = mount.target.clone();
        let mut missing = Vec::new();
        while !existing.exists() {
            missing.push(
                existing
                    .file_name()
                    .ok_or("a mount path must be absolute")?
                    .to_owned(),
            );
            existing = existing
                .parent()
                .ok_or("a mount path must be absolute")?
                .to_path_buf();
        }
        let existing = existing.canonicalize().map_err(|e| e.to_string())?;
        if !missing.is_empty() && existing == Path::new("/") {
            return Err(format!(
                "mount point {} needs a new directory in / (the pod runner overlays only below it)",
                mount.target.display()
            ));
        }
        let target = missing
            .iter()
            .rev()
            .fold(existing.clone(), |p, c| p.join(c));
        let under_volume = mounts.iter().any(|m| existing.starts_with(&m.target));
        if !missing.is_empty() && !under_volume && !overlaid.iter().any(|o| existing.starts_with(o))
        {
            let upper = dir.join(format!("overlay-{n}/upper"));
            let work = dir.join(format!("overlay-{n}/work"));
            make_dir(&upper, 0o755)?;
            make_dir(&work, 0o755)?;
            script += &format!(
                "/usr/bin/mount -t overlay overlay -o {} {}\n",
                quote(&format!(
                    "lowerdir={},upperdir={},workdir={}",
                    existing.display(),
                    upper.display(),
                    work.display()
                )),
                quote_path(&existing)
            );
            overlaid.insert(existing);
        }
        script += &format!(
            "/usr/bin/mkdir -p {t}\n/usr/bin/mount --bind {s} {t}\n",
            s = quote_path(&mount.source),
            t = quote_path(&target)
        );
        if mount.read_only {
            script += &format!(
                "/usr/bin/mount -o remount,bind,ro {}\n",
                quote_path(&target)
            );
        }
    }
    // The image's binaries, bind-mounted on empty files of the pod's own directory, so
    // that no directory above the workspace's target dir need be searchable by the
    // container's user.
    for (binary, mount_point) in runtime.binaries.values() {
        std::fs::write(mount_point, b"").map_err(|e| e.to_string())?;
        script += &format!(
            "/usr/bin/mount --bind {} {}\n",
            quote_path(binary),
            quote_path(mount_point)
        );
    }
    if read_only_root {
        let keep: Vec<String> = mounts
            .iter()
            .filter(|m| !m.read_only)
            .map(|m| m.target.display().to_string())
            .collect();
        script += &format!(
            "for m in $(/usr/bin/awk '{{print $5}}' /proc/self/mountinfo); do\n  case \"$m\" in {}) continue;; esac\n  /usr/bin/mount -o remount,bind,ro \"$m\" || {{ echo \"pod runner: cannot remount $m read-only\" >&2; exit 1; }}\ndone\n",
            KERNEL_MOUNTS
                .iter()
                .map(|k| format!("{k}|{k}/*"))
                .chain(keep.iter().map(|k| quote(k)))
                .collect::<Vec<_>>()
                .join("|")
        );
    }
    script += "exec";
    for arg in runtime.identity.setpriv_args() {
        script += &format!(" {}", quote(&arg));
    }
    script += &format!(" {}", quote_path(&runtime.in_pod(&argv[0])?));
    for arg in &argv[1..] {
        script += &format!(" {}", quote(arg));
    }
    script += "\n";
    Ok(script)
}

/// Files of a Secret or ConfigMap: every key, or only `items` (a missing key is an error
/// unless the source is optional).
fn project(
    mut data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: i32,
    optional: bool,
    kind: &str,
    name: &str,
) -> Result<Vec<VolumeFile>, String> {
    let Some(items) = items else {
        return Ok(data
            .into_iter()
            .map(|(path, data)| VolumeFile {
                path,
                data,
                mode: default_mode,
            })
            .collect());
    };
    let mut files = Vec::new();
    for item in items {
        match data.remove(&item.key) {
            Some(bytes) => files.push(VolumeFile {
                path: item.path.clone(),
                data: bytes,
                mode: item.mode.unwrap_or(default_mode),
            }),
            None if optional => {}
            None => {
                return Err(format!(
                    "configured to use key {} of {kind} {name}, which does not exist",
                    item.key
                ));
            }
        }
    }
    Ok(files)
}

/// AtomicWriter's layout: files in `..DATE/`, `..data` → it, each top-level name →
/// `..data/NAME`. Written by root: owner root:root.
fn write_atomic(root: &Path, files: &[VolumeFile]) -> Result<(), String> {
    make_dir(root, 0o777)?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let data_dir_name = format!("..{stamp}");
    let data_dir = root.join(&data_dir_name);
    make_dir(&data_dir, 0o755)?;
    let mut tops = BTreeSet::new();
    for file in files {
        let relative = Path::new(&file.path);
        if relative.is_absolute()
            || relative
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!("invalid volume file path {:?}", file.path));
        }
        let path = data_dir.join(relative);
        if let Some(parent) = path.parent() {
            make_dir(parent, 0o755)?;
        }
        std::fs::write(&path, &file.data).map_err(|e| format!("{}: {e}", path.display()))?;
        let mode = u32::try_from(file.mode).map_err(|_| format!("mode {}", file.mode))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| e.to_string())?;
        if let Some(std::path::Component::Normal(top)) = relative.components().next() {
            tops.insert(top.to_owned());
        }
    }
    std::os::unix::fs::symlink(&data_dir_name, root.join("..data")).map_err(|e| e.to_string())?;
    for top in tops {
        std::os::unix::fs::symlink(Path::new("..data").join(&top), root.join(&top))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `SetVolumeOwnership`: group `fs_group` and `mode | 0440` (read-only volumes) or
/// `| 0660`, directories also setgid and `+0110`; symlinks are left alone.
fn set_volume_ownership(root: &Path, fs_group: u32, read_only: bool) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(root).map_err(|e| e.to_string())?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    std::os::unix::fs::chown(root, None, Some(fs_group)).map_err(|e| e.to_string())?;
    let mut mask = if read_only { 0o440 } else { 0o660 };
    if meta.is_dir() {
        mask |= 0o2000 | 0o110;
    }
    let mode = meta.permissions().mode() | mask;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode))
        .map_err(|e| e.to_string())?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(root).map_err(|e| e.to_string())? {
            let entry = entry.map_err(|e| e.to_string())?;
            set_volume_ownership(&entry.path(), fs_group, read_only)?;
        }
    }
    Ok(())
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

/// The files of downward-API `items` (fieldRef only).
fn downward_files(
    meta: &PodMeta,
    items: Option<&[k8s_openapi::api::core::v1::DownwardAPIVolumeFile]>,
    default_mode: i32,
) -> Result<Vec<VolumeFile>, String> {
    items
        .into_iter()
        .flatten()
        .map(|item| {
            let field = item
                .field_ref
                .as_ref()
                .ok_or("downwardAPI: only fieldRef is modelled")?;
            Ok(VolumeFile {
                path: item.path.clone(),
                data: field_value(meta, field)?.into_bytes(),
                mode: item.mode.unwrap_or(default_mode),
            })
        })
        .collect()
}

/// A `fieldRef`'s value (the fields the downward API offers that the runner knows).
fn field_value(meta: &PodMeta, field: &ObjectFieldSelector) -> Result<String, String> {
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
fn expand(input: &str, env: &[(String, String)]) -> String {
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

fn make_dir(path: &Path, mode: u32) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn quote_path(p: &Path) -> String {
    quote(&p.display().to_string())
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_final_stage_of_a_containerfile_gives_the_images_files_user_and_command() {
        let text = "FROM rust AS build\nCOPY . .\nRUN cargo build \\\n  --release\n\
                    # a comment\nFROM distroless\n\
                    COPY --from=build /out/tower-server \\\n     /out/tower-agent /\n\
                    COPY --from=build /out/tower-agent /agent\n\
                    USER 65532:65532\nENTRYPOINT [\"/tower-server\"]\nCMD [\"serve\"]\n";
        let stage = FinalStage::parse(text).unwrap();
        assert_eq!(
            stage,
            FinalStage {
                user: (65532, 65532),
                entrypoint: vec!["/tower-server".into()],
                cmd: vec!["serve".into()],
                files: BTreeMap::from([
                    ("/agent".into(), "tower-agent".into()),
                    ("/tower-agent".into(), "tower-agent".into()),
                    ("/tower-server".into(), "tower-server".into()),
                ]),
            }
        );
        // Without the /agent line, the image has no /agent.
        let without = text.replace("COPY --from=build /out/tower-agent /agent\n", "");
        assert!(
            !FinalStage::parse(&without)
                .unwrap()
                .files
                .contains_key("/agent")
        );
        // What is not modelled is said, not guessed.
        for (bad, says) in [
            ("FROM x\nCOPY agent /agent\n", "only COPY --from"),
            ("FROM x\nCOPY --from=b /a /b /c\n", "ending in /"),
            ("FROM x\nUSER nonroot\n", "numeric"),
            ("FROM x\nCMD serve\n", "exec (JSON) form"),
            ("COPY --from=b /a /\n", "no FROM"),
        ] {
            let error = FinalStage::parse(bad).unwrap_err();
            assert!(error.contains(says), "{bad:?}: {error}");
        }
    }

    #[test]
    fn the_shipped_containerfile_installs_the_agent_as_agent_for_the_consoles_deployment() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Containerfile");
        let stage = FinalStage::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(
            stage.files.get("/agent").map(String::as_str),
            Some("tower-agent")
        );
        assert_eq!(stage.entrypoint, ["/tower-server"]);
        assert_eq!(stage.user, (65532, 65532));
    }

    #[test]
    fn the_image_is_a_glibc_build_on_debian_13_in_both_stages() {
        // Not musl, whose allocator doubled the server's CPU per GiB (BENCHMARKS.md); and
        // Debian 13's glibc, not 12's, whose memcpy is slow on AMD Zen (the Containerfile
        // says why), in both stages, so that the binaries need no newer glibc than the
        // runtime stage has.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Containerfile");
        let text = std::fs::read_to_string(path).unwrap();
        let instructions: Vec<&str> = text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .collect();
        assert!(
            !instructions.iter().any(|line| line.contains("musl")),
            "the image builds for musl"
        );
        let stages: Vec<&str> = instructions
            .iter()
            .copied()
            .filter(|line| line.starts_with("FROM "))
            .collect();
        assert_eq!(
            stages,
            [
                "FROM rust:1-trixie AS build",
                "FROM gcr.io/distroless/cc-debian13:nonroot"
            ]
        );
    }
}
