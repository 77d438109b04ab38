//! The registry's errors: one variant per distribution-spec error code, each
//! with its HTTP status, rendered as the spec's `{"errors":[...]}` JSON.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::builder::BuildError;
use crate::name::NameError;

/// The registry's errors, one-to-one with the distribution spec's codes.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    NameInvalid(String),
    #[error("{0}")]
    NameUnknown(String),
    #[error("{message}")]
    ManifestUnknown {
        message: String,
        detail: serde_json::Value,
    },
    #[error("{0}")]
    BlobUnknown(String),
    #[error("{0}")]
    DigestInvalid(String),
    #[error("{message}")]
    RangeInvalid { message: String, size: u64 },
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    TooManyRequests(String),
    /// A path under /v2/ that is no endpoint of this registry.
    #[error("{0}")]
    NoSuchEndpoint(String),
    #[error("{0}")]
    Unknown(String),
    /// A build that Nix failed: MANIFEST_UNKNOWN, with Nix's log in `detail`.
    #[error("{message}")]
    BuildFailed { message: String, log: Vec<String> },
}

impl RegistryError {
    fn code(&self) -> (StatusCode, &'static str) {
        match self {
            RegistryError::NameInvalid(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            RegistryError::NameUnknown(_) => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
            RegistryError::ManifestUnknown { .. } => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            RegistryError::BlobUnknown(_) => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
            RegistryError::DigestInvalid(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            // The spec's table has no code for this: UNSUPPORTED ("invalid
            // set of parameters"), with the 416 and Content-Range of RFC 9110.
            RegistryError::RangeInvalid { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, "UNSUPPORTED")
            }
            RegistryError::Unsupported(_) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
            RegistryError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            RegistryError::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
            RegistryError::NoSuchEndpoint(_) => (StatusCode::NOT_FOUND, "UNSUPPORTED"),
            RegistryError::Unknown(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
            // The image cannot be made from what was asked: no manifest exists
            // for it (and Docker shows a 4xx's message, never a 5xx's).
            RegistryError::BuildFailed { .. } => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
        }
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (status, code) = self.code();
        let detail = match &self {
            RegistryError::ManifestUnknown { detail, .. } => detail.clone(),
            RegistryError::BuildFailed { log, .. } => serde_json::json!({ "log": log }),
            _ => serde_json::Value::Null,
        };
        let body = serde_json::json!({ "errors": [{ "code": code, "message": self.to_string(), "detail": detail }] });
        let mut resp = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        if let RegistryError::RangeInvalid { size, .. } = self {
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
        }
        if matches!(self, RegistryError::TooManyRequests(_)) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
        }
        if matches!(self, RegistryError::Unsupported(_)) {
            let h = resp.headers_mut();
            h.insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, OPTIONS"),
            );
            // A write's body is not read: the connection cannot be reused.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<NameError> for RegistryError {
    fn from(e: NameError) -> Self {
        match e {
            NameError::InvalidName(_) => RegistryError::NameInvalid(e.to_string()),
            // A tag that cannot exist names no manifest (the spec's 404).
            NameError::InvalidTag(_) => RegistryError::ManifestUnknown {
                message: e.to_string(),
                detail: serde_json::Value::Null,
            },
            NameError::InvalidDigest(_) => RegistryError::DigestInvalid(e.to_string()),
            NameError::NotFound => {
                RegistryError::NoSuchEndpoint("no such registry endpoint".into())
            }
        }
    }
}

impl From<&BuildError> for RegistryError {
    fn from(e: &BuildError) -> Self {
        match e {
            BuildError::UnknownPackages(names) => RegistryError::ManifestUnknown {
                message: e.to_string(),
                detail: serde_json::json!({ "unknownPackages": names }),
            },
            // Not a fault of the registry: this image cannot exist here. A 4xx
            // with a message is what clients (docker) show to the user.
            BuildError::UnsupportedSystem { system } => RegistryError::ManifestUnknown {
                message: e.to_string(),
                detail: serde_json::json!({ "unsupportedSystem": system }),
            },
            BuildError::UnknownRevision(rev) => RegistryError::ManifestUnknown {
                message: e.to_string(),
                detail: serde_json::json!({ "unknownRevision": rev }),
            },
            BuildError::UnknownFlake(reference) => RegistryError::ManifestUnknown {
                message: e.to_string(),
                detail: serde_json::json!({ "unknownRevision": reference }),
            },
            BuildError::UnlockedFlake(reference) => RegistryError::ManifestUnknown {
                message: e.to_string(),
                detail: serde_json::json!({ "unlockedFlake": reference }),
            },
            BuildError::UnknownTag { .. } => RegistryError::ManifestUnknown {
                message: e.to_string(),
                detail: serde_json::Value::Null,
            },
            BuildError::Timeout(_) | BuildError::Abandoned => {
                RegistryError::Unavailable(e.to_string())
            }
            BuildError::QueueFull(_) => RegistryError::TooManyRequests(e.to_string()),
            BuildError::StoreUnavailable(_) => RegistryError::Unavailable(e.to_string()),
            // The reason in the message (clients show it), Nix's words in
            // `detail.log`, and where to look.
            other @ BuildError::Nix(_) => RegistryError::BuildFailed {
                message: format!(
                    "building the image failed: {} (the end of Nix's log is in this error's detail, and on the registry's page at /)",
                    other.summary()
                ),
                log: other.log_tail(),
            },
            other => RegistryError::Unknown(format!("building the image failed: {other}")),
        }
    }
}
