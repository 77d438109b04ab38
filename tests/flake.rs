//! Flakes as package sources, with real Nix and local flakes: the example
//! flake (examples/flake/) in a git repository of its own, its nixpkgs input
//! pointed at the offline set. A NixImage from it is locked, built, followed
//! to a new commit and run; an ad-hoc registry serves it; what is wrong with
//! a flake reference is said as such.
//!
//! The offline set reads this machine's binaries (and `currentSystem`),
//! which a flake's pure evaluation forbids: these tests turn `pure-eval` off
//! for that reason alone (`--nix-option pure-eval=false`). Users' flakes are
//! evaluated pure, as `nix build` evaluates them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::apiserver::Server;
use common::apiserver::*;
use common::*;
use kube::runtime::controller::Action;
use nixery::nix::Source;
use serde_json::json;

/// One test of this file at a time. With two running together (two
/// processes building with the host's Nix at once), a build of the
/// example's program failed now and then with "builder ... failed due to
/// signal 9": perf showed the nix-store of that build killing its own
/// builder. It is Nix's, not nixery's: two plain `nix-store --realise` of
/// offline-set derivations at once do it too (8 of 12 pairs with Nix 2.8,
/// 1 of 12 with 2.26; docs/nix.md). nixery builds such a derivation again
/// (twice at most; tests/registry_http.rs), which made two of these tests
/// pass together 8 runs of 8; they still run one at a time, as a bounded
/// retry is not a certainty and this is not what they are about.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The Nix settings of these tests: the offline set's (no binary cache) and
/// pure evaluation off, which the offline set needs (see the top).
fn flake_nix_options() -> Vec<(String, String)> {
    let mut o = offline_nix_options();
    o.push(("pure-eval".into(), "false".into()));
    o
}

/// The example flake as a user has it: a git repository on branch `main`,
/// flake.lock committed.
struct FlakeRepo {
    dir: PathBuf,
}

impl FlakeRepo {
    /// `test` goes into the first commit's message: each test's flake has
    /// commits of its own (tests that run together never share a build).
    fn new(root: &Path, test: &str) -> FlakeRepo {
        let dir = root.join("hello-app");
        std::fs::create_dir_all(&dir).unwrap();
        let example = repo_root().join("examples/flake");
        let flake = std::fs::read_to_string(example.join("flake.nix")).unwrap();
        let nixpkgs = r#"inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";"#;
        assert!(
            flake.contains(nixpkgs),
            "examples/flake/flake.nix: its nixpkgs input changed"
        );
        let offline = format!(
            r#"inputs.nixpkgs.url = "path:{}";"#,
            offline_pkgs().display()
        );
        std::fs::write(dir.join("flake.nix"), flake.replace(nixpkgs, &offline)).unwrap();
        std::fs::copy(example.join("hello-app.sh"), dir.join("hello-app.sh")).unwrap();
        let repo = FlakeRepo { dir };
        repo.git(&["init", "-q", "-b", "main"]);
        // Nix sees the files git tracks only.
        repo.git(&["add", "-A"]);
        let (ok, _, err) = run(Command::new("nix")
            .args(["--extra-experimental-features", "nix-command flakes"])
            .args(["--option", "substituters", ""])
            .args(["flake", "lock"])
            .current_dir(&repo.dir));
        assert!(ok, "nix flake lock: {err}");
        repo.git(&["add", "-A"]);
        repo.git(&["commit", "-q", "-m", &format!("hello-app for {test}")]);
        repo
    }

    fn git(&self, args: &[&str]) -> String {
        git_in(&self.dir, args).trim().to_string()
    }

    /// The repository as a flake reference (`git+file://…`), unlocked.
    fn url(&self) -> String {
        format!("git+file://{}", self.dir.display())
    }

    /// A change to the program, committed: the new commit.
    fn change(&self, line: &str) -> String {
        let script = self.dir.join("hello-app.sh");
        let mut text = std::fs::read_to_string(&script).unwrap();
        text.push_str(&format!("echo {line:?}\n"));
        std::fs::write(&script, text).unwrap();
        self.git(&["commit", "-q", "-am", line]);
        self.head()
    }

    fn head(&self) -> String {
        self.git(&["rev-parse", "HEAD"])
    }
}

fn have_tools(test: &str) -> bool {
    have_tool("git", test) && have_tool("nix", test)
}

/// An agent with real Nix and the flake options, its state under
/// `root/<node>`, cache TTL 0 (every reconcile locks the flake again, writing
/// only when it moved), allowed the flakes under `root`.
async fn flake_agent(root: &Path, node: &str, host: &str) -> (nixery::registry::AppState, Agent) {
    let mut s = settings(&root.join(node));
    s.nix_options = flake_nix_options();
    s.cache_ttl = Duration::ZERO;
    let state = nixery::app_state(&s).await.unwrap();
    let allowed = Source::Flake {
        reference: format!("git+file://{}", root.display()),
    };
    let a = agent(node, host, &state, |c| c.allowed_sources = vec![allowed]);
    (state, a)
}

/// Serves `state` on a free loopback port; the address.
async fn serve(state: &nixery::registry::AppState) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(nixery::serve_on(
        listener,
        state.clone(),
        std::future::pending(),
    ));
    addr
}

/// `docker run` of an image (pulled first); its output.
async fn docker_run(image: String) -> String {
    tokio::task::spawn_blocking(move || {
        let (ok, out, err) =
            run(Command::new("docker").args(["run", "--rm", "--pull", "always", &image]));
        let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
        assert!(ok, "docker run {image}: {err}");
        out
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_niximage_of_a_flake_is_locked_built_followed_to_a_new_commit_and_run() {
    const TEST: &str = "a_niximage_of_a_flake_is_locked";
    if !have_tools(TEST) || !have_tool("docker", TEST) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let repo = FlakeRepo::new(dir.path(), TEST);
    let first = repo.head();
    let reference = format!("{}?ref=main", repo.url());
    // Two nodes, each with its own state, on one host's Nix.
    let (sa, mut a) = flake_agent(dir.path(), "node-a", "127.0.0.1:5000").await;
    let (_sb, mut b) = flake_agent(dir.path(), "node-b", "127.0.0.1:6000").await;
    let server = Server::new(niximage("curl-and-jq", 1, &["hello-app"], &[]));
    server.edit(|o| {
        o["spec"]["source"] = json!({ "flake": reference });
        o["spec"]["tag"] = json!("latest");
    });

    // The reference is locked once, into status, before anything is built:
    // its commit and the NAR hash of its tree.
    let (result, calls) = reconcile(&server, &mut a, 4).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(calls[0].manager(), "nixery.k8s.nixos.org-revision");
    assert_node_patch(&calls[1], "node-a", "Building");
    let status = server.object().status.unwrap();
    let revision = status.revision.clone().unwrap();
    assert!(revision.starts_with(&repo.url()), "{revision}");
    assert!(revision.contains(&format!("rev={first}")), "{revision}");
    assert!(revision.contains("narHash=sha256-"), "{revision}");
    assert_eq!(status.revision_of.as_deref(), Some(reference.as_str()));
    build_finished(&mut a).await;
    let (_, calls) = reconcile(&server, &mut a, 3).await;
    assert_node_patch(&calls[0], "node-a", "Ready");
    assert_eq!(
        calls[0].body["status"]["nodes"][0]["revision"],
        revision.as_str()
    );
    // The branch has not moved: looked at again, nothing written.
    let (_, calls) = reconcile(&server, &mut a, 0).await;
    assert!(calls.is_empty(), "{calls:#?}");

    // The other node builds the same locked tree, to the same digest.
    build_to_ready(&server, &mut b, ("1/2", "2/2")).await;
    let status = server.object().status.unwrap();
    assert_eq!(status.nodes[0].digest, status.nodes[1].digest);
    let first_digest = status.digest.clone().unwrap();

    // It runs: the program, at the locked commit.
    let addr = serve(&sa).await;
    let image = format!("{addr}/niximage/default/curl-and-jq:latest");
    let out = docker_run(image.clone()).await;
    assert_eq!(
        out.trim(),
        format!("Hello from hello-app at {}!", &first[..7])
    );

    // A push to the branch: after the TTL the new commit is locked, both
    // nodes build it, and they agree on a new digest.
    let second = repo.change("second commit");
    let (result, calls) = reconcile(&server, &mut a, 4).await;
    assert!(result.is_ok(), "{result:?}");
    let revision = calls[0].body["status"]["revision"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(revision.contains(&format!("rev={second}")), "{revision}");
    assert_node_patch(&calls[1], "node-a", "Building");
    build_finished(&mut a).await;
    let (_, calls) = reconcile(&server, &mut a, 3).await;
    assert_node_patch(&calls[0], "node-a", "Ready");
    // (The aggregate stays at 1/2 while node-b rebuilds: not written again.)
    let (_, calls) = reconcile(&server, &mut b, 2).await;
    assert_node_patch(&calls[0], "node-b", "Building");
    build_finished(&mut b).await;
    let (_, calls) = reconcile(&server, &mut b, 3).await;
    assert_node_patch(&calls[0], "node-b", "Ready");
    assert_aggregate_patch(&calls[1], "Ready", "2/2");
    let status = server.object().status.unwrap();
    assert_eq!(status.nodes[0].digest, status.nodes[1].digest);
    assert_ne!(status.digest.as_deref(), Some(first_digest.as_str()));
    let out = docker_run(image).await;
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            format!("Hello from hello-app at {}!", &second[..7]).as_str(),
            "second commit"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_wrong_with_a_flake_is_said_as_such() {
    const TEST: &str = "what_is_wrong_with_a_flake";
    if !have_tools(TEST) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let repo = FlakeRepo::new(dir.path(), TEST);
    let (state, mut a) = flake_agent(dir.path(), "node-a", "127.0.0.1:5000").await;
    let server = Server::new(niximage(
        "curl-and-jq",
        1,
        &["hello-app", "no-such-output"],
        &[],
    ));
    server.edit(|o| o["spec"]["source"] = json!({ "flake": repo.url() }));

    // An output the flake does not have: named.
    let (result, calls) = reconcile(&server, &mut a, 4).await;
    assert!(result.is_ok(), "{result:?}");
    assert_node_patch(&calls[1], "node-a", "Building");
    build_finished(&mut a).await;
    let (result, calls) = reconcile(&server, &mut a, 3).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_event(&calls[2], "UnknownPackages", "Warning");
    let message = server.object().status.unwrap().conditions[0]
        .message
        .clone();
    assert!(message.contains("no-such-output"), "{message}");
    assert!(!message.contains("hello-app"), "{message}");

    // A branch that does not exist.
    server.edit(|o| {
        o["metadata"]["generation"] = json!(2);
        o["spec"]["contents"] = json!(["hello-app"]);
        o["spec"]["source"] = json!({ "flake": format!("{}?ref=no-such-branch", repo.url()) });
    });
    let (result, calls) = reconcile(&server, &mut a, 3).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_event(&calls[2], "UnknownRevision", "Warning");
    let message = server.object().status.unwrap().conditions[0]
        .message
        .clone();
    assert!(message.contains("names nothing"), "{message}");

    // A flake outside the allowed prefix is refused before anything looks
    // at it: these do not even exist, and are refused, not found missing;
    // the last climbs out of the allowed directory with `..`.
    let before = metric(
        &String::from_utf8_lossy(&get(&state, "/metrics").await.body),
        "nixery_builds_total",
    );
    let climbing = format!("git+file://{}/../elsewhere/app", dir.path().display());
    for outside in [
        "git+file:///elsewhere/app",
        "github:acme/app",
        climbing.as_str(),
    ] {
        server.edit(|o| {
            let g = o["metadata"]["generation"].as_i64().unwrap();
            o["metadata"]["generation"] = json!(g + 1);
            o["spec"]["source"] = json!({ "flake": outside });
        });
        let (result, calls) = reconcile(&server, &mut a, 3).await;
        assert_eq!(result.unwrap(), Action::await_change());
        assert_event(&calls[2], "SourceNotAllowed", "Warning");
        let message = server.object().status.unwrap().conditions[0]
            .message
            .clone();
        assert!(message.contains(outside), "{message}");
    }
    let after = metric(
        &String::from_utf8_lossy(&get(&state, "/metrics").await.body),
        "nixery_builds_total",
    );
    assert_eq!(before, after, "nothing was built");

    // A flake with no flake.lock: Nix 2.8's getFlake must write one, and
    // cannot, so the user is told to lock it; later Nix locks it for the
    // evaluation only, where its inputs allow it (here, where evaluation is
    // impure for the offline set), and builds it.
    repo.git(&["rm", "-q", "flake.lock"]);
    repo.git(&["commit", "-q", "-m", "no lock"]);
    server.edit(|o| {
        o["metadata"]["generation"] = json!(9);
        o["spec"]["source"] = json!({ "flake": repo.url() });
    });
    let (result, _) = reconcile(&server, &mut a, 4).await;
    assert!(result.is_ok(), "{result:?}");
    build_finished(&mut a).await;
    let (_, _) = reconcile(&server, &mut a, 3).await;
    let status = server.object().status.unwrap();
    let (_, version, _) = run(Command::new("nix").arg("--version"));
    if version.trim().ends_with(" 2.8.0") {
        let message = &status.nodes[0].message;
        assert!(
            message
                .as_deref()
                .unwrap_or_default()
                .contains("run `nix flake lock` and commit flake.lock"),
            "{status:#?}"
        );
    } else {
        assert_eq!(status.nodes[0].phase, "Ready", "{version}: {status:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ad_hoc_registry_serves_a_flakes_outputs() {
    const TEST: &str = "an_ad_hoc_registry_serves_a_flakes_outputs";
    if !have_tools(TEST) || !have_tool("docker", TEST) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let repo = FlakeRepo::new(dir.path(), TEST);
    let state_dir = dir.path().join("state");
    // A `path:` flake (its directory as it is, git or not).
    let reference = format!("path:{}", repo.dir.display());
    let server = common::Server::start(
        &state_dir,
        &[
            "--pkgs-flake",
            &reference,
            "--nix-option",
            "pure-eval=false",
        ],
    );
    let out = docker_run(format!("{}/hello-app", server.addr)).await;
    assert!(out.starts_with("Hello from hello-app at "), "{out}");
    // nixpkgs' names through the flake's legacyPackages, and an output the
    // flake lacks, named in the registry's answer.
    let accept = "application/vnd.oci.image.manifest.v1+json";
    let url = server.url("/v2/shell/hello-app/manifests/latest");
    let (status, body) = tokio::task::spawn_blocking(move || http_get_accept(&url, accept))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let url = server.url("/v2/hello-app/nope/manifests/latest");
    let (status, body) = tokio::task::spawn_blocking(move || http_get_accept(&url, accept))
        .await
        .unwrap();
    assert_eq!(status, 404);
    assert!(body.contains("unknown packages: nope"), "{body}");

    // `nixery build` of a git flake: its SBOM names the locked commit and tree.
    let sbom = dir.path().join("sbom.json");
    let (ok, _, err) = run(Command::new(env!("CARGO_BIN_EXE_nixery"))
        .args(["build", "hello-app", "--pkgs-flake", &repo.url()])
        .args([
            "--nix-option",
            "substituters=",
            "--nix-option",
            "pure-eval=false",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("build"))
        .arg("--sbom")
        .arg(&sbom));
    assert!(ok, "nixery build: {err}");
    let bom: serde_json::Value = serde_json::from_slice(&std::fs::read(&sbom).unwrap()).unwrap();
    let source = bom["metadata"]["component"]["properties"][0]["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(source.contains(&format!("rev={}", repo.head())), "{source}");
    assert!(source.contains("narHash=sha256-"), "{source}");

    // A flake reference that names nothing.
    let (ok, _, err) = run(Command::new(env!("CARGO_BIN_EXE_nixery"))
        .args([
            "build",
            "hello-app",
            "--pkgs-flake",
            "path:/nonexistent/flake",
        ])
        .args(["--nix-option", "substituters="])
        .arg("--state-dir")
        .arg(dir.path().join("build")));
    assert!(!ok);
    assert!(
        err.contains("the flake 'path:/nonexistent/flake' names nothing"),
        "{err}"
    );
}

/// A user's flake is evaluated pure, as `nix build` evaluates it (nothing of
/// the host: no `currentSystem`, no environment), unless the operator says
/// otherwise; and nixery's own flake calls leave Nix's other settings alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_flake_is_evaluated_pure() {
    const TEST: &str = "a_users_flake_is_evaluated_pure";
    if !have_tools(TEST) {
        return;
    }
    use nixery::nix::Nix;
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let flake = dir.path().join("probe");
    std::fs::create_dir_all(&flake).unwrap();
    // No inputs; its one output's name says how it was evaluated.
    std::fs::write(
        flake.join("flake.nix"),
        r#"{
          outputs = { self }: {
            packages.x86_64-linux.probe = derivation {
              name = "probe-${if builtins ? currentSystem then "impure" else "pure"}";
              system = "x86_64-linux";
              builder = "/bin/sh";
            };
          };
        }"#,
    )
    .unwrap();
    git_in(&flake, &["init", "-q", "-b", "main"]);
    git_in(&flake, &["add", "-A"]);
    git_in(&flake, &["commit", "-q", "-m", "probe"]);
    let reference = format!("git+file://{}", flake.display());
    let name_with = |options: Vec<(String, String)>| {
        let state = dir.path().join(format!("state-{}", options.len()));
        let reference = reference.clone();
        async move {
            let nix = nixery::nix::NixCli::new(&state, options).unwrap();
            let locked = nix
                .lock_flake(&reference)
                .await
                .unwrap()
                .expect("it exists");
            assert_eq!(
                locked.rev.as_deref(),
                Some(git_in(&flake_dir(&reference), &["rev-parse", "HEAD"]).trim())
            );
            let source = Source::PinnedFlake { locked: locked.url };
            let prepared = nix
                .prepare(&source, "latest", &["probe".to_string()], "x86_64-linux")
                .await
                .unwrap();
            prepared.resolved[0].out.clone()
        }
    };
    assert!(name_with(offline_nix_options())
        .await
        .ends_with("-probe-pure"));
    // The operator's `pure-eval = false` wins (the offline set needs it).
    assert!(name_with(flake_nix_options())
        .await
        .ends_with("-probe-impure"));
}

/// The directory of a `git+file://` reference.
fn flake_dir(reference: &str) -> PathBuf {
    PathBuf::from(reference.trim_start_matches("git+file://"))
}

/// An ad-hoc name from a flake followed at a branch is locked again after
/// `--cache-ttl`: a new commit is a new image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ad_hoc_flake_is_followed_after_the_ttl() {
    const TEST: &str = "an_ad_hoc_flake_is_followed_after_the_ttl";
    if !have_tools(TEST) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let repo = FlakeRepo::new(dir.path(), TEST);
    let registry_with_ttl = |ttl: Duration| {
        let (dir, url) = (dir.path().to_path_buf(), repo.url());
        async move {
            let mut s = settings(&dir.join(format!("state-{}", ttl.as_secs())));
            s.nix_options = flake_nix_options();
            s.cache_ttl = ttl;
            s.source = Source::Flake {
                reference: format!("{url}?ref=main"),
            };
            nixery::app_state(&s).await.unwrap()
        }
    };
    let manifest = |state: nixery::registry::AppState| async move {
        let r = get(&state, "/v2/hello-app/manifests/latest").await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.header("docker-content-digest").unwrap().to_string()
    };
    // TTL 0: every request locks the branch again.
    let followed = registry_with_ttl(Duration::ZERO).await;
    // An hour: the first lock holds.
    let held = registry_with_ttl(Duration::from_secs(3600)).await;
    let (first, first_held) = (
        manifest(followed.clone()).await,
        manifest(held.clone()).await,
    );
    assert_eq!(first, first_held);
    assert_eq!(
        manifest(followed.clone()).await,
        first,
        "the branch has not moved"
    );
    repo.change("a new commit");
    let second = manifest(followed).await;
    assert_ne!(second, first, "the new commit is a new image");
    assert_eq!(
        manifest(held).await,
        first,
        "within the TTL, the image stays"
    );
}
