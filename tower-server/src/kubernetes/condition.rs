//! Writing one condition of a Cluster without losing anyone else's.
//!
//! A Cluster's conditions have several writers: every tower replica (`AgentAvailable`,
//! `AgentConflict`) and KubeSphere's cluster controller (`Ready`, `Federated`, …, each
//! sync an `Update` of the whole Cluster with the resourceVersion it read:
//! kubesphere/kubesphere `pkg/controller/cluster/cluster_controller.go`, `syncCluster`).
//! A merge patch replaces a list whole, so a patch of `status.conditions` made from a copy
//! that predates another writer's condition would drop it. Each patch therefore carries
//! the resourceVersion of the copy it was made from: the API server refuses a stale one
//! (409), and the write is made again from the Cluster read afresh.

use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use super::{Cluster, Condition};

/// Fresh reads after a conflict (or after a write the status did not take) before the
/// write is left to the controller's retry tick.
const REREADS: usize = 3;

/// Patches one condition of `cluster` (through `/status`, or through the object where the
/// CRD has no status subresource, as KubeSphere's own); true when written or when the
/// Cluster is gone. `cluster` becomes the Cluster as the write left it. `status_subresource`
/// is what the writes so far told of the CRD (`None`: not known yet).
pub(super) async fn write_condition(
    api: &Api<Cluster>,
    name: &str,
    cluster: &mut Cluster,
    type_: &str,
    (status, reason, message): (&str, &str, &str),
    status_subresource: &mut Option<bool>,
) -> bool {
    for _ in 0..=REREADS {
        let conditions = with_condition(cluster, type_, status, reason, message);
        let mut patch = json!({ "status": { "conditions": conditions } });
        if let Some(rv) = &cluster.metadata.resource_version {
            patch["metadata"] = json!({ "resourceVersion": rv });
        }
        match patch_status(api, name, &patch, status_subresource).await {
            Ok(written) => {
                let took = written.condition(type_).is_some_and(|c| {
                    c.status == status
                        && c.reason.as_deref() == Some(reason)
                        && c.message.as_deref() == Some(message)
                });
                // The answer is the whole Cluster as it is now: a spec check before the
                // watch brings it is made against it, not against the resourceVersion
                // from before (refused as a conflict, and its retry held a minute). The
                // whole of it, not only its resourceVersion: what another replica wrote
                // meanwhile (a token it minted) must be seen, or a patch guarded by the
                // new version would overwrite it.
                *cluster = written;
                if took {
                    tracing::info!(cluster = %name, %status, "set condition {type_}");
                    return true;
                }
                // Written through the object, and the status kept as it was: the CRD has
                // a status subresource now (KubeSphere upgraded under a running tower).
                tracing::info!(cluster = %name, "the Cluster CRD ignored a status written with the object; trying its status subresource");
                *status_subresource = None;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return true,
            Err(kube::Error::Api(e)) if e.code == 409 => match api.get(name).await {
                Ok(fresh) => *cluster = fresh,
                Err(kube::Error::Api(e)) if e.code == 404 => return true,
                Err(e) => {
                    tracing::warn!(cluster = %name, error = %e, "reading the Cluster after a conflict; retrying");
                    return false;
                }
            },
            Err(e) => {
                tracing::warn!(cluster = %name, error = %e, "writing condition {type_}; retrying");
                return false;
            }
        }
    }
    tracing::warn!(cluster = %name, "condition {type_} still not written after {REREADS} fresh reads; retrying");
    false
}

/// One merge patch of the status: through `/status` unless the CRD is known to have no
/// status subresource, and through the object when `/status` is 404.
async fn patch_status(
    api: &Api<Cluster>,
    name: &str,
    patch: &Value,
    status_subresource: &mut Option<bool>,
) -> kube::Result<Cluster> {
    let params = PatchParams::default();
    if *status_subresource == Some(false) {
        return api.patch(name, &params, &Patch::Merge(patch)).await;
    }
    match api.patch_status(name, &params, &Patch::Merge(patch)).await {
        Ok(written) => {
            *status_subresource = Some(true);
            Ok(written)
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {
            // KubeSphere's own CRD has no status subresource: status is written with the
            // object itself there (and from now on at once). A 404 here too means the
            // Cluster is gone.
            let written = api.patch(name, &params, &Patch::Merge(patch)).await;
            if written.is_ok() {
                *status_subresource = Some(false);
            }
            written
        }
        Err(e) => Err(e),
    }
}

/// `cluster`'s conditions with `type_` set; the transition time moves only when the
/// status does.
fn with_condition(
    cluster: &Cluster,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
) -> Vec<Condition> {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut conditions = cluster
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let previous = conditions
        .iter()
        .position(|c| c.type_ == type_)
        .map(|i| conditions.remove(i));
    let transition = match &previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => None,
    };
    conditions.push(Condition {
        type_: type_.into(),
        status: status.into(),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(transition.unwrap_or(now)),
        reason: Some(reason.into()),
        message: Some(message.into()),
    });
    conditions
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::super::{AGENT_AVAILABLE, ClusterStatus};
    use super::*;

    #[test]
    fn the_transition_time_moves_only_with_the_status() {
        let mut cluster = Cluster::default();
        let first = with_condition(&cluster, AGENT_AVAILABLE, "True", "AgentConnected", "m");
        let mut old = first[0].clone();
        old.last_transition_time = Some("2020-01-01T00:00:00Z".into());
        cluster.status = Some(ClusterStatus {
            conditions: vec![
                Condition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Condition::default()
                },
                old,
            ],
        });
        let same = with_condition(&cluster, AGENT_AVAILABLE, "True", "AgentConnected", "m");
        assert_eq!(same.len(), 2, "other conditions are kept");
        assert_eq!(
            same[1].last_transition_time.as_deref(),
            Some("2020-01-01T00:00:00Z")
        );
        let flipped = with_condition(&cluster, AGENT_AVAILABLE, "False", "AgentNotConnected", "m");
        assert_ne!(
            flipped[1].last_transition_time.as_deref(),
            Some("2020-01-01T00:00:00Z")
        );
        assert_eq!(flipped[1].status, "False");
    }
}
