//! Exec over WebSocket at the frame level: subprotocol choice, channels, the v5 close
//! message and the final Status on the error channel.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Harness, eventually, ws_connect};
use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

const DEADLINE: Duration = Duration::from_secs(30);

/// Collects (channel, payload) messages until the server closes.
async fn collect<S>(ws: &mut S) -> Vec<(u8, Vec<u8>)>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while let Some(msg) = ws.next().await {
            match msg.unwrap() {
                Message::Binary(data) => out.push((data[0], data[1..].to_vec())),
                Message::Close(_) => break,
                _ => {}
            }
        }
    })
    .await
    .expect("session ends");
    out
}

fn status(messages: &[(u8, Vec<u8>)]) -> serde_json::Value {
    let (_, payload) = messages.iter().find(|(c, _)| *c == 3).expect("a status");
    serde_json::from_slice(payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v5_cat_round_trips_until_stdin_is_closed() {
    let h = Harness::start().await;
    let (mut ws, protocol) = ws_connect(
        &h.stand_in,
        "/api/v1/namespaces/default/pods/web-0/exec?command=cat&stdin=true&stdout=true&stderr=true",
        "v5.channel.k8s.io, v4.channel.k8s.io",
    )
    .await;
    assert_eq!(protocol, "v5.channel.k8s.io");
    ws.send(Message::binary(b"\x00ping ".to_vec()))
        .await
        .unwrap();
    ws.send(Message::binary(b"\x00pong".to_vec()))
        .await
        .unwrap();
    ws.send(Message::binary(vec![255, 0])).await.unwrap();
    let messages = collect(&mut ws).await;
    let stdout: Vec<u8> = messages
        .iter()
        .filter(|(c, _)| *c == 1)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(stdout, b"ping pong");
    assert_eq!(
        status(&messages),
        serde_json::json!({"metadata": {}, "status": "Success"})
    );
    assert_eq!(messages.last().unwrap().0, 3, "status comes last");
    eventually("the session to end", DEADLINE, || {
        h.stand_in.open_streams() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v4_reports_a_non_zero_exit_code() {
    let h = Harness::start().await;
    let (mut ws, protocol) = ws_connect(
        &h.stand_in,
        "/api/v1/namespaces/default/pods/web-1/exec?command=sh&command=-c&command=exit%207&stdout=true&stderr=true",
        "v4.channel.k8s.io",
    )
    .await;
    assert_eq!(protocol, "v4.channel.k8s.io");
    let messages = collect(&mut ws).await;
    let status = status(&messages);
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_ends_the_session() {
    let h = Harness::start().await;
    let (ws, _) = ws_connect(
        &h.stand_in,
        "/api/v1/namespaces/default/pods/web-0/attach?container=app&stdin=true&stdout=true",
        "v5.channel.k8s.io",
    )
    .await;
    eventually("the session to start", DEADLINE, || {
        h.stand_in.open_streams() == 1
    })
    .await;
    drop(ws);
    eventually("the session to end", DEADLINE, || {
        h.stand_in.open_streams() == 0
    })
    .await;
}
