//! The agent's container image, made without nixpkgs (scripts/agent-image.sh),
//! run the way deploy/base/daemonset.yaml runs it, by a real Docker engine: the
//! init container's command copies the agent into an empty node store, then
//! the agent's command runs with that store mounted over the image's /nix, a
//! read-only root and a tmpfs /tmp, builds with the image's own Nix into the
//! node store, and serves what `docker pull` and `docker run` ask for. The
//! same archive is imported by containerd under the name a kubelet resolves.
//!
//! The DaemonSet's agent runs `nixery agent`, which needs a Kubernetes API
//! server; here the same entrypoint runs `serve` (the controller's half is
//! tested against the mocked API server in controller.rs).

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// What deploy/base/daemonset.yaml says about one container.
struct PodContainer {
    command: Vec<String>,
    args: Vec<String>,
    mounts: Vec<(String, String)>,
    read_only_root: bool,
    readiness_path: Option<String>,
}

fn daemonset_containers() -> (PodContainer, PodContainer) {
    let text = std::fs::read_to_string(repo_root().join("deploy/base/daemonset.yaml")).unwrap();
    let ds: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let spec = &ds["spec"]["template"]["spec"];
    let volumes: Vec<(String, String)> = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| {
            let source = v["hostPath"]["path"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| "emptyDir".into());
            (v["name"].as_str().unwrap().to_string(), source)
        })
        .collect();
    let strings = |v: &serde_yaml::Value| -> Vec<String> {
        v.as_sequence()
            .map(|s| s.iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    let container = |c: &serde_yaml::Value| PodContainer {
        command: strings(&c["command"]),
        args: strings(&c["args"]),
        mounts: c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|m| {
                let name = m["name"].as_str().unwrap();
                let host = volumes.iter().find(|(n, _)| n == name).unwrap().1.clone();
                (host, m["mountPath"].as_str().unwrap().to_string())
            })
            .collect(),
        read_only_root: c["securityContext"]["readOnlyRootFilesystem"]
            .as_bool()
            .unwrap_or(false),
        readiness_path: c["readinessProbe"]["httpGet"]["path"]
            .as_str()
            .map(str::to_string),
    };
    (
        container(&spec["initContainers"][0]),
        container(&spec["containers"][0]),
    )
}

/// Removes what the test made, also when it fails: containers, images, and
/// the node's store (whose files Nix made read-only).
struct Cleanup {
    containers: Vec<String>,
    images: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = run(Command::new("docker").args(["rm", "-f", c]));
        }
        for i in &self.images {
            let _ = run(Command::new("docker").args(["rmi", "-f", i]));
        }
        for d in &self.dirs {
            let _ = run(Command::new("chmod").arg("-R").arg("u+w").arg(d));
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The host's files the offline package set's builders use (busybox,
/// patchelf and the libraries they copy): a node with a real channel needs
/// none of these.
fn offline_set_mounts() -> Vec<String> {
    let mut v = Vec::new();
    for (host, ro) in [
        ("/usr", "/usr"),
        ("/lib", "/lib"),
        ("/lib64", "/lib64"),
        ("/etc/ssl/certs", "/host/etc/ssl/certs"),
        ("/etc/services", "/host/etc/services"),
        ("/etc/protocols", "/host/etc/protocols"),
    ] {
        if Path::new(host).exists() {
            v.push("-v".into());
            v.push(format!("{host}:{ro}:ro"));
        }
    }
    v.push("-v".into());
    v.push(format!("{}:/src:ro", repo_root().display()));
    // As deploy/components/offline: the image's /etc/services links into the
    // store path the set builds, so the host's are mounted apart.
    v.push("-e".into());
    v.push("NIXERY_OFFLINE_HOST_ETC=/host/etc".into());
    v
}

#[test]
fn agent_image_runs_as_the_daemonset_runs_it() {
    let test = "agent_image_runs_as_the_daemonset_runs_it";
    if !have_tool("docker", test) || !have_tool("nix-build", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let id = std::process::id();
    let reference = format!("nixery-agent-test:{id}");
    let node = dir.path().join("node");
    let mut cleanup = Cleanup {
        containers: vec![],
        images: vec![reference.clone()],
        dirs: vec![node.clone()],
    };

    // 1. The image, from the offline set, this build's binary and the host's Nix.
    let archive = dir.path().join("agent.tar");
    let (ok, _, err) = run(Command::new("bash")
        .arg(repo_root().join("scripts/agent-image.sh"))
        .arg(&archive)
        .arg(&reference)
        .env("NIXERY_AGENT_BINARY", env!("CARGO_BIN_EXE_nixery"))
        .env("NIXERY_STATE_DIR", dir.path().join("pack-state"))
        .env("RUST_LOG", "warn"));
    assert!(ok, "agent-image.sh failed: {err}");
    let (ok, out, err) = run(Command::new("docker").args(["load", "-i"]).arg(&archive));
    assert!(ok, "docker load failed: {err}");
    assert!(out.contains(&format!("Loaded image: {reference}")), "{out}");
    let (ok, out, _) = run(Command::new("docker").args([
        "image",
        "inspect",
        "--format",
        "{{json .Config.Entrypoint}} {{json .Config.Cmd}} {{json .Config.Env}}",
        &reference,
    ]));
    assert!(ok);
    assert!(
        out.starts_with(r#"["/bin/nixery"] ["agent"] "#),
        "entrypoint and command as agent-image.nix has them: {out}"
    );
    assert!(out.contains(r#""PATH=/bin""#), "{out}");

    let (init, agent) = daemonset_containers();
    assert_eq!(init.command, ["/bin/install-into-host-store", "/host"]);
    assert_eq!(&agent.command[..1], ["/bin/nixery"]);

    // 2. The init container, into an empty node store (twice: a pod restart).
    let node_nix = node.join("nix");
    std::fs::create_dir_all(&node_nix).unwrap();
    let init_mount = init
        .mounts
        .iter()
        .find(|(host, _)| host == "/nix")
        .expect("the init container mounts the node's /nix")
        .1
        .clone();
    for attempt in 0..2 {
        let (ok, out, err) = run(Command::new("docker")
            .args(["run", "--rm", "-v"])
            .arg(format!("{}:{init_mount}", node_nix.display()))
            .arg("--entrypoint")
            .arg(&init.command[0])
            .arg(&reference)
            .args(&init.command[1..]));
        assert!(ok, "init container (run {attempt}) failed: {out}{err}");
    }
    let root = std::fs::read_link(node_nix.join("var/nix/gcroots/nixery-agent")).unwrap();
    assert!(root.starts_with("/nix/store/"), "{}", root.display());
    assert!(node
        .join(root.strip_prefix("/").unwrap())
        .join("bin/nixery")
        .exists());
    // Registered as valid in the node's Nix database, with its closure.
    let (ok, out, err) = run(Command::new("nix-store")
        .arg("--store")
        .arg(format!("local?root={}", node.display()))
        .args(["--query", "--requisites"])
        .arg(&root));
    assert!(ok, "the agent is not valid in the node's store: {err}");
    assert!(out.lines().count() > 20, "{out}");
    assert_eq!(
        std::fs::read_link(node_nix.join("var/nix/gcroots/profiles")).unwrap(),
        Path::new("/nix/var/nix/profiles"),
        "the profiles root names the node's path, not the init container's"
    );

    // 3. The agent container with the DaemonSet's mounts and read-only root.
    let state = node.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let node_run = node.join("run");
    std::fs::create_dir_all(&node_run).unwrap();
    let port = free_port();
    let name = format!("nixery-agent-test-{id}");
    cleanup.containers.push(name.clone());
    let mut cmd = Command::new("docker");
    cmd.args(["run", "-d", "--name", &name, "--network", "host"]);
    if agent.read_only_root {
        cmd.arg("--read-only");
    }
    let state_dir = agent
        .args
        .iter()
        .find_map(|a| a.strip_prefix("--state-dir="))
        .expect("the DaemonSet names its state dir")
        .to_string();
    for (host, path) in &agent.mounts {
        match host.as_str() {
            "emptyDir" => cmd.arg("--tmpfs").arg(path),
            "/nix" => cmd.arg("-v").arg(format!("{}:{path}", node_nix.display())),
            "/var/lib/nixery" => cmd.arg("-v").arg(format!("{}:{path}", state.display())),
            // The node's /run, for its runtime's CRI socket (none here:
            // this runs `serve`, which does not pre-pull).
            "/run" => cmd
                .arg("-v")
                .arg(format!("{}:{path}:ro", node_run.display())),
            other => panic!("a hostPath this test does not know: {other}"),
        };
    }
    cmd.args(offline_set_mounts())
        .arg("--entrypoint")
        .arg(&agent.command[0])
        .arg(&reference)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg(format!("--state-dir={state_dir}"))
        .args([
            "--pkgs-path",
            "/src/nix/offline-pkgs",
            "--nix-option",
            "substituters=",
        ]);
    let (ok, _, err) = run(&mut cmd);
    assert!(ok, "agent container did not start: {err}");
    let ready = agent.readiness_path.as_deref().unwrap_or("/readyz");
    let url = format!("http://127.0.0.1:{port}{ready}");
    let started = Instant::now();
    while http_get(&url).0 != 200 {
        if started.elapsed() > Duration::from_secs(60) {
            let (_, logs, errs) = run(Command::new("docker").args(["logs", &name]));
            panic!("the agent's readiness probe never passed: {logs}{errs}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    // 4. A pull that makes the agent build with its own Nix, in the node's store.
    let hello = format!("127.0.0.1:{port}/shell/hello");
    cleanup.images.push(hello.clone());
    let (ok, _, err) = run(Command::new("docker").args(["pull", "-q", &hello]));
    if !ok {
        let (_, logs, errs) = run(Command::new("docker").args(["logs", &name]));
        panic!("docker pull from the agent failed: {err}\n{logs}{errs}");
    }
    let (ok, out, err) = run(Command::new("docker").args(["run", "--rm", &hello, "hello"]));
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "Hello, world!");
    let built_in_node = std::fs::read_dir(node_nix.join("store"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().ends_with("-hello-host"));
    assert!(built_in_node, "hello was not built into the node's store");

    // 5. containerd imports the same archive under the name a kubelet resolves.
    if let Some(socket) = containerd_socket(&format!("{test}: the containerd import part")) {
        let ns = format!("nixery-agent-test-{id}");
        let ctr = |args: &[&str]| {
            run(Command::new("ctr")
                .args(["-a", socket, "-n", &ns])
                .args(args))
        };
        let (ok, _, err) = ctr(&["images", "import", archive.to_str().unwrap()]);
        assert!(ok, "ctr images import failed: {err}");
        let qualified = format!("docker.io/library/{reference}");
        let (ok, out, _) = ctr(&["images", "ls", "-q"]);
        let _ = ctr(&["images", "rm", "--sync", &qualified]);
        let (removed, _, err) =
            run(Command::new("ctr").args(["-a", socket, "namespaces", "rm", &ns]));
        assert!(ok && out.lines().any(|l| l == qualified), "{out}");
        assert!(
            removed,
            "the test's containerd namespace is left behind: {err}"
        );
    }
}
