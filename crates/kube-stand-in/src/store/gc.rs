//! What a kube-apiserver's garbage collector and node controller would add to the store:
//! dependents (objects whose `metadata.ownerReferences` name a deleted object's uid) are
//! deleted with their owner, as the collector's background propagation does; and the one
//! node every pod runs on.

use bytes::Bytes;
use serde_json::{Value, json};

use super::{Inner, Key, Store};

impl Store {
    /// Deletes, recursively, every object owned by `deleted` (the JSON of an object just
    /// deleted).
    pub(super) fn collect_garbage(&self, inner: &mut Inner, deleted: &Bytes) {
        let mut owners: Vec<String> = serde_json::from_slice::<Value>(deleted)
            .ok()
            .and_then(|v| v.pointer("/metadata/uid")?.as_str().map(str::to_owned))
            .into_iter()
            .collect();
        while let Some(uid) = owners.pop() {
            let dependents: Vec<Key> = inner
                .objects
                .iter()
                // Cheap first (the store holds ~55 MB of bulk configmaps): only objects
                // that have owners and mention the uid at all are parsed.
                .filter(|(_, stored)| {
                    contains(&stored.json, b"\"ownerReferences\"")
                        && contains(&stored.json, uid.as_bytes())
                })
                .filter(|(_, stored)| owned_by(&stored.json, &uid))
                .map(|(key, _)| key.clone())
                .collect();
            for (resource, namespace, name) in dependents {
                if let Ok(json) = self.delete_locked(inner, resource, &namespace, &name)
                    && let Some(uid) = serde_json::from_slice::<Value>(&json)
                        .ok()
                        .and_then(|v| v.pointer("/metadata/uid")?.as_str().map(str::to_owned))
                {
                    owners.push(uid);
                }
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(haystack, needle).is_some()
}

fn owned_by(json: &[u8], uid: &str) -> bool {
    serde_json::from_slice::<Value>(json).is_ok_and(|v| {
        v.pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
    })
}

/// The seeded node.
pub(super) fn seed_node(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "nodeInfo": {"machineID": "stand-in", "kubeletVersion": "v1.31.0"}
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::Resource;
    use super::*;

    #[test]
    fn dependents_go_with_their_owner_and_others_stay() {
        let store = Store::seeded();
        let owner = store
            .create(
                Resource::Clusters,
                "",
                json!({"metadata": {"name": "m"}, "spec": {}}),
            )
            .unwrap();
        let uid = serde_json::from_slice::<Value>(&owner).unwrap()["metadata"]["uid"].clone();
        let owned = |name: &str, uid: &Value| {
            json!({"metadata": {"name": name, "ownerReferences": [
                {"apiVersion": "cluster.kubesphere.io/v1alpha1", "kind": "Cluster", "name": "m", "uid": uid}
            ]}, "spec": {"ports": [{"port": 1}]}})
        };
        store
            .create(Resource::Services, "default", owned("mc-m", &uid))
            .unwrap();
        store
            .create(
                Resource::Services,
                "default",
                owned("other", &json!("not-it")),
            )
            .unwrap();
        store.delete(Resource::Clusters, "", "m").unwrap();
        assert!(store.get(Resource::Services, "default", "mc-m").is_err());
        assert!(store.get(Resource::Services, "default", "other").is_ok());
    }
}
