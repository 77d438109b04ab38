//! End to end on a real Kubernetes (1.34 here, with containerd), the cluster
//! KUBECONFIG names: none is provided on these machines, so it runs where a
//! cluster is given and is skipped, saying so, elsewhere (and in CI).
//! CONTAINERD_ADDRESS names the node's containerd socket for `ctr`
//! (default /run/containerd/containerd.sock); NIXERY_RESTART_APISERVER, a
//! command that restarts kube-apiserver, enables that step.
//!
//! The install as users do it: the agent image from `scripts/agent-image.sh`
//! imported into the node's containerd, `kubectl apply -k deploy/offline` (the
//! install pointed at the offline package set), every example of examples/,
//! `kubectl get nimg`; pre-pull (the image in the node's containerd, a Pod
//! that starts without pulling, the image removed with its NixImage); a
//! second agent as a process beside the DaemonSet's;
//! kube-apiserver stopped and started again; an upgrade to another image tag;
//! `kubectl delete -k` with NixImages present; the install again through the
//! nix-daemon overlay, which also shows that an agent that was away while its
//! objects were deleted drops their images when it comes back. And, apart,
//! what the API server refuses at admission.
//!
//! The tests share one cluster, so they take turns (a lock), and each leaves
//! it as it found it: what a test made is removed when it ends, passed or not.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const CRD: &str = "niximages.k8s.nixos.org";
const NS: &str = "nixery-system";
/// Where deploy/components/offline expects the offline package set.
const OFFLINE_SET: &str = "/opt/nixery/offline-pkgs";
/// The agent image, as scripts/agent-image.sh tags it and containerd names it.
const IMAGE: &str = "docker.io/library/nixery-agent:latest";
const UPGRADED: &str = "docker.io/library/nixery-agent:e2e-upgrade";

/// One test at a time on the cluster.
static CLUSTER: Mutex<()> = Mutex::new(());

fn cluster(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    if std::env::var("KUBECONFIG").is_err() {
        skip(&format!(
            "{test}: KUBECONFIG is not set; this test needs a real cluster (none is provided on these machines)"
        ));
        return None;
    }
    if !have_tool("kubectl", test) {
        return None;
    }
    Some(CLUSTER.lock().unwrap_or_else(|e| e.into_inner()))
}

fn kubectl(args: &[&str]) -> (bool, String, String) {
    run(Command::new("kubectl").args(args))
}

fn kubectl_in(args: &[&str], input: &str) -> (bool, String, String) {
    run_in(Command::new("kubectl").args(args), input.as_bytes())
}

/// `kubectl ARGS`, which must succeed; its stdout.
fn ok(args: &[&str]) -> String {
    let (ok, out, err) = kubectl(args);
    assert!(ok, "kubectl {}: {err}{out}", args.join(" "));
    out
}

/// `kubectl get ... -o jsonpath=PATH`, or "" when it fails (not found).
fn jsonpath(args: &[&str], path: &str) -> String {
    let mut a = vec!["get"];
    a.extend(args);
    let p = format!("-o=jsonpath={path}");
    a.push(&p);
    kubectl(&a).1
}

/// Polls `f` every half second until it gives a value, for at most `timeout`;
/// `diagnose` says what the cluster looked like when it did not.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    diagnose: &dyn Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if started.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                diagnose()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// What the agents and pods did, for a failure's message.
fn agent_state() -> String {
    let mut out = String::new();
    for args in [
        &["-n", NS, "get", "pods", "-o", "wide"][..],
        &[
            "-n",
            NS,
            "logs",
            "daemonset/nixery-agent",
            "--all-containers",
            "--tail=40",
        ],
        &["get", "nimg", "-A", "-o", "wide"],
        &["get", "pods", "-n", "default", "-o", "wide"],
        &["get", "events", "-A", "--sort-by=.lastTimestamp"],
    ] {
        let (_, o, e) = kubectl(args);
        out.push_str(&format!("$ kubectl {}\n{o}{e}\n", args.join(" ")));
    }
    out
}

fn http(url: &str) -> (u16, String) {
    http_get(url)
}

/// examples/*.yaml as documents, each Pod and Deployment with
/// `hostNetwork: true` (the lab has no pod network; a real cluster needs
/// none of this), NixImages first.
fn examples() -> (Vec<Value>, Vec<Value>) {
    let dir = repo_root().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let (mut images, mut workloads) = (Vec::new(), Vec::new());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut v: Value = serde::Deserialize::deserialize(doc).unwrap();
            match v["kind"].as_str().unwrap() {
                "NixImage" => images.push(v),
                "Pod" => {
                    v["spec"]["hostNetwork"] = json!(true);
                    workloads.push(v)
                }
                "Deployment" => {
                    v["spec"]["template"]["spec"]["hostNetwork"] = json!(true);
                    workloads.push(v)
                }
                other => panic!("{}: a kind the test does not know: {other}", f.display()),
            }
        }
    }
    (images, workloads)
}

fn to_yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The node's containerd: CONTAINERD_ADDRESS, else containerd's own socket.
fn ctr(args: &[&str]) -> (bool, String, String) {
    let address = std::env::var("CONTAINERD_ADDRESS")
        .unwrap_or_else(|_| "/run/containerd/containerd.sock".into());
    run(Command::new("ctr")
        .args(["-a", &address, "-n", "k8s.io"])
        .args(args))
}

/// What the install test made outside the cluster's API, removed on drop.
#[derive(Default)]
struct Leftovers {
    /// The node's images before the test: every other one goes (the agent
    /// image, and what the kubelet pulled from the agent).
    images_before: Option<Vec<String>>,
    paths: Vec<PathBuf>,
    /// Manifests to delete, in this order (a failed run's install last).
    kustomizations: Vec<PathBuf>,
    manifests: Vec<String>,
    processes: Vec<Child>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for p in &mut self.processes {
            let _ = p.kill();
            let _ = p.wait();
        }
        for m in &self.manifests {
            let _ = kubectl_in(
                &[
                    "delete",
                    "--ignore-not-found",
                    "--wait=true",
                    "--timeout=60s",
                    "-f",
                    "-",
                ],
                m,
            );
        }
        for k in self.kustomizations.iter().rev() {
            let _ = kubectl(&[
                "delete",
                "--ignore-not-found",
                "--timeout=90s",
                "-k",
                k.to_str().unwrap(),
            ]);
        }
        if let Some(before) = &self.images_before {
            for i in ctr(&["images", "ls", "-q"]).1.lines() {
                if !before.iter().any(|b| b == i) {
                    let _ = ctr(&["images", "rm", "--sync", i]);
                }
            }
        }
        for p in &self.paths {
            let _ = run(Command::new("chmod").arg("-R").arg("u+w").arg(p));
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.is_dir() => {
                    let _ = std::fs::remove_dir_all(p);
                }
                Ok(_) => {
                    let _ = std::fs::remove_file(p);
                }
                Err(_) => {}
            }
        }
    }
}

/// The agent image (scripts/agent-image.sh with this build's binary)
/// imported into the node's containerd, and the offline set where
/// deploy/components/offline mounts it from; what is new (images, the set's
/// link, the host state the DaemonSet creates) is removed afterwards.
fn agent_image_and_offline_set(tmp: &Path, left: &mut Leftovers) {
    left.images_before = Some(
        ctr(&["images", "ls", "-q"])
            .1
            .lines()
            .map(String::from)
            .collect(),
    );
    let archive = tmp.join("agent.tar");
    let (built, _, err) = run(Command::new("bash")
        .arg(repo_root().join("scripts/agent-image.sh"))
        .arg(&archive)
        .env("NIXERY_AGENT_BINARY", env!("CARGO_BIN_EXE_nixery"))
        .env("NIXERY_STATE_DIR", tmp.join("pack-state"))
        .env("RUST_LOG", "warn"));
    assert!(built, "agent-image.sh failed: {err}");
    let (imported, _, err) = ctr(&["images", "import", archive.to_str().unwrap()]);
    assert!(imported, "ctr images import: {err}");
    remove_later_if_new(left, "/opt/nixery");
    remove_later_if_new(left, "/var/lib/nixery");
    remove_later_if_new(left, "/nix/var/nix/gcroots/nixery-agent");
    if !Path::new(OFFLINE_SET).exists() {
        std::fs::create_dir_all("/opt/nixery").unwrap();
        std::os::unix::fs::symlink(repo_root().join("nix/offline-pkgs"), OFFLINE_SET).unwrap();
    }
}

/// Remembers `path` for removal if it does not exist yet.
fn remove_later_if_new(l: &mut Leftovers, path: &str) {
    if !Path::new(path).exists() && !Path::new(path).is_symlink() {
        l.paths.push(path.into());
    }
}

/// A kustomization in `dir` made of directories of this checkout (as
/// relative paths: kustomize takes no absolute ones), with the agent
/// image's tag set.
fn overlay(dir: &Path, resources: &[&str], components: &[&str], tag: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let dir = dir.canonicalize().unwrap();
    let up = "../".repeat(dir.components().count() - 1);
    let repo = repo_root().canonicalize().unwrap();
    let abs = |v: &[&str]| {
        v.iter()
            .map(|r| {
                let target = repo.join(r);
                format!("  - {up}{}\n", target.strip_prefix("/").unwrap().display())
            })
            .collect::<String>()
    };
    let mut k = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n{}",
        abs(resources)
    );
    if !components.is_empty() {
        k.push_str(&format!("components:\n{}", abs(components)));
    }
    k.push_str(&format!(
        "images:\n  - name: nixery-agent\n    newName: nixery-agent\n    newTag: {tag}\n"
    ));
    std::fs::write(dir.join("kustomization.yaml"), k).unwrap();
    dir
}

/// Applies a NixImage in `default` (remembered for cleanup) and waits until
/// it is Ready.
fn niximage_ready(left: &mut Leftovers, name: &str, contents: &[&str], timeout: u64) {
    let obj = json!({
        "apiVersion": "k8s.nixos.org/v1alpha1", "kind": "NixImage",
        "metadata": { "name": name, "namespace": "default" },
        "spec": { "contents": contents, "tag": "v1" }
    });
    left.manifests
        .insert(0, serde_yaml::to_string(&obj).unwrap());
    ok_in(&["apply", "-f", "-"], &obj.to_string());
    wait_for(
        &format!("{name} to be Ready"),
        Duration::from_secs(timeout),
        &agent_state,
        || match jsonpath(&["-n", "default", "nimg", name], "{.status.phase}").as_str() {
            "Ready" => Some(()),
            "Failed" => panic!("{name} failed\n{}", agent_state()),
            _ => None,
        },
    );
}

/// A NixImage's image is in the node's runtime once Ready, its Pod starts
/// without pulling (the kubelet says "already present on machine"), and the
/// image leaves the runtime with the object.
fn pre_pull_on_the_node(left: &mut Leftovers) {
    let name = "prepull-demo";
    niximage_ready(left, name, &["hello"], 300);
    let entry = |field: &str| {
        jsonpath(
            &["-n", "default", "nimg", name],
            &format!("{{.status.nodes[0].{field}}}"),
        )
    };
    let runtime = wait_for(
        "the node entry to say the image is in the runtime",
        Duration::from_secs(120),
        &agent_state,
        || Some(entry("prePulled")).filter(|s| !s.is_empty()),
    );
    assert!(runtime.starts_with("containerd "), "{runtime}");
    let image = jsonpath(&["-n", "default", "nimg", name], "{.status.image}");
    let digest = jsonpath(&["-n", "default", "nimg", name], "{.status.digest}");
    let repo = format!("127.0.0.1:5000/niximage/default/{name}");
    let images = ctr(&["images", "ls", "-q"]).1;
    for r in [format!("{repo}:v1"), format!("{repo}@{digest}")] {
        assert!(images.lines().any(|l| l == r), "{r} not in\n{images}");
    }
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "default" },
        // (hostNetwork, as the examples' pods here: clusters without a pod network.)
        "spec": { "restartPolicy": "Never", "hostNetwork": true, "containers": [{
            "name": "hello", "image": image, "imagePullPolicy": "IfNotPresent", "command": ["hello"]
        }] }
    });
    left.manifests
        .insert(0, serde_yaml::to_string(&pod).unwrap());
    ok_in(&["apply", "-f", "-"], &pod.to_string());
    wait_for(
        "the pre-pulled pod to succeed",
        Duration::from_secs(120),
        &agent_state,
        || {
            (jsonpath(&["-n", "default", "pod", name], "{.status.phase}") == "Succeeded")
                .then_some(())
        },
    );
    assert_eq!(ok(&["-n", "default", "logs", name]), "Hello, world!\n");
    let events = ok(&[
        "-n",
        "default",
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={name},reason=Pulled"),
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(events.contains("already present on machine"), "{events}");
    ok(&["-n", "default", "delete", "pod", name, "--wait=true"]);
    ok(&["-n", "default", "delete", "nimg", name, "--wait=true"]);
    wait_for(
        "the pre-pulled image to leave the runtime",
        // The kubelet removes the Pod's container, then the agent's next
        // sweep (every 30 s) the image.
        Duration::from_secs(120),
        &agent_state,
        || {
            let images = ctr(&["images", "ls", "-q"]).1;
            (!images.lines().any(|l| l.starts_with(&repo))).then_some(())
        },
    );
}

/// `kubectl rollout status`, which must complete within `seconds`.
fn rollout(namespace: &str, what: &str, seconds: u32, failure: &str) {
    let timeout = format!("--timeout={seconds}s");
    let (rolled, out, err) = kubectl(&["-n", namespace, "rollout", "status", what, &timeout]);
    assert!(rolled, "{failure}: {out}{err}\n{}", agent_state());
}

fn metric_of(url: &str, name: &str) -> f64 {
    metric(&http(url).1, name)
}

/// Starts `nixery agent` as a process beside the DaemonSet's (another node
/// name, the offline set); returns it and its address.
fn second_agent(node: &str, state: &Path, lease_namespace: &str) -> (Child, String) {
    let mut agent = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .args(["agent", "--node-name", node, "--listen", "127.0.0.1:0"])
        .args([
            "--nix-option",
            "substituters=",
            "--lease-namespace",
            lease_namespace,
        ])
        .arg("--state-dir")
        .arg(state)
        .arg("--pkgs-path")
        .arg(OFFLINE_SET)
        .env_remove("POD_NAMESPACE")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(agent.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the agent exited").unwrap();
        if let Some(rest) = line.split("serving on http://").nth(1) {
            break rest.trim().to_string();
        }
    };
    // Keep reading (a full pipe would block it); its lines go to our stderr.
    let node = node.to_string();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            eprintln!("[{node}] {l}");
        }
    });
    (agent, addr)
}

#[test]
fn install_use_restart_upgrade_and_uninstall_on_a_real_cluster() {
    let test = "install_use_restart_upgrade_and_uninstall_on_a_real_cluster";
    let Some(_turn) = cluster(test) else { return };
    for tool in ["ctr", "curl"] {
        assert!(have_tool(tool, test) || std::env::var("CI").is_err());
    }
    // The install owns the CRD and the namespace: they must not exist yet.
    let (crd_exists, _, _) = kubectl(&["get", "crd", CRD]);
    let (ns_exists, _, _) = kubectl(&["get", "namespace", NS]);
    if crd_exists || ns_exists {
        skip(&format!("{test}: nixery is installed on this cluster already (the CRD or namespace {NS} exists); this test installs and uninstalls it, so it runs only on a cluster without"));
        return;
    }
    // Made before `left`, so dropped after it: a failed run's cleanup still
    // has the overlays it deletes.
    let tmp = tempfile::tempdir().unwrap();
    let mut left = Leftovers::default();
    let t0 = Instant::now();
    let mut figures: Vec<String> = Vec::new();

    // 1. The agent image, into the node's containerd (as docs/kubernetes.md says),
    // and the offline set where the overlay mounts it from.
    agent_image_and_offline_set(tmp.path(), &mut left);
    let (tagged, _, err) = ctr(&["images", "tag", "--force", IMAGE, UPGRADED]);
    assert!(tagged, "ctr images tag: {err}");

    // 2. The install, as a user runs it.
    let offline = repo_root().join("deploy/offline");
    left.kustomizations.push(offline.clone());
    let started = Instant::now();
    ok(&["apply", "-k", offline.to_str().unwrap()]);
    rollout(
        NS,
        "daemonset/nixery-agent",
        180,
        "the DaemonSet did not roll out",
    );
    figures.push(format!(
        "install: DaemonSet Ready {:.1} s after kubectl apply -k",
        started.elapsed().as_secs_f64()
    ));
    let registry = "http://127.0.0.1:5000";
    assert_eq!(http(&format!("{registry}/readyz")), (200, "ready\n".into()));

    // 3. Every example does what it says. NixImages first: pods that name
    // one would otherwise back off while it builds.
    let (images, workloads) = examples();
    left.manifests.push(to_yaml(&workloads));
    left.manifests.push(to_yaml(&images));
    let started = Instant::now();
    ok_in(&["apply", "-f", "-"], &to_yaml(&images));
    for img in &images {
        let name = img["metadata"]["name"].as_str().unwrap();
        wait_for(
            &format!("NixImage {name} to be Ready"),
            Duration::from_secs(300),
            &agent_state,
            || {
                (jsonpath(&["-n", "default", "nimg", name], "{.status.phase}") == "Ready")
                    .then_some(())
            },
        );
    }
    figures.push(format!(
        "examples: {} NixImages Ready {:.1} s after kubectl apply",
        images.len(),
        started.elapsed().as_secs_f64()
    ));
    ok_in(&["apply", "-f", "-"], &to_yaml(&workloads));
    let pod_phase = |name: &str| jsonpath(&["-n", "default", "pod", name], "{.status.phase}");
    for (pod, says) in [
        ("jq-demo", &["\"by nix\"", "curl "][..]),
        ("adhoc-curl", &["curl "][..]),
    ] {
        wait_for(
            &format!("pod {pod} to succeed"),
            Duration::from_secs(180),
            &agent_state,
            || match pod_phase(pod).as_str() {
                "Succeeded" => Some(()),
                "Failed" => panic!(
                    "pod {pod} failed: {}",
                    kubectl(&["-n", "default", "logs", pod]).1
                ),
                _ => None,
            },
        );
        let logs = ok(&["-n", "default", "logs", pod]);
        for s in says {
            assert!(logs.contains(s), "{pod} logs: {logs}");
        }
    }
    wait_for(
        "the web server to run",
        Duration::from_secs(120),
        &agent_state,
        || (pod_phase("web-server") == "Running").then_some(()),
    );
    let greeting = ok(&[
        "-n",
        "default",
        "exec",
        "web-server",
        "--",
        "sh",
        "-c",
        "echo $GREETING; id -u",
    ]);
    assert_eq!(
        greeting, "hello from nix\n65534\n",
        "the NixImage's env and user"
    );
    wait_for(
        "httpd to answer on 8080",
        Duration::from_secs(30),
        &agent_state,
        || (http("http://127.0.0.1:8080/").0 != 0).then_some(()),
    );
    rollout(
        "default",
        "deployment/jq-loop",
        120,
        "the Deployment did not roll out",
    );
    wait_for(
        "jq-loop to print",
        Duration::from_secs(60),
        &agent_state,
        || {
            let logs = kubectl(&["-n", "default", "logs", "deployment/jq-loop"]).1;
            logs.starts_with('"').then_some(())
        },
    );

    // 4. kubectl get nimg: what a user wants to see at a glance.
    let table = ok(&["-n", "default", "get", "nimg"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "TAG", "PHASE", "NODES", "IMAGE", "AGE"],
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("curl-and-jq "))
        .unwrap();
    let digest = jsonpath(
        &["-n", "default", "nimg", "curl-and-jq"],
        "{.status.digest}",
    );
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert!(
        row.contains(" v1 ")
            && row.contains(" Ready ")
            && row.contains(" 1/1 ")
            && row.contains(&format!(
                "127.0.0.1:5000/niximage/default/curl-and-jq:v1@{digest}"
            )),
        "{table}"
    );
    let wide = ok(&["-n", "default", "get", "nimg", "-o", "wide"]);
    assert!(
        wide.lines().next().unwrap().contains("SIZE") && wide.contains("ready on 1/1 nodes"),
        "{wide}"
    );

    // 4b. Pre-pull: the agent pulled the ready image into the node's
    // containerd (under its tag and the digest status names), so a Pod with
    // IfNotPresent starts without a pull; deleting the NixImage removes it.
    pre_pull_on_the_node(&mut left);

    // 5. A second agent beside the DaemonSet's: first without a namespace for
    // its Lease, which it says (not ready), then as it should run.
    let second_state = tmp.path().join("second");
    let (mut agent, addr) = second_agent("e2e-second", &second_state, "nixery-no-such-namespace");
    let readyz = format!("http://{addr}/readyz");
    let why = wait_for(
        "the second agent to say why it is not ready",
        Duration::from_secs(30),
        &agent_state,
        || {
            let (code, body) = http(&readyz);
            (code == 503 && body.contains("cannot hold")).then_some(body)
        },
    );
    assert_eq!(
        why,
        "not ready: cannot hold this node's Lease nixery-no-such-namespace/nixery-node-e2e-second: namespaces \"nixery-no-such-namespace\" not found (create the namespace, or point --lease-namespace at one that exists)\n"
    );
    let _ = agent.kill();
    let _ = agent.wait();
    let (agent, addr) = second_agent("e2e-second", &second_state, NS);
    left.processes.push(agent);
    let readyz = format!("http://{addr}/readyz");
    wait_for(
        "both agents ready",
        Duration::from_secs(60),
        &agent_state,
        || (http(&readyz).0 == 200 && http(&format!("{registry}/readyz")).0 == 200).then_some(()),
    );
    // It builds every object too; both nodes agree on each digest.
    for img in &images {
        let name = img["metadata"]["name"].as_str().unwrap();
        wait_for(
            &format!("{name} ready on 2/2 nodes"),
            Duration::from_secs(300),
            &agent_state,
            || {
                let s = jsonpath(
                    &["-n", "default", "nimg", name],
                    "{.status.phase} {.status.readyNodes}",
                );
                (s == "Ready 2/2").then_some(())
            },
        );
    }
    assert_eq!(
        jsonpath(
            &["-n", "default", "nimg", "curl-and-jq"],
            "{.status.digest}"
        ),
        digest,
        "the same digest from both agents"
    );
    // Settled: agents that agree write (almost) nothing.
    let mut versions = std::collections::BTreeSet::new();
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(30) {
        versions.insert(jsonpath(
            &["-n", "default", "nimg", "curl-and-jq"],
            "{.metadata.resourceVersion}",
        ));
        std::thread::sleep(Duration::from_millis(500));
    }
    let changes = versions.len() - 1;
    assert!(changes <= 10, "{changes} resourceVersion changes in 30 s");
    figures.push(format!(
        "two agents, settled: {changes} resourceVersion changes in 30 s"
    ));

    // A spec change: a new digest, and the newest BuildSucceeded event names it.
    let old = jsonpath(&["-n", "default", "nimg", "web-server"], "{.status.digest}");
    ok(&[
        "-n",
        "default",
        "patch",
        "nimg",
        "web-server",
        "--type=merge",
        "-p",
        r#"{"spec":{"contents":["busybox","hello"]}}"#,
    ]);
    let new = wait_for(
        "web-server's new digest",
        Duration::from_secs(300),
        &agent_state,
        || {
            let s = jsonpath(&["-n", "default", "nimg", "web-server"], "{.status.phase} {.status.readyNodes} {.status.observedGeneration} {.status.digest}");
            let f: Vec<&str> = s.split(' ').collect();
            (f.len() == 4 && f[0] == "Ready" && f[1] == "2/2" && f[2] == "2" && f[3] != old)
                .then(|| f[3].to_string())
        },
    );
    let events: Value = serde_json::from_str(&ok(&[
        "-n",
        "default",
        "get",
        "events.events.k8s.io",
        "--field-selector",
        "regarding.name=web-server,reason=BuildSucceeded",
        "-o",
        "json",
    ]))
    .unwrap();
    let newest = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|e| {
            e["series"]["lastObservedTime"]
                .as_str()
                .or(e["eventTime"].as_str())
                .unwrap_or("")
                .to_string()
        })
        .expect("BuildSucceeded events");
    assert!(newest["note"].as_str().unwrap().contains(&new), "{newest}");

    // The second agent dies for good: deleting an object it built completes
    // at once (no finalizers), and once its Lease expires the live agent
    // drops its status entries.
    if let Some(mut a) = left.processes.pop() {
        let _ = a.kill();
        let _ = a.wait();
    }
    let killed = Instant::now();
    ok(&[
        "-n",
        "default",
        "delete",
        "nimg",
        "web-server",
        "--timeout=120s",
    ]);
    figures.push(format!(
        "a NixImage deleted {:.1} s after an agent that built it died",
        killed.elapsed().as_secs_f64()
    ));
    wait_for(
        "the web-server image to be dropped",
        Duration::from_secs(60),
        &agent_state,
        || {
            (http(&format!(
                "{registry}/v2/niximage/default/web-server/manifests/v1"
            ))
            .0 == 404)
                .then_some(())
        },
    );
    wait_for(
        "the dead agent's entry to go",
        Duration::from_secs(120),
        &agent_state,
        || {
            (jsonpath(
                &["-n", "default", "nimg", "curl-and-jq"],
                "{.status.readyNodes}",
            ) == "1/1")
                .then_some(())
        },
    );

    // 6. kube-apiserver stops and starts again (etcd kept): the agent's watch
    // is back, and a NixImage created once it answers becomes Ready.
    // The cluster's operator says how: NIXERY_RESTART_APISERVER is a shell
    // command that stops kube-apiserver, waits, and starts it again.
    if let Ok(restart) = std::env::var("NIXERY_RESTART_APISERVER") {
        let (restarted, _, err) = run(Command::new("sh").arg("-c").arg(&restart));
        assert!(restarted, "NIXERY_RESTART_APISERVER ({restart}): {err}");
        wait_for(
            "kube-apiserver to answer again",
            Duration::from_secs(120),
            &String::new,
            || kubectl(&["get", "--raw", "/readyz"]).0.then_some(()),
        );
        let back = Instant::now();
        niximage_ready(&mut left, "after-restart", &["hello"], 120);
        figures.push(format!(
            "kube-apiserver restart: a NixImage created when it answered again was Ready {:.1} s later",
            back.elapsed().as_secs_f64()
        ));
    } else {
        skip(&format!("{test} (the kube-apiserver restart): NIXERY_RESTART_APISERVER is not set, so the test cannot restart the API server"));
    }

    // 7. Upgrade: another agent image tag while pods use named images, and
    // signing turned on (deploy/components/signing, its Secret made first).
    // The images stay served with the same digests, nothing is built again,
    // and they are signed with the Secret's key.
    let keys = tmp.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let (key, public) = (keys.join("cosign.key"), keys.join("cosign.pub"));
    let (generated, _, err) = run(Command::new("sh").arg("-c").arg(format!(
        "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {0} && openssl pkey -in {0} -pubout -out {1}",
        key.display(),
        public.display()
    )));
    assert!(generated, "openssl: {err}");
    ok(&[
        "-n",
        NS,
        "create",
        "secret",
        "generic",
        "nixery-signing-key",
        &format!("--from-file=cosign.key={}", key.display()),
    ]);
    let upgrade = overlay(
        &tmp.path().join("upgrade"),
        &["deploy/offline"],
        &["deploy/components/signing"],
        "e2e-upgrade",
    );
    let started = Instant::now();
    ok(&["apply", "-k", upgrade.to_str().unwrap()]);
    rollout(
        NS,
        "daemonset/nixery-agent",
        180,
        "the upgrade did not roll out",
    );
    figures.push(format!(
        "upgrade: rolled out in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    wait_for(
        "only the upgraded agent to run",
        Duration::from_secs(60),
        &agent_state,
        || {
            let running = jsonpath(
                &["-n", NS, "pods", "-l", "app.kubernetes.io/component=agent"],
                "{.items[*].spec.containers[0].image}",
            );
            (running == "nixery-agent:e2e-upgrade").then_some(())
        },
    );
    let (code, _) = http(&format!(
        "{registry}/v2/niximage/default/curl-and-jq/manifests/v1"
    ));
    assert_eq!(code, 200, "served at once after the rollout");
    let manifest = Command::new("curl")
        .args([
            "-sI",
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
        ])
        .arg(format!(
            "{registry}/v2/niximage/default/curl-and-jq/manifests/v1"
        ))
        .output()
        .unwrap();
    let headers = String::from_utf8_lossy(&manifest.stdout).to_lowercase();
    assert!(
        headers.contains(&format!("docker-content-digest: {digest}")),
        "{headers}"
    );
    let fresh = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "after-upgrade", "namespace": "default" },
        "spec": { "hostNetwork": true, "restartPolicy": "Never", "containers": [{
            "name": "jq", "image": "127.0.0.1:5000/niximage/default/curl-and-jq:v1",
            "imagePullPolicy": "Always", "command": ["jq", "--version"] }] }
    });
    left.manifests
        .insert(0, serde_yaml::to_string(&fresh).unwrap());
    ok_in(&["apply", "-f", "-"], &fresh.to_string());
    wait_for(
        "a new pod to pull and run after the upgrade",
        Duration::from_secs(120),
        &agent_state,
        || match pod_phase("after-upgrade").as_str() {
            "Succeeded" => Some(()),
            "Failed" => panic!("after-upgrade failed"),
            _ => None,
        },
    );
    assert_eq!(
        jsonpath(
            &["-n", "default", "nimg", "curl-and-jq"],
            "{.status.digest}"
        ),
        digest
    );
    // Signed with the Secret's key: the key served, the status naming the
    // signature, and (where Debian 13's cosign is at hand) cosign verifying
    // the NixImage's image at the node's registry.
    let (code, served) = http(&format!("{registry}/cosign.pub"));
    assert_eq!(code, 200);
    assert_eq!(served, std::fs::read_to_string(&public).unwrap());
    wait_for(
        "the NixImage's status to name its signature",
        Duration::from_secs(60),
        &agent_state,
        || {
            let s = jsonpath(
                &["-n", "default", "nimg", "curl-and-jq"],
                "{.status.signature}",
            );
            s.starts_with("sha256:").then_some(())
        },
    );
    let trixie = Path::new("/var/cache/nixery-ci/trixie");
    if trixie.join("usr/bin/cosign").exists() {
        let (verified, out, err) = run(Command::new("bash")
            .arg(repo_root().join("scripts/in-root.sh"))
            .arg(trixie)
            .args([
                "cosign",
                "verify",
                "--key",
                public.to_str().unwrap(),
                "--insecure-ignore-tlog",
                "--allow-http-registry",
                "127.0.0.1:5000/niximage/default/curl-and-jq:v1",
            ])
            .env("IN_ROOT_BINDS", &keys));
        assert!(verified, "cosign verify in the cluster: {err}");
        assert!(out.contains(&digest), "{out}");
        figures
            .push("signing turned on by the upgrade: cosign verifies the NixImage's image".into());
    } else {
        skip(&format!(
            "{test} (cosign verify): no Debian 13 root with cosign (scripts/debian13-root.sh)"
        ));
    }
    let metrics = format!("{registry}/metrics");
    assert_eq!(
        metric_of(&metrics, "nixery_layers_packed_total"),
        0.0,
        "nothing packed again"
    );

    // An agent that is away while its object is deleted drops that object's
    // image when it comes back (it compares its catalog with what exists).
    niximage_ready(&mut left, "deleted-while-away", &["hello", "less"], 120);
    let roots_before = std::fs::read_dir("/var/lib/nixery/gcroots")
        .unwrap()
        .count();
    ok(&[
        "-n",
        NS,
        "patch",
        "daemonset",
        "nixery-agent",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"spec":{"nodeSelector":{"nixery.test/away":"true"}}}}}"#,
    ]);
    wait_for(
        "the agent to be away",
        Duration::from_secs(90),
        &agent_state,
        || {
            jsonpath(
                &["-n", NS, "pods", "-l", "app.kubernetes.io/component=agent"],
                "{.items[*].metadata.name}",
            )
            .is_empty()
            .then_some(())
        },
    );
    let catalog = || std::fs::read_to_string("/var/lib/nixery/catalog.json").unwrap_or_default();
    assert!(catalog().contains("default/deleted-while-away"));
    ok(&[
        "-n",
        "default",
        "delete",
        "nimg",
        "deleted-while-away",
        "--timeout=30s",
    ]);
    ok(&[
        "-n",
        NS,
        "patch",
        "daemonset",
        "nixery-agent",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/template/spec/nodeSelector"}]"#,
    ]);
    rollout(
        NS,
        "daemonset/nixery-agent",
        180,
        "the agent did not come back",
    );
    wait_for(
        "the deleted object's image to be dropped",
        Duration::from_secs(60),
        &agent_state,
        || (!catalog().contains("default/deleted-while-away")).then_some(()),
    );
    assert!(
        catalog().contains("default/curl-and-jq"),
        "an existing object's image stays"
    );
    let roots_after = std::fs::read_dir("/var/lib/nixery/gcroots")
        .unwrap()
        .count();
    assert!(
        roots_after < roots_before,
        "its GC roots go too: {roots_before} -> {roots_after}"
    );

    // 8. Uninstall with NixImages present: done within a minute, nothing stuck.
    ok_in(
        &["delete", "--wait=true", "--timeout=120s", "-f", "-"],
        &to_yaml(&workloads),
    );
    ok(&[
        "-n",
        "default",
        "delete",
        "pod",
        "after-upgrade",
        "--timeout=60s",
    ]);
    assert!(!jsonpath(&["-n", "default", "nimg"], "{.items[*].metadata.name}").is_empty());
    let started = Instant::now();
    let (deleted, out, err) =
        kubectl(&["delete", "-k", offline.to_str().unwrap(), "--timeout=60s"]);
    let took = started.elapsed();
    assert!(deleted, "kubectl delete -k: {out}{err}\n{}", agent_state());
    assert!(took < Duration::from_secs(90), "uninstall took {took:?}");
    figures.push(format!(
        "uninstall with NixImages present: {:.1} s",
        took.as_secs_f64()
    ));
    for (what, args) in [
        ("the CRD", vec!["get", "crd", CRD]),
        ("the namespace", vec!["get", "namespace", NS]),
    ] {
        wait_for(
            &format!("{what} to be gone"),
            Duration::from_secs(60),
            &agent_state,
            || (!kubectl(&args).0).then_some(()),
        );
    }
    left.kustomizations.clear();
    left.manifests.clear();
    // Whatever the agent did not see go (it may have been stopped before the
    // CRD took the objects with it) goes when an agent starts again.
    let leftover = catalog().matches("default/").count();

    // 9. The install again, through a nix-daemon on the host: the agent
    // builds through the daemon's socket with no capabilities, and drops the
    // images of the objects deleted while it was away.
    let daemon_log = tmp.path().join("nix-daemon.log");
    remove_later_if_new(&mut left, "/nix/var/nix/daemon-socket/socket");
    let daemon = Command::new("nix-daemon")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&daemon_log).unwrap())
        .spawn()
        .expect("starting the host's nix-daemon");
    left.processes.push(daemon);
    wait_for(
        "the nix-daemon socket",
        Duration::from_secs(10),
        &String::new,
        || {
            Path::new("/nix/var/nix/daemon-socket/socket")
                .exists()
                .then_some(())
        },
    );
    let with_daemon = overlay(
        &tmp.path().join("nix-daemon"),
        &["deploy/base"],
        &["deploy/components/offline", "deploy/components/nix-daemon"],
        "latest",
    );
    left.kustomizations.push(with_daemon.clone());
    ok(&["apply", "-k", with_daemon.to_str().unwrap()]);
    rollout(
        NS,
        "daemonset/nixery-agent",
        180,
        "the nix-daemon install did not roll out",
    );
    let caps = jsonpath(
        &["-n", NS, "daemonset", "nixery-agent"],
        "{.spec.template.spec.containers[0].securityContext.capabilities.add}",
    );
    assert!(caps.is_empty() || caps == "[]", "{caps}");
    wait_for(
        "the images of deleted objects to be dropped",
        Duration::from_secs(60),
        &agent_state,
        || (!catalog().contains("default/")).then_some(()),
    );
    figures.push(format!(
        "reinstall: the images of {leftover} objects deleted while no agent ran were dropped at start"
    ));
    // A new derivation on every evaluation: a real build, through the daemon.
    niximage_ready(&mut left, "through-the-daemon", &["freshHello"], 180);
    let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
    assert!(
        log.contains("accepted connection"),
        "the agent never talked to the daemon: {log}"
    );
    let started = Instant::now();
    let (deleted, out, err) = kubectl(&[
        "delete",
        "-k",
        with_daemon.to_str().unwrap(),
        "--timeout=60s",
    ]);
    assert!(deleted, "{out}{err}");
    figures.push(format!(
        "uninstall (nix-daemon overlay): {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    left.kustomizations.clear();
    left.manifests.clear();
    figures.push(format!("whole test: {:.0} s", t0.elapsed().as_secs_f64()));
    eprintln!("FIGURES {test}:\n  {}", figures.join("\n  "));
}

fn ok_in(args: &[&str], input: &str) -> String {
    let (ok, out, err) = kubectl_in(args, input);
    assert!(ok, "kubectl {}: {err}{out}", args.join(" "));
    out
}

#[test]
fn the_api_server_refuses_what_can_never_build() {
    let test = "the_api_server_refuses_what_can_never_build";
    let Some(_turn) = cluster(test) else { return };
    let (existed, _, _) = kubectl(&["get", "crd", CRD]);
    struct RemoveCrd(bool);
    impl Drop for RemoveCrd {
        fn drop(&mut self) {
            if self.0 {
                let _ = kubectl(&["delete", "crd", CRD, "--ignore-not-found"]);
            }
        }
    }
    let _crd = RemoveCrd(!existed);
    ok_in(&["apply", "-f", "-"], &nixery::k8s::crd::crd_yaml());
    ok(&[
        "wait",
        "--for=condition=Established",
        &format!("crd/{CRD}"),
        "--timeout=60s",
    ]);
    let apply = |spec: Value| {
        let obj = json!({
            "apiVersion": "k8s.nixos.org/v1alpha1", "kind": "NixImage",
            "metadata": { "name": "refused", "namespace": "default" }, "spec": spec
        });
        kubectl_in(&["apply", "--dry-run=server", "-f", "-"], &obj.to_string())
    };
    for (spec, says) in [
        (json!({ "contents": [] }), "spec.contents: Required value: contents must name at least one package"),
        (json!({ "contents": ["curl", "$(reboot)"] }), "\"$(reboot)\" is not a package attribute path (such as curl or python3Packages.requests)"),
        (json!({ "contents": ["a..b"] }), "\"a..b\" is not a package attribute path"),
        (json!({ "contents": ["curl"], "tag": "-v1" }), "spec.tag: Invalid value: \"string\": tag must be 1 to 128 letters, digits, '_', '.' or '-', and not start with '.' or '-'"),
        (json!({ "contents": ["curl"], "tag": "t".repeat(129) }), "spec.tag"),
        (json!({ "contents": ["curl"], "source": { "repo": "https://x/y", "channel": "nixos-unstable" } }), "spec.source: Invalid value: \"object\": source names exactly one of path, repo or channel"),
        (json!({ "contents": ["curl"], "source": {} }), "source names exactly one of path, repo or channel"),
        (json!({ "contents": vec!["x"; 65] }), "spec.contents: Too many"),
    ] {
        let (accepted, out, err) = apply(spec.clone());
        assert!(!accepted, "accepted {spec}: {out}");
        assert!(err.contains(says), "{spec}: {err}");
    }
    // What can build is admitted.
    for spec in [
        json!({ "contents": ["curl", "python3Packages.requests", "gtk+3"] }),
        json!({ "contents": ["git"], "tag": "nixos-24.05", "source": { "repo": "https://github.com/NixOS/nixpkgs" } }),
    ] {
        let (accepted, out, err) = apply(spec.clone());
        assert!(accepted, "refused {spec}: {out}{err}");
    }
    // kubectl explain reads well: the kind says what it is, not a placeholder.
    let explained = ok(&["explain", "niximage"]);
    assert!(
        explained.contains("A container image that Nix builds"),
        "{explained}"
    );
    assert!(!explained.contains("Auto-generated"), "{explained}");
    let spec = ok(&["explain", "niximage.spec.contents"]);
    assert!(spec.contains("Package attribute paths"), "{spec}");
}

/// A node's agent with deploy/components/arm64-emulation builds a NixImage
/// for amd64 and arm64: its status names the index of both, the node's
/// registry serves that index by digest, and a Pod runs from it.
#[test]
fn an_index_of_every_architecture_on_a_real_node() {
    let test = "an_index_of_every_architecture_on_a_real_node";
    let Some(_turn) = cluster(test) else { return };
    let (crd_exists, _, _) = kubectl(&["get", "crd", CRD]);
    let (ns_exists, _, _) = kubectl(&["get", "namespace", NS]);
    if crd_exists || ns_exists {
        skip(&format!("{test}: nixery is installed on this cluster already; this test installs and uninstalls it"));
        return;
    }
    // deploy/components/arm64-emulation mounts the default roots directory.
    if !can_emulate(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut left = Leftovers::default();
    agent_image_and_offline_set(tmp.path(), &mut left);
    let install = overlay(
        &tmp.path().join("arm64"),
        &["deploy/offline"],
        &["deploy/components/arm64-emulation"],
        "latest",
    );
    left.kustomizations.push(install.clone());
    ok(&["apply", "-k", install.to_str().unwrap()]);
    rollout(
        NS,
        "daemonset/nixery-agent",
        180,
        "the DaemonSet did not roll out",
    );
    niximage_ready(&mut left, "hello-everywhere", &["hello"], 600);

    let status = |path: &str| jsonpath(&["-n", "default", "nimg", "hello-everywhere"], path);
    assert_eq!(status("{.status.platforms[*].architecture}"), "amd64 arm64");
    assert_eq!(status("{.status.nodes[0].arch}"), "amd64");
    let index = status("{.status.digest}");
    let own = status("{.status.nodes[0].digest}");
    assert_ne!(
        index, own,
        "the object names the index, not the node's manifest"
    );
    let (code, body) = http_get_accept(
        &format!("http://127.0.0.1:5000/v2/niximage/default/hello-everywhere/manifests/{index}"),
        "application/vnd.oci.image.index.v1+json",
    );
    assert_eq!(code, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    let archs: Vec<&str> = listed["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    assert_eq!(listed["manifests"][0]["digest"], own.as_str());

    // A Pod of the object's image: the kubelet resolves the index to its
    // node's architecture.
    let image = status("{.status.image}");
    assert!(image.ends_with(&format!("@{index}")), "{image}");
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "hello-everywhere", "namespace": "default" },
        "spec": { "hostNetwork": true, "restartPolicy": "Never", "containers": [{
            "name": "hello", "image": image, "command": ["hello"] }] }
    });
    left.manifests
        .insert(0, serde_yaml::to_string(&pod).unwrap());
    ok_in(&["apply", "-f", "-"], &pod.to_string());
    wait_for(
        "pod hello-everywhere to succeed",
        Duration::from_secs(180),
        &agent_state,
        || match jsonpath(
            &["-n", "default", "pod", "hello-everywhere"],
            "{.status.phase}",
        )
        .as_str()
        {
            "Succeeded" => Some(()),
            "Failed" => panic!(
                "the pod failed: {}",
                kubectl(&["-n", "default", "logs", "hello-everywhere"]).1
            ),
            _ => None,
        },
    );
    assert_eq!(
        ok(&["-n", "default", "logs", "hello-everywhere"]),
        "Hello, world!\n"
    );
    // `left` uninstalls and removes what the test added.
}
