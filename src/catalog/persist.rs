//! How the catalog persists: `catalog.json` in the state directory, written
//! atomically after every change (a full disk is logged, and retried by the
//! next write), and read back at start, leaving out what the blob store no
//! longer holds, so a restart serves every stored image without Nix.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{Catalog, IndexEntry, RequestEntry, MAX_MANIFEST};
use crate::image::BuiltImage;
use crate::name::Digest;
use crate::store::BlobStore;

/// An image as the catalog file records it (manifests live in the blob store).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct ImageEntry {
    oci_digest: Digest,
    docker_digest: Digest,
    layers: usize,
    size: u64,
    roots: Vec<String>,
    gcroot_dir: PathBuf,
    /// Seconds since the epoch.
    built: u64,
    /// When it was last asked for (milliseconds since the epoch): the order
    /// in which unpinned images are evicted.
    #[serde(default)]
    used_ms: Option<u64>,
    /// The NixImage objects ("namespace/name") that named it, in any
    /// generation: deleting the last of them drops it, unless it is also
    /// asked for ad hoc.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    objects: BTreeSet<String>,
    /// Manifests attached to it (SBOMs, provenance, signatures).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    attached: Vec<Digest>,
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
pub(super) struct CatalogFile {
    version: u32,
    images: BTreeMap<String, ImageEntry>,
    requests: BTreeMap<String, RequestEntry>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    indexes: BTreeMap<Digest, IndexEntry>,
}

impl Catalog {
    /// Opens the catalog persisted at `state_dir/catalog.json`. An image
    /// whose manifests are no longer in `store` is left out (and rebuilt when
    /// asked for); an unreadable file is set aside, not fatal.
    pub async fn open(state_dir: &Path, store: &dyn BlobStore) -> Self {
        let file = state_dir.join("catalog.json");
        let mut catalog = Catalog {
            file: Some(file.clone()),
            ..Catalog::in_memory()
        };
        let parsed: CatalogFile = match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(error = %e, file = %file.display(), "the catalog is unreadable; starting empty");
                    let _ = std::fs::rename(&file, file.with_extension("json.unreadable"));
                    return catalog;
                }
            },
            Err(_) => return catalog,
        };
        let mut loaded = Vec::new();
        for (key, e) in parsed.images {
            let read = |d: Digest| async move {
                crate::store::get_small(store, &d, MAX_MANIFEST)
                    .await
                    .ok()
                    .flatten()
            };
            let (Some(oci_manifest), Some(docker_manifest)) = (
                read(e.oci_digest.clone()).await,
                read(e.docker_digest.clone()).await,
            ) else {
                tracing::warn!(image = %e.oci_digest, "a catalogued image's manifest is gone; it will be rebuilt");
                continue;
            };
            let mut attached = Vec::with_capacity(e.attached.len());
            for d in &e.attached {
                match read(d.clone()).await {
                    Some(m) => attached.push((d.clone(), m.into())),
                    None => {
                        tracing::warn!(image = %e.oci_digest, manifest = %d, "an attached manifest is gone; the image is served without it")
                    }
                }
            }
            let img = BuiltImage {
                oci_digest: e.oci_digest,
                oci_manifest: oci_manifest.into(),
                docker_digest: e.docker_digest,
                docker_manifest: docker_manifest.into(),
                layers: e.layers,
                size: e.size,
                roots: e.roots,
                gcroot_dir: e.gcroot_dir,
                attached,
            };
            let used = e.used_ms.unwrap_or(e.built * 1000);
            loaded.push((key, img, e.built, used, e.objects));
        }
        let inner = catalog.inner.get_mut().unwrap();
        for (key, img, built, used, objects) in loaded {
            inner.add_image(key.clone(), Arc::new(img), built, used);
            if let Some(rec) = inner.images.get_mut(&key) {
                rec.objects = objects;
            }
        }
        for (key, r) in parsed.requests {
            if inner.images.contains_key(&r.image) {
                inner.add_request(key, r);
            }
        }
        for (digest, i) in parsed.indexes {
            if Digest::of(i.manifest.as_bytes()) == digest
                && i.members.iter().any(|m| inner.by_digest.contains_key(m))
            {
                inner.indexes.insert(digest, i);
            }
        }
        tracing::info!(
            images = inner.images.len(),
            requests = inner.requests.len(),
            "catalog loaded"
        );
        catalog
    }

    /// Writes the catalog file (atomically). A failure (a full disk) is
    /// logged; the catalog in memory stays right, and the next write retries.
    pub(super) fn persist(&self) {
        let Some(file) = &self.file else { return };
        self.dirty.store(false, Ordering::Relaxed);
        let bytes = {
            let inner = self.inner.read().unwrap();
            let f = CatalogFile {
                version: 1,
                images: inner
                    .images
                    .iter()
                    .map(|(k, rec)| {
                        let img = &rec.img;
                        (
                            k.clone(),
                            ImageEntry {
                                oci_digest: img.oci_digest.clone(),
                                docker_digest: img.docker_digest.clone(),
                                layers: img.layers,
                                size: img.size,
                                roots: img.roots.clone(),
                                gcroot_dir: img.gcroot_dir.clone(),
                                built: rec.built,
                                used_ms: Some(rec.used.load(Ordering::Relaxed)),
                                objects: rec.objects.clone(),
                                attached: img.attached.iter().map(|(d, _)| d.clone()).collect(),
                            },
                        )
                    })
                    .collect(),
                requests: inner
                    .requests
                    .iter()
                    .map(|(k, r)| (k.clone(), r.clone()))
                    .collect(),
                indexes: inner
                    .indexes
                    .iter()
                    .map(|(k, i)| (k.clone(), i.clone()))
                    .collect(),
            };
            serde_json::to_vec(&f).expect("the catalog serialises")
        };
        if let Err(e) = crate::store::write_atomic(file, &bytes) {
            tracing::warn!(error = %e, "writing the catalog");
        }
    }
}
