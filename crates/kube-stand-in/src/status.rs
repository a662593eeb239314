//! Kubernetes `Status` errors: every failure the stand-in answers with, as the JSON body and
//! HTTP code a real kube-apiserver would use.

use bytes::Bytes;
use serde_json::json;

/// A failed API call, rendered as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code (also `Status.code`).
    pub code: u16,
    /// `Status.reason`, e.g. `NotFound`.
    pub reason: &'static str,
    /// Human-readable message; kubectl prints it.
    pub message: String,
    /// `Status.details`, when the error is about a resource or one object.
    pub details: Option<Box<StatusDetails>>,
}

/// `Status.details`: which resource (or object) an error is about. Empty fields are left
/// out of the JSON, as the apiserver's `omitempty` does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusDetails {
    /// The object's name, if the error is about one object.
    pub name: String,
    /// The resource's API group (empty for the core group).
    pub group: String,
    /// The resource, e.g. `pods` (the apiserver puts the resource in `kind`).
    pub kind: String,
    /// `Status.details.causes`: what exactly failed, field by field.
    pub causes: Vec<StatusCause>,
}

/// One of `Status.details.causes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusCause {
    /// Its type (`reason` in JSON), e.g. `FieldManagerConflict`.
    pub reason: &'static str,
    /// What the cause is, for a reader.
    pub message: String,
    /// The field it is about, e.g. `.data.key`.
    pub field: String,
}

impl ApiError {
    /// 401 Unauthorized.
    pub fn unauthorized() -> ApiError {
        ApiError::new(401, "Unauthorized", "Unauthorized")
    }

    /// 404 for a path the stand-in does not serve.
    pub fn path_not_found() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    /// 404 for a missing object, e.g. `pods "web-9" not found`.
    pub fn not_found(plural: &str, name: &str) -> ApiError {
        ApiError::new(404, "NotFound", format!("{plural} \"{name}\" not found"))
            .with_details(plural, name)
    }

    /// 409 when creating an object that exists.
    pub fn already_exists(plural: &str, name: &str) -> ApiError {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{plural} \"{name}\" already exists"),
        )
        .with_details(plural, name)
    }

    /// 409 when an update carries a stale `resourceVersion`.
    pub fn conflict(plural: &str, name: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {plural} \"{name}\": the object has been \
                 modified; please apply your changes to the latest version and try again"
            ),
        )
        .with_details(plural, name)
    }

    /// 403 Forbidden (`apierrors.NewForbidden`): `message` is the whole message.
    pub fn forbidden(
        message: impl Into<String>,
        resource: &str,
        group: &str,
        name: &str,
    ) -> ApiError {
        let mut err = ApiError::new(403, "Forbidden", message);
        err.details = Some(Box::new(StatusDetails {
            name: name.to_owned(),
            group: group.to_owned(),
            kind: resource.to_owned(),
            causes: Vec::new(),
        }));
        err
    }

    /// 409 for a server-side apply's conflicts with other field managers
    /// (`errors.NewApplyConflict`): details with no object, a cause per field.
    pub fn apply_conflict(message: String, causes: Vec<StatusCause>) -> ApiError {
        let mut err = ApiError::new(409, "Conflict", message);
        err.details = Some(Box::new(StatusDetails {
            causes,
            ..StatusDetails::default()
        }));
        err
    }

    /// 409 Conflict with the apiserver's explanation after the object's name.
    pub fn conflict_with(plural: &str, name: &str, detail: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!("Operation cannot be fulfilled on {plural} \"{name}\": {detail}"),
        )
        .with_details(plural, name)
    }

    /// 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    /// 422 Invalid.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(422, "Invalid", message)
    }

    /// 405 Method Not Allowed.
    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
    }

    /// 415 for a patch or body type the stand-in does not handle.
    pub fn unsupported_media_type(content_type: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type:?})"
            ),
        )
    }

    /// 406 Not Acceptable: the client accepts none of the media types served (`served`),
    /// in the words of the apiserver's negotiation (`errNotAcceptable`).
    pub fn not_acceptable(served: &[&str]) -> ApiError {
        ApiError::new(
            406,
            "NotAcceptable",
            format!(
                "only the following media types are accepted: {}",
                served.join(", ")
            ),
        )
    }

    /// 413: a request body past the apiserver's `MaxRequestBodyBytes` (`limitedReadBody`
    /// in k8s.io/apiserver's `handlers/rest.go`).
    pub fn request_entity_too_large(limit: usize) -> ApiError {
        ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit}"),
        )
    }

    /// 410 Gone: a watch asked for history the stand-in no longer has.
    pub fn expired(requested: u64, oldest: u64) -> ApiError {
        ApiError::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// 503 Service Unavailable.
    pub fn service_unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(503, "ServiceUnavailable", message)
    }

    /// 500 Internal Error.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, "InternalError", message)
    }

    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, plural: &str, name: &str) -> ApiError {
        // `pods` or `clusters.cluster.kubesphere.io`: the group is after the first dot.
        let (kind, group) = plural.split_once('.').unwrap_or((plural, ""));
        self.details = Some(Box::new(StatusDetails {
            name: name.to_owned(),
            group: group.to_owned(),
            kind: kind.to_owned(),
            causes: Vec::new(),
        }));
        self
    }

    /// The `Status` object.
    pub fn to_value(&self) -> serde_json::Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            let mut d = serde_json::Map::new();
            for (key, value) in [
                ("name", &details.name),
                ("group", &details.group),
                ("kind", &details.kind),
            ] {
                if !value.is_empty() {
                    d.insert(key.to_owned(), json!(value));
                }
            }
            if !details.causes.is_empty() {
                let causes = details
                    .causes
                    .iter()
                    .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                    .collect();
                d.insert("causes".to_owned(), serde_json::Value::Array(causes));
            }
            status["details"] = serde_json::Value::Object(d);
        }
        status
    }

    /// The `Status` object as JSON bytes.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(self.to_value().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthorized_matches_the_apiserver_body() {
        let v = ApiError::unauthorized().to_value();
        assert_eq!(
            v,
            json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
                   "message":"Unauthorized","reason":"Unauthorized","code":401})
        );
    }
}
