//! Which objects a list or a watch is about: the path's namespace and the `fieldSelector`
//! and `labelSelector` query parameters, parsed as kube-apiserver parses them.

use std::collections::BTreeMap;

use super::{Event, Resource};
use crate::status::ApiError;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Which objects a list or watch is about.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    pub(crate) namespace: Option<String>,
    name: Option<String>,
    not_name: Option<String>,
    field_namespace: Option<String>,
    labels: Vec<Requirement>,
}

impl Filter {
    /// Builds a filter from the path's namespace and the `fieldSelector`/`labelSelector`
    /// query parameters.
    pub(crate) fn new(
        namespace: Option<String>,
        field_selector: Option<&str>,
        label_selector: Option<&str>,
    ) -> Result<Filter, ApiError> {
        let mut filter = Filter {
            namespace,
            ..Filter::default()
        };
        for term in field_selector
            .unwrap_or("")
            .split(',')
            .filter(|t| !t.is_empty())
        {
            let (field, value, negated) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, false)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{term}'; can't understand '{term}'"
                )));
            };
            match (field.trim(), negated) {
                ("metadata.name", false) => filter.name = Some(value.trim().to_owned()),
                ("metadata.name", true) => filter.not_name = Some(value.trim().to_owned()),
                ("metadata.namespace", false) => {
                    filter.field_namespace = Some(value.trim().to_owned());
                }
                (other, _) => {
                    return Err(ApiError::bad_request(format!(
                        "field label not supported: {other}"
                    )));
                }
            }
        }
        filter.labels = parse_label_selector(label_selector.unwrap_or(""))?;
        Ok(filter)
    }

    pub(super) fn matches(
        &self,
        namespace: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        if self.namespace.as_deref().is_some_and(|ns| ns != namespace)
            || self
                .field_namespace
                .as_deref()
                .is_some_and(|ns| ns != namespace)
            || self.name.as_deref().is_some_and(|n| n != name)
            || self.not_name.as_deref().is_some_and(|n| n == name)
        {
            return false;
        }
        self.labels.iter().all(|req| match req {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }

    pub(crate) fn matches_event(&self, resource: Resource, event: &Event) -> bool {
        event.resource == resource && self.matches(&event.namespace, &event.name, &event.labels)
    }
}

fn parse_label_selector(selector: &str) -> Result<Vec<Requirement>, ApiError> {
    // Split on commas outside parentheses.
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    let bad = |t: &str| ApiError::bad_request(format!("unable to parse requirement: {t:?}"));
    let set = |s: &str| -> Option<Vec<String>> {
        let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
        Some(inner.split(',').map(|v| v.trim().to_owned()).collect())
    };
    let mut reqs = Vec::new();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let req = if let Some((k, v)) = term.split_once("!=") {
            Requirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = term.split_once("==") {
            Requirement::Equals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = term.split_once('=') {
            Requirement::Equals(k.trim().to_owned(), v.trim().to_owned())
        } else if let Some((k, v)) = term.split_once(" notin ") {
            Requirement::NotIn(k.trim().to_owned(), set(v).ok_or_else(|| bad(term))?)
        } else if let Some((k, v)) = term.split_once(" in ") {
            Requirement::In(k.trim().to_owned(), set(v).ok_or_else(|| bad(term))?)
        } else if let Some(k) = term.strip_prefix('!') {
            Requirement::NotExists(k.trim().to_owned())
        } else if term.contains(char::is_whitespace) {
            return Err(bad(term));
        } else {
            Requirement::Exists(term.to_owned())
        };
        reqs.push(req);
    }
    Ok(reqs)
}
