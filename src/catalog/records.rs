//! What the catalog stores, in memory: requests, the images they resolved
//! to (with every digest each is made of, and the objects that named it),
//! manifests and indexes by digest, and which repository asked for what.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::image::{digests_of, BuiltImage};
use crate::name::Digest;
use crate::oci;

/// One request's answer: the image, and until when it holds (None: for
/// good, as for a git commit; a branch, channel or path can move).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct RequestEntry {
    pub(super) image: String,
    /// The repository it was asked under (canonical name), whose content the
    /// image then is.
    #[serde(default)]
    pub(super) repo: Option<String>,
    /// The tag it was asked for.
    #[serde(default)]
    pub(super) tag: Option<String>,
    /// Seconds since the epoch.
    pub(super) expires: Option<u64>,
}

#[derive(Default)]
pub(super) struct Inner {
    /// Manifest GETs per manifest digest.
    pub(super) pulls: HashMap<Digest, u64>,
    pub(super) requests: HashMap<String, RequestEntry>,
    pub(super) images: HashMap<String, ImageRec>,
    pub(super) manifests: HashMap<Digest, (&'static str, bytes::Bytes)>,
    /// Repository (canonical name) -> image keys asked for under it, so a
    /// request by digest is checked without scanning every request.
    pub(super) repos: HashMap<String, HashSet<String>>,
    /// Manifest digest (either encoding) -> image key.
    pub(super) by_digest: HashMap<Digest, String>,
    /// Image indexes (manifest lists) of one image per architecture.
    pub(super) indexes: HashMap<Digest, IndexEntry>,
}

/// An image index or manifest list, with the manifests it lists.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct IndexEntry {
    pub media_type: String,
    /// The index itself (small JSON), as served.
    pub manifest: String,
    pub members: Vec<Digest>,
}

/// One catalogued image.
pub(super) struct ImageRec {
    pub(super) img: Arc<BuiltImage>,
    /// When built (seconds since the epoch).
    pub(super) built: u64,
    /// When last asked for (milliseconds since the epoch).
    pub(super) used: AtomicU64,
    /// Every digest it is made of.
    pub(super) digests: HashSet<Digest>,
    /// NixImage objects that named it.
    pub(super) objects: BTreeSet<String>,
    /// Its CycloneDX SBOM's digest, read from its
    /// attached manifests once (the page lists them twice a second).
    pub(super) sbom: Option<Digest>,
}

impl ImageRec {
    pub(super) fn touch(&self) {
        self.used.fetch_max(now_millis(), Ordering::Relaxed);
    }
}

impl Inner {
    pub(super) fn add_image(&mut self, key: String, img: Arc<BuiltImage>, built: u64, used: u64) {
        index_manifests(&mut self.manifests, &img);
        self.by_digest.insert(img.oci_digest.clone(), key.clone());
        self.by_digest
            .insert(img.docker_digest.clone(), key.clone());
        let digests = digests_of(&img);
        let sbom = crate::attest::document_digest(&img.attached, crate::attest::CYCLONEDX);
        let objects = self
            .images
            .remove(&key)
            .map(|r| r.objects)
            .unwrap_or_default();
        self.images.insert(
            key,
            ImageRec {
                img,
                built,
                used: AtomicU64::new(used),
                digests,
                sbom,
                objects,
            },
        );
    }

    /// Removes an image, every request that resolves to it and its indexes.
    pub(super) fn remove_image(&mut self, key: &str) -> Option<ImageRec> {
        let rec = self.images.remove(key)?;
        // An index is dropped with any of its manifests: served, it would
        // send that architecture's clients to a manifest that is gone.
        self.indexes.retain(|_, i| {
            !i.members
                .iter()
                .any(|m| *m == rec.img.oci_digest || *m == rec.img.docker_digest)
        });
        self.requests.retain(|_, r| r.image != key);
        for images in self.repos.values_mut() {
            images.remove(key);
        }
        self.repos.retain(|_, images| !images.is_empty());
        for d in [&rec.img.oci_digest, &rec.img.docker_digest] {
            self.by_digest.remove(d);
            self.manifests.remove(d);
            self.pulls.remove(d);
        }
        for (d, _) in &rec.img.attached {
            self.manifests.remove(d);
        }
        Some(rec)
    }

    pub(super) fn add_request(&mut self, key: String, r: RequestEntry) {
        if let Some(repo) = &r.repo {
            self.repos
                .entry(repo.clone())
                .or_default()
                .insert(r.image.clone());
        }
        self.requests.insert(key, r);
    }
}

pub(super) fn index_manifests(
    index: &mut HashMap<Digest, (&'static str, bytes::Bytes)>,
    img: &BuiltImage,
) {
    index.insert(
        img.oci_digest.clone(),
        (oci::OCI_MANIFEST, img.oci_manifest.clone()),
    );
    if img.has_docker_manifest() {
        index.insert(
            img.docker_digest.clone(),
            (oci::DOCKER_MANIFEST, img.docker_manifest.clone()),
        );
    }
    for (d, m) in &img.attached {
        index.insert(d.clone(), (oci::OCI_MANIFEST, m.clone()));
    }
}

pub(super) fn now_secs() -> u64 {
    now_millis() / 1000
}

pub(super) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    #[test]
    fn an_image_removed_takes_its_requests_manifests_and_indexes_along() {
        let img = Arc::new(BuiltImage {
            oci_digest: d('1'),
            oci_manifest: bytes::Bytes::from_static(b"{}"),
            docker_digest: d('2'),
            docker_manifest: bytes::Bytes::from_static(b"{}"),
            layers: 0,
            size: 0,
            roots: vec![],
            gcroot_dir: Default::default(),
            attached: vec![(d('3'), bytes::Bytes::from_static(b"{}"))],
        });
        let mut inner = Inner::default();
        inner.add_image("k".into(), img, 1, 1000);
        let request = |image: &str| RequestEntry {
            image: image.into(),
            repo: Some("curl".into()),
            tag: Some("latest".into()),
            expires: None,
        };
        inner.add_request("r".into(), request("k"));
        inner.indexes.insert(
            d('9'),
            IndexEntry {
                media_type: oci::OCI_INDEX.into(),
                manifest: "{}".into(),
                members: vec![d('1')],
            },
        );
        // Both encodings and the attached manifest are served by digest.
        for c in ['1', '2', '3'] {
            assert!(inner.manifests.contains_key(&d(c)), "{c}");
        }
        assert_eq!(inner.by_digest[&d('2')], "k");
        assert!(inner.repos["curl"].contains("k"));
        let rec = inner.remove_image("k").unwrap();
        assert_eq!(rec.img.oci_digest, d('1'));
        assert!(inner.requests.is_empty() && inner.repos.is_empty() && inner.indexes.is_empty());
        assert!(inner.manifests.is_empty() && inner.by_digest.is_empty());
        assert!(inner.remove_image("k").is_none());
    }
}
