//! Messages on a tunnel's control stream.
//!
//! ```text
//! +------+----------------+-------------+
//! | type | payload length | payload     |
//! |  u8  | u16 big-endian | …           |
//! +------+----------------+-------------+
//! ```
//! Both sides send [`ControlMessage::Ping`] on an interval and answer each with a
//! [`ControlMessage::Pong`] carrying the same nonce; a side whose pong misses its deadline
//! closes the tunnel. The server sends [`ControlMessage::Drain`] before it goes away and
//! [`ControlMessage::ServerInfo`] when what it told the agent in the handshake changes;
//! the agent sends [`ControlMessage::Held`] whenever the set of replicas it holds tunnels
//! to changes, so every replica can show which others serve the cluster. The server sends
//! [`ControlMessage::Token`] when the cluster's agent token was renewed: the agent dials
//! with it from then on.
//! Types this code does not know decode as [`ControlMessage::Unknown`] so that newer
//! peers can add messages.

use bytes::{Buf, BufMut};

use crate::DecodeError;

/// Largest control payload.
pub const MAX_PAYLOAD: usize = 1024;
const HEADER_LEN: usize = 3;

const PING: u8 = 1;
const PONG: u8 = 2;
const DRAIN: u8 = 3;
const SERVER_INFO: u8 = 4;
const HELD: u8 = 5;
const TOKEN: u8 = 6;

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// "Are you there?"; answer with a pong carrying the same nonce.
    Ping {
        /// Echoed by the pong.
        nonce: u64,
    },
    /// The answer to a ping.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// The server is shutting down: it opens no new streams on this tunnel and closes
    /// it after `grace_ms`; the agent should dial again at once.
    Drain {
        /// How long in-flight streams have, in milliseconds.
        grace_ms: u32,
    },
    /// Who the server is and how many replicas it knows of.
    ServerInfo {
        /// The replica's id.
        server_id: String,
        /// How many replicas serve the published address.
        server_count: u16,
    },
    /// The replicas the agent holds a tunnel to now (comma-separated ids on the wire).
    Held {
        /// Their server ids; none contains a comma.
        server_ids: Vec<String>,
    },
    /// The cluster's renewed agent token (server → agent): the one the agent holds stays
    /// valid until its own `exp`; dial with this one from now on.
    Token {
        /// The new agent token (a JWT).
        token: String,
    },
    /// A message type this code does not know; skipped.
    Unknown {
        /// Its type byte.
        kind: u8,
    },
}

impl ControlMessage {
    /// Appends the encoded message to `dst`.
    pub fn encode(&self, dst: &mut impl BufMut) -> Result<(), DecodeError> {
        match self {
            ControlMessage::Ping { nonce } => put_header(dst, PING, 8).put_u64(*nonce),
            ControlMessage::Pong { nonce } => put_header(dst, PONG, 8).put_u64(*nonce),
            ControlMessage::Drain { grace_ms } => put_header(dst, DRAIN, 4).put_u32(*grace_ms),
            ControlMessage::ServerInfo {
                server_id,
                server_count,
            } => {
                let len = 2 + server_id.len();
                if len > MAX_PAYLOAD {
                    return Err(DecodeError::TooLong {
                        what: "server id",
                        len: server_id.len(),
                        max: MAX_PAYLOAD - 2,
                    });
                }
                let dst = put_header(dst, SERVER_INFO, len);
                dst.put_u16(*server_count);
                dst.put_slice(server_id.as_bytes());
            }
            ControlMessage::Held { server_ids } => {
                if server_ids.iter().any(|id| id.contains(',')) {
                    return Err(DecodeError::Invalid {
                        what: "server id",
                        reason: "contains a comma",
                    });
                }
                let list = server_ids.join(",");
                if list.len() > MAX_PAYLOAD {
                    return Err(DecodeError::TooLong {
                        what: "held server ids",
                        len: list.len(),
                        max: MAX_PAYLOAD,
                    });
                }
                put_header(dst, HELD, list.len()).put_slice(list.as_bytes());
            }
            ControlMessage::Token { token } => {
                if token.len() > MAX_PAYLOAD {
                    return Err(DecodeError::TooLong {
                        what: "agent token",
                        len: token.len(),
                        max: MAX_PAYLOAD,
                    });
                }
                put_header(dst, TOKEN, token.len()).put_slice(token.as_bytes());
            }
            ControlMessage::Unknown { kind } => {
                return Err(DecodeError::Invalid {
                    what: "control message",
                    reason: if *kind == 0 {
                        "type 0 is reserved"
                    } else {
                        "unknown messages cannot be sent"
                    },
                });
            }
        }
        Ok(())
    }

    /// Decodes one message from the front of `src`: `Ok(None)` (consuming nothing)
    /// while it is incomplete.
    pub fn decode(src: &mut impl Buf) -> Result<Option<Self>, DecodeError> {
        if src.remaining() < HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_LEN];
        crate::peek(src, &mut header);
        let kind = header[0];
        let len = u16::from_be_bytes([header[1], header[2]]) as usize;
        if len > MAX_PAYLOAD {
            return Err(DecodeError::TooLong {
                what: "control payload",
                len,
                max: MAX_PAYLOAD,
            });
        }
        if src.remaining() < HEADER_LEN + len {
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let mut payload = src.copy_to_bytes(len);
        let fixed = |want: usize| {
            if len == want {
                Ok(())
            } else {
                Err(DecodeError::Invalid {
                    what: "control payload",
                    reason: "wrong length for its type",
                })
            }
        };
        let message = match kind {
            PING => {
                fixed(8)?;
                ControlMessage::Ping {
                    nonce: payload.get_u64(),
                }
            }
            PONG => {
                fixed(8)?;
                ControlMessage::Pong {
                    nonce: payload.get_u64(),
                }
            }
            DRAIN => {
                fixed(4)?;
                ControlMessage::Drain {
                    grace_ms: payload.get_u32(),
                }
            }
            SERVER_INFO => {
                if len < 2 {
                    return Err(DecodeError::Invalid {
                        what: "control payload",
                        reason: "server info without a replica count",
                    });
                }
                let server_count = payload.get_u16();
                let server_id =
                    String::from_utf8(payload.to_vec()).map_err(|_| DecodeError::Invalid {
                        what: "server id",
                        reason: "not UTF-8",
                    })?;
                ControlMessage::ServerInfo {
                    server_id,
                    server_count,
                }
            }
            HELD => {
                let list = std::str::from_utf8(&payload).map_err(|_| DecodeError::Invalid {
                    what: "held server ids",
                    reason: "not UTF-8",
                })?;
                ControlMessage::Held {
                    server_ids: list
                        .split(',')
                        .filter(|id| !id.is_empty())
                        .map(str::to_owned)
                        .collect(),
                }
            }
            TOKEN => ControlMessage::Token {
                token: String::from_utf8(payload.to_vec()).map_err(|_| DecodeError::Invalid {
                    what: "agent token",
                    reason: "not UTF-8",
                })?,
            },
            0 => {
                return Err(DecodeError::Invalid {
                    what: "control message",
                    reason: "type 0 is reserved",
                });
            }
            kind => ControlMessage::Unknown { kind },
        };
        Ok(Some(message))
    }
}

fn put_header<B: BufMut>(dst: &mut B, kind: u8, len: usize) -> &mut B {
    dst.put_u8(kind);
    dst.put_u16(len as u16);
    dst
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::BytesMut;
    use proptest::prelude::*;

    fn round_trip(m: ControlMessage) {
        let mut buf = BytesMut::new();
        m.encode(&mut buf).unwrap();
        let full = buf.clone();
        for n in 0..full.len() {
            let mut part = &full[..n];
            assert_eq!(ControlMessage::decode(&mut part).unwrap(), None);
            assert_eq!(part.len(), n, "a partial message consumes nothing");
        }
        buf.extend_from_slice(&[PING]);
        assert_eq!(ControlMessage::decode(&mut buf).unwrap(), Some(m));
        assert_eq!(&buf[..], &[PING]);
    }

    #[test]
    fn each_message_round_trips() {
        round_trip(ControlMessage::Ping { nonce: 7 });
        round_trip(ControlMessage::Pong { nonce: u64::MAX });
        round_trip(ControlMessage::Drain { grace_ms: 30_000 });
        round_trip(ControlMessage::ServerInfo {
            server_id: "tower-7d9f-0".into(),
            server_count: 3,
        });
        round_trip(ControlMessage::Held {
            server_ids: vec!["tower-0".into(), "tower-1".into()],
        });
        round_trip(ControlMessage::Held { server_ids: vec![] });
        round_trip(ControlMessage::Token {
            token: "eyJhbGciOiJIUzI1NiJ9.e30.c2ln".into(),
        });
        assert!(
            ControlMessage::Token {
                token: "x".repeat(MAX_PAYLOAD + 1)
            }
            .encode(&mut BytesMut::new())
            .is_err()
        );
        assert!(ControlMessage::decode(&mut &[TOKEN, 0, 1, 0xff][..]).is_err());
        assert!(
            ControlMessage::Held {
                server_ids: vec!["a,b".into()]
            }
            .encode(&mut BytesMut::new())
            .is_err()
        );
    }

    #[test]
    fn unknown_types_are_skipped_and_bad_lengths_refused() {
        let mut buf = &[42u8, 0, 2, 9, 9, PING][..];
        assert_eq!(
            ControlMessage::decode(&mut buf).unwrap(),
            Some(ControlMessage::Unknown { kind: 42 })
        );
        assert_eq!(buf, &[PING]);
        assert!(ControlMessage::decode(&mut &[PING, 0, 3, 1, 2, 3][..]).is_err());
        assert!(ControlMessage::decode(&mut &[0u8, 0, 0][..]).is_err());
        assert!(matches!(
            ControlMessage::decode(&mut &[PING, 0xff, 0xff][..]),
            Err(DecodeError::TooLong { .. })
        ));
        assert!(ControlMessage::decode(&mut &[SERVER_INFO, 0, 3, 0, 1, 0xff][..]).is_err());
    }

    /// The bytes a fixed-size message must encode to: type, big-endian length, payload.
    fn wire(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    proptest! {
        #[test]
        fn ping_round_trips(nonce in any::<u64>()) {
            let m = ControlMessage::Ping { nonce };
            let mut buf = BytesMut::new();
            m.encode(&mut buf).unwrap();
            prop_assert_eq!(&buf[..], &wire(PING, &nonce.to_be_bytes())[..]);
            round_trip(m);
        }

        #[test]
        fn pong_round_trips(nonce in any::<u64>()) {
            let m = ControlMessage::Pong { nonce };
            let mut buf = BytesMut::new();
            m.encode(&mut buf).unwrap();
            prop_assert_eq!(&buf[..], &wire(PONG, &nonce.to_be_bytes())[..]);
            round_trip(m);
        }

        #[test]
        fn drain_round_trips(grace_ms in any::<u32>()) {
            let m = ControlMessage::Drain { grace_ms };
            let mut buf = BytesMut::new();
            m.encode(&mut buf).unwrap();
            prop_assert_eq!(&buf[..], &wire(DRAIN, &grace_ms.to_be_bytes())[..]);
            round_trip(m);
        }

        #[test]
        fn a_ping_is_never_read_as_a_pong(nonce in any::<u64>()) {
            let mut buf = BytesMut::new();
            ControlMessage::Ping { nonce }.encode(&mut buf).unwrap();
            ControlMessage::Pong { nonce }.encode(&mut buf).unwrap();
            ControlMessage::Drain { grace_ms: nonce as u32 }.encode(&mut buf).unwrap();
            prop_assert_eq!(ControlMessage::decode(&mut buf).unwrap(), Some(ControlMessage::Ping { nonce }));
            prop_assert_eq!(ControlMessage::decode(&mut buf).unwrap(), Some(ControlMessage::Pong { nonce }));
            prop_assert_eq!(
                ControlMessage::decode(&mut buf).unwrap(),
                Some(ControlMessage::Drain { grace_ms: nonce as u32 })
            );
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn server_info_round_trips(id in ".{0,300}", count in any::<u16>()) {
            let m = ControlMessage::ServerInfo { server_id: id, server_count: count };
            let mut buf = BytesMut::new();
            m.encode(&mut buf).unwrap();
            prop_assert_eq!(ControlMessage::decode(&mut buf).unwrap(), Some(m));
        }

        #[test]
        fn held_round_trips(ids in proptest::collection::vec("[a-z0-9.-]{1,40}", 0..20)) {
            let m = ControlMessage::Held { server_ids: ids };
            let mut buf = BytesMut::new();
            m.encode(&mut buf).unwrap();
            prop_assert_eq!(ControlMessage::decode(&mut buf).unwrap(), Some(m));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut slice = &bytes[..];
            while let Ok(Some(_)) = ControlMessage::decode(&mut slice) {}
        }
    }
}
