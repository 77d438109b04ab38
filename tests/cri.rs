//! Pre-pull against a real container runtime: a private containerd (Debian's,
//! with runc) driven over its CRI as a kubelet drives it, and an agent (on
//! the mocked API server, with real Nix) that pulls each ready NixImage into
//! it. A Pod then starts without a single request to the registry; images
//! the agent pulled go when their object goes, except while a container
//! uses them; nothing else is removed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::apiserver::Server;
use common::apiserver::*;
use common::cri::{unavailable, Containerd};
use common::*;
use nixery::k8s::cleanup;
use nixery::k8s::prepull::Prepuller;
use nixery::registry::AppState;
use serde_json::json;

const POD_TIMEOUT: Duration = Duration::from_secs(120);

/// Every request the registry answered (`nixery_http_requests_total`, all
/// routes but /metrics), and those for blobs alone.
async fn requests(state: &AppState) -> (f64, f64) {
    let text = String::from_utf8(get(state, "/metrics").await.body).unwrap();
    let mut all = 0.0;
    let mut blobs = 0.0;
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("nixery_http_requests_total{") {
            let v: f64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
            // (The metrics requests of this very count are not the Pod's.)
            if rest.contains("route=\"metrics\"") {
                continue;
            }
            all += v;
            if rest.contains("route=\"blob\"") {
                blobs += v;
            }
        }
    }
    (all, blobs)
}

fn runnable(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) if std::env::var("CI").is_ok() => {
            panic!("{test}: {why}, and CI must run this test")
        }
        Some(why) => {
            skip(&format!("{test}: {why}"));
            false
        }
    }
}

/// The registry served on a free port, and a containerd whose sandboxes run
/// its `pause` image (pulled once, as a node holds its pause image).
async fn node(state: &AppState) -> (String, Containerd, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(nixery::serve_on(listener, state.clone(), async move {
        let _ = stop_rx.await;
    }));
    let pause = format!("{host}/pause:latest");
    let containerd = Containerd::start(&pause).await;
    containerd.runtime.pull(&pause).await.unwrap();
    (host, containerd, stop_tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_image_is_in_the_runtime_and_its_pod_starts_without_a_request() {
    if !runnable("a_ready_image_is_in_the_runtime") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = nixery::app_state(&settings(dir.path())).await.unwrap();
    let (host, containerd, _stop) = node(&state).await;
    let runtime = containerd.runtime.clone();
    let prepull = Arc::new(Prepuller::new(runtime.clone(), dir.path()));
    let p = prepull.clone();
    let mut a = agent("node-a", &host, &state, move |c| c.prepull = Some(p));
    let server = Server::new(niximage("curl-and-jq", 1, &["hello"], &[]));

    // Ready first (the entry says nothing of the runtime yet) ...
    build_to_ready(&server, &mut a, ("0/1", "1/1")).await;
    let status = server.object().status.unwrap();
    assert_eq!(status.nodes[0].pre_pulled, None);
    // ... then the pull ends, triggers the object, and the entry says where
    // the image is. Nothing else is written.
    build_finished(&mut a).await;
    let (result, calls) = reconcile(&server, &mut a, 1).await;
    assert!(result.is_ok(), "{result:?}");
    assert_node_patch(&calls[0], "node-a", "Ready");
    let status = server.object().status.unwrap();
    let version = runtime.version().await.unwrap();
    assert!(version.starts_with("containerd "), "{version}");
    assert_eq!(
        status.nodes[0].pre_pulled.as_deref(),
        Some(version.as_str())
    );
    let (result, calls) = reconcile(&server, &mut a, 0).await;
    assert!(result.is_ok() && calls.is_empty(), "{calls:#?}");

    // The runtime has it under its tag and under the digest status names.
    let digest = status.digest.clone().unwrap();
    let tag_ref = format!("{host}/niximage/default/curl-and-jq:v1");
    let digest_ref = format!("{host}/niximage/default/curl-and-jq@{digest}");
    let by_tag = runtime
        .image(&tag_ref)
        .await
        .unwrap()
        .expect("under its tag");
    let by_digest = runtime
        .image(&digest_ref)
        .await
        .unwrap()
        .expect("under its digest");
    assert_eq!(by_tag.id, by_digest.id);
    assert!(by_tag.repo_tags.contains(&tag_ref), "{by_tag:?}");
    assert!(by_tag.repo_digests.contains(&digest_ref), "{by_tag:?}");

    // A Pod that names status.image starts and runs with no request at all
    // to the registry.
    let image = status.image.clone().unwrap();
    let before = requests(&state).await;
    let pod = containerd
        .run_pod("prepulled", &image, &["hello"], POD_TIMEOUT)
        .await;
    assert!(!pod.pulled, "the kubelet found the image in the runtime");
    assert_eq!((pod.exit_code, pod.output.as_str()), (0, "Hello, world!"));
    assert_eq!(
        requests(&state).await,
        before,
        "a pre-pulled Pod start asks the registry for nothing"
    );
    // The same count moves for an image that was not pre-pulled.
    let other = containerd
        .run_pod(
            "pulled",
            &format!("{host}/jq"),
            &["jq", "--version"],
            POD_TIMEOUT,
        )
        .await;
    assert!(other.pulled);
    assert!(other.output.starts_with("jq-"), "{}", other.output);
    let after = requests(&state).await;
    assert!(after.1 > before.1, "{before:?} {after:?}");
    containerd.remove_pod(&other.sandbox).await;

    // A spec change: the new digest is pre-pulled too; the old image stays
    // while the exited container of the Pod above still uses it.
    server.edit(|o| {
        o["metadata"]["generation"] = json!(2);
        o["spec"]["contents"] = json!(["hello", "jq"]);
    });
    build_to_ready(&server, &mut a, ("0/1", "1/1")).await;
    build_finished(&mut a).await;
    let (result, _) = reconcile(&server, &mut a, 1).await;
    assert!(result.is_ok(), "{result:?}");
    let status = server.object().status.unwrap();
    let new_digest = status.digest.clone().unwrap();
    assert_ne!(new_digest, digest);
    assert_eq!(
        status.nodes[0].pre_pulled.as_deref(),
        Some(version.as_str())
    );
    let new_ref = format!("{host}/niximage/default/curl-and-jq@{new_digest}");
    let new_image = runtime.image(&new_ref).await.unwrap().expect("new digest");
    assert!(new_image.repo_tags.contains(&tag_ref), "the tag moved");
    prepull.sweep().await;
    assert!(
        runtime.image(&digest_ref).await.unwrap().is_some(),
        "an image a container uses is kept"
    );
    // Once the Pod is gone, the next sweep removes it.
    containerd.remove_pod(&pod.sandbox).await;
    prepull.sweep().await;
    assert!(runtime.image(&digest_ref).await.unwrap().is_none());
    assert!(runtime.image(&new_ref).await.unwrap().is_some());

    // Deletion removes what the agent pulled, and nothing else: the image
    // the other Pod pulled and the pause image stay.
    cleanup::forget_object(&a.ctx, "default", "curl-and-jq", Some("uid-curl-and-jq")).await;
    assert!(runtime.image(&new_ref).await.unwrap().is_none());
    assert!(runtime.image(&tag_ref).await.unwrap().is_none());
    assert!(runtime
        .image(&format!("{host}/jq:latest"))
        .await
        .unwrap()
        .is_some());
    assert!(runtime
        .image(&format!("{host}/pause:latest"))
        .await
        .unwrap()
        .is_some());
    let owned = std::fs::read_to_string(dir.path().join("prepulled.json")).unwrap();
    assert!(!owned.contains("curl-and-jq"), "{owned}");
}

/// An image the runtime held before the agent pulled it is not the agent's
/// to remove; and an agent that restarts still knows what it pulled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_what_the_agent_pulled_is_removed_even_after_a_restart() {
    if !runnable("only_what_the_agent_pulled_is_removed") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = nixery::app_state(&settings(dir.path())).await.unwrap();
    let (host, containerd, _stop) = node(&state).await;
    let runtime = containerd.runtime.clone();
    let state_dir = dir.path().to_path_buf();
    let server = Server::new(niximage("curl-and-jq", 1, &["hello"], &[]));
    let tag_ref = format!("{host}/niximage/default/curl-and-jq:v1");

    // Generation 1 is built by an agent with pre-pull off, and the kubelet
    // pulls it for a Pod.
    let mut off = agent("node-a", &host, &state, |_| {});
    build_to_ready(&server, &mut off, ("0/1", "1/1")).await;
    runtime.pull(&tag_ref).await.unwrap();
    drop(off);
    // The agent restarts with pre-pull on: the image is in the runtime
    // already, and the entry says so, but nothing of it is the agent's.
    let prepull = Arc::new(Prepuller::new(runtime.clone(), &state_dir));
    let p = prepull.clone();
    let mut a = agent("node-a", &host, &state, move |c| c.prepull = Some(p));
    let (result, calls) = reconcile(&server, &mut a, 0).await;
    assert!(result.is_ok() && calls.is_empty(), "{calls:#?}");
    build_finished(&mut a).await;
    let (result, calls) = reconcile(&server, &mut a, 1).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(calls[0].body["status"]["nodes"][0]["prePulled"].is_string());
    assert!(prepull.objects().is_empty(), "nothing of it is the agent's");
    let first = server.object().status.unwrap().digest.unwrap();

    // Generation 2: the agent pulls it, under the same tag.
    server.edit(|o| {
        o["metadata"]["generation"] = json!(2);
        o["spec"]["contents"] = json!(["jq"]);
    });
    build_to_ready(&server, &mut a, ("0/1", "1/1")).await;
    build_finished(&mut a).await;
    let (result, _) = reconcile(&server, &mut a, 1).await;
    assert!(result.is_ok(), "{result:?}");
    let second = server.object().status.unwrap().digest.unwrap();
    assert_ne!(first, second);

    // A restarted agent knows it from its state directory alone.
    drop(a);
    let restarted = Prepuller::new(runtime.clone(), &state_dir);
    assert_eq!(restarted.objects(), vec!["default/curl-and-jq".to_string()]);
    restarted.release("default/curl-and-jq").await;
    let repo = format!("{host}/niximage/default/curl-and-jq");
    assert!(runtime
        .image(&format!("{repo}@{second}"))
        .await
        .unwrap()
        .is_none());
    assert!(runtime.image(&tag_ref).await.unwrap().is_none());
    assert!(
        runtime
            .image(&format!("{repo}@{first}"))
            .await
            .unwrap()
            .is_some(),
        "what someone else pulled stays"
    );
}

/// A runtime that does not answer: the image is Ready and served all the
/// same, and the node's entry says why it is not in the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_that_does_not_answer_is_reported_and_the_image_stays_ready() {
    let dir = tempfile::tempdir().unwrap();
    let state = fake_state(dir.path()).await.0;
    let runtime = nixery::cri::Runtime::new(&dir.path().join("no-such.sock")).unwrap();
    let prepull = Arc::new(Prepuller::new(runtime, dir.path()));
    let mut a = agent("node-a", "127.0.0.1:5000", &state, move |c| {
        c.prepull = Some(prepull)
    });
    let server = Server::new(niximage("curl-and-jq", 1, &["curl", "jq"], &[]));
    build_to_ready(&server, &mut a, ("0/1", "1/1")).await;
    build_finished(&mut a).await;
    let (result, calls) = reconcile(&server, &mut a, 1).await;
    assert!(result.is_ok(), "{result:?}");
    assert_node_patch(&calls[0], "node-a", "Ready");
    let entry = &server.object().status.unwrap().nodes[0];
    assert_eq!(entry.pre_pulled, None);
    let message = entry.message.clone().unwrap();
    assert!(
        message.contains("pre-pulling into the container runtime failed")
            && message.contains("Version"),
        "{message}"
    );
    assert_eq!(
        server.object().status.unwrap().phase.as_deref(),
        Some("Ready")
    );
    // Within a minute it is not tried again: nothing more is written.
    let (_, calls) = reconcile(&server, &mut a, 0).await;
    assert!(calls.is_empty());
}
