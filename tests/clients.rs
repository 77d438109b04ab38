//! The built `nixery` binary against real clients (skopeo, umoci, docker),
//! real Nix, real package sources (a path, a git repository, a tarball), and
//! real failures (a kill mid-build, a full disk).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn skopeo_copy_then_umoci_unpack_runs_hello() {
    if !have_tool("skopeo", "skopeo_copy_then_umoci_unpack_runs_hello")
        || !have_tool("umoci", "skopeo_copy_then_umoci_unpack_runs_hello")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("state"), &[]);
    let layout = dir.path().join("layout");
    let (ok, _, err) = run(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/shell/hello:latest", server.addr),
        &format!("oci:{}:latest", layout.display()),
    ]));
    assert!(ok, "skopeo copy failed: {err}");
    let bundle = dir.path().join("bundle");
    let (ok, _, err) = run(Command::new("umoci").args([
        "unpack",
        "--image",
        &format!("{}:latest", layout.display()),
        bundle.to_str().unwrap(),
    ]));
    assert!(ok, "umoci unpack failed: {err}");
    let rootfs = bundle.join("rootfs");
    assert!(rootfs.join("tmp").is_dir());
    let (ok, out, err) = run(Command::new("chroot").arg(&rootfs).args(["/bin/hello"]));
    assert!(ok, "hello failed in the unpacked image: {err}");
    assert_eq!(out.trim(), "Hello, world!");
    // The image's config from umoci's view: PATH and a shell Cmd.
    let (ok, out, _) = run(Command::new("chroot").arg(&rootfs).args([
        "/bin/bash",
        "-c",
        "echo $0; /usr/bin/env true && echo env-ok",
    ]));
    assert!(ok && out.contains("env-ok"), "{out}");
    // Its largest layer (glibc's, over 1 MiB) is several gzip members, one
    // per 1 MiB block: what skopeo and umoci read above is all of them.
    let members = gzip_members_of_largest_layer(&server, "shell/hello");
    assert!(members > 1, "{members} gzip member(s)");
}

#[test]
fn docker_pull_and_run() {
    if !have_tool("docker", "docker_pull_and_run") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("state"), &[]);
    let hello = format!("{}/shell/hello", server.addr);
    let curl = format!("{}/shell/curl", server.addr);
    let (ok, _, err) = run(Command::new("docker").args(["pull", "-q", &hello]));
    assert!(ok, "docker pull failed: {err}");
    let (ok, out, err) = run(Command::new("docker").args(["run", "--rm", &hello, "hello"]));
    assert!(ok, "docker run hello failed: {err}");
    assert_eq!(out.trim(), "Hello, world!");
    let (ok, out, err) =
        run(Command::new("docker").args(["run", "--rm", &curl, "curl", "--version"]));
    assert!(ok, "docker run curl failed: {err}");
    assert!(out.starts_with("curl "), "{out}");
    // Docker read every gzip member of every layer (one per 1 MiB block).
    let members = gzip_members_of_largest_layer(&server, "shell/curl");
    assert!(members > 1, "{members} gzip member(s)");
    // The default Cmd is the shell, and /tmp is writable by anyone.
    let (ok, out, err) = run(Command::new("docker").args([
        "run",
        "--rm",
        "--user",
        "65534",
        &hello,
        "bash",
        "-c",
        "touch /tmp/x && echo ok",
    ]));
    assert!(ok && out.trim() == "ok", "{out} {err}");
    // `shell` is Nixery's: bashInteractive, coreutils, moreutils and nano.
    let (ok, out, err) = run(Command::new("docker").args([
        "run",
        "--rm",
        &hello,
        "bash",
        "-c",
        "echo sponged | sponge /tmp/s && cat /tmp/s && nano --version | head -1",
    ]));
    assert!(ok, "{out} {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "sponged", "{out}");
    assert!(lines[1].contains("nano"), "{out}");
    // A camelCase package by its lowercase name, as Docker requires.
    let bash_jq = format!("{}/bashinteractive/jq", server.addr);
    let (ok, _, err) = run(Command::new("docker").args(["pull", "-q", &bash_jq]));
    assert!(ok, "docker pull {bash_jq} failed: {err}");
    let (ok, out, err) = run(Command::new("docker").args([
        "run",
        "--rm",
        &bash_jq,
        "bash",
        "-c",
        "echo '{\"by\":\"nix\"}' | jq -r .by",
    ]));
    assert!(ok, "docker run {bash_jq} failed: {err}");
    assert_eq!(out.trim(), "nix");
    // A package that does not build: docker pull tells the user why.
    let broken = format!("{}/broken", server.addr);
    let (ok, _, err) = run(Command::new("docker").args(["pull", &broken]));
    assert!(!ok);
    assert!(
        err.contains("building the image failed: building the packages failed"),
        "{err}"
    );
    let _ = run(Command::new("docker").args(["rmi", "-f", &hello, &curl, &bash_jq]));
}

/// Reads from a connection until it closes (or `within` passes); what it got.
fn read_until_closed(s: &mut std::net::TcpStream, within: Duration) -> Option<String> {
    use std::io::Read;
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&got).into_owned())
            }
            Err(_) => return None, // still open after `within`
        }
    }
}

#[test]
fn slow_and_idle_clients_are_closed_and_connections_are_capped() {
    use std::io::Write;
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &dir.path().join("state"),
        &["--header-timeout", "1", "--max-connections", "4"],
    );
    // Headers that never end: closed after the header timeout.
    let mut slow = TcpStream::connect(&server.addr).unwrap();
    slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").unwrap();
    let got = read_until_closed(&mut slow, Duration::from_secs(10));
    assert!(
        got.is_some(),
        "a client that never finished its headers was kept"
    );
    // A kept-alive connection that goes quiet: closed too, after its answer.
    let mut idle = TcpStream::connect(&server.addr).unwrap();
    idle.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_until_closed(&mut idle, Duration::from_secs(10)).expect("closed when idle");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    // Four connections that send nothing hold every slot: the fifth is told
    // so at once, with the registry's error JSON and Retry-After.
    let held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(&server.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fifth = TcpStream::connect(&server.addr).unwrap();
    let got = read_until_closed(&mut fifth, Duration::from_secs(5)).expect("refused and closed");
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
    assert!(
        got.contains("retry-after: 1") && got.contains("\"UNAVAILABLE\""),
        "{got}"
    );
    // Once the idle ones time out, everyone is served again.
    std::thread::sleep(Duration::from_secs(2));
    drop(held);
    let (code, _) = http_get(&server.url("/v2/"));
    assert_eq!(code, 200);
    let (_, metrics) = http_get(&server.url("/metrics"));
    assert!(metric(&metrics, "nixery_connections_refused_total") >= 1.0);
}

#[test]
fn nix_dies_with_a_killed_server() {
    // The server is SIGKILLed while Nix builds: Nix and its builder must not
    // go on, orphaned (Nix gets SIGTERM when its parent dies).
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("state"), &[]);
    let url = server.url("/v2/slow/manifests/latest");
    let req = std::thread::spawn(move || http_get(&url));
    let started = Instant::now();
    while !slow_builder_running() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the slow builder never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.kill();
    let _ = req.join();
    let killed = Instant::now();
    while slow_builder_running() {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "the builder outlived its server:\n{}",
            command_lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn killed_during_a_build_then_restarted_serves_only_whole_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut server = Server::start(&state, &[]);
    let url = server.url("/v2/big/manifests/latest");
    let req = std::thread::spawn(move || http_get(&url));
    // Wait until a temporary blob is being written (the 64 MiB layer), then kill.
    let tmp = state.join("tmp");
    let started = Instant::now();
    let mut seen_partial = false;
    while started.elapsed() < Duration::from_secs(120) {
        let partial = std::fs::read_dir(&tmp)
            .map(|d| {
                d.flatten()
                    .any(|e| e.metadata().map(|m| m.len() > 1 << 20).unwrap_or(false))
            })
            .unwrap_or(false);
        if partial {
            seen_partial = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(seen_partial, "never saw the big layer being written");
    server.kill();
    let _ = req.join();
    assert!(
        std::fs::read_dir(&tmp).unwrap().count() > 0,
        "the kill left a partial temporary file behind"
    );
    // Possibly none yet (the kill may come before any layer was stored):
    // whatever is stored is whole.
    assert_blobs_verify(&state, 0);

    // Restart on the same state: temporaries are gone, the image builds and
    // every blob it serves is whole.
    let server = Server::start(&state, &[]);
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "temporaries were not cleaned on start"
    );
    let manifest = manifest_of(&server, "big");
    for layer in manifest["layers"].as_array().unwrap() {
        // Served whole: the bytes match the digest.
        blob_of(&server, "big", layer["digest"].as_str().unwrap());
    }
    // The layers, the config and both manifests, at least.
    assert_blobs_verify(&state, manifest["layers"].as_array().unwrap().len() + 3);
}

/// A git repository holding the offline package set, with a branch and a tag.
fn git_repo(root: &Path) -> (String, String) {
    let repo = root.join("pkgs-repo");
    std::fs::create_dir_all(&repo).unwrap();
    for f in ["default.nix", "host.json"] {
        std::fs::copy(offline_pkgs().join(f), repo.join(f)).unwrap();
    }
    let git = |args: &[&str]| git_in(&repo, args);
    git(&["init", "-q", "-b", "main"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "offline package set"]);
    let commit = git(&["rev-parse", "HEAD"]).trim().to_string();
    (format!("file://{}", repo.display()), commit)
}

#[test]
fn git_package_source_tags_name_revisions() {
    if !have_tool("git", "git_package_source_tags_name_revisions") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (url, commit) = git_repo(dir.path());
    // A zero TTL: a branch can move, so it is evaluated again on every pull;
    // a commit cannot, so it is built once.
    let server = Server::start(
        &dir.path().join("state"),
        &["--pkgs-repo", &url, "--cache-ttl", "0"],
    );
    let (code, by_branch) = http_get(&server.url("/v2/hello/manifests/main"));
    assert_eq!(code, 200, "{by_branch}");
    let (code, by_commit) = http_get(&server.url(&format!("/v2/hello/manifests/{commit}")));
    assert_eq!(code, 200, "{by_commit}");
    // Same revision, same packages: the same image.
    assert_eq!(by_branch, by_commit);
    let builds = || metric(&http_get(&server.url("/metrics")).1, "nixery_builds_total");
    assert_eq!(builds(), 2.0);
    assert_eq!(
        http_get(&server.url(&format!("/v2/hello/manifests/{commit}"))).1,
        by_commit
    );
    assert_eq!(builds(), 2.0, "a commit is immutable: served from cache");
    assert_eq!(
        http_get(&server.url("/v2/hello/manifests/main")).1,
        by_branch
    );
    assert_eq!(builds(), 3.0, "a branch can move: evaluated again");
    // Revisions that do not exist: 404 naming the revision, never a server path.
    let repo_path = url.trim_start_matches("file://");
    for rev in ["no-such-branch", "0123456789abcdef0123456789abcdef01234567"] {
        let (code, body) = http_get(&server.url(&format!("/v2/hello/manifests/{rev}")));
        assert_eq!(code, 404, "{body}");
        assert!(body.contains("MANIFEST_UNKNOWN"), "{body}");
        assert!(
            body.contains(&format!("revision '{rev}' does not exist")),
            "{body}"
        );
        assert!(!body.contains(repo_path), "a server path leaked: {body}");
    }
    // The server's log names no credentials of a repository URL either
    // (tested in nix::tests::credentials_in_urls_are_redacted).
}

#[test]
fn channel_package_source_from_a_tarball() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("nixpkgs-offline");
    std::fs::create_dir_all(&src).unwrap();
    for f in ["default.nix", "host.json"] {
        std::fs::copy(offline_pkgs().join(f), src.join(f)).unwrap();
    }
    let tarball = dir.path().join("channel.tar.gz");
    let (ok, _, err) = run(Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .arg("-czf")
        .arg(&tarball)
        .arg("nixpkgs-offline"));
    assert!(ok, "{err}");
    let server = Server::start(
        &dir.path().join("state"),
        &["--pkgs-channel", &format!("file://{}", tarball.display())],
    );
    let (code, body) = http_get(&server.url("/v2/jq/manifests/latest"));
    assert_eq!(code, 200, "{body}");
    let (code, _) = http_get(&server.url("/v2/jq/manifests/v2"));
    assert_eq!(code, 404);
}

/// `nixery build IMAGE` on the offline package set, stderr not a TTY.
fn nixery_build(state_dir: &Path, image: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nixery"))
        .arg("build")
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--nix-option", "substituters=", "--pkgs-path"])
        .arg(offline_pkgs())
        .arg(image)
        .output()
        .unwrap()
}

#[test]
fn nixery_build_prints_reference_and_progress() {
    let dir = tempfile::tempdir().unwrap();
    let out = nixery_build(dir.path(), "jq/shell");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Reference with digest on stdout; plain progress lines on a non-TTY stderr.
    assert!(
        stdout
            .trim()
            .starts_with("127.0.0.1:5000/jq/shell:latest@sha256:"),
        "{stdout}"
    );
    for stage in ["evaluating", "building", "built jq/shell"] {
        assert!(
            stderr.contains(stage),
            "no '{stage}' in progress:\n{stderr}"
        );
    }
    // Packing progress is sampled from the build's state stream; it ends
    // with every layer packed.
    let packing: Vec<(u32, u32)> = stderr
        .lines()
        .filter_map(|l| l.split("packing layers ").nth(1))
        .filter_map(|p| p.trim().split_once('/'))
        .map(|(n, m)| (n.parse().unwrap(), m.parse().unwrap()))
        .collect();
    let &(done, total) = packing
        .last()
        .unwrap_or_else(|| panic!("no packing progress:\n{stderr}"));
    assert!(total > 1 && done == total, "{packing:?}");
    assert!(packing.windows(2).all(|w| w[0].0 < w[1].0), "{packing:?}");
    // A bad package name is an error that names it, with a non-zero exit.
    let out = nixery_build(dir.path(), "nosuchthing");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown packages: nosuchthing"));
}

/// A small tmpfs mounted at `dir` (a disk that fills), unmounted on drop;
/// None (the test skips, saying so) where mounting is not allowed, except
/// under CI, which runs as root.
fn tmpfs(dir: &Path, size: &str, test: &str) -> Option<Unmount> {
    std::fs::create_dir_all(dir).unwrap();
    let (ok, _, err) = run(Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir));
    if !ok {
        if std::env::var("CI").is_ok() {
            panic!("{test}: mounting a tmpfs failed under CI: {err}");
        }
        skip(&format!("{test}: cannot mount a tmpfs here ({err})"));
        return None;
    }
    Some(Unmount(dir.to_path_buf()))
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_is_a_clear_error_and_leaves_no_partial_blob() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let Some(_unmount) = tmpfs(
        &state,
        "2m",
        "full_disk_is_a_clear_error_and_leaves_no_partial_blob",
    ) else {
        return;
    };
    let server = Server::start(&state, &[]);
    let (code, body) = http_get(&server.url("/v2/shell/curl/manifests/latest"));
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("No space left on device"), "{body}");
    assert!(
        !body.contains(state.to_str().unwrap()),
        "the error leaks a server path: {body}"
    );
    assert_eq!(
        std::fs::read_dir(state.join("tmp")).unwrap().count(),
        0,
        "a partial blob was left behind"
    );
    // The disk filled before the image was whole: what did fit is whole.
    assert_blobs_verify(&state, 0);
    // The failure is not cached: a retry builds again and fails the same way,
    // and the server stays healthy.
    let (code, body) = http_get(&server.url("/v2/shell/curl/manifests/latest"));
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("No space left on device"), "{body}");
    let (_, metrics) = http_get(&server.url("/metrics"));
    assert_eq!(metric(&metrics, "nixery_builds_total"), 2.0);
    assert_eq!(http_get(&server.url("/healthz")).0, 200);
}

#[test]
fn containerd_pull_and_run() {
    if !have_tool("ctr", "containerd_pull_and_run") {
        return;
    }
    let Some(socket) = containerd_socket("containerd_pull_and_run") else {
        return;
    };
    let ns = format!("nixery-test-{}", std::process::id());
    let ctr = |args: &[&str]| {
        run(Command::new("ctr")
            .args(["-a", socket, "-n", &ns])
            .args(args))
    };
    // gzip layers, zstd layers, which containerd reads too, and plain tar.
    for compression in ["gzip", "zstd", "none"] {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(
            &dir.path().join("state"),
            &["--layer-compression", compression],
        );
        let image = format!("{}/shell/hello:latest", server.addr);
        // containerd resolves the tag with HEAD, then fetches the manifest by digest.
        let (ok, _, err) = ctr(&["images", "pull", "--plain-http", &image]);
        assert!(ok, "ctr pull ({compression}) failed: {err}");
        let (_, metrics) = http_get(&server.url("/metrics"));
        let requests = |method: &str| {
            metric(
                &metrics,
                &format!(
                    "nixery_http_requests_total{{route=\"manifest\",method=\"{method}\",status=\"200\"}}"
                ),
            )
        };
        assert!(
            requests("HEAD") >= 1.0,
            "ctr resolved without HEAD:\n{metrics}"
        );
        // (The GET by digest that follows may be skipped: containerd's
        // content store keeps manifests by digest across runs.)
        let container = format!("hello-{compression}-{}", std::process::id());
        let (ok, mut out, err) = ctr(&["run", "--rm", &image, &container, "hello"]);
        assert!(ok, "ctr run ({compression}) failed: {err}");
        // ctr attaches its output FIFOs around the task's start: on a loaded
        // machine the output of a process that exits at once can be lost.
        // Only then, run it once more (the run itself succeeded).
        if out.trim().is_empty() {
            let (ok, again, err) = ctr(&["run", "--rm", &image, &container, "hello"]);
            assert!(ok, "ctr run ({compression}) failed the second time: {err}");
            out = again;
        }
        // --sync: content and snapshots go now, not at containerd's next GC,
        // so the namespace can be removed.
        let _ = ctr(&["images", "rm", "--sync", &image]);
        assert_eq!(
            out.trim(),
            "Hello, world!",
            "ctr run ({compression}): {err}"
        );
        if compression == "gzip" {
            // containerd read every gzip member (one per 1 MiB block).
            let members = gzip_members_of_largest_layer(&server, "shell/hello");
            assert!(members > 1, "{members} gzip member(s)");
        }
    }
    let (ok, _, err) = run(Command::new("ctr").args(["-a", socket, "namespaces", "rm", &ns]));
    assert!(ok, "the test's containerd namespace is left behind: {err}");
}

/// `--layer-compression none`: Docker pulls plain-tar layers (schema2
/// `rootfs.diff.tar`) and runs the image; the blobs are tar files whose
/// digests are the config's diff IDs.
#[test]
fn docker_pulls_uncompressed_layers() {
    if !have_tool("docker", "docker_pulls_uncompressed_layers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("state"), &["--layer-compression", "none"]);
    let (code, body) = http_get_accept(
        &server.url("/v2/shell/hello/manifests/latest"),
        "application/vnd.docker.distribution.manifest.v2+json",
    );
    assert_eq!(code, 200, "{body}");
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    let layers = m["layers"].as_array().unwrap();
    assert!(layers
        .iter()
        .all(|l| l["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar"));
    let (_, config) = http_get(&server.url(&format!(
        "/v2/shell/hello/blobs/{}",
        m["config"]["digest"].as_str().unwrap()
    )));
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    let diff_ids: Vec<&str> = config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    let digests: Vec<&str> = layers
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests, diff_ids);

    let hello = format!("{}/shell/hello", server.addr);
    let (ok, _, err) = run(Command::new("docker").args(["pull", "-q", &hello]));
    assert!(ok, "docker pull of plain-tar layers failed: {err}");
    let (ok, out, err) = run(Command::new("docker").args(["run", "--rm", &hello, "hello"]));
    let _ = run(Command::new("docker").args(["rmi", "-f", &hello]));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "Hello, world!");
}

#[test]
fn starting_on_a_full_disk_serves_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let Some(_unmount) = tmpfs(
        &state,
        "8m",
        "starting_on_a_full_disk_serves_what_is_stored",
    ) else {
        return;
    };
    let mut server = Server::start(&state, &[]);
    let (code, manifest) = http_get(&server.url("/v2/hello/manifests/latest"));
    assert_eq!(code, 200, "{manifest}");
    server.kill();
    // Fill the disk to the last byte.
    let _ = run(Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", state.join("filler").display())));
    assert_eq!(nixery::store::free_bytes(&state), Some(0));
    // A new process starts, and serves what is stored: manifest and blobs.
    let server = Server::start(&state, &[]);
    let (code, again) = http_get(&server.url("/v2/hello/manifests/latest"));
    assert_eq!((code, &again), (200, &manifest));
    let v: serde_json::Value = serde_json::from_str(&again).unwrap();
    for layer in v["layers"].as_array().unwrap() {
        let (code, _) = http_get(&server.url(&format!(
            "/v2/hello/blobs/{}",
            layer["digest"].as_str().unwrap()
        )));
        assert_eq!(code, 200);
    }
    // What needs writing fails clearly, and the server stays up.
    let (code, body) = http_get(&server.url("/v2/jq/manifests/latest"));
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("No space left on device"), "{body}");
    assert_eq!(http_get(&server.url("/healthz")).0, 200);
}

#[test]
fn nixery_build_without_network_says_what_to_pass() {
    // A channel that cannot be fetched (no network here, as on many a first
    // try): one sentence saying what to pass instead, no backtrace, exit 1.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .args(["build", "--state-dir"])
        .arg(dir.path())
        .args([
            "--pkgs-channel",
            "http://127.0.0.1:9/nixexprs.tar.xz",
            "hello",
        ])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(last.starts_with("nixery: the package source"), "{stderr}");
    assert!(last.contains("--pkgs-path nix/offline-pkgs"), "{stderr}");
    assert!(!stderr.contains("stack backtrace"), "{stderr}");
}

/// Resident and peak memory of a process, in KiB (VmRSS, VmHWM).
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[test]
fn a_blob_file_cut_by_hand_while_it_is_sent_ends_that_download_only() {
    // Blobs are sent from a mapping of their file. Nothing of ours ever
    // shortens one, but a hand might: that download must end short (the
    // client sees fewer bytes than Content-Length), and the server live on.
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let server = Server::start(&state, &[]);
    let (code, body) = http_get(&server.url("/v2/big/manifests/latest"));
    assert_eq!(code, 200, "{body}");
    let manifest: serde_json::Value = serde_json::from_str(&body).unwrap();
    let layer = largest_layer(&manifest);
    let digest = layer["digest"].as_str().unwrap().to_string();
    let size = layer["size"].as_u64().unwrap();
    let mut c = std::net::TcpStream::connect(&server.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        c,
        "GET /v2/big/blobs/{digest} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.addr
    )
    .unwrap();
    let mut first = vec![0u8; 64 << 10];
    let n = c.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    // The client has read little; most of the blob is still to be sent.
    let file = state
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest); // ends early, by a close or a reset
    let got = (n + rest.len()) as u64;
    assert!(got < size, "got {got} of {size} bytes from a cut file");
    // The server lives, and serves everything else.
    assert_eq!(http_get(&server.url("/healthz")).0, 200);
    let (code, _) = http_get(&server.url(&format!(
        "/v2/big/blobs/{}",
        manifest["config"]["digest"].as_str().unwrap()
    )));
    assert_eq!(code, 200);
}

#[test]
fn a_thousand_stalled_downloads_of_a_big_blob_stay_under_200_mib() {
    use std::io::{Read, Write};
    const CLIENTS: usize = 1000;
    // Two sockets per download (both ends are on this machine), plus slack.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct only.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let want = (3 * CLIENTS + 512) as libc::rlim_t;
    if lim.rlim_max < want {
        skip(&format!(
            "a_thousand_stalled_downloads: the open-file limit is {}, this needs {want}",
            lim.rlim_max
        ));
        return;
    }
    lim.rlim_cur = lim.rlim_cur.max(want);
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("state"), &["--max-connections", "4000"]);
    let (code, body) = http_get(&server.url("/v2/big/manifests/latest"));
    assert_eq!(code, 200, "{body}");
    let manifest: serde_json::Value = serde_json::from_str(&body).unwrap();
    let layer = largest_layer(&manifest);
    let size = layer["size"].as_u64().unwrap();
    assert!(size > 60 << 20, "the big layer is {size} bytes");
    let request = format!(
        "GET /v2/big/blobs/{} HTTP/1.1\r\nHost: {}\r\n\r\n",
        layer["digest"].as_str().unwrap(),
        server.addr
    );
    let (before, _) = memory_kib(server.child.id());
    // A thousand clients start the download, read its first bytes, and stall:
    // the server has each response under way and cannot finish any.
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let mut c = std::net::TcpStream::connect(&server.addr).unwrap();
        c.write_all(request.as_bytes()).unwrap();
        clients.push(c);
    }
    for c in &mut clients {
        let mut first = [0u8; 1024];
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let n = c.read(&mut first).unwrap();
        assert!(
            String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&first[..n])
        );
    }
    // Let every response fill its socket buffers, then measure.
    std::thread::sleep(Duration::from_secs(2));
    let (rss, peak) = memory_kib(server.child.id());
    let threads = std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Threads:"))
        .unwrap_or("")
        .to_string();
    // The server still answers others meanwhile.
    assert_eq!(http_get(&server.url("/healthz")).0, 200);
    drop(clients);
    eprintln!(
        "{CLIENTS} stalled downloads: RSS {} MiB (before them {} MiB), peak {} MiB, {threads}",
        rss / 1024,
        before / 1024,
        peak / 1024
    );
    assert!(
        peak < 200 * 1024,
        "{CLIENTS} stalled downloads of a {size}-byte blob: peak RSS {} MiB (now {} MiB)",
        peak / 1024,
        rss / 1024
    );
}

/// What a tar entry is: its kind, size, link target and (for a regular
/// file) the sha256 of its bytes.
type TarEntry = (u8, u64, String, String);

/// The entries of a tar stream by path (no leading `./` or trailing `/`).
fn tar_files(r: impl std::io::Read) -> std::collections::BTreeMap<String, TarEntry> {
    let mut files = std::collections::BTreeMap::new();
    for e in tar::Archive::new(r).entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let path = path
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (kind, size) = (
            e.header().entry_type().as_byte(),
            e.header().size().unwrap(),
        );
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut bytes).unwrap();
        let digest = nixery::name::Digest::of(&bytes).to_string();
        files.insert(path, (kind, size, link, digest));
    }
    files
}

/// podman (containers/image, Go's gzip reader) pulls the image, and the
/// container's filesystem holds every file of every layer, all gzip members
/// read. (`podman run` cannot start containers on this machine: its runtime
/// may not set rlimits here; `podman create` and `export` need no runtime.)
#[test]
fn podman_pull_reads_every_file_of_every_layer() {
    if !have_tool("podman", "podman_pull_reads_every_file_of_every_layer") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("state"), &[]);
    // A storage of its own (vfs: plain directories, no mounts), removed with
    // the test's directory: the machine's podman storage is not touched.
    let storage = dir.path().join("podman");
    let podman = |args: &[&str]| {
        run(Command::new("podman")
            .arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args))
    };
    let image = format!("{}/shell/curl:latest", server.addr);
    let (ok, _, err) = podman(&["pull", "-q", "--tls-verify=false", &image]);
    assert!(ok, "podman pull failed: {err}");
    let (ok, container, err) = podman(&["create", &image, "true"]);
    assert!(ok, "podman create failed: {err}");
    let container = container.trim().to_string();
    let export = dir.path().join("rootfs.tar");
    let (ok, _, err) = podman(&["export", "-o", export.to_str().unwrap(), &container]);
    assert!(ok, "podman export failed: {err}");
    let exported = tar_files(std::fs::File::open(&export).unwrap());
    // Every entry of every layer, as the registry serves it.
    let manifest = manifest_of(&server, "shell/curl");
    let mut checked = 0;
    for layer in manifest["layers"].as_array().unwrap() {
        let blob = blob_of(&server, "shell/curl", layer["digest"].as_str().unwrap());
        let files = tar_files(flate2::read::MultiGzDecoder::new(blob.as_slice()));
        for (path, entry) in files {
            // Directories podman makes itself (/tmp, /etc) may differ in mode;
            // files and links must be as packed, byte for byte.
            let got = exported.get(&path);
            if entry.0 == b'5' {
                assert!(got.is_some(), "{path} missing");
                continue;
            }
            assert!(got == Some(&entry), "{path}: {entry:?} exported as {got:?}");
            checked += 1;
        }
    }
    assert!(
        exported.keys().any(|p| p.ends_with("/bin/curl")),
        "no curl in the container"
    );
    assert!(checked > 100, "only {checked} files checked");
    let _ = podman(&["rm", "-f", &container]);
    let _ = podman(&["rmi", "-f", &image]);
}
