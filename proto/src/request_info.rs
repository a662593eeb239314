//! Whether a request is a watch, decided as the API servers behind the tunnel decide it.
//!
//! Both proxies treat a watch apart: it rides the tunnel's shared HTTP/2 stream, holds no
//! wide read slot, and ends at an event boundary when a proxy drains. So a request taken
//! for a watch that is not one could have a multi-line response (`?pretty=true`) ended
//! cleanly in its middle on a drain, a truncated answer presented as whole; and a watch
//! taken for something else holds a tunnel stream and an upstream connection of its own,
//! and is cut, not ended, on a drain.
//!
//! kube-apiserver serves a watch for a GET that its request info resolves to the `watch`
//! verb (`k8s.io/apiserver/pkg/endpoints/request/requestinfo.go`, `NewRequestInfo`):
//! below `/api/{version}/` or `/apis/{group}/{version}/`, either the deprecated `watch/`
//! path prefix, or a collection (no object name in the path) whose first `watch` query
//! parameter is true as apimachinery converts it (`Convert_Slice_string_To_bool` in
//! `k8s.io/apimachinery/pkg/runtime/conversion.go`: anything but `0` and `false`, in any
//! case, and an empty value too). A named object's GET ignores the parameter; so do other
//! methods. The path is read decoded (Go's `URL.Path`) and the query as Go's
//! `url.ParseQuery` reads it ([`query_flag`]). ks-apiserver resolves its own prefixes,
//! `/kapis/{group}/{version}/` and `/kapi/{version}/`, the same way, with its
//! `clusters/{cluster}/`, `workspaces/{workspace}/` and `devops/{project}/` segments
//! (kubesphere's `pkg/apiserver/request/requestinfo.go`); its `/api` and `/apis` requests
//! go on to kube-apiserver.

use std::borrow::Cow;

use http::{Method, Uri};

/// Whether the API server that `uri` names (the member's path, as the agent's upstream
/// sees it) serves `method` `uri` as a watch.
pub fn is_watch(method: &Method, uri: &Uri) -> bool {
    if method != Method::GET {
        return false;
    }
    // An invalid escape fails the request in Go's server before any handler.
    let Some(path) = unescape(uri.path(), false) else {
        return false;
    };
    let Ok(path) = std::str::from_utf8(&path) else {
        return false;
    };
    // Only the leading segments are looked at; past the first few, only whether there are
    // more matters, and a path with more than this many has more.
    let mut segments = [""; 16];
    let mut n = 0;
    let trimmed = path.trim_matches('/');
    if !trimmed.is_empty() {
        for segment in trimmed.split('/').take(segments.len()) {
            segments[n] = segment;
            n += 1;
        }
    }
    match resolve(&segments[..n]) {
        Resolved::WatchPath => true,
        Resolved::Collection => query_flag(uri.query(), "watch"),
        Resolved::Other => false,
    }
}

/// What a GET's path resolves to in `NewRequestInfo`.
enum Resolved {
    /// `…/watch/{resource}…`: the deprecated verb in the path.
    WatchPath,
    /// A resource with no name: a list, or a watch if the query asks for one.
    Collection,
    /// A named object, a subresource, a proxy, or not a resource request at all.
    Other,
}

fn resolve(parts: &[&str]) -> Resolved {
    if parts.len() < 3 {
        return Resolved::Other;
    }
    let (grouped, kubesphere) = match parts[0] {
        "api" => (false, false),
        "apis" => (true, false),
        "kapi" => (false, true),
        "kapis" => (true, true),
        _ => return Resolved::Other,
    };
    let mut rest = &parts[1..];
    if kubesphere && rest[0] == "clusters" && rest.len() > 2 {
        rest = &rest[2..];
    }
    if grouped {
        // The group; then a version and something below it.
        if rest.len() < 3 {
            return Resolved::Other;
        }
        rest = &rest[1..];
    }
    // The version.
    rest = &rest[1..];
    let Some(&first) = rest.first() else {
        return Resolved::Other;
    };
    match first {
        // "unable to determine kind and namespace" without a second part: refused.
        "watch" => {
            return if rest.len() >= 2 {
                Resolved::WatchPath
            } else {
                Resolved::Other
            };
        }
        "proxy" => return Resolved::Other,
        _ => {}
    }
    if kubesphere && rest[0] == "workspaces" && rest.len() > 2 {
        rest = &rest[2..];
    }
    if rest[0] == "namespaces" {
        // `namespaces/{namespace}/{resource}…`, unless what follows the namespace is one
        // of its own subresources.
        if rest.len() > 2 && !matches!(rest[2], "status" | "finalize") {
            rest = &rest[2..];
        }
    } else if kubesphere && rest[0] == "devops" && rest.len() > 2 {
        rest = &rest[2..];
    }
    // `{resource}/{name}/{subresource}…`: no name, a collection.
    if rest.get(1).is_none_or(|name| name.is_empty()) {
        Resolved::Collection
    } else {
        Resolved::Other
    }
}

/// Whether the query's parameter `key` is true as kube-apiserver decodes a boolean
/// option (`watch`, `follow`, ...): its first value, the query read as Go's
/// `url.ParseQuery` reads it (pairs split at `&`, key and value unescaped with `+` as a
/// space; a pair with a `;` or an invalid escape is dropped), is neither `0` nor
/// `false` in any case.
pub fn query_flag(query: Option<&str>, key: &str) -> bool {
    query.and_then(|q| first_value(q, key)).is_some_and(|v| {
        !(v.as_ref() == b"0".as_slice()
            || std::str::from_utf8(&v).is_ok_and(|v| {
                // Go's `strings.EqualFold`: ASCII letters in either case, and `ſ` (U+017F),
                // whose simple case folding is `s`.
                v.chars()
                    .map(|c| {
                        if c == '\u{17F}' {
                            's'
                        } else {
                            c.to_ascii_lowercase()
                        }
                    })
                    .eq("false".chars())
            }))
    })
}

/// The first value of `key` in `query`, decoded, as `url.ParseQuery` keeps it.
fn first_value<'q>(query: &'q str, key: &str) -> Option<Cow<'q, [u8]>> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty() && !pair.contains(';'))
        .find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = unescape(k, true)?;
            let v = unescape(v, true)?;
            (k.as_ref() == key.as_bytes()).then_some(v)
        })
}

/// `s` with its `%XX` escapes decoded (and `+` as a space in a query component), or `None`
/// if an escape is not two hex digits (Go's `url.unescape`).
fn unescape(s: &str, query: bool) -> Option<Cow<'_, [u8]>> {
    let bytes = s.as_bytes();
    let escaped = bytes.contains(&b'%') || (query && bytes.contains(&b'+'));
    if !escaped {
        return Some(Cow::Borrowed(bytes));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |b: u8| char::from(b).to_digit(16);
                let high = hex(*bytes.get(i + 1)?)?;
                let low = hex(*bytes.get(i + 2)?)?;
                out.push(u8::try_from(high * 16 + low).ok()?);
                i += 3;
            }
            b'+' if query => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn watch(method: Method, uri: &str) -> bool {
        is_watch(&method, &uri.parse().unwrap())
    }

    #[test]
    fn collections_with_a_true_watch_parameter_and_watch_paths_are_watches() {
        let yes = [
            "/api/v1/pods?watch=1",
            "/api/v1/pods?limit=5&watch=true",
            // Anything but 0 and false is true, an empty value too.
            "/api/v1/pods?watch=TRUE",
            "/api/v1/pods?watch=t",
            "/api/v1/pods?watch=yes",
            "/api/v1/pods?watch=",
            "/api/v1/pods?watch",
            "/api/v1/pods?watch=+",
            // The first value decides.
            "/api/v1/pods?watch=1&watch=0",
            // Decoded as Go decodes; a pair that does not decode is dropped.
            "/api/v1/pods?%77atch=1",
            "/api/v1/pods?watch=%31",
            "/api/v1/pods?watch=%zz&watch=1",
            "/api/v1/pods?watch=0;x=1&watch=1",
            "/api/v1/namespaces?watch=1",
            "/api/v1/namespaces/default/pods?watch=1",
            "/apis/apps/v1/deployments?watch=1",
            "/apis/apps/v1/namespaces/default/deployments?watch=true",
            "/api/v1/watch/pods",
            "/api/v1/watch/namespaces/default/pods/web-0",
            "/apis/apps/v1/watch/deployments",
            // The path decoded, as Go's URL.Path is.
            "/api/v1/%77atch/pods",
            "/api/v1/namespaces%2Fdefault%2Fpods?watch=1",
            // ks-apiserver's own prefixes.
            "/kapis/tenant.kubesphere.io/v1alpha2/workspaces?watch=1",
            "/kapis/clusters/host/resources.kubesphere.io/v1alpha3/namespaces/ns/pods?watch=1",
            "/kapis/tenant.kubesphere.io/v1alpha2/workspaces/ws/namespaces?watch=1",
            "/kapis/devops.kubesphere.io/v1alpha3/devops/p1/pipelines?watch=1",
            "/kapi/v1/things?watch=1",
        ];
        for uri in yes {
            assert!(watch(Method::GET, uri), "{uri}");
        }
    }

    #[test]
    fn everything_else_is_not_a_watch() {
        let no = [
            "/api/v1/pods",
            "/api/v1/pods?watch=0",
            "/api/v1/pods?watch=false",
            "/api/v1/pods?watch=FALSE",
            "/api/v1/pods?watch=False",
            "/api/v1/pods?watch=fal%C5%BFe",
            "/api/v1/pods?watch=%30",
            "/api/v1/pods?watchy=1",
            "/api/v1/pods?watch=0&watch=1",
            "/api/v1/pods?watch=%zz",
            "/api/v1/pods?watch=1;x=1",
            // A named object's GET ignores the parameter.
            "/api/v1/namespaces/default/pods/web-0?watch=1",
            "/api/v1/namespaces/default?watch=1",
            "/api/v1/namespaces/default/status?watch=1",
            "/api/v1/nodes/node-1?watch=1",
            "/apis/apps/v1/namespaces/default/deployments/web?watch=1",
            // Names that are only names.
            "/api/v1/namespaces/watch/pods",
            "/api/v1/namespaces/default/configmaps/watch",
            "/apis/apps/v1/namespaces/watch/deployments",
            "/apis/watch/v1/things",
            "/clusters/watch/api/v1/pods",
            "/kapis/watch/x",
            // Not resource requests.
            "/version?watch=1",
            "/healthz?watch=1",
            "/api?watch=1",
            "/api/v1?watch=1",
            "/apis/apps?watch=1",
            "/apis/apps/v1?watch=1",
            "/api/v1/watch",
            "/api/v1/proxy/namespaces/default/pods/web-0?watch=1",
            // An invalid escape fails the request.
            "/api/v1/pods%zz?watch=1",
            // kube-apiserver knows no clusters segment.
            "/apis/clusters/host/apps/v1/deployments/web?watch=1",
        ];
        for uri in no {
            assert!(!watch(Method::GET, uri), "{uri}");
        }
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::HEAD] {
            assert!(!watch(method.clone(), "/api/v1/pods?watch=1"), "{method}");
            assert!(!watch(method.clone(), "/api/v1/watch/pods"), "{method}");
        }
    }

    #[test]
    fn a_boolean_option_is_its_first_decoded_value() {
        assert!(query_flag(Some("follow=true"), "follow"));
        assert!(query_flag(Some("container=c&follow"), "follow"));
        assert!(!query_flag(Some("follow=0&follow=1"), "follow"));
        assert!(!query_flag(Some("following=1"), "follow"));
        assert!(!query_flag(None, "follow"));
        assert!(!query_flag(Some(""), "follow"));
        assert_eq!(unescape("a%2Fb+c", true).unwrap().as_ref(), b"a/b c");
        assert_eq!(unescape("a%2Fb+c", false).unwrap().as_ref(), b"a/b+c");
        for bad in ["%", "%4", "%zz", "a%g1"] {
            assert!(unescape(bad, true).is_none(), "{bad}");
        }
    }
}
