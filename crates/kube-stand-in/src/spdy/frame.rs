//! A sans-IO SPDY/3(.1) frame codec: bytes in a [`BytesMut`] to [`Frame`]s and back.
//!
//! Name/value header blocks are zlib-compressed with the SPDY/3 dictionary, with one
//! compression context per direction that lives as long as the connection, so decoding and
//! encoding go through a [`Codec`] that owns both contexts. [`Codec::decode`] tells "not
//! enough bytes yet" (`Ok(None)`) apart from "this is not valid SPDY" (`Err`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

use super::dictionary::DICTIONARY;

/// The SPDY version this codec speaks (SPDY/3.1 frames carry version 3).
pub const VERSION: u16 = 3;
/// Length of every frame header, control or data.
pub const HEADER_LEN: usize = 8;
/// The largest payload the 24-bit length field can describe.
pub const MAX_PAYLOAD: usize = 0x00ff_ffff;
/// FIN flag of SYN_STREAM, SYN_REPLY, HEADERS and data frames.
pub const FLAG_FIN: u8 = 0x01;
/// UNIDIRECTIONAL flag of SYN_STREAM.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// Upper bound on a decompressed header block; protects against zlib bombs.
const MAX_HEADER_BLOCK: usize = 1 << 20;

/// Control frame type codes.
mod kind {
    pub(super) const SYN_STREAM: u16 = 1;
    pub(super) const SYN_REPLY: u16 = 2;
    pub(super) const RST_STREAM: u16 = 3;
    pub(super) const SETTINGS: u16 = 4;
    pub(super) const PING: u16 = 6;
    pub(super) const GOAWAY: u16 = 7;
    pub(super) const HEADERS: u16 = 8;
    pub(super) const WINDOW_UPDATE: u16 = 9;
}

/// RST_STREAM status codes (SPDY/3 section 2.6.3).
pub mod rst {
    /// Generic error.
    pub const PROTOCOL_ERROR: u32 = 1;
    /// A frame for a stream that is not active.
    pub const INVALID_STREAM: u32 = 2;
    /// The stream was refused before any processing.
    pub const REFUSED_STREAM: u32 = 3;
    /// The stream is no longer needed.
    pub const CANCEL: u32 = 5;
    /// An internal error.
    pub const INTERNAL_ERROR: u32 = 6;
    /// A second SYN_STREAM for an existing stream.
    pub const STREAM_IN_USE: u32 = 8;
    /// A frame for a stream that was already half-closed by the sender.
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
}

/// A SPDY name/value header block, in wire order. Names are lowercase on the wire; a value
/// holding several values separates them with NUL bytes.
pub type Headers = Vec<(String, String)>;

/// Looks `name` up (ASCII case-insensitively) in a header block.
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One SPDY/3 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// SYN_STREAM: the peer opens a stream.
    SynStream {
        /// The new stream's id (odd when the client opens it).
        stream_id: u32,
        /// The stream this one is associated with, or 0.
        associated_id: u32,
        /// Priority, 0 (highest) to 7.
        priority: u8,
        /// FIN and UNIDIRECTIONAL flags.
        flags: u8,
        /// The stream's headers.
        headers: Headers,
    },
    /// SYN_REPLY: the answer to a SYN_STREAM.
    SynReply {
        /// The stream being answered.
        stream_id: u32,
        /// FIN flag.
        flags: u8,
        /// Reply headers.
        headers: Headers,
    },
    /// RST_STREAM: abnormal termination of a stream.
    RstStream {
        /// The stream.
        stream_id: u32,
        /// Why; see [`rst`].
        status: u32,
    },
    /// SETTINGS.
    Settings {
        /// FLAG_SETTINGS_CLEAR_SETTINGS.
        flags: u8,
        /// `(flags, id, value)` entries.
        entries: Vec<(u8, u32, u32)>,
    },
    /// PING; the receiver echoes the id back.
    Ping {
        /// The ping's id.
        id: u32,
    },
    /// GOAWAY: the sender will open no more streams.
    GoAway {
        /// The last stream id the sender processed.
        last_good_stream_id: u32,
        /// Why.
        status: u32,
    },
    /// HEADERS: more headers for a stream.
    Headers {
        /// The stream.
        stream_id: u32,
        /// FIN flag.
        flags: u8,
        /// The headers.
        headers: Headers,
    },
    /// WINDOW_UPDATE: the sender can take `delta` more bytes on the stream (0 = session).
    WindowUpdate {
        /// The stream, or 0 for the session window (SPDY/3.1).
        stream_id: u32,
        /// Window increase.
        delta: u32,
    },
    /// A data frame.
    Data {
        /// The stream.
        stream_id: u32,
        /// FIN flag.
        flags: u8,
        /// The payload.
        data: Bytes,
    },
    /// A control frame of a type this codec does not know; SPDY says to ignore it.
    Unknown {
        /// Its type code.
        kind: u16,
    },
}

impl Frame {
    /// Whether the frame carries the FIN flag.
    pub fn is_fin(&self) -> bool {
        match self {
            Frame::SynStream { flags, .. }
            | Frame::SynReply { flags, .. }
            | Frame::Headers { flags, .. }
            | Frame::Data { flags, .. } => flags & FLAG_FIN != 0,
            _ => false,
        }
    }
}

/// Why bytes could not be decoded or a frame could not be encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// A control frame with a version other than 3.
    #[error("unsupported SPDY version {0}")]
    UnsupportedVersion(u16),
    /// A control frame whose length does not fit its type.
    #[error("malformed {kind} frame (length {len})")]
    Malformed {
        /// Frame type name.
        kind: &'static str,
        /// Its payload length.
        len: usize,
    },
    /// A frame that names stream 0 where a stream is required.
    #[error("{0} frame for stream 0")]
    ZeroStream(&'static str),
    /// The header block did not inflate.
    #[error("header block does not decompress: {0}")]
    Decompress(String),
    /// The header block compressor failed.
    #[error("header block does not compress: {0}")]
    Compress(String),
    /// The inflated header block is not a valid name/value block.
    #[error("invalid header block: {0}")]
    InvalidHeaderBlock(&'static str),
    /// A payload too long for the 24-bit length field.
    #[error("payload of {0} bytes is too long for one frame")]
    TooLong(usize),
}

/// The per-connection codec: the two zlib contexts of a SPDY connection.
pub struct Codec {
    inflate: Decompress,
    deflate: Compress,
    deflate_primed: bool,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").finish_non_exhaustive()
    }
}

impl Default for Codec {
    fn default() -> Self {
        Self::new()
    }
}

impl Codec {
    /// A codec for a fresh connection.
    pub fn new() -> Self {
        Self {
            inflate: Decompress::new(true),
            deflate: Compress::new(Compression::default(), true),
            deflate_primed: false,
        }
    }

    /// Takes one frame off the front of `buf`. `Ok(None)` means `buf` does not hold a whole
    /// frame yet (nothing is consumed); `Err` means the bytes are not valid SPDY/3, after which
    /// the connection cannot be resynchronised.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = (usize::from(buf[5]) << 16) | (usize::from(buf[6]) << 8) | usize::from(buf[7]);
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let control = buf[0] & 0x80 != 0;
        let flags = buf[4];
        if !control {
            let stream_id = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) & 0x7fff_ffff;
            buf.advance(HEADER_LEN);
            let data = buf.split_to(len).freeze();
            if stream_id == 0 {
                return Err(FrameError::ZeroStream("data"));
            }
            return Ok(Some(Frame::Data {
                stream_id,
                flags,
                data,
            }));
        }
        let version = u16::from_be_bytes([buf[0], buf[1]]) & 0x7fff;
        let kind = u16::from_be_bytes([buf[2], buf[3]]);
        buf.advance(HEADER_LEN);
        let mut payload = buf.split_to(len).freeze();
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let malformed = |kind: &'static str| FrameError::Malformed { kind, len };
        let frame = match kind {
            kind::SYN_STREAM => {
                if len < 10 {
                    return Err(malformed("SYN_STREAM"));
                }
                let stream_id = payload.get_u32() & 0x7fff_ffff;
                let associated_id = payload.get_u32() & 0x7fff_ffff;
                let priority = payload.get_u8() >> 5;
                let _slot = payload.get_u8();
                let headers = self.inflate_headers(&payload)?;
                if stream_id == 0 {
                    return Err(FrameError::ZeroStream("SYN_STREAM"));
                }
                Frame::SynStream {
                    stream_id,
                    associated_id,
                    priority,
                    flags,
                    headers,
                }
            }
            kind::SYN_REPLY | kind::HEADERS => {
                if len < 4 {
                    return Err(malformed(if kind == kind::SYN_REPLY {
                        "SYN_REPLY"
                    } else {
                        "HEADERS"
                    }));
                }
                let stream_id = payload.get_u32() & 0x7fff_ffff;
                let headers = self.inflate_headers(&payload)?;
                if kind == kind::SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        flags,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        flags,
                        headers,
                    }
                }
            }
            kind::RST_STREAM => {
                if len != 8 {
                    return Err(malformed("RST_STREAM"));
                }
                Frame::RstStream {
                    stream_id: payload.get_u32() & 0x7fff_ffff,
                    status: payload.get_u32(),
                }
            }
            kind::SETTINGS => {
                if len < 4 {
                    return Err(malformed("SETTINGS"));
                }
                let count = payload.get_u32() as usize;
                if payload.len() != count.saturating_mul(8) {
                    return Err(malformed("SETTINGS"));
                }
                let entries = (0..count)
                    .map(|_| {
                        let word = payload.get_u32();
                        // The top byte is the entry's flags, the low 24 bits its id.
                        ((word >> 24) as u8, word & 0x00ff_ffff, payload.get_u32())
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            kind::PING => {
                if len != 4 {
                    return Err(malformed("PING"));
                }
                Frame::Ping {
                    id: payload.get_u32(),
                }
            }
            kind::GOAWAY => {
                // SPDY/3 GOAWAY has a status code; tolerate the SPDY/2 form without one.
                if len != 8 && len != 4 {
                    return Err(malformed("GOAWAY"));
                }
                let last_good_stream_id = payload.get_u32() & 0x7fff_ffff;
                let status = if payload.has_remaining() {
                    payload.get_u32()
                } else {
                    0
                };
                Frame::GoAway {
                    last_good_stream_id,
                    status,
                }
            }
            kind::WINDOW_UPDATE => {
                if len != 8 {
                    return Err(malformed("WINDOW_UPDATE"));
                }
                Frame::WindowUpdate {
                    stream_id: payload.get_u32() & 0x7fff_ffff,
                    delta: payload.get_u32() & 0x7fff_ffff,
                }
            }
            other => Frame::Unknown { kind: other },
        };
        Ok(Some(frame))
    }

    /// Appends `frame`'s wire form to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), FrameError> {
        match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if data.len() > MAX_PAYLOAD {
                    return Err(FrameError::TooLong(data.len()));
                }
                out.reserve(HEADER_LEN + data.len());
                out.put_u32(stream_id & 0x7fff_ffff);
                put_flags_len(out, *flags, data.len());
                out.put_slice(data);
            }
            Frame::SynStream {
                stream_id,
                associated_id,
                priority,
                flags,
                headers,
            } => {
                let block = self.deflate_headers(headers)?;
                let mut body = BytesMut::with_capacity(10 + block.len());
                body.put_u32(stream_id & 0x7fff_ffff);
                body.put_u32(associated_id & 0x7fff_ffff);
                body.put_u8((priority & 0x07) << 5);
                body.put_u8(0);
                body.put_slice(&block);
                put_control(out, kind::SYN_STREAM, *flags, &body)?;
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            }
            | Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let block = self.deflate_headers(headers)?;
                let mut body = BytesMut::with_capacity(4 + block.len());
                body.put_u32(stream_id & 0x7fff_ffff);
                body.put_slice(&block);
                let kind = if matches!(frame, Frame::SynReply { .. }) {
                    kind::SYN_REPLY
                } else {
                    kind::HEADERS
                };
                put_control(out, kind, *flags, &body)?;
            }
            Frame::RstStream { stream_id, status } => {
                let mut body = [0u8; 8];
                body[..4].copy_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                body[4..].copy_from_slice(&status.to_be_bytes());
                put_control(out, kind::RST_STREAM, 0, &body)?;
            }
            Frame::Settings { flags, entries } => {
                let mut body = BytesMut::with_capacity(4 + 8 * entries.len());
                body.put_u32(
                    u32::try_from(entries.len()).map_err(|_| FrameError::TooLong(entries.len()))?,
                );
                for (entry_flags, id, value) in entries {
                    body.put_u32((u32::from(*entry_flags) << 24) | (id & 0x00ff_ffff));
                    body.put_u32(*value);
                }
                put_control(out, kind::SETTINGS, *flags, &body)?;
            }
            Frame::Ping { id } => put_control(out, kind::PING, 0, &id.to_be_bytes())?,
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                let mut body = [0u8; 8];
                body[..4].copy_from_slice(&(last_good_stream_id & 0x7fff_ffff).to_be_bytes());
                body[4..].copy_from_slice(&status.to_be_bytes());
                put_control(out, kind::GOAWAY, 0, &body)?;
            }
            Frame::WindowUpdate { stream_id, delta } => {
                let mut body = [0u8; 8];
                body[..4].copy_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                body[4..].copy_from_slice(&(delta & 0x7fff_ffff).to_be_bytes());
                put_control(out, kind::WINDOW_UPDATE, 0, &body)?;
            }
            Frame::Unknown { kind } => put_control(out, *kind, 0, &[])?,
        }
        Ok(())
    }

    /// Inflates one header block with the connection's receive context and parses it.
    fn inflate_headers(&mut self, compressed: &[u8]) -> Result<Headers, FrameError> {
        let mut plain: Vec<u8> = Vec::with_capacity(compressed.len().saturating_mul(4) + 64);
        let mut input = compressed;
        loop {
            if plain.capacity() - plain.len() < 256 {
                plain.reserve(plain.capacity().max(1024));
            }
            let before_in = self.inflate.total_in();
            let before_out = plain.len();
            let result = self
                .inflate
                .decompress_vec(input, &mut plain, FlushDecompress::Sync);
            let consumed = usize::try_from(self.inflate.total_in() - before_in)
                .map_err(|_| FrameError::Decompress("counter overflow".into()))?;
            input = &input[consumed..];
            match result {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate
                        .set_dictionary(DICTIONARY)
                        .map_err(|e| FrameError::Decompress(e.to_string()))?;
                    continue;
                }
                Err(e) => return Err(FrameError::Decompress(e.to_string())),
            }
            if plain.len() > MAX_HEADER_BLOCK {
                return Err(FrameError::InvalidHeaderBlock("larger than 1 MiB"));
            }
            let spare = plain.capacity() - plain.len();
            if input.is_empty() && spare > 0 {
                break;
            }
            if consumed == 0 && plain.len() == before_out && spare > 0 {
                return Err(FrameError::Decompress("no progress".into()));
            }
        }
        parse_header_block(&plain)
    }

    /// Serialises and deflates one header block with the connection's send context.
    fn deflate_headers(&mut self, headers: &Headers) -> Result<Vec<u8>, FrameError> {
        if !self.deflate_primed {
            self.deflate
                .set_dictionary(DICTIONARY)
                .map_err(|e| FrameError::Compress(e.to_string()))?;
            self.deflate_primed = true;
        }
        let plain = serialize_header_block(headers)?;
        let mut out: Vec<u8> = Vec::with_capacity(plain.len() + 64);
        let mut input = plain.as_slice();
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            let before_in = self.deflate.total_in();
            self.deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| FrameError::Compress(e.to_string()))?;
            let consumed = usize::try_from(self.deflate.total_in() - before_in)
                .map_err(|_| FrameError::Compress("counter overflow".into()))?;
            input = &input[consumed..];
            // A sync flush is complete once the compressor stops short of filling the buffer.
            if input.is_empty() && out.capacity() > out.len() {
                return Ok(out);
            }
        }
    }
}

fn put_flags_len(out: &mut BytesMut, flags: u8, len: usize) {
    out.put_u8(flags);
    out.put_u8((len >> 16) as u8);
    out.put_u8((len >> 8) as u8);
    out.put_u8(len as u8);
}

fn put_control(out: &mut BytesMut, kind: u16, flags: u8, body: &[u8]) -> Result<(), FrameError> {
    if body.len() > MAX_PAYLOAD {
        return Err(FrameError::TooLong(body.len()));
    }
    out.reserve(HEADER_LEN + body.len());
    out.put_u16(0x8000 | VERSION);
    out.put_u16(kind);
    put_flags_len(out, flags, body.len());
    out.put_slice(body);
    Ok(())
}

fn serialize_header_block(headers: &Headers) -> Result<Vec<u8>, FrameError> {
    let too_long = |n: usize| FrameError::TooLong(n);
    let mut block = Vec::new();
    block.extend_from_slice(
        &u32::try_from(headers.len())
            .map_err(|_| too_long(headers.len()))?
            .to_be_bytes(),
    );
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        for part in [name.as_bytes(), value.as_bytes()] {
            block.extend_from_slice(
                &u32::try_from(part.len())
                    .map_err(|_| too_long(part.len()))?
                    .to_be_bytes(),
            );
            block.extend_from_slice(part);
        }
    }
    Ok(block)
}

fn parse_header_block(mut block: &[u8]) -> Result<Headers, FrameError> {
    fn take<'a>(block: &mut &'a [u8]) -> Result<&'a [u8], FrameError> {
        if block.len() < 4 {
            return Err(FrameError::InvalidHeaderBlock("truncated length"));
        }
        let len = block.get_u32() as usize;
        if block.len() < len {
            return Err(FrameError::InvalidHeaderBlock("truncated string"));
        }
        let (s, rest) = block.split_at(len);
        *block = rest;
        Ok(s)
    }
    if block.len() < 4 {
        return Err(FrameError::InvalidHeaderBlock("missing pair count"));
    }
    let count = block.get_u32() as usize;
    // Every pair takes at least 8 bytes, which bounds the allocation below.
    if count > block.len() / 8 {
        return Err(FrameError::InvalidHeaderBlock("pair count exceeds block"));
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let name = take(&mut block)?;
        let value = take(&mut block)?;
        if name.is_empty() {
            return Err(FrameError::InvalidHeaderBlock("empty header name"));
        }
        let name = std::str::from_utf8(name)
            .map_err(|_| FrameError::InvalidHeaderBlock("header name is not UTF-8"))?;
        let value = String::from_utf8_lossy(value).into_owned();
        headers.push((name.to_owned(), value));
    }
    if !block.is_empty() {
        return Err(FrameError::InvalidHeaderBlock("trailing bytes"));
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn hdrs(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn dictionary_is_the_spdy3_one() {
        assert_eq!(DICTIONARY.len(), 1423);
        let mut c = Compress::new(Compression::default(), true);
        // The dictionary id every SPDY/3 header stream announces.
        assert_eq!(c.set_dictionary(DICTIONARY).unwrap(), 0xe3c6_a7c2);
        assert!(DICTIONARY.starts_with(b"\x00\x00\x00\x07options"));
        assert!(DICTIONARY.ends_with(b",*,enq=0."));
    }

    #[test]
    fn round_trips_every_frame_kind_through_one_context_pair() {
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_id: 0,
                priority: 3,
                flags: FLAG_FIN,
                headers: hdrs(&[("streamtype", "error"), ("port", "80"), ("requestid", "0")]),
            },
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: Vec::new(),
            },
            Frame::Headers {
                stream_id: 3,
                flags: FLAG_FIN,
                headers: hdrs(&[("x", "a\0b")]),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_id: 1,
                priority: 0,
                flags: 0,
                headers: hdrs(&[("streamtype", "data"), ("port", "80"), ("requestid", "0")]),
            },
            Frame::RstStream {
                stream_id: 3,
                status: rst::CANCEL,
            },
            Frame::Settings {
                flags: 1,
                entries: vec![(1, 7, 65536), (0, 4, 100)],
            },
            Frame::Ping { id: 7 },
            Frame::GoAway {
                last_good_stream_id: 9,
                status: 0,
            },
            Frame::WindowUpdate {
                stream_id: 5,
                delta: 1 << 20,
            },
            Frame::Data {
                stream_id: 5,
                flags: FLAG_FIN,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 5,
                flags: 0,
                data: Bytes::new(),
            },
            Frame::Unknown { kind: 42 },
        ];
        let mut tx = Codec::new();
        let mut rx = Codec::new();
        let mut wire = BytesMut::new();
        for f in &frames {
            tx.encode(f, &mut wire).unwrap();
        }
        let mut decoded = Vec::new();
        while let Some(f) = rx.decode(&mut wire).unwrap() {
            decoded.push(f);
        }
        assert!(wire.is_empty());
        let mut expected = frames;
        // Header names are lowercased; everything else survives as is.
        expected[0] = Frame::SynStream {
            stream_id: 1,
            associated_id: 0,
            priority: 3,
            flags: FLAG_FIN,
            headers: hdrs(&[("streamtype", "error"), ("port", "80"), ("requestid", "0")]),
        };
        assert_eq!(decoded, expected);
        assert!(decoded[0].is_fin());
        assert!(!decoded[3].is_fin());
    }

    #[test]
    fn header_names_are_lowercased_and_looked_up_case_insensitively() {
        let mut tx = Codec::new();
        let mut rx = Codec::new();
        let mut wire = BytesMut::new();
        tx.encode(
            &Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: hdrs(&[("StreamType", "data")]),
            },
            &mut wire,
        )
        .unwrap();
        let Some(Frame::SynReply { headers, .. }) = rx.decode(&mut wire).unwrap() else {
            panic!("not a SYN_REPLY");
        };
        assert_eq!(headers, hdrs(&[("streamtype", "data")]));
        assert_eq!(header(&headers, "streamType"), Some("data"));
        assert_eq!(header(&headers, "port"), None);
    }

    #[test]
    fn partial_input_needs_more_and_consumes_nothing() {
        let mut tx = Codec::new();
        let mut wire = BytesMut::new();
        tx.encode(
            &Frame::SynStream {
                stream_id: 1,
                associated_id: 0,
                priority: 0,
                flags: 0,
                headers: hdrs(&[("streamtype", "stdin")]),
            },
            &mut wire,
        )
        .unwrap();
        tx.encode(
            &Frame::Data {
                stream_id: 1,
                flags: 0,
                data: Bytes::from_static(b"abc"),
            },
            &mut wire,
        )
        .unwrap();
        let full = wire.clone();
        let mut rx = Codec::new();
        // Feed byte by byte: every prefix short of a frame is "need more".
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in full.iter() {
            buf.put_u8(*b);
            let before = buf.len();
            match rx.decode(&mut buf).unwrap() {
                Some(f) => got.push(f),
                None => assert_eq!(buf.len(), before),
            }
        }
        assert_eq!(got.len(), 2);
        assert!(buf.is_empty());
    }

    #[test]
    fn invalid_input_is_an_error_not_need_more() {
        let mut rx = Codec::new();
        // Control frame, version 2.
        let mut buf = BytesMut::from(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1][..]);
        assert_eq!(rx.decode(&mut buf), Err(FrameError::UnsupportedVersion(2)));
        // PING with a 3-byte body.
        let mut buf = BytesMut::from(&[0x80, 0x03, 0x00, 0x06, 0, 0, 0, 3, 0, 0, 1][..]);
        assert!(matches!(
            rx.decode(&mut buf),
            Err(FrameError::Malformed { kind: "PING", .. })
        ));
        // Data frame for stream 0.
        let mut buf = BytesMut::from(&[0, 0, 0, 0, 0, 0, 0, 0][..]);
        assert_eq!(rx.decode(&mut buf), Err(FrameError::ZeroStream("data")));
        // SYN_STREAM whose header block is not zlib.
        let mut buf = BytesMut::from(
            &[
                0x80, 0x03, 0x00, 0x01, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4,
            ][..],
        );
        assert!(matches!(
            rx.decode(&mut buf),
            Err(FrameError::Decompress(_))
        ));
    }

    #[test]
    fn truncated_header_block_is_invalid() {
        assert!(parse_header_block(&[0, 0, 0, 1, 0, 0, 0, 5, b'a']).is_err());
        assert!(parse_header_block(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(parse_header_block(&[0, 0, 0, 0, 1]).is_err());
        assert_eq!(parse_header_block(&[0, 0, 0, 0]).unwrap(), Vec::new());
    }

    #[test]
    fn decodes_a_header_block_compressed_by_plain_zlib_with_the_dictionary() {
        // Independent compressor, as a Go peer would produce it.
        let plain = serialize_header_block(&hdrs(&[("streamtype", "stdout")])).unwrap();
        let mut c = Compress::new(Compression::best(), true);
        c.set_dictionary(DICTIONARY).unwrap();
        let mut block = Vec::with_capacity(256);
        c.compress_vec(&plain, &mut block, FlushCompress::Sync)
            .unwrap();
        let mut body = BytesMut::new();
        body.put_u32(7);
        body.put_slice(&block);
        let mut wire = BytesMut::new();
        put_control(&mut wire, kind::HEADERS, 0, &body).unwrap();
        let f = Codec::new().decode(&mut wire).unwrap().unwrap();
        assert_eq!(
            f,
            Frame::Headers {
                stream_id: 7,
                flags: 0,
                headers: hdrs(&[("streamtype", "stdout")])
            }
        );
    }
}
