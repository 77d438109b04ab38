//! Garbage collection with a small `--storage-limit`, the fake Nix and real
//! files: the store stays within the limit, pinned images survive, evicted
//! images come back with the same digest, a download in progress is never
//! cut off, and a restart keeps the least-recently-used order.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use axum::http::StatusCode;
use common::*;
use nixery::catalog::NamedEntry;
use nixery::name::Digest;
use nixery::nix::fake::{FakeNix, FakePackage};

async fn limited(dir: &Path, limit: Option<u64>, nix: Arc<FakeNix>) -> nixery::registry::AppState {
    let mut s = settings(&dir.join("state"));
    s.storage_limit = limit;
    nixery::app_state_with(&s, nix).await.unwrap()
}

fn fake(dir: &Path) -> FakeNix {
    FakeNix::standard(&dir.join("fake"))
}

/// Bytes of every blob file.
fn stored(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("state/blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Bytes of the blobs of the images with these OCI digests (shared ones once).
fn bytes_of(app: &nixery::registry::AppState, dir: &Path, images: &[&str]) -> u64 {
    let digests: HashSet<Digest> = app
        .catalog
        .gc_entries()
        .into_iter()
        .filter(|e| images.contains(&e.image.oci_digest.as_str()))
        .flat_map(|e| e.digests)
        .collect();
    digests
        .iter()
        .filter_map(|d| std::fs::metadata(dir.join("state/blobs/sha256").join(d.hex())).ok())
        .map(|m| m.len())
        .sum()
}

/// Pulls an image's OCI manifest (building it if need be): its digest.
async fn pull(app: &nixery::registry::AppState, name: &str) -> String {
    let r = request(
        app,
        axum::http::Method::GET,
        &format!("/v2/{name}/manifests/latest"),
        &[("accept", nixery::oci::OCI_MANIFEST)],
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{name}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.header("docker-content-digest").unwrap().to_string()
}

async fn metrics(app: &nixery::registry::AppState) -> String {
    String::from_utf8_lossy(&get(app, "/metrics").await.body).into_owned()
}

fn catalogued(app: &nixery::registry::AppState) -> HashSet<String> {
    app.catalog
        .list()
        .into_iter()
        .map(|i| i.digest.to_string())
        .collect()
}

const IMAGES: &[&str] = &[
    "curl",
    "jq",
    "shell",
    "hello/jq",
    "curl/jq",
    "shell/curl",
    "shell/jq",
    "curl/hello",
    "shell/hello/jq",
];

#[tokio::test]
async fn a_small_limit_keeps_the_store_within_it_and_spares_pinned_images() {
    // How big one image is, on a registry without a limit.
    let probe = tempfile::tempdir().unwrap();
    let app = limited(probe.path(), None, Arc::new(fake(probe.path()))).await;
    pull(&app, "hello").await;
    let one = stored(probe.path());
    drop(app);

    let dir = tempfile::tempdir().unwrap();
    let limit = 3 * one;
    let app = limited(dir.path(), Some(limit), Arc::new(fake(dir.path()))).await;
    // hello is pinned by a NixImage object.
    let pinned = pull(&app, "hello").await;
    let entry = app
        .catalog
        .gc_entries()
        .into_iter()
        .find(|e| e.image.oci_digest.as_str() == pinned)
        .unwrap();
    app.catalog.named.set(
        "default",
        "hello",
        NamedEntry::Ready {
            tag: "v1".into(),
            image: entry.image.clone(),
            arch: nixery::name::Arch::host(),
            others: vec![],
        },
    );
    let mut first_unpinned = None;
    for name in IMAGES {
        let newest = pull(&app, name).await;
        first_unpinned.get_or_insert((name, newest.clone()));
        let now = stored(dir.path());
        let kept = bytes_of(&app, dir.path(), &[&newest, &pinned]);
        assert!(
            now <= limit.max(kept),
            "after {name}: {now} bytes stored, limit {limit}, pinned + newest {kept}"
        );
        let images = catalogued(&app);
        assert!(images.contains(&pinned), "the pinned image was evicted");
        assert!(images.contains(&newest), "the newest image was evicted");
        // Each catalogued image keeps its GC roots; evicted ones lost theirs.
        let roots = std::fs::read_dir(dir.path().join("state/gcroots"))
            .unwrap()
            .count();
        assert_eq!(roots, images.len(), "GC roots of evicted images remain");
        let m = metrics(&app).await;
        assert_eq!(metric(&m, "nixery_stored_bytes"), now as f64);
        assert_eq!(metric(&m, "nixery_pinned_images"), 1.0);
    }
    let m = metrics(&app).await;
    let evictions = metric(&m, "nixery_evictions_total");
    assert!(evictions >= 3.0, "only {evictions} evictions");
    assert_eq!(metric(&m, "nixery_storage_limit_bytes"), limit as f64);
    // Every layer-cache record names a blob that is still stored.
    let blobs = dir.path().join("state/blobs/sha256");
    let mut records = 0;
    for e in std::fs::read_dir(dir.path().join("state/layers")).unwrap() {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap();
        let d: Digest = v["digest"].as_str().unwrap().parse().unwrap();
        assert!(blobs.join(d.hex()).exists(), "a layer record outlived {d}");
        records += 1;
    }
    assert!(records > 0);
    // Every remaining blob is whole.
    // The layers, and a config, a customisation layer and two manifests.
    assert_blobs_verify(&dir.path().join("state"), records + 4);

    // The first unpinned image was evicted; asked for again, it is built
    // again, to the same digest.
    let (name, digest) = first_unpinned.unwrap();
    assert!(
        !catalogued(&app).contains(&digest),
        "{name} was never evicted"
    );
    let builds = metric(&metrics(&app).await, "nixery_builds_total");
    assert_eq!(pull(&app, name).await, digest);
    assert_eq!(
        metric(&metrics(&app).await, "nixery_builds_total"),
        builds + 1.0,
        "not rebuilt"
    );
    for d in app
        .catalog
        .gc_entries()
        .into_iter()
        .find(|e| e.image.oci_digest.as_str() == digest)
        .unwrap()
        .digests
    {
        assert!(blobs.join(d.hex()).exists(), "{d} of the rebuilt image");
    }
}

/// Text that gzip cannot shrink much: `n` bytes of pseudo-random hex.
fn noise(n: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x % 16) as u32, 16).unwrap()
        })
        .collect()
}

/// The standard fake packages and `big`, 6 MiB of noise.
fn with_big(dir: &Path) -> FakeNix {
    let mut nix = fake(dir);
    nix.add_package(
        "big",
        FakePackage {
            files: vec![("share/big".into(), noise(6 << 20))],
            ..Default::default()
        },
    );
    nix
}

#[tokio::test]
async fn a_download_in_progress_survives_the_eviction_of_its_blob() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let nix = with_big(dir.path());
    let app = limited(dir.path(), Some(1 << 20), Arc::new(nix)).await;
    let digest = pull(&app, "big").await;
    // Kept although over the limit: it is the newest image.
    assert!(catalogued(&app).contains(&digest));
    let manifest = get(&app, &format!("/v2/big/manifests/{digest}"))
        .await
        .json();
    let layer = largest_layer(&manifest);
    let layer_digest: Digest = layer["digest"].as_str().unwrap().parse().unwrap();
    assert!(layer["size"].as_u64().unwrap() > 2 << 20);

    // A download starts, reads its first bytes...
    let resp = nixery::registry::router(app.clone())
        .oneshot(
            axum::http::Request::get(format!("/v2/big/blobs/{layer_digest}"))
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut bytes = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap()
        .to_vec();
    assert!((bytes.len() as u64) < layer["size"].as_u64().unwrap());
    // ...then another build evicts the image and removes the blob...
    pull(&app, "hello").await;
    assert!(!catalogued(&app).contains(&digest), "big was not evicted");
    let file = dir
        .path()
        .join("state/blobs/sha256")
        .join(layer_digest.hex());
    assert!(!file.exists(), "the layer is still stored");
    // ...and the download still completes, with the right bytes.
    bytes.extend_from_slice(&body.collect().await.unwrap().to_bytes());
    assert_eq!(Digest::of(&bytes), layer_digest);
}

/// Builds curl, jq and hello (their digests, in that order), lets `between`
/// act on the registry, stops it (writing last-use times, as a stop does;
/// it also happens every minute), restarts it with room for all but one byte
/// and collects: what stays catalogued.
async fn restart_one_byte_short(
    between: impl AsyncFnOnce(&nixery::registry::AppState, &[String; 3]),
) -> ([String; 3], HashSet<String>) {
    let dir = tempfile::tempdir().unwrap();
    let nix = Arc::new(fake(dir.path()));
    let app = limited(dir.path(), None, nix.clone()).await;
    let built = [
        pull(&app, "curl").await,
        pull(&app, "jq").await,
        pull(&app, "hello").await,
    ];
    between(&app, &built).await;
    let total = stored(dir.path());
    app.catalog.flush();
    drop(app);
    let app = limited(dir.path(), Some(total - 1), nix).await;
    app.builder.gc().collect(None).await.unwrap();
    assert!(stored(dir.path()) < total);
    (built, catalogued(&app))
}

#[tokio::test]
async fn a_restart_keeps_the_least_recently_used_order() {
    // `a` is used again: now `b` is the least recently used, and it alone goes.
    let ([a, b, c], images) = restart_one_byte_short(async |app, _| {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        pull(app, "curl").await;
    })
    .await;
    assert!(!images.contains(&b), "the least recently used image stayed");
    assert!(images.contains(&a) && images.contains(&c), "{images:?}");
}

#[tokio::test]
async fn images_named_by_objects_go_last_while_nothing_pins_them() {
    // After a start, before the controller has synced, no image is pinned:
    // those a NixImage named are evicted only after every other one.
    let ([a, b, c], images) = restart_one_byte_short(async |app, built| {
        app.catalog
            .claim(&built[0].parse().unwrap(), "default/curl");
    })
    .await;
    assert!(images.contains(&a), "the named image went first");
    assert!(!images.contains(&b) && images.contains(&c), "{images:?}");
}

/// An image pulled within --eviction-grace is not evicted, even over the
/// limit: a client that has its manifest gets its blobs, whatever other
/// builds evict meanwhile.
#[tokio::test]
async fn an_image_just_pulled_keeps_its_blobs_within_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let nix = with_big(dir.path());
    let mut s = settings(&dir.path().join("state"));
    s.storage_limit = Some(1 << 20);
    s.eviction_grace = std::time::Duration::from_secs(60);
    let app = nixery::app_state_with(&s, Arc::new(nix)).await.unwrap();
    let digest = pull(&app, "big").await;
    pull(&app, "hello").await;
    // Over the limit, and yet big (not the newest) stays, blobs and all.
    assert!(
        catalogued(&app).contains(&digest),
        "big was evicted within its grace"
    );
    assert!(stored(dir.path()) > 1 << 20);
    let manifest = get(&app, &format!("/v2/big/manifests/{digest}"))
        .await
        .json();
    let layer = largest_layer(&manifest);
    let r = get(
        &app,
        &format!("/v2/big/blobs/{}", layer["digest"].as_str().unwrap()),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let m = metrics(&app).await;
    assert_eq!(metric(&m, "nixery_evictions_total"), 0.0);
}

/// The grace protects pulls in flight, not every recent image: an image
/// stays while a client is asking for its parts (each blob asked for renews
/// its grace) or a blob of it is being sent; once its pull is over and the
/// grace has passed, it goes like any other. (Each grace here is 1 s, and
/// the test waits it out.)
#[tokio::test]
async fn the_grace_protects_pulls_in_flight_and_not_finished_ones() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let nix = with_big(dir.path());
    let mut s = settings(&dir.path().join("state"));
    s.storage_limit = Some(1 << 20);
    s.eviction_grace = std::time::Duration::from_secs(1);
    let app = nixery::app_state_with(&s, Arc::new(nix)).await.unwrap();
    let grace = || tokio::time::sleep(std::time::Duration::from_millis(1300));
    let digest = pull(&app, "big").await;
    let manifest = get(&app, &format!("/v2/big/manifests/{digest}"))
        .await
        .json();
    let layer = largest_layer(&manifest)["digest"]
        .as_str()
        .unwrap()
        .to_string();
    // Past the grace of its manifest, a blob asked for renews it.
    grace().await;
    let config = manifest["config"]["digest"].as_str().unwrap();
    assert_eq!(
        get(&app, &format!("/v2/big/blobs/{config}")).await.status,
        StatusCode::OK
    );
    pull(&app, "hello").await;
    assert!(
        catalogued(&app).contains(&digest),
        "a pull in progress lost its image"
    );
    // A blob being sent keeps it, however long the download takes...
    let resp = nixery::registry::router(app.clone())
        .oneshot(
            axum::http::Request::get(format!("/v2/big/blobs/{layer}"))
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    grace().await;
    pull(&app, "curl").await;
    assert!(
        catalogued(&app).contains(&digest),
        "evicted while a blob was sent"
    );
    // ...and once it has ended and the grace has passed, the image goes.
    body.collect().await.unwrap();
    grace().await;
    pull(&app, "jq").await;
    assert!(
        !catalogued(&app).contains(&digest),
        "a finished pull kept its image"
    );
    let m = metrics(&app).await;
    assert!(metric(&m, "nixery_evictions_total") >= 1.0);
}

/// A flood of new images, each pulled within --eviction-grace: the grace
/// spares pulls in flight within a quarter of the limit (and the most recent
/// one), so the store stays within its stated bound however many images
/// were asked for lately (`nixery_storage_kept_bytes` says what stayed).
#[tokio::test]
async fn a_flood_of_new_images_keeps_the_store_within_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut nix = fake(dir.path());
    for i in 0..12 {
        nix.add_package(
            &format!("n{i}"),
            FakePackage {
                files: vec![(format!("share/n{i}"), noise(64 << 10) + &i.to_string())],
                ..Default::default()
            },
        );
    }
    let limit: u64 = 256 << 10;
    let mut s = settings(&dir.path().join("state"));
    s.storage_limit = Some(limit);
    // Every image of the flood is within the grace.
    s.eviction_grace = std::time::Duration::from_secs(600);
    let app = nixery::app_state_with(&s, Arc::new(nix)).await.unwrap();
    let mut largest = 0;
    for i in 0..12 {
        pull(&app, &format!("n{i}")).await;
        largest = largest.max(app.catalog.list().iter().map(|i| i.size).max().unwrap());
        // The limit, a quarter of it for recent pulls, one more recent
        // image past that quarter, and the image just built (the newest).
        let bound = limit + limit / 4 + 2 * largest;
        let now = stored(dir.path());
        assert!(
            now <= bound,
            "after {} images: {now} bytes stored, bound {bound}",
            i + 1
        );
        let m = metrics(&app).await;
        let kept = |reason: &str| {
            metric(
                &m,
                &format!("nixery_storage_kept_bytes{{reason=\"{reason}\"}}"),
            )
        };
        assert!(kept("recent") <= (limit / 4 + largest) as f64, "{m}");
        if now > limit {
            // What stayed over the limit is accounted for.
            let all: f64 = [
                "sending",
                "recent",
                "newest",
                "built",
                "pinned",
                "unreferenced",
            ]
            .iter()
            .map(|r| kept(r))
            .sum();
            assert!(
                now as f64 <= limit as f64 + all,
                "{now} stored, {all} kept: {m}"
            );
        }
    }
    let m = metrics(&app).await;
    assert!(metric(&m, "nixery_evictions_total") >= 6.0, "{m}");
}
