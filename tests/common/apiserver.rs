//! A mocked Kubernetes API server for controller tests (kube-rs's tower-test
//! pair) that models what a real one does with the calls the agent makes:
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
//! Tests assert every call the agent makes (method, path, manager and body),
//! time out on a call that never came, and check that nothing more came.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use nixery::k8s::context::{self, Context, Wiring};
use nixery::k8s::crd::NixImage;
use nixery::k8s::reconcile;
use nixery::registry::AppState;
use serde_json::{json, Value};

use super::{fake_state, settings};

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

pub const OBJECT_PATH: &str =
    "/apis/k8s.nixos.org/v1alpha1/namespaces/default/niximages/curl-and-jq";
pub const STATUS_PATH: &str =
    "/apis/k8s.nixos.org/v1alpha1/namespaces/default/niximages/curl-and-jq/status";
pub const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/default/events";
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

/// One call the agent made.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub content_type: String,
    pub body: Value,
    /// The status code the fake server answered.
    pub answered: u16,
}

impl Call {
    pub fn manager(&self) -> &str {
        self.query
            .get("fieldManager")
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// The fake API server's state for the one object under test.
#[derive(Clone)]
pub struct Server(pub Arc<Mutex<ServerState>>);

pub struct ServerState {
    pub obj: Value,
    /// Server-side apply ownership of status: manager -> node keys it applied.
    pub node_owners: BTreeMap<String, BTreeSet<String>>,
    /// manager -> top-level status fields it applied (besides `nodes`).
    pub field_owners: BTreeMap<String, BTreeSet<String>>,
    /// Answers to give instead of the normal one, for the next calls.
    pub inject: Vec<u16>,
    pub resource_version: u64,
}

impl Server {
    pub fn new(obj: Value) -> Self {
        Server(Arc::new(Mutex::new(ServerState {
            obj,
            node_owners: BTreeMap::new(),
            field_owners: BTreeMap::new(),
            inject: Vec::new(),
            resource_version: 1,
        })))
    }
    pub fn object(&self) -> NixImage {
        serde_json::from_value(self.0.lock().unwrap().obj.clone()).unwrap()
    }
    pub fn edit(&self, f: impl FnOnce(&mut Value)) {
        f(&mut self.0.lock().unwrap().obj)
    }
    /// The next call is answered with this status instead.
    pub fn fail_next(&self, status: u16) {
        self.0.lock().unwrap().inject.push(status);
    }

    /// Answers exactly `n` calls, each within `timeout`, and returns them.
    pub async fn answer(&self, handle: &mut Handle, n: usize, timeout: Duration) -> Vec<Call> {
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
    pub async fn respond(
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
        send.send_response(json_response(code, &response));
        call
    }

    pub fn apply(&self, call: &Call) -> (u16, Value) {
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
    pub fn server_side_apply(&mut self, manager: &str, status: &serde_json::Map<String, Value>) {
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

/// Where `controller::run` lists and watches NixImages (all namespaces) and
/// the agents' Leases (nixery-system).
pub const NIXIMAGES_PATH: &str = "/apis/k8s.nixos.org/v1alpha1/niximages";
pub const LEASES_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/nixery-system/leases";

/// A JSON answer, as the API server sends it.
pub fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

/// An empty list of `kind` at resourceVersion 7.
pub fn empty_list(kind: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": kind, "metadata": { "resourceVersion": "7" }, "items": [] })
}

pub fn status_body(code: u16, message: &str) -> Value {
    let reason = match code {
        404 => "NotFound",
        409 => "Conflict",
        422 => "Invalid",
        _ => "InternalError",
    };
    json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code })
}

/// A NixImage as the API server would hold it.
pub fn niximage(name: &str, generation: i64, contents: &[&str], finalizers: &[&str]) -> Value {
    json!({
        "apiVersion": "k8s.nixos.org/v1alpha1",
        "kind": "NixImage",
        "metadata": { "name": name, "namespace": "default", "uid": format!("uid-{name}"), "generation": generation, "resourceVersion": "1", "finalizers": finalizers },
        "spec": { "contents": contents, "tag": "v1" }
    })
}

/// An agent: its context (talking to a fresh mocked API server), the handle
/// that answers for that server, and the completion channel.
pub struct Agent {
    pub ctx: Arc<Context>,
    pub handle: Handle,
    pub wiring: Wiring,
}

pub fn agent(
    node: &str,
    host: &str,
    state: &AppState,
    configure: impl FnOnce(&mut Context),
) -> Agent {
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

/// One agent (node-a) and the API server's copy of a fresh `curl-and-jq`,
/// with the given contents.
pub async fn one_agent(contents: &[&str]) -> (tempfile::TempDir, AppState, Agent, Server) {
    let dir = tempfile::tempdir().unwrap();
    let state = fake_state(dir.path()).await.0;
    one_agent_on(dir, state, contents)
}

/// The same, with real Nix.
pub async fn one_agent_real_nix(contents: &[&str]) -> (tempfile::TempDir, AppState, Agent, Server) {
    let dir = tempfile::tempdir().unwrap();
    let state = nixery::app_state(&settings(dir.path())).await.unwrap();
    one_agent_on(dir, state, contents)
}

pub fn one_agent_on(
    dir: tempfile::TempDir,
    state: AppState,
    contents: &[&str],
) -> (tempfile::TempDir, AppState, Agent, Server) {
    let a = agent("node-a", "127.0.0.1:5000", &state, |_| {});
    let server = Server::new(niximage("curl-and-jq", 1, contents, &[]));
    (dir, state, a, server)
}

pub fn assert_node_patch(c: &Call, node: &str, phase: &str) {
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

pub fn assert_aggregate_patch(c: &Call, phase: &str, ready_nodes: &str) {
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

pub fn assert_event(c: &Call, reason: &str, type_: &str) {
    assert_eq!(
        (c.method.as_str(), c.path.as_str()),
        ("POST", EVENTS_PATH),
        "a new event, not a series of an old one: {c:#?}"
    );
    assert_eq!(c.body["reason"], reason, "{c:#?}");
    assert_eq!(c.body["type"], type_);
    assert_eq!(c.body["regarding"]["name"], "curl-and-jq");
}

pub fn assert_finalizer_patch(c: &Call, removed: &str) {
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
pub async fn reconcile(
    server: &Server,
    a: &mut Agent,
    n: usize,
) -> (Result<Action, context::Error>, Vec<Call>) {
    let obj = Arc::new(server.object());
    reconcile_object(server, a, obj, n).await
}

pub async fn reconcile_object(
    server: &Server,
    a: &mut Agent,
    obj: Arc<NixImage>,
    n: usize,
) -> (Result<Action, context::Error>, Vec<Call>) {
    let ctx = a.ctx.clone();
    let task = tokio::spawn(async move { reconcile::reconcile(obj, ctx).await });
    let calls = server.answer(&mut a.handle, n, BUILD_TIMEOUT).await;
    let result = tokio::time::timeout(BUILD_TIMEOUT, task)
        .await
        .expect("reconcile hung")
        .unwrap();
    expect_silence(&mut a.handle, Duration::from_millis(100)).await;
    (result, calls)
}

/// Waits until the agent's build of the object finishes (it triggers the object).
pub async fn build_finished(a: &mut Agent) {
    let r = tokio::time::timeout(BUILD_TIMEOUT, a.wiring.completions.recv())
        .await
        .expect("the build never finished")
        .expect("completion channel closed");
    assert_eq!(r.name, "curl-and-jq");
}

/// Asserts that no call arrives within `wait`.
pub async fn expect_silence(handle: &mut Handle, wait: Duration) {
    if let Ok(Some((req, _))) = tokio::time::timeout(wait, handle.next_request()).await {
        panic!("unexpected call: {} {}", req.method(), req.uri());
    }
}

/// First reconcile starts the build (3 calls), the second reports it (3 calls).
pub async fn build_to_ready(
    server: &Server,
    a: &mut Agent,
    ready_nodes: (&str, &str),
) -> Vec<Call> {
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
