//! The pod side of exec over SPDY (`v4.channel.k8s.io` down to `channel.k8s.io`).
//!
//! The client opens one stream per channel, named by the `streamType` header: `error`,
//! `stdin`, `stdout`, `stderr` and, with a TTY, `resize`. Once the streams the request asked
//! for are there, the command runs: stdin data feeds its stdin until the client's FIN, its
//! stdout and stderr go to those streams, and at the end the error stream carries the
//! outcome (a `Status` in v4, plain text before) before every stream is half-closed.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::frame::{header, rst};
use super::session::{IncomingStream, StreamSender};
use crate::ExecTransport;
use crate::files::PodFiles;
use crate::tty::{ResizeReader, Resizes};

/// How long the client gets to open the streams it asked for (the kubelet default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The exec sub-protocol in use; it decides how the error stream reports the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// `v4.channel.k8s.io`: a JSON `Status`.
    V4,
    /// `v3.channel.k8s.io`, `v2.channel.k8s.io` or `channel.k8s.io`: a plain message.
    Legacy,
}

/// Which streams the request (its query) asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Options {
    pub(crate) stdin: bool,
    pub(crate) stdout: bool,
    pub(crate) stderr: bool,
    pub(crate) tty: bool,
}

impl Options {
    /// Reads `stdin`, `stdout`, `stderr` and `tty` from a query string.
    pub(crate) fn from_query(query: Option<&str>) -> Self {
        let mut options = Self::default();
        for pair in query.unwrap_or_default().split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let on = matches!(value, "true" | "1" | "True" | "TRUE");
            match key {
                "stdin" => options.stdin = on,
                "stdout" => options.stdout = on,
                "stderr" => options.stderr = on,
                "tty" => options.tty = on,
                _ => {}
            }
        }
        options
    }
}

/// The streams of one exec, as they arrive.
#[derive(Default)]
struct Streams {
    error: Option<IncomingStream>,
    stdin: Option<IncomingStream>,
    stdout: Option<IncomingStream>,
    stderr: Option<IncomingStream>,
}

impl Streams {
    fn complete(&self, options: Options) -> bool {
        self.error.is_some()
            && (!options.stdin || self.stdin.is_some())
            && (!options.stdout || self.stdout.is_some())
            && (!options.stderr || options.tty || self.stderr.is_some())
    }
}

/// Serves the streams of one exec connection.
pub(crate) async fn serve(
    mut incoming: mpsc::Receiver<IncomingStream>,
    protocol: Protocol,
    options: Options,
    command: Vec<String>,
    user: String,
    files: PodFiles,
    resizes: Resizes,
) {
    // Only a TTY has a resize stream to read.
    let resizes = options.tty.then_some(resizes);
    let mut streams = Streams::default();
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while !streams.complete(options) {
        let stream = match tokio::time::timeout_at(deadline, incoming.recv()).await {
            Ok(Some(stream)) => stream,
            Ok(None) => return,
            Err(_) => {
                if let Some(error) = streams.error {
                    let message = "timed out waiting for client to create streams";
                    report(&error.sender, protocol, Err(message.to_owned())).await;
                }
                return;
            }
        };
        let slot = match header(&stream.headers, "streamtype") {
            Some("error") => &mut streams.error,
            Some("stdin") => &mut streams.stdin,
            Some("stdout") => &mut streams.stdout,
            Some("stderr") => &mut streams.stderr,
            _ => {
                extra_stream(stream, resizes.clone());
                continue;
            }
        };
        if slot.is_some() {
            let _ = stream.sender.reset(rst::PROTOCOL_ERROR).await;
        } else {
            *slot = Some(stream);
        }
    }
    // Streams opened from now on (resize) are accepted and drained.
    tokio::spawn(async move {
        while let Some(stream) = incoming.recv().await {
            extra_stream(stream, resizes.clone());
        }
    });
    run(streams, protocol, options, command, user, files).await;
}

/// Accepts a stream besides the command's: a `resize` stream is read (its sizes recorded
/// in `resizes`, with a TTY) until the client closes it, anything else reset.
fn extra_stream(stream: IncomingStream, resizes: Option<Resizes>) {
    let IncomingStream {
        headers,
        mut data,
        sender,
    } = stream;
    tokio::spawn(async move {
        if header(&headers, "streamtype") == Some("resize") {
            let mut reader = ResizeReader::new(ExecTransport::Spdy);
            while let Some(chunk) = data.recv().await {
                if let Some(resizes) = &resizes {
                    reader.feed(resizes, &chunk);
                }
            }
            let _ = sender.finish().await;
        } else {
            let _ = sender.reset(rst::REFUSED_STREAM).await;
        }
    });
}

async fn run(
    streams: Streams,
    protocol: Protocol,
    options: Options,
    command: Vec<String>,
    user: String,
    files: PodFiles,
) {
    let Streams {
        error,
        stdin,
        stdout,
        stderr,
    } = streams;
    // Only the way back is needed; dropping the receiver discards anything the client sends.
    let Some(IncomingStream { sender: error, .. }) = error else {
        return;
    };
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(16);
    let (stdout_tx, stdout_rx) = mpsc::channel::<Bytes>(16);
    let (stderr_tx, stderr_rx) = mpsc::channel::<Bytes>(16);
    // The command's stdin lasts until the client's FIN on the stdin stream (or no stdin at all).
    let stdin_pump = match stdin {
        Some(mut stream) => Some(tokio::spawn(async move {
            while let Some(chunk) = stream.data.recv().await {
                if stdin_tx.send(chunk).await.is_err() {
                    break;
                }
            }
        })),
        None => {
            drop(stdin_tx);
            None
        }
    };
    let stdout_sender = stdout.map(|s| s.sender);
    // With a TTY there is no stderr stream: stderr joins stdout, as on a terminal.
    let stderr_sender = if options.tty {
        stdout_sender.clone()
    } else {
        stderr.map(|s| s.sender)
    };
    let (code, (), ()) = tokio::join!(
        crate::command::run_command(&command, &user, &files, stdin_rx, stdout_tx, stderr_tx),
        pump(stdout_rx, stdout_sender.as_ref()),
        pump(stderr_rx, stderr_sender.as_ref()),
    );
    if let Some(task) = stdin_pump {
        task.abort();
    }
    if let Some(sender) = &stdout_sender {
        let _ = sender.finish().await;
    }
    if let Some(sender) = &stderr_sender
        && !options.tty
    {
        let _ = sender.finish().await;
    }
    report_exit(&error, protocol, &command, code).await;
}

/// Copies one output of the command to its stream, or discards it if there is none.
async fn pump(mut output: mpsc::Receiver<Bytes>, sender: Option<&StreamSender>) {
    let mut sender = sender;
    while let Some(chunk) = output.recv().await {
        if let Some(s) = sender
            && s.send(chunk).await.is_err()
        {
            // Keep draining so the command never blocks on a dead stream.
            sender = None;
        }
    }
}

/// Reports the command's exit on the error stream and closes it.
async fn report_exit(error: &StreamSender, protocol: Protocol, command: &[String], code: i32) {
    if code == 0 {
        report(error, protocol, Ok(())).await;
        return;
    }
    let message = format!(
        "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
        command.join(" ")
    );
    match protocol {
        Protocol::V4 => {
            let status = serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            });
            let _ = error.send(Bytes::from(status.to_string())).await;
            let _ = error.finish().await;
        }
        Protocol::Legacy => report(error, protocol, Err(message)).await,
    }
}

/// Writes a success or a plain failure to the error stream and closes it.
async fn report(error: &StreamSender, protocol: Protocol, outcome: Result<(), String>) {
    let body = match (protocol, outcome) {
        (Protocol::V4, Ok(())) => Some(r#"{"metadata":{},"status":"Success"}"#.to_owned()),
        (Protocol::Legacy, Ok(())) => None,
        (Protocol::V4, Err(message)) => Some(
            serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "InternalError",
                "code": 500,
            })
            .to_string(),
        ),
        (Protocol::Legacy, Err(message)) => Some(message),
    };
    if let Some(body) = body
        && error.send(Bytes::from(body)).await.is_err()
    {
        return;
    }
    let _ = error.finish().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_come_from_the_query() {
        let o = Options::from_query(Some(
            "command=cat&container=app&stdin=true&stdout=true&stderr=true",
        ));
        assert_eq!(
            o,
            Options {
                stdin: true,
                stdout: true,
                stderr: true,
                tty: false
            }
        );
        let o = Options::from_query(Some("command=sh&tty=1&stdout=1&stdin=false"));
        assert!(o.tty && o.stdout && !o.stdin && !o.stderr);
        assert_eq!(Options::from_query(None), Options::default());
    }
}
