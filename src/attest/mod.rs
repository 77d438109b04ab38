//! Documents that explain and prove an image, computed from what its build
//! already knows: SBOMs, provenance and (with a key) cosign signatures.
//!
//! Each SBOM and the provenance is an OCI 1.1 artifact manifest whose
//! `subject` is the image's OCI manifest, listed by the referrers API (and
//! its fallback tag `sha256-<hex>`), made when the image is built. With a
//! key, `sha256-<hex>.sig` holds a cosign signature of any manifest a client
//! can resolve and `sha256-<hex>.att` the signed attestations (CycloneDX and
//! SLSA provenance), as cosign writes them; those name the repository a
//! client pulls from, so they are made when asked for (`registry::signatures`).
//! All bytes are deterministic: no clock, sorted keys, RFC 6979 signatures.

pub mod cosign;
pub mod provenance;
pub mod sbom;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::layers::PathInfo;
use crate::name::Digest;
use crate::nix::{Resolved, Source};
use crate::oci::{OCI_CONFIG, OCI_MANIFEST};

pub use cosign::Signer;

pub const CYCLONEDX: &str = "application/vnd.cyclonedx+json";
pub const SPDX: &str = "application/spdx+json";
/// An (unsigned) in-toto statement: the provenance as a referrer.
pub const IN_TOTO: &str = "application/vnd.in-toto+json";
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The empty JSON object every artifact manifest's config is.
pub const EMPTY: &[u8] = b"{}";
/// Predicate types, as `cosign verify-attestation --type` names them.
pub const PREDICATE_CYCLONEDX: &str = "https://cyclonedx.org/bom";

/// The image manifest the documents are about.
#[derive(Debug, Clone)]
pub struct Subject {
    pub digest: Digest,
    pub size: u64,
}

/// Everything the documents are computed from.
pub struct Facts<'a> {
    pub subject: Subject,
    /// The image's canonical name (`shell/hello`, `niximage/ns/name`).
    pub repository: String,
    pub closure: &'a [PathInfo],
    /// The requested names and what they resolved to.
    pub resolved: &'a [Resolved],
    /// Output paths and their derivations, in the same order.
    pub outs: &'a [String],
    pub derivations: &'a [String],
    pub source: &'a Source,
    /// The tag or pinned revision the source was evaluated at.
    pub revision: &'a str,
    /// The settings that shape the image (layers, compression, system).
    pub settings: Value,
    pub builder_version: &'a str,
}

impl Facts<'_> {
    fn derivation_of(&self, out: &str) -> Option<&str> {
        let i = self.outs.iter().position(|o| o == out)?;
        self.derivations.get(i).map(String::as_str)
    }
}

/// What to store for an image: blobs first, then the manifests naming them.
#[derive(Debug, Default)]
pub struct Attachments {
    pub blobs: Vec<Vec<u8>>,
    pub manifests: Vec<Vec<u8>>,
}

/// What an attached manifest is, read from its own bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// An OCI 1.1 referrer of `subject`, of this artifact type.
    Referrer {
        subject: Digest,
        artifact_type: String,
    },
    /// cosign's `<digest>.sig`.
    Signature,
    /// cosign's `<digest>.att`.
    Attestations,
}

/// Reads what an attached manifest is (None: not one of ours).
pub fn kind(manifest: &[u8]) -> Option<Kind> {
    let v: Value = serde_json::from_slice(manifest).ok()?;
    if let (Some(t), Some(s)) = (v["artifactType"].as_str(), v["subject"]["digest"].as_str()) {
        return Some(Kind::Referrer {
            subject: s.parse().ok()?,
            artifact_type: t.to_string(),
        });
    }
    match v["layers"][0]["mediaType"].as_str()? {
        cosign::SIMPLE_SIGNING => Some(Kind::Signature),
        cosign::DSSE_ENVELOPE => Some(Kind::Attestations),
        _ => None,
    }
}

/// A descriptor of bytes.
fn descriptor(media_type: &str, bytes: &[u8]) -> Value {
    json!({
        "mediaType": media_type,
        "digest": Digest::of(bytes).to_string(),
        "size": bytes.len(),
    })
}

/// An OCI 1.1 artifact manifest: an empty config, one file, and the image as subject.
fn artifact(artifact_type: &str, file: &[u8], title: &str, subject: &Subject) -> Vec<u8> {
    let mut layer = descriptor(artifact_type, file);
    layer["annotations"] = json!({ "org.opencontainers.image.title": title });
    sbom::to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": descriptor(EMPTY_MEDIA_TYPE, EMPTY),
        "layers": [layer],
        "subject": { "mediaType": OCI_MANIFEST, "digest": subject.digest.to_string(), "size": subject.size },
    }))
}

/// A manifest in the shape cosign writes (ggcr's static layers): a config
/// whose diff IDs are the layers' digests, and annotated layers.
fn cosign_manifest(layers: &[(&str, &[u8], Value)]) -> (Vec<u8>, Vec<u8>) {
    let config = sbom::to_bytes(&json!({
        "architecture": "",
        "os": "",
        "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": layers.iter().map(|_| json!({ "created": "0001-01-01T00:00:00Z" })).collect::<Vec<_>>(),
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|(_, b, _)| Digest::of(b).to_string()).collect::<Vec<_>>(),
        },
    }));
    let manifest = sbom::to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": layers.iter().map(|(t, b, a)| {
            let mut d = descriptor(t, b);
            d["annotations"] = a.clone();
            d
        }).collect::<Vec<_>>(),
    }));
    (config, manifest)
}

/// The documents of an image: its SBOMs and provenance, as referrers.
pub fn attach(facts: &Facts) -> Attachments {
    let mut out = Attachments::default();
    let cdx = sbom::cyclonedx(facts);
    let spdx = sbom::spdx(facts);
    let prov = sbom::to_bytes(&provenance::statement(
        &facts.repository,
        &facts.subject.digest,
        provenance::SLSA_PROVENANCE_V1,
        provenance::predicate(facts),
    ));
    out.manifests
        .push(artifact(CYCLONEDX, &cdx, "sbom.cdx.json", &facts.subject));
    out.manifests
        .push(artifact(SPDX, &spdx, "sbom.spdx.json", &facts.subject));
    out.manifests.push(artifact(
        IN_TOTO,
        &prov,
        "provenance.intoto.json",
        &facts.subject,
    ));
    out.blobs.push(EMPTY.to_vec());
    out.blobs.push(cdx);
    out.blobs.push(spdx);
    out.blobs.push(prov);
    out
}

/// cosign's signature (`<digest>.sig`) of a manifest (an image's, in either
/// format, or an index) under `identity`, the docker reference it is pulled
/// by (`HOST/REPOSITORY`).
pub fn signature(signer: &Signer, identity: &str, subject: &Digest) -> Attachments {
    let mut out = Attachments::default();
    let payload = cosign::simple_signing_payload(identity, subject);
    let sig = cosign::base64(&signer.sign(&payload));
    let (config, manifest) = cosign_manifest(&[(
        cosign::SIMPLE_SIGNING,
        &payload,
        json!({ cosign::SIGNATURE_ANNOTATION: sig }),
    )]);
    out.blobs.push(payload);
    out.blobs.push(config);
    out.manifests.push(manifest);
    out
}

/// cosign's signed attestations (`<digest>.att`) of an image under
/// `identity`: its CycloneDX SBOM and its SLSA provenance predicate, read
/// from the documents attached to it. None when those are gone.
pub async fn attestations(
    signer: &Signer,
    identity: &str,
    subject: &Digest,
    attached: &[(Digest, Bytes)],
    store: &dyn crate::store::BlobStore,
) -> Result<Option<Attachments>, crate::store::StoreError> {
    let read = |t: &'static str| async move {
        match document_digest(attached, t) {
            Some(d) => crate::store::get_small(store, &d, 256 << 20).await,
            None => Ok(None),
        }
    };
    let (Some(cdx), Some(prov)) = (read(CYCLONEDX).await?, read(IN_TOTO).await?) else {
        return Ok(None);
    };
    let cdx: Value = serde_json::from_slice(&cdx).unwrap_or_default();
    let prov: Value = serde_json::from_slice(&prov).unwrap_or_default();
    let statements = [
        (PREDICATE_CYCLONEDX, cdx),
        (provenance::SLSA_PROVENANCE_V1, prov["predicate"].clone()),
    ];
    let envelopes: Vec<(&str, Vec<u8>)> = statements
        .into_iter()
        .map(|(t, p)| {
            let statement = sbom::to_bytes(&provenance::statement(identity, subject, t, p));
            (t, cosign::envelope(signer, &statement))
        })
        .collect();
    let layers: Vec<(&str, &[u8], Value)> = envelopes
        .iter()
        .map(|(t, e)| {
            (
                cosign::DSSE_ENVELOPE,
                e.as_slice(),
                json!({ cosign::SIGNATURE_ANNOTATION: "", "predicateType": t }),
            )
        })
        .collect();
    let (config, manifest) = cosign_manifest(&layers);
    let mut out = Attachments::default();
    out.blobs.extend(envelopes.into_iter().map(|(_, e)| e));
    out.blobs.push(config);
    out.manifests.push(manifest);
    Ok(Some(out))
}

/// An image's attached manifests without the signatures and attestations
/// that builds before on-demand signing stored beside its documents (None:
/// it has none).
pub fn without_signatures(attached: &[(Digest, Bytes)]) -> Option<Vec<(Digest, Bytes)>> {
    let signed =
        |(_, m): &&(Digest, Bytes)| matches!(kind(m), Some(Kind::Signature | Kind::Attestations));
    let unsigned: Vec<(Digest, Bytes)> = attached.iter().filter(|a| !signed(a)).cloned().collect();
    (unsigned.len() != attached.len()).then_some(unsigned)
}

/// The referrers of `subject` among an image's attached manifests, as the
/// OCI index the referrers API answers, optionally of one artifact type.
pub fn referrers_index(
    attached: &[(Digest, Bytes)],
    subject: &Digest,
    artifact_type: Option<&str>,
) -> Vec<u8> {
    let mut manifests: Vec<Value> = attached
        .iter()
        .filter_map(|(d, m)| match kind(m)? {
            Kind::Referrer {
                subject: s,
                artifact_type: t,
            } if s == *subject && artifact_type.is_none_or(|a| a == t) => Some(json!({
                "mediaType": OCI_MANIFEST,
                "digest": d.to_string(),
                "size": m.len(),
                "artifactType": t,
            })),
            _ => None,
        })
        .collect();
    manifests.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    sbom::to_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": crate::oci::OCI_INDEX,
        "manifests": manifests,
    }))
}

/// The attached manifest of this kind (a cosign tag's target).
pub fn find(attached: &[(Digest, Bytes)], wanted: &Kind) -> Option<(Digest, Bytes)> {
    attached
        .iter()
        .find(|(_, m)| kind(m).as_ref() == Some(wanted))
        .cloned()
}

/// The digest of the document of this artifact type (an SBOM, the
/// provenance) among the attached manifests.
pub fn document_digest(attached: &[(Digest, Bytes)], artifact_type: &str) -> Option<Digest> {
    attached.iter().find_map(|(_, m)| {
        let v: Value = serde_json::from_slice(m).ok()?;
        (v["artifactType"] == artifact_type)
            .then(|| v["layers"][0]["digest"].as_str()?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn store_path(i: usize, name: &str) -> String {
        format!(
            "/nix/store/{:0>32}-{name}",
            format!("{i:x}").replace('0', "a")
        )
    }

    /// A closure: `n` paths, each referring to some later ones (a DAG, as
    /// Nix's are) and maybe itself; the first `roots` are what was asked for.
    fn closure() -> impl Strategy<Value = (Vec<PathInfo>, usize)> {
        (1usize..24, "[a-z][a-z0-9+.]{0,8}(-[0-9][a-z0-9.]{0,5})?").prop_flat_map(|(n, name)| {
            let refs = proptest::collection::vec(proptest::collection::vec(any::<bool>(), n), n);
            (refs, 1..=n, Just(name)).prop_map(move |(refs, roots, name)| {
                let paths: Vec<PathInfo> = (0..n)
                    .map(|i| PathInfo {
                        path: store_path(i, &format!("{name}{i}")),
                        nar_size: 100 + i as u64,
                        references: (i..n)
                            .filter(|j| refs[i][*j])
                            .map(|j| store_path(j, &format!("{name}{j}")))
                            .collect(),
                        nar_hash: format!("sha256:{}", Digest::of(&[i as u8]).hex()),
                        deriver: String::new(),
                    })
                    .collect();
                (paths, roots)
            })
        })
    }

    fn facts_of<'a>(
        closure: &'a [PathInfo],
        resolved: &'a [Resolved],
        outs: &'a [String],
        source: &'a Source,
    ) -> Facts<'a> {
        Facts {
            subject: Subject {
                digest: Digest::of(b"image"),
                size: 100,
            },
            repository: "a/b".into(),
            closure,
            resolved,
            outs,
            derivations: &[],
            source,
            revision: "latest",
            settings: json!({}),
            builder_version: "0.0.0",
        }
    }

    proptest! {
        /// The documents depend on the closure alone, not on the order Nix
        /// listed it in; every reference in them names a component.
        #[test]
        fn documents_are_deterministic_and_closed((paths, roots) in closure(), seed in any::<u64>()) {
            let resolved: Vec<Resolved> = paths[..roots].iter().map(|p| Resolved {
                name: p.path[44..].to_string(),
                attr: p.path[44..].to_string(),
                out: p.path.clone(),
                program: None,
                version: None,
                licenses: vec!["MIT".into()],
            }).collect();
            let outs: Vec<String> = resolved.iter().map(|r| r.out.clone()).collect();
            let source = Source::Path("/pkgs".into());
            let mut shuffled = paths.clone();
            // A permutation from the seed.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            let a = facts_of(&paths, &resolved, &outs, &source);
            let b = facts_of(&shuffled, &resolved, &outs, &source);
            prop_assert_eq!(sbom::cyclonedx(&a), sbom::cyclonedx(&b));
            prop_assert_eq!(sbom::spdx(&a), sbom::spdx(&b));

            let bom: Value = serde_json::from_slice(&sbom::cyclonedx(&a)).unwrap();
            let refs: BTreeSet<String> = bom["components"].as_array().unwrap().iter()
                .map(|c| c["bom-ref"].as_str().unwrap().to_string()).collect();
            prop_assert_eq!(refs.len(), paths.len());
            for d in bom["dependencies"].as_array().unwrap() {
                for on in d["dependsOn"].as_array().unwrap() {
                    prop_assert!(refs.contains(on.as_str().unwrap()), "{} names no component", on);
                }
            }
            let spdx: Value = serde_json::from_slice(&sbom::spdx(&a)).unwrap();
            let ids: BTreeSet<&str> = spdx["packages"].as_array().unwrap().iter()
                .map(|p| p["SPDXID"].as_str().unwrap()).collect();
            prop_assert_eq!(ids.len(), paths.len() + 1, "SPDX ids are unique");
            for r in spdx["relationships"].as_array().unwrap() {
                let related = r["relatedSpdxElement"].as_str().unwrap();
                prop_assert!(ids.contains(related), "{} is no package", related);
            }
        }
    }

    use std::collections::BTreeSet;
}
