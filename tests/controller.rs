//! Reconciler tests against kube-rs's mocked API server (tower-test), with
//! the real pipeline (real Nix on nix/offline-pkgs) behind the controller.
//! The fake server asserts every call's method, path, field manager and body,
//! applies status patches as server-side apply would (node entries merge by
//! key), and times out on a call that never came.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use nixery::controller::{self, Context};
use nixery::crd::NixImage;
use nixery::registry::AppState;
use serde_json::{json, Value};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One call the controller made.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    query: HashMap<String, String>,
    body: Value,
}

impl Call {
    fn manager(&self) -> &str {
        self.query
            .get("fieldManager")
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// The API server's copy of the one object under test.
#[derive(Clone)]
struct Server(Arc<Mutex<Value>>);

impl Server {
    fn new(obj: Value) -> Self {
        Server(Arc::new(Mutex::new(obj)))
    }
    fn object(&self) -> NixImage {
        serde_json::from_value(self.0.lock().unwrap().clone()).unwrap()
    }

    /// Answers exactly `n` calls, each within `timeout`, and returns them.
    async fn answer(&self, handle: &mut Handle, n: usize, timeout: Duration) -> Vec<Call> {
        let mut calls = Vec::new();
        for i in 0..n {
            let (req, send) = tokio::time::timeout(timeout, handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("call {} of {n} never came; so far: {calls:#?}", i + 1))
                .expect("service not called");
            calls.push(self.respond(req, send).await);
        }
        calls
    }

    /// Records one call, applies it to the object, and answers with the object.
    async fn respond(
        &self,
        req: Request<Body>,
        send: tower_test::mock::SendResponse<Response<Body>>,
    ) -> Call {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.replace("%2F", "/")))
            .collect();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let call = Call {
            method,
            path,
            query,
            body,
        };
        let response = self.apply(&call);
        send.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(serde_json::to_vec(&response).unwrap()))
                .unwrap(),
        );
        call
    }

    /// Answers every call until `done` finishes; returns the calls.
    async fn answer_until<T>(
        &self,
        handle: &mut Handle,
        done: tokio::task::JoinHandle<T>,
    ) -> (T, Vec<Call>) {
        let mut calls = Vec::new();
        tokio::pin!(done);
        loop {
            tokio::select! {
                r = &mut done => return (r.unwrap(), calls),
                next = handle.next_request() => {
                    let (req, send) = next.expect("service not called");
                    calls.push(self.respond(req, send).await);
                }
            }
        }
    }

    /// Asserts that no call arrives within `wait`.
    async fn expect_silence(handle: &mut Handle, wait: Duration) {
        if let Ok(Some((req, _))) = tokio::time::timeout(wait, handle.next_request()).await {
            panic!("unexpected call: {} {}", req.method(), req.uri());
        }
    }

    fn apply(&self, call: &Call) -> Value {
        let mut obj = self.0.lock().unwrap();
        if call.path.contains("/events") {
            return call.body.clone();
        }
        if call.path.ends_with("/status") {
            let status = call.body["status"].clone();
            let current = obj["status"].as_object().cloned().unwrap_or_default();
            let mut next = current.clone();
            if let Some(nodes) = status.get("nodes").and_then(Value::as_array) {
                let mut all: Vec<Value> = current
                    .get("nodes")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for n in nodes {
                    all.retain(|e| e["node"] != n["node"]);
                    all.push(n.clone());
                }
                all.sort_by_key(|e| e["node"].as_str().unwrap_or("").to_string());
                next.insert("nodes".into(), Value::Array(all));
            } else {
                // The shared aggregate manager owns these fields: absent ones go.
                for k in [
                    "observedGeneration",
                    "phase",
                    "image",
                    "digest",
                    "layers",
                    "size",
                    "readyNodes",
                    "conditions",
                ] {
                    match status.get(k) {
                        Some(v) => next.insert(k.into(), v.clone()),
                        None => next.remove(k),
                    };
                }
            }
            obj["status"] = Value::Object(next);
        } else if let Some(ops) = call.body.as_array() {
            // JSON patch of metadata.finalizers, as kube's finalizer helper sends.
            for op in ops {
                let path = op["path"].as_str().unwrap_or("");
                match (op["op"].as_str().unwrap_or(""), path) {
                    ("test", _) => {}
                    ("add" | "replace", "/metadata/finalizers") => {
                        obj["metadata"]["finalizers"] = op["value"].clone()
                    }
                    ("add", "/metadata/finalizers/-") => obj["metadata"]["finalizers"]
                        .as_array_mut()
                        .unwrap()
                        .push(op["value"].clone()),
                    ("remove", p) if p.starts_with("/metadata/finalizers/") => {
                        let i: usize = p.rsplit('/').next().unwrap().parse().unwrap();
                        obj["metadata"]["finalizers"]
                            .as_array_mut()
                            .unwrap()
                            .remove(i);
                    }
                    other => panic!("unexpected JSON patch op {other:?}"),
                }
            }
        } else {
            panic!("unexpected call {call:#?}");
        }
        obj.clone()
    }
}

/// A NixImage as the API server would hold it.
fn niximage(name: &str, generation: i64, contents: &[&str], finalizers: &[&str]) -> Value {
    json!({
        "apiVersion": "k8s.nixos.org/v1alpha1",
        "kind": "NixImage",
        "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"), "generation": generation, "resourceVersion": "1", "finalizers": finalizers },
        "spec": { "contents": contents, "tag": "v1" }
    })
}

fn context(node: &str, state: &AppState) -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: controller::FIELD_MANAGER.into(),
            instance: Some(node.into()),
        },
    );
    let ctx = Context {
        client,
        builder: state.builder.clone(),
        named: state.named.clone(),
        metrics: state.metrics.clone(),
        recorder,
        node: node.into(),
        public_host: "127.0.0.1:5000".into(),
        progress_interval: Duration::from_secs(3600),
        failures: Default::default(),
    };
    (Arc::new(ctx), handle)
}

/// One agent (node-a) and the API server's copy of a fresh `curl-and-jq`
/// holding the agent's finalizer, with the given contents.
fn one_agent(contents: &[&str]) -> (tempfile::TempDir, AppState, Arc<Context>, Handle, Server) {
    let dir = tempfile::tempdir().unwrap();
    let state = nixery::app_state(&settings(dir.path())).unwrap();
    let (ctx, handle) = context("node-a", &state);
    let server = Server::new(niximage(
        "curl-and-jq",
        1,
        contents,
        &["k8s.nixos.org/nixery-node-a"],
    ));
    (dir, state, ctx, handle, server)
}

const BUILD_TIMEOUT: Duration = Duration::from_secs(120);
const STATUS_PATH: &str =
    "/apis/k8s.nixos.org/v1alpha1/namespaces/default/niximages/curl-and-jq/status";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

fn assert_node_patch(c: &Call, node: &str, phase: &str) {
    assert_eq!(
        (c.method.as_str(), c.path.as_str()),
        ("PATCH", STATUS_PATH),
        "{c:#?}"
    );
    assert_eq!(c.manager(), format!("nixery.k8s.nixos.org/{node}"));
    assert_eq!(c.query.get("force").map(String::as_str), Some("true"));
    let nodes = c.body["status"]["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "a node writes only its own entry");
    assert_eq!(nodes[0]["node"], node);
    assert_eq!(nodes[0]["phase"], phase, "{c:#?}");
    assert_eq!(
        c.body["status"].as_object().unwrap().len(),
        1,
        "nothing but nodes"
    );
}

fn assert_aggregate_patch(c: &Call, phase: &str, ready_nodes: &str) {
    assert_eq!(
        (c.method.as_str(), c.path.as_str()),
        ("PATCH", STATUS_PATH),
        "{c:#?}"
    );
    assert_eq!(c.manager(), "nixery.k8s.nixos.org");
    assert!(c.body["status"].get("nodes").is_none());
    assert_eq!(c.body["status"]["phase"], phase, "{c:#?}");
    assert_eq!(c.body["status"]["readyNodes"], ready_nodes);
    assert_eq!(c.body["status"]["conditions"][0]["type"], "Ready");
}

fn assert_event(c: &Call, reason: &str, type_: &str) {
    assert_eq!(
        (c.method.as_str(), c.path.as_str()),
        ("POST", EVENTS_PATH),
        "{c:#?}"
    );
    assert_eq!(c.body["reason"], reason);
    assert_eq!(c.body["type"], type_);
    assert_eq!(c.body["regarding"]["name"], "curl-and-jq");
}

/// Reconciles once while the fake server answers `n` calls.
async fn reconcile(
    server: &Server,
    ctx: &Arc<Context>,
    handle: &mut Handle,
    n: usize,
) -> (Result<Action, controller::Error>, Vec<Call>) {
    let obj = Arc::new(server.object());
    let ctx2 = ctx.clone();
    let task = tokio::spawn(async move { controller::reconcile(obj, ctx2).await });
    let calls = server.answer(handle, n, BUILD_TIMEOUT).await;
    let result = tokio::time::timeout(BUILD_TIMEOUT, task)
        .await
        .expect("reconcile hung")
        .unwrap();
    Server::expect_silence(handle, Duration::from_millis(300)).await;
    (result, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_status_events_no_rewrites_spec_change_and_deletion() {
    let (dir, state, ctx, mut handle, server) = one_agent(&["curl", "jq"]);

    // First build: Building, aggregate, event; Ready, aggregate, event.
    let (result, calls) = reconcile(&server, &ctx, &mut handle, 6).await;
    assert!(result.is_ok(), "{result:?}");
    assert_node_patch(&calls[0], "node-a", "Building");
    assert_aggregate_patch(&calls[1], "Building", "0/1");
    assert_event(&calls[2], "BuildStarted", "Normal");
    assert_node_patch(&calls[3], "node-a", "Ready");
    assert_aggregate_patch(&calls[4], "Ready", "1/1");
    assert_event(&calls[5], "BuildSucceeded", "Normal");
    let status = server.object().status.unwrap();
    let digest = status.digest.clone().unwrap();
    assert_eq!(
        status.image.as_deref(),
        Some(format!("127.0.0.1:5000/niximage/default/curl-and-jq:v1@{digest}").as_str())
    );
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.conditions[0].status, "True");
    assert!(status.layers.unwrap() > 2);

    // The registry serves it, by the reference in status.
    let r = get(&state, "/v2/niximage/default/curl-and-jq/manifests/v1").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(
        get(&state, "/v2/niximage/default/curl-and-jq/manifests/v2")
            .await
            .error_code(),
        "MANIFEST_UNKNOWN"
    );
    assert_eq!(
        get(&state, "/v2/_catalog").await.json()["repositories"],
        json!(["niximage/default/curl-and-jq"])
    );
    assert_eq!(
        get(&state, "/v2/niximage/default/curl-and-jq/tags/list")
            .await
            .json()["tags"],
        json!(["v1"])
    );

    // Unchanged object: no writes at all.
    let (result, calls) = reconcile(&server, &ctx, &mut handle, 0).await;
    assert!(result.is_ok());
    assert!(calls.is_empty());

    // Spec change: a new generation rebuilds, with a new digest.
    {
        let mut obj = server.0.lock().unwrap();
        obj["metadata"]["generation"] = json!(2);
        obj["spec"]["contents"] = json!(["jq"]);
    }
    let (result, calls) = reconcile(&server, &ctx, &mut handle, 6).await;
    assert!(result.is_ok(), "{result:?}");
    assert_node_patch(&calls[0], "node-a", "Building");
    assert_aggregate_patch(&calls[1], "Building", "0/1");
    assert_node_patch(&calls[3], "node-a", "Ready");
    let status = server.object().status.unwrap();
    assert_eq!(status.observed_generation, Some(2));
    assert_ne!(status.digest.as_deref(), Some(digest.as_str()));
    // Ready again for the new generation.
    assert_eq!(status.conditions[0].status, "True");

    // Deletion: the finalizer drops the image and the node's GC roots.
    let gcroots = std::fs::read_dir(dir.path().join("gcroots"))
        .unwrap()
        .count();
    assert!(gcroots >= 2);
    {
        let mut obj = server.0.lock().unwrap();
        obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    let (result, calls) = reconcile(&server, &ctx, &mut handle, 2).await;
    assert!(result.is_ok(), "{result:?}");
    assert_event(&calls[0], "Deleted", "Normal");
    assert_eq!(
        (calls[1].method.as_str(), calls[1].path.as_str()),
        (
            "PATCH",
            "/apis/k8s.nixos.org/v1alpha1/namespaces/default/niximages/curl-and-jq"
        )
    );
    assert_eq!(
        server.object().metadata.finalizers.unwrap_or_default(),
        Vec::<String>::new()
    );
    assert_eq!(
        get(&state, "/v2/niximage/default/curl-and-jq/manifests/v1")
            .await
            .error_code(),
        "NAME_UNKNOWN"
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("gcroots"))
            .unwrap()
            .count(),
        gcroots - 1,
        "the image's GC roots are gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_build_reports_and_backs_off() {
    let (_dir, state, ctx, mut handle, server) = one_agent(&["broken"]);
    let (result, calls) = reconcile(&server, &ctx, &mut handle, 6).await;
    let err = result.unwrap_err();
    assert!(
        err.to_string().contains("fails to build on purpose"),
        "{err}"
    );
    assert_node_patch(&calls[3], "node-a", "Failed");
    assert_aggregate_patch(&calls[4], "Failed", "0/1");
    assert_event(&calls[5], "BuildFailed", "Warning");
    let status = server.object().status.unwrap();
    assert_eq!(status.conditions[0].status, "False");
    assert_eq!(status.conditions[0].reason, "BuildFailed");
    assert!(status.conditions[0]
        .message
        .contains("fails to build on purpose"));
    assert_eq!(
        get(&state, "/v2/niximage/default/curl-and-jq/manifests/v1")
            .await
            .error_code(),
        "MANIFEST_UNKNOWN"
    );

    // Backoff grows per failure of this object.
    let obj = Arc::new(server.object());
    let first = controller::error_policy(obj.clone(), &err, ctx.clone());
    let second = controller::error_policy(obj, &err, ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(5)));
    assert_eq!(second, Action::requeue(Duration::from_secs(10)));

    // Unknown packages are a user error with their own reason.
    {
        let mut obj = server.0.lock().unwrap();
        obj["metadata"]["generation"] = json!(2);
        obj["spec"]["contents"] = json!(["nosuchpkg"]);
    }
    let (result, calls) = reconcile(&server, &ctx, &mut handle, 6).await;
    assert!(result.is_err());
    assert_event(&calls[5], "UnknownPackages", "Warning");
    assert!(server.object().status.unwrap().conditions[0]
        .message
        .contains("nosuchpkg"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_share_one_object_without_fighting() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (sa, sb) = (
        nixery::app_state(&settings(da.path())).unwrap(),
        nixery::app_state(&settings(db.path())).unwrap(),
    );
    let (a, mut ha) = context("node-a", &sa);
    let (b, mut hb) = context("node-b", &sb);
    let server = Server::new(niximage(
        "curl-and-jq",
        1,
        &["hello"],
        &["k8s.nixos.org/nixery-node-a"],
    ));

    let (result, _) = reconcile(&server, &a, &mut ha, 6).await;
    assert!(result.is_ok());
    assert_eq!(
        server.object().status.unwrap().ready_nodes.as_deref(),
        Some("1/1")
    );

    // Agent B adds its own finalizer first, leaving A's in place.
    let (result, calls) = reconcile(&server, &b, &mut hb, 1).await;
    assert!(result.is_ok());
    assert_eq!(calls[0].method, "PATCH");
    assert_eq!(
        server.object().metadata.finalizers.unwrap(),
        vec!["k8s.nixos.org/nixery-node-a", "k8s.nixos.org/nixery-node-b"]
    );

    // Then builds on its node; the aggregate goes 1/2 and then 2/2.
    let (result, calls) = reconcile(&server, &b, &mut hb, 6).await;
    assert!(result.is_ok(), "{result:?}");
    assert_node_patch(&calls[0], "node-b", "Building");
    assert_aggregate_patch(&calls[1], "Building", "1/2");
    assert_node_patch(&calls[3], "node-b", "Ready");
    assert_aggregate_patch(&calls[4], "Ready", "2/2");
    let status = server.object().status.unwrap();
    assert_eq!(status.nodes.len(), 2);
    // Reproducible builds: both nodes agree on the digest.
    assert_eq!(status.nodes[0].digest, status.nodes[1].digest);
    assert_eq!(status.digest, status.nodes[0].digest);

    // Both agents now see a settled object and write nothing.
    let (_, calls) = reconcile(&server, &a, &mut ha, 0).await;
    assert!(calls.is_empty());
    let (_, calls) = reconcile(&server, &b, &mut hb, 0).await;
    assert!(calls.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_build_shows_how_far_it_got() {
    let dir = tempfile::tempdir().unwrap();
    let state = nixery::app_state(&settings(dir.path())).unwrap();
    let (ctx, mut handle) = context("node-a", &state);
    // Report every stage change at once.
    let ctx = Arc::new(Context {
        progress_interval: Duration::ZERO,
        ..Arc::try_unwrap(ctx).ok().unwrap()
    });
    let server = Server::new(niximage(
        "curl-and-jq",
        1,
        &["curl", "jq", "shell"],
        &["k8s.nixos.org/nixery-node-a"],
    ));
    let obj = Arc::new(server.object());
    let task = tokio::spawn(controller::reconcile(obj, ctx.clone()));
    let (result, calls) =
        tokio::time::timeout(BUILD_TIMEOUT, server.answer_until(&mut handle, task))
            .await
            .expect("reconcile hung");
    assert!(result.is_ok(), "{result:?}");
    let messages: Vec<String> = calls
        .iter()
        .filter(|c| {
            c.manager() == "nixery.k8s.nixos.org/node-a"
                && c.body["status"]["nodes"][0]["phase"] == "Building"
        })
        .map(|c| {
            c.body["status"]["nodes"][0]["message"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("packing layers") || m == "evaluating" || m == "building"),
        "no progress in status: {messages:?}"
    );
    // The last node write is the final Ready, never a late progress message.
    let last = calls
        .iter()
        .rev()
        .find(|c| c.manager() == "nixery.k8s.nixos.org/node-a")
        .unwrap();
    assert_eq!(last.body["status"]["nodes"][0]["phase"], "Ready");
    assert_eq!(
        server.object().status.unwrap().phase.as_deref(),
        Some("Ready")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_image_pulls_with_real_clients_then_404s_after_deletion() {
    if !have_tool("skopeo", "named_image_pulls_with_real_clients")
        || !have_tool("docker", "named_image_pulls_with_real_clients")
    {
        return;
    }
    let (_dir, state, ctx, mut handle, server) = one_agent(&["curl", "jq", "shell"]);
    let (result, _) = reconcile(&server, &ctx, &mut handle, 6).await;
    assert!(result.is_ok(), "{result:?}");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(nixery::serve_on(listener, state.clone(), async move {
        let _ = stop_rx.await;
    }));
    let image = format!("{addr}/niximage/default/curl-and-jq:v1");
    let img = image.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        let (ok, _, err) = run(std::process::Command::new("skopeo").args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{img}"),
        ]));
        assert!(ok, "skopeo inspect: {err}");
        run(std::process::Command::new("docker").args([
            "run",
            "--rm",
            &img,
            "sh",
            "-c",
            "echo '{\"a\":42}' | jq .a",
        ]))
    })
    .await
    .unwrap();
    assert!(ok, "docker run: {err}");
    assert_eq!(out.trim(), "42");
    let _ = std::process::Command::new("docker")
        .args(["rmi", "-f", &image])
        .output();

    server.0.lock().unwrap()["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let (result, _) = reconcile(&server, &ctx, &mut handle, 2).await;
    assert!(result.is_ok());
    let r = get(&state, "/v2/niximage/default/curl-and-jq/manifests/v1").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
    let _ = stop_tx.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_spec_is_reported_and_not_retried() {
    // The CRD's schema rejects such names at the API server; the controller
    // still refuses them itself, as a user error (no backoff, no build).
    let (_dir, state, ctx, mut handle, server) = one_agent(&["curl", "$(reboot)"]);
    let (result, calls) = reconcile(&server, &ctx, &mut handle, 3).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_node_patch(&calls[0], "node-a", "Failed");
    assert_aggregate_patch(&calls[1], "Failed", "0/1");
    assert_event(&calls[2], "InvalidSpec", "Warning");
    assert!(server.object().status.unwrap().conditions[0]
        .message
        .contains("is not a package attribute path"));
    let m = String::from_utf8_lossy(&get(&state, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_builds_total"), 0.0, "nothing was built");
}
