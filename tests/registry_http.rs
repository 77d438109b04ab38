//! In-process HTTP tests of every registry endpoint and error code, with real
//! Nix building from nix/offline-pkgs and real files in temp directories.

mod common;

use std::time::Duration;

use axum::http::{Method, StatusCode};
use common::*;
use nixery::oci::{DOCKER_MANIFEST, OCI_MANIFEST};

fn state(dir: &std::path::Path) -> nixery::registry::AppState {
    nixery::app_state(&settings(dir)).unwrap()
}

#[tokio::test]
async fn base_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path());
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
        (StatusCode::NOT_FOUND, "NOT_FOUND")
    );
}

#[tokio::test]
async fn manifests_blobs_and_negotiation() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path());

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
        &format!("/v2/x/blobs/{config_digest}"),
        &[],
    )
    .await;
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
    assert_eq!(
        part.header("content-range").unwrap(),
        format!("bytes 2-11/{}", config.body.len())
    );
    for bad in ["bytes=999999-", "bytes=z-1", "lines=1-2", "bytes=5-2"] {
        let r = request(
            &app,
            Method::GET,
            &format!("/v2/shell/hello/blobs/{config_digest}"),
            &[("range", bad)],
        )
        .await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID"),
            "{bad}"
        );
        assert_eq!(
            r.header("content-range").unwrap(),
            format!("bytes */{}", config.body.len())
        );
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
async fn unknown_packages_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path());
    let r = get(
        &app,
        "/v2/shell/nosuchpkg/alsomissing.attr/manifests/latest",
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    let first = r.body.clone();
    let msg = r.error_message();
    assert!(
        msg.contains("nosuchpkg") && msg.contains("alsomissing.attr"),
        "{msg}"
    );
    assert_eq!(
        r.json()["errors"][0]["detail"]["unknownPackages"],
        serde_json::json!(["alsomissing.attr", "nosuchpkg"])
    );
    // An attribute that exists but is not a package is unknown too.
    let r = get(&app, "/v2/hostLibs/manifests/latest").await;
    assert!(r.error_message().contains("hostLibs"));
    // Unknown names are a user's error: counted apart from build failures.
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_build_failures_total"), 0.0);
    assert_eq!(metric(&m, "nixery_unknown_packages_total"), 2.0);
    assert_eq!(metric(&m, "nixery_unknown_cached_total"), 0.0);
    // Asked again, the answer comes from the name cache, without Nix, and
    // says the same; a request that also names an unanswered package is
    // evaluated, so every unknown name is still named.
    let again = get(
        &app,
        "/v2/alsomissing.attr/nosuchpkg/shell/manifests/latest",
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(again.body, first);
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_unknown_cached_total"), 1.0);
    let mixed = get(&app, "/v2/nosuchpkg/thirdmissing/manifests/latest").await;
    assert_eq!(
        mixed.json()["errors"][0]["detail"]["unknownPackages"],
        serde_json::json!(["nosuchpkg", "thirdmissing"])
    );
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_unknown_cached_total"), 1.0);
}

#[tokio::test]
async fn lowercase_names_and_aliases_are_one_image() {
    // Registry clients refuse uppercase repository names, so a top-level
    // attribute is found case-insensitively (as in Nixery); every spelling of
    // one package set is one image: one digest, one build, one set of GC roots.
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path());
    let docker = [("accept", DOCKER_MANIFEST)];
    let digest = |r: &Resp| r.header("docker-content-digest").unwrap().to_string();
    let lower = request(
        &app,
        Method::GET,
        "/v2/bashinteractive/jq/manifests/latest",
        &docker,
    )
    .await;
    assert_eq!(
        lower.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&lower.body)
    );
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    let packed = metric(&m, "nixery_layers_packed_total");
    for alias in [
        "/v2/bashInteractive/jq/manifests/latest",
        "/v2/jq/BASHINTERACTIVE/manifests/latest",
        "/v2/bashinteractive.out/jq.out/manifests/latest",
    ] {
        let r = request(&app, Method::GET, alias, &docker).await;
        assert_eq!(r.status, StatusCode::OK, "{alias}");
        assert_eq!(digest(&r), digest(&lower), "{alias}");
    }
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(
        metric(&m, "nixery_layers_packed_total"),
        packed,
        "nothing packed again"
    );
    assert_eq!(metric(&m, "nixery_cache_hits_total"), 3.0);
    let roots = std::fs::read_dir(dir.path().join("gcroots"))
        .unwrap()
        .count();
    assert_eq!(roots, 1, "one set of GC roots for every spelling");
    // `hello` and `hello.out` are one package: the same default command too.
    let a = get(&app, "/v2/hello/manifests/latest").await;
    let b = get(&app, "/v2/hello.out.out/manifests/latest").await;
    assert_eq!(digest(&a), digest(&b));
    // Nested sets stay exact: the top-level name is found, the nested one not.
    let r = get(&app, "/v2/hostlibs.LIBZ/manifests/latest").await;
    assert_eq!(
        r.json()["errors"][0]["detail"]["unknownPackages"],
        serde_json::json!(["hostlibs.LIBZ"])
    );
    assert_eq!(
        get(&app, "/v2/hostlibs.libz/manifests/latest").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn invalid_and_hostile_names() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path());
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
        "/v2/shell/manifests/..",
        "/v2/shell/manifests/-bad",
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
    let app = state(dir.path());
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
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
    }
}

#[tokio::test]
async fn tags_catalog_and_named_images() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path());
    let r = get(&app, "/v2/shell/curl/tags/list").await;
    assert_eq!(
        r.json(),
        serde_json::json!({"name": "curl/shell", "tags": ["latest"]})
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
async fn failing_build_says_why_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path());
    for attempt in 1..=2 {
        let r = get(&app, "/v2/broken/manifests/latest").await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN")
        );
        assert!(
            r.error_message().contains("fails to build on purpose"),
            "{}",
            r.error_message()
        );
        let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
        assert_eq!(
            metric(&m, "nixery_builds_total"),
            attempt as f64,
            "a failure is not cached"
        );
        assert_eq!(metric(&m, "nixery_build_failures_total"), attempt as f64);
    }
}

/// Command lines of every process on the machine (from /proc, so no `ps`
/// is needed), joined with spaces.
fn command_lines() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .collect()
}

fn slow_builder_running() -> bool {
    command_lines()
        .iter()
        .any(|l| l.contains("slow: sleeping") || l == "sleep 20")
}

#[tokio::test]
async fn build_past_its_timeout_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.build_timeout = Duration::from_secs(5);
    let app = nixery::app_state(&s).unwrap();
    let pull = tokio::spawn({
        let app = app.clone();
        async move { get(&app, "/v2/slow/manifests/latest").await }
    });
    // The builder really runs (else "stopped" below would prove nothing).
    let mut seen = false;
    for _ in 0..100 {
        if slow_builder_running() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "the slow builder never started");
    let r = pull.await.unwrap();
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE")
    );
    assert!(
        r.error_message().contains("timeout of 5s"),
        "{}",
        r.error_message()
    );
    // Nothing of the build is left running (Nix's builders run as nixbld
    // users, in sessions of their own).
    let mut gone = false;
    for _ in 0..40 {
        if !slow_builder_running() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "the slow builder survived its timeout:\n{}",
        command_lines().join("\n")
    );
    // The registry still serves other images.
    assert_eq!(
        get(&app, "/v2/hello/manifests/latest").await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn concurrent_first_pulls_share_one_build() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path());
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
async fn same_image_in_fresh_state_dirs_has_the_same_digest() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ra = get(&state(a.path()), "/v2/shell/curl/manifests/latest").await;
    let rb = get(&state(b.path()), "/v2/curl/shell/manifests/latest").await;
    assert_eq!(ra.status, StatusCode::OK);
    assert_eq!(
        ra.header("docker-content-digest"),
        rb.header("docker-content-digest")
    );
    assert_eq!(ra.body, rb.body);
}

#[tokio::test]
async fn images_that_share_dependencies_share_layers() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path());
    let layers = |r: &Resp| -> std::collections::BTreeSet<String> {
        r.json()["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    };
    let a = layers(&get(&app, "/v2/appA/manifests/latest").await);
    let b = layers(&get(&app, "/v2/appB/manifests/latest").await);
    let shared = a.intersection(&b).count();
    // shared-base-0..4, glibc, cacert and iana-etc are common; the apps and
    // customisation layers are not.
    assert!(shared >= 8, "only {shared} shared layers");
    assert_eq!(a.len() - shared, 2);
    // And layers found in the layer cache were not packed again.
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert!(metric(&m, "nixery_layers_reused_total") >= 8.0);
}

#[tokio::test]
async fn closures_larger_than_the_budget_fit_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.max_layers = 20;
    let app = nixery::app_state(&s).unwrap();
    let r = get(&app, "/v2/deep/manifests/latest").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.json()["layers"].as_array().unwrap().len(), 20);
    let r = get(&app, "/v2/wide/manifests/latest").await;
    assert_eq!(r.json()["layers"].as_array().unwrap().len(), 20);
}

#[tokio::test]
async fn head_of_an_unbuilt_image_builds_it() {
    // containerd resolves tags with HEAD: that must build, not 404.
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path());
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
async fn arm64_on_a_host_that_cannot_build_it_says_so() {
    // This machine cannot build for aarch64-linux and has no substituter: the
    // meta-package reached Nix as the system (not as a package name), and the
    // client is told plainly that this registry cannot make such images.
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path());
    let r = get(&app, "/v2/arm64/hello/manifests/latest").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    let msg = r.error_message();
    assert!(
        msg.starts_with("this registry cannot build aarch64-linux images"),
        "{msg}"
    );
    assert_eq!(
        r.json()["errors"][0]["detail"]["unsupportedSystem"],
        "aarch64-linux"
    );
    // Nix's own words (store paths, features) stay in the logs.
    assert!(!msg.contains("/nix/store"), "{msg}");
}

#[tokio::test]
async fn images_from_movable_sources_expire() {
    // A local path can change: with a zero TTL every request evaluates again;
    // the names resolve to the same output paths, so the image is the one
    // already built (nothing realised or packed again).
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.cache_ttl = Duration::ZERO;
    let app = nixery::app_state(&s).unwrap();
    let a = get(&app, "/v2/hello/manifests/latest").await;
    let b = get(&app, "/v2/hello/manifests/latest").await;
    assert_eq!(
        a.header("docker-content-digest"),
        b.header("docker-content-digest")
    );
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_builds_total"), 2.0);
    assert_eq!(metric(&m, "nixery_cache_hits_total"), 1.0);
    assert_eq!(metric(&m, "nixery_layers_reused_total"), 0.0);
}

#[tokio::test]
async fn zstd_layers_when_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.compression = nixery::oci::Compression::Zstd;
    let app = nixery::app_state(&s).unwrap();
    let r = request(
        &app,
        Method::GET,
        "/v2/hello/manifests/latest",
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let manifest = r.json();
    let config = get(
        &app,
        &format!(
            "/v2/hello/blobs/{}",
            manifest["config"]["digest"].as_str().unwrap()
        ),
    )
    .await
    .json();
    for (i, layer) in manifest["layers"].as_array().unwrap().iter().enumerate() {
        assert_eq!(layer["mediaType"], nixery::oci::OCI_LAYER_ZSTD);
        let blob = get(
            &app,
            &format!("/v2/hello/blobs/{}", layer["digest"].as_str().unwrap()),
        )
        .await;
        let tar = zstd::decode_all(blob.body.as_slice()).unwrap();
        assert_eq!(
            nixery::name::Digest::of(&tar).as_str(),
            config["rootfs"]["diff_ids"][i].as_str().unwrap()
        );
    }
    // Docker schema2 cannot say zstd: a schema2-only client gets the OCI manifest.
    let d = request(
        &app,
        Method::GET,
        "/v2/hello/manifests/latest",
        &[("accept", DOCKER_MANIFEST)],
    )
    .await;
    assert_eq!(d.header("content-type"), Some(OCI_MANIFEST));
    assert_eq!(d.body, r.body);
    // gzip and zstd layers never share a cache entry.
    let gz = get(&state(dir.path()), "/v2/hello/manifests/latest").await;
    assert_ne!(
        gz.header("docker-content-digest"),
        r.header("docker-content-digest")
    );
}

#[tokio::test]
async fn a_restart_serves_stored_images_without_evaluating() {
    let dir = tempfile::tempdir().unwrap();
    let docker = [("accept", DOCKER_MANIFEST)];
    let (oci_digest, docker_digest) = {
        let app = state(dir.path());
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
    // A new process on the same state: the catalog answers, no build starts
    // (a build is where Nix evaluates), for either manifest encoding.
    let app = state(dir.path());
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
    assert_eq!(
        metric(&m, "nixery_builds_total"),
        0.0,
        "nothing was evaluated"
    );
    assert_eq!(metric(&m, "nixery_cache_hits_total"), 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_caller_of_a_build_reads_one_state_stream() {
    use nixery::build::{ImageSpec, Progress};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path());
    let img = nixery::name::parse_packages(&["curl", "jq", "shell"]).unwrap();
    let spec = ImageSpec::ad_hoc(&img, "latest");
    let recorder = || {
        let events: Arc<Mutex<Vec<Progress>>> = Default::default();
        let sink = events.clone();
        let f: nixery::build::ProgressFn = Arc::new(move |p| sink.lock().unwrap().push(p));
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
