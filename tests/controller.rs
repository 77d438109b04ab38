//! Reconciler tests against kube-rs's mocked API server (`common::apiserver`,
//! which models a real API server's server-side apply, JSON patches and
//! errors), with the real pipeline behind the controller and a fake Nix
//! (canned packages, real store files), except where the test is about what
//! Nix makes (real packing progress, a source that cannot be fetched). The
//! NixImage pulled and run by real clients is in clients_controller.rs.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use common::apiserver::Server;
use common::apiserver::*;
use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::controller::Action;
use kube::runtime::{reflector, watcher};
use nixery::k8s::{cleanup, context, controller, reconcile};
use serde_json::{json, Value};

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

    // Deletion: no finalizer holds it up (the API server removes it at
    // once); the watch's Delete event makes the agent drop the image and the
    // node's GC roots, with no call to the API server.
    assert_eq!(server.object().metadata.finalizers, Some(vec![]));
    let gcroots = std::fs::read_dir(dir.path().join("state/gcroots"))
        .unwrap()
        .count();
    assert!(gcroots >= 2);
    cleanup::forget_object(&a.ctx, "default", "curl-and-jq", Some("uid-curl-and-jq")).await;
    expect_silence(&mut a.handle, Duration::from_millis(100)).await;
    assert_eq!(
        get(&state, "/v2/niximage/default/curl-and-jq/manifests/v1")
            .await
            .error_code(),
        "NAME_UNKNOWN"
    );
    // Both generations' images go, with their GC roots and blobs: nothing
    // else asked for them.
    assert_eq!(
        std::fs::read_dir(dir.path().join("state/gcroots"))
            .unwrap()
            .count(),
        0,
        "the GC roots of every generation are gone"
    );
    let blobs = dir.path().join("state/blobs/sha256");
    for d in [&digest, &new_digest] {
        let hex = d.strip_prefix("sha256:").unwrap();
        assert!(!blobs.join(hex).exists(), "manifest {d} is removed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_agent_re_registers_its_image_without_announcing_a_build() {
    let (dir, state, mut a, server) = one_agent(&["curl", "jq"]).await;
    build_to_ready(&server, &mut a, ("0/1", "1/1")).await;
    let digest = server.object().status.unwrap().digest.unwrap();
    drop((a, state));

    // The new agent (same node, same state directory) starts with nothing
    // in memory: it finds the image in the catalog, registers it and says
    // nothing, since status already calls it ready here.
    let (state, nix) = fake_state(dir.path()).await;
    let mut b = agent("node-a", "127.0.0.1:5000", &state, |_| {});
    assert_eq!(
        get(&state, "/v2/niximage/default/curl-and-jq/manifests/v1")
            .await
            .error_code(),
        "NAME_UNKNOWN",
        "not registered before the reconcile"
    );
    let (result, calls) = reconcile(&server, &mut b, 0).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(calls.is_empty(), "{calls:#?}");
    build_finished(&mut b).await;
    let (result, calls) = reconcile(&server, &mut b, 0).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(calls.is_empty(), "no status write, no event: {calls:#?}");
    let r = get(&state, "/v2/niximage/default/curl-and-jq/manifests/v1").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(
        nix.evaluations.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the catalog answered; Nix was not asked"
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
        reconcile::error_policy(obj.clone(), &err, a.ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        reconcile::error_policy(obj, &context::Error::NoNamespace, a.ctx.clone()),
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
    let server = Server::new(niximage("curl-and-jq", 1, &["hello"], &[]));

    build_to_ready(&server, &mut a, ("0/1", "1/1")).await;

    // Agent B builds on its node (no finalizer: nothing may hold up a
    // deletion); the aggregate goes 1/2 and then 2/2.
    build_to_ready(&server, &mut b, ("1/2", "2/2")).await;
    assert_eq!(server.object().metadata.finalizers, Some(vec![]));
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
    // test what they remove), and its own finalizer, which its older version
    // wrote; then builds; readyNodes counts live nodes only.
    let (result, calls) = reconcile(&server, &mut a, 6).await;
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
    assert_finalizer_patch(&calls[2], "k8s.nixos.org/nixery-node-a");
    assert_node_patch(&calls[3], "node-a", "Building");
    assert_aggregate_patch(&calls[4], "Building", "0/2");
    let obj = server.object();
    assert_eq!(
        obj.metadata.finalizers.clone().unwrap(),
        vec!["k8s.nixos.org/nixery-node-c"]
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
        matches!(result, Err(context::Error::Departed(_))),
        "{result:?}"
    );
    assert_eq!(calls[0].answered, 409);

    // An object being deleted, held by older agents' finalizers: node-b's
    // goes (it never comes back), node-a's own goes, node-a drops the image
    // and builds nothing more; node-c (alive) keeps its finalizer until its
    // own agent, once upgraded, lets go.
    server.edit(|o| {
        o["metadata"]["finalizers"] = json!([
            "k8s.nixos.org/nixery-node-a",
            "k8s.nixos.org/nixery-node-b",
            "k8s.nixos.org/nixery-node-c"
        ]);
        o["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    });
    let (result, calls) = reconcile(&server, &mut a, 2).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_finalizer_patch(&calls[0], "k8s.nixos.org/nixery-node-b");
    assert_finalizer_patch(&calls[1], "k8s.nixos.org/nixery-node-a");
    assert_eq!(
        server.object().metadata.finalizers.unwrap(),
        vec!["k8s.nixos.org/nixery-node-c"]
    );
    assert_eq!(
        get(&state, "/v2/niximage/default/curl-and-jq/manifests/v1")
            .await
            .error_code(),
        "NAME_UNKNOWN"
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
    let server = Server::new(niximage("curl-and-jq", 1, &["hello"], &[]));
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
    // one does not exist: the channel is looked at, and found missing, not refused).
    server.edit(|o| {
        o["metadata"]["generation"] = json!(2);
        o["spec"]["source"] = json!({ "channel": allowed });
    });
    let (result, calls) = reconcile(&server, &mut a, 3).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_event(&calls[2], "UnknownRevision", "Warning");
    assert!(server.object().status.unwrap().conditions[0]
        .message
        .contains("the channel file:///nonexistent/allowed.tar.gz does not exist"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_build_shows_how_far_it_got() {
    let dir = tempfile::tempdir().unwrap();
    let state = nixery::app_state(&settings(dir.path())).await.unwrap();
    // Report every stage change at once.
    let mut a = agent("node-a", "127.0.0.1:5000", &state, |c| {
        c.progress_interval = Duration::ZERO
    });
    let server = Server::new(niximage("curl-and-jq", 1, &["curl", "jq", "shell"], &[]));
    // The reconcile that starts the build returns before it finishes.
    let obj = Arc::new(server.object());
    let ctx = a.ctx.clone();
    let task = tokio::spawn(async move { reconcile::reconcile(obj, ctx).await });
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

/// `controller::run` for node-a (all namespaces, Leases in nixery-system),
/// with the mocked API server's handle and the agent's readiness.
fn run_agent(
    state: &nixery::registry::AppState,
) -> (
    tokio::task::JoinHandle<Result<(), context::Error>>,
    Handle,
    Arc<nixery::registry::Readiness>,
) {
    let Agent {
        ctx,
        handle,
        wiring,
    } = agent("node-a", "127.0.0.1:5000", state, |_| {});
    let ctx = Arc::try_unwrap(ctx).ok().unwrap();
    let ready = state.ready.clone();
    let task = tokio::spawn(controller::run(
        ctx,
        wiring,
        controller::Scope {
            lease_namespace: "nixery-system".into(),
            watch_namespace: None,
        },
        ready.clone(),
    ));
    (task, handle, ready)
}

/// The agent's whole loop (`controller::run`) against a fake API server that
/// answers lists and watches: `/readyz` turns ready from the watch's initial
/// list, and after an API-server outage the watch is back within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_comes_from_the_watch_and_recovers_after_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let state = fake_state(dir.path()).await.0;
    let (agent_task, mut handle, ready) = run_agent(&state);

    const NIXIMAGES: &str = NIXIMAGES_PATH;
    const LEASES: &str = LEASES_PATH;
    let reply = |code: u16, body: Value| json_response(code, &body);
    let list = empty_list;
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
                // The watch's part is done once the initial list is in (the
                // Lease may still be on its way).
                let why = ready.why_not().unwrap_or_default();
                assert!(!why.contains("watch"), "{why}");
                // The API server goes away for 1.5 s: the open watch ends with
                // an error, and every call fails meanwhile.
                send.send_response(reply(500, status_body(500, "connection reset")));
                phase = Phase::Outage(std::time::Instant::now() + Duration::from_millis(1500));
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
                    let why = ready.why_not().unwrap_or_default();
                    assert!(
                        why.contains("waiting for the controller's watch to sync"),
                        "not ready before the initial list: {why:?}"
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
        ready.is_ready(),
        "an outage does not make a synced agent unready: {:?}",
        ready.why_not()
    );
    agent_task.abort();
    drop(watches);
}

/// Polls `f` until it holds (30 s at most).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !f() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `controller::run` against a fake API server that refuses the agent's
/// Lease (its namespace does not exist, as kube-apiserver 1.34 answers) and
/// lists no NixImages, while this node's catalog still holds the image of an
/// object deleted while the agent was down: the agent is not ready, and
/// /readyz says why in one line; the deleted object's image and GC roots go at
/// the watch's first sync; once the namespace exists the agent is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_its_lease_is_not_ready_and_a_missed_deletion_is_caught_up() {
    let (dir, state, mut a, server) = one_agent(&["curl", "jq"]).await;
    build_to_ready(&server, &mut a, ("0/1", "1/1")).await;
    let gcroots = || {
        std::fs::read_dir(dir.path().join("state/gcroots"))
            .unwrap()
            .count()
    };
    assert!(gcroots() > 0);
    drop(a);

    // The agent starts again (same state); the object was deleted meanwhile.
    let (agent_task, mut handle, ready) = run_agent(&state);
    const NIXIMAGES: &str = NIXIMAGES_PATH;
    const LEASES: &str = LEASES_PATH;
    let namespace_exists = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let exists = namespace_exists.clone();
    let api = tokio::spawn(async move {
        let reply = |code: u16, body: Value| json_response(code, &body);
        let list = empty_list;
        let mut watches = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_string();
            let watch = req.uri().query().unwrap_or("").contains("watch=true");
            match path.as_str() {
                NIXIMAGES | LEASES if watch => watches.push(send),
                NIXIMAGES => send.send_response(reply(200, list("NixImageList"))),
                LEASES => send.send_response(reply(200, list("LeaseList"))),
                p if p.starts_with(LEASES) && req.method() == "PATCH" => {
                    if exists.load(Ordering::SeqCst) {
                        let body = req.into_body().collect_bytes().await.unwrap();
                        let v: Value = serde_json::from_slice(&body).unwrap();
                        send.send_response(reply(200, v));
                    } else {
                        send.send_response(reply(
                            404,
                            status_body(404, "namespaces \"nixery-system\" not found"),
                        ));
                    }
                }
                p => panic!("unexpected call {} {p}", req.method()),
            }
        }
    });

    // The deletion it missed is caught up at the watch's first sync.
    until("the missed deletion to be caught up", || gcroots() == 0).await;
    assert_eq!(
        get(&state, "/v2/niximage/default/curl-and-jq/manifests/v1")
            .await
            .error_code(),
        "NAME_UNKNOWN"
    );
    assert!(state.catalog.objects().is_empty());
    // Not ready, saying why in one line, on /readyz too.
    until("the Lease failure to be reported", || {
        ready.why_not().is_some_and(|w| w.contains("cannot hold"))
    })
    .await;
    let resp = get(&state, "/readyz").await;
    assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8_lossy(&resp.body).into_owned();
    assert_eq!(
        body,
        "not ready: cannot hold this node's Lease nixery-system/nixery-node-node-a: namespaces \"nixery-system\" not found (create the namespace, or point --lease-namespace at one that exists)\n"
    );
    // The namespace appears: the next renewal (10 s later) makes it ready.
    namespace_exists.store(true, Ordering::SeqCst);
    until("ready", || ready.is_ready()).await;
    assert_eq!(get(&state, "/readyz").await.status, StatusCode::OK);
    agent_task.abort();
    api.abort();
}

/// A git repository with one commit on `main`; returns its URL and a way to
/// commit again (which moves `main`).
fn git_repo(root: &std::path::Path) -> (String, impl Fn() -> String) {
    let repo = root.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = move |args: &[&str]| git_in(&repo, args).trim().to_string();
    git(&["init", "-q", "-b", "main"]);
    let url = format!("file://{}", root.join("repo").display());
    let commit = move || {
        git(&["commit", "-q", "--allow-empty", "-m", "a change"]);
        git(&["rev-parse", "HEAD"])
    };
    (url, commit)
}

/// One agent (node-a) allowed `allowed`, with the fake Nix (which records
/// what it is asked to build) and this cache TTL, and the API server's copy
/// of a NixImage of `hello` from `source` at `tag`.
async fn moving_source(
    dir: &std::path::Path,
    cache_ttl: Duration,
    allowed: nixery::nix::Source,
    source: Value,
    tag: &str,
) -> (
    Arc<nixery::nix::fake::FakeNix>,
    nixery::registry::AppState,
    Agent,
    Server,
) {
    let nix = Arc::new(nixery::nix::fake::FakeNix::standard(&dir.join("fake")));
    let mut s = settings(&dir.join("state"));
    s.cache_ttl = cache_ttl;
    let state = nixery::app_state_with(&s, nix.clone()).await.unwrap();
    let a = agent("node-a", "127.0.0.1:5000", &state, |c| {
        c.allowed_sources = vec![allowed]
    });
    let server = Server::new(niximage("curl-and-jq", 1, &["hello"], &[]));
    server.edit(|o| {
        o["spec"]["source"] = source;
        o["spec"]["tag"] = json!(tag);
    });
    (nix, state, a, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moving_source_is_pinned_for_every_node_and_followed_after_the_ttl() {
    if !have_tool("git", "a_moving_source_is_pinned") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (url, commit) = git_repo(dir.path());
    let first = commit();
    // TTL 0: every reconcile looks at the branch again (writing only when it moved).
    let (_, state, mut a, server) = moving_source(
        dir.path(),
        Duration::ZERO,
        nixery::nix::Source::Git { url: url.clone() },
        json!({ "repo": url }),
        "main",
    )
    .await;

    // The branch is resolved once, into status, before anything is built.
    let (result, calls) = reconcile(&server, &mut a, 4).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(calls[0].manager(), "nixery.k8s.nixos.org-revision");
    assert_eq!(calls[0].body["status"]["revision"], first.as_str());
    assert_node_patch(&calls[1], "node-a", "Building");
    let status = server.object().status.unwrap();
    assert_eq!(status.revision.as_deref(), Some(first.as_str()));
    assert_eq!(
        status.revision_of.as_deref(),
        Some(format!("{url}#main").as_str())
    );
    build_finished(&mut a).await;
    let (_, calls) = reconcile(&server, &mut a, 3).await;
    assert_node_patch(&calls[0], "node-a", "Ready");
    assert_eq!(
        calls[0].body["status"]["nodes"][0]["revision"],
        first.as_str()
    );
    // The branch has not moved: looked at again, nothing written.
    let (_, calls) = reconcile(&server, &mut a, 0).await;
    assert!(calls.is_empty(), "{calls:#?}");
    // The registry serves it under the object's own tag.
    let r = get(&state, "/v2/niximage/default/curl-and-jq/manifests/main").await;
    assert_eq!(r.status, StatusCode::OK);

    // The branch moves: the new commit goes into status and the node rebuilds.
    let second = commit();
    let (result, calls) = reconcile(&server, &mut a, 4).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(calls[0].body["status"]["revision"], second.as_str());
    assert_node_patch(&calls[1], "node-a", "Building");
    // Until it is rebuilt, the node's Ready entry of the old revision does not count.
    assert_aggregate_patch(&calls[2], "Building", "0/1");
    build_finished(&mut a).await;
    let (_, calls) = reconcile(&server, &mut a, 3).await;
    assert_eq!(
        calls[0].body["status"]["nodes"][0]["revision"],
        second.as_str()
    );

    // A branch that does not exist is the user's to fix.
    server.edit(|o| {
        o["metadata"]["generation"] = json!(2);
        o["spec"]["tag"] = json!("no-such-branch");
    });
    let (result, calls) = reconcile(&server, &mut a, 3).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_event(&calls[2], "UnknownRevision", "Warning");
    assert!(server.object().status.unwrap().conditions[0]
        .message
        .contains("no branch or tag 'no-such-branch'"));
}

/// A channel tarball whose default.nix says `text`; the hash of its contents.
fn channel_tarball(web: &std::path::Path, name: &str, text: &str) -> String {
    let default_nix = format!("# {text}\n{{ ... }}: {{ }}\n");
    common::files::channel_tarball(web, name, &[("default.nix", default_nix.as_bytes())])
}

/// A NixImage of `hello` from a channel tarball (default.nix "first", hash
/// `v1`) on a real HTTP file server, one agent (allowed that channel) with a
/// fake Nix that records what it was asked to build.
struct ChannelSetup {
    dir: tempfile::TempDir,
    web: std::path::PathBuf,
    v1: String,
    files: common::files::FileServer,
    url: String,
    nix: Arc<nixery::nix::fake::FakeNix>,
    state: nixery::registry::AppState,
    a: Agent,
    server: Server,
}

async fn channel_setup(cache_ttl: Duration) -> ChannelSetup {
    let dir = tempfile::tempdir().unwrap();
    let web = dir.path().join("web");
    let v1 = channel_tarball(&web, "nixpkgs.tar.gz", "first");
    let files = common::files::FileServer::start(web.clone());
    let url = files.url("nixpkgs.tar.gz");
    let (nix, state, a, server) = moving_source(
        dir.path(),
        cache_ttl,
        nixery::nix::Source::Channel(url.clone()),
        json!({ "channel": url }),
        "latest",
    )
    .await;
    ChannelSetup {
        dir,
        web,
        v1,
        files,
        url,
        nix,
        state,
        a,
        server,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_is_pinned_by_its_contents_and_repinned_when_they_change() {
    if !have_tool("nix-prefetch-url", "a_channel_is_pinned") {
        return;
    }
    let ChannelSetup {
        dir: _dir,
        web,
        v1,
        files,
        url,
        nix,
        state,
        mut a,
        server,
    } = channel_setup(Duration::from_secs(3600)).await;
    let pinned = |sha256: &str| nixery::nix::Source::PinnedChannel {
        url: url.clone(),
        sha256: sha256.to_string(),
    };

    // The channel's contents are hashed once, into status; the build is of
    // the tarball at that hash.
    let (result, calls) = reconcile(&server, &mut a, 4).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(calls[0].manager(), "nixery.k8s.nixos.org-revision");
    assert_eq!(calls[0].body["status"]["revision"], format!("sha256:{v1}"));
    assert_eq!(calls[0].body["status"]["revisionOf"], url.as_str());
    assert_node_patch(&calls[1], "node-a", "Building");
    build_finished(&mut a).await;
    assert_eq!(nix.sources.lock().unwrap().last(), Some(&pinned(&v1)));
    let (_, calls) = reconcile(&server, &mut a, 3).await;
    assert_node_patch(&calls[0], "node-a", "Ready");
    assert_eq!(
        calls[0].body["status"]["nodes"][0]["revision"],
        format!("sha256:{v1}")
    );
    let r = get(&state, "/v2/niximage/default/curl-and-jq/manifests/latest").await;
    assert_eq!(r.status, StatusCode::OK);

    // The channel moves on. Within the cache TTL the pin holds: nothing is
    // looked at or written, and a rebuild (a spec change) is of the pinned contents.
    let v2 = channel_tarball(&web, "nixpkgs.tar.gz", "second");
    assert_ne!(v1, v2);
    let (_, calls) = reconcile(&server, &mut a, 0).await;
    assert!(calls.is_empty(), "{calls:#?}");
    // ... but a node that never held them downloads the tarball and Nix
    // finds other contents: the build fails, and its retry resolves the
    // channel again instead of waiting out the TTL.
    nix.moved.lock().unwrap().insert(v1.clone());
    server.edit(|o| {
        o["metadata"]["generation"] = json!(2);
        o["spec"]["contents"] = json!(["hello", "jq"]);
    });
    let (result, calls) = reconcile(&server, &mut a, 3).await;
    assert!(result.is_ok(), "{result:?}");
    assert_node_patch(&calls[0], "node-a", "Building");
    build_finished(&mut a).await;
    assert_eq!(nix.sources.lock().unwrap().last(), Some(&pinned(&v1)));
    let (result, calls) = reconcile(&server, &mut a, 3).await;
    let err = result.unwrap_err().to_string();
    assert!(err.contains("hash mismatch"), "{err}");
    assert_node_patch(&calls[0], "node-a", "Failed");
    // Not before the backoff (5 s after a first failure) ...
    let (_, calls) = reconcile(&server, &mut a, 0).await;
    assert!(calls.is_empty(), "{calls:#?}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    // ... then the new contents are pinned and built, on every node alike.
    let (result, calls) = reconcile(&server, &mut a, 4).await;
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(calls[0].manager(), "nixery.k8s.nixos.org-revision");
    assert_eq!(calls[0].body["status"]["revision"], format!("sha256:{v2}"));
    assert_node_patch(&calls[1], "node-a", "Building");
    build_finished(&mut a).await;
    assert_eq!(nix.sources.lock().unwrap().last(), Some(&pinned(&v2)));
    let (_, calls) = reconcile(&server, &mut a, 3).await;
    assert_node_patch(&calls[0], "node-a", "Ready");

    // A channel URL that does not exist is the user's to fix.
    server.edit(|o| {
        o["metadata"]["generation"] = json!(3);
        o["spec"]["source"] = json!({ "channel": files.url("no-such.tar.gz") });
    });
    let mut b = agent("node-a", "127.0.0.1:5000", &state, |c| {
        c.allowed_sources = vec![nixery::nix::Source::Channel(files.url("no-such.tar.gz"))]
    });
    let (result, calls) = reconcile(&server, &mut b, 3).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert_event(&calls[2], "UnknownRevision", "Warning");
    assert!(server.object().status.unwrap().conditions[0]
        .message
        .contains("does not exist"));

    // A channel whose server does not answer: said in status, and tried
    // again only after the backoff (our own status write does not retry it).
    let down = "http://user:secret@127.0.0.1:9/nixpkgs.tar.gz";
    server.edit(|o| {
        o["metadata"]["generation"] = json!(4);
        o["spec"]["source"] = json!({ "channel": down });
    });
    let mut c = agent("node-a", "127.0.0.1:5000", &state, |c| {
        c.allowed_sources = vec![nixery::nix::Source::Channel(down.into())]
    });
    let (result, calls) = reconcile(&server, &mut c, 3).await;
    let err = result.unwrap_err().to_string();
    assert!(err.contains("127.0.0.1:9"), "{err}");
    assert!(!err.contains("secret"), "{err}");
    assert_node_patch(&calls[0], "node-a", "Failed");
    assert_event(&calls[2], "BuildFailed", "Warning");
    let (result, calls) = reconcile(&server, &mut c, 0).await;
    assert!(calls.is_empty(), "{calls:#?}");
    assert!(matches!(result, Ok(a) if a != Action::await_change()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_channel_whose_server_is_down_keeps_its_image_ready() {
    if !have_tool("nix-prefetch-url", "a_pinned_channel_whose_server_is_down") {
        return;
    }
    // TTL 0: every reconcile resolves the channel again.
    let ChannelSetup {
        dir: _dir,
        v1,
        files,
        state,
        mut a,
        server,
        ..
    } = channel_setup(Duration::ZERO).await;
    let (result, _) = reconcile(&server, &mut a, 4).await;
    assert!(result.is_ok(), "{result:?}");
    let resolved = server.object().status.unwrap().revision_resolved;
    build_finished(&mut a).await;
    // Looked at again (TTL 0), unchanged: only the time of the check is
    // written, so that other nodes need not download the tarball too.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, calls) = reconcile(&server, &mut a, 4).await;
    assert_eq!(calls[0].manager(), "nixery.k8s.nixos.org-revision");
    assert_eq!(calls[0].body["status"]["revision"], format!("sha256:{v1}"));
    assert_ne!(server.object().status.unwrap().revision_resolved, resolved);
    assert_node_patch(&calls[1], "node-a", "Ready");
    // The channel's server goes away: re-resolving fails, and the image
    // stays Ready at its pin, with nothing written.
    drop(files);
    let (result, calls) = reconcile(&server, &mut a, 0).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(calls.is_empty(), "{calls:#?}");
    let status = server.object().status.unwrap();
    assert_eq!(status.revision, Some(format!("sha256:{v1}")));
    assert_eq!(status.conditions[0].status, "True");
    let r = get(&state, "/v2/niximage/default/curl-and-jq/manifests/latest").await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_niximage_config_is_the_image_config() {
    let (_dir, state, mut a, server) = one_agent(&["hello"]).await;
    server.edit(|o| {
        o["spec"]["config"] = json!({
            "entrypoint": ["/bin/hello"],
            "cmd": ["--greeting", "hi"],
            "env": [{ "name": "LANG", "value": "C.UTF-8" }, { "name": "PATH", "value": "/opt/bin:/bin" }],
            "workingDir": "/work",
            "user": "1000:1000",
            "exposedPorts": ["8080/tcp", "53/udp"]
        })
    });
    build_to_ready(&server, &mut a, ("0/1", "1/1")).await;
    let m = get(&state, "/v2/niximage/default/curl-and-jq/manifests/v1").await;
    assert_eq!(m.status, StatusCode::OK);
    let config_digest = m.json()["config"]["digest"].as_str().unwrap().to_string();
    let c = get(
        &state,
        &format!("/v2/niximage/default/curl-and-jq/blobs/{config_digest}"),
    )
    .await
    .json();
    let cfg = &c["config"];
    assert_eq!(cfg["Entrypoint"], json!(["/bin/hello"]));
    assert_eq!(cfg["Cmd"], json!(["--greeting", "hi"]));
    assert_eq!(cfg["WorkingDir"], "/work");
    assert_eq!(cfg["User"], "1000:1000");
    assert_eq!(cfg["ExposedPorts"], json!({ "8080/tcp": {}, "53/udp": {} }));
    let env: Vec<&str> = cfg["Env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(env.contains(&"LANG=C.UTF-8"), "{env:?}");
    // The user's PATH replaces the default one; the others stay.
    assert!(env.contains(&"PATH=/opt/bin:/bin"), "{env:?}");
    assert_eq!(
        env.iter().filter(|e| e.starts_with("PATH=")).count(),
        1,
        "{env:?}"
    );
    assert!(
        env.iter().any(|e| e.starts_with("SSL_CERT_FILE=")),
        "{env:?}"
    );
}

/// A mixed cluster: two amd64 agents and one arm64 agent, one package set.
/// Nodes agree only with nodes of their architecture: the object goes Ready
/// (never Inconsistent) and names the index of both architectures' images,
/// which each agent then serves by digest from its own registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_cluster_is_ready_and_names_one_index() {
    use nixery::name::Arch;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nix = Arc::new(nixery::nix::fake::FakeNix::standard(
        &dirs[0].path().join("store"),
    ));
    let mut states = Vec::new();
    for (dir, arch) in dirs.iter().zip([Arch::Amd64, Arch::Amd64, Arch::Arm64]) {
        let mut s = settings(dir.path());
        s.systems = vec![arch];
        states.push(nixery::app_state_with(&s, nix.clone()).await.unwrap());
    }
    let mut a1 = agent("node-a1", "127.0.0.1:5000", &states[0], |_| {});
    let mut a2 = agent("node-a2", "127.0.0.1:5000", &states[1], |_| {});
    let mut b = agent("node-b", "127.0.0.1:5000", &states[2], |_| {});
    let server = Server::new(niximage("curl-and-jq", 1, &["hello"], &[]));

    // Every step's aggregate is Building then Ready: never Inconsistent.
    build_to_ready(&server, &mut a1, ("0/1", "1/1")).await;
    build_to_ready(&server, &mut b, ("1/2", "2/2")).await;
    build_to_ready(&server, &mut a2, ("2/3", "3/3")).await;
    let status = server.object().status.unwrap();
    let node = |n: &str| status.nodes.iter().find(|e| e.node == n).unwrap().clone();
    let (n1, n2, nb) = (node("node-a1"), node("node-a2"), node("node-b"));
    assert_eq!(
        (n1.arch.as_deref(), n2.arch.as_deref(), nb.arch.as_deref()),
        (Some("amd64"), Some("amd64"), Some("arm64"))
    );
    assert_eq!(n1.digest, n2.digest, "amd64 nodes agree");
    assert_ne!(n1.digest, nb.digest, "the architectures' images differ");
    let archs: Vec<&str> = status
        .platforms
        .iter()
        .map(|p| p.architecture.as_str())
        .collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    let (index, _) = nixery::k8s::status::platform_index(&status.platforms).unwrap();
    assert_eq!(status.digest.as_deref(), Some(index.as_str()));
    assert!(status
        .image
        .as_deref()
        .unwrap()
        .ends_with(&format!("@{index}")));

    // Each agent, reconciling the settled object, writes nothing and serves
    // the index by digest: it lists the node's own manifest, at its size.
    for (a, state, own) in [
        (&mut a1, &states[0], &n1),
        (&mut b, &states[2], &nb),
        (&mut a2, &states[1], &n2),
    ] {
        let (_, calls) = reconcile(&server, a, 0).await;
        assert!(calls.is_empty(), "{calls:#?}");
        let r = get(
            state,
            &format!("/v2/niximage/default/curl-and-jq/manifests/{index}"),
        )
        .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        let listed = r.json();
        assert_eq!(
            listed["mediaType"],
            "application/vnd.oci.image.index.v1+json"
        );
        let mine = listed["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["platform"]["architecture"] == own.arch.as_deref().unwrap())
            .unwrap()
            .clone();
        assert_eq!(mine["digest"], own.digest.as_deref().unwrap());
        let m = get(
            state,
            &format!(
                "/v2/niximage/default/curl-and-jq/manifests/{}",
                own.digest.as_deref().unwrap()
            ),
        )
        .await;
        assert_eq!(m.status, StatusCode::OK);
        assert_eq!(mine["size"], m.body.len());
    }
    // Another repository does not serve it.
    let r = get(&states[0], &format!("/v2/shell/manifests/{index}")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}
