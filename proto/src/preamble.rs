//! The per-stream preamble: the first bytes on every yamux stream the server opens.
//!
//! ```text
//! +---------+------+----------------+---------------------------------------+
//! | version | kind | body length    | body: fields, each tag u8, len u16, … |
//! |   u8    |  u8  | u16 big-endian | (unknown tags are skipped)            |
//! +---------+------+----------------+---------------------------------------+
//! ```
//! Fields: `1` target name (required for [`StreamKind::Http`] and [`StreamKind::Http2`]),
//! `2` id of the server replica that opened the stream. After the preamble an HTTP stream
//! carries plain HTTP/1.1 (so upgrades work), an HTTP/2 stream carries one HTTP/2
//! connection (prior knowledge, no upgrades) with many requests multiplexed on it, and a
//! control stream carries [`crate::ControlMessage`]s.
//!
//! The caller's identity is deliberately *not* a preamble field: the server pools HTTP
//! streams like keep-alive connections, so one stream carries requests of many users.
//! Identity travels with each request (its bearer JWT), which the agent verifies itself.

use bytes::{Buf, BufMut};

use crate::DecodeError;

/// The preamble version this crate writes and reads.
pub const VERSION: u8 = 1;
/// Largest body a preamble may carry.
pub const MAX_BODY: usize = 1024;
/// Longest target name (a DNS label).
pub const MAX_TARGET: usize = 63;
/// The target every agent serves: its cluster's kube-apiserver.
pub const KUBERNETES_TARGET: &str = "kubernetes";
/// Largest header block either end of an [`StreamKind::Http2`] stream accepts (its
/// `SETTINGS_MAX_HEADER_LIST_SIZE`); callers' headers were bounded by the server's
/// `--max-header-bytes` before they entered the tunnel.
pub const HTTP2_MAX_HEADER_LIST: u32 = 1024 * 1024;

const TAG_TARGET: u8 = 1;
const TAG_SERVER_ID: u8 = 2;
const HEADER_LEN: usize = 4;

/// What a stream carries after its preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// HTTP/1.1 requests for a target, one at a time; upgrades (exec, port-forward).
    Http,
    /// Control messages (keepalive, drain, server info); one per tunnel.
    Control,
    /// One HTTP/2 connection for a target: many requests at once on one stream. Only
    /// toward agents that announce [`crate::handshake::CAPABILITY_HTTP2`].
    Http2,
}

impl StreamKind {
    fn code(self) -> u8 {
        match self {
            StreamKind::Http => 1,
            StreamKind::Control => 2,
            StreamKind::Http2 => 3,
        }
    }

    fn from_code(code: u8) -> Result<Self, DecodeError> {
        match code {
            1 => Ok(StreamKind::Http),
            2 => Ok(StreamKind::Control),
            3 => Ok(StreamKind::Http2),
            _ => Err(DecodeError::Invalid {
                what: "stream kind",
                reason: "unknown code",
            }),
        }
    }
}

/// The header that starts a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    /// What the stream carries.
    pub kind: StreamKind,
    /// The upstream the agent should connect the stream to (empty for control streams).
    pub target: String,
    /// The server replica that opened the stream (for the agent's logs).
    pub server_id: String,
}

impl Preamble {
    /// A preamble for an HTTP stream toward `target`.
    pub fn http(target: impl Into<String>, server_id: impl Into<String>) -> Self {
        Preamble {
            kind: StreamKind::Http,
            target: target.into(),
            server_id: server_id.into(),
        }
    }

    /// A preamble for an HTTP/2 stream toward `target`.
    pub fn http2(target: impl Into<String>, server_id: impl Into<String>) -> Self {
        Preamble {
            kind: StreamKind::Http2,
            target: target.into(),
            server_id: server_id.into(),
        }
    }

    /// The preamble of a tunnel's control stream.
    pub fn control(server_id: impl Into<String>) -> Self {
        Preamble {
            kind: StreamKind::Control,
            target: String::new(),
            server_id: server_id.into(),
        }
    }

    /// Appends the encoded preamble to `dst`.
    ///
    /// Fails if a field breaks the limits [`Preamble::decode`] enforces, so that
    /// nothing is ever written that the other side would refuse.
    pub fn encode(&self, dst: &mut impl BufMut) -> Result<(), DecodeError> {
        validate_target(self.kind, &self.target)?;
        let body_len = field_len(&self.target) + field_len(&self.server_id);
        if body_len > MAX_BODY {
            return Err(DecodeError::TooLong {
                what: "preamble body",
                len: body_len,
                max: MAX_BODY,
            });
        }
        dst.put_u8(VERSION);
        dst.put_u8(self.kind.code());
        dst.put_u16(body_len as u16);
        put_field(dst, TAG_TARGET, &self.target);
        put_field(dst, TAG_SERVER_ID, &self.server_id);
        Ok(())
    }

    /// Decodes a preamble from the front of `src`.
    ///
    /// Returns `Ok(None)` and consumes nothing while `src` holds only part of one;
    /// on success consumes exactly the preamble's bytes.
    pub fn decode(src: &mut impl Buf) -> Result<Option<Self>, DecodeError> {
        let found = if src.chunk().len() == src.remaining() {
            decode_contiguous(src.chunk())?
        } else {
            // A chained buffer: look at a contiguous copy of what a preamble can span.
            let mut copy = vec![0; src.remaining().min(HEADER_LEN + MAX_BODY)];
            crate::peek(src, &mut copy);
            decode_contiguous(&copy)?
        };
        Ok(found.map(|(preamble, used)| {
            src.advance(used);
            preamble
        }))
    }
}

fn decode_contiguous(bytes: &[u8]) -> Result<Option<(Preamble, usize)>, DecodeError> {
    let Some(&version) = bytes.first() else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    if bytes.len() < HEADER_LEN {
        return Ok(None);
    }
    let kind = StreamKind::from_code(bytes[1])?;
    let body_len = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
    if body_len > MAX_BODY {
        return Err(DecodeError::TooLong {
            what: "preamble body",
            len: body_len,
            max: MAX_BODY,
        });
    }
    let Some(mut body) = bytes.get(HEADER_LEN..HEADER_LEN + body_len) else {
        return Ok(None);
    };
    let mut target = None;
    let mut server_id = None;
    while !body.is_empty() {
        if body.len() < 3 {
            return Err(DecodeError::Invalid {
                what: "preamble field",
                reason: "truncated field header",
            });
        }
        let tag = body[0];
        let len = u16::from_be_bytes([body[1], body[2]]) as usize;
        let Some(value) = body.get(3..3 + len) else {
            return Err(DecodeError::Invalid {
                what: "preamble field",
                reason: "field runs past the body",
            });
        };
        let slot = match tag {
            TAG_TARGET => &mut target,
            TAG_SERVER_ID => &mut server_id,
            _ => {
                body = &body[3 + len..];
                continue;
            }
        };
        if slot.is_some() {
            return Err(DecodeError::Invalid {
                what: "preamble field",
                reason: "field repeated",
            });
        }
        let text = std::str::from_utf8(value).map_err(|_| DecodeError::Invalid {
            what: "preamble field",
            reason: "not UTF-8",
        })?;
        *slot = Some(text.to_owned());
        body = &body[3 + len..];
    }
    let preamble = Preamble {
        kind,
        target: target.unwrap_or_default(),
        server_id: server_id.unwrap_or_default(),
    };
    validate_target(kind, &preamble.target)?;
    Ok(Some((preamble, HEADER_LEN + body_len)))
}

fn validate_target(kind: StreamKind, target: &str) -> Result<(), DecodeError> {
    match kind {
        StreamKind::Control if target.is_empty() => Ok(()),
        StreamKind::Control => Err(DecodeError::Invalid {
            what: "target",
            reason: "a control stream has no target",
        }),
        StreamKind::Http | StreamKind::Http2 => {
            if target.len() > MAX_TARGET {
                return Err(DecodeError::TooLong {
                    what: "target",
                    len: target.len(),
                    max: MAX_TARGET,
                });
            }
            if is_target_name(target) {
                Ok(())
            } else {
                Err(DecodeError::Invalid {
                    what: "target",
                    reason: "must be a DNS label: lowercase letters, digits and '-'",
                })
            }
        }
    }
}

/// Whether `name` is a valid target name: a DNS-1123 label.
pub fn is_target_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_TARGET
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

fn field_len(value: &str) -> usize {
    if value.is_empty() { 0 } else { 3 + value.len() }
}

fn put_field(dst: &mut impl BufMut, tag: u8, value: &str) {
    if value.is_empty() {
        return;
    }
    dst.put_u8(tag);
    dst.put_u16(value.len() as u16);
    dst.put_slice(value.as_bytes());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::BytesMut;
    use proptest::prelude::*;

    fn encoded(p: &Preamble) -> BytesMut {
        let mut buf = BytesMut::new();
        p.encode(&mut buf).unwrap();
        buf
    }

    #[test]
    fn round_trips_and_consumes_exactly_its_bytes() {
        let p = Preamble::http("kubernetes", "tower-0");
        let mut buf = encoded(&p);
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(Preamble::decode(&mut buf).unwrap(), Some(p));
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn every_strict_prefix_needs_more_and_consumes_nothing() {
        let full = encoded(&Preamble::http("kubesphere", "a"));
        for n in 0..full.len() {
            let mut part = &full[..n];
            assert_eq!(Preamble::decode(&mut part).unwrap(), None, "prefix {n}");
            assert_eq!(part.len(), n);
        }
    }

    #[test]
    fn refuses_bad_version_kind_and_target() {
        assert_eq!(
            Preamble::decode(&mut &[9u8, 1, 0, 0][..]),
            Err(DecodeError::UnsupportedVersion(9))
        );
        assert!(matches!(
            Preamble::decode(&mut &[1u8, 7, 0, 0][..]),
            Err(DecodeError::Invalid {
                what: "stream kind",
                ..
            })
        ));
        // An HTTP stream (either version) with no target.
        for kind in [1u8, 3] {
            assert!(matches!(
                Preamble::decode(&mut &[1u8, kind, 0, 0][..]),
                Err(DecodeError::Invalid { what: "target", .. })
            ));
        }
        let mut bad = BytesMut::new();
        bad.extend_from_slice(&[1, 1, 0, 6, 1, 0, 3]);
        bad.extend_from_slice(b"../");
        assert!(matches!(
            Preamble::decode(&mut bad),
            Err(DecodeError::Invalid { what: "target", .. })
        ));
        assert!(
            Preamble::http("Bad_Name", "")
                .encode(&mut BytesMut::new())
                .is_err()
        );
    }

    #[test]
    fn refuses_oversized_body_before_it_arrives() {
        assert!(matches!(
            Preamble::decode(&mut &[1u8, 1, 0xff, 0xff][..]),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn skips_unknown_fields() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[1, 1, 0, 15, 9, 0, 3, b'x', b'y', b'z', 1, 0, 3]);
        buf.extend_from_slice(b"k8s");
        buf.extend_from_slice(&[2, 0, 0]);
        assert_eq!(
            Preamble::decode(&mut buf).unwrap(),
            Some(Preamble::http("k8s", ""))
        );
    }

    #[test]
    fn decodes_across_chunk_boundaries() {
        let full = encoded(&Preamble::http("kubernetes", "server-1"));
        let (a, b) = full.split_at(5);
        let mut chain = Buf::chain(a, b);
        assert_eq!(
            Preamble::decode(&mut chain).unwrap(),
            Some(Preamble::http("kubernetes", "server-1"))
        );
        assert_eq!(chain.remaining(), 0);
    }

    proptest! {
        #[test]
        fn any_valid_preamble_round_trips(
            target in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
            id in ".{0,200}",
            kind in prop_oneof![
                Just(StreamKind::Http),
                Just(StreamKind::Http2),
                Just(StreamKind::Control),
            ],
            trailing in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let p = match kind {
                StreamKind::Http => Preamble::http(target, id),
                StreamKind::Http2 => Preamble::http2(target, id),
                StreamKind::Control => Preamble::control(id),
            };
            let mut buf = encoded(&p);
            prop_assert_eq!(buf[0], VERSION);
            prop_assert_eq!(buf[1], kind.code());
            prop_assert_eq!(
                usize::from(u16::from_be_bytes([buf[2], buf[3]])),
                buf.len() - HEADER_LEN,
                "the body length is big-endian"
            );
            for n in 0..buf.len() {
                let mut part = &buf[..n];
                prop_assert_eq!(Preamble::decode(&mut part).unwrap(), None);
                prop_assert_eq!(part.len(), n);
            }
            buf.extend_from_slice(&trailing);
            prop_assert_eq!(Preamble::decode(&mut buf).unwrap(), Some(p));
            prop_assert_eq!(&buf[..], &trailing[..], "the preamble consumes only its bytes");
        }

        #[test]
        fn a_control_preamble_never_carries_a_target(
            target in "[a-z0-9]{1,63}",
            id in "[a-z0-9-]{0,20}",
        ) {
            let p = Preamble { kind: StreamKind::Control, target, server_id: id };
            let refused = matches!(
                p.encode(&mut BytesMut::new()),
                Err(DecodeError::Invalid { what: "target", .. })
            );
            prop_assert!(refused, "a control preamble with a target was encoded");
            // The same bytes forged by hand are refused by the reader too.
            let mut forged = BytesMut::new();
            Preamble { kind: StreamKind::Http, ..p }.encode(&mut forged).unwrap();
            forged[1] = StreamKind::Control.code();
            let refused = matches!(
                Preamble::decode(&mut forged),
                Err(DecodeError::Invalid { what: "target", .. })
            );
            prop_assert!(refused, "a control preamble with a target was decoded");
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut slice = &bytes[..];
            let before = slice.len();
            if let Ok(None) = Preamble::decode(&mut slice) {
                prop_assert_eq!(slice.len(), before);
            }
        }
    }
}
