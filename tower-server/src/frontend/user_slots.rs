//! The per-user limit: how many requests each user has in flight to each cluster
//! (`--max-requests-per-user`).

use std::sync::{Arc, Mutex};

use foldhash::{HashMap, HashMapExt as _};

/// Requests in flight per cluster and user, each count at most `max`. A count that drops
/// to zero is removed, and a cluster left without users too, so users who come and go
/// leave nothing behind. Keyed by cluster, then by user; each entry keeps its own name
/// beside its count, shared with the slots, so a request looks both up by the `&str`s it
/// has and copies nothing (before, a `{cluster}/{user}` key was formatted per request).
/// Hashed with foldhash, as the user is a verified identity's.
pub(super) struct UserSlots {
    counts: Arc<Mutex<Clusters>>,
    /// The most each user may have in flight to one cluster.
    pub(super) max: usize,
}

type Clusters = HashMap<Arc<str>, Named<HashMap<Arc<str>, Named<usize>>>>;

/// A map's value with the name it is kept under.
struct Named<T> {
    name: Arc<str>,
    value: T,
}

/// One request's place among its user's requests to a cluster, given back on drop.
pub(super) struct UserSlot {
    counts: Arc<Mutex<Clusters>>,
    cluster: Arc<str>,
    user: Arc<str>,
}

impl UserSlots {
    pub(super) fn new(max: usize) -> Self {
        UserSlots {
            counts: Arc::default(),
            max,
        }
    }

    /// A place for `user`'s request to `cluster`; `None` when the user has `max`.
    pub(super) fn take(&self, cluster: &str, user: &str) -> Option<UserSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if !counts.contains_key(cluster) {
            let name: Arc<str> = cluster.into();
            counts.insert(
                name.clone(),
                Named {
                    name,
                    value: HashMap::new(),
                },
            );
        }
        let users = counts.get_mut(cluster)?;
        if !users.value.contains_key(user) {
            let name: Arc<str> = user.into();
            users.value.insert(name.clone(), Named { name, value: 0 });
        }
        let cluster = users.name.clone();
        let count = users.value.get_mut(user)?;
        if count.value >= self.max {
            return None;
        }
        count.value += 1;
        Some(UserSlot {
            counts: self.counts.clone(),
            cluster,
            user: count.name.clone(),
        })
    }

    #[cfg(test)]
    fn users(&self) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.values().map(|users| users.value.len()).sum()
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(users) = counts.get_mut(&*self.cluster) else {
            return;
        };
        if let Some(count) = users.value.get_mut(&*self.user) {
            count.value -= 1;
            if count.value == 0 {
                users.value.remove(&*self.user);
            }
        }
        if users.value.is_empty() {
            counts.remove(&*self.cluster);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn each_user_has_its_own_places_per_cluster_and_gives_them_back() {
        let slots = UserSlots::new(2);
        let a1 = slots.take("c1", "alice").unwrap();
        let a2 = slots.take("c1", "alice").unwrap();
        assert!(slots.take("c1", "alice").is_none(), "alice's third to c1");
        // Other users, and alice toward other clusters, are not affected.
        let bob = slots.take("c1", "bob").unwrap();
        let elsewhere = slots.take("c2", "alice").unwrap();
        drop(a1);
        let a3 = slots.take("c1", "alice").unwrap();
        assert!(slots.take("c1", "alice").is_none());
        assert_eq!(slots.users(), 3);
        // A user name may hold the key's `/` (a cluster name may not): still its own.
        let slashed = slots.take("c1", "alice/x").unwrap();
        let _also = slots.take("c1", "alice/x").unwrap();
        assert!(slots.take("c1", "alice/x").is_none());
        drop(slashed);
        // Once a user has nothing in flight, nothing of theirs is kept.
        drop((a2, a3, bob, elsewhere, _also));
        assert_eq!(slots.users(), 0);
    }
}
