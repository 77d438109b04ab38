//! One name, every architecture: the built `nixery` with `--systems
//! x86_64-linux,aarch64-linux` serves an image index (and a Docker manifest
//! list) for ad-hoc names, built by the host's Nix for aarch64 under
//! emulation (scripts/offline-root.sh: Debian's arm64 packages and
//! qemu-user-static), and Docker pulls and runs each platform.

mod common;

use std::process::Command;

use common::{can_emulate, have_tool, http_get_accept, run, Server};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

const BOTH: &[&str] = &[
    "--systems",
    "x86_64-linux,aarch64-linux",
    "--nix-option",
    "extra-platforms=aarch64-linux",
];

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// (architecture, digest) of each manifest an index lists.
fn platforms(index: &serde_json::Value) -> Vec<(String, String)> {
    index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            (
                m["platform"]["architecture"].as_str().unwrap().to_string(),
                m["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn digest_of(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

#[test]
fn one_name_serves_every_architecture() {
    if !can_emulate("one_name_serves_every_architecture") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), BOTH);
    let url = |p: &str| server.url(p);

    // An OCI index, amd64 first, whose manifests are each of their own
    // architecture (the config says so) and served under the name.
    let (code, body) = http_get_accept(
        &url("/v2/shell/hello/manifests/latest"),
        &format!("{OCI_INDEX},{OCI_MANIFEST}"),
    );
    assert_eq!(code, 200, "{body}");
    let index = json(&body);
    assert_eq!(index["mediaType"], OCI_INDEX);
    let listed = platforms(&index);
    let archs: Vec<&str> = listed.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    assert_ne!(listed[0].1, listed[1].1);
    for (arch, digest) in &listed {
        let (code, body) = http_get_accept(
            &url(&format!("/v2/shell/hello/manifests/{digest}")),
            OCI_MANIFEST,
        );
        assert_eq!(code, 200);
        assert_eq!(&digest_of(body.as_bytes()), digest);
        let config = json(&body)["config"]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let (code, config) =
            http_get_accept(&url(&format!("/v2/shell/hello/blobs/{config}")), "*/*");
        assert_eq!(code, 200);
        assert_eq!(json(&config)["architecture"], arch.as_str());
    }
    let index_digest = digest_of(body.as_bytes());
    // The index by its digest, under its name only.
    let (code, again) = http_get_accept(
        &url(&format!("/v2/shell/hello/manifests/{index_digest}")),
        OCI_INDEX,
    );
    assert_eq!((code, again.as_str()), (200, body.as_str()));
    let (code, _) = http_get_accept(
        &url(&format!("/v2/shell/jq/manifests/{index_digest}")),
        OCI_INDEX,
    );
    assert_eq!(code, 404, "an index is served only under its name");

    // A client that takes only Docker types gets a manifest list of
    // schema2 manifests; one that takes no list, the host's manifest.
    let (code, list) = http_get_accept(
        &url("/v2/shell/hello/manifests/latest"),
        &format!("{DOCKER_LIST},{DOCKER_MANIFEST}"),
    );
    assert_eq!(code, 200);
    let list = json(&list);
    assert_eq!(list["mediaType"], DOCKER_LIST);
    assert!(list["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["mediaType"] == DOCKER_MANIFEST));
    assert_eq!(platforms(&list).len(), 2);
    let (_, single) = http_get_accept(&url("/v2/shell/hello/manifests/latest"), OCI_MANIFEST);
    assert_eq!(digest_of(single.as_bytes()), listed[0].1);
    // arm64/ names one architecture: its manifest, never an index.
    let (code, arm) = http_get_accept(
        &url("/v2/arm64/shell/hello/manifests/latest"),
        &format!("{OCI_INDEX},{OCI_MANIFEST}"),
    );
    assert_eq!(code, 200);
    assert_eq!(json(&arm)["mediaType"], OCI_MANIFEST);
    assert_eq!(digest_of(arm.as_bytes()), listed[1].1);

    // Kept across a restart: the index by digest before any tag is asked.
    server.kill();
    let server = Server::start(dir.path(), BOTH);
    let (code, again) = http_get_accept(
        &server.url(&format!("/v2/shell/hello/manifests/{index_digest}")),
        OCI_INDEX,
    );
    assert_eq!((code, again.as_str()), (200, body.as_str()));

    // Reproducible: a fresh state directory serves the same index.
    let other = tempfile::tempdir().unwrap();
    let fresh = Server::start(other.path(), BOTH);
    let (_, fresh_body) =
        http_get_accept(&fresh.url("/v2/shell/hello/manifests/latest"), OCI_INDEX);
    assert_eq!(digest_of(fresh_body.as_bytes()), index_digest);
}

#[test]
fn docker_runs_each_platform() {
    if !can_emulate("docker_runs_each_platform")
        || !have_tool("docker", "docker_runs_each_platform")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), BOTH);
    let image = format!("{}/shell/hello", server.addr);
    // Each platform's pull replaces the name's image: both are removed at
    // the end, by id, so the engine is left as it was.
    let mut ids = Vec::new();
    for (platform, machine) in [("linux/arm64", "aarch64"), ("linux/amd64", "x86_64")] {
        let (ok, _, err) =
            run(Command::new("docker").args(["pull", "-q", "--platform", platform, &image]));
        assert!(ok, "docker pull --platform {platform}: {err}");
        let (ok, out, err) = run(Command::new("docker").args([
            "run",
            "--rm",
            "--platform",
            platform,
            &image,
            "sh",
            "-c",
            "hello; uname -m",
        ]));
        assert!(ok, "docker run --platform {platform}: {err}");
        assert_eq!(out, format!("Hello, world!\n{machine}\n"), "{platform}");
        let (ok, out, _) = run(Command::new("docker").args([
            "image",
            "inspect",
            "-f",
            "{{.Architecture}} {{.Id}}",
            &image,
        ]));
        assert!(ok);
        let (arch, id) = out.trim().split_once(' ').unwrap();
        assert_eq!(arch, platform.trim_start_matches("linux/"));
        ids.push(id.to_string());
    }
    // What `docker manifest inspect` shows: both platforms.
    let (ok, out, err) =
        run(Command::new("docker").args(["manifest", "inspect", "--insecure", &image]));
    assert!(ok, "docker manifest inspect: {err}");
    let shown: Vec<String> = json(&out)["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(shown, ["amd64", "arm64"]);
    let _ = run(Command::new("docker").args(["rmi", "-f", &image]));
    let _ = run(Command::new("docker").arg("rmi").arg("-f").args(&ids));
}

/// A system Nix here may not build for: the index request fails, naming
/// it; the host's image is still served to single-arch clients.
#[test]
fn a_system_nix_cannot_build_is_refused_by_name() {
    if !can_emulate("a_system_nix_cannot_build_is_refused_by_name") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // No extra-platforms: Nix refuses aarch64 builds. freshHello is a new
    // derivation on every evaluation, so nothing comes from the store.
    let server = Server::start(
        dir.path(),
        &[
            "--systems",
            "x86_64-linux,aarch64-linux",
            "--nix-option",
            "extra-platforms=",
        ],
    );
    let (code, body) = http_get_accept(
        &server.url("/v2/freshHello/manifests/latest"),
        &format!("{OCI_INDEX},{OCI_MANIFEST}"),
    );
    assert_eq!(code, 404, "{body}");
    let message = json(&body)["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("aarch64-linux"), "{message}");
    let (code, body) = http_get_accept(&server.url("/v2/hello/manifests/latest"), OCI_MANIFEST);
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["mediaType"], OCI_MANIFEST);
}
