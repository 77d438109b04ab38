//! Helpers shared by the integration tests: settings for the offline package
//! set, in-process requests, and the real `nixery` binary as a child process.
#![allow(dead_code)]

pub mod apiserver;
pub mod cri;
pub mod files;
pub mod garage;
pub mod proxy;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use nixery::config::Settings;
use nixery::nix::Source;
use nixery::registry::AppState;
use tower::ServiceExt;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn offline_pkgs() -> PathBuf {
    repo_root().join("nix/offline-pkgs")
}

/// Offline: no binary cache is reachable here, so Nix must not try one.
pub fn offline_nix_options() -> Vec<(String, String)> {
    vec![("substituters".into(), String::new())]
}

pub fn settings(state_dir: &Path) -> Settings {
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: state_dir.to_path_buf(),
        source: Source::Path(offline_pkgs()),
        max_layers: 12,
        build_timeout: Duration::from_secs(300),
        max_builds: 2,
        max_queue: 64,
        cache_ttl: Duration::from_secs(3600),
        compression: nixery::oci::Compression::Gzip,
        popularity: None,
        signer: None,
        public_host: None,
        nix_options: offline_nix_options(),
        systems: vec![],
        limits: Default::default(),
        storage_limit: None,
        // Tests of eviction see it at once (the default spares images
        // pulled within the last minute).
        eviction_grace: Duration::ZERO,
        storage: Default::default(),
    }
}

/// A registry with the fake Nix (its store under `dir`), and that Nix, so a
/// test can count evaluations and builds.
pub async fn fake_state(
    dir: &Path,
) -> (
    nixery::registry::AppState,
    std::sync::Arc<nixery::nix::fake::FakeNix>,
) {
    let nix = std::sync::Arc::new(nixery::nix::fake::FakeNix::standard(&dir.join("fake")));
    let state = nixery::app_state_with(&settings(&dir.join("state")), nix.clone())
        .await
        .unwrap();
    (state, nix)
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// The registry error code of an error response.
    pub fn error_code(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "errors are JSON"
        );
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
    pub fn error_message(&self) -> String {
        self.json()["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub async fn request(
    state: &AppState,
    method: Method,
    uri: &str,
    headers: &[(&str, &str)],
) -> Resp {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = nixery::registry::router(state.clone())
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

pub async fn get(state: &AppState, uri: &str) -> Resp {
    request(state, Method::GET, uri, &[]).await
}

/// Reads a counter from the Prometheus text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

/// The `nixery` binary running as a child process; killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub state_dir: PathBuf,
}

impl Server {
    /// Starts `nixery serve` on a free loopback port with the offline set,
    /// plus `extra` arguments; waits until it listens.
    pub fn start(state_dir: &Path, extra: &[&str]) -> Server {
        Self::start_env(state_dir, extra, &[])
    }

    /// `start` with environment variables set for the child.
    pub fn start_env(state_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixery"));
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--nix-option")
            .arg("substituters=");
        if !extra.iter().any(|a| a.starts_with("--pkgs-")) {
            cmd.arg("--pkgs-path").arg(offline_pkgs());
        }
        cmd.args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning nixery");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("nixery exited before listening")
                .unwrap();
            if let Some(rest) = line.split("on http://").nth(1) {
                break rest.trim().to_string();
            }
        };
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            addr,
            state_dir: state_dir.to_path_buf(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a command, returning (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `git -C dir ARGS` as a fixed author, asserting success: its stdout.
pub fn git_in(dir: &Path, args: &[&str]) -> String {
    let (ok, out, err) = run(Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t"));
    assert!(ok, "git {args:?}: {err}");
    out
}

/// `run` with `input` on the command's standard input.
pub fn run_in(cmd: &mut Command, input: &[u8]) -> (bool, String, String) {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Says that (and why) a test skips, past cargo's capture of test output, so
/// a skip shows in every run, not only in failing ones.
pub fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {why}");
}

/// Whether a tool is installed; tests that need it skip, saying so, when not,
/// except under CI, where `.ci/run` installs every tool and a missing one fails.
pub fn have_tool(tool: &str, test: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("CI").is_ok() {
            panic!("{test}: {tool} is not installed, and CI must run this test");
        }
        skip(&format!(
            "{test}: {tool} is not installed (.ci/run installs it)"
        ));
    }
    ok
}

/// The largest layer descriptor of a manifest.
pub fn largest_layer(manifest: &serde_json::Value) -> serde_json::Value {
    manifest["layers"]
        .as_array()
        .expect("a manifest with layers")
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap())
        .expect("at least one layer")
        .clone()
}

/// The `latest` manifest of `image` on `server` (whichever kind it serves).
pub fn manifest_of(server: &Server, image: &str) -> serde_json::Value {
    let (code, body) = http_get(&server.url(&format!("/v2/{image}/manifests/latest")));
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// A blob of `image` on `server`, fetched with curl; its bytes match `digest`.
pub fn blob_of(server: &Server, image: &str, digest: &str) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-sf", &server.url(&format!("/v2/{image}/blobs/{digest}"))])
        .output()
        .expect("curl");
    assert!(out.status.success(), "fetching {digest} failed");
    assert_eq!(nixery::name::Digest::of(&out.stdout).as_str(), digest);
    out.stdout
}

/// The gzip members of the largest layer of `image` (served gzip) on
/// `server`, each decoded on its own: what a client that reads only the first
/// member (Rust's `flate2::read::GzDecoder`) would miss, and a check that the
/// layer a real client pulled was packed in parallel blocks.
pub fn gzip_members_of_largest_layer(server: &Server, image: &str) -> usize {
    let manifest = manifest_of(server, image);
    let digest = largest_layer(&manifest)["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = blob_of(server, image, &digest);
    let mut rest = blob.as_slice();
    let mut members = 0;
    while !rest.is_empty() {
        let mut d = flate2::bufread::GzDecoder::new(rest);
        std::io::copy(&mut d, &mut std::io::sink())
            .unwrap_or_else(|e| panic!("member {members} of {digest}: {e}"));
        rest = d.into_inner();
        members += 1;
    }
    members
}

/// Every blob file's name equals the sha256 of its content, and there are at
/// least `at_least` of them (so the check cannot pass having checked none).
pub fn assert_blobs_verify(state_dir: &Path, at_least: usize) -> usize {
    let dir = state_dir.join("blobs/sha256");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        let bytes = std::fs::read(e.path()).unwrap();
        let d = nixery::name::Digest::of(&bytes);
        assert_eq!(
            d.hex(),
            e.file_name().to_string_lossy(),
            "blob {} does not match its digest",
            e.path().display()
        );
        n += 1;
    }
    assert!(
        n >= at_least,
        "{n} blobs checked in {}, expected at least {at_least}",
        dir.display()
    );
    n
}

/// Command lines of every process on the machine (from /proc, so no `ps`
/// is needed), joined with spaces.
pub fn command_lines() -> Vec<String> {
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

pub fn slow_builder_running() -> bool {
    command_lines()
        .iter()
        .any(|l| l.contains("slow: sleeping") || l == "sleep 20")
}

/// GET with curl: (status, body).
pub fn http_get(url: &str) -> (u16, String) {
    http_get_accept(url, "*/*")
}

/// GET with curl and an Accept header: (status, body).
pub fn http_get_accept(url: &str, accept: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "-H",
            &format!("Accept: {accept}"),
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            url,
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Docker's own containerd socket, or a standalone one's. None (said, as a
/// skip of `what`) when there is none, except under CI, where `.ci/run`
/// starts one and a missing socket fails the test.
pub fn containerd_socket(what: &str) -> Option<&'static str> {
    let found = [
        "/run/docker/containerd/containerd.sock",
        "/run/containerd/containerd.sock",
    ]
    .into_iter()
    .find(|s| Path::new(s).exists());
    if found.is_none() {
        if std::env::var("CI").is_ok() {
            panic!("{what}: no containerd socket, and .ci/run starts one");
        }
        skip(&format!(
            "{what}: no containerd socket on this machine (.ci/run starts one)"
        ));
    }
    found
}

/// Whether this machine can build and run aarch64: the arm64 offline root
/// and an enabled qemu-aarch64 binfmt handler. Under CI, which makes both
/// (.ci/run), their absence fails the test.
pub fn can_emulate(test: &str) -> bool {
    let roots = std::env::var("NIXERY_OFFLINE_ROOTS")
        .unwrap_or_else(|_| "/var/cache/nixery-offline".into());
    let root = std::path::Path::new(&roots).join("aarch64-linux/host.json");
    let binfmt = std::fs::read_to_string("/proc/sys/fs/binfmt_misc/qemu-aarch64")
        .is_ok_and(|s| s.starts_with("enabled"));
    if root.exists() && binfmt {
        return true;
    }
    let why = format!(
        "{test}: no arm64 offline root ({}) or no qemu-aarch64 binfmt handler ({binfmt}); scripts/offline-root.sh makes both",
        root.display()
    );
    if std::env::var("CI").is_ok() {
        panic!("{why}, and CI must run this test");
    }
    skip(&why);
    false
}
