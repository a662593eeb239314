//! The tunnel handshake: an HTTP/1.1 upgrade, so curl and L7 load balancers understand it.
//!
//! ```text
//! agent → server   GET /v1/tunnel HTTP/1.1
//!                  Connection: Upgrade
//!                  Upgrade: tower-tunnel/1
//!                  Authorization: Bearer <agent JWT>
//!                  Tower-Cluster: <--name>
//!                  Tower-Agent-Version: 0.1.0
//!                  Tower-Capabilities: control,drain,http2
//!                  Tower-Targets: kubernetes,kubesphere
//!                  Tower-Held-Servers: tower-0,tower-2   (replicas already held)
//! server → agent   101 Switching Protocols            (then yamux)
//!                  Tower-Server-Id, Tower-Server-Count, Tower-Keepalive-Ms
//!            or    400/401/403/404/409/426/503 with a plain-text reason
//! ```

/// The path agents dial.
pub const TUNNEL_PATH: &str = "/v1/tunnel";
/// The `Upgrade` token of this protocol version.
pub const UPGRADE_PROTOCOL: &str = "tower-tunnel/1";
/// The cluster name the agent was started with (`--name`); must equal its token's `sub`.
pub const HEADER_CLUSTER: &str = "tower-cluster";
/// The agent's version.
pub const HEADER_AGENT_VERSION: &str = "tower-agent-version";
/// Comma-separated capabilities the agent supports.
pub const HEADER_CAPABILITIES: &str = "tower-capabilities";
/// Comma-separated targets the agent serves.
pub const HEADER_TARGETS: &str = "tower-targets";
/// Comma-separated ids of the replicas this agent already holds a tunnel to; a replica
/// that finds its own id here answers 409 instead of replacing the tunnel it has.
pub const HEADER_HELD: &str = "tower-held-servers";
/// The replica's id, in the 101.
pub const HEADER_SERVER_ID: &str = "tower-server-id";
/// The replica count the server knows of, in the 101.
pub const HEADER_SERVER_COUNT: &str = "tower-server-count";
/// The keepalive interval the server wants, in milliseconds, in the 101.
pub const HEADER_KEEPALIVE_MS: &str = "tower-keepalive-ms";
/// Which refusal a 409 is ([`Refusal::as_str`]): `duplicate` or `conflict`.
pub const HEADER_REFUSAL: &str = "tower-refusal";

/// The agent serves [`crate::StreamKind::Http2`] streams: the server may multiplex
/// requests on one stream instead of opening a stream per request in flight.
pub const CAPABILITY_HTTP2: &str = "http2";

/// The agent takes who a caller is from the server's identity assertion (a JWT signed
/// with the cluster's own key, header `Tower-Identity`), not from the caller's token:
/// members hold no jwtSecret. The server refuses agents that do not say so.
pub const CAPABILITY_IDENTITY: &str = "identity";

/// Capabilities this version of the protocol defines.
pub const CAPABILITIES: &[&str] = &["control", "drain", CAPABILITY_HTTP2, CAPABILITY_IDENTITY];

/// Why a server refuses a tunnel, and the HTTP status that says so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request is not a well-formed tunnel upgrade.
    BadRequest,
    /// The agent token is missing, malformed, forged or expired.
    BadToken,
    /// The token is valid but this cluster may not connect (name mismatch, not allowed).
    Forbidden,
    /// The cluster is not known to the registry.
    UnknownCluster,
    /// The agent speaks a protocol version the server does not.
    UnsupportedVersion,
    /// The server is draining; dial again (another replica will answer).
    Draining,
    /// The agent already holds a tunnel to this replica (the load balancer sent it back).
    Duplicate,
    /// Another agent holds a live tunnel for this cluster, and answered a ping just now:
    /// a second agent with the same token does not replace it.
    Conflict,
}

impl Refusal {
    /// The HTTP status of this refusal.
    pub fn status(self) -> u16 {
        match self {
            Refusal::BadRequest => 400,
            Refusal::BadToken => 401,
            Refusal::Forbidden => 403,
            Refusal::UnknownCluster => 404,
            Refusal::UnsupportedVersion => 426,
            Refusal::Draining => 503,
            Refusal::Duplicate | Refusal::Conflict => 409,
        }
    }

    /// The refusal's name, as [`HEADER_REFUSAL`] carries it and metrics label it.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::BadToken => "bad_token",
            Refusal::Forbidden => "forbidden",
            Refusal::UnknownCluster => "unknown_cluster",
            Refusal::UnsupportedVersion => "unsupported_version",
            Refusal::Draining => "draining",
            Refusal::Duplicate => "duplicate",
            Refusal::Conflict => "conflict",
        }
    }

    /// The refusal an HTTP status stands for, if any (409 without a [`HEADER_REFUSAL`]
    /// is [`Refusal::Duplicate`]).
    pub fn from_status(status: u16) -> Option<Self> {
        Some(match status {
            400 => Refusal::BadRequest,
            401 => Refusal::BadToken,
            403 => Refusal::Forbidden,
            404 => Refusal::UnknownCluster,
            426 => Refusal::UnsupportedVersion,
            503 => Refusal::Draining,
            409 => Refusal::Duplicate,
            _ => return None,
        })
    }

    /// Whether dialing again unchanged can succeed (a draining or restarting server),
    /// as opposed to a refusal only a change of configuration fixes.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Refusal::Draining | Refusal::Duplicate | Refusal::Conflict
        )
    }
}

/// What the server tells the agent in its 101.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// The replica's id.
    pub server_id: String,
    /// How many replicas serve the published address.
    pub server_count: u16,
    /// The keepalive interval the server wants, in milliseconds.
    pub keepalive_ms: u64,
}

impl ServerHello {
    /// The headers that carry this hello.
    pub fn headers(&self) -> [(&'static str, String); 3] {
        [
            (HEADER_SERVER_ID, self.server_id.clone()),
            (HEADER_SERVER_COUNT, self.server_count.to_string()),
            (HEADER_KEEPALIVE_MS, self.keepalive_ms.to_string()),
        ]
    }

    /// Reads a hello from a header lookup; `Err` names the missing or malformed header.
    pub fn from_headers<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, &'static str> {
        let server_id = get(HEADER_SERVER_ID).ok_or(HEADER_SERVER_ID)?;
        let server_count = get(HEADER_SERVER_COUNT)
            .and_then(|v| v.trim().parse().ok())
            .filter(|n| *n > 0)
            .ok_or(HEADER_SERVER_COUNT)?;
        let keepalive_ms = get(HEADER_KEEPALIVE_MS)
            .and_then(|v| v.trim().parse().ok())
            .filter(|n| *n > 0)
            .ok_or(HEADER_KEEPALIVE_MS)?;
        Ok(ServerHello {
            server_id: server_id.to_owned(),
            server_count,
            keepalive_ms,
        })
    }
}

/// Whether an `Upgrade` header value asks for this protocol (a comma-separated list,
/// compared case-insensitively as RFC 9110 says).
pub fn upgrade_matches(value: &str) -> bool {
    value
        .split(',')
        .any(|p| p.trim().eq_ignore_ascii_case(UPGRADE_PROTOCOL))
}

/// Splits a comma-separated header value into its trimmed, non-empty items.
pub fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hello_round_trips_through_headers() {
        let hello = ServerHello {
            server_id: "tower-0".into(),
            server_count: 3,
            keepalive_ms: 5000,
        };
        let headers = hello.headers();
        let got = ServerHello::from_headers(|name| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        })
        .unwrap();
        assert_eq!(got, hello);
    }

    #[test]
    fn hello_names_the_bad_header() {
        let err = ServerHello::from_headers(|name| match name {
            HEADER_SERVER_ID => Some("a"),
            HEADER_SERVER_COUNT => Some("0"),
            _ => Some("10"),
        });
        assert_eq!(err, Err(HEADER_SERVER_COUNT));
    }

    #[test]
    fn refusals_map_to_statuses_and_back() {
        for r in [
            Refusal::BadRequest,
            Refusal::BadToken,
            Refusal::Forbidden,
            Refusal::UnknownCluster,
            Refusal::UnsupportedVersion,
            Refusal::Draining,
            Refusal::Duplicate,
        ] {
            assert_eq!(Refusal::from_status(r.status()), Some(r));
        }
        assert_eq!(Refusal::from_status(200), None);
    }

    /// Reads a hello back from the headers `hello` writes, each value passed through `f`.
    fn reread(
        hello: &ServerHello,
        f: impl Fn(&str) -> String,
    ) -> Result<ServerHello, &'static str> {
        let headers: Vec<(&str, String)> = hello
            .headers()
            .into_iter()
            .map(|(n, v)| (n, f(&v)))
            .collect();
        ServerHello::from_headers(|name| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        })
    }

    proptest! {
        #[test]
        fn any_hello_round_trips_through_headers(
            server_id in "[!-~]{1,64}",
            server_count in 1..=u16::MAX,
            keepalive_ms in 1..=u64::MAX,
        ) {
            let hello = ServerHello { server_id, server_count, keepalive_ms };
            let names: Vec<&str> = hello.headers().iter().map(|(n, _)| *n).collect();
            prop_assert_eq!(names, [HEADER_SERVER_ID, HEADER_SERVER_COUNT, HEADER_KEEPALIVE_MS]);
            prop_assert_eq!(reread(&hello, str::to_owned), Ok(hello.clone()));
            // Numbers survive the optional whitespace an HTTP stack may leave around them.
            let padded = reread(&hello, |v| if v == hello.server_id { v.to_owned() } else { format!(" {v}\t") });
            prop_assert_eq!(padded, Ok(hello));
        }

        #[test]
        fn a_zero_count_or_keepalive_is_refused_by_name(
            server_id in "[!-~]{1,64}",
            server_count in 0..=u16::MAX,
            keepalive_ms in 0..=u64::MAX,
            zero_count in any::<bool>(),
        ) {
            let hello = if zero_count {
                ServerHello { server_id, server_count: 0, keepalive_ms }
            } else {
                ServerHello { server_id, server_count: server_count.max(1), keepalive_ms: 0 }
            };
            let want = if zero_count { HEADER_SERVER_COUNT } else { HEADER_KEEPALIVE_MS };
            prop_assert_eq!(reread(&hello, str::to_owned), Err(want));
        }

        #[test]
        fn comma_lists_round_trip(items in proptest::collection::vec("[a-z0-9][a-z0-9.-]{0,20}", 0..10)) {
            // What the agent writes (`Tower-Targets`, `Tower-Held-Servers`, capabilities)
            // and the server reads back.
            let joined = items.join(",");
            prop_assert_eq!(list(&joined).collect::<Vec<_>>(), items.clone());
            let spaced = items.join(" , ");
            prop_assert_eq!(list(&spaced).collect::<Vec<_>>(), items);
        }
    }

    #[test]
    fn upgrade_token_is_matched_in_a_list() {
        assert!(upgrade_matches("h2c, Tower-Tunnel/1"));
        assert!(!upgrade_matches("tower-tunnel/2"));
        assert_eq!(list(" a, ,b ").collect::<Vec<_>>(), ["a", "b"]);
    }
}
