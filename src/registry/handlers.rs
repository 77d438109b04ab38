//! Request handlers: base, catalog, tags, manifests (built on demand, or a
//! NixImage's, or by digest) and blobs (with `Range`).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::{signatures, AppState, RegistryError};
use crate::builder::{BuiltImage, ImageSpec};
use crate::catalog::NamedEntry;
use crate::name::{self, Arch, Digest, Reference, Repository, Route};
use crate::oci;

const MAX_MANIFEST: u64 = 4 * 1024 * 1024;

fn api_version_headers(resp: &mut Response) {
    resp.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
}

/// `OPTIONS` on any registry path: what may be done there.
fn options() -> Response {
    let mut resp = StatusCode::OK.into_response();
    resp.headers_mut().insert(
        header::ALLOW,
        HeaderValue::from_static("GET, HEAD, OPTIONS"),
    );
    resp
}

pub(super) async fn v2_base(method: Method) -> Response {
    let mut resp = if method == Method::GET || method == Method::HEAD {
        ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
    } else if method == Method::OPTIONS {
        options()
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
    // Percent-escapes are decoded (never into a slash), then the path is
    // validated like any other.
    let raw = req.uri().path().strip_prefix("/v2/").unwrap_or("");
    let query = req.uri().query().unwrap_or("").to_string();
    let result = match name::decode_path(raw) {
        Ok(path) => handle(&app, &method, &headers, &path, &query).await,
        Err(e) => Err(e.into()),
    };
    let mut resp = match result {
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
    if *method == Method::OPTIONS {
        return Ok(options());
    }
    let head = *method == Method::HEAD;
    if *method != Method::GET && !head {
        return Err(RegistryError::Unsupported(format!("{method} is not supported: this registry is read-only; images are built from their names")));
    }
    let route = name::parse_route(path)?;
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
                // Any revision of a git source is a tag: none can be listed.
                Repository::AdHoc(_) if app.builder.source().tags_are_revisions() => vec![],
                Repository::AdHoc(img) => {
                    let unknown = app
                        .builder
                        .unknown_names(&ImageSpec::ad_hoc(img, "latest"))
                        .await
                        .map_err(|e| RegistryError::from(&e))?;
                    if !unknown.is_empty() {
                        return Err(RegistryError::NameUnknown(format!(
                            "no such packages: {}",
                            unknown.join(", ")
                        )));
                    }
                    vec!["latest".to_string()]
                }
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
            // The name as requested, not its canonical spelling.
            let requested = path.strip_suffix("/tags/list").unwrap_or(path);
            Ok(paginated("tags", Some(requested.to_string()), tags, query))
        }
        Route::Referrers { repo, digest } => Ok(referrers(app, head, &repo, &digest, query)),
        Route::Manifest { repo, reference } => {
            let requested = path.rsplit_once("/manifests/").map_or(path, |(r, _)| r);
            manifest(app, headers, head, repo, requested, reference).await
        }
        Route::Blob { repo, digest } => {
            let not_in =
                || RegistryError::BlobUnknown(format!("blob {digest} is not in {}", repo.name()));
            if in_repository(app, &repo, &digest, not_in).is_err() {
                // A blob of a signature made for this repository.
                let requested = path.rsplit_once("/blobs/").map_or(path, |(r, _)| r);
                return match signature_part(app, headers, &repo, requested, &digest).await {
                    Some(signatures::Part::Blob(bytes)) => Ok(small_blob(head, &digest, bytes)),
                    _ => Err(not_in()),
                };
            }
            blob(app, headers, head, digest).await
        }
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
    // More to come only when a page was asked for and filled (n=0 asks for
    // nothing, and must not link back to itself).
    let more = matches!(n, Some(n) if n > 0 && items.len() > n);
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

/// 304 when the client's `If-None-Match` already names this content.
fn not_modified(headers: &HeaderMap, digest: &Digest) -> Option<Response> {
    let tag = format!("\"{digest}\"");
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == tag);
    if !matches {
        return None;
    }
    let mut resp = StatusCode::NOT_MODIFIED.into_response();
    digest_headers(resp.headers_mut(), digest);
    Some(resp)
}

/// Content is served by digest only under a repository that holds it: an
/// image asked for under that name, or the NixImage's image.
fn in_repository(
    app: &AppState,
    repo: &Repository,
    digest: &Digest,
    missing: impl FnOnce() -> RegistryError,
) -> Result<(), RegistryError> {
    let holds = match repo {
        Repository::AdHoc(img) => app.catalog.in_repository(&img.name(), digest),
        Repository::Named { namespace, name } => {
            let images = app
                .catalog
                .named
                .get(namespace, name)
                .map(|e| e.images())
                .unwrap_or_default();
            let holds = |digest: &Digest| {
                images.iter().any(|(_, image)| {
                    app.catalog
                        .image_holds(&image.oci_digest, digest)
                        .unwrap_or_else(|| crate::image::digests_of(image).contains(digest))
                })
            };
            // An index is the object's when a manifest it lists is: the
            // status's index lists other nodes' architectures too.
            holds(digest)
                || app
                    .catalog
                    .index_holding(digest)
                    .is_some_and(|i| i.members.iter().any(holds))
        }
    };
    if holds {
        Ok(())
    } else {
        Err(missing())
    }
}

/// The manifests attached to the image whose OCI manifest is `digest`,
/// when that image is in `repo`.
fn attached_to(
    app: &AppState,
    repo: &Repository,
    digest: &Digest,
) -> Option<std::sync::Arc<BuiltImage>> {
    let img = app.catalog.image_with_digest(digest)?;
    let in_repo =
        in_repository(app, repo, digest, || RegistryError::Unknown(String::new())).is_ok();
    (in_repo && img.oci_digest == *digest).then_some(img)
}

/// `artifactType=...` of a query string, percent-decoded.
pub fn artifact_type_filter(query: &str) -> Option<String> {
    let value = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("artifactType="))?;
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?, 16) {
                    Ok(b) => out.push(b),
                    Err(_) => return None,
                }
                i += 3;
                continue;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok().filter(|s| !s.is_empty())
}

/// The referrers API: the SBOMs and provenance whose subject is `digest`
/// (an empty index for anything else, as the spec asks: never a 404),
/// filtered by `artifactType` when the query names one.
fn referrers(
    app: &AppState,
    head: bool,
    repo: &Repository,
    digest: &Digest,
    query: &str,
) -> Response {
    let filter = artifact_type_filter(query);
    let body = match attached_to(app, repo, digest) {
        Some(img) => crate::attest::referrers_index(&img.attached, digest, filter.as_deref()),
        None => crate::attest::referrers_index(&[], digest, None),
    };
    let len = body.len();
    let mut resp = if head {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(body))
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(oci::OCI_INDEX),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if filter.is_some() {
        h.insert(
            "OCI-Filters-Applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    resp
}

/// The tags that name what is attached to an image: `sha256-<hex>` (the
/// referrers tag schema's index), `.sig` and `.att` (cosign's).
fn attached_tag(tag: &str) -> Option<(Digest, &str)> {
    let rest = tag.strip_prefix("sha256-")?;
    let (hex, suffix) = match rest.split_once('.') {
        Some((h, s)) => (h, s),
        None => (rest, ""),
    };
    if !matches!(suffix, "" | "sig" | "att") {
        return None;
    }
    let digest = format!("sha256:{hex}").parse().ok()?;
    Some((digest, suffix))
}

/// Serves an attached-manifest tag, or says that the image has none.
async fn serve_attached_tag(
    app: &AppState,
    headers: &HeaderMap,
    head: bool,
    repo: &Repository,
    requested: &str,
    digest: &Digest,
    suffix: &str,
) -> Result<Response, RegistryError> {
    if suffix.is_empty() {
        // The referrers tag schema's index of the image's documents.
        let img = attached_to(app, repo, digest).ok_or_else(|| no_such(repo, digest, "image"))?;
        let index: bytes::Bytes =
            crate::attest::referrers_index(&img.attached, digest, None).into();
        let d = Digest::of(&index);
        return Ok(manifest_response(
            app,
            headers,
            head,
            oci::OCI_INDEX,
            &d,
            index,
        ));
    }
    let made = signed(app, headers, repo, requested, digest, suffix == "att").await?;
    Ok(manifest_response(
        app,
        headers,
        head,
        oci::OCI_MANIFEST,
        &made.digest,
        made.manifest.clone(),
    ))
}

fn no_such(repo: &Repository, digest: &Digest, what: &str) -> RegistryError {
    RegistryError::ManifestUnknown {
        message: format!("{} has no {what} for {digest}", repo.name()),
        detail: serde_json::Value::Null,
    }
}

fn storage_failed(e: crate::store::StoreError) -> RegistryError {
    tracing::error!(error = %e, "reading the documents to attest");
    RegistryError::Unknown("the registry could not read its storage".into())
}

/// cosign's signature (or signed attestations) of a manifest of `repo`, for
/// the repository as the client spelled it (`requested`): made now, or kept
/// from before. Any manifest a client can resolve is signed: an image's, in
/// either format, and an index or manifest list; attestations are of images.
async fn signed(
    app: &AppState,
    headers: &HeaderMap,
    repo: &Repository,
    requested: &str,
    digest: &Digest,
    attestations: bool,
) -> Result<std::sync::Arc<signatures::Made>, RegistryError> {
    in_repository(app, repo, digest, || no_such(repo, digest, "image"))?;
    if app.catalog.manifest(digest).is_none() {
        return Err(no_such(repo, digest, "image"));
    }
    let Some(signer) = app.builder.signer() else {
        return Err(no_such(
            repo,
            digest,
            if attestations {
                "signed attestations (the registry has no --signing-key)"
            } else {
                "signature (the registry has no --signing-key)"
            },
        ));
    };
    let key = signatures::Key {
        identity: signatures::identity(app.public_host.as_deref(), headers, requested),
        subject: digest.clone(),
        attestations,
    };
    if !attestations {
        return Ok(app.signatures.signature(signer, key));
    }
    if let Some(m) = app.signatures.get(&key) {
        return Ok(m);
    }
    let img = app
        .catalog
        .image_with_digest(digest)
        .ok_or_else(|| no_such(repo, digest, "image to attest"))?;
    let made = crate::attest::attestations(
        signer,
        &key.identity,
        digest,
        &img.attached,
        &**app.builder.store(),
    )
    .await
    .map_err(storage_failed)?
    .ok_or_else(|| no_such(repo, digest, "SBOM and provenance to attest"))?;
    Ok(app.signatures.keep(key, made))
}

/// The manifests a client can resolve in `repo`: its images' (in both
/// formats) and the indexes that list them.
fn manifests_of(app: &AppState, repo: &Repository) -> Vec<Digest> {
    let images: Vec<std::sync::Arc<BuiltImage>> = match repo {
        Repository::AdHoc(img) => app.catalog.images_in_repository(&img.name()),
        Repository::Named { namespace, name } => app
            .catalog
            .named
            .get(namespace, name)
            .map(|e| e.images().into_iter().map(|(_, i)| i).collect())
            .unwrap_or_default(),
    };
    let members: Vec<Digest> = images.iter().map(|i| i.oci_digest.clone()).collect();
    let mut out = Vec::new();
    for i in &images {
        out.push(i.oci_digest.clone());
        if i.has_docker_manifest() {
            out.push(i.docker_digest.clone());
        }
    }
    out.extend(app.catalog.indexes_listing(&members));
    out
}

/// A manifest or blob of a signature or attestations of `repo` under the
/// identity this request gives it: kept from when its tag was served, or
/// (served by another instance, or before a restart) made again, the same.
async fn signature_part(
    app: &AppState,
    headers: &HeaderMap,
    repo: &Repository,
    requested: &str,
    digest: &Digest,
) -> Option<signatures::Part> {
    app.builder.signer()?;
    let identity = signatures::identity(app.public_host.as_deref(), headers, requested);
    if let Some(p) = app.signatures.part(&identity, digest) {
        return Some(p);
    }
    for m in manifests_of(app, repo) {
        for attestations in [false, true] {
            // (An index has no attestations.)
            let Ok(made) = signed(app, headers, repo, requested, &m, attestations).await else {
                continue;
            };
            if let Some(p) = made.part(digest) {
                return Some(p);
            }
        }
    }
    None
}

/// A small blob held in memory.
fn small_blob(head: bool, digest: &Digest, bytes: bytes::Bytes) -> Response {
    let len = bytes.len();
    let mut resp = if head {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(bytes))
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    digest_headers(h, digest);
    resp
}

/// Every Accept header of a request, as one list.
fn accepted(headers: &HeaderMap) -> String {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
}

/// Docker schema2 only for clients that accept it and not OCI.
fn wants_docker(headers: &HeaderMap) -> bool {
    let accept = accepted(headers);
    accept.contains(oci::DOCKER_MANIFEST) && !accept.contains(oci::OCI_MANIFEST)
}

/// Whether a client takes an image index (Some(false)) or, not that, a
/// Docker manifest list (Some(true)).
fn wants_index(headers: &HeaderMap) -> Option<bool> {
    let accept = accepted(headers);
    if accept.contains(oci::OCI_INDEX) {
        Some(false)
    } else if accept.contains(oci::DOCKER_LIST) {
        Some(true)
    } else {
        None
    }
}

fn manifest_response(
    app: &AppState,
    headers: &HeaderMap,
    head: bool,
    media_type: &str,
    digest: &Digest,
    bytes: bytes::Bytes,
) -> Response {
    if let Some(resp) = not_modified(headers, digest) {
        return resp;
    }
    let len = bytes.len();
    let body = if head {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    if !head {
        app.metrics.bytes_served.inc_by(len as u64);
        app.catalog.record_pull(digest);
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
            headers,
            head,
            oci::DOCKER_MANIFEST,
            &img.docker_digest,
            img.docker_manifest.clone(),
        )
    } else {
        manifest_response(
            app,
            headers,
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
    requested: &str,
    reference: Reference,
) -> Result<Response, RegistryError> {
    match (repo, reference) {
        (repo, Reference::Digest(digest)) => {
            let not_in = || RegistryError::ManifestUnknown {
                message: format!("manifest {digest} is not in {}", repo.name()),
                detail: serde_json::Value::Null,
            };
            if in_repository(app, &repo, &digest, not_in).is_err() {
                // A signature's manifest, by its digest.
                return match signature_part(app, headers, &repo, requested, &digest).await {
                    Some(signatures::Part::Manifest(bytes)) => Ok(manifest_response(
                        app,
                        headers,
                        head,
                        oci::OCI_MANIFEST,
                        &digest,
                        bytes,
                    )),
                    _ => Err(not_in()),
                };
            }
            if let Some((media_type, bytes)) = app.catalog.manifest(&digest) {
                return Ok(manifest_response(
                    app, headers, head, media_type, &digest, bytes,
                ));
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
                headers,
                head,
                media_type,
                &digest,
                bytes.into(),
            ))
        }
        (repo, Reference::Tag(tag)) if attached_tag(&tag).is_some() => {
            let (digest, suffix) = attached_tag(&tag).expect("checked");
            serve_attached_tag(app, headers, head, &repo, requested, &digest, suffix).await
        }
        (Repository::AdHoc(img), Reference::Tag(tag)) => {
            let spec = ImageSpec::ad_hoc(&img, &tag);
            // With several systems, a name that names no architecture has an
            // index for the clients that take one.
            // (`arm64/` names one; others get the first of --systems.)
            let pinned = img.arch != Arch::host();
            let multi = app.builder.systems().len() > 1 && !pinned;
            if let Some(docker) = wants_index(headers).filter(|_| multi) {
                let images = app
                    .builder
                    .get_or_build_all(&spec)
                    .await
                    .map_err(|e| RegistryError::from(e.as_ref()))?;
                let (media_type, digest, bytes) = app.builder.index(docker, &images);
                return Ok(manifest_response(
                    app, headers, head, media_type, &digest, bytes,
                ));
            }
            let spec = ImageSpec {
                arch: if pinned {
                    spec.arch
                } else {
                    app.builder.systems()[0]
                },
                ..spec
            };
            let built = app
                .builder
                .get_or_build(spec, None)
                .await
                .map_err(|e| RegistryError::from(e.as_ref()))?;
            Ok(serve_built(app, headers, head, &built))
        }
        (Repository::Named { namespace, name }, Reference::Tag(tag)) => {
            match app.catalog.named.get(&namespace, &name) {
                None => Err(RegistryError::NameUnknown(format!(
                    "no NixImage {namespace}/{name}"
                ))),
                Some(entry @ NamedEntry::Ready { .. }) if matches!(&entry, NamedEntry::Ready { tag: t, .. } if *t == tag) =>
                {
                    let images = entry.images();
                    if let Some(docker) = wants_index(headers).filter(|_| images.len() > 1) {
                        let (media_type, digest, bytes) = app.builder.index(docker, &images);
                        return Ok(manifest_response(
                            app, headers, head, media_type, &digest, bytes,
                        ));
                    }
                    Ok(serve_built(app, headers, head, &images[0].1))
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

/// Parses a `Range` header against a blob size: Some((start, end exclusive))
/// for one satisfiable byte range, None for a header to ignore (another unit,
/// several ranges, bad syntax: RFC 9110 lets a server serve the whole blob),
/// and 416 for one byte range that lies outside the blob.
pub fn parse_range(value: &str, size: u64) -> Result<Option<(u64, u64)>, RegistryError> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let number = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    let well_formed = match (a.is_empty(), b.is_empty()) {
        (true, false) => number(b),
        (false, true) => number(a),
        (false, false) => number(a) && number(b) && a.parse::<u64>().ok() <= b.parse::<u64>().ok(),
        (true, true) => false,
    };
    if !well_formed {
        return Ok(None);
    }
    single_range(spec, size).map(Some)
}

/// One well-formed `first-last`, `first-` or `-suffix` byte range.
fn single_range(spec: &str, size: u64) -> Result<(u64, u64), RegistryError> {
    let value = format!("bytes={spec}");
    let bad = || RegistryError::RangeInvalid {
        message: format!(
            "invalid or unsatisfiable range '{}'",
            name::printable(&value)
        ),
        size,
    };
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
        match e {
            crate::store::StoreError::Remote { .. } => RegistryError::Unavailable(
                "the registry's object store is unavailable; try again shortly".into(),
            ),
            _ => RegistryError::Unknown("the registry could not read its storage".into()),
        }
    };
    let size = store
        .stat(&digest)
        .await
        .map_err(storage_error)?
        .ok_or_else(unknown)?;
    if let Some(resp) = not_modified(headers, &digest) {
        return Ok(resp);
    }
    if let (false, Some(bucket)) = (head, &app.redirect) {
        // The client fetches from the bucket (with its Range, if any).
        let url = bucket
            .signed_url(&digest, std::time::Duration::from_secs(600))
            .await
            .ok_or_else(|| {
                RegistryError::Unavailable("signing a URL of the object store failed".into())
            })?;
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
        resp.headers_mut().insert(
            header::LOCATION,
            HeaderValue::from_str(&url).map_err(|e| RegistryError::Unknown(e.to_string()))?,
        );
        resp.headers_mut().insert(
            "docker-content-digest",
            HeaderValue::from_str(&digest.to_string()).expect("a digest is a header value"),
        );
        return Ok(resp);
    }
    let range = match headers.get(header::RANGE) {
        Some(v) => parse_range(v.to_str().unwrap_or(""), size)?,
        None => None,
    };
    let (start, end) = range.unwrap_or((0, size));
    let mut resp = if head {
        Response::new(Body::empty())
    } else {
        let stream = store
            .send(&digest, Some((start, end)))
            .await
            .map_err(storage_error)?
            .ok_or_else(unknown)?;
        let metrics = app.metrics.clone();
        // Its images are spared by garbage collection while it is sent.
        let sending = app.catalog.streaming(&digest);
        let counted = stream.inspect(move |chunk| {
            let _ = &sending;
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
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// `?artifactType=` decodes what clients percent-encode, among other
        /// parameters; cosign tags parse only in their three forms.
        #[test]
        fn artifact_type_filters_decode_what_clients_encode(t in "[a-z./+-]{1,40}") {
            let encoded: String = t.bytes().map(|b| match b {
                b'a'..=b'z' | b'.' | b'-' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            }).collect();
            let q = format!("n=1&artifactType={encoded}&last=x");
            prop_assert_eq!(artifact_type_filter(&q), Some(t));
        }

        #[test]
        fn attached_tags_have_three_forms(hex in "[0-9a-f]{64}", suffix in "(|\\.sig|\\.att|\\.sbom|x)") {
            let tag = format!("sha256-{hex}{suffix}");
            let parsed = attached_tag(&tag);
            match suffix.as_str() {
                "" | ".sig" | ".att" => {
                    let (d, s) = parsed.expect("an attached tag");
                    prop_assert_eq!(d.hex(), hex.as_str());
                    prop_assert_eq!(s, suffix.trim_start_matches('.'));
                }
                _ => prop_assert!(parsed.is_none()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let r = |v: &str| parse_range(v, 100);
        assert_eq!(r("bytes=0-9").unwrap(), Some((0, 10)));
        assert_eq!(r("bytes=90-").unwrap(), Some((90, 100)));
        assert_eq!(r("bytes=-10").unwrap(), Some((90, 100)));
        assert_eq!(r("bytes=95-200").unwrap(), Some((95, 100)));
        assert_eq!(r("bytes=-200").unwrap(), Some((0, 100)));
        // Not honoured, so ignored (the whole blob is served), as RFC 9110 allows.
        for ignored in [
            "items=0-1",
            "bytes=0-1,5-6",
            "bytes=a-b",
            "bytes=",
            "bytes=-",
            "bytes=10-5",
            "",
        ] {
            assert_eq!(r(ignored).unwrap(), None, "{ignored}");
        }
        // One byte range outside the blob: 416.
        for bad in ["bytes=100-", "bytes=100-200", "bytes=-0"] {
            assert!(
                matches!(r(bad), Err(RegistryError::RangeInvalid { size: 100, .. })),
                "{bad}"
            );
        }
    }
}
