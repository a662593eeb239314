//! Reads a protobuf watch body (`application/vnd.kubernetes.protobuf;stream=watch`) as
//! client-go does, independently of the stand-in's encoder: frames of a 4-byte big-endian
//! length (apimachinery util/framer), each a `metav1.WatchEvent` without envelope (the
//! protobuf stream serializer is the raw one), whose `object.raw` is the object with the
//! `k8s\0` envelope (`runtime.Unknown`). Objects are read as ConfigMaps (metadata name,
//! namespace and resourceVersion; data), enough for the tests.

use std::collections::BTreeMap;

/// One decoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// `ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK` or `ERROR`.
    pub event_type: String,
    /// The object's `apiVersion`, from its envelope.
    pub api_version: String,
    /// The object's `kind`, from its envelope.
    pub kind: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.resourceVersion`.
    pub resource_version: String,
    /// A ConfigMap's `data`.
    pub data: BTreeMap<String, String>,
}

/// Where the bytes so far end: after whole frames, or inside one.
#[derive(Debug, Default)]
pub struct Frames {
    buffer: Vec<u8>,
}

impl Frames {
    /// Takes in bytes as they arrive; returns the frames they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.buffer.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(header) = self.buffer.get(..4) {
            let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
            if self.buffer.len() < 4 + len {
                break;
            }
            out.push(self.buffer[4..4 + len].to_vec());
            self.buffer.drain(..4 + len);
        }
        out
    }

    /// Bytes of an unfinished frame (0 when the stream so far ends on a frame boundary).
    pub fn partial(&self) -> usize {
        self.buffer.len()
    }
}

/// Splits a whole body into frames; a body that ends inside a frame is an error.
pub fn frames(body: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut frames = Frames::default();
    let out = frames.push(body);
    match frames.partial() {
        0 => Ok(out),
        n => Err(format!(
            "the body ends inside a frame: {n} bytes after {} whole frames",
            out.len()
        )),
    }
}

/// A message's fields: (number, value).
fn fields(mut buf: &[u8]) -> Result<Vec<(u64, Value<'_>)>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let value = match key & 7 {
            0 => {
                varint(&mut buf)?;
                Value::Varint
            }
            2 => {
                let len = varint(&mut buf)? as usize;
                let bytes = buf.get(..len).ok_or("truncated field")?;
                buf = &buf[len..];
                Value::Bytes(bytes)
            }
            other => return Err(format!("unexpected wire type {other}")),
        };
        out.push((key >> 3, value));
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy)]
enum Value<'a> {
    /// A number (no field the tests read is one).
    Varint,
    Bytes(&'a [u8]),
}

fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first().ok_or("truncated varint")?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("varint too long".into())
}

fn bytes_of<'a>(fields: &[(u64, Value<'a>)], number: u64) -> Option<&'a [u8]> {
    fields.iter().find_map(|(n, v)| match (n, v) {
        (n, Value::Bytes(b)) if *n == number => Some(*b),
        _ => None,
    })
}

fn text(fields: &[(u64, Value<'_>)], number: u64) -> Result<String, String> {
    let bytes = bytes_of(fields, number).unwrap_or_default();
    String::from_utf8(bytes.to_vec()).map_err(|_| format!("field {number} is not UTF-8"))
}

/// Decodes one frame (without its length).
pub fn decode(frame: &[u8]) -> Result<WatchEvent, String> {
    let event = fields(frame)?;
    let event_type = text(&event, 1)?;
    let raw_extension = fields(bytes_of(&event, 2).ok_or("no object")?)?;
    let enveloped = bytes_of(&raw_extension, 1).ok_or("no object.raw")?;
    let unknown = enveloped
        .strip_prefix(b"k8s\0")
        .ok_or("the object lacks the k8s protobuf magic")?;
    let unknown = fields(unknown)?;
    let type_meta = fields(bytes_of(&unknown, 1).ok_or("no typeMeta")?)?;
    let object = fields(bytes_of(&unknown, 2).ok_or("no raw object")?)?;
    let metadata = fields(bytes_of(&object, 1).unwrap_or_default())?;
    let mut data = BTreeMap::new();
    for (number, value) in &object {
        if let (2, Value::Bytes(entry)) = (number, value) {
            let entry = fields(entry)?;
            data.insert(text(&entry, 1)?, text(&entry, 2)?);
        }
    }
    Ok(WatchEvent {
        event_type,
        api_version: text(&type_meta, 1)?,
        kind: text(&type_meta, 2)?,
        name: text(&metadata, 1)?,
        namespace: text(&metadata, 3)?,
        resource_version: text(&metadata, 6)?,
        data,
    })
}

/// Decodes a whole body: every frame whole, every event decodable.
pub fn decode_body(body: &[u8]) -> Result<Vec<WatchEvent>, String> {
    frames(body)?.iter().map(|f| decode(f)).collect()
}
