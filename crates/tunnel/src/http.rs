//! HTTP helpers both proxies (server frontend, agent) share: hop-by-hop header removal,
//! joining two upgraded connections, Kubernetes `Status` error bodies and error texts.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An error and each of its causes, `: `-separated: hyper's and hyper-util's errors say
/// what went wrong (`connection closed before message completed`) only in their sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A Kubernetes `Status` failure with `code`, a machine `reason` and a human `message`.
pub fn failure(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    let status = format!(
        "{{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{{}},\"status\":\"Failure\",\"message\":{},\"reason\":{},\"code\":{}}}",
        json_string(message),
        json_string(reason),
        code.as_u16()
    );
    let mut response = Response::new(Full::new(Bytes::from(status)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Copies bytes both ways between two upgraded connections until both are done, calling
/// `moved` whenever bytes arrive from either side (the activity an idle timeout watches).
pub async fn join_upgrades(
    a: hyper::upgrade::OnUpgrade,
    b: hyper::upgrade::OnUpgrade,
    moved: impl Fn() + Clone + Unpin,
) {
    let (a, b) = match tokio::try_join!(a, b) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut a = Touching {
        io: TokioIo::new(a),
        moved: moved.clone(),
    };
    let mut b = Touching {
        io: TokioIo::new(b),
        moved,
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}

/// I/O that calls `moved` after every read that brought bytes.
struct Touching<T, F> {
    io: T,
    moved: F,
}

impl<T: AsyncRead + Unpin, F: Fn() + Unpin> AsyncRead for Touching<T, F> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            (self.moved)();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin, F: Unpin> AsyncWrite for Touching<T, F> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, keeping `Connection: Upgrade` and `Upgrade` when asked.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let upgrading = headers.contains_key(header::UPGRADE);
    // Most messages carry none of them: one pass over the names present costs less than
    // a lookup per hop-by-hop name (1,400 instructions a call, twice per request on each
    // side, benches/reference/counts.sh).
    let hop_by_hop = |name: &HeaderName| HOP_BY_HOP.contains(name) || name == "keep-alive";
    if !upgrading && !headers.keys().any(hop_by_hop) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .filter(|name| !(upgrading && name == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    if upgrading {
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("Upgrade"),
        );
    }
}

/// Removes the front-proxy identity headers (`X-Remote-User`, `X-Remote-Group`,
/// `X-Remote-Extra-*`): an API server that trusts a request-header authenticator (and
/// ks-apiserver behind its own proxy) would take them as the caller's identity. Tower
/// never sets them, so whoever did is forging one.
pub fn strip_remote_identity(headers: &mut HeaderMap) {
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("x-remote-"))
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
}

/// The caller's forwarding headers are its own word, so they go (`Forwarded`,
/// `X-Forwarded-*`, `X-Real-Ip`); `X-Forwarded-For` is then set to `peer`, the one
/// address this hop saw ([`forwarded_for`]). The member's API server appends the agent's
/// address to it, so its audit log's sourceIPs read [caller, agent].
pub fn set_forwarded_for(headers: &mut HeaderMap, peer: HeaderValue) {
    let caller_said: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            name == "forwarded" || name == "x-real-ip" || name.starts_with("x-forwarded-")
        })
        .cloned()
        .collect();
    for name in caller_said {
        headers.remove(name);
    }
    headers.insert(X_FORWARDED_FOR, peer);
}

/// `peer` as an `X-Forwarded-For` value: made once per connection, since formatting an
/// address cost ~1 K instructions, 1 % of a small request (callgrind).
pub fn forwarded_for(peer: std::net::IpAddr) -> HeaderValue {
    // An address's text (digits, hex letters, '.', ':') is always a valid value.
    HeaderValue::from_str(&peer.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Parsed once, not on every request.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_but_upgrades_stay() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::ACCEPT, "application/json".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        let mut up = HeaderMap::new();
        up.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        up.insert(header::UPGRADE, "websocket".parse().unwrap());
        strip_hop_by_hop(&mut up);
        assert_eq!(up.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(up.get(header::CONNECTION).unwrap(), "Upgrade");
    }

    #[test]
    fn each_hop_by_hop_header_goes_on_its_own_and_others_stay() {
        // Without Connection too: no header may slip past the check for any at all.
        for name in HOP_BY_HOP
            .iter()
            .map(HeaderName::as_str)
            .chain(["keep-alive"])
        {
            let mut h = HeaderMap::new();
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "x".parse().unwrap(),
            );
            h.insert(header::ACCEPT, "application/json".parse().unwrap());
            strip_hop_by_hop(&mut h);
            assert_eq!(
                h.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
                ["accept"],
                "{name} alone"
            );
        }
    }

    #[test]
    fn identity_and_forwarding_headers_the_caller_sent_go() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("x-remote-user", "root"),
            ("X-Remote-Group", "system:masters"),
            ("x-remote-extra-scopes", "all"),
            ("forwarded", "for=10.0.0.1"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-host", "evil"),
            ("x-real-ip", "10.0.0.1"),
            ("accept", "application/json"),
        ] {
            h.append(HeaderName::try_from(name).unwrap(), value.parse().unwrap());
        }
        strip_remote_identity(&mut h);
        set_forwarded_for(&mut h, forwarded_for("192.0.2.7".parse().unwrap()));
        let mut left: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ("accept".to_owned(), "application/json".to_owned()),
                ("x-forwarded-for".to_owned(), "192.0.2.7".to_owned()),
            ]
        );
    }

    #[test]
    fn the_forwarded_address_is_written_whole_for_every_kind_of_address() {
        for address in [
            "192.0.2.7",
            "::1",
            "2001:db8::7",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let mut h = HeaderMap::new();
            set_forwarded_for(&mut h, forwarded_for(address.parse().unwrap()));
            assert_eq!(h[X_FORWARDED_FOR], address);
        }
    }

    #[test]
    fn failure_is_a_status_object() {
        let r = failure(StatusCode::FORBIDDEN, "Forbidden", "say \"no\"\\");
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let body = futures::executor::block_on(http_body_util::BodyExt::collect(r.into_body()))
            .unwrap()
            .to_bytes();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"say \"no\"\\","reason":"Forbidden","code":403}"#
        );
        assert_eq!(json_string("tab\tend"), r#""tab\u0009end""#);
    }
}
