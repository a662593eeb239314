//! A TTY session's resize channel, read as the container runtime's streaming server reads
//! it: a stream of JSON `remotecommand.TerminalSize` values (`{"Width":…,"Height":…}`)
//! through one `json.Decoder` that stops at the first error
//! (kubelet/cri/streaming/remotecommand/httpstream.go, `handleResizing`), of which sizes
//! with a side under 1 are ignored (containerd's CRI `handleResizing`). The stand-in
//! records every size it would apply ([`crate::StandIn::terminal_resizes`]).

use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::{ExecTransport, TerminalResize};

/// Where sessions record the terminal sizes they receive; clones share one record.
#[derive(Debug, Clone, Default)]
pub struct Resizes(Arc<Mutex<Vec<TerminalResize>>>);

impl Resizes {
    /// Every size recorded, in order.
    pub fn all(&self) -> Vec<TerminalResize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, resize: TerminalResize) {
        tracing::debug!(?resize, "terminal resized");
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(resize);
    }
}

/// client-go's `remotecommand.TerminalSize`, as `encoding/json` writes it.
#[derive(Debug, Deserialize)]
struct TerminalSize {
    #[serde(rename = "Width", default)]
    width: u16,
    #[serde(rename = "Height", default)]
    height: u16,
}

/// Reads one session's resize channel as its bytes arrive.
pub(crate) struct ResizeReader {
    transport: ExecTransport,
    pending: Vec<u8>,
    /// A malformed value stopped the decoder: nothing more is read.
    stopped: bool,
}

impl ResizeReader {
    pub(crate) fn new(transport: ExecTransport) -> Self {
        ResizeReader {
            transport,
            pending: Vec::new(),
            stopped: false,
        }
    }

    /// Takes in bytes of the channel; every whole size in them is recorded in `resizes`.
    pub(crate) fn feed(&mut self, resizes: &Resizes, data: &[u8]) {
        for size in self.sizes(data) {
            resizes.record(size);
        }
    }

    fn sizes(&mut self, data: &[u8]) -> Vec<TerminalResize> {
        if self.stopped {
            return Vec::new();
        }
        self.pending.extend_from_slice(data);
        let mut out = Vec::new();
        let mut values =
            serde_json::Deserializer::from_slice(&self.pending).into_iter::<TerminalSize>();
        loop {
            match values.next() {
                Some(Ok(size)) => {
                    if size.width >= 1 && size.height >= 1 {
                        out.push(TerminalResize {
                            transport: self.transport,
                            width: size.width,
                            height: size.height,
                        });
                    }
                }
                // A value cut across messages: wait for the rest.
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "malformed resize message: no more resizes");
                    self.stopped = true;
                    break;
                }
                None => break,
            }
        }
        let consumed = values.byte_offset();
        self.pending.drain(..consumed);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_read_across_messages_and_zero_sides_ignored() {
        let mut reader = ResizeReader::new(ExecTransport::Spdy);
        let size = |w, h| TerminalResize {
            transport: ExecTransport::Spdy,
            width: w,
            height: h,
        };
        assert_eq!(reader.sizes(br#"{"Width":80,"Height":24}"#), [size(80, 24)]);
        assert_eq!(reader.sizes(br#"{"Width":100,"#), []);
        assert_eq!(
            reader.sizes(br#""Height":30}{"Width":0,"Height":5}{"Width":7,"Height":9}"#),
            [size(100, 30), size(7, 9)]
        );
        assert_eq!(reader.sizes(b"nonsense"), []);
        assert_eq!(
            reader.sizes(br#"{"Width":1,"Height":1}"#),
            [],
            "the decoder stopped"
        );
    }
}
