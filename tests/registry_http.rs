//! In-process HTTP tests of every registry endpoint and error code, and of the
//! build service behind them (single flight, the catalog, the build-state
//! stream), with a fake Nix whose store paths are real files (so layers are
//! really planned, packed and served) in temp directories. What real Nix
//! decides is tested in nix_contract.rs.

mod common;

use axum::http::{Method, StatusCode};
use common::*;
use nixery::oci::{DOCKER_MANIFEST, OCI_MANIFEST};

/// A registry on a fresh state directory, with the fake Nix.
async fn state(dir: &std::path::Path) -> nixery::registry::AppState {
    fake_state(dir).await.0
}

#[tokio::test]
async fn base_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
    let r = get(&app, "/v2/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    assert_eq!(get(&app, "/v2").await.status, StatusCode::OK);
    assert_eq!(get(&app, "/healthz").await.status, StatusCode::OK);
    assert_eq!(get(&app, "/readyz").await.status, StatusCode::OK);
    let m = get(&app, "/metrics").await;
    assert!(String::from_utf8_lossy(&m.body).contains("nixery_builds_total 0"));
    let r = get(&app, "/nothing/here").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "UNSUPPORTED")
    );
}

#[tokio::test]
async fn manifests_blobs_and_negotiation() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;

    // OCI by default and when accepted.
    let oci = request(
        &app,
        Method::GET,
        "/v2/shell/hello/manifests/latest",
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    assert_eq!(
        oci.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&oci.body)
    );
    assert_eq!(oci.header("content-type"), Some(OCI_MANIFEST));
    let digest = oci.header("docker-content-digest").unwrap().to_string();
    assert_eq!(digest, nixery::name::Digest::of(&oci.body).to_string());
    assert_eq!(
        oci.header("content-length").unwrap(),
        oci.body.len().to_string()
    );

    // Docker schema2 for a client that accepts only that; a different digest.
    let docker = request(
        &app,
        Method::GET,
        "/v2/hello/shell/manifests/latest",
        &[("accept", DOCKER_MANIFEST)],
    )
    .await;
    assert_eq!(docker.header("content-type"), Some(DOCKER_MANIFEST));
    assert_ne!(docker.header("docker-content-digest").unwrap(), digest);
    let dm = docker.json();
    assert_eq!(
        dm["config"]["mediaType"],
        "application/vnd.docker.container.image.v1+json"
    );
    assert_eq!(
        dm["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    // Both answers come from one build (names are sorted first).
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_builds_total"), 1.0);
    assert_eq!(metric(&m, "nixery_cache_hits_total"), 1.0);

    // HEAD answers exactly as GET, without a body.
    let head = request(
        &app,
        Method::HEAD,
        "/v2/shell/hello/manifests/latest",
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    for h in ["content-type", "content-length", "docker-content-digest"] {
        assert_eq!(head.header(h), oci.header(h), "{h}");
    }

    // By digest, GET and HEAD, whatever the Accept header.
    let by_digest = get(&app, &format!("/v2/shell/hello/manifests/{digest}")).await;
    assert_eq!(by_digest.status, StatusCode::OK);
    assert_eq!(by_digest.body, oci.body);
    assert_eq!(by_digest.header("content-type"), Some(OCI_MANIFEST));
    let head = request(
        &app,
        Method::HEAD,
        &format!("/v2/shell/hello/manifests/{digest}"),
        &[],
    )
    .await;
    assert_eq!(
        (head.status, head.header("docker-content-digest")),
        (StatusCode::OK, Some(digest.as_str()))
    );

    // The config blob: full, HEAD, ranges.
    let manifest = oci.json();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config = get(&app, &format!("/v2/shell/hello/blobs/{config_digest}")).await;
    assert_eq!(config.status, StatusCode::OK);
    assert_eq!(
        nixery::name::Digest::of(&config.body).as_str(),
        config_digest
    );
    assert_eq!(config.header("docker-content-digest"), Some(config_digest));
    let cfg = config.json();
    assert_eq!(cfg["config"]["Cmd"][0], "bash");
    assert!(cfg["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e.as_str().unwrap().starts_with("SSL_CERT_FILE=")));
    assert_eq!(
        cfg["rootfs"]["diff_ids"].as_array().unwrap().len(),
        manifest["layers"].as_array().unwrap().len()
    );

    let head = request(
        &app,
        Method::HEAD,
        &format!("/v2/hello/shell/blobs/{config_digest}"),
        &[],
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("content-length").unwrap(),
        config.body.len().to_string()
    );
    assert!(head.body.is_empty());

    let part = request(
        &app,
        Method::GET,
        &format!("/v2/shell/hello/blobs/{config_digest}"),
        &[("range", "bytes=2-11")],
    )
    .await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body, config.body[2..12]);
    assert_eq!(part.header("content-length"), Some("10"));
    assert_eq!(
        part.header("content-range").unwrap(),
        format!("bytes 2-11/{}", config.body.len())
    );
    // One byte range outside the blob: 416, with the blob's size.
    let r = request(
        &app,
        Method::GET,
        &format!("/v2/shell/hello/blobs/{config_digest}"),
        &[("range", "bytes=999999-")],
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::RANGE_NOT_SATISFIABLE, "UNSUPPORTED")
    );
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes */{}", config.body.len())
    );
    // Ranges this server does not honour (bad syntax, another unit, several
    // ranges) are ignored, as RFC 9110 allows: the whole blob, 200.
    for ignored in ["bytes=z-1", "lines=1-2", "bytes=5-2", "bytes=0-1,4-5"] {
        let r = request(
            &app,
            Method::GET,
            &format!("/v2/shell/hello/blobs/{config_digest}"),
            &[("range", ignored)],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{ignored}");
        assert_eq!(r.body, config.body, "{ignored}");
        assert_eq!(r.header("content-range"), None);
    }

    // A layer blob is not a manifest.
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let r = get(&app, &format!("/v2/shell/hello/manifests/{layer}")).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );

    let absent = format!("sha256:{}", "0".repeat(64));
    let r = get(&app, &format!("/v2/shell/hello/blobs/{absent}")).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
    );
    let r = get(&app, &format!("/v2/shell/hello/manifests/{absent}")).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );

    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert!(metric(&m, "nixery_bytes_served_total") > 0.0);
}

#[tokio::test]
async fn invalid_and_hostile_names() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
    for path in [
        "/v2/curl%22%3B%20builtins.abort%20%22x/manifests/latest",
        "/v2/$%7Bbuiltins.currentTime%7D/manifests/latest",
        "/v2/a;rm%20-rf%20~/manifests/latest",
        "/v2/$(reboot)/manifests/latest",
        "/v2/..%2f..%2fetc/manifests/latest",
        "/v2/../etc/manifests/latest",
        "/v2/curl/../hello/manifests/latest",
        "/v2/%00/manifests/latest",
        "/v2/%ff%fe/manifests/latest",
        "/v2//manifests/latest",
        "/v2/niximage/x/manifests/latest",
    ] {
        let r = get(&app, path).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    for path in [
        "/v2/shell/blobs/sha256:1234",
        "/v2/shell/blobs/md5:abc",
        "/v2/shell/manifests/sha256:%2e%2e",
        "/v2/shell/blobs/sha256:%00",
    ] {
        let r = get(&app, path).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
            "{path}"
        );
    }
    // Nothing was built or evaluated for any of them.
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_builds_total"), 0.0);
}

#[tokio::test]
async fn pushes_and_deletes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
    let d = format!("sha256:{}", "a".repeat(64));
    for (method, path) in [
        (Method::PUT, "/v2/curl/manifests/latest".to_string()),
        (Method::DELETE, "/v2/curl/manifests/latest".to_string()),
        (Method::DELETE, format!("/v2/curl/blobs/{d}")),
        (Method::POST, "/v2/curl/blobs/uploads/".to_string()),
        (
            Method::PATCH,
            "/v2/curl/blobs/uploads/some-session".to_string(),
        ),
        (
            Method::PUT,
            "/v2/curl/blobs/uploads/some-session".to_string(),
        ),
        (Method::POST, "/v2/".to_string()),
    ] {
        let r = request(&app, method.clone(), &path, &[]).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
            "{method} {path}"
        );
        assert_eq!(r.header("allow"), Some("GET, HEAD, OPTIONS"));
        // The body of a write is never read: the client must not reuse the
        // connection (a Go client that did got EOF).
        assert_eq!(r.header("connection"), Some("close"));
    }
}

#[tokio::test]
async fn tags_catalog_and_named_images() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
    let r = get(&app, "/v2/shell/curl/tags/list").await;
    assert_eq!(
        r.json(),
        serde_json::json!({"name": "shell/curl", "tags": ["latest"]})
    );
    let r = get(&app, "/v2/_catalog").await;
    assert_eq!(r.json(), serde_json::json!({"repositories": []}));
    // A tag other than `latest` with a local package source.
    let r = get(&app, "/v2/hello/manifests/v1").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    assert!(r.error_message().contains("'v1'"));
    // No such NixImage.
    let r = get(&app, "/v2/niximage/default/missing/manifests/v1").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
    let r = get(&app, "/v2/niximage/default/missing/tags/list").await;
    assert_eq!(r.error_code(), "NAME_UNKNOWN");
}

#[tokio::test]
async fn concurrent_first_pulls_share_one_build() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
    let reqs = (0..20).map(|_| {
        let app = app.clone();
        tokio::spawn(async move { get(&app, "/v2/jq/shell/manifests/latest").await })
    });
    let results = futures::future::join_all(reqs).await;
    let digests: std::collections::BTreeSet<String> = results
        .iter()
        .map(|r| {
            r.as_ref()
                .unwrap()
                .header("docker-content-digest")
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(digests.len(), 1);
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_builds_total"), 1.0);
    assert_eq!(metric(&m, "nixery_cache_misses_total"), 1.0);
}

#[tokio::test]
async fn head_of_an_unbuilt_image_builds_it() {
    // containerd resolves tags with HEAD: that must build, not 404.
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
    let head = request(
        &app,
        Method::HEAD,
        "/v2/hello/manifests/latest",
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    let digest = head.header("docker-content-digest").unwrap().to_string();
    let by_digest = get(&app, &format!("/v2/hello/manifests/{digest}")).await;
    assert_eq!(by_digest.status, StatusCode::OK);
    assert_eq!(
        by_digest.header("content-length").unwrap(),
        head.header("content-length").unwrap()
    );
}

#[tokio::test]
async fn a_restart_serves_stored_images_without_evaluating() {
    let dir = tempfile::tempdir().unwrap();
    let docker = [("accept", DOCKER_MANIFEST)];
    let (oci_digest, docker_digest) = {
        let app = state(dir.path()).await;
        let a = get(&app, "/v2/shell/hello/manifests/latest").await;
        let b = request(
            &app,
            Method::GET,
            "/v2/shell/hello/manifests/latest",
            &docker,
        )
        .await;
        (
            a.header("docker-content-digest").unwrap().to_string(),
            b.header("docker-content-digest").unwrap().to_string(),
        )
    };
    // A new process on the same state: the catalog answers, Nix is never
    // asked, for either manifest encoding.
    let (app, nix) = fake_state(dir.path()).await;
    let a = get(&app, "/v2/hello/shell/manifests/latest").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("docker-content-digest"), Some(oci_digest.as_str()));
    let b = request(
        &app,
        Method::GET,
        "/v2/shell/hello/manifests/latest",
        &docker,
    )
    .await;
    assert_eq!(
        b.header("docker-content-digest"),
        Some(docker_digest.as_str())
    );
    // The schema2 manifest by digest, with its own media type.
    let by_digest = get(&app, &format!("/v2/shell/hello/manifests/{docker_digest}")).await;
    assert_eq!(by_digest.status, StatusCode::OK);
    assert_eq!(by_digest.header("content-type"), Some(DOCKER_MANIFEST));
    assert_eq!(by_digest.body, b.body);
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_builds_total"), 0.0);
    assert_eq!(metric(&m, "nixery_cache_hits_total"), 2.0);
    use std::sync::atomic::Ordering;
    assert_eq!(
        nix.evaluations.load(Ordering::SeqCst),
        0,
        "nothing was evaluated"
    );
    assert_eq!(nix.realisations.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caller_of_a_build_reads_one_state_stream() {
    use nixery::builder::{ImageSpec, Progress};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
    let img = nixery::name::parse_packages(&["curl", "jq", "shell"]).unwrap();
    let spec = ImageSpec::ad_hoc(&img, "latest");
    let recorder = || {
        let events: Arc<Mutex<Vec<Progress>>> = Default::default();
        let sink = events.clone();
        let f: nixery::builder::ProgressFn = Arc::new(move |p| sink.lock().unwrap().push(p));
        (events, f)
    };
    let (first_events, first) = recorder();
    let (joiner_events, joiner) = recorder();
    let started = app.builder.start(spec.clone()).expect("a build starts");
    // The build is listed while it runs, with its state.
    let running = app.builder.running();
    assert_eq!(running.len(), 1);
    assert!(running[0].borrow().image.contains("curl"));
    let a = app.builder.get_or_build(spec.clone(), Some(first));
    let b = app.builder.get_or_build(spec.clone(), Some(joiner));
    let (a, b) = tokio::join!(a, b);
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.oci_digest, b.oci_digest);
    assert!(started.result.await.is_ok());
    for events in [first_events, joiner_events] {
        let events = events.lock().unwrap();
        assert_eq!(events.last(), Some(&Progress::Done), "{events:?}");
        let total = a.layers;
        assert!(
            events.contains(&Progress::Layers { done: total, total }),
            "{events:?}"
        );
        // Nix's build lines, not what it said while the outputs were tried
        // before their derivations were written.
        let nix: Vec<&String> = events
            .iter()
            .filter_map(|e| match e {
                Progress::NixLog(l) => Some(l),
                _ => None,
            })
            .collect();
        assert!(nix.iter().any(|l| l.starts_with("building '")), "{nix:?}");
        assert!(
            !nix.iter()
                .any(|l| l.contains("don't know") || l.starts_with("error") || l.starts_with("  ")),
            "{nix:?}"
        );
    }
    assert!(app.builder.running().is_empty());
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(
        metric(&m, "nixery_builds_total"),
        1.0,
        "one build for all three"
    );
    assert_eq!(metric(&m, "nixery_build_waits_total"), 2.0);
}

#[tokio::test]
async fn the_distribution_spec_to_the_letter() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
    let m = get(&app, "/v2/shell/hello/manifests/latest").await;
    assert_eq!(m.status, StatusCode::OK);
    let digest = m.header("docker-content-digest").unwrap().to_string();
    let manifest = m.json();
    let config = manifest["config"]["digest"].as_str().unwrap().to_string();

    // An invalid tag names no manifest: 404 MANIFEST_UNKNOWN, GET and HEAD
    // (NAME_INVALID is for repository names).
    for tag in [".INVALID_MANIFEST_NAME", "-bad", &"t".repeat(129), ".."] {
        for method in [Method::GET, Method::HEAD] {
            let r = request(
                &app,
                method.clone(),
                &format!("/v2/shell/hello/manifests/{tag}"),
                &[],
            )
            .await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{method} {tag}");
            if method == Method::GET {
                assert_eq!(r.error_code(), "MANIFEST_UNKNOWN");
            }
        }
    }

    // OPTIONS says what may be done.
    for path in ["/v2/", "/v2/shell/hello/manifests/latest"] {
        let r = request(&app, Method::OPTIONS, path, &[]).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.header("allow"), Some("GET, HEAD, OPTIONS"));
    }

    // tags/list: the name as requested; n=0 is an empty page with no Link
    // (a Link back to itself would loop a client that follows it).
    let r = get(&app, "/v2/shell/hello/tags/list?n=0").await;
    assert_eq!(
        r.json(),
        serde_json::json!({"name": "shell/hello", "tags": []})
    );
    assert_eq!(r.header("link"), None);
    let r = get(&app, "/v2/hello/shell/tags/list?n=1").await;
    assert_eq!(r.json()["name"], "hello/shell");
    assert_eq!(r.header("link"), None, "one tag, one page");
    // Packages that do not exist have no tags: 404 NAME_UNKNOWN.
    let r = get(&app, "/v2/nosuchpkg/tags/list").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
    assert!(r.error_message().contains("nosuchpkg"));

    // Content by digest only under a repository that holds it.
    for (path, code) in [
        (format!("/v2/curl/manifests/{digest}"), "MANIFEST_UNKNOWN"),
        (
            format!("/v2/nosuchpkg/manifests/{digest}"),
            "MANIFEST_UNKNOWN",
        ),
        (format!("/v2/curl/blobs/{config}"), "BLOB_UNKNOWN"),
        (
            format!("/v2/niximage/default/absent/blobs/{config}"),
            "BLOB_UNKNOWN",
        ),
    ] {
        let r = get(&app, &path).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::NOT_FOUND, code),
            "{path}"
        );
    }
    // Any spelling of the repository holds it.
    assert_eq!(
        get(&app, &format!("/v2/hello/shell/blobs/{config}"))
            .await
            .status,
        StatusCode::OK
    );

    // If-None-Match: 304, no body, for manifests (by tag and digest) and blobs.
    let etag = format!("\"{digest}\"");
    for path in [
        "/v2/shell/hello/manifests/latest".to_string(),
        format!("/v2/shell/hello/manifests/{digest}"),
    ] {
        let r = request(&app, Method::GET, &path, &[("if-none-match", &etag)]).await;
        assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{path}");
        assert!(r.body.is_empty());
        assert_eq!(r.header("etag"), Some(etag.as_str()));
    }
    let config_etag = format!("\"{config}\"");
    let r = request(
        &app,
        Method::GET,
        &format!("/v2/shell/hello/blobs/{config}"),
        &[("if-none-match", &config_etag)],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    let r = request(
        &app,
        Method::GET,
        &format!("/v2/shell/hello/blobs/{config}"),
        &[("if-none-match", "\"sha256:other\"")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);

    // The referrers API: the image's SBOMs and provenance (see
    // tests/attest.rs); for a digest with none, an empty index, never a 404.
    let r = get(&app, &format!("/v2/shell/hello/referrers/{digest}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("content-type"),
        Some("application/vnd.oci.image.index.v1+json")
    );
    assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 3);
    assert_eq!(r.json()["schemaVersion"], 2);
    let none = format!("sha256:{}", "0".repeat(64));
    let r = get(&app, &format!("/v2/shell/hello/referrers/{none}")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["manifests"], serde_json::json!([]));
    let r = get(&app, "/v2/shell/hello/referrers/sha256:nope").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
    );

    // Percent-encoded names are the names they encode.
    let r = get(&app, "/v2/shell/hell%6F/manifests/latest").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));

    // Unknown endpoints use a code from the spec's table.
    let r = get(&app, "/v2/shell/hello/nothing").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "UNSUPPORTED")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_build_queue_is_bounded_and_forgets_those_who_left() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dir.path().join("state"));
    s.max_builds = 1;
    s.max_queue = 2;
    let mut nix = nixery::nix::fake::FakeNix::standard(&dir.path().join("fake"));
    nix.set_build_time("slow", Duration::from_secs(2));
    let nix = std::sync::Arc::new(nix);
    let app = nixery::app_state_with(&s, nix.clone()).await.unwrap();
    let gauge = |app: nixery::registry::AppState, name: &'static str| async move {
        metric(
            &String::from_utf8_lossy(&get(&app, "/metrics").await.body),
            name,
        )
    };
    let until = |app: nixery::registry::AppState, name: &'static str, want: f64| async move {
        for _ in 0..200 {
            if metric(
                &String::from_utf8_lossy(&get(&app, "/metrics").await.body),
                name,
            ) == want
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{name} never became {want}");
    };
    let pull = |path: &'static str| {
        let app = app.clone();
        tokio::spawn(async move { get(&app, path).await })
    };
    // One build holds the only slot; two more wait.
    let a = pull("/v2/slow/manifests/latest");
    until(app.clone(), "nixery_builds_running", 1.0).await;
    let b = pull("/v2/hello/manifests/latest");
    let c = pull("/v2/curl/manifests/latest");
    until(app.clone(), "nixery_builds_queued", 2.0).await;
    // The queue is full: told to come back, not left hanging.
    let d = get(&app, "/v2/jq/manifests/latest").await;
    assert_eq!(
        (d.status, d.error_code().as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS")
    );
    assert_eq!(d.header("retry-after"), Some("10"));
    // The two waiting clients hang up: their builds leave the queue.
    b.abort();
    c.abort();
    until(app.clone(), "nixery_builds_abandoned_total", 2.0).await;
    assert_eq!(gauge(app.clone(), "nixery_builds_queued").await, 0.0);
    // Room again: the next request queues and is built after the first.
    let e = get(&app, "/v2/jq/manifests/latest").await;
    assert_eq!(e.status, StatusCode::OK);
    assert_eq!(a.await.unwrap().status, StatusCode::OK);
    // Only what someone still waited for was evaluated and built.
    assert_eq!(nix.evaluations.load(Ordering::SeqCst), 2);
    assert_eq!(nix.realisations.load(Ordering::SeqCst), 2);
    assert_eq!(gauge(app.clone(), "nixery_builds_refused_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_or_corrupt_blobs_are_made_again() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let blob_file = |d: &str| {
        dir.path()
            .join("state/blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let (app, _) = fake_state(dir.path()).await;
    let m = get(&app, "/v2/shell/hello/manifests/latest").await;
    let digest = m.header("docker-content-digest").unwrap().to_string();
    let manifest = m.json();
    let layers: Vec<String> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let verify = |app: nixery::registry::AppState, d: String| async move {
        let b = get(&app, &format!("/v2/shell/hello/blobs/{d}")).await;
        assert_eq!(b.status, StatusCode::OK, "{d}");
        assert_eq!(nixery::name::Digest::of(&b.body).to_string(), d);
    };

    // A layer removed by hand: the manifest is not served without it; the
    // image is made again, to the same digest, packing only that layer.
    std::fs::remove_file(blob_file(&layers[0])).unwrap();
    let m2 = get(&app, "/v2/shell/hello/manifests/latest").await;
    assert_eq!(m2.status, StatusCode::OK);
    assert_eq!(m2.header("docker-content-digest"), Some(digest.as_str()));
    verify(app.clone(), layers[0].clone()).await;
    let metrics = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(metric(&metrics, "nixery_builds_total"), 2.0);
    assert_eq!(
        metric(&metrics, "nixery_layers_packed_total"),
        // The store-path layers (all but the customisation layer, which is
        // made on every build and not counted) once, plus the lost one.
        (layers.len() - 1) as f64 + 1.0,
        "only the lost layer is packed again"
    );

    // A layer corrupted in place (same size), then a restart: found by the
    // scrub at start, removed, and made again on the next pull.
    let file = blob_file(&layers[1]);
    let mut bytes = std::fs::read(&file).unwrap();
    for b in bytes.iter_mut().take(16) {
        *b ^= 0xff;
    }
    std::fs::write(&file, &bytes).unwrap();
    drop(app);
    let (app, _) = fake_state(dir.path()).await;
    for _ in 0..250 {
        let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
        if metric(&m, "nixery_blobs_corrupt_total") == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!file.exists(), "the corrupt blob is still there");
    let m3 = get(&app, "/v2/shell/hello/manifests/latest").await;
    assert_eq!(m3.header("docker-content-digest"), Some(digest.as_str()));
    for d in layers {
        verify(app.clone(), d).await;
    }
}

#[tokio::test]
async fn pagination_follows_link_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
    for name in ["c", "a", "e", "b", "d"] {
        app.catalog.named.set(
            "ns",
            name,
            nixery::catalog::NamedEntry::Pending {
                tag: "v1".into(),
                message: "building".into(),
            },
        );
    }
    // Pages of two, by following Link as a client does, until there is none.
    let mut url = "/v2/_catalog?n=2".to_string();
    let mut pages = Vec::new();
    loop {
        let r = get(&app, &url).await;
        assert_eq!(r.status, StatusCode::OK);
        pages.push(r.json()["repositories"].clone());
        let Some(link) = r.header("link") else { break };
        assert!(link.ends_with("rel=\"next\""), "{link}");
        url = link
            .split('<')
            .nth(1)
            .unwrap()
            .split('>')
            .next()
            .unwrap()
            .to_string();
        assert!(pages.len() < 10, "Link loops: {url}");
    }
    assert_eq!(
        pages,
        vec![
            serde_json::json!(["niximage/ns/a", "niximage/ns/b"]),
            serde_json::json!(["niximage/ns/c", "niximage/ns/d"]),
            serde_json::json!(["niximage/ns/e"]),
        ]
    );
    // `last` alone: everything after it, no Link.
    let r = get(&app, "/v2/_catalog?last=niximage/ns/c").await;
    assert_eq!(
        r.json()["repositories"],
        serde_json::json!(["niximage/ns/d", "niximage/ns/e"])
    );
    assert_eq!(r.header("link"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_its_live_status() {
    use http_body_util::BodyExt;
    use std::time::Duration;
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let mut nix = nixery::nix::fake::FakeNix::standard(&dir.path().join("fake"));
    nix.set_build_time("slow", Duration::from_secs(2));
    let app = nixery::app_state_with(
        &settings(&dir.path().join("state")),
        std::sync::Arc::new(nix),
    )
    .await
    .unwrap();
    // What to pull, with the host the browser used.
    let page = request(&app, Method::GET, "/", &[("host", "reg.example:5000")]).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let html = String::from_utf8_lossy(&page.body).into_owned();
    assert!(
        html.contains("docker pull reg.example:5000/shell/hello"),
        "{html}"
    );
    // A host header that is not a host is not echoed.
    let page = request(&app, Method::GET, "/", &[("host", "<script>")]).await;
    assert!(!String::from_utf8_lossy(&page.body).contains("<script>alert"));

    // An image built, and a build that failed, are listed (server-rendered too).
    let m = get(&app, "/v2/shell/hello/manifests/latest").await;
    let digest = m.header("docker-content-digest").unwrap().to_string();
    assert_eq!(
        get(&app, "/v2/broken/manifests/latest").await.status,
        StatusCode::NOT_FOUND
    );
    let status = get(&app, "/api/status").await.json();
    assert_eq!(status["images"][0]["digest"], digest.as_str());
    assert_eq!(
        status["images"][0]["names"],
        serde_json::json!(["hello/shell:latest"])
    );
    assert!(status["images"][0]["built"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(status["images"][0]["pulls"], 1);
    assert_eq!(status["failures"][0]["image"], "broken");
    assert!(status["failures"][0]["log"][0]
        .as_str()
        .unwrap()
        .contains("fails to build on purpose"));
    let html = String::from_utf8_lossy(&get(&app, "/").await.body).into_owned();
    assert!(html.contains(&digest) && html.contains("fails to build on purpose"));

    // The event stream: the status at once, then every change, such as a
    // build in progress with its stage.
    let resp = nixery::registry::router(app.clone())
        .oneshot(
            axum::http::Request::get("/events")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut next_status = async || -> serde_json::Value {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("no event within 10 s")
                .unwrap()
                .unwrap();
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let text = String::from_utf8_lossy(&data).into_owned();
            if let Some(json) = text.lines().find_map(|l| l.strip_prefix("data: ")) {
                return serde_json::from_str(json).unwrap();
            }
        }
    };
    let first = next_status().await;
    assert_eq!(first["building"], serde_json::json!([]));
    let slow = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/v2/slow/manifests/latest").await }
    });
    let mut seen = Vec::new();
    loop {
        let s = next_status().await;
        if let Some(b) = s["building"].as_array().and_then(|b| b.first()) {
            assert_eq!(b["image"], "slow");
            seen.push(b["stage"].as_str().unwrap().to_string());
        } else if !seen.is_empty() {
            // Built: it left "building" and joined the images.
            assert!(s["images"].as_array().unwrap().len() == 2, "{s}");
            break;
        }
    }
    assert!(seen.iter().any(|s| s == "building"), "{seen:?}");
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
}

/// Two spellings of one package set (`cacert` is in every image; `shell`
/// names four packages): each name serves its blobs. (The soak run found
/// `docker pull` failing on the second spelling: its manifest came from the
/// first one's request, its blobs were "not in" its name. And `cacert/hello`
/// was served `hello`'s image, whose default command is hello: one package
/// asked for gets its program as the command, two do not.)
#[tokio::test]
async fn every_spelling_of_one_image_serves_its_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
    for (first, second) in [
        ("hello", "cacert/hello"),
        ("shell", "bashInteractive/coreutils/moreutils/nano"),
    ] {
        let a = get(&app, &format!("/v2/{first}/manifests/latest")).await;
        assert_eq!(a.status, StatusCode::OK, "{first}");
        let b = get(&app, &format!("/v2/{second}/manifests/latest")).await;
        assert_eq!(b.status, StatusCode::OK, "{second}");
        let cmd = |m: &Resp| {
            let config = m.json()["config"]["digest"].as_str().unwrap().to_string();
            futures::executor::block_on(get(&app, &format!("/v2/{first}/blobs/{config}")))
        };
        if first == "shell" {
            assert_eq!(a.body, b.body, "{first} and {second} are one image");
        } else {
            let (ca, cb) = (cmd(&a).json(), cmd(&b).json());
            assert_eq!(ca["config"]["Cmd"][0], "hello", "{ca}");
            assert!(
                cb["config"]["Cmd"].is_null(),
                "cacert/hello has no default command: {cb}"
            );
        }
        for (name, m) in [(first, &a), (second, &b)] {
            let manifest = m.json();
            let blobs =
                std::iter::once(&manifest["config"]).chain(manifest["layers"].as_array().unwrap());
            for blob in blobs {
                let digest = blob["digest"].as_str().unwrap();
                let r = get(&app, &format!("/v2/{name}/blobs/{digest}")).await;
                assert_eq!(
                    r.status,
                    StatusCode::OK,
                    "{digest} under {name}: {}",
                    r.error_message()
                );
            }
        }
    }
}

/// A registry with the fake Nix (its store in `fake`) that signs with a
/// fixed key, its state in `dir`.
async fn signed_state(fake: &std::path::Path, dir: &std::path::Path) -> nixery::registry::AppState {
    use p256::pkcs8::EncodePrivateKey;
    let key = p256::SecretKey::from_slice(&[9u8; 32]).unwrap();
    let pem = key.to_pkcs8_pem(p256::pkcs8::LineEnding::LF).unwrap();
    let mut s = settings(&dir.join("state"));
    s.signer = Some(std::sync::Arc::new(
        nixery::attest::Signer::from_pem(&pem, "test").unwrap(),
    ));
    let nix = std::sync::Arc::new(nixery::nix::fake::FakeNix::standard(fake));
    nixery::app_state_with(&s, nix).await.unwrap()
}

/// Signatures name the repository as the client spelled it, on the host it
/// addressed; every manifest a client resolves is signed (a Docker-only
/// client's schema2 manifest too); and an instance that never served a
/// signature serves its manifest and blobs all the same, byte for byte (two
/// instances on one bucket, or one restarted).
#[tokio::test]
async fn signatures_name_the_repository_and_are_the_same_on_every_instance() {
    // One Nix store, as the nodes of a cluster have the same store paths.
    let fake = tempfile::tempdir().unwrap();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = signed_state(fake.path(), da.path()).await;
    let b = signed_state(fake.path(), db.path()).await;
    let host = [("host", "registry.example:5000")];
    let digest_of = |app: &nixery::registry::AppState, accept: &'static str| {
        let app = app.clone();
        async move {
            let r = request(
                &app,
                Method::GET,
                "/v2/curl/jq/manifests/latest",
                &[("accept", accept)],
            )
            .await;
            assert_eq!(r.status, StatusCode::OK);
            r.header("docker-content-digest").unwrap().to_string()
        }
    };
    let oci = digest_of(&a, OCI_MANIFEST).await;
    let docker = digest_of(&a, DOCKER_MANIFEST).await;
    assert_ne!(oci, docker);
    assert_eq!(digest_of(&b, OCI_MANIFEST).await, oci);
    let get_on = |app: &nixery::registry::AppState, uri: String| {
        let app = app.clone();
        async move { request(&app, Method::GET, &uri, &host).await }
    };
    // The payload of a signature, fetched through its manifest.
    let payload = |app: &nixery::registry::AppState, repo: &'static str, digest: String| {
        let app = app.clone();
        async move {
            let hex = digest.trim_start_matches("sha256:").to_string();
            let sig = get_on(&app, format!("/v2/{repo}/manifests/sha256-{hex}.sig")).await;
            assert_eq!(sig.status, StatusCode::OK, "{repo} {digest}");
            let blob = sig.json()["layers"][0]["digest"]
                .as_str()
                .unwrap()
                .to_string();
            let body = get_on(&app, format!("/v2/{repo}/blobs/{blob}")).await;
            assert_eq!(body.status, StatusCode::OK);
            (sig, blob, body.json())
        }
    };
    for (repo, d) in [("curl/jq", &oci), ("jq/curl", &oci), ("curl/jq", &docker)] {
        let (_, _, p) = payload(&a, repo, d.clone()).await;
        assert_eq!(
            p["critical"]["identity"]["docker-reference"],
            format!("registry.example:5000/{repo}")
        );
        assert_eq!(p["critical"]["image"]["docker-manifest-digest"], **d);
    }
    // B never served these: it makes them again when asked for a part.
    let (sig, blob, _) = payload(&a, "curl/jq", oci.clone()).await;
    let sig_digest = sig.header("docker-content-digest").unwrap().to_string();
    let on_b = get_on(&b, format!("/v2/curl/jq/blobs/{blob}")).await;
    assert_eq!(on_b.status, StatusCode::OK);
    assert_eq!(
        on_b.body,
        get_on(&a, format!("/v2/curl/jq/blobs/{blob}")).await.body
    );
    let dc = tempfile::tempdir().unwrap();
    let fresh = signed_state(fake.path(), dc.path()).await;
    digest_of(&fresh, OCI_MANIFEST).await;
    let by_digest = get_on(&fresh, format!("/v2/curl/jq/manifests/{sig_digest}")).await;
    assert_eq!(by_digest.status, StatusCode::OK);
    assert_eq!(by_digest.body, sig.body);
    // The attestations too: B serves an envelope A made.
    let hex = oci.trim_start_matches("sha256:");
    let att = get_on(&a, format!("/v2/curl/jq/manifests/sha256-{hex}.att")).await;
    assert_eq!(att.status, StatusCode::OK);
    let envelope = att.json()["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let on_b = get_on(&b, format!("/v2/curl/jq/blobs/{envelope}")).await;
    assert_eq!(on_b.status, StatusCode::OK);
    assert_eq!(
        on_b.body,
        get_on(&a, format!("/v2/curl/jq/blobs/{envelope}"))
            .await
            .body
    );
    // Nothing of it is another repository's, nor another host's.
    let elsewhere = get_on(&a, format!("/v2/hello/blobs/{blob}")).await;
    assert_eq!(elsewhere.error_code(), "BLOB_UNKNOWN");
    let other_host = request(
        &a,
        Method::GET,
        &format!("/v2/curl/jq/blobs/{blob}"),
        &[("host", "other.example")],
    )
    .await;
    assert_eq!(other_host.status, StatusCode::NOT_FOUND);
}

/// A builder killed by SIGKILL from outside nixery (Nix does it to one of
/// two concurrent builders now and then: docs/nix.md) is built again, twice
/// at most; a third loss is the build's failure, said with Nix's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_killed_from_outside_is_built_again() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let (app, nix) = fake_state(dir.path()).await;
    nix.killed_builders.store(1, Ordering::SeqCst);
    let r = get(&app, "/v2/hello/manifests/latest").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(nix.realisations.load(Ordering::SeqCst), 2, "built twice");
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_builders_killed_total"), 1.0);
    // Killed three times: the build fails, saying why.
    nix.killed_builders.store(3, Ordering::SeqCst);
    let r = get(&app, "/v2/jq/manifests/latest").await;
    // (A failed build is 404 MANIFEST_UNKNOWN with the reason: clients show it.)
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let body = String::from_utf8_lossy(&r.body).into_owned();
    assert!(body.contains("failed due to signal 9"), "{body}");
    assert_eq!(nix.realisations.load(Ordering::SeqCst), 5);
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_builders_killed_total"), 3.0);
}
