//! Callers as KubeSphere resolves them: with `--kubernetes` on a host that has KubeSphere's
//! `User` objects (`iam.kubesphere.io/v1alpha2`), a verified token's user must exist there
//! and not be `Disabled`, and its groups are the User's `spec.groups` plus
//! `system:authenticated`, not the token's claim. Modelled on KubeSphere 3.4's JWT
//! authenticator (pkg/apiserver/authentication/authenticators/jwttoken/jwt_token.go: the
//! user from the lister, `Groups: append(u.Spec.Groups, user.AllAuthenticated)`; the
//! pre-registration user passes as the token says) and its `UserDisabled` check. Users
//! are watched, so disabling one locks them out of every member at once.
//!
//! Tokens Tower minted itself (`iss: tower`: `tower-server user-token`, the Clusters'
//! kubeconfigs) keep their claims: whoever can mint them holds the jwtSecret anyway. A
//! host without the User API (plain Kubernetes) keeps the token's claims for everyone.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;
use tower_auth::Identity;

/// KubeSphere's user that exists before anyone registered (its token is taken as is).
const PRE_REGISTRATION_USER: &str = "system:pre-registration";
/// The group every authenticated KubeSphere user is in.
const ALL_AUTHENTICATED: &str = "system:authenticated";

/// One KubeSphere User, as far as Tower cares.
#[derive(Debug, Clone)]
struct User {
    groups: Vec<String>,
    disabled: bool,
}

#[derive(Debug)]
enum State {
    /// Not yet known whether the host has Users (and why, when asking failed).
    Starting(Option<String>),
    /// The host has no User API: tokens' claims stand.
    Absent,
    /// Listing the Users.
    Listing,
    /// Every User, kept current by the watch.
    Ready(HashMap<String, User>),
}

/// Why a verified caller is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The Users are not listed yet (503), and why when listing them failed.
    #[error("tower has not listed KubeSphere's Users yet ({0}): retry in a moment")]
    NotReady(String),
    /// No such User (401).
    #[error("user {0:?} is not a KubeSphere user of this host")]
    Unknown(String),
    /// The User is disabled (401).
    #[error("user {0:?} is disabled")]
    Disabled(String),
}

/// The host's KubeSphere Users, if it has any.
#[derive(Debug)]
pub struct KubeSphereUsers {
    state: RwLock<State>,
}

impl Default for KubeSphereUsers {
    fn default() -> Self {
        KubeSphereUsers {
            state: RwLock::new(State::Starting(None)),
        }
    }
}

impl KubeSphereUsers {
    /// Who `identity` (from a verified token; `tower_issued` when Tower minted it) is.
    pub fn resolve(&self, identity: Identity, tower_issued: bool) -> Result<Identity, Refused> {
        if tower_issued || identity.user == PRE_REGISTRATION_USER {
            return Ok(identity);
        }
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        match &*state {
            State::Absent => Ok(identity),
            State::Starting(why) => Err(Refused::NotReady(
                why.clone().unwrap_or_else(|| "starting".into()),
            )),
            State::Listing => Err(Refused::NotReady("listing".into())),
            State::Ready(users) => match users.get(&identity.user) {
                None => Err(Refused::Unknown(identity.user)),
                Some(user) if user.disabled => Err(Refused::Disabled(identity.user)),
                Some(user) => {
                    let mut groups = user.groups.clone();
                    groups.push(ALL_AUTHENTICATED.to_owned());
                    Ok(Identity {
                        user: identity.user,
                        groups,
                    })
                }
            },
        }
    }

    fn set(&self, state: State) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = state;
    }

    fn update(&self, f: impl FnOnce(&mut HashMap<String, User>)) {
        if let State::Ready(users) = &mut *self.state.write().unwrap_or_else(|e| e.into_inner()) {
            f(users);
        }
    }

    /// Follows the host's Users until `stop`: finds out whether the API exists, lists,
    /// then applies every change.
    pub async fn follow(self: Arc<Self>, client: kube::Client, stop: CancellationToken) {
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "iam.kubesphere.io",
            "v1alpha2",
            "User",
        ));
        let api: Api<DynamicObject> = Api::all_with(client, &resource);
        // Whether the host has the API at all; a transient failure is retried.
        loop {
            match api.list(&ListParams::default().limit(1)).await {
                Ok(_) => break,
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    tracing::info!(
                        "no KubeSphere Users on this host: callers' groups come from their tokens"
                    );
                    self.set(State::Absent);
                    return;
                }
                Err(e) => {
                    // Failing closed: a host that has Users but hides them (RBAC) must not
                    // let a disabled user in on the token's word.
                    tracing::warn!(error = %e, "cannot list KubeSphere's Users: KubeSphere tokens get 503 until it can (deploy/host/rbac.yaml grants list and watch on users.iam.kubesphere.io)");
                    self.set(State::Starting(Some(format!("listing them failed: {e}"))));
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
                    }
                }
            }
        }
        self.set(State::Listing);
        let mut events = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut listing: HashMap<String, User> = HashMap::new();
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                event = events.next() => event,
            };
            match event {
                None => return,
                Some(Err(e)) => tracing::warn!(error = %e, "watching KubeSphere's Users"),
                Some(Ok(Event::Init)) => listing.clear(),
                Some(Ok(Event::InitApply(object))) => {
                    if let Some((name, user)) = user_of(&object) {
                        listing.insert(name, user);
                    }
                }
                Some(Ok(Event::InitDone)) => {
                    tracing::info!(
                        users = listing.len(),
                        "listed KubeSphere's Users: callers are resolved as KubeSphere does"
                    );
                    self.set(State::Ready(std::mem::take(&mut listing)));
                }
                Some(Ok(Event::Apply(object))) => {
                    if let Some((name, user)) = user_of(&object) {
                        self.update(|users| {
                            users.insert(name, user);
                        });
                    }
                }
                Some(Ok(Event::Delete(object))) => {
                    if let Some(name) = object.metadata.name.clone() {
                        self.update(|users| {
                            users.remove(&name);
                        });
                    }
                }
            }
        }
    }
}

/// A User object's name, groups and state.
fn user_of(object: &DynamicObject) -> Option<(String, User)> {
    let name = object.metadata.name.clone()?;
    let groups = object.data["spec"]["groups"]
        .as_array()
        .map(|groups| {
            groups
                .iter()
                .filter_map(|g| g.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let disabled = object.data["status"]["state"] == "Disabled";
    Some((name, User { groups, disabled }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn alice(groups: &[&str]) -> Identity {
        Identity {
            user: "alice".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn users_resolve_as_kubesphere_does() {
        let users = KubeSphereUsers::default();
        assert!(matches!(
            users.resolve(alice(&[]), false),
            Err(Refused::NotReady(_))
        ));
        users.set(State::Ready(HashMap::from([
            (
                "alice".to_owned(),
                User {
                    groups: vec!["devs".into()],
                    disabled: false,
                },
            ),
            (
                "mallory".to_owned(),
                User {
                    groups: vec![],
                    disabled: true,
                },
            ),
        ])));
        // The User's groups, not the token's claim.
        assert_eq!(
            users.resolve(alice(&["system:masters"]), false).unwrap(),
            alice(&["devs", "system:authenticated"])
        );
        // Tower's own tokens keep their claims.
        assert_eq!(
            users.resolve(alice(&["system:masters"]), true).unwrap(),
            alice(&["system:masters"])
        );
        let mallory = Identity {
            user: "mallory".into(),
            groups: vec![],
        };
        assert_eq!(
            users.resolve(mallory, false),
            Err(Refused::Disabled("mallory".into()))
        );
        let nobody = Identity {
            user: "nobody".into(),
            groups: vec![],
        };
        assert_eq!(
            users.resolve(nobody, false),
            Err(Refused::Unknown("nobody".into()))
        );
        users.set(State::Absent);
        assert_eq!(
            users.resolve(alice(&["ops"]), false).unwrap(),
            alice(&["ops"])
        );
    }
}
