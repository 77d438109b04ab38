//! What a build gives: an image's manifests, its size and the store paths it
//! roots. Below the builder, which makes them, and the catalog, which keeps
//! them; both name it from here.

use std::collections::HashSet;
use std::path::PathBuf;

use crate::name::Digest;

/// A built image: both manifest encodings, stored as blobs (one, the OCI
/// manifest, when layers are zstd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    pub oci_digest: Digest,
    pub oci_manifest: bytes::Bytes,
    pub docker_digest: Digest,
    pub docker_manifest: bytes::Bytes,
    pub layers: usize,
    /// Compressed size of config and layers.
    pub size: u64,
    /// Store paths of the packages (roots of the closure).
    pub roots: Vec<String>,
    pub gcroot_dir: PathBuf,
    /// Manifests attached to the image (SBOMs, provenance, signatures; see
    /// `attest`), by digest: all small, kept in memory as the image's are.
    pub attached: Vec<(Digest, bytes::Bytes)>,
}

impl BuiltImage {
    /// Whether a Docker schema2 manifest exists beside the OCI one.
    pub fn has_docker_manifest(&self) -> bool {
        self.docker_digest != self.oci_digest
    }
}

/// Every digest an image is made of: its manifests, config and layers, and
/// the manifests attached to it with theirs.
pub fn digests_of(img: &BuiltImage) -> HashSet<Digest> {
    let mut out: HashSet<Digest> = [img.oci_digest.clone(), img.docker_digest.clone()].into();
    out.extend(img.attached.iter().map(|(d, _)| d.clone()));
    let attached = img.attached.iter().map(|(_, m)| m);
    for m in [&img.oci_manifest, &img.docker_manifest]
        .into_iter()
        .chain(attached)
    {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(m) else {
            continue;
        };
        let descriptors =
            std::iter::once(&v["config"]).chain(v["layers"].as_array().into_iter().flatten());
        for d in descriptors {
            if let Some(Ok(d)) = d["digest"].as_str().map(str::parse::<Digest>) {
                out.insert(d);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_made_of_its_manifests_config_layers_and_attachments() {
        let d = |c: char| -> Digest {
            format!("sha256:{}", c.to_string().repeat(64))
                .parse()
                .unwrap()
        };
        let manifest = |config: char, layers: &[char]| -> bytes::Bytes {
            serde_json::json!({
                "config": { "digest": d(config).to_string() },
                "layers": layers.iter().map(|l| serde_json::json!({ "digest": d(*l).to_string() })).collect::<Vec<_>>(),
            })
            .to_string()
            .into()
        };
        let img = BuiltImage {
            oci_digest: d('1'),
            oci_manifest: manifest('c', &['a', 'b']),
            docker_digest: d('1'),
            docker_manifest: manifest('c', &['a', 'b']),
            layers: 2,
            size: 0,
            roots: vec![],
            gcroot_dir: PathBuf::new(),
            // An SBOM attached: its manifest, its config and its one layer.
            attached: vec![(d('2'), manifest('e', &['f']))],
        };
        let want: HashSet<Digest> = "1abc2ef".chars().map(d).collect();
        assert_eq!(digests_of(&img), want);
        assert!(!img.has_docker_manifest());
        // A manifest that is not JSON adds only its own digest.
        let broken = BuiltImage {
            attached: vec![(d('3'), bytes::Bytes::from_static(b"not json"))],
            ..img
        };
        assert!(digests_of(&broken).contains(&d('3')));
        assert_eq!(digests_of(&broken).len(), 5);
    }
}
