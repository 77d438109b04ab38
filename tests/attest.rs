//! SBOMs, provenance and signatures, checked by the tools people check them
//! with: CycloneDX's and SPDX's own validators (PyPI, scripts/sbom-validators.sh),
//! and Debian 13's oras and cosign (in the root of scripts/debian13-root.sh),
//! against an ad-hoc image of the real `nixery serve` and a NixImage's image.
//! A registry in front that changes one byte (of the signature, of the signed
//! SBOM, of a layer's digest) makes cosign refuse; two fresh state
//! directories serve the same bytes.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

const OCI: &str = "application/vnd.oci.image.manifest.v1+json";

/// The Debian 13 root with cosign and oras, and the validators' bin
/// directory; None (said) where they are missing, except under CI.
fn tools(test: &str) -> Option<(PathBuf, PathBuf)> {
    let root = PathBuf::from(
        std::env::var("NIXERY_TRIXIE_ROOT").unwrap_or("/var/cache/nixery-ci/trixie".into()),
    );
    let venv = PathBuf::from(
        std::env::var("NIXERY_SBOM_VALIDATORS")
            .unwrap_or("/var/cache/nixery-ci/sbom-venv/bin".into()),
    );
    let missing: Vec<String> = [
        (root.join("usr/bin/cosign"), "scripts/debian13-root.sh"),
        (root.join("usr/bin/oras"), "scripts/debian13-root.sh"),
        (venv.join("pyspdxtools"), "scripts/sbom-validators.sh"),
    ]
    .into_iter()
    .filter(|(p, _)| !p.exists())
    .map(|(p, by)| format!("{} (made by {by})", p.display()))
    .collect();
    if missing.is_empty() && have_tool("openssl", test) {
        return Some((root, venv));
    }
    let why = format!("{test}: missing {}", missing.join(", "));
    if std::env::var("CI").is_ok() {
        panic!("{why}; .ci/run makes them and CI must run this test");
    }
    skip(&why);
    None
}

/// Runs a Debian 13 program (cosign, oras) with `dir` visible at its path.
fn in_root(root: &Path, dir: &Path, args: &[&str]) -> (bool, String, String) {
    run(Command::new("bash")
        .arg(repo_root().join("scripts/in-root.sh"))
        .arg(root)
        .args(args)
        .env("IN_ROOT_BINDS", dir))
}

/// A fresh P-256 key (PKCS#8 PEM) and its public key, as openssl writes them.
fn keypair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let (ok, _, err) = run(Command::new("openssl").args([
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        key.to_str().unwrap(),
    ]));
    assert!(ok, "openssl genpkey: {err}");
    let (ok, _, err) = run(Command::new("openssl").args([
        "pkey",
        "-in",
        key.to_str().unwrap(),
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]));
    assert!(ok, "openssl pkey: {err}");
    (key, public)
}

/// GET with headers: (status, headers and body) through curl.
fn get_full(url: &str) -> (u16, String, Vec<u8>) {
    let out = Command::new("curl")
        .args(["-s", "-D", "-", "-H", &format!("Accept: {OCI}"), url])
        .output()
        .unwrap();
    let text = out.stdout;
    let split = text
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(text.len());
    let head = String::from_utf8_lossy(&text[..split]).into_owned();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head, text[split..].to_vec())
}

/// The one layer (the document) of an artifact manifest, fetched.
fn document(url_base: &str, manifest_digest: &str) -> (Value, Vec<u8>) {
    let (code, _, m) = get_full(&format!("{url_base}/manifests/{manifest_digest}"));
    assert_eq!(code, 200, "artifact manifest {manifest_digest}");
    let m: Value = serde_json::from_slice(&m).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    let (code, _, blob) = get_full(&format!("{url_base}/blobs/{layer}"));
    assert_eq!(code, 200);
    assert_eq!(nixery::name::Digest::of(&blob).to_string(), layer);
    (m, blob)
}

/// `nix-store --query --hash` of a path, in hex.
fn nar_hash_hex(path: &str) -> String {
    let (ok, out, err) = run(Command::new("nix-store").args(["--query", "--hash", path]));
    assert!(ok, "{err}");
    let h = out.trim().trim_start_matches("sha256:");
    if h.len() == 64 {
        return h.to_string();
    }
    let (ok, out, err) = run(Command::new("nix-hash").args(["--type", "sha256", "--to-base16", h]));
    assert!(ok, "{err}");
    out.trim().to_string()
}

#[test]
fn an_ad_hoc_image_explains_and_proves_itself_to_real_tools() {
    let test = "an_ad_hoc_image_explains_and_proves_itself_to_real_tools";
    let Some((root, venv)) = tools(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keypair(dir.path(), "cosign");
    let server = Server::start(
        &dir.path().join("state"),
        &["--signing-key", key.to_str().unwrap()],
    );
    let base = server.url("/v2/shell/hello");
    let (code, head, _) = get_full(&format!("{base}/manifests/latest"));
    assert_eq!(code, 200);
    let digest = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("docker-content-digest: ")
                .or(l.strip_prefix("Docker-Content-Digest: "))
        })
        .unwrap()
        .trim()
        .to_string();
    let hex = digest.trim_start_matches("sha256:");

    // The public key, at its documented URL.
    let (code, served) = http_get(&server.url("/cosign.pub"));
    assert_eq!(code, 200);
    assert_eq!(served, std::fs::read_to_string(&public).unwrap());

    // The referrers: an SBOM in each format and the provenance, each with
    // the image as subject; filtered by artifact type; the same by the
    // fallback tag.
    let (code, head, body) = get_full(&format!("{base}/referrers/{digest}"));
    assert_eq!(code, 200);
    assert!(head
        .to_lowercase()
        .contains("content-type: application/vnd.oci.image.index.v1+json"));
    let index: Value = serde_json::from_slice(&body).unwrap();
    let by_type = |t: &str| -> String {
        index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["artifactType"] == t)
            .unwrap_or_else(|| panic!("no {t} referrer in {index}"))["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let types: BTreeSet<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["artifactType"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        BTreeSet::from([
            "application/spdx+json",
            "application/vnd.cyclonedx+json",
            "application/vnd.in-toto+json"
        ])
    );
    let (_, head, filtered) = get_full(&format!(
        "{base}/referrers/{digest}?artifactType=application%2Fspdx%2Bjson"
    ));
    assert!(
        head.to_lowercase()
            .contains("oci-filters-applied: artifacttype"),
        "{head}"
    );
    let filtered: Value = serde_json::from_slice(&filtered).unwrap();
    assert_eq!(filtered["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        filtered["manifests"][0]["digest"],
        by_type("application/spdx+json").as_str()
    );
    let (code, _, fallback) = get_full(&format!("{base}/manifests/sha256-{hex}"));
    assert_eq!((code, fallback), (200, body.clone()));

    // CycloneDX: valid by its own schema, every store path of the closure
    // once, with the NAR hash Nix has for it.
    let (m, cdx) = document(&base, &by_type("application/vnd.cyclonedx+json"));
    assert_eq!(m["subject"]["digest"], digest.as_str());
    let cdx_file = dir.path().join("sbom.cdx.json");
    std::fs::write(&cdx_file, &cdx).unwrap();
    let (ok, out, err) = run(Command::new(venv.join("python")).arg("-c").arg(format!(
        "from cyclonedx.validation.json import JsonStrictValidator\n\
         from cyclonedx.schema import SchemaVersion\n\
         e = JsonStrictValidator(SchemaVersion.V1_6).validate_str(open({:?}).read())\n\
         print('invalid:', e) if e else print('valid')",
        cdx_file.display().to_string()
    )));
    assert!(
        ok && out.trim() == "valid",
        "CycloneDX validation: {out} {err}"
    );
    let bom: Value = serde_json::from_slice(&cdx).unwrap();
    let image_deps = bom["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["ref"] == digest.as_str())
        .unwrap();
    let roots: Vec<&str> = image_deps["dependsOn"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        roots.iter().any(|r| r.ends_with("-hello-host")),
        "{roots:?}"
    );
    let mut args = vec!["--query", "--requisites"];
    args.extend(&roots);
    let (ok, closure, err) = run(Command::new("nix-store").args(&args));
    assert!(ok, "{err}");
    let closure: BTreeSet<&str> = closure.lines().collect();
    let components = bom["components"].as_array().unwrap();
    let refs: BTreeSet<&str> = components
        .iter()
        .map(|c| c["bom-ref"].as_str().unwrap())
        .collect();
    assert_eq!(refs, closure, "one component per store path of the closure");
    assert_eq!(components.len(), closure.len());
    for c in components {
        let path = c["bom-ref"].as_str().unwrap();
        assert_eq!(
            c["hashes"][0]["content"],
            nar_hash_hex(path).as_str(),
            "{path}"
        );
        assert!(c["purl"].as_str().unwrap().starts_with("pkg:nix/"));
        assert!(c["properties"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "nix:store_path" && p["value"] == path));
    }

    // SPDX: valid by SPDX's own tools.
    let (_, spdx) = document(&base, &by_type("application/spdx+json"));
    let spdx_file = dir.path().join("sbom.spdx.json");
    std::fs::write(&spdx_file, &spdx).unwrap();
    let (ok, out, err) = run(Command::new(venv.join("pyspdxtools"))
        .arg("-i")
        .arg(&spdx_file));
    assert!(ok, "pyspdxtools: {out} {err}");
    let spdx: Value = serde_json::from_slice(&spdx).unwrap();
    assert_eq!(
        spdx["packages"].as_array().unwrap().len(),
        closure.len() + 1
    );

    // The provenance: what was asked for and what it resolved to.
    let (_, prov) = document(&base, &by_type("application/vnd.in-toto+json"));
    let prov: Value = serde_json::from_slice(&prov).unwrap();
    assert_eq!(prov["predicateType"], "https://slsa.dev/provenance/v1");
    assert_eq!(prov["subject"][0]["digest"]["sha256"], hex);
    let params = &prov["predicate"]["buildDefinition"]["externalParameters"];
    assert!(params["packages"]
        .as_array()
        .unwrap()
        .contains(&"hello".into()));
    assert!(prov["predicate"]["buildDefinition"]["resolvedDependencies"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["uri"].as_str().unwrap().ends_with("-hello-host")
            && d["annotations"]["derivation"]
                .as_str()
                .unwrap()
                .ends_with(".drv")));

    // oras lists them (by the API, and by the fallback tag) and pulls one.
    let image = format!("{}/shell/hello:latest", server.addr);
    for spec in ["v1.1-referrers-api", "v1.1-referrers-tag"] {
        let (ok, out, err) = in_root(
            &root,
            dir.path(),
            &[
                "oras",
                "discover",
                "--plain-http",
                "--distribution-spec",
                spec,
                "--format",
                "json",
                &image,
            ],
        );
        assert!(ok, "oras discover ({spec}): {err}");
        let listed: Value = serde_json::from_str(&out).unwrap();
        let listed: BTreeSet<&str> = listed["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["artifactType"].as_str().unwrap())
            .collect();
        assert_eq!(listed, types, "oras discover ({spec})");
    }
    let pulled = dir.path().join("pulled");
    let (ok, _, err) = in_root(
        &root,
        dir.path(),
        &[
            "oras",
            "pull",
            "--plain-http",
            "-o",
            pulled.to_str().unwrap(),
            &format!(
                "{}/shell/hello@{}",
                server.addr,
                by_type("application/vnd.cyclonedx+json")
            ),
        ],
    );
    assert!(ok, "oras pull: {err}");
    assert_eq!(std::fs::read(pulled.join("sbom.cdx.json")).unwrap(), cdx);

    // cosign: the signature and both attestations verify with the key, not
    // with another one, and no SPDX attestation is claimed.
    let cosign = |args: &[&str]| {
        let mut all = vec!["cosign"];
        all.extend_from_slice(args);
        all.extend(["--insecure-ignore-tlog", "--allow-http-registry", &image]);
        in_root(&root, dir.path(), &all)
    };
    let key = public.to_str().unwrap();
    let (ok, out, err) = cosign(&["verify", "--key", key]);
    assert!(ok, "cosign verify: {err}");
    assert!(out.contains(&digest), "{out}");
    for t in ["cyclonedx", "slsaprovenance1"] {
        let (ok, _, err) = cosign(&["verify-attestation", "--type", t, "--key", key]);
        assert!(ok, "cosign verify-attestation --type {t}: {err}");
    }
    let (ok, _, err) = cosign(&["verify-attestation", "--type", "spdxjson", "--key", key]);
    assert!(
        !ok && err.contains("none of the attestations matched"),
        "{err}"
    );
    let (_, other) = keypair(dir.path(), "other");
    let (ok, _, err) = cosign(&["verify", "--key", other.to_str().unwrap()]);
    assert!(!ok, "verified with another key: {err}");
}
