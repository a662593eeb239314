//! The resource types the stand-in serves, and what the apiserver knows of each: its
//! group, version, kind, names and which subresources it has.

/// The group of the KubeSphere multi-cluster API (`Cluster` objects).
const KUBESPHERE_CLUSTER_GROUP: &str = "cluster.kubesphere.io";
/// The version of [`KUBESPHERE_CLUSTER_GROUP`] that is served.
const KUBESPHERE_CLUSTER_VERSION: &str = "v1alpha1";
/// The group of KubeSphere's identities (`User` objects).
const KUBESPHERE_IAM_GROUP: &str = "iam.kubesphere.io";
/// The RBAC API group.
pub(crate) const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

/// A resource type the stand-in serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Resource {
    /// Core `v1` `Namespace`, cluster-scoped.
    Namespaces,
    /// Core `v1` `Pod`.
    Pods,
    /// Core `v1` `ConfigMap`.
    ConfigMaps,
    /// Core `v1` `Service`, with a `status` subresource and the `proxy` subresource
    /// (`crate::service_proxy`).
    Services,
    /// Core `v1` `Endpoints`, stored as given: no endpoints controller fills them in from a
    /// Service's selector and its ready pods; a test writes them as that controller would.
    Endpoints,
    /// KubeSphere's `cluster.kubesphere.io/v1alpha1` `Cluster`, cluster-scoped, pruned and
    /// checked against its CRD's schema (`store::crd`), with a `status` subresource
    /// (served like a custom resource).
    Clusters,
    /// `apps/v1` `Deployment`, stored as given (no controller acts on it), with a `status`
    /// subresource.
    Deployments,
    /// Core `v1` `Secret`: `stringData` is folded into base64 `data` on every write and
    /// `type` defaults to `Opaque`.
    Secrets,
    /// Core `v1` `ServiceAccount`, with the `token` subresource (TokenRequest, see
    /// `crate::auth`). Every namespace gets a `default` one when it is created.
    ServiceAccounts,
    /// `rbac.authorization.k8s.io/v1` `ClusterRole`, cluster-scoped.
    ClusterRoles,
    /// `rbac.authorization.k8s.io/v1` `ClusterRoleBinding`, cluster-scoped.
    ClusterRoleBindings,
    /// `rbac.authorization.k8s.io/v1` `Role`.
    Roles,
    /// `rbac.authorization.k8s.io/v1` `RoleBinding`.
    RoleBindings,
    /// `policy/v1` `PodDisruptionBudget`, with a `status` subresource (no controller fills
    /// it in beyond the zero defaults).
    PodDisruptionBudgets,
    /// `networking.k8s.io/v1` `NetworkPolicy`, stored as given (no network to enforce it).
    NetworkPolicies,
    /// Core `v1` `Node`, cluster-scoped: one seeded, `stand-in-node`, where every pod runs.
    Nodes,
    /// KubeSphere's `iam.kubesphere.io/v1alpha2` `User`, cluster-scoped, pruned and checked
    /// against KubeSphere 3.4's CRD (`store::crd`: `spec.email` required, `spec.groups`,
    /// `status.state` Active/Disabled, written by its controllers without a status
    /// subresource).
    Users,
}

impl Resource {
    /// Every resource, in discovery order.
    pub(crate) const ALL: [Resource; 17] = [
        Resource::ConfigMaps,
        Resource::Endpoints,
        Resource::Namespaces,
        Resource::Nodes,
        Resource::Pods,
        Resource::Secrets,
        Resource::ServiceAccounts,
        Resource::Services,
        Resource::Clusters,
        Resource::Deployments,
        Resource::PodDisruptionBudgets,
        Resource::NetworkPolicies,
        Resource::ClusterRoleBindings,
        Resource::ClusterRoles,
        Resource::RoleBindings,
        Resource::Roles,
        Resource::Users,
    ];

    /// The resource served at `/api/v1/{plural}` (`group_version` `v1`) or
    /// `/apis/{group_version}/{plural}`.
    pub(crate) fn lookup(group_version: &str, plural: &str) -> Option<Resource> {
        Resource::ALL
            .into_iter()
            .find(|r| r.api_version() == group_version && r.plural() == plural)
    }

    pub(crate) fn plural(self) -> &'static str {
        match self {
            Resource::Namespaces => "namespaces",
            Resource::Pods => "pods",
            Resource::ConfigMaps => "configmaps",
            Resource::Services => "services",
            Resource::Endpoints => "endpoints",
            Resource::Clusters => "clusters",
            Resource::Deployments => "deployments",
            Resource::Secrets => "secrets",
            Resource::ServiceAccounts => "serviceaccounts",
            Resource::ClusterRoles => "clusterroles",
            Resource::ClusterRoleBindings => "clusterrolebindings",
            Resource::Roles => "roles",
            Resource::RoleBindings => "rolebindings",
            Resource::PodDisruptionBudgets => "poddisruptionbudgets",
            Resource::NetworkPolicies => "networkpolicies",
            Resource::Nodes => "nodes",
            Resource::Users => "users",
        }
    }

    pub(crate) fn singular(self) -> &'static str {
        match self {
            Resource::Namespaces => "namespace",
            Resource::Pods => "pod",
            Resource::ConfigMaps => "configmap",
            Resource::Services => "service",
            Resource::Endpoints => "endpoints",
            Resource::Clusters => "cluster",
            Resource::Deployments => "deployment",
            Resource::Secrets => "secret",
            Resource::ServiceAccounts => "serviceaccount",
            Resource::ClusterRoles => "clusterrole",
            Resource::ClusterRoleBindings => "clusterrolebinding",
            Resource::Roles => "role",
            Resource::RoleBindings => "rolebinding",
            Resource::PodDisruptionBudgets => "poddisruptionbudget",
            Resource::NetworkPolicies => "networkpolicy",
            Resource::Nodes => "node",
            Resource::Users => "user",
        }
    }

    pub(crate) fn kind(self) -> &'static str {
        match self {
            Resource::Namespaces => "Namespace",
            Resource::Pods => "Pod",
            Resource::ConfigMaps => "ConfigMap",
            Resource::Services => "Service",
            Resource::Endpoints => "Endpoints",
            Resource::Clusters => "Cluster",
            Resource::Deployments => "Deployment",
            Resource::Secrets => "Secret",
            Resource::ServiceAccounts => "ServiceAccount",
            Resource::ClusterRoles => "ClusterRole",
            Resource::ClusterRoleBindings => "ClusterRoleBinding",
            Resource::Roles => "Role",
            Resource::RoleBindings => "RoleBinding",
            Resource::PodDisruptionBudgets => "PodDisruptionBudget",
            Resource::NetworkPolicies => "NetworkPolicy",
            Resource::Nodes => "Node",
            Resource::Users => "User",
        }
    }

    pub(crate) fn list_kind(self) -> String {
        format!("{}List", self.kind())
    }

    /// The API group; empty for the core group.
    pub(crate) fn group(self) -> &'static str {
        match self {
            Resource::Clusters => KUBESPHERE_CLUSTER_GROUP,
            Resource::Deployments => "apps",
            Resource::ClusterRoles
            | Resource::ClusterRoleBindings
            | Resource::Roles
            | Resource::RoleBindings => RBAC_GROUP,
            Resource::PodDisruptionBudgets => "policy",
            Resource::NetworkPolicies => "networking.k8s.io",
            Resource::Users => KUBESPHERE_IAM_GROUP,
            _ => "",
        }
    }

    /// The API version within the group.
    pub(crate) fn version(self) -> &'static str {
        match self {
            Resource::Clusters => KUBESPHERE_CLUSTER_VERSION,
            Resource::Users => "v1alpha2",
            _ => "v1",
        }
    }

    /// The objects' `apiVersion`: `v1` or `group/version`.
    pub(crate) fn api_version(self) -> &'static str {
        match self {
            Resource::Clusters => "cluster.kubesphere.io/v1alpha1",
            Resource::Deployments => "apps/v1",
            Resource::ClusterRoles
            | Resource::ClusterRoleBindings
            | Resource::Roles
            | Resource::RoleBindings => "rbac.authorization.k8s.io/v1",
            Resource::PodDisruptionBudgets => "policy/v1",
            Resource::NetworkPolicies => "networking.k8s.io/v1",
            Resource::Users => "iam.kubesphere.io/v1alpha2",
            _ => "v1",
        }
    }

    /// How error messages name the resource: `pods`, or `clusters.cluster.kubesphere.io`.
    pub(crate) fn qualified_plural(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            group => format!("{}.{group}", self.plural()),
        }
    }

    pub(crate) fn short_names(self) -> &'static [&'static str] {
        match self {
            Resource::Namespaces => &["ns"],
            Resource::Pods => &["po"],
            Resource::ConfigMaps => &["cm"],
            Resource::Services => &["svc"],
            Resource::Endpoints => &["ep"],
            Resource::Deployments => &["deploy"],
            Resource::ServiceAccounts => &["sa"],
            Resource::PodDisruptionBudgets => &["pdb"],
            Resource::NetworkPolicies => &["netpol"],
            Resource::Nodes => &["no"],
            Resource::Clusters
            | Resource::Users
            | Resource::Secrets
            | Resource::ClusterRoles
            | Resource::ClusterRoleBindings
            | Resource::Roles
            | Resource::RoleBindings => &[],
        }
    }

    pub(crate) fn namespaced(self) -> bool {
        !matches!(
            self,
            Resource::Namespaces
                | Resource::Nodes
                | Resource::Clusters
                | Resource::Users
                | Resource::ClusterRoles
                | Resource::ClusterRoleBindings
        )
    }

    /// The four RBAC kinds, whose writes change what the authorizer decides.
    pub(crate) fn is_rbac(self) -> bool {
        self.group() == RBAC_GROUP
    }

    /// Whether `…/{name}/status` is served: writes there change only `.status`, and writes
    /// to the object itself keep the stored `.status`.
    pub(crate) fn has_status_subresource(self) -> bool {
        matches!(
            self,
            Resource::Services
                | Resource::Clusters
                | Resource::Deployments
                | Resource::PodDisruptionBudgets
        )
    }

    /// Custom resources (not built-in types) refuse a PUT without a
    /// `metadata.resourceVersion` and count `metadata.generation` up on spec changes.
    pub(crate) fn is_custom(self) -> bool {
        matches!(self, Resource::Clusters | Resource::Users)
    }
}
