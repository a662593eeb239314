//! Watch responses: a chunked stream with one event per chunk — first the replay (current
//! objects, or history after a resourceVersion), then live events from the store's
//! broadcast channel. The stream is polled by the connection's task (no task per watch)
//! and ends on `timeoutSeconds`, on shutdown, or when the client goes away.
//!
//! In JSON (`application/json`) an event is one line. In protobuf
//! (`application/vnd.kubernetes.protobuf;stream=watch`, for a client that asks for it) it
//! is a frame of [`protobuf::watch_event`]: a 4-byte big-endian length, then a raw
//! `WatchEvent` whose object is an enveloped `runtime.Unknown`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderValue};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use crate::api::Body;
use crate::negotiate::{self, Output};
use crate::protobuf;
use crate::status::ApiError;
use crate::store::{Event, EventType, Filter, Resource, Since, event_line};
use crate::table::{self, IncludeObject};
use crate::{Shared, StreamGuard};

struct WatchState {
    shared: Arc<Shared>,
    resource: Resource,
    filter: Filter,
    initial: VecDeque<Bytes>,
    bookmark: Option<Value>,
    replay: VecDeque<Arc<Event>>,
    live: Option<tokio::sync::broadcast::Receiver<Arc<Event>>>,
    deadline: Option<Instant>,
    as_table: bool,
    include: IncludeObject,
    sent_columns: bool,
    output: Output,
    /// An event could not be encoded: an ERROR event went out instead, and the watch ends.
    failed: bool,
    _guard: StreamGuard,
}

/// How a watch was asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    pub(crate) since: Since,
    pub(crate) timeout: Option<Duration>,
    pub(crate) as_table: bool,
    pub(crate) include: IncludeObject,
    /// Send a BOOKMARK annotated `k8s.io/initial-events-end` after the initial events.
    pub(crate) initial_events_end_bookmark: bool,
    /// JSON lines or protobuf frames (never protobuf with `as_table`).
    pub(crate) output: Output,
}

/// Starts a watch response.
pub(crate) fn serve(
    shared: &Arc<Shared>,
    resource: Resource,
    filter: Filter,
    options: Options,
) -> Response<Body> {
    let (initial, replay, live, bookmark, error) =
        match shared.store.watch(resource, &filter, options.since) {
            Ok(start) => (
                start.initial.into(),
                start.replay.into(),
                Some(start.live),
                options
                    .initial_events_end_bookmark
                    .then(|| bookmark(resource, start.rv)),
                None,
            ),
            // Like the apiserver, a too-old resourceVersion is an ERROR event in a 200 stream.
            Err(err) => (VecDeque::new(), VecDeque::new(), None, None, Some(err)),
        };
    let state = WatchState {
        shared: shared.clone(),
        resource,
        filter,
        initial,
        bookmark,
        replay,
        live,
        deadline: options.timeout.map(|t| Instant::now() + t),
        as_table: options.as_table,
        include: options.include,
        sent_columns: false,
        output: options.output,
        failed: false,
        _guard: StreamGuard::new(shared),
    };
    let first_error = error.map(|e| error_event(options.output, &e));
    let stream = futures::stream::unfold(
        (state, first_error),
        |(mut state, pending_error)| async move {
            if let Some(line) = pending_error {
                // An error event ends the watch: drop the receiver.
                state.live = None;
                return Some((Ok::<_, Infallible>(Frame::data(line)), (state, None)));
            }
            let line = state.next_line().await?;
            Some((Ok(Frame::data(line)), (state, None)))
        },
    );
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    // handlers/watch.go: JSON as is, any other media type with `;stream=watch`.
    let content_type = match options.output {
        Output::Json => HeaderValue::from_static(negotiate::JSON),
        Output::Protobuf => {
            HeaderValue::from_static("application/vnd.kubernetes.protobuf;stream=watch")
        }
    };
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    resp
}

/// The object of the BOOKMARK that ends the initial events.
fn bookmark(resource: Resource, rv: u64) -> Value {
    json!({
        "kind": resource.kind(),
        "apiVersion": resource.api_version(),
        "metadata": {
            "resourceVersion": rv.to_string(),
            "annotations": {"k8s.io/initial-events-end": "true"},
        },
    })
}

/// One event in `output`'s framing: a JSON line, or a protobuf frame (an error when the
/// object has a field the stand-in cannot write in protobuf).
fn encode_event(output: Output, kind: &str, object: &Value) -> Result<Bytes, String> {
    match output {
        Output::Json => {
            let mut line = json!({"type": kind, "object": object}).to_string();
            line.push('\n');
            Ok(Bytes::from(line))
        }
        Output::Protobuf => protobuf::watch_event(kind, object).map(Bytes::from),
    }
}

fn error_event(output: Output, err: &ApiError) -> Bytes {
    // A `Status` always encodes.
    encode_event(output, "ERROR", &err.to_value()).unwrap_or_default()
}

impl WatchState {
    /// The next event line, or `None` when the watch is over.
    async fn next_line(&mut self) -> Option<Bytes> {
        if self.failed {
            return None;
        }
        if let Some(object) = self.initial.pop_front() {
            return Some(self.render_object(EventType::Added, object));
        }
        if let Some(bookmark) = self.bookmark.take() {
            return Some(self.encode("BOOKMARK", &bookmark));
        }
        if let Some(event) = self.replay.pop_front() {
            return Some(self.render_event(&event));
        }
        let cancel = self.shared.cancel.clone();
        let deadline = self.deadline;
        loop {
            let live = self.live.as_mut()?;
            let received = tokio::select! {
                () = cancel.cancelled() => return None,
                () = sleep_until_opt(deadline) => return None,
                received = live.recv() => received,
            };
            match received {
                Ok(event) if self.filter.matches_event(self.resource, &event) => {
                    let mut held = self.shared.watches_held.subscribe();
                    tokio::select! {
                        () = cancel.cancelled() => return None,
                        () = sleep_until_opt(deadline) => return None,
                        released = held.wait_for(|held| !held) => drop(released),
                    }
                    return Some(self.render_event(&event));
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "watch fell behind; ending it with 410");
                    self.live = None;
                    let rv = self.shared.store.resource_version();
                    return Some(error_event(
                        self.output,
                        &ApiError::expired(rv.saturating_sub(missed), rv),
                    ));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// An event in this watch's framing; an object that cannot be encoded ends the watch
    /// with an ERROR event (a real apiserver would encode it: the stand-in lacks a field).
    fn encode(&mut self, kind: &str, object: &Value) -> Bytes {
        match encode_event(self.output, kind, object) {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!(error = %e, "a watch event could not be encoded");
                self.failed = true;
                self.live = None;
                error_event(self.output, &ApiError::internal(e))
            }
        }
    }

    fn render_event(&mut self, event: &Event) -> Bytes {
        if self.output == Output::Protobuf {
            let object: Value = serde_json::from_slice(&event.object).unwrap_or(Value::Null);
            return self.encode(event.kind.as_str(), &object);
        }
        if !self.as_table {
            return event.line();
        }
        if self.sent_columns && self.include == IncludeObject::Metadata {
            return event.table_line();
        }
        let object: Value = serde_json::from_slice(&event.object).unwrap_or(Value::Null);
        self.table_line(event.kind, object, &event.rv.to_string())
    }

    fn render_object(&mut self, kind: EventType, object: Bytes) -> Bytes {
        if self.output == Output::Protobuf {
            let object: Value = serde_json::from_slice(&object).unwrap_or(Value::Null);
            return self.encode(kind.as_str(), &object);
        }
        if !self.as_table {
            return event_line(kind, &object);
        }
        let object: Value = serde_json::from_slice(&object).unwrap_or(Value::Null);
        let rv = object["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        self.table_line(kind, object, &rv)
    }

    fn table_line(&mut self, kind: EventType, object: Value, rv: &str) -> Bytes {
        let with_columns = !self.sent_columns;
        self.sent_columns = true;
        let t = table::table(
            self.resource,
            std::slice::from_ref(&object),
            rv,
            with_columns,
            self.include,
        );
        let mut line = json!({"type": kind.as_str(), "object": t}).to_string();
        line.push('\n');
        Bytes::from(line)
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
