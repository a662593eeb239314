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
//! - **Resources** (pkg/kubelet/cm/helpers_linux.go): `limits.cpu` and `limits.memory`
//!   applied through a cgroup of the container's own (`limits`), so that Tower's binaries
//!   size their runtime from the CPU quota as they do in a real pod.
//!
//! Beside this file: the image (`image`), the environment (`env`), the volumes' files
//! (`volumes`), resource limits (`limits`) and Pod Security admission ([`security`]).
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
//! requests; seccomp (but Pod Security admission checks that it is asked for); `subPath`,
//! `envFrom`, and other volume types (refused).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Output};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, Namespace, PodSpec, PodTemplateSpec, Probe, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;

use crate::{Process, TempDir};

mod env;
mod image;
mod limits;
pub mod security;
mod volumes;

use env::expand;
pub use image::{FinalStage, Image};

/// `limits.memory` in bytes of the first container of the Deployment `yaml` (one
/// document), as a kubelet would apply it; `None` when it sets none.
pub fn deployment_memory_limit(yaml: &str) -> Result<Option<u64>, String> {
    let deployment: k8s_openapi::api::apps::v1::Deployment =
        serde_yaml::from_str(yaml).map_err(|e| format!("a Deployment: {e}"))?;
    let container = deployment
        .spec
        .template
        .spec
        .and_then(|s| s.containers.into_iter().next())
        .ok_or("the Deployment has no container")?;
    Ok(limits::Limits::of(&container)?.memory)
}
use volumes::Mount;

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
        // Its own even when a test reuses a pod's name while another runs.
        let cgroup = limits::Cgroup::create(
            &format!("{}-{pod_name}-{}", meta.namespace, random_suffix()),
            limits::Limits::of(container)?,
        )?;
        let (env, expansion) = self.environment(&meta, &spec, container, overrides)?;
        let dir = TempDir::new("pod");
        let mounts = self.volumes(&meta, &spec, container, &identity, dir.path())?;
        let argv = self.argv(container, &expansion, overrides)?;
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
        let join = cgroup
            .as_ref()
            .map_or_else(String::new, limits::Cgroup::join_script);
        let script = setup_script(dir.path(), &join, &mounts, read_only_root, &runtime, &argv)?;
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
            cgroup,
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
    /// Removed once `process` is gone (fields drop in this order).
    cgroup: Option<limits::Cgroup>,
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

    /// Runs `argv` in the container (`kubectl exec`): same mounts, identity, environment
    /// and cgroup (as the runtime's exec joins the container's); `argv[0]` is a path in
    /// the image.
    pub fn exec(&self, argv: &[&str]) -> Output {
        let binary = self
            .runtime
            .in_pod(argv[0])
            .unwrap_or_else(|e| panic!("exec in pod {}: {e}", self.name));
        let join = self
            .cgroup
            .as_ref()
            .map_or_else(String::new, limits::Cgroup::join_script);
        let mut command = Command::new("/bin/sh");
        command
            .args([
                "-c",
                &format!("{join}exec \"$@\""),
                "sh",
                "/usr/bin/nsenter",
            ])
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

/// The shell script run in the new mount namespace: `prelude` (joining the container's
/// cgroup), mounts, then `exec setpriv … argv`.
fn setup_script(
    dir: &Path,
    prelude: &str,
    mounts: &[Mount],
    read_only_root: bool,
    runtime: &Runtime,
    argv: &[String],
) -> Result<String, String> {
    let mut script = format!("set -eu\n{prelude}");
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
