//! Server-side SPDY/3.1, as kubectl uses it for `port-forward` and (with
//! `KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false`) `exec`.
//!
//! * [`portforward`] answers both ways kubectl 1.32 asks for a port-forward: a WebSocket
//!   upgrade with subprotocol `SPDY/3.1+portforward.k8s.io`, whose binary messages then carry
//!   a SPDY byte stream (the default), and the older plain `Upgrade: SPDY/3.1` with
//!   `X-Stream-Protocol-Version: portforward.k8s.io` (kubectl's fallback, and what it uses
//!   with `KUBECTL_PORT_FORWARD_WEBSOCKETS=false`). Every port of the pod is an echo server.
//! * [`exec`] answers `Upgrade: SPDY/3.1` exec requests (`v4.channel.k8s.io` to
//!   `channel.k8s.io`) and runs the command with [`crate::command::run_command`].
//!
//! The layers: [`frame`] is a sans-IO codec, `session` the I/O driver (reader loop plus
//! writer task), `portforward` and `exec` the pod's behaviour on the streams.

mod dictionary;
mod exec;
pub mod frame;
mod portforward;
mod session;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};

use crate::files::PodFiles;

/// The `Upgrade` token of SPDY/3.1.
pub const SPDY_UPGRADE: &str = "SPDY/3.1";
/// The header carrying the stream sub-protocol of a SPDY upgrade.
pub const STREAM_PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";
/// The port-forward sub-protocol.
pub const PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";
/// The WebSocket subprotocol of SPDY tunneled over a WebSocket (kubectl's default port-forward).
pub const TUNNELED_PORT_FORWARD_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// The exec sub-protocols spoken over SPDY, v4 first.
pub const EXEC_PROTOCOLS: [&str; 4] = [
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// Bytes buffered between the WebSocket and the SPDY session of a tunneled port-forward.
const TUNNEL_BUFFER: usize = 256 * 1024;

/// `…/pods/{name}/portforward`: answers the upgrade and spawns the session on
/// `hyper::upgrade::on(req)`.
///
/// Accepts a WebSocket upgrade offering `SPDY/3.1+portforward.k8s.io` (SPDY tunneled in
/// binary messages) or an `Upgrade: SPDY/3.1` request for `portforward.k8s.io`; anything
/// else gets 400. The server must serve the connection with upgrades enabled. `hold` is
/// kept until the session ends (the stand-in counts open streams with it).
pub fn portforward(req: Request<Incoming>, hold: impl Send + 'static) -> Response<Full<Bytes>> {
    let headers = req.headers();
    if upgrade_requested(headers, "websocket") {
        let offered: Vec<&str> = list_values(headers, header::SEC_WEBSOCKET_PROTOCOL).collect();
        if !offered.contains(&TUNNELED_PORT_FORWARD_PROTOCOL) {
            return bad_request(format!(
                "unable to upgrade: WebSocket port-forward needs subprotocol \
                 {TUNNELED_PORT_FORWARD_PROTOCOL}; offered {offered:?}"
            ));
        }
        let accept = match websocket_accept(headers) {
            Ok(accept) => accept,
            Err(message) => return bad_request(message),
        };
        tokio::spawn(async move {
            let _hold = hold;
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        None,
                    )
                    .await;
                    serve_tunneled(ws).await;
                }
                Err(e) => tracing::debug!("port-forward WebSocket upgrade failed: {e}"),
            }
        });
        let mut response = switching_protocols("websocket");
        let h = response.headers_mut();
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(TUNNELED_PORT_FORWARD_PROTOCOL),
        );
        return response;
    }
    if !upgrade_requested(headers, SPDY_UPGRADE) {
        return bad_request(
            "unable to upgrade: port-forward needs `Upgrade: SPDY/3.1` or a WebSocket upgrade \
             with subprotocol SPDY/3.1+portforward.k8s.io"
                .to_owned(),
        );
    }
    let offered: Vec<&str> = list_values(headers, STREAM_PROTOCOL_HEADER).collect();
    if !offered.is_empty() && !offered.contains(&PORT_FORWARD_PROTOCOL) {
        return bad_request(format!(
            "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, \
             server supports [\"{PORT_FORWARD_PROTOCOL}\"]"
        ));
    }
    tokio::spawn(async move {
        let _hold = hold;
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => session::serve(TokioIo::new(upgraded), portforward::serve).await,
            Err(e) => tracing::debug!("port-forward SPDY upgrade failed: {e}"),
        }
    });
    let mut response = switching_protocols(SPDY_UPGRADE);
    response.headers_mut().insert(
        STREAM_PROTOCOL_HEADER,
        HeaderValue::from_static(PORT_FORWARD_PROTOCOL),
    );
    response
}

/// exec with `Upgrade: SPDY/3.1` (`X-Stream-Protocol-Version` `v4.channel.k8s.io` … v1):
/// answers the upgrade and spawns the session on `hyper::upgrade::on(req)`.
///
/// The streams expected are read from the query (`stdin`, `stdout`, `stderr`, `tty`); the
/// command runs as `user` on the pod's `files` once they are open. Refused upgrades get 400.
/// A TTY's terminal sizes are recorded in `resizes`. `hold` is kept until the session ends.
pub fn exec(
    req: Request<Incoming>,
    command: Vec<String>,
    user: String,
    files: PodFiles,
    resizes: crate::Resizes,
    hold: impl Send + 'static,
) -> Response<Full<Bytes>> {
    let headers = req.headers();
    if !upgrade_requested(headers, SPDY_UPGRADE) {
        return bad_request(
            "unable to upgrade: exec over SPDY needs `Connection: Upgrade` and \
             `Upgrade: SPDY/3.1`"
                .to_owned(),
        );
    }
    let offered: Vec<&str> = list_values(headers, STREAM_PROTOCOL_HEADER).collect();
    let chosen = offered
        .iter()
        .find_map(|p| EXEC_PROTOCOLS.iter().find(|s| *s == p).copied());
    if !offered.is_empty() && chosen.is_none() {
        return bad_request(format!(
            "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, \
             server supports {EXEC_PROTOCOLS:?}"
        ));
    }
    let protocol = if chosen == Some(EXEC_PROTOCOLS[0]) {
        exec::Protocol::V4
    } else {
        exec::Protocol::Legacy
    };
    let options = exec::Options::from_query(req.uri().query());
    tokio::spawn(async move {
        let _hold = hold;
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                session::serve(TokioIo::new(upgraded), move |incoming| {
                    exec::serve(incoming, protocol, options, command, user, files, resizes)
                })
                .await;
            }
            Err(e) => tracing::debug!("exec SPDY upgrade failed: {e}"),
        }
    });
    let mut response = switching_protocols(SPDY_UPGRADE);
    if let Some(chosen) = chosen {
        response
            .headers_mut()
            .insert(STREAM_PROTOCOL_HEADER, HeaderValue::from_static(chosen));
    }
    response
}

/// Runs a port-forward SPDY session whose bytes travel in the WebSocket's binary messages.
async fn serve_tunneled<S>(ws: WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tunnel_end, session_end) = tokio::io::duplex(TUNNEL_BUFFER);
    let (mut from_session, mut to_session) = tokio::io::split(tunnel_end);
    let (mut ws_tx, mut ws_rx) = ws.split();
    // Client to session: binary payloads are a byte stream.
    let inbound = async move {
        while let Some(message) = ws_rx.next().await {
            match message {
                Ok(Message::Binary(data)) => {
                    if to_session.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Ok(Message::Text(_)) => {
                    tracing::debug!("text message in a SPDY tunnel");
                    break;
                }
                Ok(Message::Close(_)) => break,
                Err(e) => {
                    tracing::debug!("SPDY tunnel WebSocket read failed: {e}");
                    break;
                }
            }
        }
        let _ = to_session.shutdown().await;
    };
    // Session to client: whatever the session writes goes out as binary messages.
    let outbound = async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            buf.reserve(64 * 1024);
            match from_session.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if ws_tx
                        .send(Message::Binary(buf.split().freeze()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = ws_tx
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        let _ = ws_tx.close().await;
    };
    tokio::join!(
        session::serve(session_end, portforward::serve),
        inbound,
        outbound
    );
}

/// Whether the request asks to upgrade to `protocol` (`Connection: Upgrade` plus `Upgrade`).
fn upgrade_requested(headers: &HeaderMap, protocol: &str) -> bool {
    list_values(headers, header::CONNECTION).any(|v| v.eq_ignore_ascii_case("upgrade"))
        && list_values(headers, header::UPGRADE).any(|v| v.eq_ignore_ascii_case(protocol))
}

/// The comma-separated values of every instance of a header.
fn list_values<K: header::AsHeaderName>(
    headers: &HeaderMap,
    name: K,
) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// `Sec-WebSocket-Accept` for a version-13 handshake.
fn websocket_accept(headers: &HeaderMap) -> Result<HeaderValue, String> {
    let version = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok());
    if version != Some("13") {
        return Err(format!(
            "unable to upgrade: unsupported Sec-WebSocket-Version {version:?}"
        ));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or_else(|| "unable to upgrade: missing Sec-WebSocket-Key".to_owned())?;
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).map_err(|e| e.to_string())
}

fn switching_protocols(upgrade: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static(upgrade));
    response
}

fn bad_request(message: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
