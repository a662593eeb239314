//! The pod side of `portforward.k8s.io`: every port of the stand-in pod is an echo server.
//!
//! kubectl opens two streams per forwarded connection, `streamType: error` and
//! `streamType: data`, both carrying `port` and `requestID`. Whatever arrives on the data
//! stream is echoed back; at the client's FIN the echo finishes and the data stream is
//! half-closed, then the error stream of the same request is closed without a message.

use std::collections::HashMap;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::frame::{header, rst};
use super::session::{IncomingStream, StreamSender};

/// The outcome of one request's data stream: `Some(message)` if it failed.
type Done = (String, Option<String>);

/// What is known about one `requestID`.
enum Request {
    /// The error stream arrived first and waits for the data stream to end.
    ErrorStream(StreamSender),
    /// The data stream ended first, with this outcome.
    Finished(Option<String>),
}

/// Serves the streams of one port-forward connection.
pub(crate) async fn serve(mut incoming: mpsc::Receiver<IncomingStream>) {
    let (done_tx, mut done_rx) = mpsc::channel::<Done>(16);
    let mut requests: HashMap<String, Request> = HashMap::new();
    loop {
        tokio::select! {
            stream = incoming.recv() => {
                let Some(stream) = stream else { break };
                accept(stream, &mut requests, &done_tx).await;
            }
            Some((request_id, outcome)) = done_rx.recv() => {
                match requests.remove(&request_id) {
                    Some(Request::ErrorStream(sender)) => {
                        tokio::spawn(close_error_stream(sender, outcome));
                    }
                    _ => {
                        requests.insert(request_id, Request::Finished(outcome));
                    }
                }
            }
        }
    }
}

async fn accept(
    stream: IncomingStream,
    requests: &mut HashMap<String, Request>,
    done_tx: &mpsc::Sender<Done>,
) {
    let IncomingStream {
        headers,
        data,
        sender,
    } = stream;
    let request_id = header(&headers, "requestid").unwrap_or_default().to_owned();
    let port = header(&headers, "port").unwrap_or_default().to_owned();
    match header(&headers, "streamtype") {
        Some("error") => {
            // The client never writes on the error stream; drain it in case it does.
            tokio::spawn(drain(data));
            match requests.remove(&request_id) {
                Some(Request::Finished(outcome)) => {
                    tokio::spawn(close_error_stream(sender, outcome));
                }
                _ => {
                    requests.insert(request_id, Request::ErrorStream(sender));
                }
            }
        }
        Some("data") => {
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                let outcome = match port.parse::<u16>() {
                    Ok(p) if p > 0 => {
                        echo(data, &sender).await;
                        None
                    }
                    _ => {
                        let _ = sender.finish().await;
                        Some(format!("invalid port {port:?}"))
                    }
                };
                let _ = done_tx.send((request_id, outcome)).await;
            });
        }
        other => {
            tracing::debug!("port-forward stream with unexpected type {other:?}");
            let _ = sender.reset(rst::REFUSED_STREAM).await;
        }
    }
}

/// Echoes a data stream until the client's FIN, then half-closes it.
async fn echo(mut data: mpsc::Receiver<Bytes>, sender: &StreamSender) {
    while let Some(chunk) = data.recv().await {
        if sender.send(chunk).await.is_err() {
            return;
        }
    }
    let _ = sender.finish().await;
}

async fn close_error_stream(sender: StreamSender, outcome: Option<String>) {
    if let Some(message) = outcome
        && sender.send(Bytes::from(message)).await.is_err()
    {
        return;
    }
    let _ = sender.finish().await;
}

async fn drain(mut data: mpsc::Receiver<Bytes>) {
    while data.recv().await.is_some() {}
}
