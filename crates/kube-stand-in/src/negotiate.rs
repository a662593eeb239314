//! Content negotiation for the object verbs' answers, as kube-apiserver does it: the media
//! type from `Accept` (JSON or protobuf) and gzip from `Accept-Encoding`.
//!
//! Media types: kube-apiserver takes the client's `Accept` clauses best first (by `q`, then
//! the more specific) and answers with the first it serves
//! (staging/src/k8s.io/apiserver/pkg/endpoints/handlers/negotiation); a clause's `stream`
//! may only be `watch` (`AllowsStreamSchema`), on any verb. It serves protobuf for every
//! built-in kind; the
//! stand-in only for the kinds [`crate::protobuf::writes`], and for the others passes on
//! to the client's next clause. It serves no YAML. When no clause is left: 406, as the
//! apiserver answers a client that accepts nothing it serves.
//!
//! Compression: with `Accept-Encoding` listing `gzip`, a response whose body is larger than
//! 128 KiB is gzipped, with `Content-Encoding: gzip` and `Vary: Accept-Encoding`
//! (staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/writers.go:
//! `defaultGzipThresholdBytes`, `deferredResponseWriter`; level 1, as current releases
//! compress). Only what the apiserver writes through `SerializeObject` (objects, lists,
//! `Status` errors) is eligible: never a watch, an upgrade or a log stream.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use http::header::{self, HeaderMap, HeaderValue};
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame, SizeHint};

use crate::api::Body;
use crate::status::ApiError;

/// The media type of JSON.
pub(crate) const JSON: &str = "application/json";
/// The media type of Kubernetes protobuf.
pub(crate) const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";
/// A body at most this large is never gzipped (writers.go, `defaultGzipThresholdBytes`).
pub(crate) const GZIP_THRESHOLD: u64 = 128 * 1024;

/// How to write an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// `application/json`.
    Json,
    /// `application/vnd.kubernetes.protobuf` (`;stream=watch` for a watch).
    Protobuf,
}

/// One clause of `Accept`.
struct Clause<'a> {
    media: String,
    params: Vec<(String, &'a str)>,
    q: f32,
}

fn clauses(accept: &str) -> Vec<Clause<'_>> {
    let mut out: Vec<Clause<'_>> = accept
        .split(',')
        .filter_map(|clause| {
            let mut parts = clause.split(';');
            let media = parts.next()?.trim().to_ascii_lowercase();
            if media.is_empty() {
                return None;
            }
            let mut q = 1.0;
            let mut params = Vec::new();
            for param in parts {
                let (key, value) = param.split_once('=').unwrap_or((param, ""));
                let key = key.trim().to_ascii_lowercase();
                let value = value.trim();
                if key == "q" {
                    q = value.parse().unwrap_or(0.0);
                } else {
                    params.push((key, value));
                }
            }
            Some(Clause { media, params, q })
        })
        .filter(|c| c.q > 0.0)
        .collect();
    // Best first, the more specific first among equals; otherwise in the client's order.
    let specificity = |c: &Clause<'_>| match c.media.as_str() {
        "*/*" => 0,
        m if m.ends_with("/*") => 1,
        _ => 2,
    };
    out.sort_by(|a, b| {
        b.q.total_cmp(&a.q)
            .then_with(|| specificity(b).cmp(&specificity(a)))
    });
    out
}

/// The output for a request with `accept` (none: JSON); `protobuf`: the stand-in can
/// write this kind as protobuf.
pub(crate) fn output(accept: Option<&str>, protobuf: bool) -> Result<Output, ApiError> {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return Ok(Output::Json);
    };
    for clause in clauses(accept) {
        // `stream` other than `watch` is refused; `as`/`g`/`v` ask for a conversion
        // (Table, PartialObjectMetadata), served as JSON Tables elsewhere and not otherwise.
        let acceptable = clause.params.iter().all(|(key, value)| match key.as_str() {
            "stream" => *value == "watch",
            "as" | "g" | "v" => false,
            _ => true,
        });
        if !acceptable {
            continue;
        }
        match clause.media.as_str() {
            "*/*" | "application/*" | JSON => return Ok(Output::Json),
            PROTOBUF if protobuf => return Ok(Output::Protobuf),
            _ => {}
        }
    }
    Err(ApiError::not_acceptable(if protobuf {
        &[JSON, PROTOBUF][..]
    } else {
        &[JSON][..]
    }))
}

/// Whether the client takes gzip: a token of `Accept-Encoding` is exactly `gzip`
/// (writers.go, `negotiateContentEncoding`, which reads no `q`).
pub(crate) fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim() == "gzip")
}

/// Marks a response as written by the apiserver's `SerializeObject`: eligible for gzip.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Serialized;

/// Gzips `response` when it is eligible ([`Serialized`]) and its body is larger than
/// [`GZIP_THRESHOLD`] (a body of unknown length is a streamed list: larger). Returns whether
/// it did.
pub(crate) fn gzip_if_large(response: &mut http::Response<Body>) -> bool {
    if response.extensions().get::<Serialized>().is_none()
        || response.headers().contains_key(header::CONTENT_ENCODING)
    {
        return false;
    }
    if response
        .body()
        .size_hint()
        .exact()
        .is_some_and(|len| len <= GZIP_THRESHOLD)
    {
        return false;
    }
    let body = std::mem::replace(response.body_mut(), crate::api::full(Bytes::new()));
    *response.body_mut() = GzipBody {
        inner: body,
        encoder: Some(GzEncoder::new(Vec::new(), Compression::new(1))),
    }
    .boxed_unsync();
    let headers = response.headers_mut();
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    true
}

/// A body gzipped as it streams: each frame of the inner body is compressed and passed on
/// (what the compressor holds back comes with a later frame or the trailer).
struct GzipBody {
    inner: Body,
    /// `None` once the gzip trailer is out.
    encoder: Option<GzEncoder<Vec<u8>>>,
}

impl hyper::body::Body for GzipBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        use std::io::Write as _;
        let this = self.get_mut();
        loop {
            let Some(encoder) = this.encoder.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    // Writing into a Vec cannot fail.
                    let _ = encoder.write_all(&data);
                    let out = std::mem::take(encoder.get_mut());
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => {
                    let out = this
                        .encoder
                        .take()
                        .map(|e| e.finish().unwrap_or_default())
                        .unwrap_or_default();
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_clause_the_stand_in_serves_wins() {
        let pb = "application/vnd.kubernetes.protobuf, */*";
        assert_eq!(output(Some(pb), true), Ok(Output::Protobuf));
        assert_eq!(output(Some(pb), false), Ok(Output::Json));
        assert_eq!(output(None, true), Ok(Output::Json));
        assert_eq!(
            output(Some("application/json, */*"), true),
            Ok(Output::Json)
        );
        let watch = "application/vnd.kubernetes.protobuf;stream=watch";
        assert_eq!(output(Some(watch), true), Ok(Output::Protobuf));
        // `stream=watch` on a list as well (`AllowsStreamSchema`); any other stream, never.
        let other = "application/vnd.kubernetes.protobuf;stream=other";
        assert_eq!(output(Some(other), true).map_err(|e| e.code), Err(406));
        let q = "application/json;q=0.5, application/vnd.kubernetes.protobuf";
        assert_eq!(output(Some(q), true), Ok(Output::Protobuf));
        // Protobuf only, for a kind the stand-in writes as JSON alone: 406, not JSON.
        let refused = output(Some(PROTOBUF), false).expect_err("406");
        assert_eq!((refused.code, refused.reason), (406, "NotAcceptable"));
        assert_eq!(
            output(Some("application/yaml"), true).map_err(|e| e.code),
            Err(406)
        );
        assert_eq!(
            output(Some("application/json;q=0"), true).map_err(|e| e.code),
            Err(406)
        );
    }

    #[test]
    fn gzip_is_a_token_of_its_own() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_str(v).expect("value"),
            );
            accepts_gzip(&h)
        };
        assert!(with("gzip"));
        assert!(with("deflate, gzip"));
        assert!(!with("gzip;q=1"));
        assert!(!with("x-gzip"));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    fn serialized(body: Body) -> http::Response<Body> {
        let mut response = http::Response::new(body);
        response.extensions_mut().insert(Serialized);
        response
    }

    #[tokio::test]
    async fn only_large_serialized_bodies_are_gzipped() {
        use std::io::Read as _;
        let small = vec![b'a'; GZIP_THRESHOLD as usize];
        let mut response = serialized(crate::api::full(small));
        assert!(!gzip_if_large(&mut response), "128 KiB exactly stays plain");
        let mut unmarked = http::Response::new(crate::api::full(vec![b'a'; 1 << 20]));
        assert!(
            !gzip_if_large(&mut unmarked),
            "a watch or a log is never gzipped"
        );

        let large: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut response = serialized(crate::api::full(large.clone()));
        assert!(gzip_if_large(&mut response));
        assert_eq!(response.headers()[header::CONTENT_ENCODING], "gzip");
        assert_eq!(response.headers()[header::VARY], "Accept-Encoding");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut plain)
            .expect("valid gzip");
        assert_eq!(plain, large);
    }
}
