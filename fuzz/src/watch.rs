//! Any request a caller sends: deciding whether it is a watch never panics, only a GET
//! is one, and the decision follows the query's first `watch` value alone. Whatever
//! comes after a leading `watch=0` or `watch=1` changes nothing, and the request as sent
//! is decided as its path with the first value its `watch` parameter reads as.
//!
//! The input is a request target built of the words `request_info` looks for (so that
//! random bytes reach its resolution of a path) or raw text.
use arbitrary::Arbitrary;
use http::{Method, Uri};
use tower_proto::request_info::{is_watch, query_flag};

/// A request as a caller might send it.
#[derive(Arbitrary, Debug)]
pub struct Input {
    method: u8,
    target: Target,
}

#[derive(Arbitrary, Debug)]
enum Target {
    Built {
        root: Root,
        path: Vec<Segment>,
        query: Option<Vec<Pair>>,
    },
    Raw(String),
}

/// Where the path starts: an API server's prefixes, so that random inputs reach
/// resources often.
#[derive(Arbitrary, Debug)]
enum Root {
    Nothing,
    Core,
    Group,
    KubeSphere,
    KubeSphereCluster,
}

#[derive(Arbitrary, Debug)]
enum Segment {
    Word(Word),
    /// Every byte `%`-escaped.
    Escaped(Word),
    Any(String),
}

#[derive(Arbitrary, Debug)]
enum Word {
    Api,
    Apis,
    Kapi,
    Kapis,
    V1,
    Group,
    Clusters,
    Workspaces,
    Devops,
    Namespaces,
    Watch,
    Proxy,
    Status,
    Finalize,
    Name,
    Empty,
}

#[derive(Arbitrary, Debug)]
enum Pair {
    Watch(Value),
    /// `watch` written with escapes or `+`.
    WatchSpelt(String, Value),
    Other(String, Value),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Value {
    Zero,
    One,
    True,
    False,
    Shouted,
    /// `falſe`: Go's case folding takes `ſ` for `s`.
    LongS,
    Empty,
    Any(String),
}

impl Word {
    fn text(&self) -> &'static str {
        match self {
            Word::Api => "api",
            Word::Apis => "apis",
            Word::Kapi => "kapi",
            Word::Kapis => "kapis",
            Word::V1 => "v1",
            Word::Group => "apps",
            Word::Clusters => "clusters",
            Word::Workspaces => "workspaces",
            Word::Devops => "devops",
            Word::Namespaces => "namespaces",
            Word::Watch => "watch",
            Word::Proxy => "proxy",
            Word::Status => "status",
            Word::Finalize => "finalize",
            Word::Name => "pods",
            Word::Empty => "",
        }
    }
}

impl Value {
    fn text(&self) -> &str {
        match self {
            Value::Zero => "0",
            Value::One => "1",
            Value::True => "true",
            Value::False => "false",
            Value::Shouted => "FALSE",
            Value::LongS => "fal%C5%BFe",
            Value::Empty => "",
            Value::Any(s) => s,
        }
    }
}

impl Target {
    fn text(&self) -> String {
        let (root, path, query) = match self {
            Target::Raw(raw) => return raw.clone(),
            Target::Built { root, path, query } => (root, path, query),
        };
        let mut text = String::from(match root {
            Root::Nothing => "",
            Root::Core => "/api/v1",
            Root::Group => "/apis/apps/v1",
            Root::KubeSphere => "/kapis/tenant.kubesphere.io/v1alpha2",
            Root::KubeSphereCluster => "/kapis/clusters/host/resources.kubesphere.io/v1alpha3",
        });
        for segment in path {
            text.push('/');
            match segment {
                Segment::Word(word) => text.push_str(word.text()),
                Segment::Escaped(word) => {
                    for b in word.text().bytes() {
                        text.push_str(&format!("%{b:02X}"));
                    }
                }
                Segment::Any(s) => text.push_str(s),
            }
        }
        if let Some(pairs) = query {
            text.push('?');
            let pairs: Vec<String> = pairs
                .iter()
                .map(|pair| match pair {
                    Pair::Watch(v) => format!("watch={}", v.text()),
                    Pair::WatchSpelt(spelling, v) => format!("{spelling}={}", v.text()),
                    Pair::Other(k, v) => format!("{k}={}", v.text()),
                    Pair::Raw(raw) => raw.clone(),
                })
                .collect();
            text.push_str(&pairs.join("&"));
        }
        text
    }
}

/// `uri`'s path with `query` as its query, if that is a URI.
fn with_query(uri: &Uri, query: &str) -> Option<Uri> {
    format!("{}?{query}", uri.path()).parse().ok()
}

/// Checks one request; says whether it is a watch, if it was a GET with a valid target.
pub fn check(input: Input) -> Option<bool> {
    let Ok(uri) = input.target.text().parse::<Uri>() else {
        return None;
    };
    let method = [Method::GET, Method::POST, Method::DELETE, Method::PATCH]
        [usize::from(input.method % 4)]
    .clone();
    let watch = is_watch(&method, &uri);
    if method != Method::GET {
        assert!(!watch, "a {method} taken for a watch: {uri}");
        return None;
    }
    let query = uri.query().unwrap_or("");
    let (Some(off), Some(on), Some(only_on)) = (
        with_query(&uri, &format!("watch=0&{query}")),
        with_query(&uri, &format!("watch=1&{query}")),
        with_query(&uri, "watch=1"),
    ) else {
        return Some(watch);
    };
    let (off, on) = (is_watch(&method, &off), is_watch(&method, &on));
    assert_eq!(
        on,
        is_watch(&method, &only_on),
        "the first value decides: {uri}"
    );
    assert!(
        !off || on,
        "a path that is a watch with watch=0 but not with watch=1: {uri}"
    );
    let expected = if query_flag(uri.query(), "watch") {
        on
    } else {
        off
    };
    assert_eq!(watch, expected, "{uri}");
    Some(watch)
}
