//! Shared storage against a real S3 server: Garage on loopback (installed by
//! scripts/garage.sh, which .ci/run runs). No mock S3: the blob store
//! contract, build leases, two `nixery serve` instances on one bucket with
//! real Nix and real clients, faults between nixery and the bucket (through
//! a TCP proxy that refuses, slows or cuts connections), and a three-node
//! Garage cluster that loses a node.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::garage::{self, Garage};
use common::proxy::Proxy;
use common::{http_get, metric, run, Server};
use nixery::name::Digest;
use nixery::shared::{Attempt, Shared};
use nixery::store::{BlobStore, CachedStore, LocalStore, ObjectBlobStore};

/// A whole blob (or a range of it), which must be there.
async fn read_all(s: &dyn BlobStore, d: &Digest, range: Option<(u64, u64)>) -> Vec<u8> {
    nixery::store::conformance::read_all(s, d, range)
        .await
        .expect("blob present")
}
use sha2::Digest as _;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn metric_of(s: &Server, name: &str) -> f64 {
    let (code, text) = http_get(&s.url("/metrics"));
    assert_eq!(code, 200);
    metric(&text, name)
}

/// `nixery serve` on the bucket (through `endpoint`), under `prefix`.
fn serve(state: &Path, g: &Garage, endpoint: &str, prefix: &str, extra: &[&str]) -> Server {
    let mut args: Vec<String> = g.flags(endpoint, prefix);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_env(state, &args, &garage::Garage::env())
}

/// GET a manifest: (status, Docker-Content-Digest or the error body).
fn manifest(s: &Server, image: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/stderr",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            "-w",
            "\n%{http_code}",
        ])
        .arg(s.url(&format!("/v2/{image}/manifests/latest")))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).into_owned();
    let body = String::from_utf8_lossy(&out.stderr).into_owned();
    let code: u16 = head.rsplit('\n').next().unwrap().trim().parse().unwrap();
    let digest = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("docker-content-digest:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (code, if code == 200 { digest } else { body })
}

/// Every blob under `prefix` in the bucket matches its digest (none is
/// half-written); returns how many there are.
async fn blobs_verify(os: &dyn object_store::ObjectStore, prefix: &str) -> usize {
    let keys = garage::keys(os, &format!("{prefix}/blobs")).await;
    for k in &keys {
        let bytes = os
            .get(&object_store::path::Path::from(k.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let hex = k.rsplit('/').next().unwrap();
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&bytes)),
            hex,
            "object {k} does not match its digest"
        );
    }
    keys.len()
}

#[test]
fn blob_store_contract_holds_on_garage() {
    let Some(g) = Garage::start("blob_store_contract_holds_on_garage", 1, "contract") else {
        return;
    };
    let rt = rt();
    rt.block_on(async {
        let os = g.client(&g.endpoint());
        let dir = tempfile::tempdir().unwrap();
        let object = ObjectBlobStore::new(os.clone(), "plain", &dir.path().join("tmp")).unwrap();
        nixery::store::conformance::run(&object).await;

        // In front of the bucket, a local cache: the same contract.
        let local = Arc::new(LocalStore::open(&dir.path().join("cache")).unwrap());
        let remote =
            Arc::new(ObjectBlobStore::new(os.clone(), "cached", &dir.path().join("tmp")).unwrap());
        let cached = CachedStore::new(local.clone(), remote.clone(), u64::MAX);
        nixery::store::conformance::run(&cached).await;

        // A blob larger than one part goes up in parts and reads back whole
        // and by range; a read that misses the cache fills it.
        let big: Vec<u8> = (0..40_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let d = nixery::store::put_bytes(&object, &big).await.unwrap();
        assert_eq!(object.stat(&d).await.unwrap(), Some(big.len() as u64));
        let part = read_all(&object, &d, Some((8_388_000, 16_778_000))).await;
        assert_eq!(part, &big[8_388_000..16_778_000]);
        // A blob another instance stored: in the bucket, not in this cache.
        let only_remote = nixery::store::put_bytes(&*remote, b"in the bucket only")
            .await
            .unwrap();
        assert_eq!(local.stat(&only_remote).await.unwrap(), None);
        assert_eq!(
            read_all(&cached, &only_remote, None).await,
            b"in the bucket only"
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while local.stat(&only_remote).await.unwrap().is_none() {
            assert!(Instant::now() < deadline, "the cache was never filled");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            read_all(&*local, &only_remote, None).await,
            b"in the bucket only"
        );

        // A cache within its limit: filling past it removes the blobs cached
        // longest ago; the bucket keeps them, and they are served from there.
        let small = Arc::new(LocalStore::open(&dir.path().join("small")).unwrap());
        let limited = CachedStore::new(small.clone(), remote.clone(), 2_500_000);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut ds = Vec::new();
        for i in 0..4u8 {
            let d = nixery::store::put_bytes(&*remote, &vec![i; 1_000_000])
                .await
                .unwrap();
            assert_eq!(read_all(&limited, &d, None).await, vec![i; 1_000_000]);
            while small.stat(&d).await.unwrap().is_none() {
                assert!(Instant::now() < deadline, "never cached");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ds.push(d);
        }
        let cached = || async {
            small
                .list()
                .await
                .unwrap()
                .iter()
                .map(|(_, s)| s)
                .sum::<u64>()
        };
        while cached().await > 2_500_000 {
            assert!(Instant::now() < deadline, "never trimmed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(small.stat(&ds[0]).await.unwrap(), None, "the oldest stayed");
        assert!(
            small.stat(&ds[3]).await.unwrap().is_some(),
            "the newest went"
        );
        assert_eq!(read_all(&limited, &ds[0], None).await, vec![0u8; 1_000_000]);
    });
}

/// Why leases do not use `If-None-Match: *`: Garage accepts a conditional
/// create of an object that exists. If a Garage release starts refusing it,
/// this fails, and leases can move to conditional writes.
#[test]
fn garage_does_not_refuse_a_conditional_create_of_an_existing_object() {
    let Some(g) = Garage::start("garage_conditional_create", 1, "conditional") else {
        return;
    };
    rt().block_on(async {
        use object_store::{ObjectStore, PutMode, PutOptions};
        let os = g.client(&g.endpoint());
        let key = object_store::path::Path::from("lock");
        let create = || PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        os.put_opts(&key, "first".into(), create()).await.unwrap();
        let second = os.put_opts(&key, "second".into(), create()).await;
        assert!(second.is_ok(), "Garage now refuses it: {second:?}");
    });
}

#[test]
fn build_leases_admit_one_holder_at_a_time_and_expire_with_their_holder() {
    let Some(g) = Garage::start("build_leases", 1, "leases") else {
        return;
    };
    rt().block_on(async {
        let os = g.client(&g.endpoint());
        let holders = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let s = Shared::new(os.clone(), "p", Duration::from_secs(10));
            let (holders, most) = (holders.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                let mut contended = 0;
                loop {
                    match s.try_lease("same-image").await.unwrap() {
                        Attempt::Won(lease) => {
                            let now = holders.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            holders.fetch_sub(1, Ordering::SeqCst);
                            drop(lease);
                            return contended;
                        }
                        Attempt::Held(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                        Attempt::Contended => {
                            contended += 1;
                            tokio::time::sleep(nixery::shared::jitter(
                                Duration::from_millis(10),
                                Duration::from_millis(200),
                            ))
                            .await
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            most.load(Ordering::SeqCst),
            1,
            "two instances held one lease"
        );
        // Every holder released: nothing is left under the key.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(garage::keys(&*os, "p/leases").await, Vec::<String>::new());

        // A holder that dies (stops renewing, releases nothing) holds the
        // lease only until its TTL has passed; then another takes it.
        let a = Shared::new(os.clone(), "p", Duration::from_secs(3));
        let b = Shared::new(os.clone(), "p", Duration::from_secs(3));
        let Attempt::Won(lease) = a.try_lease("k").await.unwrap() else {
            panic!("a free lease was not granted");
        };
        lease.abandon();
        match b.try_lease("k").await.unwrap() {
            Attempt::Held(holder) => assert_eq!(holder, a.instance()),
            _ => panic!("a live lease was granted to another"),
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match b.try_lease("k").await.unwrap() {
                Attempt::Won(_) => break,
                _ => {
                    assert!(
                        Instant::now() < deadline,
                        "a dead holder's lease never expired"
                    );
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    });
}

#[test]
fn two_instances_on_one_bucket_build_each_image_once() {
    if !common::have_tool("skopeo", "two_instances_on_one_bucket") {
        return;
    }
    let Some(g) = Garage::start("two_instances_on_one_bucket", 1, "shared") else {
        return;
    };
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let a = serve(da.path(), &g, &g.endpoint(), "two", &[]);
    let b = serve(db.path(), &g, &g.endpoint(), "two", &[]);

    // A builds; B serves the same digest without Nix.
    let (code, built) = manifest(&a, "shell/jq");
    assert_eq!(code, 200, "{built}");
    let (code, served) = manifest(&b, "shell/jq");
    assert_eq!(code, 200, "{served}");
    assert_eq!(served, built);
    assert_eq!(metric_of(&a, "nixery_builds_total"), 1.0);
    assert_eq!(
        metric_of(&b, "nixery_builds_total"),
        0.0,
        "B built it again"
    );
    assert_eq!(metric_of(&b, "nixery_shared_index_hits_total"), 1.0);
    // B has none of its blobs on its own disk until a client reads them.
    let out = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/shell/jq:latest", b.addr),
        &format!("dir:{}", out.path().join("img").display()),
    ]));
    assert!(ok, "skopeo copy from B: {err}");
    let copied = std::fs::read(out.path().join("img/manifest.json")).unwrap();
    assert_eq!(
        Digest::of(&copied).to_string(),
        built,
        "B served other bytes"
    );

    // Asked at once for an image neither has: one build in all.
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| manifest(&a, "less"));
        let tb = s.spawn(|| manifest(&b, "less"));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert_eq!(ra.0, 200, "{}", ra.1);
    assert_eq!(rb.0, 200, "{}", rb.1);
    assert_eq!(ra.1, rb.1);
    let builds = metric_of(&a, "nixery_builds_total") + metric_of(&b, "nixery_builds_total");
    assert_eq!(builds, 2.0, "shell/jq once, less once");

    // A third instance that redirects blob GETs to presigned bucket URLs.
    let c = serve(dc.path(), &g, &g.endpoint(), "two", &["--s3-redirect"]);
    let (code, digest) = manifest(&c, "shell/jq");
    assert_eq!((code, digest.as_str()), (200, built.as_str()));
    let m: serde_json::Value = serde_json::from_slice(&copied).unwrap();
    let layer = common::largest_layer(&m)["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let out2 = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
        ])
        .arg(c.url(&format!("/v2/shell/jq/blobs/{layer}")))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out2.stdout).into_owned();
    assert!(
        said.starts_with("307 ") && said.contains(&format!("127.0.0.1:{}", g.nodes[0].s3_port)),
        "not redirected to the bucket: {said}"
    );
    // HEAD is answered here, from the bucket's metadata: no redirect.
    let head = Command::new("curl")
        .args(["-s", "-I"])
        .arg(c.url(&format!("/v2/shell/jq/blobs/{layer}")))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).to_ascii_lowercase();
    let size = common::largest_layer(&m)["size"].as_u64().unwrap();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains(&format!("content-length: {size}")), "{head}");
    // A Range request follows the redirect: the bucket answers 206.
    let ranged = Command::new("curl")
        .args(["-s", "-L", "-r", "10-109", "-w", "\n%{http_code}"])
        .arg(c.url(&format!("/v2/shell/jq/blobs/{layer}")))
        .output()
        .unwrap();
    let (bytes, status) = ranged.stdout.split_at(ranged.stdout.len() - 4);
    assert_eq!(status, b"\n206");
    assert_eq!(bytes.len(), 100);
    let whole = Command::new("curl")
        .args(["-s", "-L"])
        .arg(c.url(&format!("/v2/shell/jq/blobs/{layer}")))
        .output()
        .unwrap()
        .stdout;
    assert_eq!(Digest::of(&whole).to_string(), layer);
    assert_eq!(bytes, &whole[10..110]);
    let (ok, _, err) = run(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/shell/jq:latest", c.addr),
        &format!("dir:{}", out.path().join("img2").display()),
    ]));
    assert!(ok, "skopeo copy through redirects: {err}");
    assert_eq!(metric_of(&c, "nixery_builds_total"), 0.0);
    let rt = rt();
    rt.block_on(async {
        assert!(blobs_verify(&*g.client(&g.endpoint()), "two").await >= 4);
    });
}

/// A package set with one package whose build waits while a gate file
/// exists: a build that is running when its instance is killed.
fn gated_set(dir: &Path) -> std::path::PathBuf {
    let set = dir.join("gated-pkgs");
    std::fs::create_dir_all(&set).unwrap();
    let gate = dir.join("gate");
    std::fs::write(&gate, "").unwrap();
    std::fs::write(
        set.join("default.nix"),
        format!(
            r#"{{ ... }}@args:
let base = import {offline} args; in base // {{
  gated = derivation {{
    name = "gated";
    system = builtins.currentSystem;
    builder = "/usr/bin/busybox";
    args = [ "sh" "-c" "while [ -e {gate} ]; do /usr/bin/busybox sleep 0.2; done; /usr/bin/busybox mkdir -p $out; echo gated > $out/gated" ];
    nonce = "{nonce}";
  }};
}}
"#,
            offline = common::offline_pkgs().display(),
            gate = gate.display(),
            nonce = dir.display(),
        ),
    )
    .unwrap();
    set
}

#[test]
fn a_dead_builders_lease_expires_and_another_instance_builds() {
    let Some(g) = Garage::start("a_dead_builders_lease", 1, "dead") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let set = gated_set(dir.path());
    let pkgs = set.display().to_string();
    // Long enough that B, asked right after A dies, still finds A's lease
    // live on a loaded machine (A renewed it at most 2 s before).
    let flags = ["--pkgs-path", pkgs.as_str(), "--build-lease-ttl", "6"];
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = serve(da.path(), &g, &g.endpoint(), "dead", &flags);
    let b = serve(db.path(), &g, &g.endpoint(), "dead", &flags);
    let url = a.url("/v2/gated/manifests/latest");
    let asking = std::thread::spawn(move || http_get(&url));
    // A holds the lease while its build waits at the gate.
    let rt = rt();
    let os = g.client(&g.endpoint());
    let deadline = Instant::now() + Duration::from_secs(120);
    while rt.block_on(garage::keys(&*os, "dead/leases")).is_empty() {
        assert!(Instant::now() < deadline, "A never took the lease");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A dies without a word; its build may go on (Nix's own process), but
    // nothing renews A's lease.
    a.kill();
    let _ = asking.join();
    std::fs::remove_file(dir.path().join("gate")).unwrap();
    let (code, digest) = manifest(&b, "gated");
    assert_eq!(code, 200, "{digest}");
    assert!(digest.starts_with("sha256:"));
    assert_eq!(
        metric_of(&b, "nixery_build_lease_waits_total"),
        1.0,
        "B did not wait for A"
    );
    assert_eq!(metric_of(&b, "nixery_builds_total"), 1.0);
    // B's lease is released: nothing is left but the index.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        rt.block_on(garage::keys(&*os, "dead/leases")),
        Vec::<String>::new()
    );
}

#[test]
fn object_store_faults_are_said_clearly_and_lose_nothing() {
    let Some(g) = Garage::start("object_store_faults", 1, "faults") else {
        return;
    };
    let proxy = Proxy::start(g.nodes[0].s3_port);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = serve(da.path(), &g, &proxy.endpoint(), "f", &[]);
    let rt = rt();
    let os = g.client(&g.endpoint());

    // Every upload is cut after 32 KiB: the build fails, said as the object
    // store's failure, and no object under a digest is half-written.
    proxy.cut_after(32 * 1024);
    let (code, body) = manifest(&a, "hello");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("object store"), "{body}");
    assert!(metric_of(&a, "nixery_object_store_errors_total") >= 1.0);
    // The message names the upload that was cut, not the bucket's address.
    assert!(body.contains("PUT f/blobs/sha256/"), "{body}");
    assert!(!body.contains("127.0.0.1"), "{body}");
    rt.block_on(async { blobs_verify(&*os, "f").await });
    // Back: the same request succeeds.
    proxy.pass();
    let (code, built) = manifest(&a, "hello");
    assert_eq!(code, 200, "{built}");
    assert!(rt.block_on(blobs_verify(&*os, "f")) >= 3);

    // Down: B, which has nothing of its own, says so; then recovers.
    let b = serve(db.path(), &g, &proxy.endpoint(), "f", &[]);
    assert_eq!(metric_of(&b, "nixery_object_store_errors_total"), 0.0);
    proxy.down();
    let (code, body) = manifest(&b, "hello");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("object store"), "{body}");
    assert!(metric_of(&b, "nixery_object_store_errors_total") >= 1.0);
    proxy.pass();
    let (code, served) = manifest(&b, "hello");
    assert_eq!((code, served.as_str()), (200, built.as_str()));
    assert_eq!(metric_of(&b, "nixery_builds_total"), 0.0);

    // Down while B serves a blob it never cached: a 503, not a wrong body.
    let (_, m) = http_get(&b.url("/v2/hello/manifests/latest"));
    let m: serde_json::Value = serde_json::from_str(&m).unwrap();
    let config = m["config"]["digest"].as_str().unwrap().to_string();
    proxy.down();
    let (code, body) = http_get(&b.url(&format!("/v2/hello/blobs/{config}")));
    assert_eq!(code, 503, "{body}");
    // Slow: served all the same, and right.
    proxy.slow();
    let (code, body) = http_get(&b.url(&format!("/v2/hello/blobs/{config}")));
    assert_eq!(code, 200);
    assert_eq!(Digest::of(body.as_bytes()).to_string(), config);
    proxy.pass();
}

#[test]
fn a_three_node_garage_cluster_that_loses_a_node_keeps_serving() {
    if !common::have_tool("skopeo", "three_node_cluster") {
        return;
    }
    let Some(mut g) = Garage::start("three_node_cluster", 3, "cluster") else {
        return;
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = serve(da.path(), &g, &g.nodes[0].endpoint(), "c", &[]);
    let (code, built) = manifest(&a, "jq");
    assert_eq!(code, 200, "{built}");
    g.nodes[2].kill();
    // B, through another node, serves A's image with one node gone...
    let b = serve(db.path(), &g, &g.nodes[1].endpoint(), "c", &[]);
    let (code, served) = manifest(&b, "jq");
    assert_eq!((code, served.as_str()), (200, built.as_str()));
    let out = tempfile::tempdir().unwrap();
    let (ok, _, err) = run(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/jq:latest", b.addr),
        &format!("dir:{}", out.path().join("img").display()),
    ]));
    assert!(ok, "skopeo copy with a node down: {err}");
    // ... and A still builds and stores new images (two of three replicas).
    let (code, body) = manifest(&a, "less");
    assert_eq!(code, 200, "{body}");
    assert_eq!(metric_of(&b, "nixery_builds_total"), 0.0);
}

/// Agents (the controller) on one bucket: node A builds a NixImage's image;
/// node B, whose Nix is never asked anything, serves it from the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_one_bucket_build_once_and_other_nodes_serve_from_it() {
    use common::apiserver::{agent, build_to_ready, niximage};
    let Some(g) =
        tokio::task::spawn_blocking(|| Garage::start("agents_on_one_bucket", 1, "agents"))
            .await
            .unwrap()
    else {
        return;
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let node = |dir: &Path| {
        let mut s = common::settings(dir);
        s.storage = nixery::config::Storage::S3 {
            s3: nixery::store::S3Config {
                endpoint: Some(g.endpoint()),
                bucket: g.bucket.clone(),
                region: garage::REGION.into(),
                prefix: "agents".into(),
                credentials: Some((garage::KEY_ID.into(), garage::SECRET.into())),
            },
            redirect: false,
            lease_ttl: Duration::from_secs(30),
        };
        s
    };
    // Each node its own fake Nix and store.
    let na = Arc::new(nixery::nix::fake::FakeNix::standard(
        &da.path().join("store"),
    ));
    let nb = Arc::new(nixery::nix::fake::FakeNix::standard(
        &db.path().join("store"),
    ));
    let sa = nixery::app_state_with(&node(da.path()), na.clone())
        .await
        .unwrap();
    // A queue of one: a taken image that stayed counted as queued would
    // refuse B's next request.
    let sb = nixery::app_state_with(
        &nixery::config::Settings {
            max_queue: 1,
            ..node(db.path())
        },
        nb.clone(),
    )
    .await
    .unwrap();
    let mut a = agent("node-a", "127.0.0.1:5000", &sa, |_| {});
    let mut b = agent("node-b", "127.0.0.1:5000", &sb, |_| {});
    let server = common::apiserver::Server::new(niximage("curl-and-jq", 1, &["hello"], &[]));
    build_to_ready(&server, &mut a, ("0/1", "1/1")).await;
    build_to_ready(&server, &mut b, ("1/2", "2/2")).await;
    assert!(na.realisations.load(Ordering::SeqCst) > 0);
    assert_eq!(nb.evaluations.load(Ordering::SeqCst), 0, "node B evaluated");
    assert_eq!(nb.realisations.load(Ordering::SeqCst), 0, "node B built");
    let status = server.object().status.unwrap();
    assert_eq!(status.nodes[0].digest, status.nodes[1].digest);

    // Every blob of the image comes from node B's registry, right.
    let m = common::get(&sb, "/v2/niximage/default/curl-and-jq/manifests/v1").await;
    assert_eq!(m.status, 200);
    let m = m.json();
    let blobs = std::iter::once(&m["config"]).chain(m["layers"].as_array().unwrap());
    let mut n = 0;
    for d in blobs {
        let d = d["digest"].as_str().unwrap();
        let r = common::get(&sb, &format!("/v2/niximage/default/curl-and-jq/blobs/{d}")).await;
        assert_eq!(r.status, 200);
        assert_eq!(Digest::of(&r.body).to_string(), d);
        n += 1;
    }
    assert!(n >= 2);

    // Ad-hoc images too, one after another: built by A, taken by B.
    for image in ["curl", "jq", "shell/hello"] {
        let uri = format!("/v2/{image}/manifests/latest");
        let built = common::get(&sa, &uri).await;
        assert_eq!(built.status, 200);
        let taken = common::get(&sb, &uri).await;
        assert_eq!(taken.status, 200, "{}", taken.error_message());
        assert_eq!(taken.body, built.body);
    }
    assert_eq!(nb.evaluations.load(Ordering::SeqCst), 0, "node B evaluated");
    drop(g);
}

/// A bucket that cannot be used is said at start, naming it; a store that
/// does not answer yet is not fatal (requests get 503 until it does).
#[test]
fn a_bucket_that_cannot_be_used_is_said_at_start() {
    let Some(g) = Garage::start("a_bucket_that_cannot_be_used", 1, "probe") else {
        return;
    };
    let start = |bucket: &str, secret: &str, endpoint: &str| {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixery"));
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--storage-backend",
            "s3",
        ])
        .args(["--s3-endpoint", endpoint, "--s3-bucket", bucket])
        .args(["--s3-region", garage::REGION, "--pkgs-path"])
        .arg(common::offline_pkgs())
        .arg("--state-dir")
        .arg(dir.path())
        .env("AWS_ACCESS_KEY_ID", garage::KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", secret);
        cmd
    };
    for (bucket, secret) in [("nosuch", garage::SECRET), ("probe", &"0".repeat(64))] {
        let out = start(bucket, secret, &g.endpoint())
            .stdout(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with bucket {bucket}: {err}");
        assert!(
            err.contains(&format!(
                "bucket '{bucket}' at {} cannot be written",
                g.endpoint()
            )),
            "{err}"
        );
    }
    // Nothing listens there: it starts, and says 503 until the store is back.
    let proxy = Proxy::start(g.nodes[0].s3_port);
    proxy.down();
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path(), &g, &proxy.endpoint(), "p", &[]);
    let (code, body) = manifest(&s, "hello");
    assert_eq!(code, 503, "{body}");
    proxy.pass();
    let (code, body) = manifest(&s, "hello");
    assert_eq!(code, 200, "{body}");
}

/// A blob that leaves the bucket behind nixery's back (a lifecycle rule, a
/// hand) is stored again, never served as missing: an instance taking the
/// image from the index builds it instead, and a builder that reuses the
/// blob from its local cache uploads it again before recording the image.
#[test]
fn a_blob_lost_from_the_bucket_is_stored_again() {
    let Some(g) = Garage::start("a_blob_lost_from_the_bucket", 1, "lost") else {
        return;
    };
    let rt = rt();
    let os = g.client(&g.endpoint());
    let layer_of = |s: &Server| {
        let (code, m) = http_get(&s.url("/v2/hello/manifests/latest"));
        assert_eq!(code, 200);
        let m: serde_json::Value = serde_json::from_str(&m).unwrap();
        common::largest_layer(&m)["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let key = |prefix: &str, digest: &str| {
        object_store::path::Path::from(format!(
            "{prefix}/blobs/sha256/{}",
            digest.strip_prefix("sha256:").unwrap()
        ))
    };
    let in_bucket = |k: &object_store::path::Path| rt.block_on(os.head(k)).is_ok();

    // Taken from the index: B sees the hole and builds instead.
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = serve(da.path(), &g, &g.endpoint(), "lost", &[]);
    let layer = layer_of(&a);
    let k = key("lost", &layer);
    rt.block_on(os.delete(&k)).unwrap();
    let b = serve(db.path(), &g, &g.endpoint(), "lost", &[]);
    assert_eq!(layer_of(&b), layer);
    assert_eq!(
        metric_of(&b, "nixery_builds_total"),
        1.0,
        "B took a broken image"
    );
    assert_eq!(metric_of(&b, "nixery_shared_index_hits_total"), 0.0);
    assert!(in_bucket(&k), "B did not store the blob again");
    let body = Command::new("curl")
        .args(["-sf"])
        .arg(b.url(&format!("/v2/hello/blobs/{layer}")))
        .output()
        .unwrap();
    assert!(body.status.success());
    assert_eq!(Digest::of(&body.stdout).to_string(), layer);

    // Reused from the builder's cache: uploaded again before the record.
    let dc = tempfile::tempdir().unwrap();
    let c = serve(dc.path(), &g, &g.endpoint(), "heal", &["--cache-ttl", "2"]);
    assert_eq!(layer_of(&c), layer);
    let k = key("heal", &layer);
    rt.block_on(os.delete(&k)).unwrap();
    // The answer expires; asked again, C finds the image in its own catalog.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(layer_of(&c), layer);
    assert!(
        in_bucket(&k),
        "C recorded an image whose blob the bucket lacks"
    );
}

/// Three Garage nodes in containers on a private Docker network; one is cut
/// off the network (alive, unreachable): the other two keep serving and
/// storing (quorum writes of two of three replicas).
#[test]
fn a_garage_node_cut_off_its_network_leaves_the_cluster_serving() {
    if !common::have_tool("docker", "garage_partition") {
        return;
    }
    let Some(g) = Garage::start_in_docker("garage_partition", 3, "partition") else {
        return;
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = serve(da.path(), &g, &g.nodes[0].endpoint(), "p", &[]);
    let (code, built) = manifest(&a, "jq");
    assert_eq!(code, 200, "{built}");
    g.nodes[2].disconnect();
    // Packets to the cut node vanish (no refusal), so until Garage's failure
    // detector marks it down a request may wait on it past nixery's deadline
    // and get a 503 ("try again"); then the two others serve and store.
    let until_served = |s: &Server, image: &str| {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let (code, body) = manifest(s, image);
            if code == 200 || Instant::now() > deadline {
                return (code, body);
            }
            assert_eq!(code, 503, "{body}");
            std::thread::sleep(Duration::from_secs(2));
        }
    };
    let b = serve(db.path(), &g, &g.nodes[1].endpoint(), "p", &[]);
    let (code, served) = until_served(&b, "jq");
    assert_eq!((code, served.as_str()), (200, built.as_str()));
    assert_eq!(metric_of(&b, "nixery_builds_total"), 0.0);
    let rt = rt();
    let os = g.client(&g.nodes[1].endpoint());
    assert!(rt.block_on(blobs_verify(&*os, "p")) >= 3);
    let (code, body) = until_served(&a, "less");
    assert_eq!(code, 200, "{body}");
}
