//! A NixImage's image, built by the controller (against the mocked API
//! server) with real Nix, pulled and run by real clients: skopeo copies every
//! layer, docker runs it; after deletion the registry answers 404.

mod common;

use axum::http::StatusCode;
use common::apiserver::*;
use common::*;
use serde_json::{json, Value};

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

    // Deleted (no finalizer of ours holds it: the reconcile of an object
    // that is going makes no call, and drops its image).
    server.edit(|o| o["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z"));
    let (result, _) = reconcile(&server, &mut a, 0).await;
    assert_eq!(
        result.unwrap(),
        kube::runtime::controller::Action::await_change()
    );
    let r = get(&state, "/v2/niximage/default/curl-and-jq/manifests/v1").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
    );
    let _ = stop_tx.send(());
}
