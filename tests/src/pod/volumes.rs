//! The files of a pod's volumes, as the kubelet's volume plugins write them
//! (pkg/volume/secret, configmap, projected, downwardapi, emptydir;
//! pkg/volume/util/atomic_writer.go; pkg/volume/volume_linux.go `SetVolumeOwnership`).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{ConfigMap, Container, KeyToPath, PodSpec, Secret, Volume};

use super::env::field_value;
use super::{Identity, Kubelet, PodMeta, TOKEN_EXPIRATION_SECONDS, make_dir};

impl Kubelet {
    /// Writes every volume the container mounts; returns what to mount where.
    pub(super) fn volumes(
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
}

/// A volume directory and where it is mounted.
#[derive(Debug)]
pub(super) struct Mount {
    pub(super) source: PathBuf,
    pub(super) target: PathBuf,
    pub(super) read_only: bool,
}

/// One file of a volume.
#[derive(Debug)]
struct VolumeFile {
    path: String,
    data: Vec<u8>,
    mode: i32,
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
