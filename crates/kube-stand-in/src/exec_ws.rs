//! Exec and attach over WebSocket, the way the kubelet serves them to kubectl 1.29+:
//! subprotocol `v5.channel.k8s.io` (or `v4.channel.k8s.io`), binary messages whose first byte
//! is the channel (0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize; v5 adds 255, "close the
//! channel named by the payload byte"). The command's result goes out on channel 3 as a
//! `Status` before the close frame.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use futures::{SinkExt as _, StreamExt as _};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, frame::coding::CloseCode};

use crate::api::{Body, full, header_str};
use crate::command;
use crate::files::PodFiles;
use crate::status::ApiError;
use crate::{Shared, StreamGuard};

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// How long to wait for the client's close frame after sending ours.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How long the simulated process takes to start, as `runc exec` does in a real kubelet.
/// client-go's WebSocket client starts reading as soon as the handshake is done but
/// creates its streams a moment later, and it drops a message for a stream it has not
/// created yet ("Unknown stream id N, discarding message"); without stdin it sends
/// nothing the server could wait for. A command answering at once (`whoami`), whose
/// first frames may reach kubectl in the same read as the 101, can so lose its stdout
/// and its status, and kubectl then exits 0 with no output: the likely cause of one CI
/// run where exactly that happened (not reproduced in 250 runs since; the test now
/// prints kubectl's stderr, where client-go logs the drop). A real process is never
/// that quick.
const PROCESS_START: Duration = Duration::from_millis(100);

/// The supported subprotocols, in order of preference.
const PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// Which streams the client asked for (`stdin`, `stdout`, `stderr`, `tty` query flags).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Streams {
    pub(crate) stdin: bool,
    pub(crate) stdout: bool,
    pub(crate) stderr: bool,
    pub(crate) tty: bool,
}

/// Answers the WebSocket handshake and spawns the session.
pub(crate) fn serve(
    shared: &Arc<Shared>,
    mut req: Request<Incoming>,
    command: Vec<String>,
    user: String,
    files: PodFiles,
    streams: Streams,
) -> Result<Response<Body>, ApiError> {
    let key = header_str(req.headers(), "sec-websocket-key")
        .ok_or_else(|| ApiError::bad_request("missing Sec-WebSocket-Key"))?
        .to_owned();
    let offered: Vec<String> = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    let protocol = PROTOCOLS
        .iter()
        .find(|p| offered.iter().any(|o| o == *p))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "none of the offered WebSocket subprotocols {offered:?} is supported (want one of {PROTOCOLS:?})"
            ))
        })?;
    let v5 = *protocol == PROTOCOLS[0];
    let on_upgrade = hyper::upgrade::on(&mut req);
    let session_shared = shared.clone();
    shared.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "exec upgrade failed");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        session(session_shared, ws, v5, command, user, files, streams).await;
    });
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&derive_accept_key(key.as_bytes()))
            .map_err(|e| ApiError::internal(e.to_string()))?,
    );
    h.insert("sec-websocket-protocol", HeaderValue::from_static(protocol));
    Ok(resp)
}

fn framed(channel: u8, data: &[u8]) -> Message {
    let mut buf = BytesMut::with_capacity(data.len() + 1);
    buf.put_u8(channel);
    buf.put_slice(data);
    Message::Binary(buf.freeze())
}

/// The `Status` sent on the error channel when the command ends.
pub(crate) fn exit_status(command: &[String], code: i32) -> serde_json::Value {
    if code == 0 {
        json!({"metadata": {}, "status": "Success"})
    } else {
        json!({
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
                command.join(" ")
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        })
    }
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

async fn session(
    shared: Arc<Shared>,
    ws: Ws,
    v5: bool,
    command: Vec<String>,
    user: String,
    files: PodFiles,
    streams: Streams,
) {
    let _guard = StreamGuard::new(&shared);
    let (mut sink, mut source) = ws.split();
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let (stdout_tx, mut stdout_rx) = mpsc::channel::<Bytes>(16);
    let (stderr_tx, mut stderr_rx) = mpsc::channel::<Bytes>(16);
    let mut resize = crate::tty::ResizeReader::new(crate::ExecTransport::WebSocket);

    let finished = {
        // Client → stdin. Ends when the client closes stdin (v5) or the connection.
        let reader = async {
            let mut stdin_tx = streams.stdin.then_some(stdin_tx);
            while let Some(msg) = source.next().await {
                let data = match msg {
                    Ok(Message::Binary(data)) => data,
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                match (data.first(), data.get(1)) {
                    (Some(&STDIN), _) => {
                        if let Some(tx) = &stdin_tx
                            && tx.send(data.slice(1..)).await.is_err()
                        {
                            stdin_tx = None;
                        }
                    }
                    (Some(&CLOSE), Some(&STDIN)) if v5 => stdin_tx = None,
                    // A TTY's resize channel; without a TTY the runtime reads none.
                    (Some(&RESIZE), _) if streams.tty => {
                        resize.feed(&shared.resizes, &data[1..]);
                    }
                    // Anything else: nothing to do for a simulated process.
                    _ => {}
                }
            }
            drop(stdin_tx);
        };
        // stdout/stderr → client, until the command has dropped both senders.
        let writer = async {
            let (mut out_open, mut err_open, mut broken) = (true, true, false);
            while out_open || err_open {
                let (channel, chunk) = tokio::select! {
                    chunk = stdout_rx.recv(), if out_open => (STDOUT, chunk),
                    chunk = stderr_rx.recv(), if err_open => (STDERR, chunk),
                };
                let Some(chunk) = chunk else {
                    if channel == STDOUT {
                        out_open = false;
                    } else {
                        err_open = false;
                    }
                    continue;
                };
                let wanted = if channel == STDOUT {
                    streams.stdout
                } else {
                    streams.stderr
                };
                if wanted && !broken && sink.send(framed(channel, &chunk)).await.is_err() {
                    // Keep draining so the command never blocks on a dead client.
                    broken = true;
                }
            }
            !broken
        };
        // The command and the writer run together: `cat` blocks on a full stdout channel
        // until the writer drains it.
        let run = async {
            let process = async {
                tokio::time::sleep(PROCESS_START).await;
                command::run_command(&command, &user, &files, stdin_rx, stdout_tx, stderr_tx).await
            };
            tokio::join!(process, writer)
        };
        tokio::pin!(reader, run);
        let mut reader_done = false;
        loop {
            tokio::select! {
                () = shared.cancel.cancelled() => break None,
                result = &mut run => break Some(result),
                () = &mut reader, if !reader_done => reader_done = true,
            }
        }
    };
    let Some((code, writer_ok)) = finished else {
        let _ = sink
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "server shutting down".into(),
            })))
            .await;
        return;
    };
    if !writer_ok {
        return;
    }
    let status = exit_status(&command, code).to_string();
    if sink.send(framed(ERROR, status.as_bytes())).await.is_err() {
        return;
    }
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    // Let the client answer the close (and read anything still in flight) before the
    // connection drops, so nothing is lost to a reset.
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(msg)) = source.next().await {
            if msg.is_close() {
                break;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_status_carries_the_exit_code() {
        let cmd = vec!["sh".to_owned(), "-c".to_owned(), "exit 3".to_owned()];
        let s = exit_status(&cmd, 3);
        assert_eq!(s["reason"], "NonZeroExitCode");
        assert_eq!(s["details"]["causes"][0]["message"], "3");
        assert_eq!(
            s["message"],
            "command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3"
        );
        assert_eq!(exit_status(&cmd, 0)["status"], "Success");
    }
}
