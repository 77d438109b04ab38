//! Reconciler tests against kube-rs's mocked API server (tower-test), with
//! the real pipeline behind the controller: a fake Nix (canned packages, real
//! store files) for most, real Nix on nix/offline-pkgs where the test is about
//! what Nix makes (images that real clients run, real packing progress, a
//! source that cannot be fetched).
//!
//! The fake API server models what a real one (kube-apiserver 1.34) does with
//! the calls the agent makes, and checks each call the way it would:
//! - server-side apply: `Content-Type: application/apply-patch+yaml`, a
//!   `fieldManager`, `force=true`, a body with `apiVersion` and `kind`; each
//!   manager owns what it applied (`status.nodes` entries by key, as a
//!   list-map, or top-level status fields), and what a manager stops applying
//!   is removed, as SSA does;
//! - JSON patch (`application/json-patch+json`): `test` ops are enforced and a
//!   failed one is answered 422, as the API server does;
//! - events are created (POST) or a series patched (merge patch);
//! - any call can be answered 404, 409 or 500 on request, and unknown objects
//!   are 404.
//!
//! The tests assert every call the agent makes (method, path, manager and
//! body), time out on a call that never came, and check that nothing more came.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use common::*;
use http::{Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::{reflector, watcher};
use kube::Client;
use nixery::k8s::controller::{self, Context, Wiring};
use nixery::k8s::crd::NixImage;
use nixery::registry::AppState;
use serde_json::{json, Value};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const OBJECT_PATH: &str = "/apis/k8s.nixos.org/v1alpha1/namespaces/default/niximages/curl-and-jq";
const STATUS_PATH: &str =
    "/apis/k8s.nixos.org/v1alpha1/namespaces/default/niximages/curl-and-jq/status";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

/// One call the agent made.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    query: HashMap<String, String>,
    content_type: String,
    body: Value,
    /// The status code the fake server answered.
    answered: u16,
}

impl Call {
    fn manager(&self) -> &str {
        self.query
            .get("fieldManager")
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// The fake API server's state for the one object under test.
#[derive(Clone)]
struct Server(Arc<Mutex<ServerState>>);

struct ServerState {
    obj: Value,
    /// Server-side apply ownership of status: manager -> node keys it applied.
    node_owners: BTreeMap<String, BTreeSet<String>>,
    /// manager -> top-level status fields it applied (besides `nodes`).
    field_owners: BTreeMap<String, BTreeSet<String>>,
    /// Answers to give instead of the normal one, for the next calls.
    inject: Vec<u16>,
    resource_version: u64,
}

impl Server {
    fn new(obj: Value) -> Self {
        Server(Arc::new(Mutex::new(ServerState {
            obj,
            node_owners: BTreeMap::new(),
            field_owners: BTreeMap::new(),
            inject: Vec::new(),
            resource_version: 1,
        })))
    }
    fn object(&self) -> NixImage {
        serde_json::from_value(self.0.lock().unwrap().obj.clone()).unwrap()
    }
    fn edit(&self, f: impl FnOnce(&mut Value)) {
        f(&mut self.0.lock().unwrap().obj)
    }
    /// The next call is answered with this status instead.
    fn fail_next(&self, status: u16) {
        self.0.lock().unwrap().inject.push(status);
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

    /// Records one call, validates and applies it as the API server would.
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
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let mut call = Call {
            method,
            path,
            query,
            content_type,
            body,
            answered: 200,
        };
        let injected = {
            let mut st = self.0.lock().unwrap();
            (!st.inject.is_empty()).then(|| st.inject.remove(0))
        };
        let (code, response) = match injected {
            Some(code) => (code, status_body(code, "injected by the test")),
            None => self.apply(&call),
        };
        call.answered = code;
        send.send_response(
            Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&response).unwrap()))
                .unwrap(),
        );
        call
    }

    fn apply(&self, call: &Call) -> (u16, Value) {
        let mut st = self.0.lock().unwrap();
        if call.path == EVENTS_PATH && call.method == "POST" {
            assert_eq!(call.content_type, "application/json", "{call:#?}");
            return (201, call.body.clone());
        }
        if call.path.starts_with(EVENTS_PATH) && call.method == "PATCH" {
            assert_eq!(call.content_type, "application/merge-patch+json");
            return (200, call.body.clone());
        }
        if call.path != OBJECT_PATH && call.path != STATUS_PATH {
            return (404, status_body(404, "not found"));
        }
        st.resource_version += 1;
        let rv = st.resource_version.to_string();
        match (call.method.as_str(), call.content_type.as_str()) {
            ("PATCH", "application/apply-patch+yaml") => {
                assert_eq!(call.path, STATUS_PATH, "the agent applies status only");
                assert!(!call.manager().is_empty(), "SSA needs a field manager");
                assert_eq!(call.query.get("force").map(String::as_str), Some("true"));
                assert_eq!(call.body["apiVersion"], "k8s.nixos.org/v1alpha1");
                assert_eq!(call.body["kind"], "NixImage");
                let status = call.body["status"].as_object().cloned().unwrap_or_default();
                st.server_side_apply(call.manager(), &status);
            }
            ("PATCH", "application/json-patch+json") => {
                let ops = call.body.as_array().expect("a JSON patch is a list of ops");
                let mut next = st.obj.clone();
                for op in ops {
                    let ptr = op["path"].as_str().unwrap();
                    match op["op"].as_str().unwrap() {
                        "test" => {
                            if next.pointer(ptr) != Some(&op["value"]) {
                                return (422, status_body(422, "the test operation failed"));
                            }
                        }
                        "remove" => {
                            let (parent, last) = ptr.rsplit_once('/').unwrap();
                            match next.pointer_mut(parent) {
                                Some(Value::Array(a)) => {
                                    let i: usize = last.parse().unwrap();
                                    if i >= a.len() {
                                        return (422, status_body(422, "no such index"));
                                    }
                                    a.remove(i);
                                }
                                _ => return (422, status_body(422, "no such path")),
                            }
                        }
                        "add" | "replace" => {
                            let (parent, last) = ptr.rsplit_once('/').unwrap();
                            match next.pointer_mut(parent) {
                                Some(Value::Array(a)) if last == "-" => a.push(op["value"].clone()),
                                Some(Value::Object(o)) => {
                                    o.insert(last.to_string(), op["value"].clone());
                                }
                                _ => return (422, status_body(422, "no such path")),
                            }
                        }
                        other => panic!("unexpected JSON patch op {other}"),
                    }
                }
                // Removing entries through a JSON patch also drops their
                // owners' claim to them.
                let keys: BTreeSet<String> = next["status"]["nodes"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|n| n["node"].as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                for owned in st.node_owners.values_mut() {
                    owned.retain(|k| keys.contains(k));
                }
                st.obj = next;
            }
            other => panic!("unexpected call {other:?}: {call:#?}"),
        }
        st.obj["metadata"]["resourceVersion"] = json!(rv);
        (200, st.obj.clone())
    }
}

impl ServerState {
    /// Server-side apply of `status` by `manager`, with `nodes` a list-map
    /// keyed by `node`: the manager's entries and fields are replaced by what
    /// it applies now, and those it no longer applies are removed (nobody
    /// else owns them here).
    fn server_side_apply(&mut self, manager: &str, status: &serde_json::Map<String, Value>) {
        let mut current = self.obj["status"].as_object().cloned().unwrap_or_default();
        let mut nodes: Vec<Value> = current
            .get("nodes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let applied: Vec<Value> = status
            .get("nodes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let applied_keys: BTreeSet<String> = applied
            .iter()
            .map(|n| {
                n["node"]
                    .as_str()
                    .expect("a list-map entry has its key")
                    .to_string()
            })
            .collect();
        let previously = self.node_owners.remove(manager).unwrap_or_default();
        nodes.retain(|n| {
            let k = n["node"].as_str().unwrap_or("");
            !(previously.contains(k) || applied_keys.contains(k))
        });
        nodes.extend(applied);
        nodes.sort_by_key(|n| n["node"].as_str().unwrap_or("").to_string());
        if !applied_keys.is_empty() {
            self.node_owners.insert(manager.to_string(), applied_keys);
        }
        let fields: BTreeSet<String> = status.keys().filter(|k| *k != "nodes").cloned().collect();
        for f in self.field_owners.remove(manager).unwrap_or_default() {
            current.remove(&f);
        }
        for f in &fields {
            current.insert(f.clone(), status[f].clone());
        }
        if !fields.is_empty() {
            self.field_owners.insert(manager.to_string(), fields);
        }
        if nodes.is_empty() {
            current.remove("nodes");
        } else {
            current.insert("nodes".into(), Value::Array(nodes));
        }
        self.obj["status"] = Value::Object(current);
    }
}

fn status_body(code: u16, message: &str) -> Value {
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        422 => "Invalid",
        _ => "InternalError",
    };
    json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code })
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

/// An agent: its context (talking to a fresh mocked API server), the handle
/// that answers for that server, and the completion channel.
struct Agent {
    ctx: Arc<Context>,
    handle: Handle,
    wiring: Wiring,
}

fn agent(node: &str, host: &str, state: &AppState, configure: impl FnOnce(&mut Context)) -> Agent {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (mut ctx, wiring) = Context::new(
        client,
        state.builder.clone(),
        state.catalog.clone(),
        state.metrics.clone(),
        node,
        host,
    );
    ctx.progress_interval = Duration::from_secs(3600);
    configure(&mut ctx);
    Agent {
        ctx: Arc::new(ctx),
        handle,
        wiring,
    }
}

/// One agent (node-a) and the API server's copy of a fresh `curl-and-jq`
/// holding the agent's finalizer, with the given contents.
async fn one_agent(contents: &[&str]) -> (tempfile::TempDir, AppState, Agent, Server) {
    let dir = tempfile::tempdir().unwrap();
    let state = fake_state(dir.path()).await.0;
    one_agent_on(dir, state, contents)
}

/// The same, with real Nix.
async fn one_agent_real_nix(contents: &[&str]) -> (tempfile::TempDir, AppState, Agent, Server) {
    let dir = tempfile::tempdir().unwrap();
    let state = nixery::app_state(&settings(dir.path())).await.unwrap();
    one_agent_on(dir, state, contents)
}

fn one_agent_on(
    dir: tempfile::TempDir,
    state: AppState,
    contents: &[&str],
) -> (tempfile::TempDir, AppState, Agent, Server) {
    let a = agent("node-a", "127.0.0.1:5000", &state, |_| {});
    let server = Server::new(niximage(
        "curl-and-jq",
        1,
        contents,
        &["k8s.nixos.org/nixery-node-a"],
    ));
    (dir, state, a, server)
}

fn assert_node_patch(c: &Call, node: &str, phase: &str) {
    assert_eq!(
        (c.method.as_str(), c.path.as_str()),
        ("PATCH", STATUS_PATH),
        "{c:#?}"
    );
    assert_eq!(c.content_type, "application/apply-patch+yaml");
    assert_eq!(c.manager(), format!("nixery.k8s.nixos.org/{node}"));
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
    assert_eq!(c.content_type, "application/apply-patch+yaml");
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
        "a new event, not a series of an old one: {c:#?}"
    );
    assert_eq!(c.body["reason"], reason, "{c:#?}");
    assert_eq!(c.body["type"], type_);
    assert_eq!(c.body["regarding"]["name"], "curl-and-jq");
}

fn assert_finalizer_patch(c: &Call, removed: &str) {
    assert_eq!(
        (c.method.as_str(), c.path.as_str(), c.content_type.as_str()),
        ("PATCH", OBJECT_PATH, "application/json-patch+json"),
        "{c:#?}"
    );
    assert!(
        c.body
            .as_array()
            .unwrap()
            .iter()
            .any(|op| op["op"] == "test" && op["value"] == removed),
        "{c:#?}"
    );
    assert_eq!(c.answered, 200);
}

/// Reconciles once while the fake server answers `n` calls; then checks that
/// no other call comes.
async fn reconcile(
    server: &Server,
    a: &mut Agent,
    n: usize,
) -> (Result<Action, controller::Error>, Vec<Call>) {
    let obj = Arc::new(server.object());
    reconcile_object(server, a, obj, n).await
}

async fn reconcile_object(
    server: &Server,
    a: &mut Agent,
    obj: Arc<NixImage>,
    n: usize,
) -> (Result<Action, controller::Error>, Vec<Call>) {
    let ctx = a.ctx.clone();
    let task = tokio::spawn(async move { controller::reconcile(obj, ctx).await });
    let calls = server.answer(&mut a.handle, n, BUILD_TIMEOUT).await;
    let result = tokio::time::timeout(BUILD_TIMEOUT, task)
        .await
        .expect("reconcile hung")
        .unwrap();
    expect_silence(&mut a.handle, Duration::from_millis(300)).await;
    (result, calls)
}

/// Waits until the agent's build of the object finishes (it triggers the object).
async fn build_finished(a: &mut Agent) {
    let r = tokio::time::timeout(BUILD_TIMEOUT, a.wiring.completions.recv())
        .await
        .expect("the build never finished")
        .expect("completion channel closed");
    assert_eq!(r.name, "curl-and-jq");
}

/// Asserts that no call arrives within `wait`.
async fn expect_silence(handle: &mut Handle, wait: Duration) {
    if let Ok(Some((req, _))) = tokio::time::timeout(wait, handle.next_request()).await {
        panic!("unexpected call: {} {}", req.method(), req.uri());
    }
}

/// First reconcile starts the build (3 calls), the second reports it (3 calls).
async fn build_to_ready(server: &Server, a: &mut Agent, ready_nodes: (&str, &str)) -> Vec<Call> {
    let node = a.ctx.node.clone();
    let (result, mut calls) = reconcile(server, a, 3).await;
    assert!(result.is_ok(), "{result:?}");
    assert_node_patch(&calls[0], &node, "Building");
    assert_aggregate_patch(&calls[1], "Building", ready_nodes.0);
    assert_event(&calls[2], "BuildStarted", "Normal");
    build_finished(a).await;
    let (result, more) = reconcile(server, a, 3).await;
    assert!(result.is_ok(), "{result:?}");
    assert_node_patch(&more[0], &node, "Ready");
    assert_aggregate_patch(&more[1], "Ready", ready_nodes.1);
    assert_event(&more[2], "BuildSucceeded", "Normal");
    calls.extend(more);
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_status_events_no_rewrites_spec_change_and_deletion() {
    let (dir, state, mut a, server) = one_agent(&["curl", "jq"]).await;

    // The reconcile that starts the build returns at once; completion
    // triggers the object, and the next reconcile reports Ready.
    let calls = build_to_ready(&server, &mut a, ("0/1", "1/1")).await;
    let status = server.object().status.unwrap();
    let digest = status.digest.clone().unwrap();
    let reference = format!("127.0.0.1:5000/niximage/default/curl-and-jq:v1@{digest}");
    assert_eq!(status.image.as_deref(), Some(reference.as_str()));
    assert_eq!(status.nodes[0].image.as_deref(), Some(reference.as_str()));
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.conditions[0].status, "True");
    assert!(status.layers.unwrap() > 2);
    assert!(calls[5].body["note"].as_str().unwrap().contains(&digest));

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

    // Unchanged object: no writes at all, and no build.
    let (result, calls) = reconcile(&server, &mut a, 0).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(3600)));
    assert!(calls.is_empty());

    // Spec change: a new generation rebuilds, with a new digest, and the
    // newest BuildSucceeded event names it (a new event, not the old series).
    server.edit(|o| {
        o["metadata"]["generation"] = json!(2);
        o["spec"]["contents"] = json!(["jq"]);
    });
    let calls = build_to_ready(&server, &mut a, ("0/1", "1/1")).await;
    let status = server.object().status.unwrap();
    assert_eq!(status.observed_generation, Some(2));
    let new_digest = status.digest.clone().unwrap();
    assert_ne!(new_digest, digest);
    assert!(calls[2].body["note"]
        .as_str()
        .unwrap()
        .contains("generation 2"));
    assert!(calls[5].body["note"]
        .as_str()
        .unwrap()
        .contains(&new_digest));
    assert_eq!(status.conditions[0].status, "True");

    // Deletion: the finalizer drops the image and the node's GC roots.
    let gcroots = std::fs::read_dir(dir.path().join("state/gcroots"))
        .unwrap()
        .count();
    assert!(gcroots >= 2);
    server.edit(|o| o["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z"));
    let (result, calls) = reconcile(&server, &mut a, 2).await;
    assert!(result.is_ok(), "{result:?}");
    assert_event(&calls[0], "Deleted", "Normal");
    assert_finalizer_patch(&calls[1], "k8s.nixos.org/nixery-node-a");
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
        std::fs::read_dir(dir.path().join("state/gcroots"))
            .unwrap()
            .count(),
        gcroots - 1,
        "the image's GC roots are gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_object_after_a_build_neither_rebuilds_nor_flips_back() {
    let (_dir, _state, mut a, server) = one_agent(&["hello"]).await;
    let (result, _) = reconcile(&server, &mut a, 3).await;
    assert!(result.is_ok());
    // The informer's copy from before the build finished (status Building).
    let stale = Arc::new(server.object());
    build_finished(&mut a).await;
    let (result, _) = reconcile(&server, &mut a, 3).await;
    assert!(result.is_ok());
    assert_eq!(
        server.object().status.unwrap().phase.as_deref(),
        Some("Ready")
    );
    // Reconciling the stale copy: nothing is written, no BuildStarted again.
    let (result, calls) = reconcile_object(&server, &mut a, stale, 0).await;
    assert!(result.is_ok());
    assert!(calls.is_empty(), "{calls:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_build_backs_off_and_user_errors_wait_for_a_spec_change() {
    let (_dir, state, mut a, server) = one_agent(&["broken"]).await;
    let (result, _) = reconcile(&server, &mut a, 3).await;
    assert!(result.is_ok());
    build_finished(&mut a).await;
    let (result, calls) = reconcile(&server, &mut a, 3).await;
    let err = result.unwrap_err();
    assert!(
        err.to_string().contains("fails to build on purpose"),
        "{err}"
    );
    assert_node_patch(&calls[0], "node-a", "Failed");
    assert_eq!(calls[0].body["status"]["nodes"][0]["reason"], "BuildFailed");
    assert_aggregate_patch(&calls[1], "Failed", "0/1");
    assert_event(&calls[2], "BuildFailed", "Warning");
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
    // Our own status write triggers the object again at once: no rebuild
    // before the backoff has passed (a real cluster would loop otherwise).
    let builds = metric(
        &String::from_utf8_lossy(&get(&state, "/metrics").await.body),
        "nixery_builds_total",
    );
    let (result, calls) = reconcile(&server, &mut a, 0).await;
    assert!(calls.is_empty());
    match result.unwrap() {
        a if a == Action::await_change() => panic!("a build failure is retried"),
        _ => {}
    }
    let m = String::from_utf8_lossy(&get(&state, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_builds_total"), builds, "no rebuild yet");

    // The backoff is per object and grows with its failures.
    let obj = Arc::new(server.object());
    assert_eq!(
        controller::error_policy(obj.clone(), &err, a.ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        controller::error_policy(obj, &controller::Error::NoNamespace, a.ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );

    // Unknown packages are the user's error: their own reason in the
    // aggregate, and no retry until the spec changes.
    server.edit(|o| {
        o["metadata"]["generation"] = json!(2);
        o["spec"]["contents"] = json!(["nosuchpkg"]);
    });
    let (result, _) = reconcile(&server, &mut a, 3).await;
    assert!(result.is_ok());
    build_finished(&mut a).await;
    let (result, calls) = reconcile(&server, &mut a, 3).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_event(&calls[2], "UnknownPackages", "Warning");
    let status = server.object().status.unwrap();
    assert_eq!(status.conditions[0].reason, "UnknownPackages");
    assert!(status.conditions[0].message.contains("nosuchpkg"));
    let (result, calls) = reconcile(&server, &mut a, 0).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(calls.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_different_hosts_agree_and_then_write_nothing() {
    // Two nodes, one package set: the same store paths on both.
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let nix = Arc::new(nixery::nix::fake::FakeNix::standard(
        &da.path().join("store"),
    ));
    let (sa, sb) = (
        nixery::app_state_with(&settings(da.path()), nix.clone())
            .await
            .unwrap(),
        nixery::app_state_with(&settings(db.path()), nix)
            .await
            .unwrap(),
    );
    // A rollout that changes the port: the nodes serve on different hosts.
    let mut a = agent("node-a", "127.0.0.1:5000", &sa, |_| {});
    let mut b = agent("node-b", "127.0.0.1:6000", &sb, |_| {});
    let server = Server::new(niximage(
        "curl-and-jq",
        1,
        &["hello"],
        &["k8s.nixos.org/nixery-node-a"],
    ));

    build_to_ready(&server, &mut a, ("0/1", "1/1")).await;

    // Agent B adds its own finalizer first, leaving A's in place.
    let (result, calls) = reconcile(&server, &mut b, 1).await;
    assert!(result.is_ok());
    assert_eq!(calls[0].content_type, "application/json-patch+json");
    assert_eq!(
        server.object().metadata.finalizers.unwrap(),
        vec!["k8s.nixos.org/nixery-node-a", "k8s.nixos.org/nixery-node-b"]
    );

    // Then builds on its node; the aggregate goes 1/2 and then 2/2.
    build_to_ready(&server, &mut b, ("1/2", "2/2")).await;
    let status = server.object().status.unwrap();
    assert_eq!(status.nodes.len(), 2);
    // Reproducible builds: both nodes agree on the digest.
    assert_eq!(status.nodes[0].digest, status.nodes[1].digest);
    assert_eq!(status.digest, status.nodes[0].digest);
    // Each node's entry has its own host; the aggregate is computed from the
    // entries, the same whichever agent computes it.
    let digest = status.digest.clone().unwrap();
    assert_eq!(
        status.nodes[1].image.as_deref(),
        Some(format!("127.0.0.1:6000/niximage/default/curl-and-jq:v1@{digest}").as_str())
    );
    assert_eq!(
        status.image.as_deref(),
        Some(format!("127.0.0.1:5000/niximage/default/curl-and-jq:v1@{digest}").as_str())
    );

    // Both agents now see a settled object and write nothing, again and again.
    for _ in 0..3 {
        let (_, calls) = reconcile(&server, &mut a, 0).await;
        assert!(calls.is_empty(), "{calls:#?}");
        let (_, calls) = reconcile(&server, &mut b, 0).await;
        assert!(calls.is_empty(), "{calls:#?}");
    }
}

/// A Lease of `node` renewed `ago` seconds ago (40 s duration).
fn lease(node: &str, ago: i64) -> Lease {
    serde_json::from_value(json!({
        "metadata": { "name": nixery::k8s::lease::lease_name(node), "namespace": "nixery-system" },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": 40,
            "renewTime": (k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(ago)).to_string(),
        }
    }))
    .unwrap()
}

fn liveness(leases: &[Lease]) -> Arc<dyn nixery::k8s::lease::Liveness> {
    let (store, mut writer) = reflector::store::<Lease>();
    for l in leases {
        writer.apply_watcher_event(&watcher::Event::Apply(l.clone()));
    }
    Arc::new(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departed_nodes_hold_up_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = fake_state(dir.path()).await.0;
    // node-b's agent stopped renewing its Lease 100 s ago; node-c is alive.
    let leases = [lease("node-a", 1), lease("node-b", 100), lease("node-c", 2)];
    let mut a = agent("node-a", "127.0.0.1:5000", &state, |c| {
        c.liveness = liveness(&leases)
    });
    let server = Server::new(niximage(
        "curl-and-jq",
        1,
        &["hello"],
        &[
            "k8s.nixos.org/nixery-node-a",
            "k8s.nixos.org/nixery-node-b",
            "k8s.nixos.org/nixery-node-c",
        ],
    ));
    server.edit(|o| {
        o["status"] = json!({ "nodes": [
            { "node": "node-b", "phase": "Ready", "observedGeneration": 1, "digest": "sha256:old" },
            { "node": "node-c", "phase": "Building", "observedGeneration": 1 },
        ]});
    });

    // The live agent removes node-b's entry and finalizer (JSON patches that
    // test what they remove), then builds; readyNodes counts live nodes only.
    let (result, calls) = reconcile(&server, &mut a, 5).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        (calls[0].path.as_str(), calls[0].content_type.as_str()),
        (STATUS_PATH, "application/json-patch+json")
    );
    assert_eq!(
        calls[0].body[0],
        json!({ "op": "test", "path": "/status/nodes/0/node", "value": "node-b" })
    );
    assert_finalizer_patch(&calls[1], "k8s.nixos.org/nixery-node-b");
    assert_node_patch(&calls[2], "node-a", "Building");
    assert_aggregate_patch(&calls[3], "Building", "0/2");
    let obj = server.object();
    assert_eq!(
        obj.metadata.finalizers.clone().unwrap(),
        vec!["k8s.nixos.org/nixery-node-a", "k8s.nixos.org/nixery-node-c"]
    );
    let nodes: Vec<&str> = obj
        .status
        .as_ref()
        .unwrap()
        .nodes
        .iter()
        .map(|n| n.node.as_str())
        .collect();
    assert_eq!(nodes, vec!["node-a", "node-c"]);
    build_finished(&mut a).await;
    let (result, _) = reconcile(&server, &mut a, 3).await;
    assert!(result.is_ok(), "{result:?}");

    // A concurrent change (the entry moved): the test op fails with 422 and
    // nothing is removed; the reconcile fails and is retried.
    server.edit(|o| {
        o["metadata"]["finalizers"] =
            json!(["k8s.nixos.org/nixery-node-a", "k8s.nixos.org/nixery-node-b"]);
    });
    server.fail_next(409);
    let (result, calls) = reconcile(&server, &mut a, 1).await;
    assert!(
        matches!(result, Err(controller::Error::Departed(_))),
        "{result:?}"
    );
    assert_eq!(calls[0].answered, 409);

    // Deleting the object completes although node-b never comes back: its
    // finalizer goes, then node-a's own; node-c (alive) keeps its finalizer
    // until its own agent lets go, so node-a looks again soon.
    server.edit(|o| {
        o["metadata"]["finalizers"] = json!([
            "k8s.nixos.org/nixery-node-a",
            "k8s.nixos.org/nixery-node-b",
            "k8s.nixos.org/nixery-node-c"
        ]);
        o["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    });
    let (result, calls) = reconcile(&server, &mut a, 3).await;
    assert_eq!(
        result.unwrap(),
        Action::requeue(nixery::k8s::lease::RENEW_EVERY)
    );
    assert_finalizer_patch(&calls[0], "k8s.nixos.org/nixery-node-b");
    assert_event(&calls[1], "Deleted", "Normal");
    assert_finalizer_patch(&calls[2], "k8s.nixos.org/nixery-node-a");
    assert_eq!(
        server.object().metadata.finalizers.unwrap(),
        vec!["k8s.nixos.org/nixery-node-c"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_package_sources_are_built() {
    let dir = tempfile::tempdir().unwrap();
    let state = nixery::app_state(&settings(dir.path())).await.unwrap();
    let allowed = "file:///nonexistent/allowed.tar.gz";
    let mut a = agent("node-a", "127.0.0.1:5000", &state, |c| {
        c.allowed_sources = vec![nixery::nix::Source::Channel(allowed.into())]
    });
    let server = Server::new(niximage(
        "curl-and-jq",
        1,
        &["hello"],
        &["k8s.nixos.org/nixery-node-a"],
    ));
    server.edit(|o| o["spec"]["source"] = json!({ "repo": "https://example.invalid/evil.git" }));
    let (result, calls) = reconcile(&server, &mut a, 3).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_node_patch(&calls[0], "node-a", "Failed");
    assert_event(&calls[2], "SourceNotAllowed", "Warning");
    let status = server.object().status.unwrap();
    assert_eq!(status.conditions[0].reason, "SourceNotAllowed");
    assert!(status.conditions[0]
        .message
        .contains("https://example.invalid/evil.git"));
    let m = String::from_utf8_lossy(&get(&state, "/metrics").await.body).into_owned();
    assert_eq!(
        metric(&m, "nixery_builds_total"),
        0.0,
        "nothing was evaluated"
    );

    // The agent's own source is always allowed, and so is a listed one (this
    // one does not exist, so its build fails: a build failure, not a refusal).
    server.edit(|o| {
        o["metadata"]["generation"] = json!(2);
        o["spec"]["source"] = json!({ "channel": allowed });
    });
    let (result, _) = reconcile(&server, &mut a, 3).await;
    assert!(result.is_ok());
    build_finished(&mut a).await;
    let (_, calls) = reconcile(&server, &mut a, 3).await;
    assert_event(&calls[2], "BuildFailed", "Warning");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_build_shows_how_far_it_got() {
    let dir = tempfile::tempdir().unwrap();
    let state = nixery::app_state(&settings(dir.path())).await.unwrap();
    // Report every stage change at once.
    let mut a = agent("node-a", "127.0.0.1:5000", &state, |c| {
        c.progress_interval = Duration::ZERO
    });
    let server = Server::new(niximage(
        "curl-and-jq",
        1,
        &["curl", "jq", "shell"],
        &["k8s.nixos.org/nixery-node-a"],
    ));
    // The reconcile that starts the build returns before it finishes.
    let obj = Arc::new(server.object());
    let ctx = a.ctx.clone();
    let task = tokio::spawn(async move { controller::reconcile(obj, ctx).await });
    let started = server.answer(&mut a.handle, 3, BUILD_TIMEOUT).await;
    assert_event(&started[2], "BuildStarted", "Normal");
    assert!(task.await.unwrap().is_ok());
    // Progress writes arrive while the build runs, until it finishes.
    let mut calls = Vec::new();
    loop {
        tokio::select! {
            r = a.wiring.completions.recv() => { r.unwrap(); break; }
            next = a.handle.next_request() => {
                let (req, send) = next.unwrap();
                calls.push(server.respond(req, send).await);
            }
        }
    }
    let messages: Vec<String> = calls
        .iter()
        .filter(|c| c.manager() == "nixery.k8s.nixos.org/node-a")
        .map(|c| {
            assert_eq!(c.body["status"]["nodes"][0]["phase"], "Building");
            c.body["status"]["nodes"][0]["message"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        messages.iter().any(|m| m == "evaluating"),
        "no evaluating stage: {messages:?}"
    );
    // Layer packing reports `n/m`, n rising, m the image's layer count.
    let packing: Vec<(usize, usize)> = messages
        .iter()
        .filter_map(|m| m.strip_prefix("packing layers "))
        .map(|p| {
            let (n, m) = p.split_once('/').unwrap();
            (n.parse().unwrap(), m.parse().unwrap())
        })
        .collect();
    assert!(packing.len() >= 2, "no packing progress: {messages:?}");
    assert!(
        packing
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 == w[1].1),
        "{messages:?}"
    );
    // Then the final Ready, never a late progress message after it.
    let (result, calls) = reconcile(&server, &mut a, 3).await;
    assert!(result.is_ok());
    assert_node_patch(&calls[0], "node-a", "Ready");
    let status = server.object().status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Ready"));
    assert_eq!(
        packing[0].1,
        status.layers.unwrap() as usize,
        "m is the image's layer count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_image_pulls_with_real_clients_then_404s_after_deletion() {
    if !have_tool("skopeo", "named_image_pulls_with_real_clients")
        || !have_tool("docker", "named_image_pulls_with_real_clients")
    {
        return;
    }
    let (_dir, state, mut a, server) = one_agent_real_nix(&["curl", "jq", "shell"]).await;
    build_to_ready(&server, &mut a, ("0/1", "1/1")).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(nixery::serve_on(listener, state.clone(), async move {
        let _ = stop_rx.await;
    }));
    let image = format!("{addr}/niximage/default/curl-and-jq:v1");
    let img = image.clone();
    let layout = tempfile::tempdir().unwrap();
    let dest = format!("oci:{}:v1", layout.path().display());
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        // A full copy: every layer downloaded and verified against its digest.
        let (ok, _, err) = run(std::process::Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{img}"),
            &dest,
        ]));
        assert!(ok, "skopeo copy: {err}");
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
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.path().join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    let _ = std::process::Command::new("docker")
        .args(["rmi", "-f", &image])
        .output();

    server.edit(|o| o["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z"));
    let (result, _) = reconcile(&server, &mut a, 2).await;
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
    let (_dir, state, mut a, server) = one_agent(&["curl", "$(reboot)"]).await;
    let (result, calls) = reconcile(&server, &mut a, 3).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_node_patch(&calls[0], "node-a", "Failed");
    assert_aggregate_patch(&calls[1], "Failed", "0/1");
    assert_event(&calls[2], "InvalidSpec", "Warning");
    let status = server.object().status.unwrap();
    assert_eq!(status.conditions[0].reason, "InvalidSpec");
    assert!(status.conditions[0]
        .message
        .contains("is not a package attribute path"));
    // Reconciled again (our own write triggers it): nothing more.
    let (result, calls) = reconcile(&server, &mut a, 0).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(calls.is_empty());
    let m = String::from_utf8_lossy(&get(&state, "/metrics").await.body).into_owned();
    assert_eq!(metric(&m, "nixery_builds_total"), 0.0, "nothing was built");
}

/// The agent's whole loop (`controller::run`) against a fake API server that
/// answers lists and watches: `/readyz` turns ready from the watch's initial
/// list, and after an API-server outage the watch is back within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_comes_from_the_watch_and_recovers_after_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let state = fake_state(dir.path()).await.0;
    state.ready.store(false, Ordering::SeqCst);
    let Agent {
        ctx,
        mut handle,
        wiring,
    } = agent("node-a", "127.0.0.1:5000", &state, |_| {});
    let ctx = Arc::try_unwrap(ctx).ok().unwrap();
    let ready = state.ready.clone();
    let agent_task = tokio::spawn(controller::run(
        ctx,
        wiring,
        controller::Scope {
            lease_namespace: "nixery-system".into(),
            watch_namespace: None,
        },
        ready.clone(),
    ));

    const NIXIMAGES: &str = "/apis/k8s.nixos.org/v1alpha1/niximages";
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/nixery-system/leases";
    let reply = |code: u16, body: Value| {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap()
    };
    let list = |kind: &str| json!({ "apiVersion": "v1", "kind": kind, "metadata": { "resourceVersion": "7" }, "items": [] });
    #[derive(PartialEq, Debug)]
    enum Phase {
        Syncing,
        Outage(std::time::Instant),
        Recovering(std::time::Instant),
    }
    let mut phase = Phase::Syncing;
    let mut watches = Vec::new(); // open watches, as a real server holds them
    let mut lease_renewed = false;
    let mut initial_list_seen = false;
    let recovered_after = loop {
        let (req, send) = tokio::time::timeout(Duration::from_secs(20), handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("the agent stopped calling the API server in {phase:?}"))
            .unwrap();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        if let Phase::Outage(until) = phase {
            if std::time::Instant::now() >= until {
                phase = Phase::Recovering(std::time::Instant::now());
            }
        }
        match (path.as_str(), &phase) {
            (NIXIMAGES, Phase::Outage(_)) => {
                send.send_response(reply(503, status_body(503, "the API server is down")));
            }
            (NIXIMAGES, Phase::Syncing) if query.contains("watch=true") => {
                assert!(initial_list_seen);
                assert!(
                    ready.load(Ordering::SeqCst),
                    "ready once the initial list is in"
                );
                // The API server goes away for 3 s: the open watch ends with
                // an error, and every call fails meanwhile.
                send.send_response(reply(500, status_body(500, "connection reset")));
                phase = Phase::Outage(std::time::Instant::now() + Duration::from_secs(3));
            }
            (NIXIMAGES, Phase::Recovering(since)) => {
                let since = *since;
                if query.contains("watch=true") {
                    watches.push(send);
                } else {
                    send.send_response(reply(200, list("NixImageList")));
                }
                break since.elapsed();
            }
            (NIXIMAGES, Phase::Syncing) => {
                if query.contains("limit=500") {
                    assert!(
                        !ready.load(Ordering::SeqCst),
                        "not ready before the initial list"
                    );
                    initial_list_seen = true;
                }
                send.send_response(reply(200, list("NixImageList")));
            }
            (LEASES, _) if query.contains("watch=true") => watches.push(send),
            (LEASES, _) => send.send_response(reply(200, list("LeaseList"))),
            (p, _) if p.starts_with(LEASES) && req.method() == "PATCH" => {
                let body = req.into_body().collect_bytes().await.unwrap();
                let v: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["kind"], "Lease");
                assert_eq!(v["spec"]["holderIdentity"], "node-a");
                assert_eq!(v["spec"]["leaseDurationSeconds"], 40);
                lease_renewed = true;
                send.send_response(reply(200, v));
            }
            _ => panic!("unexpected call {} {path}?{query}", req.method()),
        }
    };
    // The watch retries at most 5 s apart, so it is back well within 10 s.
    assert!(
        recovered_after < Duration::from_secs(10),
        "back {recovered_after:?} after the API server"
    );
    assert!(lease_renewed, "the agent's Lease was renewed");
    assert!(
        ready.load(Ordering::SeqCst),
        "an outage does not make a synced agent unready"
    );
    agent_task.abort();
    drop(watches);
}
