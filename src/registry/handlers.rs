//! Request handlers: base, catalog, tags, manifests (built on demand, or a
//! NixImage's, or by digest) and blobs (with `Range`).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::{AppState, RegistryError};
use crate::build::{BuiltImage, ImageSpec};
use crate::catalog::NamedEntry;
use crate::name::{self, Digest, Reference, Repository, Route};
use crate::oci;

const MAX_MANIFEST: u64 = 4 * 1024 * 1024;

fn api_version_headers(resp: &mut Response) {
    resp.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
}

pub(super) async fn v2_base(method: Method) -> Response {
    let mut resp = if method == Method::GET || method == Method::HEAD {
        ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
    } else {
        RegistryError::Unsupported("this registry is read-only".into()).into_response()
    };
    api_version_headers(&mut resp);
    resp
}

pub(super) async fn v2(
    State(app): State<AppState>,
    method: Method,
    headers: HeaderMap,
    req: Request,
) -> Response {
    // The raw path: percent-escapes stay escaped and so fail validation.
    let path = req
        .uri()
        .path()
        .strip_prefix("/v2/")
        .unwrap_or("")
        .to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let mut resp = match handle(&app, &method, &headers, &path, &query).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    api_version_headers(&mut resp);
    resp
}

async fn handle(
    app: &AppState,
    method: &Method,
    headers: &HeaderMap,
    path: &str,
    query: &str,
) -> Result<Response, RegistryError> {
    let route = name::parse_route(path)?;
    let head = *method == Method::HEAD;
    if *method != Method::GET && !head {
        return Err(RegistryError::Unsupported(format!("{method} is not supported: this registry is read-only; images are built from their names")));
    }
    match route {
        Route::Base => Ok(v2_base(method.clone()).await),
        Route::Catalog => {
            let names = app.catalog.named.names();
            Ok(paginated("repositories", None, names, query))
        }
        Route::Upload { .. } => Err(RegistryError::Unsupported(
            "pushes are not supported: this registry is read-only".into(),
        )),
        Route::Tags { repo } => {
            let tags = match &repo {
                Repository::AdHoc(_) if app.builder.source().tags_are_revisions() => vec![],
                Repository::AdHoc(_) => vec!["latest".to_string()],
                Repository::Named { namespace, name } => {
                    match app.catalog.named.get(namespace, name) {
                        Some(NamedEntry::Ready { tag, .. }) => vec![tag],
                        Some(NamedEntry::Pending { .. }) => vec![],
                        None => {
                            return Err(RegistryError::NameUnknown(format!(
                                "no NixImage {namespace}/{name}"
                            )))
                        }
                    }
                }
            };
            Ok(paginated("tags", Some(repo.name()), tags, query))
        }
        Route::Manifest { repo, reference } => manifest(app, headers, head, repo, reference).await,
        Route::Blob { digest, .. } => blob(app, headers, head, digest).await,
    }
}

/// `{"name":..., "<key>": [...]}` with `n`/`last` pagination and a `Link` header.
fn paginated(key: &str, name: Option<String>, mut items: Vec<String>, query: &str) -> Response {
    items.sort();
    let mut n: Option<usize> = None;
    let mut last: Option<String> = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "n" => n = v.parse().ok(),
            "last" => last = Some(v.to_string()),
            _ => {}
        }
    }
    if let Some(last) = &last {
        items.retain(|i| i > last);
    }
    let more = matches!(n, Some(n) if items.len() > n);
    if let Some(n) = n {
        items.truncate(n);
    }
    let mut body = serde_json::Map::new();
    if let Some(name) = &name {
        body.insert("name".into(), name.clone().into());
    }
    body.insert(key.into(), items.clone().into());
    let mut resp = (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::Value::Object(body).to_string(),
    )
        .into_response();
    if more {
        let base = match &name {
            Some(name) => format!("/v2/{name}/tags/list"),
            None => "/v2/_catalog".into(),
        };
        let link = format!(
            "<{base}?n={}&last={}>; rel=\"next\"",
            n.unwrap_or(0),
            items.last().cloned().unwrap_or_default()
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            resp.headers_mut().insert(header::LINK, v);
        }
    }
    resp
}

/// `Docker-Content-Digest` and a strong `ETag`, for anything served by digest.
fn digest_headers(h: &mut HeaderMap, digest: &Digest) {
    let value = HeaderValue::from_str(digest.as_str()).expect("a digest is ASCII");
    h.insert("Docker-Content-Digest", value);
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{digest}\"")).expect("a digest is ASCII"),
    );
}

/// Docker schema2 only for clients that accept it and not OCI.
fn wants_docker(headers: &HeaderMap) -> bool {
    let accept: String = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    accept.contains(oci::DOCKER_MANIFEST) && !accept.contains(oci::OCI_MANIFEST)
}

fn manifest_response(
    app: &AppState,
    head: bool,
    media_type: &str,
    digest: &Digest,
    bytes: bytes::Bytes,
) -> Response {
    let len = bytes.len();
    let body = if head {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    if !head {
        app.metrics.bytes_served.inc_by(len as u64);
    }
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(media_type).expect("ascii"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    digest_headers(h, digest);
    resp
}

fn serve_built(app: &AppState, headers: &HeaderMap, head: bool, img: &BuiltImage) -> Response {
    if wants_docker(headers) && img.has_docker_manifest() {
        manifest_response(
            app,
            head,
            oci::DOCKER_MANIFEST,
            &img.docker_digest,
            img.docker_manifest.clone(),
        )
    } else {
        manifest_response(
            app,
            head,
            oci::OCI_MANIFEST,
            &img.oci_digest,
            img.oci_manifest.clone(),
        )
    }
}

async fn manifest(
    app: &AppState,
    headers: &HeaderMap,
    head: bool,
    repo: Repository,
    reference: Reference,
) -> Result<Response, RegistryError> {
    match (repo, reference) {
        (_, Reference::Digest(digest)) => {
            if let Some((media_type, bytes)) = app.catalog.manifest(&digest) {
                return Ok(manifest_response(app, head, media_type, &digest, bytes));
            }
            let store = app.builder.store().clone();
            let bytes = crate::store::get_small(&*store, &digest, MAX_MANIFEST)
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "reading a manifest");
                    RegistryError::Unknown("the registry could not read its storage".into())
                })?;
            let unknown = || RegistryError::ManifestUnknown {
                message: format!("manifest {digest} is unknown"),
                detail: serde_json::Value::Null,
            };
            let bytes = bytes.ok_or_else(unknown)?;
            let media_type = oci::manifest_media_type(&bytes).ok_or_else(unknown)?;
            Ok(manifest_response(
                app,
                head,
                media_type,
                &digest,
                bytes.into(),
            ))
        }
        (Repository::AdHoc(img), Reference::Tag(tag)) => {
            let built = app
                .builder
                .get_or_build(ImageSpec::ad_hoc(&img, &tag), None)
                .await
                .map_err(|e| RegistryError::from(e.as_ref()))?;
            Ok(serve_built(app, headers, head, &built))
        }
        (Repository::Named { namespace, name }, Reference::Tag(tag)) => {
            match app.catalog.named.get(&namespace, &name) {
                None => Err(RegistryError::NameUnknown(format!(
                    "no NixImage {namespace}/{name}"
                ))),
                Some(NamedEntry::Ready { tag: t, image }) if t == tag => {
                    Ok(serve_built(app, headers, head, &image))
                }
                Some(NamedEntry::Ready { tag: t, .. }) => Err(RegistryError::ManifestUnknown {
                    message: format!("NixImage {namespace}/{name} has tag '{t}', not '{tag}'"),
                    detail: serde_json::Value::Null,
                }),
                Some(NamedEntry::Pending { message, .. }) => Err(RegistryError::ManifestUnknown {
                    message: format!("NixImage {namespace}/{name} is not built yet: {message}"),
                    detail: serde_json::Value::Null,
                }),
            }
        }
    }
}

/// Parses a single `bytes=` range against a blob size: (start, end exclusive).
pub fn parse_range(value: &str, size: u64) -> Result<(u64, u64), RegistryError> {
    let bad = || RegistryError::RangeInvalid {
        message: format!(
            "invalid or unsatisfiable range '{}'",
            name::printable(value)
        ),
        size,
    };
    let spec = value.trim().strip_prefix("bytes=").ok_or_else(bad)?;
    if spec.contains(',') {
        return Err(bad());
    }
    let (a, b) = spec.split_once('-').ok_or_else(bad)?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let suffix: u64 = b.parse().map_err(|_| bad())?;
        if suffix == 0 {
            return Err(bad());
        }
        (size.saturating_sub(suffix), size)
    } else {
        let start: u64 = a.parse().map_err(|_| bad())?;
        let end = if b.is_empty() {
            size
        } else {
            b.parse::<u64>()
                .map_err(|_| bad())?
                .saturating_add(1)
                .min(size)
        };
        (start, end)
    };
    if range.0 >= range.1 || range.0 >= size {
        return Err(bad());
    }
    Ok(range)
}

async fn blob(
    app: &AppState,
    headers: &HeaderMap,
    head: bool,
    digest: Digest,
) -> Result<Response, RegistryError> {
    let store = app.builder.store().clone();
    let unknown = || RegistryError::BlobUnknown(format!("blob {digest} is unknown"));
    let storage_error = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "reading a blob");
        RegistryError::Unknown("the registry could not read its storage".into())
    };
    let size = store
        .stat(&digest)
        .await
        .map_err(storage_error)?
        .ok_or_else(unknown)?;
    let range = match headers.get(header::RANGE) {
        Some(v) => Some(parse_range(v.to_str().unwrap_or(""), size)?),
        None => None,
    };
    let (start, end) = range.unwrap_or((0, size));
    let mut resp = if head {
        Response::new(Body::empty())
    } else {
        let stream = store
            .get(&digest, Some((start, end)))
            .await
            .map_err(storage_error)?
            .ok_or_else(unknown)?;
        let metrics = app.metrics.clone();
        let counted = stream.inspect(move |chunk| {
            if let Ok(c) = chunk {
                metrics.bytes_served.inc_by(c.len() as u64);
            }
        });
        Response::new(Body::from_stream(counted))
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    digest_headers(h, &digest);
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=31536000, immutable"),
    );
    if range.is_some() {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1)).expect("ascii"),
        );
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), (0, 10));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), (90, 100));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), (90, 100));
        assert_eq!(parse_range("bytes=95-200", 100).unwrap(), (95, 100));
        for bad in [
            "bytes=100-",
            "bytes=10-5",
            "bytes=a-b",
            "items=0-1",
            "bytes=0-1,5-6",
            "bytes=-0",
            "bytes=",
            "bytes=-",
            "",
        ] {
            assert!(
                matches!(
                    parse_range(bad, 100),
                    Err(RegistryError::RangeInvalid { .. })
                ),
                "{bad}"
            );
        }
    }
}
