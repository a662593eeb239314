//! Authorization as kube-apiserver does it with `--authorization-mode=RBAC`: the request's
//! attributes, the `system:masters` shortcut, RBAC over the stored Roles, ClusterRoles and
//! bindings, the bootstrap policy, and the `Forbidden` answer.
//!
//! Modelled on (kubernetes/kubernetes):
//! * `staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go`: [`Attributes`]
//!   from method and path — `api`/`apis` prefixes, the `watch` path verb, `namespaces/{ns}`
//!   (with `status`/`finalize` as namespace subresources), `{resource}/{name}/{subresource}`,
//!   `get` without a name becoming `list` or `watch` (`?watch=` other than `0`/`false`), a
//!   `metadata.name=` field selector naming the object, `delete` without a name becoming
//!   `deletecollection`, and everything else a non-resource request with the lower-cased
//!   method as its verb;
//! * `pkg/kubeapiserver/authorizer/config.go` and
//!   `staging/src/k8s.io/apiserver/pkg/authorization/authorizerfactory/builtin.go`: members of
//!   `system:masters` are allowed everything before RBAC is asked;
//! * `plugin/pkg/auth/authorizer/rbac/rbac.go` (`RuleAllows`, the visitor that stops at the
//!   first allowing rule and collects resolution errors into the reason) and
//!   `pkg/registry/rbac/validation/rule.go` (`VisitRulesFor`: every ClusterRoleBinding, then
//!   the RoleBindings of the request's namespace; `appliesToUser` for User, Group and
//!   ServiceAccount subjects, a RoleBinding's ServiceAccount subject defaulting to the
//!   binding's namespace; a missing role is the error `clusterrole.rbac.authorization.k8s.io
//!   "x" not found`);
//! * `pkg/apis/rbac/v1/evaluation_helpers.go` (rule matching: verbs and API groups with `*`,
//!   resources with `*`, `res/sub` and `*/sub`, resourceNames, nonResourceURLs with a
//!   trailing `*`);
//! * `plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go` ([`bootstrap_policy`]);
//! * `staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go`
//!   (`Forbidden`, `forbiddenMessage`) with `apierrors.NewForbidden` ([`forbidden`]).
//!
//! * the escalation checks on writes of roles and bindings ([`Authorizer::check_rbac_write`]).
//!
//! Not modelled: aggregated ClusterRoles (`aggregationRule`) and the Node authorizer.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use http::Method;
use serde_json::{Value, json};

use crate::status::ApiError;
use crate::store::{Filter, RBAC_GROUP, Resource, Store};

/// The group every request of a member may do anything (`user.SystemPrivilegedGroup`).
pub(crate) const SYSTEM_MASTERS: &str = "system:masters";
/// Added to every authenticated user's groups (`user.AllAuthenticated`).
pub(crate) const AUTHENTICATED: &str = "system:authenticated";
/// The group of anonymous requests (`user.AllUnauthenticated`).
pub(crate) const UNAUTHENTICATED: &str = "system:unauthenticated";
/// The user of anonymous requests (`user.Anonymous`).
pub(crate) const ANONYMOUS: &str = "system:anonymous";
/// Name of the permissive fixture binding [`StandIn::start`](crate::StandIn::start) seeds.
pub(crate) const FIXTURE_BINDING: &str = "stand-in:authenticated-cluster-admin";

/// Who a request runs as (`user.Info`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UserInfo {
    pub(crate) name: String,
    pub(crate) uid: String,
    pub(crate) groups: Vec<String>,
    pub(crate) extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    pub(crate) fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// What a request asks to do (`authorizer.Attributes`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Attributes {
    pub(crate) verb: String,
    pub(crate) resource_request: bool,
    pub(crate) path: String,
    pub(crate) api_group: String,
    pub(crate) api_version: String,
    pub(crate) namespace: String,
    pub(crate) resource: String,
    pub(crate) subresource: String,
    pub(crate) name: String,
}

impl Attributes {
    /// `NewRequestInfo` of requestinfo.go, for the `api` (groupless) and `apis` prefixes.
    pub(crate) fn from_request(
        method: &Method,
        path: &str,
        query: &[(String, String)],
    ) -> Attributes {
        let mut info = Attributes {
            verb: method.as_str().to_ascii_lowercase(),
            path: path.to_owned(),
            ..Attributes::default()
        };
        let parts: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|p| !p.is_empty())
            .collect();
        if parts.len() < 3 || !matches!(parts[0], "api" | "apis") {
            return info;
        }
        let mut rest = &parts[1..];
        if parts[0] == "apis" {
            if rest.len() < 3 {
                return info;
            }
            info.api_group = rest[0].to_owned();
            rest = &rest[1..];
        }
        info.resource_request = true;
        info.api_version = rest[0].to_owned();
        rest = &rest[1..];
        if rest[0] == "watch" || rest[0] == "proxy" {
            if rest.len() < 2 {
                // "unable to determine kind and namespace": the request is refused anyway.
                return info;
            }
            info.verb = rest[0].to_owned();
            rest = &rest[1..];
        } else {
            info.verb = match *method {
                Method::POST => "create",
                Method::GET | Method::HEAD => "get",
                Method::PUT => "update",
                Method::PATCH => "patch",
                Method::DELETE => "delete",
                _ => "",
            }
            .to_owned();
        }
        if rest[0] == "namespaces" && rest.len() > 1 {
            info.namespace = rest[1].to_owned();
            if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
                rest = &rest[2..];
            }
        }
        match rest.len() {
            0 => {}
            1 => info.resource = rest[0].to_owned(),
            2 => {
                info.resource = rest[0].to_owned();
                info.name = rest[1].to_owned();
            }
            _ => {
                info.resource = rest[0].to_owned();
                info.name = rest[1].to_owned();
                if info.verb != "proxy" {
                    info.subresource = rest[2].to_owned();
                }
            }
        }
        if info.name.is_empty() && info.verb == "get" {
            let param = |key: &str| {
                query
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_str())
            };
            info.verb = match param("watch") {
                Some(v) if crate::api::is_false(v) => "list",
                Some(_) => "watch",
                None => "list",
            }
            .to_owned();
            // A field selector that requires one name authorizes as that name.
            for term in param("fieldSelector").unwrap_or("").split(',') {
                let exact = term
                    .strip_prefix("metadata.name==")
                    .or_else(|| term.strip_prefix("metadata.name="));
                if let Some(name) = exact
                    && !name.is_empty()
                    && !matches!(name, "." | "..")
                    && !name.contains(['/', '%'])
                {
                    info.name = name.to_owned();
                }
            }
        }
        if info.name.is_empty() && info.verb == "delete" {
            info.verb = "deletecollection".to_owned();
        }
        info
    }
}

/// One `PolicyRule`.
#[derive(Debug, Clone, Default)]
struct Rule {
    verbs: Vec<String>,
    api_groups: Vec<String>,
    resources: Vec<String>,
    resource_names: Vec<String>,
    non_resource_urls: Vec<String>,
}

impl Rule {
    fn from_value(v: &Value) -> Rule {
        let list = |key: &str| -> Vec<String> {
            v[key]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        Rule {
            verbs: list("verbs"),
            api_groups: list("apiGroups"),
            resources: list("resources"),
            resource_names: list("resourceNames"),
            non_resource_urls: list("nonResourceURLs"),
        }
    }

    /// `RuleAllows` of rbac.go with the matchers of evaluation_helpers.go.
    fn allows(&self, attrs: &Attributes) -> bool {
        let verb = self.verbs.iter().any(|v| v == "*" || *v == attrs.verb);
        if !verb {
            return false;
        }
        if !attrs.resource_request {
            return self.non_resource_urls.iter().any(|url| {
                url == "*"
                    || *url == attrs.path
                    || (url.ends_with('*') && attrs.path.starts_with(url.trim_end_matches('*')))
            });
        }
        let group = self
            .api_groups
            .iter()
            .any(|g| g == "*" || *g == attrs.api_group);
        let combined = if attrs.subresource.is_empty() {
            attrs.resource.clone()
        } else {
            format!("{}/{}", attrs.resource, attrs.subresource)
        };
        let resource = self.resources.iter().any(|r| {
            r == "*"
                || *r == combined
                || (!attrs.subresource.is_empty()
                    && r.len() == attrs.subresource.len() + 2
                    && r.starts_with("*/")
                    && r.ends_with(attrs.subresource.as_str()))
        });
        let name = self.resource_names.is_empty() || self.resource_names.contains(&attrs.name);
        group && resource && name
    }
}

/// `BreakdownRule` of pkg/registry/rbac/validation/policy_comparator.go: one rule per
/// (group, resource, verb[, name]) or (url, verb).
fn breakdown(rule: &Rule) -> Vec<Rule> {
    let one = |s: &String| vec![s.clone()];
    let mut out = Vec::new();
    for group in &rule.api_groups {
        for resource in &rule.resources {
            for verb in &rule.verbs {
                if rule.resource_names.is_empty() {
                    out.push(Rule {
                        verbs: one(verb),
                        api_groups: one(group),
                        resources: one(resource),
                        ..Rule::default()
                    });
                }
                for name in &rule.resource_names {
                    out.push(Rule {
                        verbs: one(verb),
                        api_groups: one(group),
                        resources: one(resource),
                        resource_names: one(name),
                        ..Rule::default()
                    });
                }
            }
        }
    }
    for url in &rule.non_resource_urls {
        for verb in &rule.verbs {
            out.push(Rule {
                verbs: one(verb),
                non_resource_urls: one(url),
                ..Rule::default()
            });
        }
    }
    out
}

fn has_all(set: &[String], wanted: &[String]) -> bool {
    wanted.iter().all(|w| set.contains(w))
}

impl Rule {
    /// `ruleCovers` of policy_comparator.go: whether this (owner) rule grants everything
    /// `sub` does.
    fn covers(&self, sub: &Rule) -> bool {
        let star = |set: &[String]| set.iter().any(|s| s == "*");
        let verbs = star(&self.verbs) || has_all(&self.verbs, &sub.verbs);
        let groups = star(&self.api_groups) || has_all(&self.api_groups, &sub.api_groups);
        let resources = star(&self.resources)
            || has_all(&self.resources, &sub.resources)
            || sub.resources.iter().all(|r| {
                self.resources.contains(r)
                    || r.split_once('/').is_some_and(|(_, subresource)| {
                        self.resources.contains(&format!("*/{subresource}"))
                    })
            });
        let urls = sub.non_resource_urls.iter().all(|url| {
            self.non_resource_urls.iter().any(|owner| {
                owner == "*"
                    || owner == url
                    || (owner.ends_with('*') && url.starts_with(owner.trim_end_matches('*')))
            })
        });
        let names = if sub.resource_names.is_empty() {
            self.resource_names.is_empty()
        } else {
            self.resource_names.is_empty() || has_all(&self.resource_names, &sub.resource_names)
        };
        verbs && groups && resources && names && urls
    }

    /// `CompactString` of pkg/apis/rbac/v1/evaluation_helpers.go, with Go's `%q` of a
    /// string slice (`["a" "b"]`).
    fn compact_string(&self) -> String {
        let q = |items: &[String]| {
            let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
            format!("[{}]", quoted.join(" "))
        };
        let mut parts = Vec::new();
        for (name, items) in [
            ("APIGroups", &self.api_groups),
            ("Resources", &self.resources),
            ("NonResourceURLs", &self.non_resource_urls),
            ("ResourceNames", &self.resource_names),
            ("Verbs", &self.verbs),
        ] {
            if !items.is_empty() {
                parts.push(format!("{name}:{}", q(items)));
            }
        }
        format!("{{{}}}", parts.join(", "))
    }
}

/// `CompactRules` of pkg/registry/rbac/validation/policy_compact.go: simple rules (one group,
/// one resource, nothing else) that differ only by verb become one.
fn compact(rules: Vec<Rule>) -> Vec<Rule> {
    let mut out: Vec<Rule> = Vec::new();
    for rule in rules {
        let simple = rule.api_groups.len() == 1
            && rule.resources.len() == 1
            && rule.resource_names.is_empty()
            && rule.non_resource_urls.is_empty();
        if simple
            && let Some(existing) = out.iter_mut().find(|r| {
                r.api_groups == rule.api_groups
                    && r.resources == rule.resources
                    && r.resource_names.is_empty()
                    && r.non_resource_urls.is_empty()
            })
        {
            for verb in rule.verbs {
                if !existing.verbs.contains(&verb) {
                    existing.verbs.push(verb);
                }
            }
            continue;
        }
        out.push(rule);
    }
    out
}

/// One subject of a binding.
#[derive(Debug, Clone)]
struct Subject {
    kind: String,
    name: String,
    namespace: String,
}

/// A RoleBinding or ClusterRoleBinding.
#[derive(Debug, Clone)]
struct Binding {
    namespace: String,
    role_kind: String,
    role_name: String,
    subjects: Vec<Subject>,
}

impl Binding {
    fn from_value(v: &Value) -> Binding {
        let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
        Binding {
            namespace: s(&v["metadata"]["namespace"]),
            role_kind: s(&v["roleRef"]["kind"]),
            role_name: s(&v["roleRef"]["name"]),
            subjects: v["subjects"]
                .as_array()
                .map(|subjects| {
                    subjects
                        .iter()
                        .map(|subject| Subject {
                            kind: s(&subject["kind"]),
                            name: s(&subject["name"]),
                            namespace: s(&subject["namespace"]),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// `appliesTo` / `appliesToUser` of rule.go; `namespace` is the binding's namespace
    /// (empty for a ClusterRoleBinding).
    fn applies_to(&self, user: &UserInfo, namespace: &str) -> bool {
        self.subjects
            .iter()
            .any(|subject| match subject.kind.as_str() {
                "User" => user.name == subject.name,
                "Group" => user.in_group(&subject.name),
                "ServiceAccount" => {
                    let ns = if subject.namespace.is_empty() {
                        namespace
                    } else {
                        &subject.namespace
                    };
                    !ns.is_empty()
                        && user.name == format!("system:serviceaccount:{ns}:{}", subject.name)
                }
                _ => false,
            })
    }
}

/// The RBAC objects, parsed once per change.
#[derive(Debug, Default)]
struct Policy {
    cluster_roles: HashMap<String, Vec<Rule>>,
    roles: HashMap<(String, String), Vec<Rule>>,
    cluster_role_bindings: Vec<Binding>,
    role_bindings: HashMap<String, Vec<Binding>>,
}

impl Policy {
    fn load(store: &Store) -> Policy {
        let all = Filter::default();
        let objects = |resource: Resource| -> Vec<Value> {
            store
                .list(resource, &all)
                .1
                .iter()
                .filter_map(|b| serde_json::from_slice(b).ok())
                .collect()
        };
        let rules = |v: &Value| -> Vec<Rule> {
            v["rules"]
                .as_array()
                .map(|r| r.iter().map(Rule::from_value).collect())
                .unwrap_or_default()
        };
        let mut policy = Policy::default();
        for role in objects(Resource::ClusterRoles) {
            let name = role["metadata"]["name"].as_str().unwrap_or("").to_owned();
            policy.cluster_roles.insert(name, rules(&role));
        }
        for role in objects(Resource::Roles) {
            let key = (
                role["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
                role["metadata"]["name"].as_str().unwrap_or("").to_owned(),
            );
            policy.roles.insert(key, rules(&role));
        }
        policy.cluster_role_bindings = objects(Resource::ClusterRoleBindings)
            .iter()
            .map(Binding::from_value)
            .collect();
        for binding in objects(Resource::RoleBindings)
            .iter()
            .map(Binding::from_value)
        {
            policy
                .role_bindings
                .entry(binding.namespace.clone())
                .or_default()
                .push(binding);
        }
        policy
    }

    /// The rules a binding grants, or the lookup error (`GetRoleReferenceRules`).
    fn role_rules(&self, binding: &Binding) -> Result<&[Rule], String> {
        let found = match binding.role_kind.as_str() {
            "ClusterRole" => self.cluster_roles.get(&binding.role_name),
            "Role" => self
                .roles
                .get(&(binding.namespace.clone(), binding.role_name.clone())),
            other => return Err(format!("unsupported role reference kind: {other:?}")),
        };
        found.map(Vec::as_slice).ok_or_else(|| {
            format!(
                "{}.{RBAC_GROUP} \"{}\" not found",
                binding.role_kind.to_ascii_lowercase(),
                binding.role_name
            )
        })
    }

    /// `RulesFor` of rule.go: every rule bound to `user` cluster-wide and, with a namespace,
    /// in it; and the errors met on the way (missing roles).
    fn rules_for(&self, user: &UserInfo, namespace: &str) -> (Vec<Rule>, Vec<String>) {
        let namespaced = self
            .role_bindings
            .get(namespace)
            .filter(|_| !namespace.is_empty())
            .into_iter()
            .flatten();
        let (mut rules, mut errors) = (Vec::new(), Vec::new());
        for binding in self.cluster_role_bindings.iter().chain(namespaced) {
            if !binding.applies_to(user, &binding.namespace) {
                continue;
            }
            match self.role_rules(binding) {
                Ok(r) => rules.extend_from_slice(r),
                Err(e) => errors.push(e),
            }
        }
        (rules, errors)
    }

    fn authorize(&self, user: &UserInfo, attrs: &Attributes) -> Decision {
        let mut errors = Vec::new();
        let namespaced = self
            .role_bindings
            .get(&attrs.namespace)
            .filter(|_| !attrs.namespace.is_empty())
            .into_iter()
            .flatten();
        for binding in self.cluster_role_bindings.iter().chain(namespaced) {
            if !binding.applies_to(user, &binding.namespace) {
                continue;
            }
            match self.role_rules(binding) {
                Ok(rules) if rules.iter().any(|r| r.allows(attrs)) => {
                    return Decision {
                        allowed: true,
                        reason: String::new(),
                    };
                }
                Ok(_) => {}
                Err(e) => errors.push(e),
            }
        }
        let reason = match errors.as_slice() {
            [] => String::new(),
            [one] => format!("RBAC: {one}"),
            many => format!("RBAC: [{}]", many.join(", ")),
        };
        Decision {
            allowed: false,
            reason,
        }
    }
}

/// An authorizer's answer; `reason` is appended to the Forbidden message when not empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) allowed: bool,
    pub(crate) reason: String,
}

/// The authorizer chain: the `system:masters` shortcut, then RBAC over the store.
#[derive(Debug, Default)]
pub(crate) struct Authorizer {
    /// The parsed policy and the store's RBAC generation it was parsed at.
    cache: Mutex<Option<(u64, Arc<Policy>)>>,
}

impl Authorizer {
    pub(crate) fn authorize(&self, store: &Store, user: &UserInfo, attrs: &Attributes) -> Decision {
        if user.in_group(SYSTEM_MASTERS) {
            return Decision {
                allowed: true,
                reason: String::new(),
            };
        }
        self.policy(store).authorize(user, attrs)
    }

    /// The RBAC registry's guard against privilege escalation, for a write (create, update,
    /// patch, apply) of `object`, a Role, ClusterRole or binding in `namespace`
    /// (pkg/registry/rbac/escalation_check.go, pkg/registry/rbac/role*/policybased/storage.go,
    /// `ConfirmNoEscalation` in pkg/registry/rbac/validation/rule.go): `system:masters` may
    /// write anything; a role needs the `escalate` verb on it or every rule it grants held by
    /// the writer already; a binding needs the `bind` verb on its role or every rule of that
    /// role held by the writer (in the binding's namespace).
    pub(crate) fn check_rbac_write(
        &self,
        store: &Store,
        user: &UserInfo,
        resource: Resource,
        namespace: &str,
        object: &Value,
    ) -> Result<(), ApiError> {
        if user.in_group(SYSTEM_MASTERS) {
            return Ok(());
        }
        let name = object["metadata"]["name"].as_str().unwrap_or("");
        let policy = self.policy(store);
        let allowed = |verb: &str, resource: &str, name: &str| {
            let attrs = Attributes {
                verb: verb.to_owned(),
                resource_request: true,
                api_group: RBAC_GROUP.to_owned(),
                api_version: "v1".to_owned(),
                namespace: namespace.to_owned(),
                resource: resource.to_owned(),
                name: name.to_owned(),
                ..Attributes::default()
            };
            policy.authorize(user, &attrs).allowed
        };
        let granted: Vec<Rule> = match resource {
            Resource::Roles | Resource::ClusterRoles => {
                if allowed("escalate", resource.plural(), name) {
                    return Ok(());
                }
                object["rules"]
                    .as_array()
                    .map(|rules| rules.iter().map(Rule::from_value).collect())
                    .unwrap_or_default()
            }
            Resource::RoleBindings | Resource::ClusterRoleBindings => {
                let kind = object["roleRef"]["kind"].as_str().unwrap_or("");
                let role = object["roleRef"]["name"].as_str().unwrap_or("");
                let role_resource = if kind == "Role" {
                    "roles"
                } else {
                    "clusterroles"
                };
                if allowed("bind", role_resource, role) {
                    return Ok(());
                }
                let binding = Binding {
                    namespace: namespace.to_owned(),
                    role_kind: kind.to_owned(),
                    role_name: role.to_owned(),
                    subjects: Vec::new(),
                };
                policy
                    .role_rules(&binding)
                    .map_err(|_| {
                        ApiError::not_found(&format!("{role_resource}.{RBAC_GROUP}"), role)
                    })?
                    .to_vec()
            }
            _ => return Ok(()),
        };
        let (held, errors) = policy.rules_for(user, namespace);
        let missing: Vec<Rule> = granted
            .iter()
            .flat_map(breakdown)
            .filter(|sub| !held.iter().any(|h| h.covers(sub)))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut descriptions: Vec<String> =
            compact(missing).iter().map(Rule::compact_string).collect();
        descriptions.sort();
        descriptions.dedup();
        let groups: Vec<String> = user.groups.iter().map(|g| format!("{g:?}")).collect();
        let mut message = format!(
            "{}.{RBAC_GROUP} {name:?} is forbidden: user {:?} (groups=[{}]) is attempting to grant RBAC permissions not currently held:\n{}",
            resource.plural(),
            user.name,
            groups.join(" "),
            descriptions.join("\n")
        );
        if !errors.is_empty() {
            message.push_str(&format!("; resolution errors: [{}]", errors.join(" ")));
        }
        Err(ApiError::forbidden(
            message,
            resource.plural(),
            RBAC_GROUP,
            name,
        ))
    }

    fn policy(&self, store: &Store) -> Arc<Policy> {
        // Read the generation first: a write after it makes the next call reload.
        let generation = store.rbac_generation();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached, policy)) = cache.as_ref()
            && *cached == generation
        {
            return policy.clone();
        }
        let policy = Arc::new(Policy::load(store));
        *cache = Some((generation, policy.clone()));
        policy
    }
}

/// The 403 `Status` for a refused request: `forbiddenMessage` wrapped by `NewForbidden`
/// (`{resource}[.{group}] ["{name}"] is forbidden: User "u" cannot {verb} resource …`, or
/// `forbidden: User "u" cannot get path "/x"`), with `details` naming the resource.
pub(crate) fn forbidden(user: &str, attrs: &Attributes, reason: &str) -> ApiError {
    let message = if attrs.resource_request {
        let resource = if attrs.subresource.is_empty() {
            attrs.resource.clone()
        } else {
            format!("{}/{}", attrs.resource, attrs.subresource)
        };
        if attrs.namespace.is_empty() {
            format!(
                "User {user:?} cannot {} resource {resource:?} in API group {:?} at the cluster scope",
                attrs.verb, attrs.api_group
            )
        } else {
            format!(
                "User {user:?} cannot {} resource {resource:?} in API group {:?} in the namespace {:?}",
                attrs.verb, attrs.api_group, attrs.namespace
            )
        }
    } else {
        format!("User {user:?} cannot {} path {:?}", attrs.verb, attrs.path)
    };
    let message = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let message = if reason.is_empty() {
        message
    } else {
        format!("{message}: {reason}")
    };
    let qualified = match (attrs.resource.as_str(), attrs.api_group.as_str()) {
        ("", _) => String::new(),
        (resource, "") => resource.to_owned(),
        (resource, group) => format!("{resource}.{group}"),
    };
    let full = match (qualified.as_str(), attrs.name.as_str()) {
        ("", _) => format!("forbidden: {message}"),
        (q, "") => format!("{q} is forbidden: {message}"),
        (q, name) => format!("{q} \"{name}\" is forbidden: {message}"),
    };
    ApiError::forbidden(full, &attrs.resource, &attrs.api_group, &attrs.name)
}

/// `{"kubernetes.io/bootstrapping": "rbac-defaults"}` and the auto-update annotation, as
/// every bootstrap object carries them (`addDefaultMetadata` in policy.go).
fn bootstrap_metadata(name: &str) -> Value {
    json!({
        "name": name,
        "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
        "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"},
    })
}

fn cluster_role(name: &str, rules: Value) -> (Resource, Value) {
    (
        Resource::ClusterRoles,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": bootstrap_metadata(name), "rules": rules}),
    )
}

fn cluster_role_binding(name: &str, groups: &[&str]) -> (Resource, Value) {
    let subjects: Vec<Value> = groups
        .iter()
        .map(|g| json!({"kind": "Group", "apiGroup": RBAC_GROUP, "name": g}))
        .collect();
    (
        Resource::ClusterRoleBindings,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": bootstrap_metadata(name),
               "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": name},
               "subjects": subjects}),
    )
}

/// The part of the bootstrap policy (policy.go, Kubernetes 1.32) a member's callers meet:
/// `cluster-admin` for `system:masters`; `system:discovery` and `system:basic-user` for
/// every authenticated user; `system:public-info-viewer` (`/healthz`, `/livez`, `/readyz`,
/// `/version`) for everyone, anonymous included.
pub(crate) fn bootstrap_policy() -> Vec<(Resource, Value)> {
    vec![
        cluster_role(
            "cluster-admin",
            json!([
                {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]},
                {"verbs": ["*"], "nonResourceURLs": ["*"]},
            ]),
        ),
        cluster_role(
            "system:discovery",
            json!([{"verbs": ["get"], "nonResourceURLs": [
                "/livez", "/readyz", "/healthz", "/version", "/version/",
                "/openapi", "/openapi/*", "/api", "/api/*", "/apis", "/apis/*",
            ]}]),
        ),
        cluster_role(
            "system:basic-user",
            json!([
                {"verbs": ["create"], "apiGroups": ["authorization.k8s.io"],
                 "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"]},
                {"verbs": ["create"], "apiGroups": ["authentication.k8s.io"],
                 "resources": ["selfsubjectreviews"]},
            ]),
        ),
        cluster_role(
            "system:public-info-viewer",
            json!([{"verbs": ["get"], "nonResourceURLs": [
                "/livez", "/readyz", "/healthz", "/version", "/version/",
            ]}]),
        ),
        cluster_role_binding("cluster-admin", &[SYSTEM_MASTERS]),
        cluster_role_binding("system:discovery", &[AUTHENTICATED]),
        cluster_role_binding("system:basic-user", &[AUTHENTICATED]),
        cluster_role_binding(
            "system:public-info-viewer",
            &[AUTHENTICATED, UNAUTHENTICATED],
        ),
    ]
}

/// The test fixture [`StandIn::start`](crate::StandIn::start) adds: every authenticated
/// user is `cluster-admin`. Not part of any real cluster's policy.
pub(crate) fn permissive_fixture() -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": FIXTURE_BINDING,
            "labels": {"app.kubernetes.io/managed-by": "kube-stand-in"},
            "annotations": {"kube-stand-in/fixture": "Test fixture of StandIn::start: every authenticated user is cluster-admin. StandIn::start_strict leaves it out; delete it to get a real cluster's default policy."},
        },
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "Group", "apiGroup": RBAC_GROUP, "name": AUTHENTICATED}],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(method: Method, path_and_query: &str) -> Attributes {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let query: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect();
        Attributes::from_request(&method, path, &query)
    }

    fn short(a: &Attributes) -> (bool, &str, &str, &str, &str, &str, &str) {
        (
            a.resource_request,
            a.verb.as_str(),
            a.api_group.as_str(),
            a.namespace.as_str(),
            a.resource.as_str(),
            a.subresource.as_str(),
            a.name.as_str(),
        )
    }

    #[test]
    fn request_attributes_follow_requestinfo() {
        let cases = [
            (
                Method::GET,
                "/api/v1/namespaces/default/pods",
                (true, "list", "", "default", "pods", "", ""),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/default/pods?watch=true",
                (true, "watch", "", "default", "pods", "", ""),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/default/pods?watch=0",
                (true, "list", "", "default", "pods", "", ""),
            ),
            (
                Method::GET,
                "/api/v1/watch/namespaces/default/pods/web-0",
                (true, "watch", "", "default", "pods", "", "web-0"),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/default/pods?fieldSelector=metadata.name=web-1",
                (true, "list", "", "default", "pods", "", "web-1"),
            ),
            (
                Method::GET,
                "/api/v1/namespaces/default/pods/web-0",
                (true, "get", "", "default", "pods", "", "web-0"),
            ),
            (
                Method::POST,
                "/api/v1/namespaces/default/pods/web-0/exec",
                (true, "create", "", "default", "pods", "exec", "web-0"),
            ),
            (
                Method::DELETE,
                "/api/v1/namespaces/default/configmaps",
                (
                    true,
                    "deletecollection",
                    "",
                    "default",
                    "configmaps",
                    "",
                    "",
                ),
            ),
            (
                Method::PATCH,
                "/apis/apps/v1/namespaces/ke-system/deployments/tower",
                (
                    true,
                    "patch",
                    "apps",
                    "ke-system",
                    "deployments",
                    "",
                    "tower",
                ),
            ),
            (
                Method::PUT,
                "/api/v1/namespaces/default",
                (true, "update", "", "default", "namespaces", "", "default"),
            ),
            (
                Method::PUT,
                "/api/v1/namespaces/default/status",
                (
                    true,
                    "update",
                    "",
                    "default",
                    "namespaces",
                    "status",
                    "default",
                ),
            ),
            (
                Method::GET,
                "/apis/rbac.authorization.k8s.io/v1/clusterroles",
                (
                    true,
                    "list",
                    "rbac.authorization.k8s.io",
                    "",
                    "clusterroles",
                    "",
                    "",
                ),
            ),
            (
                Method::POST,
                "/api/v1/namespaces/ns/serviceaccounts/sa/token",
                (true, "create", "", "ns", "serviceaccounts", "token", "sa"),
            ),
            (
                Method::GET,
                "/apis/apps/v1",
                (false, "get", "", "", "", "", ""),
            ),
            (Method::GET, "/version", (false, "get", "", "", "", "", "")),
            (
                Method::HEAD,
                "/healthz",
                (false, "head", "", "", "", "", ""),
            ),
        ];
        for (method, path, want) in cases {
            assert_eq!(short(&attrs(method, path)), want, "{path}");
        }
    }

    fn user(name: &str, groups: &[&str]) -> UserInfo {
        UserInfo {
            name: name.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            ..UserInfo::default()
        }
    }

    #[test]
    fn rules_match_like_evaluation_helpers() {
        let rule = Rule::from_value(&json!({"verbs": ["get", "list"], "apiGroups": [""],
            "resources": ["pods", "*/log", "services/status"], "resourceNames": []}));
        assert!(rule.allows(&attrs(Method::GET, "/api/v1/namespaces/a/pods")));
        assert!(rule.allows(&attrs(Method::GET, "/api/v1/namespaces/a/pods/p/log")));
        assert!(rule.allows(&attrs(
            Method::GET,
            "/api/v1/namespaces/a/services/s/status"
        )));
        assert!(!rule.allows(&attrs(Method::GET, "/api/v1/namespaces/a/services/s")));
        assert!(!rule.allows(&attrs(Method::DELETE, "/api/v1/namespaces/a/pods/p")));
        assert!(!rule.allows(&attrs(Method::GET, "/apis/apps/v1/namespaces/a/pods")));
        let named = Rule::from_value(&json!({"verbs": ["*"], "apiGroups": ["*"],
            "resources": ["configmaps"], "resourceNames": ["one"]}));
        assert!(named.allows(&attrs(Method::GET, "/api/v1/namespaces/a/configmaps/one")));
        assert!(!named.allows(&attrs(Method::GET, "/api/v1/namespaces/a/configmaps/two")));
        assert!(!named.allows(&attrs(Method::GET, "/api/v1/namespaces/a/configmaps")));
        let urls = Rule::from_value(
            &json!({"verbs": ["get"], "nonResourceURLs": ["/healthz", "/apis/*"]}),
        );
        assert!(urls.allows(&attrs(Method::GET, "/healthz")));
        assert!(urls.allows(&attrs(Method::GET, "/apis/apps")));
        assert!(!urls.allows(&attrs(Method::GET, "/healthz/etcd")));
        assert!(!urls.allows(&attrs(Method::POST, "/healthz")));
        assert!(!urls.allows(&attrs(Method::GET, "/api/v1/namespaces/a/pods")));
    }

    #[test]
    fn bindings_apply_by_user_group_and_service_account() {
        let binding = Binding::from_value(&json!({"metadata": {"namespace": "ns"},
            "roleRef": {"kind": "Role", "name": "r"},
            "subjects": [{"kind": "User", "name": "alice"}, {"kind": "Group", "name": "devs"},
                         {"kind": "ServiceAccount", "name": "bot"}]}));
        assert!(binding.applies_to(&user("alice", &[]), "ns"));
        assert!(binding.applies_to(&user("bob", &["devs"]), "ns"));
        assert!(binding.applies_to(&user("system:serviceaccount:ns:bot", &[]), "ns"));
        assert!(!binding.applies_to(&user("system:serviceaccount:other:bot", &[]), "ns"));
        assert!(!binding.applies_to(&user("bob", &["ops"]), "ns"));
    }

    #[test]
    fn the_default_policy_allows_discovery_and_health_only() {
        let store = Store::seeded();
        let authz = Authorizer::default();
        let allowed =
            |u: &UserInfo, m: Method, p: &str| authz.authorize(&store, u, &attrs(m, p)).allowed;
        let anonymous = user(ANONYMOUS, &[UNAUTHENTICATED]);
        let alice = user("alice", &[AUTHENTICATED]);
        assert!(allowed(&anonymous, Method::GET, "/version"));
        assert!(allowed(&anonymous, Method::GET, "/healthz"));
        assert!(!allowed(&anonymous, Method::GET, "/api"));
        assert!(allowed(&alice, Method::GET, "/api"));
        assert!(allowed(&alice, Method::GET, "/apis/apps/v1"));
        assert!(!allowed(
            &alice,
            Method::GET,
            "/api/v1/namespaces/default/pods"
        ));
        assert!(!allowed(&alice, Method::GET, "/debug/bytes"));
        let admin = user("root", &[SYSTEM_MASTERS]);
        assert!(allowed(
            &admin,
            Method::DELETE,
            "/api/v1/namespaces/default"
        ));

        // A binding to a missing role is reported in the reason.
        store
            .create(
                Resource::ClusterRoleBindings,
                "",
                json!({"metadata": {"name": "dangling"},
                       "roleRef": {"kind": "ClusterRole", "name": "nope"},
                       "subjects": [{"kind": "User", "name": "alice"}]}),
            )
            .expect("create");
        let decision = authz.authorize(&store, &alice, &attrs(Method::GET, "/api/v1/pods"));
        assert!(!decision.allowed);
        assert_eq!(
            decision.reason,
            "RBAC: clusterrole.rbac.authorization.k8s.io \"nope\" not found"
        );
        // The cached policy follows writes.
        store
            .create(Resource::ClusterRoleBindings, "", permissive_fixture())
            .expect("create");
        assert!(allowed(
            &alice,
            Method::GET,
            "/api/v1/namespaces/default/pods"
        ));
    }

    #[test]
    fn coverage_follows_the_policy_comparator() {
        let owner = Rule::from_value(&json!({"verbs": ["get", "list"], "apiGroups": [""],
            "resources": ["pods", "*/status"]}));
        let covered = |sub: Value| {
            breakdown(&Rule::from_value(&sub))
                .iter()
                .all(|s| owner.covers(s))
        };
        assert!(covered(
            json!({"verbs": ["get"], "apiGroups": [""], "resources": ["pods"]})
        ));
        assert!(covered(
            json!({"verbs": ["list"], "apiGroups": [""], "resources": ["pods"], "resourceNames": ["a"]})
        ));
        assert!(covered(
            json!({"verbs": ["get"], "apiGroups": [""], "resources": ["services/status"]})
        ));
        assert!(!covered(
            json!({"verbs": ["delete"], "apiGroups": [""], "resources": ["pods"]})
        ));
        assert!(!covered(
            json!({"verbs": ["get"], "apiGroups": ["apps"], "resources": ["pods"]})
        ));
        assert!(!covered(
            json!({"verbs": ["get"], "nonResourceURLs": ["/healthz"]})
        ));
        let named = Rule::from_value(
            &json!({"verbs": ["get"], "apiGroups": [""], "resources": ["pods"], "resourceNames": ["a"]}),
        );
        assert!(!named.covers(&Rule::from_value(
            &json!({"verbs": ["get"], "apiGroups": [""], "resources": ["pods"]})
        )));
        let missing = compact(breakdown(&Rule::from_value(
            &json!({"verbs": ["delete", "patch"], "apiGroups": [""], "resources": ["pods"]}),
        )));
        assert_eq!(
            missing.iter().map(Rule::compact_string).collect::<Vec<_>>(),
            [r#"{APIGroups:[""], Resources:["pods"], Verbs:["delete" "patch"]}"#]
        );
    }

    #[test]
    fn forbidden_messages_are_the_apiservers() {
        let e = forbidden(
            "alice",
            &attrs(Method::GET, "/api/v1/namespaces/default/pods"),
            "",
        );
        assert_eq!(
            e.message,
            "pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        );
        assert_eq!((e.code, e.reason), (403, "Forbidden"));
        let e = forbidden(
            "bob",
            &attrs(
                Method::DELETE,
                "/apis/rbac.authorization.k8s.io/v1/clusterroles/x",
            ),
            "",
        );
        assert_eq!(
            e.message,
            "clusterroles.rbac.authorization.k8s.io \"x\" is forbidden: User \"bob\" cannot delete resource \"clusterroles\" in API group \"rbac.authorization.k8s.io\" at the cluster scope"
        );
        let v = e.to_value();
        assert_eq!(
            v["details"],
            json!({"name": "x", "group": "rbac.authorization.k8s.io", "kind": "clusterroles"})
        );
        let e = forbidden("system:anonymous", &attrs(Method::GET, "/api"), "");
        assert_eq!(
            e.message,
            "forbidden: User \"system:anonymous\" cannot get path \"/api\""
        );
        assert_eq!(e.to_value()["details"], json!({}));
    }
}
