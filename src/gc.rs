//! Garbage collection: keeps the blob store under `--storage-limit` by
//! evicting the least recently used images that nothing pins, with their
//! blobs (unless a kept image shares them), their layer-cache records and
//! their Nix GC roots, so that the host's `nix-collect-garbage` can reclaim
//! their store paths. Images of NixImage objects are pinned while the object
//! names them; deleting an object drops the images only it held.
//!
//! Safety with builds: a build holds a [`BuildGuard`] from the moment it
//! looks for cached layers until its image is in the catalog, and a
//! collection runs only while no build holds one, so a collection never
//! removes a blob that a build is about to reference. A blob being
//! downloaded is never cut off: a local blob is removed by unlinking it, and
//! a reader keeps its open file to the end.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::catalog::{Catalog, GcEntry};
use crate::metrics::Metrics;
use crate::name::Digest;
use crate::store::{BlobStore, StoreError};

/// Held by a build while it relies on stored blobs it has not catalogued yet.
pub type BuildGuard = tokio::sync::OwnedRwLockReadGuard<()>;

/// The default storage limit: a quarter of the state directory's disk.
pub fn default_limit(state_dir: &std::path::Path) -> u64 {
    crate::store::total_bytes(state_dir).map_or(u64::MAX, |t| t / 4)
}

pub struct Collector {
    store: Arc<dyn BlobStore>,
    catalog: Arc<Catalog>,
    metrics: Arc<Metrics>,
    limit: u64,
    layers_dir: PathBuf,
    /// A blob no image references is removed only once it has been seen so
    /// for this long (it may be another process's build in progress, such
    /// as a `nixery build` beside the server).
    orphan_grace: Duration,
    /// Images pulled more recently than this are not evicted (within a
    /// quarter of the limit, the most recent first): a client between a
    /// manifest and its blobs would find them gone.
    eviction_grace: Duration,
    lock: Arc<tokio::sync::RwLock<()>>,
    /// Unreferenced blobs, and when each was first seen so.
    orphans: Mutex<HashMap<Digest, Instant>>,
}

/// What one collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    /// OCI manifest digests of the images evicted.
    pub evicted: Vec<Digest>,
    pub blobs_removed: usize,
    pub bytes_freed: u64,
    /// Blob bytes stored afterwards.
    pub stored: u64,
}

impl Collector {
    pub fn new(
        store: Arc<dyn BlobStore>,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        state_dir: &std::path::Path,
        limit: u64,
        orphan_grace: Duration,
        eviction_grace: Duration,
    ) -> Arc<Self> {
        metrics
            .storage_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
        Arc::new(Collector {
            store,
            catalog,
            metrics,
            limit,
            layers_dir: state_dir.join("layers"),
            orphan_grace,
            eviction_grace,
            lock: Default::default(),
            orphans: Default::default(),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Taken by a build before it looks for cached layers; dropped once its
    /// image is catalogued.
    pub async fn guard(&self) -> BuildGuard {
        self.lock.clone().read_owned().await
    }

    /// OCI digests of the images NixImage objects name now.
    fn pinned(&self) -> HashSet<Digest> {
        let pinned: HashSet<Digest> = self
            .catalog
            .named
            .entries()
            .into_iter()
            .flat_map(|(_, _, e)| e.images())
            .map(|(_, image)| image.oci_digest.clone())
            .collect();
        self.metrics.pinned_images.set(pinned.len() as i64);
        pinned
    }

    /// Brings the store under the limit: first blobs that no image references
    /// (past their grace), then least recently used images that are neither
    /// pinned, nor `keep` (the image just built), nor the most recently used
    /// one: those stay even if they alone are over the limit.
    pub async fn collect(&self, keep: Option<&str>) -> Result<Collected, StoreError> {
        let _exclusive = self.lock.write().await;
        self.collect_locked(keep).await
    }

    /// After a build: collects now if no other build is between packing and
    /// cataloguing, else in the background once they are, so the build's
    /// answer never waits for another build.
    pub async fn collect_after_build(self: &Arc<Self>, keep: &str) {
        match self.lock.clone().try_write_owned() {
            Ok(_exclusive) => {
                if let Err(e) = self.collect_locked(Some(keep)).await {
                    warn!(error = %e, "collecting garbage");
                }
            }
            Err(_) => {
                let (this, keep) = (self.clone(), keep.to_string());
                tokio::spawn(async move {
                    if let Err(e) = this.collect(Some(&keep)).await {
                        warn!(error = %e, "collecting garbage");
                    }
                });
            }
        }
    }

    async fn collect_locked(&self, keep: Option<&str>) -> Result<Collected, StoreError> {
        self.catalog.drop_expired();
        let mut run = Run::start(self).await?;
        if run.total > self.limit {
            let referenced: HashSet<Digest> = run.refs.keys().cloned().collect();
            let unreferenced: Vec<Digest> = run
                .sizes
                .keys()
                .filter(|d| !referenced.contains(*d))
                .cloned()
                .collect();
            let due: Vec<Digest> = {
                let now = Instant::now();
                let mut orphans = self.orphans.lock().unwrap();
                orphans.retain(|d, _| unreferenced.contains(d));
                unreferenced
                    .into_iter()
                    .filter(|d| {
                        now.duration_since(*orphans.entry(d.clone()).or_insert(now))
                            >= self.orphan_grace
                    })
                    .collect()
            };
            for d in due {
                run.remove_blob(self, &d).await;
            }
            let pinned = self.pinned();
            // The most recently used image stays too (at start, the one that
            // was kept as the newest before).
            let newest = run.entries.last().map(|e| e.key.clone());
            // Images a NixImage object named go last (least recently used
            // first among them): before the controller has synced after a
            // start, the current ones are not pinned yet.
            let mut order = run.entries.clone();
            order.sort_by_key(|e| e.claimed);
            let recent = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .saturating_sub(self.eviction_grace)
                .as_millis() as u64;
            // Why an image stays, if it must.
            let sending = |e: &GcEntry| {
                !self.eviction_grace.is_zero() && self.catalog.any_streaming(&e.digests)
            };
            // Pulls in flight between their requests (a part asked for within
            // the grace): the most recent first, within a budget, so that a
            // flood of new images cannot keep the store over its limit.
            let graced = if self.eviction_grace.is_zero() {
                HashSet::new()
            } else {
                graced(
                    run.entries
                        .iter()
                        .filter(|e| {
                            e.used > recent
                                && !sending(e)
                                && !pinned.contains(&e.image.oci_digest)
                                && keep != Some(e.key.as_str())
                                && newest.as_ref() != Some(&e.key)
                        })
                        .map(|e| (e.key.as_str(), e.used, e.image.size)),
                    self.limit / 4,
                )
            };
            let reason = |e: &GcEntry| -> Option<&'static str> {
                if pinned.contains(&e.image.oci_digest) {
                    Some("pinned")
                } else if keep == Some(e.key.as_str()) {
                    Some("built")
                } else if newest.as_ref() == Some(&e.key) {
                    Some("newest")
                } else if sending(e) {
                    Some("sending")
                } else if graced.contains(&e.key) {
                    Some("recent")
                } else {
                    None
                }
            };
            let mut kept: HashMap<&'static str, u64> = HashMap::new();
            for e in order {
                if run.total <= self.limit {
                    break;
                }
                match reason(&e) {
                    Some(why) => *kept.entry(why).or_default() += e.image.size,
                    None => run.evict(self, &e).await,
                }
            }
            if run.total > self.limit {
                let referenced: HashSet<&Digest> = run.refs.keys().collect();
                let unreferenced: u64 = run
                    .sizes
                    .iter()
                    .filter(|(d, _)| !referenced.contains(d))
                    .map(|(_, s)| s)
                    .sum();
                kept.insert("unreferenced", unreferenced);
                warn!(
                    stored = run.total,
                    limit = self.limit,
                    kept = ?kept,
                    "over the storage limit with nothing left to evict (pinned images, the image just built, the newest one, those being sent and, within a quarter of the limit, those asked for within --eviction-grace stay)"
                );
            } else {
                kept.clear();
            }
            self.set_kept(&kept);
        } else {
            self.pinned();
            self.set_kept(&HashMap::new());
        }
        Ok(run.finish(self))
    }

    fn set_kept(&self, kept: &HashMap<&'static str, u64>) {
        for reason in KEPT_REASONS {
            self.metrics
                .storage_kept_bytes
                .get_or_create(&crate::metrics::KeptLabel {
                    reason: reason.to_string(),
                })
                .set(i64::try_from(kept.get(reason).copied().unwrap_or(0)).unwrap_or(i64::MAX));
        }
    }

    /// NixImage `namespace/name` is gone (its named entry already removed):
    /// drops the images that only it named, whatever the limit.
    pub async fn drop_object(&self, namespace: &str, name: &str) -> Result<Collected, StoreError> {
        let _exclusive = self.lock.write().await;
        let unheld = self.catalog.release(&format!("{namespace}/{name}"));
        let mut run = Run::start(self).await?;
        let pinned = self.pinned();
        for e in run.entries.clone() {
            if unheld.contains(&e.key) && !pinned.contains(&e.image.oci_digest) {
                run.evict(self, &e).await;
            }
        }
        Ok(run.finish(self))
    }

    /// Removes the layer-cache records of removed blobs.
    fn drop_layer_records(&self, removed: &HashSet<Digest>) {
        let Ok(dir) = std::fs::read_dir(&self.layers_dir) else {
            return;
        };
        for e in dir.flatten() {
            let Ok(bytes) = std::fs::read(e.path()) else {
                continue;
            };
            let digest = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["digest"].as_str().and_then(|d| d.parse::<Digest>().ok()));
            if digest.is_some_and(|d| removed.contains(&d)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Why a collection over the limit kept bytes (`nixery_storage_kept_bytes`).
const KEPT_REASONS: [&str; 6] = [
    "sending",
    "recent",
    "newest",
    "built",
    "pinned",
    "unreferenced",
];

/// Which images asked for within the eviction grace are spared (`key`,
/// last use, size): the most recently used first while their sizes sum to
/// at most `budget`, and the most recent one whatever its size (a pull of
/// one image larger than the budget still gets all its blobs).
fn graced<'a>(
    candidates: impl Iterator<Item = (&'a str, u64, u64)>,
    budget: u64,
) -> HashSet<String> {
    let mut by_recency: Vec<(&str, u64, u64)> = candidates.collect();
    by_recency.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut spared = HashSet::new();
    let mut bytes = 0u64;
    for (key, _, size) in by_recency {
        if !spared.is_empty() && bytes + size > budget {
            continue;
        }
        bytes += size;
        spared.insert(key.to_string());
    }
    spared
}

/// One collection's view: stored blobs, references, what was removed.
struct Run {
    sizes: HashMap<Digest, u64>,
    total: u64,
    entries: Vec<GcEntry>,
    /// How many catalogued images reference each digest.
    refs: HashMap<Digest, usize>,
    removed: HashSet<Digest>,
    out: Collected,
}

impl Run {
    async fn start(c: &Collector) -> Result<Run, StoreError> {
        let sizes: HashMap<Digest, u64> = c.store.list().await?.into_iter().collect();
        let total = sizes.values().sum();
        let entries = c.catalog.gc_entries();
        let mut refs: HashMap<Digest, usize> = HashMap::new();
        for e in &entries {
            for d in &e.digests {
                *refs.entry(d.clone()).or_default() += 1;
            }
        }
        Ok(Run {
            sizes,
            total,
            entries,
            refs,
            removed: HashSet::new(),
            out: Collected::default(),
        })
    }

    async fn remove_blob(&mut self, c: &Collector, d: &Digest) {
        let Some(size) = self.sizes.remove(d) else {
            return;
        };
        match c.store.delete(d).await {
            Ok(_) => {
                self.total -= size;
                self.out.blobs_removed += 1;
                self.out.bytes_freed += size;
                self.removed.insert(d.clone());
            }
            Err(e) => warn!(error = %e, blob = %d, "removing a blob"),
        }
    }

    /// Evicts an image: from the catalog, its blobs that no other image
    /// references, its GC roots.
    async fn evict(&mut self, c: &Collector, e: &GcEntry) {
        if c.catalog.evict(&e.key).is_none() {
            return;
        }
        for d in &e.digests {
            let n = self.refs.entry(d.clone()).or_default();
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.refs.remove(d);
                self.remove_blob(c, d).await;
            }
        }
        if let Err(err) = std::fs::remove_dir_all(&e.image.gcroot_dir) {
            if err.kind() != std::io::ErrorKind::NotFound {
                warn!(error = %err, dir = %e.image.gcroot_dir.display(), "removing GC roots");
            }
        }
        c.metrics.evictions.inc();
        info!(image = %e.image.oci_digest, size = e.image.size, "image evicted");
        self.out.evicted.push(e.image.oci_digest.clone());
    }

    fn finish(self, c: &Collector) -> Collected {
        if !self.removed.is_empty() {
            c.drop_layer_records(&self.removed);
        }
        c.metrics
            .stored_bytes
            .set(i64::try_from(self.total).unwrap_or(i64::MAX));
        c.catalog.flush();
        Collected {
            stored: self.total,
            ..self.out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grace_spares_the_most_recent_pulls_within_its_budget() {
        let c = [("a", 1, 40), ("b", 2, 30), ("c", 3, 50), ("d", 4, 20)];
        let spared = |budget| {
            let mut v: Vec<String> = graced(c.iter().copied(), budget).into_iter().collect();
            v.sort();
            v
        };
        // Newest first: d (20) and c (50) fit in 80, b (30) would not, nor a.
        assert_eq!(spared(80), ["c", "d"]);
        assert_eq!(spared(100), ["b", "c", "d"]);
        // One that does not fit does not stop an older, smaller one.
        assert_eq!(spared(75), ["c", "d"]);
        let c2 = [("a", 1, 5), ("b", 2, 60), ("d", 4, 20)];
        let mut v: Vec<String> = graced(c2.iter().copied(), 30).into_iter().collect();
        v.sort();
        assert_eq!(v, ["a", "d"]);
        // The most recent always, even past the budget.
        assert_eq!(spared(0), ["d"]);
        assert_eq!(spared(u64::MAX), ["a", "b", "c", "d"]);
        assert!(graced(std::iter::empty(), 100).is_empty());
    }
}
