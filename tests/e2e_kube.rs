//! End to end against a real Kubernetes API server: runs when KUBECONFIG is
//! set, and is skipped, saying so, when it is not. Applies the CRD, starts
//! `nixery agent` out of cluster, applies the example NixImage, waits for
//! Ready, pulls the image, changes the spec, deletes it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::CustomResourceExt;
use nixery::crd::NixImage;
use serde_json::json;

async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_against_a_real_cluster() {
    if std::env::var("KUBECONFIG").is_err() {
        skip("end_to_end_against_a_real_cluster: KUBECONFIG is not set; this test needs a real API server");
        return;
    }
    let client = kube::Client::try_default()
        .await
        .expect("a client from KUBECONFIG");
    let ssa = PatchParams::apply("nixery-e2e").force();

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "niximages.k8s.nixos.org",
        &ssa,
        &Patch::Apply(NixImage::crd()),
    )
    .await
    .expect("applying the CRD");
    wait_for(
        "the CRD to be established",
        Duration::from_secs(60),
        async || {
            let crd = crds.get("niximages.k8s.nixos.org").await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        },
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .args([
            "agent",
            "--node-name",
            "e2e-node",
            "--listen",
            "127.0.0.1:0",
            "--nix-option",
            "substituters=",
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--pkgs-path")
        .arg(offline_pkgs())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(agent.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the agent exited").unwrap();
        if let Some(rest) = line.split("on http://").nth(1) {
            break rest.trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let name = format!("e2e-{}", std::process::id());
    let images: Api<NixImage> = Api::namespaced(client.clone(), "default");
    let obj = json!({
        "apiVersion": "k8s.nixos.org/v1alpha1", "kind": "NixImage",
        "metadata": { "name": name, "namespace": "default" },
        "spec": { "contents": ["curl", "jq"], "tag": "v1" }
    });
    images
        .patch(&name, &ssa, &Patch::Apply(&obj))
        .await
        .unwrap();
    let first = wait_for("Ready", Duration::from_secs(300), async || {
        let s = images.get(&name).await.ok()?.status?;
        (s.phase.as_deref() == Some("Ready")).then_some(s)
    })
    .await;
    let digest = first.digest.clone().unwrap();
    let reference = format!("{addr}/niximage/default/{name}:v1");
    if have_tool("skopeo", "end_to_end_against_a_real_cluster (pull)") {
        let (ok, out, err) = run(Command::new("skopeo").args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{reference}"),
        ]));
        assert!(ok, "{err}");
        assert!(out.contains(&digest));
    }

    // A spec change makes a new digest.
    let changed = json!({
        "apiVersion": "k8s.nixos.org/v1alpha1", "kind": "NixImage",
        "metadata": { "name": name, "namespace": "default" },
        "spec": { "contents": ["jq"], "tag": "v1" }
    });
    images
        .patch(&name, &ssa, &Patch::Apply(&changed))
        .await
        .unwrap();
    wait_for("a new digest", Duration::from_secs(300), async || {
        let s = images.get(&name).await.ok()?.status?;
        (s.phase.as_deref() == Some("Ready") && s.digest.as_deref() != Some(digest.as_str()))
            .then_some(())
    })
    .await;

    // Delete: the finalizer is released and the object goes away.
    images
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the object to be gone",
        Duration::from_secs(60),
        async || images.get_opt(&name).await.ok()?.is_none().then_some(()),
    )
    .await;
    let (code, _) = {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{addr}/v2/niximage/default/{name}/manifests/v1"),
            ])
            .output()
            .unwrap();
        (String::from_utf8_lossy(&out.stdout).to_string(), ())
    };
    assert_eq!(code, "404");
    let _ = agent.kill();
    let _ = agent.wait();

    let nodes: Api<Node> = Api::all(client.clone());
    let schedulable = nodes
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|n| {
                    !n.spec
                        .as_ref()
                        .and_then(|s| s.unschedulable)
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0);
    if schedulable == 0 {
        skip("deploy/ part of end_to_end_against_a_real_cluster: the cluster has no schedulable nodes");
    } else {
        skip(&format!("deploy/ part of end_to_end_against_a_real_cluster: it needs the agent image (nix/agent-image.nix) loaded on the {schedulable} nodes, which this test cannot build here"));
    }
}
