//! `tower-proto`: Tower's wire protocol, sans-IO.
//!
//! Nothing here touches a socket or a runtime; every decoder works on a byte buffer and
//! keeps "I need more bytes" (`Ok(None)`) apart from "these bytes are invalid" (`Err`).
//!
//! * [`handshake`]: the HTTP/1.1 upgrade that opens a tunnel (`GET /v1/tunnel`,
//!   `Upgrade: tower-tunnel/1`), its header names and its refusals.
//! * [`preamble`]: the small header that starts every yamux stream ([`Preamble`]).
//! * [`names`]: the rule cluster names follow.
//! * [`control`]: messages on the control stream ([`ControlMessage`]: ping, pong, drain,
//!   server info).
//! * [`request_info`]: which requests are watches, as the API servers behind the tunnel
//!   decide it: both ends must agree, since a watch rides the tunnel's shared HTTP/2
//!   stream.
//!
//! See `docs/protocol.md` for the picture.

#![forbid(unsafe_code)]

pub mod control;
pub mod handshake;
pub mod names;
pub mod preamble;
pub mod request_info;

pub use control::ControlMessage;
pub use preamble::{Preamble, StreamKind};

/// Bytes that cannot be decoded as the message they claim to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The first byte names a protocol version this code does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// A length field is larger than the protocol allows.
    #[error("{what} is {len} bytes, more than the {max} allowed")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The length found.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A field is missing, malformed or has a value the protocol forbids.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which field.
        what: &'static str,
        /// Why it is refused.
        reason: &'static str,
    },
}

/// Copies the first `dst.len()` bytes of `src` into `dst` without consuming them.
///
/// `src` must hold at least `dst.len()` bytes in at most 64 chunks (true of every buffer
/// this crate is used with: `BytesMut`, slices and short chains).
pub(crate) fn peek(src: &impl bytes::Buf, dst: &mut [u8]) {
    let chunk = src.chunk();
    if chunk.len() >= dst.len() {
        dst.copy_from_slice(&chunk[..dst.len()]);
        return;
    }
    let mut slices = [std::io::IoSlice::new(&[]); 64];
    let n = src.chunks_vectored(&mut slices);
    let mut filled = 0;
    for slice in &slices[..n] {
        let take = slice.len().min(dst.len() - filled);
        dst[filled..filled + take].copy_from_slice(&slice[..take]);
        filled += take;
        if filled == dst.len() {
            break;
        }
    }
}
