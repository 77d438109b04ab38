//! The read-only OCI registry (axum): one `/v2/{*path}` route whose path is
//! parsed into a validated `Route` first (`name`), handlers that call the
//! build service and the catalog (`handlers`), and errors as the distribution
//! spec's error JSON (`error`). No business logic lives here.

mod error;
mod handlers;
pub mod page;
pub mod signatures;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use tracing::{info_span, Instrument};

pub use error::RegistryError;
pub use handlers::parse_range;
use handlers::{v2, v2_base};

use crate::builder::Builder;
use crate::catalog::Catalog;
use crate::metrics::{Metrics, StatusLabel};

#[derive(Clone)]
pub struct AppState {
    pub builder: Arc<Builder>,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    /// What one client connection may hold (see `serve_on`).
    pub limits: crate::config::ConnectionLimits,
    /// What the server still waits for (nothing for `serve`; the agent waits
    /// for its watch and its Lease).
    pub ready: Arc<Readiness>,
    /// With `--s3-redirect`: the bucket whose presigned URLs blob GETs are
    /// redirected to.
    pub redirect: Option<Arc<crate::store::ObjectBlobStore>>,
    /// The host clients pull by, for the identity signatures name (None:
    /// the host each request addressed).
    pub public_host: Option<String>,
    /// Signatures made for the repositories clients asked under.
    pub signatures: Arc<signatures::Signatures>,
}

/// The operator's endpoints alone (`/metrics`, `/healthz`, `/readyz`), for a
/// listener Prometheus can reach while the registry stays on loopback.
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v2", any(v2_base))
        .route("/v2/", any(v2_base))
        .route("/v2/{*path}", any(v2))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/", get(page::index))
        .route("/api/status", get(page::api_status))
        .route("/events", get(page::events))
        .route("/cosign.pub", get(cosign_pub))
        .fallback(|| async { RegistryError::NoSuchEndpoint("no such endpoint".into()) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// The public key of `--signing-key`, as `cosign verify --key` reads it.
async fn cosign_pub(State(app): State<AppState>) -> Response {
    match app.builder.signer() {
        Some(s) => (
            [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
            s.public_pem(),
        )
            .into_response(),
        None => (
            axum::http::StatusCode::NOT_FOUND,
            "this registry signs nothing: it was started without --signing-key\n",
        )
            .into_response(),
    }
}

/// One span per request, with the path; counts responses by status.
async fn observe(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let span = info_span!("request", method = %req.method(), path = %req.uri().path());
    let route = route_class(req.uri().path());
    let method = match *req.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::HEAD => "HEAD",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::PATCH => "PATCH",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    app.metrics
        .requests
        .get_or_create(&StatusLabel {
            route,
            method,
            status,
        })
        .inc();
    let ms = started.elapsed().as_secs_f64() * 1e3;
    // Every request at debug (a pull is dozens); server errors always.
    span.in_scope(|| {
        if status >= 500 {
            tracing::warn!(status, ms, "served");
        } else {
            tracing::debug!(status, ms, "served");
        }
    });
    resp
}

/// A request's kind, for metrics: a handful of values, whatever the path.
fn route_class(path: &str) -> &'static str {
    let Some(rest) = path.strip_prefix("/v2") else {
        return match path {
            "/metrics" => "metrics",
            "/healthz" | "/readyz" => "health",
            _ => "other",
        };
    };
    let parts: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let n = parts.len();
    match parts.as_slice() {
        [""] => "base",
        ["_catalog"] => "catalog",
        _ if n >= 2 && parts[n - 2] == "manifests" => "manifest",
        _ if parts.contains(&"uploads") => "upload",
        _ if n >= 2 && parts[n - 2] == "blobs" => "blob",
        _ if n >= 2 && parts[n - 2] == "referrers" => "referrers",
        _ if n >= 2 && parts[n - 2..] == ["tags", "list"] => "tags",
        _ => "other",
    }
}

async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// Whether the server is ready and, when it is not, why: one reason per part
/// that is not (the controller's watch, this node's Lease), for `/readyz`.
#[derive(Debug, Default)]
pub struct Readiness {
    waiting: Mutex<BTreeMap<&'static str, String>>,
}

impl Readiness {
    /// Not ready until `part` is cleared, saying `why`. Returns whether the
    /// reason changed (so callers log a state once, not on every retry).
    pub fn wait_for(&self, part: &'static str, why: impl Into<String>) -> bool {
        let why = why.into();
        self.waiting
            .lock()
            .unwrap()
            .insert(part, why.clone())
            .as_ref()
            != Some(&why)
    }

    /// `part` is ready; returns whether it was not.
    pub fn clear(&self, part: &'static str) -> bool {
        self.waiting.lock().unwrap().remove(part).is_some()
    }

    pub fn is_ready(&self) -> bool {
        self.waiting.lock().unwrap().is_empty()
    }

    /// Every reason, on one line; None when ready.
    pub fn why_not(&self) -> Option<String> {
        let waiting = self.waiting.lock().unwrap();
        (!waiting.is_empty()).then(|| waiting.values().cloned().collect::<Vec<_>>().join("; "))
    }
}

async fn readyz(State(app): State<AppState>) -> Response {
    match app.ready.why_not() {
        None => "ready\n".into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn routes_are_classed_not_named() {
        use super::route_class;
        let d = format!("sha256:{}", "a".repeat(64));
        for (path, class) in [
            ("/v2/", "base"),
            ("/v2", "base"),
            ("/v2/_catalog", "catalog"),
            ("/v2/shell/curl/manifests/latest", "manifest"),
            (&format!("/v2/x/blobs/{d}") as &str, "blob"),
            ("/v2/x/blobs/uploads/abc", "upload"),
            ("/v2/x/tags/list", "tags"),
            (&format!("/v2/x/referrers/{d}"), "referrers"),
            ("/v2/x/nothing", "other"),
            ("/metrics", "metrics"),
            ("/readyz", "health"),
            ("/anything/else", "other"),
        ] {
            assert_eq!(route_class(path), class, "{path}");
        }
    }
}
