//! The pipeline against real Nix (the host's, and Debian 13's in the Nix
//! version matrix) on nix/offline-pkgs: what Nix decides (unknown names,
//! case-insensitive names and aliases, systems it cannot build, failing and
//! slow builds and their processes) and what real closures give (reproducible
//! digests, shared layers, budgets, zstd).

mod common;

use std::time::Duration;

use axum::http::{Method, StatusCode};
use common::*;
use nixery::oci::{DOCKER_MANIFEST, OCI_MANIFEST};

async fn state(dir: &std::path::Path) -> nixery::registry::AppState {
    nixery::app_state(&settings(dir)).await.unwrap()
}

#[tokio::test]
async fn unknown_packages_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
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
    let app = state(dir.path()).await;
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
async fn failing_build_says_why_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
    for attempt in 1..=2 {
        // The image cannot be made: a 4xx, whose message clients print
        // (Docker shows no 5xx's), not cached (the next request builds again).
        let r = get(&app, "/v2/broken/manifests/latest").await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
        );
        // The reason in the message (which clients print), with Nix's last
        // line; the end of Nix's log in detail.log; where to look further.
        let msg = r.error_message();
        assert!(
            msg.starts_with("building the image failed: building the packages failed: "),
            "{msg}"
        );
        assert!(msg.contains("page at /"), "{msg}");
        let log = r.json()["errors"][0]["detail"]["log"].clone();
        assert!(
            log.as_array()
                .unwrap()
                .iter()
                .any(|l| l.as_str().unwrap().contains("fails to build on purpose")),
            "{log}"
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

#[tokio::test]
async fn the_offline_set_builds_inside_nixs_sandbox() {
    // Debian 13's and NixOS's Nix have the sandbox on; Debian 12's has it
    // off. The offline set must build either way: its builders use only
    // store paths (the host's patchelf is imported with its libraries).
    // `freshHello` is a new derivation on every evaluation that runs patchelf
    // on an imported host binary, so this builds in the sandbox however much
    // the store already holds.
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.nix_options.push(("sandbox".into(), "true".into()));
    let app = nixery::app_state(&s).await.unwrap();
    let r = get(&app, "/v2/freshHello/manifests/latest").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_builds_total"), 1.0);
    // A package that runs a host program while it builds cannot work there:
    // the answer says which file and what to change, in one sentence.
    let r = get(&app, "/v2/hostProgram/manifests/latest").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    let msg = r.error_message();
    assert!(
        msg.contains("a builder needed /usr/bin/hello, which is outside /nix/store and hidden by Nix's build sandbox; set `sandbox = false` in nix.conf"),
        "{msg}"
    );
    // Nix's own words stay in the detail.
    let log = r.json()["errors"][0]["detail"]["log"].to_string();
    assert!(log.contains("/usr/bin/hello: not found"), "{log}");
    // With the sandbox off (the option wins over nix.conf), the same package builds.
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.nix_options.push(("sandbox".into(), "false".into()));
    let app = nixery::app_state(&s).await.unwrap();
    let r = get(&app, "/v2/hostProgram/manifests/latest").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
}

#[tokio::test]
async fn build_past_its_timeout_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(dir.path());
    s.build_timeout = Duration::from_secs(5);
    let app = nixery::app_state(&s).await.unwrap();
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
async fn same_image_in_fresh_state_dirs_has_the_same_digest() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ra = get(&state(a.path()).await, "/v2/shell/curl/manifests/latest").await;
    let rb = get(&state(b.path()).await, "/v2/curl/shell/manifests/latest").await;
    assert_eq!(ra.status, StatusCode::OK);
    assert_eq!(
        ra.header("docker-content-digest"),
        rb.header("docker-content-digest")
    );
    assert_eq!(ra.body, rb.body);
}

/// Output paths already in the store need no derivation written: the
/// evaluation is read-only and the paths only get GC roots. Missing ones are
/// instantiated and built.
#[tokio::test]
async fn present_paths_need_no_derivation_written_and_missing_ones_are_built() {
    use nixery::nix::Nix;
    let dir = tempfile::tempdir().unwrap();
    // A package no store has yet: the offline set and one new derivation.
    let pkgs = dir.path().join("pkgs");
    std::fs::create_dir_all(&pkgs).unwrap();
    let nonce = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    std::fs::write(
        pkgs.join("default.nix"),
        format!(
            r#"{{ system ? builtins.currentSystem, ... }}:
let pkgs = import {} {{ inherit system; }}; in pkgs // {{
  fresh = pkgs.hostTools.mkDerivation {{
    name = "fresh-{nonce}";
    script = "mkdir -p $out/share && echo {nonce} > $out/share/nonce";
  }};
}}"#,
            offline_pkgs().display()
        ),
    )
    .unwrap();
    let mut s = settings(&dir.path().join("state1"));
    s.source = nixery::nix::Source::Path(pkgs.clone());
    let nix = nixery::nix::NixCli::new(&dir.path().join("probe"), offline_nix_options()).unwrap();
    let names = ["fresh".to_string(), "hello".to_string()];
    let prepared = nix
        .prepare(&s.source, "latest", &names, "x86_64-linux")
        .await
        .unwrap();
    let (drv, out) = (&prepared.drvs[0], &prepared.outs[0]);
    assert!(drv.ends_with(&format!("fresh-{nonce}.drv")), "{drv}");
    // Evaluating wrote nothing.
    assert!(!std::path::Path::new(drv).exists(), "{drv} written");
    assert!(!std::path::Path::new(out).exists());

    // Missing, it is instantiated and built.
    let app = nixery::app_state(&s).await.unwrap();
    let first = get(&app, "/v2/fresh/hello/manifests/latest").await;
    assert_eq!(
        first.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert!(std::path::Path::new(drv).exists());
    assert_eq!(
        std::fs::read_to_string(format!("{out}/share/nonce"))
            .unwrap()
            .trim(),
        nonce
    );
    drop(app);

    // That state directory gone (its roots with it), the output is copied
    // out and back in without its derivation, as a node gets paths from a
    // binary cache or `nix copy`.
    std::fs::remove_dir_all(dir.path().join("state1")).unwrap();
    let nix_store = |args: &[&str], input: Option<&[u8]>| {
        use std::io::Write;
        let mut child = std::process::Command::new("nix-store")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.unwrap_or_default())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nix-store {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let exported = nix_store(&["--export", out], None);
    nix_store(&["--delete", out, drv], None);
    assert!(!std::path::Path::new(out).exists());
    nix_store(
        &["--import", "--option", "require-sigs", "false"],
        Some(&exported),
    );
    assert!(std::path::Path::new(out).exists());
    assert!(!std::path::Path::new(drv).exists());

    // A fresh state directory makes the same image from the present paths
    // without writing the derivation again, and roots them.
    let mut s2 = settings(&dir.path().join("state2"));
    s2.source = s.source.clone();
    let app = nixery::app_state(&s2).await.unwrap();
    let second = get(&app, "/v2/fresh/hello/manifests/latest").await;
    assert_eq!(
        second.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&second.body)
    );
    assert_eq!(
        first.header("docker-content-digest"),
        second.header("docker-content-digest")
    );
    assert!(!std::path::Path::new(drv).exists(), "{drv} written again");
    let roots = std::process::Command::new("nix-store")
        .args(["--query", "--roots", out])
        .output()
        .unwrap();
    let roots = String::from_utf8_lossy(&roots.stdout);
    let state2 = format!("{}/gcroots/", dir.path().join("state2").display());
    assert!(
        roots.lines().any(|l| l.starts_with(&state2)),
        "{out} is not rooted in {state2}: {roots}"
    );
}

#[tokio::test]
async fn images_that_share_dependencies_share_layers() {
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
    let layers = |r: Resp| -> Vec<String> {
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_string())
            .collect()
    };
    let prefix = |a: &[String], b: &[String]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    // With the default budget (12), shell/curl and shell/jq begin with the
    // same layers (the shell's), and shell/curl/jq too, within 12 layers.
    let curl = layers(get(&app, "/v2/shell/curl/manifests/latest").await);
    let jq = layers(get(&app, "/v2/shell/jq/manifests/latest").await);
    let both = layers(get(&app, "/v2/shell/curl/jq/manifests/latest").await);
    assert!(curl.len() <= 12 && jq.len() <= 12 && both.len() <= 12);
    assert!(prefix(&curl, &jq) >= 10, "{curl:?}\n{jq:?}");
    assert!(prefix(&curl, &both) >= 10, "{curl:?}\n{both:?}");
    // Images without the shell still share the certificates and glibc.
    let a = layers(get(&app, "/v2/appA/manifests/latest").await);
    let b = layers(get(&app, "/v2/appB/manifests/latest").await);
    assert!(prefix(&a, &b) >= 2, "{a:?}\n{b:?}");
    // And layers found in the layer cache were not packed again.
    let m = String::from_utf8_lossy(&get(&app, "/metrics").await.body).into_owned();
    assert!(metric(&m, "nixery_layers_reused_total") >= 22.0);
}

#[tokio::test]
async fn closures_larger_than_the_budget_fit_it() {
    for budget in [2, 3, 5] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(dir.path());
        s.max_layers = budget;
        let app = nixery::app_state(&s).await.unwrap();
        for image in ["deep", "wide", "shell/curl/jq"] {
            let r = get(&app, &format!("/v2/{image}/manifests/latest")).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{}",
                String::from_utf8_lossy(&r.body)
            );
            let n = r.json()["layers"].as_array().unwrap().len();
            assert!(n <= budget, "{image}: {n} layers, budget {budget}");
            if image == "shell/curl/jq" {
                assert_eq!(n, budget, "{image} has more paths than layers");
            }
        }
    }
}

#[tokio::test]
async fn arm64_on_a_host_that_cannot_build_it_says_so() {
    // This machine's Nix does not build for aarch64-linux (no
    // extra-platforms) and has no substituter: the meta-package reached Nix
    // as the system (not as a package name), and the client is told plainly
    // that this registry cannot make such images. freshHello is a new
    // derivation at every evaluation, so no arm64 build of it can be in the
    // store already (tests/multiarch.rs builds arm64 images on this machine,
    // with emulation; without the arm64 root, the offline set says to make
    // it, as scripts/offline-root.sh does for CI).
    let dir = tempfile::tempdir().unwrap();
    let app = state(dir.path()).await;
    let r = get(&app, "/v2/arm64/freshHello/manifests/latest").await;
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
    let app = nixery::app_state(&s).await.unwrap();
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
    let app = nixery::app_state(&s).await.unwrap();
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
    let gz = get(&state(dir.path()).await, "/v2/hello/manifests/latest").await;
    assert_ne!(
        gz.header("docker-content-digest"),
        r.header("docker-content-digest")
    );
}

/// nix/offline-pkgs as a channel tarball `web/<name>`, with a file of `extra`
/// text if given; and the hash of its unpacked contents.
fn channel_tarball(web: &std::path::Path, name: &str, extra: Option<&str>) -> String {
    let default_nix = std::fs::read(offline_pkgs().join("default.nix")).unwrap();
    let host_json = std::fs::read(offline_pkgs().join("host.json")).unwrap();
    let mut files: Vec<(&str, &[u8])> =
        vec![("default.nix", &default_nix), ("host.json", &host_json)];
    if let Some(text) = extra {
        files.push(("CHANGES", text.as_bytes()));
    }
    common::files::channel_tarball(web, &format!("{name}.tar.gz"), &files)
}

#[tokio::test]
async fn a_pinned_channel_builds_its_contents_or_says_they_changed() {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web");
    let v1 = channel_tarball(&web, "v1", None);
    let v2 = channel_tarball(&web, "v2", Some("a later channel"));
    assert_ne!(v1, v2);
    let server = common::files::FileServer::start(web.clone());
    let url = server.url("v1.tar.gz");

    // Resolving the channel: the hash of its unpacked contents, as nix-hash says.
    let got = nixery::nix::resolve_tarball(&url).await.unwrap();
    assert_eq!(got.as_deref(), Some(v1.as_str()));
    // A channel URL that does not exist is no revision at all (not an error of ours).
    assert_eq!(
        nixery::nix::resolve_tarball(&server.url("no-such.tar.gz"))
            .await
            .unwrap(),
        None
    );
    // A server that is not there is a failure that names the URL, without credentials.
    let e = nixery::nix::resolve_tarball("http://user:secret@127.0.0.1:9/x.tar.gz")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("http://***@127.0.0.1:9/x.tar.gz"), "{e}");
    assert!(!e.contains("secret"), "{e}");

    // Pinned at that hash, the registry builds from the tarball.
    let mut s = settings(&dir.path().join("state"));
    s.source = nixery::nix::Source::PinnedChannel {
        url: url.clone(),
        sha256: v1.clone(),
    };
    let app = nixery::app_state(&s).await.unwrap();
    let r = get(&app, "/v2/hello/manifests/latest").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );

    // The URL now serves other contents (the channel moved on) and this
    // store has never held them under the pinned hash: Nix refuses, in words
    // the controller recognises as "re-resolve the channel".
    std::fs::copy(web.join("v2.tar.gz"), web.join("moved.tar.gz")).unwrap();
    let nix = nixery::nix::NixCli::new(&dir.path().join("state2"), offline_nix_options()).unwrap();
    use nixery::nix::Nix;
    let pinned = nixery::nix::Source::PinnedChannel {
        url: server.url("moved.tar.gz"),
        sha256: v1.clone(),
    };
    let e = nix
        .prepare(&pinned, "latest", &["hello".to_string()], "x86_64-linux")
        .await
        .err()
        .map(|e| e.to_string());
    // Nix may answer from the store path it already has under that hash
    // (the v1 contents, fetched above) without downloading at all; that is
    // still the pinned revision. Only a download can find a mismatch, so the
    // hash of v2 pinned on v1's URL must fail.
    if let Some(e) = &e {
        panic!("the pinned contents are in the store, yet: {e}");
    }
    let wrong = nixery::nix::Source::PinnedChannel {
        url: url.clone(),
        sha256: v2.clone(),
    };
    let e = nix
        .prepare(&wrong, "latest", &["hello".to_string()], "x86_64-linux")
        .await
        .err()
        .map(|e| e.to_string())
        .expect("a tarball whose contents are not the pinned ones is refused");
    assert!(nixery::nix::is_hash_mismatch(&e), "{e}");
}
