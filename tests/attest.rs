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
use sha2::Digest as _;

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

/// `cosign verify` of `reference` with the public key `public` (in `dir`).
fn cosign_verify(
    root: &Path,
    dir: &Path,
    public: &Path,
    reference: &str,
) -> (bool, String, String) {
    in_root(
        root,
        dir,
        &[
            "cosign",
            "verify",
            "--key",
            public.to_str().unwrap(),
            "--insecure-ignore-tlog",
            "--allow-http-registry",
            reference,
        ],
    )
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

/// The digest of shell/hello's OCI manifest at `server` (built if need be).
fn image_digest(server: &Server) -> String {
    let (code, head, _) = get_full(&server.url("/v2/shell/hello/manifests/latest"));
    assert_eq!(code, 200);
    head.lines()
        .find_map(|l| {
            l.to_lowercase()
                .strip_prefix("docker-content-digest: ")
                .map(|d| d.trim().to_string())
        })
        .unwrap()
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
    let digest = image_digest(&server);
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

/// How the registry in front of ours lies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Lie {
    None,
    /// One base64 character of the signature changed.
    Signature,
    /// One byte of the signed CycloneDX statement changed (its envelope
    /// served under its new digest, the signature kept).
    Sbom,
    /// One hex digit of a layer's digest changed in the manifest its tag
    /// names (an image whose layer was swapped).
    Layer,
}

/// A registry in front of `state` that serves what it serves, but for the
/// one byte `lie` changes. Returns its address.
async fn liar(
    state: nixery::registry::AppState,
    lie: std::sync::Arc<std::sync::Mutex<Lie>>,
) -> std::net::SocketAddr {
    use axum::http::{HeaderValue, Method, StatusCode};
    use axum::response::IntoResponse;
    let forged: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>> =
        Default::default();
    let handler = move |req: axum::extract::Request| {
        let (state, lie, forged) = (state.clone(), *lie.lock().unwrap(), forged.clone());
        async move {
            let uri = req.uri().to_string();
            let head = req.method() == Method::HEAD;
            let accept: Vec<(String, String)> = req
                .headers()
                .get_all("accept")
                .iter()
                .map(|v| ("accept".to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            if let Some(bytes) = uri
                .rsplit_once("/blobs/")
                .and_then(|(_, d)| forged.lock().unwrap().get(d).cloned())
            {
                return (StatusCode::OK, bytes).into_response();
            }
            let headers: Vec<(&str, &str)> = accept
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let r = common::request(&state, Method::GET, &uri, &headers).await;
            let mut body = r.body.clone();
            let manifest = uri.contains("/manifests/") && r.status == StatusCode::OK;
            let json = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap();
            match lie {
                Lie::Signature if manifest && uri.ends_with(".sig") => {
                    let mut m = json(&body);
                    let ann =
                        &mut m["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"];
                    let mut sig: Vec<u8> = ann.as_str().unwrap().as_bytes().to_vec();
                    sig[20] = if sig[20] == b'A' { b'B' } else { b'A' };
                    *ann = Value::String(String::from_utf8(sig).unwrap());
                    body = serde_json::to_vec(&m).unwrap();
                }
                Lie::Sbom if manifest && uri.ends_with(".att") => {
                    use base64::Engine as _;
                    let b64 = base64::engine::general_purpose::STANDARD;
                    let mut m = json(&body);
                    let layers = m["layers"].as_array_mut().unwrap();
                    for l in layers.iter_mut() {
                        if l["annotations"]["predicateType"] != "https://cyclonedx.org/bom" {
                            continue;
                        }
                        let repo = uri.split("/manifests/").next().unwrap();
                        let blob = common::request(
                            &state,
                            Method::GET,
                            &format!("{repo}/blobs/{}", l["digest"].as_str().unwrap()),
                            &[],
                        )
                        .await;
                        let mut env: Value = serde_json::from_slice(&blob.body).unwrap();
                        let statement = b64.decode(env["payload"].as_str().unwrap()).unwrap();
                        let text = String::from_utf8(statement).unwrap();
                        let at = text.find("hello-host").expect("the statement names hello");
                        let mut changed = text.into_bytes();
                        changed[at] = b'j';
                        env["payload"] = Value::String(b64.encode(&changed));
                        let forged_blob = serde_json::to_vec(&env).unwrap();
                        let d = nixery::name::Digest::of(&forged_blob).to_string();
                        l["digest"] = Value::String(d.clone());
                        l["size"] = forged_blob.len().into();
                        forged.lock().unwrap().insert(d, forged_blob);
                    }
                    body = serde_json::to_vec(&m).unwrap();
                }
                // The image by its tag (not by digest, not an attached tag).
                Lie::Layer if manifest && !uri.contains("/manifests/sha256") => {
                    let mut m = json(&body);
                    let d = m["layers"][0]["digest"].as_str().unwrap().to_string();
                    let last = if d.ends_with('0') { "1" } else { "0" };
                    m["layers"][0]["digest"] =
                        Value::String(format!("{}{last}", &d[..d.len() - 1]));
                    body = serde_json::to_vec(&m).unwrap();
                }
                _ => {}
            }
            let mut resp = if head {
                StatusCode::OK.into_response()
            } else {
                body.clone().into_response()
            };
            *resp.status_mut() = r.status;
            for (k, v) in r.headers.iter() {
                resp.headers_mut().insert(k.clone(), v.clone());
            }
            let h = resp.headers_mut();
            h.insert("content-length", HeaderValue::from(body.len()));
            if r.headers.contains_key("docker-content-digest") {
                let d = nixery::name::Digest::of(&body).to_string();
                h.insert("docker-content-digest", HeaderValue::from_str(&d).unwrap());
            }
            resp
        }
    };
    let app = axum::Router::new().fallback(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Settings for an in-process registry with the offline set and this key.
fn signed_settings(dir: &Path, key: &Path) -> nixery::config::Settings {
    let mut s = settings(dir);
    s.signer = Some(std::sync::Arc::new(
        nixery::attest::Signer::from_file(key).unwrap(),
    ));
    // As an agent's: the host its node's Pods pull by.
    s.public_host = Some("127.0.0.1:5000".into());
    s
}

/// A NixImage's image, built by the controller (mocked API server, real
/// Nix), verifies with cosign and lists its documents with oras; a registry
/// that changes one byte of the signature, of the signed SBOM or of the
/// image makes cosign refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_niximage_verifies_and_one_changed_byte_fails_verification() {
    use common::apiserver::*;
    let test = "a_niximage_verifies_and_one_changed_byte_fails_verification";
    let Some((root, _)) = tools(test) else {
        return;
    };
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keypair(keys.path(), "cosign");
    let dir = tempfile::tempdir().unwrap();
    let state = nixery::app_state(&signed_settings(dir.path(), &key))
        .await
        .unwrap();
    let (_dir, state, mut a, server) = one_agent_on(dir, state, &["hello"]);
    build_to_ready(&server, &mut a, ("0/1", "1/1")).await;
    let lie = std::sync::Arc::new(std::sync::Mutex::new(Lie::None));
    let addr = liar(state.clone(), lie.clone()).await;
    let public = public.to_str().unwrap().to_string();
    let run_cosign = |args: Vec<String>| {
        let (root, keys) = (root.clone(), keys.path().to_path_buf());
        async move {
            tokio::task::spawn_blocking(move || {
                let mut all: Vec<&str> = vec!["cosign"];
                all.extend(args.iter().map(String::as_str));
                in_root(&root, &keys, &all)
            })
            .await
            .unwrap()
        }
    };
    let image = format!("{addr}/niximage/default/curl-and-jq:v1");
    let verify = |extra: &[&str]| {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.extend(
            [
                "--key",
                &public,
                "--insecure-ignore-tlog",
                "--allow-http-registry",
                &image,
            ]
            .map(String::from),
        );
        args
    };
    // The status names the SBOM and the signature, as the registry serves them.
    let status = server.object().status.unwrap();
    let digest = status.digest.clone().unwrap();
    let hex = digest.trim_start_matches("sha256:");
    let repo = "/v2/niximage/default/curl-and-jq";
    let sig = get(&state, &format!("{repo}/manifests/sha256-{hex}.sig")).await;
    assert_eq!(sig.status, 200);
    assert_eq!(
        status.signature.as_deref(),
        sig.header("docker-content-digest")
    );
    assert_eq!(status.nodes[0].signature, status.signature);
    let index = get(&state, &format!("{repo}/referrers/{digest}"))
        .await
        .json();
    let cdx = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["artifactType"] == "application/vnd.cyclonedx+json")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let cdx = get(&state, &format!("{repo}/manifests/{cdx}")).await.json();
    assert_eq!(status.sbom.as_deref(), cdx["layers"][0]["digest"].as_str());
    let sbom = get(
        &state,
        &format!("{repo}/blobs/{}", status.sbom.as_deref().unwrap()),
    )
    .await;
    assert_eq!(sbom.json()["bomFormat"], "CycloneDX");

    // Told the truth, cosign verifies the signature and the attestations.
    let (ok, out, err) = run_cosign(verify(&["verify"])).await;
    assert!(ok, "cosign verify of a NixImage: {err}");
    let status = server.object().status.unwrap();
    assert!(out.contains(status.digest.as_deref().unwrap()), "{out}");
    for t in ["cyclonedx", "slsaprovenance1"] {
        let (ok, _, err) = run_cosign(verify(&["verify-attestation", "--type", t])).await;
        assert!(ok, "cosign verify-attestation --type {t}: {err}");
    }
    let (ok, out, err) = tokio::task::spawn_blocking({
        let (root, image) = (root.clone(), image.clone());
        move || {
            in_root(
                &root,
                Path::new("/tmp"),
                &[
                    "oras",
                    "discover",
                    "--plain-http",
                    "--format",
                    "json",
                    &image,
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "oras discover: {err}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["manifests"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // One byte changed, each time: cosign refuses.
    for (l, args) in [
        (Lie::Signature, verify(&["verify"])),
        (
            Lie::Sbom,
            verify(&["verify-attestation", "--type", "cyclonedx"]),
        ),
        (Lie::Layer, verify(&["verify"])),
    ] {
        *lie.lock().unwrap() = l;
        let (ok, _, err) = run_cosign(args).await;
        assert!(!ok, "cosign accepted a registry that changed the {l:?}");
        eprintln!("{l:?}: cosign said: {}", err.lines().last().unwrap_or(""));
    }
    *lie.lock().unwrap() = Lie::None;
    let (ok, _, err) = run_cosign(verify(&["verify"])).await;
    assert!(ok, "told the truth again: {err}");
}

/// Two fresh state directories with the same key build the same image and
/// serve byte-identical SBOMs, provenance, signature and attestations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fresh_state_directories_serve_identical_documents() {
    let keys = tempfile::tempdir().unwrap();
    if !have_tool(
        "openssl",
        "two_fresh_state_directories_serve_identical_documents",
    ) {
        return;
    }
    let (key, _) = keypair(keys.path(), "cosign");
    let mut served = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let state = nixery::app_state(&signed_settings(dir.path(), &key))
            .await
            .unwrap();
        let accept = [("accept", OCI)];
        let m = common::request(
            &state,
            axum::http::Method::GET,
            "/v2/shell/hello/manifests/latest",
            &accept,
        )
        .await;
        assert_eq!(m.status, 200);
        let digest = m.header("docker-content-digest").unwrap().to_string();
        let hex = digest.trim_start_matches("sha256:").to_string();
        let mut bytes: Vec<(String, Vec<u8>)> = vec![("manifest".into(), m.body.clone())];
        let index = get(&state, &format!("/v2/shell/hello/referrers/{digest}")).await;
        bytes.push(("referrers".into(), index.body.clone()));
        let mut manifests: Vec<String> = index.json()["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["digest"].as_str().unwrap().to_string())
            .collect();
        for tag in ["sig", "att"] {
            let r = get(
                &state,
                &format!("/v2/shell/hello/manifests/sha256-{hex}.{tag}"),
            )
            .await;
            assert_eq!(r.status, 200, "{tag}");
            manifests.push(r.header("docker-content-digest").unwrap().to_string());
        }
        for d in manifests {
            let r = get(&state, &format!("/v2/shell/hello/manifests/{d}")).await;
            assert_eq!(r.status, 200);
            for l in r.json()["layers"].as_array().unwrap() {
                let d = l["digest"].as_str().unwrap();
                let b = get(&state, &format!("/v2/shell/hello/blobs/{d}")).await;
                assert_eq!(b.status, 200);
                bytes.push((d.to_string(), b.body));
            }
            bytes.push((d, r.body));
        }
        served.push(bytes);
    }
    assert_eq!(
        served[0].len(),
        3 + 2 + 2 * 3 + 2,
        "manifests and documents"
    );
    for (a, b) in served[0].iter().zip(&served[1]) {
        assert_eq!(a.0, b.0);
        assert!(
            a.1 == b.1,
            "{} differs between two fresh state directories",
            a.0
        );
    }
}

/// `nixery build --sbom FILE` writes the image's SBOM: CycloneDX, or SPDX
/// for a `.spdx.json` file; the same bytes the registry attaches.
#[test]
fn nixery_build_writes_the_sbom() {
    let dir = tempfile::tempdir().unwrap();
    let mut digests = Vec::new();
    for (file, field, value) in [
        ("hello.cdx.json", "bomFormat", "CycloneDX"),
        ("hello.spdx.json", "spdxVersion", "SPDX-2.3"),
    ] {
        let out = dir.path().join(file);
        let (ok, stdout, err) = run(Command::new(env!("CARGO_BIN_EXE_nixery"))
            .args(["build", "shell/hello", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--pkgs-path")
            .arg(offline_pkgs())
            .args(["--nix-option", "substituters=", "--sbom"])
            .arg(&out)
            .env("RUST_LOG", "warn"));
        assert!(ok, "nixery build --sbom: {err}");
        assert!(err.contains("SBOM"), "{err}");
        let doc: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(doc[field], value, "{file}");
        digests.push((stdout.trim().to_string(), std::fs::read(&out).unwrap()));
    }
    assert_eq!(digests[0].0, digests[1].0, "one image");
    // The registry attaches those very bytes.
    let server = Server::start(&dir.path().join("state"), &[]);
    let digest = image_digest(&server);
    let (_, _, index) = get_full(&server.url(&format!("/v2/shell/hello/referrers/{digest}")));
    let index: Value = serde_json::from_slice(&index).unwrap();
    for (i, t) in ["application/vnd.cyclonedx+json", "application/spdx+json"]
        .iter()
        .enumerate()
    {
        let m = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["artifactType"] == *t)
            .unwrap();
        let (_, doc) = document(
            &server.url("/v2/shell/hello"),
            m["digest"].as_str().unwrap(),
        );
        assert!(
            doc == digests[i].1,
            "{t}: the file differs from the attached document"
        );
    }
}

/// Signatures follow the key across restarts: an image built unsigned is
/// signed once the registry has a key, signed again under a new key (the
/// old one no longer verifies), and served unsigned without a key.
#[test]
fn signatures_follow_the_key_across_restarts() {
    let test = "signatures_follow_the_key_across_restarts";
    let Some((root, _)) = tools(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (first, first_pub) = keypair(dir.path(), "first");
    let (second, second_pub) = keypair(dir.path(), "second");
    let sig_code = |server: &Server| {
        let digest = image_digest(server);
        let hex = digest.trim_start_matches("sha256:").to_string();
        get_full(&server.url(&format!("/v2/shell/hello/manifests/sha256-{hex}.sig"))).0
    };
    let verify = |server: &Server, public: &Path| {
        let image = format!("{}/shell/hello", server.addr);
        cosign_verify(&root, dir.path(), public, &image).0
    };
    {
        let server = Server::start(&state, &[]);
        assert_eq!(sig_code(&server), 404, "unsigned without a key");
    }
    {
        let server = Server::start(&state, &["--signing-key", first.to_str().unwrap()]);
        assert_eq!(sig_code(&server), 200, "signed once there is a key");
        assert!(verify(&server, &first_pub));
    }
    {
        let server = Server::start(&state, &["--signing-key", second.to_str().unwrap()]);
        assert!(
            verify(&server, &second_pub),
            "signed again under the new key"
        );
        assert!(
            !verify(&server, &first_pub),
            "the old key no longer verifies"
        );
    }
    let server = Server::start(&state, &[]);
    assert_eq!(sig_code(&server), 404, "no key, no signature");
}

/// With several systems and a key, the index a tag resolves to is signed
/// as cosign signs one: `cosign verify` of the tag checks the index digest,
/// and each architecture's image keeps its own signature.
#[test]
fn an_image_index_verifies_with_cosign() {
    let test = "an_image_index_verifies_with_cosign";
    let Some((root, _)) = tools(test) else { return };
    if !can_emulate(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keypair(dir.path(), "cosign");
    let server = Server::start(
        &dir.path().join("state"),
        &[
            "--systems",
            "x86_64-linux,aarch64-linux",
            "--nix-option",
            "extra-platforms=aarch64-linux",
            "--signing-key",
            key.to_str().unwrap(),
        ],
    );
    let (code, body) = http_get_accept(
        &server.url("/v2/shell/hello/manifests/latest"),
        "application/vnd.oci.image.index.v1+json",
    );
    assert_eq!(code, 200, "{body}");
    let index_digest = format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(body.as_bytes()))
    );
    let index: Value = serde_json::from_str(&body).unwrap();
    let arm = index["manifests"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let image = format!("{}/shell/hello", server.addr);
    let verify =
        |reference: &str, public: &Path| cosign_verify(&root, dir.path(), public, reference);
    let (ok, out, err) = verify(&image, &public);
    assert!(ok, "cosign verify of the tag: {err}");
    assert!(out.contains(&index_digest), "{out}");
    let (ok, out, err) = verify(&format!("{image}@{arm}"), &public);
    assert!(ok, "cosign verify of the arm64 image: {err}");
    assert!(out.contains(&arm), "{out}");
    let (_, other) = keypair(dir.path(), "other");
    let (ok, _, err) = verify(&image, &other);
    assert!(!ok, "verified with another key: {err}");
}

/// The policy.json and registries.d files of docs/supply-chain.md, as a
/// user writes them from there, for the registry at `host` and the public
/// key `public`: (policy file, registries.d directory).
fn containers_policy(dir: &Path, host: &str, public: &Path) -> (PathBuf, PathBuf) {
    let doc = std::fs::read_to_string(repo_root().join("docs/supply-chain.md")).unwrap();
    let block = |lang: &str, needle: &str| -> String {
        let open = format!("```{lang}\n");
        doc.split(&open)
            .skip(1)
            .map(|b| b.split("```").next().unwrap())
            .find(|b| b.contains(needle))
            .unwrap_or_else(|| panic!("docs/supply-chain.md has no {lang} block with {needle}"))
            .to_string()
    };
    std::fs::create_dir_all(dir.join("registries.d")).unwrap();
    let policy = dir.join("policy.json");
    std::fs::write(
        &policy,
        block("json", "sigstoreSigned")
            .replace("127.0.0.1:5000", host)
            .replace(
                "/etc/containers/nixery-cosign.pub",
                public.to_str().unwrap(),
            ),
    )
    .unwrap();
    std::fs::write(
        dir.join("registries.d/nixery.yaml"),
        block("yaml", "use-sigstore-attachments").replace("127.0.0.1:5000", host),
    )
    .unwrap();
    (policy, dir.join("registries.d"))
}

/// `skopeo copy` (containers/image, Debian 13's skopeo) of `reference` under
/// the policy, into a new directory of `dir`.
fn skopeo_copy(
    root: &Path,
    dir: &Path,
    (policy, registries): &(PathBuf, PathBuf),
    global: &[&str],
    reference: &str,
) -> (bool, String, String) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dest = dir.join(format!("copy-{n}"));
    let mut args = vec![
        "skopeo",
        "--policy",
        policy.to_str().unwrap(),
        "--registries.d",
        registries.to_str().unwrap(),
    ];
    args.extend_from_slice(global);
    let from = format!("docker://{reference}");
    let to = format!("dir:{}", dest.display());
    args.extend(["copy", "--src-tls-verify=false", &from, &to]);
    in_root(root, dir, &args)
}

/// containers/image (the verifier of skopeo, podman, buildah and CRI-O)
/// accepts our signatures under the policy docs/supply-chain.md shows:
/// ad-hoc images under each spelling, an arm64 image of a two-architecture
/// index by tag and by digest; and refuses another key, a signature for
/// another repository, and a registry that signs nothing.
#[test]
fn containers_image_accepts_our_signatures_under_the_policy_users_write() {
    let test = "containers_image_accepts_our_signatures_under_the_policy_users_write";
    let Some((root, _)) = tools(test) else { return };
    let multi = can_emulate(test);
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keypair(dir.path(), "cosign");
    let (_, other) = keypair(dir.path(), "other");
    let mut args = vec!["--signing-key", key.to_str().unwrap()];
    if multi {
        args.extend([
            "--systems",
            "x86_64-linux,aarch64-linux",
            "--nix-option",
            "extra-platforms=aarch64-linux",
        ]);
    }
    let server = Server::start(&dir.path().join("state"), &args);
    let host = server.addr.clone();
    let ours = containers_policy(&dir.path().join("ours"), &host, &public);
    let copy = |files: &(PathBuf, PathBuf), global: &[&str], reference: &str| {
        skopeo_copy(&root, dir.path(), files, global, reference)
    };
    for r in ["shell/hello", "hello/shell"] {
        let (ok, _, err) = copy(&ours, &[], &format!("{host}/{r}:latest"));
        assert!(ok, "skopeo copy of {r} under the policy: {err}");
    }
    // Each spelling's signature names its own repository.
    let digest = image_digest(&server);
    let hex = digest.trim_start_matches("sha256:");
    for r in ["shell/hello", "hello/shell"] {
        let (code, _, sig) = get_full(&server.url(&format!("/v2/{r}/manifests/sha256-{hex}.sig")));
        assert_eq!(code, 200);
        let sig: Value = serde_json::from_slice(&sig).unwrap();
        let payload = sig["layers"][0]["digest"].as_str().unwrap();
        let (code, _, payload) = get_full(&server.url(&format!("/v2/{r}/blobs/{payload}")));
        assert_eq!(code, 200);
        let payload: Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(
            payload["critical"]["identity"]["docker-reference"],
            format!("{host}/{r}")
        );
    }
    if multi {
        // The arm64 image through the index (whose signature is checked),
        // and by its own digest.
        let (ok, _, err) = copy(
            &ours,
            &["--override-arch", "arm64"],
            &format!("{host}/shell/hello:latest"),
        );
        assert!(
            ok,
            "skopeo copy of the arm64 image through the index: {err}"
        );
        let (code, body) = http_get_accept(
            &server.url("/v2/shell/hello/manifests/latest"),
            "application/vnd.oci.image.index.v1+json",
        );
        assert_eq!(code, 200);
        let index: Value = serde_json::from_str(&body).unwrap();
        let arm = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["platform"]["architecture"] == "arm64")
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let (ok, _, err) = copy(&ours, &[], &format!("{host}/shell/hello@{arm}"));
        assert!(ok, "skopeo copy of the arm64 image by digest: {err}");
    }

    // Refused: another key; a policy that wants another repository's
    // signature; a registry that signs nothing.
    let theirs = containers_policy(&dir.path().join("theirs"), &host, &other);
    let (ok, _, err) = copy(&theirs, &[], &format!("{host}/shell/hello:latest"));
    assert!(
        !ok && err.contains("Source image rejected"),
        "another key: {err}"
    );
    let elsewhere = containers_policy(&dir.path().join("elsewhere"), &host, &public);
    let text = std::fs::read_to_string(&elsewhere.0).unwrap().replace(
        "{ \"type\": \"matchRepository\" }",
        &format!(
            "{{ \"type\": \"exactRepository\", \"dockerRepository\": \"{host}/hello/shell\" }}"
        ),
    );
    assert!(text.contains("exactRepository"), "{text}");
    std::fs::write(&elsewhere.0, text).unwrap();
    let (ok, _, err) = copy(&elsewhere, &[], &format!("{host}/shell/hello:latest"));
    assert!(
        !ok && err.contains("Source image rejected") && err.contains("is not accepted"),
        "a signature for shell/hello where hello/shell is wanted: {err}"
    );
    let unsigned = Server::start(&dir.path().join("unsigned-state"), &[]);
    let plain = containers_policy(&dir.path().join("plain"), &unsigned.addr, &public);
    let (ok, _, err) = copy(
        &plain,
        &[],
        &format!("{}/shell/hello:latest", unsigned.addr),
    );
    assert!(
        !ok && err.contains("Source image rejected"),
        "no signature: {err}"
    );
}

/// A NixImage's image as a node's Pods pull it, from their agent by the
/// host it signs for: containers/image accepts it by tag and by the digest
/// status names, and status.signature is the signature it got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_image_accepts_a_niximage_image() {
    use common::apiserver::*;
    let test = "containers_image_accepts_a_niximage_image";
    let Some((root, _)) = tools(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keypair(dir.path(), "cosign");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let mut settings = signed_settings(&dir.path().join("state"), &key);
    settings.public_host = Some(host.clone());
    let state = nixery::app_state(&settings).await.unwrap();
    tokio::spawn(nixery::serve_on(
        listener,
        state.clone(),
        std::future::pending(),
    ));
    let mut a = agent("node-a", &host, &state, |_| {});
    let server = apiserver::Server::new(niximage("curl-and-jq", 1, &["hello"], &[]));
    build_to_ready(&server, &mut a, ("0/1", "1/1")).await;
    let status = server.object().status.unwrap();
    let digest = status.digest.clone().unwrap();
    let files = containers_policy(&dir.path().join("ours"), &host, &public);
    let repo = format!("{host}/niximage/default/curl-and-jq");
    let (root2, d) = (root.clone(), dir.path().to_path_buf());
    let (by_tag, by_digest) = tokio::task::spawn_blocking(move || {
        (
            skopeo_copy(&root2, &d, &files, &[], &format!("{repo}:v1")),
            skopeo_copy(&root2, &d, &files, &[], &format!("{repo}@{digest}")),
        )
    })
    .await
    .unwrap();
    assert!(by_tag.0, "by tag: {}", by_tag.2);
    assert!(by_digest.0, "by digest: {}", by_digest.2);
    let hex = status
        .digest
        .as_deref()
        .unwrap()
        .trim_start_matches("sha256:");
    let sig = common::request(
        &state,
        axum::http::Method::GET,
        &format!("/v2/niximage/default/curl-and-jq/manifests/sha256-{hex}.sig"),
        &[("host", host.as_str())],
    )
    .await;
    assert_eq!(sig.status, 200);
    assert_eq!(
        status.signature.as_deref(),
        sig.header("docker-content-digest")
    );
}
