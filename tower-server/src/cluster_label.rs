//! The label on what tower-server makes for one cluster (its kubesphere endpoint's
//! Service on the host, every object of its agent.yaml), and names made from a cluster's.
//!
//! A Cluster's name is a DNS subdomain of up to 253 characters; a label value and a DNS
//! label (a Service's name) hold at most 63 (apimachinery's `IsValidLabelValue`,
//! `IsDNS1035Label`), and the API server refuses an object with a longer one.

/// The label naming the cluster an object is for.
pub const CLUSTER_LABEL: &str = "tower.kubesphere.io/cluster";

/// The [`CLUSTER_LABEL`] value for `cluster`: its name, cut with a hash of the whole when
/// longer than a label value may be.
pub fn cluster_label(cluster: &str) -> String {
    within_63(cluster.to_owned(), cluster)
}

/// `name` if it has at most 63 characters, else its first 54 (without a trailing `-` or
/// `.`), `-` and 8 hex digits of the SHA-256 of `whole`: a DNS label and a label value
/// alike, when `name` is made of a DNS subdomain's characters.
pub(crate) fn within_63(name: String, whole: &str) -> String {
    if name.len() <= 63 {
        return name;
    }
    use sha2::Digest;
    let hash = hex::encode(&sha2::Sha256::digest(whole.as_bytes())[..4]);
    format!("{}-{hash}", name[..54].trim_end_matches(['-', '.']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_labels_are_label_values() {
        assert_eq!(cluster_label("eu.prod-1"), "eu.prod-1");
        let name = format!("{}.{}", "a".repeat(53), "b".repeat(60));
        let label = cluster_label(&name);
        assert_eq!(label.len(), 62, "{label}");
        assert!(
            label.starts_with(&"a".repeat(53)) && !label.contains(".-"),
            "{label}"
        );
        assert_ne!(label, cluster_label(&format!("{name}c")));
    }
}
