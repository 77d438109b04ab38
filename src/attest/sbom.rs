//! SBOMs of an image's closure, pure: CycloneDX 1.6 and SPDX 2.3 JSON, one
//! component per store path, the graph from Nix's references, no clock.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::Facts;

/// A store path as a package: `/nix/store/<hash>-curl-8.4.0-bin` is `curl`
/// at `8.4.0-bin`, split as Nix's `builtins.parseDrvName` splits a name (the
/// version starts at the first dash not followed by a letter).
pub fn name_and_version(store_path: &str) -> (String, Option<String>) {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    let name = match base.split_once('-') {
        Some((hash, rest)) if hash.len() == 32 => rest,
        _ => base,
    };
    let bytes = name.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'-' && bytes.get(i + 1).is_some_and(|c| !c.is_ascii_alphabetic()) {
            return (name[..i].to_string(), Some(name[i + 1..].to_string()));
        }
    }
    (name.to_string(), None)
}

/// `pkg:nix/<name>@<version>`, percent-encoded as the purl spec asks.
pub fn purl(name: &str, version: Option<&str>) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    match version {
        Some(v) => format!("pkg:nix/{}@{}", enc(name), enc(v)),
        None => format!("pkg:nix/{}", enc(name)),
    }
}

/// A NAR hash as Nix prints it (`sha256:<hex>`, bare hex, or Nix base32) in hex.
pub fn nar_hash_hex(hash: &str) -> Option<String> {
    let h = hash.strip_prefix("sha256:").unwrap_or(hash);
    if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(h.to_ascii_lowercase());
    }
    nix32_decode(h).map(hex::encode)
}

/// Nix's base32 (its own alphabet, least significant digit last).
fn nix32_decode(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    if s.len() != 52 {
        return None;
    }
    let mut out = vec![0u8; 32];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = ALPHABET.iter().position(|a| *a == c)? as u32;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        out[i] |= (digit << j) as u8;
        if j > 3 {
            let carry = digit >> (8 - j);
            if i + 1 < 32 {
                out[i + 1] |= carry as u8;
            } else if carry != 0 {
                return None;
            }
        }
    }
    Some(out)
}

/// One store path of the closure, as both formats describe it.
struct Package {
    path: String,
    name: String,
    version: Option<String>,
    purl: String,
    sha256: Option<String>,
    licenses: Vec<String>,
    root: bool,
}

fn packages(facts: &Facts) -> Vec<Package> {
    let roots: BTreeMap<&str, &crate::nix::Resolved> =
        facts.resolved.iter().map(|r| (r.out.as_str(), r)).collect();
    let mut out: Vec<Package> = facts
        .closure
        .iter()
        .map(|p| {
            let (parsed, parsed_version) = name_and_version(&p.path);
            let root = roots.get(p.path.as_str());
            // What Nix knows beats what the path's name suggests.
            let version = root
                .and_then(|r| r.version.clone())
                .filter(|v| !v.is_empty())
                .or(parsed_version);
            let name = parsed;
            Package {
                purl: purl(&name, version.as_deref()),
                path: p.path.clone(),
                name,
                version,
                sha256: nar_hash_hex(&p.nar_hash),
                licenses: root.map(|r| r.licenses.clone()).unwrap_or_default(),
                root: root.is_some(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// A UUID (version 5 layout) derived from the image, so the same image
/// always has the same serial number.
fn serial(facts: &Facts, kind: &str) -> String {
    let d = crate::name::Digest::of(format!("{kind}\n{}", facts.subject.digest).as_bytes());
    let h = d.hex();
    let variant = ["8", "9", "a", "b"][usize::from_str_radix(&h[16..17], 16).unwrap_or(0) % 4];
    format!(
        "urn:uuid:{}-{}-5{}-{variant}{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// The other store paths of the closure a path refers to, sorted.
fn depends_on<'a>(info: &'a crate::layers::PathInfo, known: &BTreeSet<&str>) -> Vec<&'a str> {
    let mut on: Vec<&str> = info
        .references
        .iter()
        .map(String::as_str)
        .filter(|r| *r != info.path && known.contains(r))
        .collect();
    on.sort();
    on.dedup();
    on
}

/// CycloneDX 1.6 JSON: the image is the BOM's subject (a container), each
/// store path a component with its NAR hash, purl and `nix:` properties
/// (nixpkgs' CycloneDX taxonomy), and the references as dependencies.
pub fn cyclonedx(facts: &Facts) -> Vec<u8> {
    let pkgs = packages(facts);
    let image_ref = facts.subject.digest.to_string();
    let by_path: BTreeMap<&str, &crate::layers::PathInfo> =
        facts.closure.iter().map(|p| (p.path.as_str(), p)).collect();
    let components: Vec<Value> = pkgs
        .iter()
        .map(|p| {
            let info = by_path[p.path.as_str()];
            let mut c = json!({
                "type": if p.root { "application" } else { "library" },
                "bom-ref": p.path,
                "name": p.name,
                "purl": p.purl,
            });
            if let Some(v) = &p.version {
                c["version"] = json!(v);
            }
            if let Some(h) = &p.sha256 {
                c["hashes"] = json!([{ "alg": "SHA-256", "content": h }]);
            }
            if !p.licenses.is_empty() {
                c["licenses"] = Value::Array(
                    p.licenses
                        .iter()
                        .map(|l| {
                            if is_spdx_id(l) {
                                json!({ "license": { "id": l } })
                            } else {
                                json!({ "license": { "name": l } })
                            }
                        })
                        .collect(),
                );
            }
            let mut props = vec![json!({ "name": "nix:store_path", "value": p.path })];
            if let Some(h) = &p.sha256 {
                // As narinfo files write it, whichever form the store printed.
                props.push(
                    json!({ "name": "nix:narinfo:nar_hash", "value": format!("sha256:{h}") }),
                );
            }
            props.push(
                json!({ "name": "nix:narinfo:nar_size", "value": info.nar_size.to_string() }),
            );
            if !info.deriver.is_empty() {
                props.push(json!({ "name": "nix:narinfo:deriver", "value": info.deriver }));
            }
            let mut refs: Vec<&str> = info.references.iter().map(String::as_str).collect();
            refs.sort();
            if !refs.is_empty() {
                props.push(json!({ "name": "nix:narinfo:references", "value": refs.join(" ") }));
            }
            c["properties"] = Value::Array(props);
            c
        })
        .collect();
    let known: BTreeSet<&str> = pkgs.iter().map(|p| p.path.as_str()).collect();
    let mut dependencies = vec![json!({
        "ref": image_ref,
        "dependsOn": pkgs.iter().filter(|p| p.root).map(|p| p.path.clone()).collect::<Vec<_>>(),
    })];
    for p in &pkgs {
        let on = depends_on(by_path[p.path.as_str()], &known);
        dependencies.push(json!({ "ref": p.path, "dependsOn": on }));
    }
    let bom = json!({
        "$schema": "http://cyclonedx.org/schema/bom-1.6.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": serial(facts, "cyclonedx"),
        "version": 1,
        "metadata": {
            "tools": { "components": [{
                "type": "application", "name": "nixery", "version": facts.builder_version,
            }] },
            "component": {
                "type": "container",
                "bom-ref": image_ref,
                "name": facts.repository,
                "version": image_ref,
                // The package source as built: a flake's locked reference,
                // a git repository at its commit, a channel's URL.
                "properties": [{
                    "name": "nixery:source",
                    "value": super::provenance::source_uri(facts.source, facts.revision),
                }],
            },
        },
        "components": components,
        "dependencies": dependencies,
    });
    to_bytes(&bom)
}

/// Whether a license string is an SPDX identifier (as nixpkgs' `spdxId`s
/// are): letters, digits, `.`, `-` and `+`, starting with a letter or digit.
fn is_spdx_id(s: &str) -> bool {
    !s.is_empty()
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
}

/// An SPDX identifier from a store path: `SPDXRef-` and its hash part.
fn spdx_ref(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let id: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("SPDXRef-{id}")
}

/// SPDX 2.3 JSON: the image as the described package, each store path a
/// package (its NAR hash as SHA256 checksum, its purl), the image CONTAINS
/// the requested packages and each path DEPENDS_ON its references. Its one
/// required time is the image config's fixed `created`.
pub fn spdx(facts: &Facts) -> Vec<u8> {
    let pkgs = packages(facts);
    let by_path: BTreeMap<&str, &crate::layers::PathInfo> =
        facts.closure.iter().map(|p| (p.path.as_str(), p)).collect();
    let image_id = "SPDXRef-image";
    let mut packages = vec![json!({
        "name": facts.repository,
        "SPDXID": image_id,
        "versionInfo": facts.subject.digest.to_string(),
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "primaryPackagePurpose": "CONTAINER",
        "sourceInfo": format!(
            "built by Nix from {}",
            super::provenance::source_uri(facts.source, facts.revision)
        ),
        "checksums": [{ "algorithm": "SHA256", "checksumValue": facts.subject.digest.hex() }],
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": "NOASSERTION",
        "copyrightText": "NOASSERTION",
    })];
    for p in &pkgs {
        let declared = if !p.licenses.is_empty() && p.licenses.iter().all(|l| is_spdx_id(l)) {
            p.licenses.join(" AND ")
        } else {
            "NOASSERTION".to_string()
        };
        let mut pkg = json!({
            "name": p.name,
            "SPDXID": spdx_ref(&p.path),
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "primaryPackagePurpose": if p.root { "APPLICATION" } else { "LIBRARY" },
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": declared,
            "copyrightText": "NOASSERTION",
            "comment": format!("Nix store path {}", p.path),
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": p.purl,
            }],
        });
        if let Some(v) = &p.version {
            pkg["versionInfo"] = json!(v);
        }
        if let Some(h) = &p.sha256 {
            pkg["checksums"] = json!([{ "algorithm": "SHA256", "checksumValue": h }]);
        }
        packages.push(pkg);
    }
    let known: BTreeSet<&str> = pkgs.iter().map(|p| p.path.as_str()).collect();
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": image_id,
    })];
    for p in pkgs.iter().filter(|p| p.root) {
        relationships.push(json!({
            "spdxElementId": image_id,
            "relationshipType": "CONTAINS",
            "relatedSpdxElement": spdx_ref(&p.path),
        }));
    }
    for p in &pkgs {
        for r in depends_on(by_path[p.path.as_str()], &known) {
            relationships.push(json!({
                "spdxElementId": spdx_ref(&p.path),
                "relationshipType": "DEPENDS_ON",
                "relatedSpdxElement": spdx_ref(r),
            }));
        }
    }
    let doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{}@{}", facts.repository, facts.subject.digest),
        "documentNamespace": format!(
            "https://nixery.invalid/spdx/{}/{}",
            facts.subject.digest.hex(),
            serial(facts, "spdx").trim_start_matches("urn:uuid:")
        ),
        "creationInfo": {
            "created": "1970-01-01T00:00:01Z",
            "creators": [format!("Tool: nixery-{}", facts.builder_version)],
        },
        "documentDescribes": [image_id],
        "packages": packages,
        "relationships": relationships,
    });
    to_bytes(&doc)
}

/// Canonical bytes: serde_json keeps object keys sorted (no
/// `preserve_order`), arrays are built in sorted order above.
pub(super) fn to_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON values serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_paths_split_as_nix_splits_names() {
        let p = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-curl-8.4.0-bin";
        assert_eq!(
            name_and_version(p),
            ("curl".into(), Some("8.4.0-bin".into()))
        );
        assert_eq!(
            name_and_version("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-host"),
            ("hello-host".into(), None)
        );
        assert_eq!(
            name_and_version(
                "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-python3.11-requests-2.31.0"
            ),
            ("python3.11-requests".into(), Some("2.31.0".into()))
        );
        assert_eq!(purl("gtk+3", Some("3.24")), "pkg:nix/gtk%2B3@3.24");
        assert_eq!(purl("hello-host", None), "pkg:nix/hello-host");
    }

    #[test]
    fn nar_hashes_read_in_every_form_nix_prints() {
        let hex = "7dbc9a043057977bdd72d525309e6a318e09f8fd2cb9a903e9982d97988bd615";
        assert_eq!(nar_hash_hex(hex).as_deref(), Some(hex));
        assert_eq!(nar_hash_hex(&format!("sha256:{hex}")).as_deref(), Some(hex));
        // `nix-hash --type sha256 --to-base32` of the same hash.
        let b32 = "05fnifc9fbcqx41skf9czpw0k3iidag309fmfbfpp5sp6029mg3x";
        assert_eq!(nar_hash_hex(b32).as_deref(), Some(hex));
        assert_eq!(nar_hash_hex(""), None);
        assert_eq!(nar_hash_hex("sha256:zz"), None);
    }

    #[test]
    fn spdx_ids_are_told_from_names() {
        assert!(is_spdx_id("GPL-3.0-or-later"));
        assert!(is_spdx_id("MIT"));
        assert!(!is_spdx_id("Free, with attribution"));
        assert!(!is_spdx_id(""));
    }
}
