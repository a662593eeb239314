//! Cluster names: DNS-1123 subdomains, checked wherever a name enters Tower.

/// The rule, quoted by every refusal.
pub const CLUSTER_NAME_RULE: &str = "a cluster name must consist of lowercase letters, digits, '-' and '.', start and end with a letter or digit, and be at most 253 characters (a DNS-1123 subdomain)";

/// A name that breaks [`CLUSTER_NAME_RULE`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cluster name {name:?}: {CLUSTER_NAME_RULE}")]
pub struct InvalidClusterName {
    /// The refused name, shortened to 64 characters for the message.
    pub name: String,
}

/// Checks `name` against [`CLUSTER_NAME_RULE`].
pub fn validate_cluster_name(name: &str) -> Result<(), InvalidClusterName> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        });
    if ok {
        Ok(())
    } else {
        Err(InvalidClusterName {
            name: name.chars().take(64).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_subdomains_and_refuses_the_rest() {
        for good in ["host", "member-1", "a.b.c", "0", "idc-01.bj"] {
            assert!(validate_cluster_name(good).is_ok(), "{good}");
        }
        for bad in [
            "", "..", ".", "a..b", "-a", "a-", "A", "a_b", "a/b", "a%2fb", ".hidden", "a.",
            "ümlaut", "a b",
        ] {
            let err = validate_cluster_name(bad).expect_err(bad);
            assert!(err.to_string().contains("DNS-1123 subdomain"), "{err}");
        }
        assert!(validate_cluster_name(&"a".repeat(254)).is_err());
        assert!(
            validate_cluster_name(&"a".repeat(64)).is_err(),
            "label over 63"
        );
    }
}
