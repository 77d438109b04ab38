//! The catalog: every image that exists and the names it answers to. Requests
//! (a package set as spelled, at a source revision) point at images (keyed by
//! what the names resolved to); manifests are indexed by digest; NixImage
//! objects name images too. Persisted in the state directory, so a restart
//! serves every stored image without evaluating anything.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::image::{digests_of, BuiltImage};
use crate::name::{self, Digest};
use crate::oci;

mod named;
mod persist;
mod records;
pub use named::{NamedEntry, NamedImages};
pub use records::IndexEntry;
use records::{index_manifests, now_millis, now_secs, Inner, RequestEntry};

/// Manifests are small; a larger blob is not one of ours.
pub const MAX_MANIFEST: u64 = 4 * 1024 * 1024;

/// One catalogued image, as the page lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageSummary {
    /// The repository names it was asked under.
    pub names: Vec<String>,
    pub digest: Digest,
    pub layers: usize,
    pub size: u64,
    /// When it was built (seconds since the epoch).
    pub built: u64,
    /// Manifest GETs served (either encoding), since this process started.
    pub pulls: u64,
    /// Its CycloneDX SBOM's digest.
    pub sbom: Option<Digest>,
    /// Its cosign signature manifest's digest, when it is signed.
    pub signature: Option<Digest>,
}

pub struct Catalog {
    /// Where the catalog is persisted (None: memory only).
    file: Option<PathBuf>,
    inner: RwLock<Inner>,
    /// Whether last-use times changed since the file was written.
    dirty: AtomicBool,
    /// Blobs being sent to a client now, with how many downloads of each.
    streaming: Arc<std::sync::Mutex<HashMap<Digest, usize>>>,
    pub named: NamedImages,
}

/// A blob being sent; garbage collection spares the images holding it
/// until this is dropped (the download ended, or the client went away).
pub struct Streaming {
    streaming: Arc<std::sync::Mutex<HashMap<Digest, usize>>>,
    digest: Digest,
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let mut s = self.streaming.lock().unwrap();
        if let Some(n) = s.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                s.remove(&self.digest);
            }
        }
    }
}

/// What the garbage collector needs to know of one image.
#[derive(Debug, Clone)]
pub struct GcEntry {
    pub key: String,
    pub image: Arc<BuiltImage>,
    /// Milliseconds since the epoch.
    pub used: u64,
    pub digests: HashSet<Digest>,
    /// Whether a NixImage object named it (in any generation).
    pub claimed: bool,
}

impl Catalog {
    /// A catalog that lives in memory only.
    pub fn in_memory() -> Self {
        Catalog {
            file: None,
            inner: Default::default(),
            dirty: AtomicBool::new(false),
            streaming: Default::default(),
            named: Default::default(),
        }
    }

    /// The image a request resolved to, while that answer holds.
    pub fn request(&self, key: &str) -> Option<Arc<BuiltImage>> {
        let inner = self.inner.read().unwrap();
        let r = inner.requests.get(key)?;
        if r.expires.is_some_and(|t| now_secs() >= t) {
            return None;
        }
        let rec = inner.images.get(&r.image)?;
        rec.touch();
        self.dirty.store(true, Ordering::Relaxed);
        Some(rec.img.clone())
    }

    /// Whether `digest` is content of repository `repo` (canonical name): of
    /// an image asked for under that name.
    pub fn in_repository(&self, repo: &str, digest: &Digest) -> bool {
        let inner = self.inner.read().unwrap();
        // A part asked for is a use: a pull in progress stays the most
        // recently used (see `--eviction-grace`).
        let held = |digest: &Digest| {
            inner
                .repos
                .get(repo)
                .into_iter()
                .flatten()
                .filter_map(|k| inner.images.get(k))
                .filter(|rec| rec.digests.contains(digest))
                .map(|rec| rec.touch())
                .count()
                > 0
        };
        self.dirty.store(true, Ordering::Relaxed);
        // An index is the repository's when a
        // manifest it lists is.
        held(digest)
            || inner
                .indexes
                .iter()
                .any(|(d, i)| d == digest && i.members.iter().any(held))
    }

    /// The images asked for under repository `repo` (canonical name).
    pub fn images_in_repository(&self, repo: &str) -> Vec<Arc<BuiltImage>> {
        let inner = self.inner.read().unwrap();
        inner
            .repos
            .get(repo)
            .into_iter()
            .flatten()
            .filter_map(|k| inner.images.get(k))
            .map(|rec| rec.img.clone())
            .collect()
    }

    /// The indexes (and manifest lists) that list any of `members`.
    pub fn indexes_listing(&self, members: &[Digest]) -> Vec<Digest> {
        let inner = self.inner.read().unwrap();
        inner
            .indexes
            .iter()
            .filter(|(_, i)| i.members.iter().any(|m| members.contains(m)))
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// The index that `digest` is.
    pub fn index_holding(&self, digest: &Digest) -> Option<IndexEntry> {
        self.inner.read().unwrap().indexes.get(digest).cloned()
    }

    /// Records an image index (or manifest list) of `members`, served by
    /// its digest where one of them is.
    pub fn add_index(&self, media_type: &str, manifest: &[u8], members: Vec<Digest>) -> Digest {
        let digest = Digest::of(manifest);
        let added = {
            let mut inner = self.inner.write().unwrap();
            if inner.indexes.contains_key(&digest) {
                false
            } else {
                inner.indexes.insert(
                    digest.clone(),
                    IndexEntry {
                        media_type: media_type.to_string(),
                        manifest: String::from_utf8_lossy(manifest).into_owned(),
                        members,
                    },
                );
                true
            }
        };
        if added {
            self.persist();
        }
        digest
    }

    /// The index with this digest.
    pub fn index(&self, digest: &Digest) -> Option<IndexEntry> {
        self.inner.read().unwrap().indexes.get(digest).cloned()
    }

    /// Drops an index (a NixImage's, when the object goes).
    pub fn remove_index(&self, digest: &Digest) {
        let removed = self.inner.write().unwrap().indexes.remove(digest).is_some();
        if removed {
            self.persist();
        }
    }

    /// Whether `digest` is content of the catalogued image whose OCI manifest
    /// is `image` (None: that image is not catalogued).
    pub fn image_holds(&self, image: &Digest, digest: &Digest) -> Option<bool> {
        let inner = self.inner.read().unwrap();
        let key = inner.by_digest.get(image)?;
        let rec = inner.images.get(key)?;
        let holds = rec.digests.contains(digest);
        if holds {
            // A part asked for is a use, as in `in_repository`.
            rec.touch();
            self.dirty.store(true, Ordering::Relaxed);
        }
        Some(holds)
    }

    /// Marks a blob as being sent until the guard is dropped.
    pub fn streaming(&self, digest: &Digest) -> Streaming {
        *self
            .streaming
            .lock()
            .unwrap()
            .entry(digest.clone())
            .or_default() += 1;
        Streaming {
            streaming: self.streaming.clone(),
            digest: digest.clone(),
        }
    }

    /// Whether any of these blobs is being sent now.
    pub fn any_streaming(&self, digests: &HashSet<Digest>) -> bool {
        let s = self.streaming.lock().unwrap();
        !s.is_empty() && s.keys().any(|d| digests.contains(d))
    }

    /// The image key a request resolves to, while that answer holds.
    pub fn request_image_key(&self, key: &str) -> Option<String> {
        let inner = self.inner.read().unwrap();
        let r = inner.requests.get(key)?;
        r.expires
            .is_none_or(|t| now_secs() < t)
            .then(|| r.image.clone())
    }

    /// The image built for an image key.
    pub fn image(&self, image_key: &str) -> Option<Arc<BuiltImage>> {
        let inner = self.inner.read().unwrap();
        let rec = inner.images.get(image_key)?;
        rec.touch();
        self.dirty.store(true, Ordering::Relaxed);
        Some(rec.img.clone())
    }

    /// The catalogued image whose OCI manifest has this digest.
    pub fn image_with_digest(&self, digest: &Digest) -> Option<Arc<BuiltImage>> {
        let inner = self.inner.read().unwrap();
        let key = inner.by_digest.get(digest)?;
        inner.images.get(key).map(|rec| rec.img.clone())
    }

    /// Records a built image under its image key.
    pub fn add_image(&self, image_key: &str, img: Arc<BuiltImage>) {
        {
            let mut inner = self.inner.write().unwrap();
            inner.add_image(image_key.to_string(), img, now_secs(), now_millis());
        }
        self.persist();
    }

    /// Every catalogued image.
    pub fn images(&self) -> Vec<Arc<BuiltImage>> {
        let inner = self.inner.read().unwrap();
        let mut out: Vec<Arc<BuiltImage>> = inner.images.values().map(|r| r.img.clone()).collect();
        out.sort_by(|a, b| a.oci_digest.cmp(&b.oci_digest));
        out
    }

    /// Replaces the manifests attached to the image whose OCI manifest is
    /// `image` (its signature made again under another key, or dropped).
    pub fn set_attached(&self, image: &Digest, attached: Vec<(Digest, bytes::Bytes)>) {
        {
            let mut inner = self.inner.write().unwrap();
            let Some(key) = inner.by_digest.get(image).cloned() else {
                return;
            };
            let Some(old) = inner.images.get(&key).map(|r| r.img.clone()) else {
                return;
            };
            for (d, _) in &old.attached {
                inner.manifests.remove(d);
            }
            let mut img = (*old).clone();
            img.attached = attached;
            let img = Arc::new(img);
            index_manifests(&mut inner.manifests, &img);
            if let Some(rec) = inner.images.get_mut(&key) {
                rec.digests = digests_of(&img);
                rec.sbom = crate::attest::document_digest(&img.attached, crate::attest::CYCLONEDX);
                rec.img = img;
            }
        }
        self.persist();
    }

    /// Records that NixImage `object` ("namespace/name") names the image whose
    /// OCI manifest is `image`.
    pub fn claim(&self, image: &Digest, object: &str) {
        {
            let mut inner = self.inner.write().unwrap();
            let Some(key) = inner.by_digest.get(image).cloned() else {
                return;
            };
            match inner.images.get_mut(&key) {
                Some(rec) if !rec.objects.contains(object) => {
                    rec.objects.insert(object.to_string());
                }
                _ => return,
            }
        }
        self.persist();
    }

    /// NixImage `object` is gone: the keys of the images that only it named
    /// (no other object, no ad-hoc request), which nothing needs any more.
    pub fn release(&self, object: &str) -> Vec<String> {
        let mut inner = self.inner.write().unwrap();
        let mut unheld = Vec::new();
        for (key, rec) in inner.images.iter_mut() {
            if rec.objects.remove(object) && rec.objects.is_empty() {
                unheld.push(key.clone());
            }
        }
        // Asked for ad hoc (a request under a repository name): still wanted.
        unheld.retain(|k| {
            !inner
                .requests
                .values()
                .any(|r| &r.image == k && r.repo.is_some())
        });
        drop(inner);
        self.persist();
        unheld
    }

    /// Every NixImage object ("namespace/name") that names a catalogued image.
    pub fn objects(&self) -> BTreeSet<String> {
        let inner = self.inner.read().unwrap();
        inner
            .images
            .values()
            .flat_map(|rec| rec.objects.iter().cloned())
            .collect()
    }

    /// Every image, least recently used first, for the garbage collector.
    pub fn gc_entries(&self) -> Vec<GcEntry> {
        let inner = self.inner.read().unwrap();
        let mut out: Vec<GcEntry> = inner
            .images
            .iter()
            .map(|(k, rec)| GcEntry {
                key: k.clone(),
                image: rec.img.clone(),
                used: rec.used.load(Ordering::Relaxed),
                digests: rec.digests.clone(),
                claimed: !rec.objects.is_empty(),
            })
            .collect();
        out.sort_by(|a, b| a.used.cmp(&b.used).then(a.key.cmp(&b.key)));
        out
    }

    /// Removes an image (and every request resolving to it); the next request
    /// builds it again.
    pub fn evict(&self, image_key: &str) -> Option<Arc<BuiltImage>> {
        let rec = self.inner.write().unwrap().remove_image(image_key);
        if rec.is_some() {
            self.persist();
        }
        rec.map(|r| r.img)
    }

    /// Drops requests whose answer expired (their images stay until evicted).
    pub fn drop_expired(&self) {
        let now = now_secs();
        let mut inner = self.inner.write().unwrap();
        let expired: Vec<String> = inner
            .requests
            .iter()
            .filter(|(_, r)| r.expires.is_some_and(|t| now >= t))
            .map(|(k, _)| k.clone())
            .collect();
        for k in &expired {
            inner.requests.remove(k);
        }
        // Content stays in the repositories it was served under: `repos` is
        // left as it is, and emptied with the image.
    }

    /// Writes last-use times, if any changed since the last write.
    pub fn flush(&self) {
        if self.dirty.swap(false, Ordering::Relaxed) {
            self.persist();
        }
    }

    /// Records that a request (asked under repository `repo`) resolves to an
    /// image, for `ttl` (None: for good).
    pub fn add_request(
        &self,
        key: &str,
        image_key: &str,
        repo: Option<&str>,
        tag: &str,
        ttl: Option<Duration>,
    ) {
        {
            let mut inner = self.inner.write().unwrap();
            inner.add_request(
                key.to_string(),
                RequestEntry {
                    image: image_key.to_string(),
                    repo: repo.map(str::to_string),
                    tag: Some(tag.to_string()),
                    expires: ttl.map(|t| now_secs() + t.as_secs()),
                },
            );
        }
        self.persist();
    }

    /// Counts a manifest GET, which is also a use of its image.
    pub fn record_pull(&self, digest: &Digest) {
        let mut inner = self.inner.write().unwrap();
        let Some(rec) = inner
            .by_digest
            .get(digest)
            .and_then(|k| inner.images.get(k))
        else {
            return;
        };
        rec.touch();
        *inner.pulls.entry(digest.clone()).or_default() += 1;
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Every catalogued image, newest first.
    pub fn list(&self) -> Vec<ImageSummary> {
        let inner = self.inner.read().unwrap();
        // Names by image, in one pass over the requests.
        let mut by_image: HashMap<&str, Vec<String>> = HashMap::new();
        for r in inner.requests.values() {
            if let Some(repo) = &r.repo {
                by_image.entry(&r.image).or_default().push(match &r.tag {
                    Some(t) => format!("{repo}:{t}"),
                    None => repo.clone(),
                });
            }
        }
        let mut out: Vec<ImageSummary> = inner
            .images
            .iter()
            .map(|(key, rec)| {
                let (img, built) = (&rec.img, &rec.built);
                let mut names = by_image.remove(key.as_str()).unwrap_or_default();
                // NixImage objects that named it.
                names.extend(
                    rec.objects
                        .iter()
                        .map(|o| format!("{}/{o}", name::NIXIMAGE_PREFIX)),
                );
                names.sort();
                names.dedup();
                let pulls = |d: &Digest| inner.pulls.get(d).copied().unwrap_or(0);
                ImageSummary {
                    names,
                    digest: img.oci_digest.clone(),
                    layers: img.layers,
                    size: img.size,
                    built: *built,
                    pulls: pulls(&img.oci_digest)
                        + if img.has_docker_manifest() {
                            pulls(&img.docker_digest)
                        } else {
                            0
                        },
                    sbom: rec.sbom.clone(),
                    // (The page adds it: a signature names the host asked.)
                    signature: None,
                }
            })
            .collect();
        out.sort_by(|a, b| b.built.cmp(&a.built).then(a.digest.cmp(&b.digest)));
        out
    }

    /// A manifest of a catalogued image, by digest, with its media type.
    pub fn manifest(&self, digest: &Digest) -> Option<(&'static str, bytes::Bytes)> {
        let inner = self.inner.read().unwrap();
        if let Some(m) = inner.manifests.get(digest) {
            return Some(m.clone());
        }
        let i = inner.indexes.get(digest)?;
        let media_type = match i.media_type.as_str() {
            oci::DOCKER_LIST => oci::DOCKER_LIST,
            _ => oci::OCI_INDEX,
        };
        Some((media_type, bytes::Bytes::from(i.manifest.clone())))
    }

    /// Drops an image and every request that resolved to it (its NixImage was
    /// deleted); the next request builds it again, from the layer cache.
    pub fn forget(&self, img: &BuiltImage) {
        let key = self
            .inner
            .read()
            .unwrap()
            .by_digest
            .get(&img.oci_digest)
            .cloned();
        if let Some(key) = key {
            self.evict(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{put_bytes, LocalStore};

    async fn image(store: &LocalStore, tag: &str) -> BuiltImage {
        let oci = format!(
            "{{\"mediaType\":\"{}\",\"t\":\"{tag}\"}}",
            oci::OCI_MANIFEST
        );
        let docker = format!(
            "{{\"mediaType\":\"{}\",\"t\":\"{tag}\"}}",
            oci::DOCKER_MANIFEST
        );
        BuiltImage {
            oci_digest: put_bytes(store, oci.as_bytes()).await.unwrap(),
            oci_manifest: oci.into(),
            docker_digest: put_bytes(store, docker.as_bytes()).await.unwrap(),
            docker_manifest: docker.into(),
            layers: 3,
            size: 1000,
            roots: vec!["/nix/store/x-hello".into()],
            gcroot_dir: "/state/gcroots/k".into(),
            attached: vec![],
        }
    }

    #[tokio::test]
    async fn a_reopened_catalog_serves_what_was_built() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let a = Arc::new(image(&store, "a").await);
        let b = Arc::new(image(&store, "b").await);
        {
            let c = Catalog::open(dir.path(), &store).await;
            c.add_image("ka", a.clone());
            c.add_request("req-a", "ka", Some("hello"), "latest", None);
            c.add_request(
                "req-a-alias",
                "ka",
                Some("HELLO"),
                "latest",
                Some(Duration::from_secs(3600)),
            );
            c.add_image("kb", b.clone());
            c.add_request(
                "req-b-expired",
                "kb",
                Some("b"),
                "latest",
                Some(Duration::ZERO),
            );
        }
        let c = Catalog::open(dir.path(), &store).await;
        assert_eq!(c.request("req-a").unwrap().oci_digest, a.oci_digest);
        assert_eq!(
            c.request("req-a-alias").unwrap().docker_manifest,
            a.docker_manifest
        );
        assert!(
            c.request("req-b-expired").is_none(),
            "expiry survives a restart"
        );
        assert_eq!(c.image("kb").unwrap().oci_digest, b.oci_digest);
        // Content belongs to the repositories it was asked under, even after
        // the answer expired (the content is still what was served).
        assert!(c.in_repository("hello", &a.oci_digest));
        assert!(c.in_repository("HELLO", &a.docker_digest));
        assert!(!c.in_repository("b", &a.oci_digest));
        assert!(c.in_repository("b", &b.oci_digest));
        let (media, bytes) = c.manifest(&a.docker_digest).unwrap();
        assert_eq!(
            (media, bytes),
            (oci::DOCKER_MANIFEST, a.docker_manifest.clone())
        );

        // Forgetting an image drops its requests, in the file too.
        assert_eq!(c.image_holds(&b.oci_digest, &b.docker_digest), Some(true));
        assert_eq!(c.image_holds(&b.oci_digest, &a.oci_digest), Some(false));
        c.forget(&a);
        assert!(c.request("req-a").is_none() && c.manifest(&a.oci_digest).is_none());
        assert!(!c.in_repository("hello", &a.oci_digest));
        assert_eq!(c.image_holds(&a.oci_digest, &a.oci_digest), None);
        let c = Catalog::open(dir.path(), &store).await;
        assert!(c.request("req-a-alias").is_none());
        assert!(c.image("kb").is_some());
    }

    #[tokio::test]
    async fn a_deleted_object_releases_only_what_nothing_else_wants() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let c = Catalog::open(dir.path(), &store).await;
        let (a, b, d) = (
            Arc::new(image(&store, "a").await),
            Arc::new(image(&store, "b").await),
            Arc::new(image(&store, "d").await),
        );
        // a: only object x names it. b: x and y. d: x, and asked for ad hoc.
        for (k, img) in [("ka", &a), ("kb", &b), ("kd", &d)] {
            c.add_image(k, img.clone());
            c.add_request(&format!("r{k}"), k, None, "v1", None);
            c.claim(&img.oci_digest, "ns/x");
        }
        c.claim(&b.oci_digest, "ns/y");
        c.add_request("adhoc-d", "kd", Some("d"), "latest", None);
        // Claims survive a restart, and name the image on the page.
        let c = Catalog::open(dir.path(), &store).await;
        let listed = c.list();
        let b_names = &listed
            .iter()
            .find(|i| i.digest == b.oci_digest)
            .unwrap()
            .names;
        assert_eq!(
            b_names,
            &vec!["niximage/ns/x".to_string(), "niximage/ns/y".to_string()]
        );
        assert_eq!(c.release("ns/x"), vec!["ka".to_string()]);
        assert_eq!(c.release("ns/x"), Vec::<String>::new());
        assert_eq!(c.release("ns/y"), vec!["kb".to_string()]);
        // Released is not evicted: the collector decides.
        assert!(c.image("ka").is_some());
        assert_eq!(c.evict("ka").unwrap().oci_digest, a.oci_digest);
        assert!(c.image("ka").is_none() && c.request("rka").is_none());
        assert!(c.manifest(&a.docker_digest).is_none());
    }

    #[tokio::test]
    async fn images_whose_manifests_are_gone_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let a = Arc::new(image(&store, "a").await);
        Catalog::open(dir.path(), &store)
            .await
            .add_image("ka", a.clone());
        std::fs::remove_file(store.blob_path(&a.oci_digest)).unwrap();
        let c = Catalog::open(dir.path(), &store).await;
        assert!(c.image("ka").is_none());
        // A corrupt file is set aside, not fatal.
        std::fs::write(dir.path().join("catalog.json"), b"{not json").unwrap();
        assert!(Catalog::open(dir.path(), &store)
            .await
            .image("ka")
            .is_none());
        assert!(dir.path().join("catalog.json.unreadable").exists());
    }
}
