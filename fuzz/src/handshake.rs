//! The handshake's header parsing: arbitrary header values never panic, and a hello
//! that parses re-renders to headers that parse to the same hello.
use tower_proto::handshake::{self, ServerHello};

/// Checks one input.
pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (id, count, keepalive) = (parts.next(), parts.next(), parts.next());
    let _ = handshake::upgrade_matches(&text);
    let _ = handshake::list(&text).count();
    let lookup = |name: &str| match name {
        handshake::HEADER_SERVER_ID => id,
        handshake::HEADER_SERVER_COUNT => count,
        handshake::HEADER_KEEPALIVE_MS => keepalive,
        _ => None,
    };
    if let Ok(hello) = ServerHello::from_headers(lookup) {
        let headers = hello.headers();
        let again = ServerHello::from_headers(|name| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        });
        assert_eq!(again, Ok(hello));
    }
}
