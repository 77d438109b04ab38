//! Prometheus metrics: what an operator graphs (builds, failures, durations,
//! cache behaviour, bytes served, reconciles), served as text on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The kind of request (`manifest`, `blob`, `tags`, ...), never its path.
    pub route: &'static str,
    /// GET, HEAD, ... (`other` for anything unusual).
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeptLabel {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub builds: Counter,
    pub build_failures: Counter,
    pub unknown_packages: Counter,
    pub unknown_cached: Counter,
    pub build_duration: Histogram,
    pub builds_running: Gauge,
    pub builds_queued: Gauge,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub build_waits: Counter,
    pub shared_hits: Counter,
    pub lease_waits: Counter,
    pub builds_refused: Counter,
    pub blobs_corrupt: Counter,
    pub builds_abandoned: Counter,
    pub builders_killed: Counter,
    pub layers_packed: Counter,
    pub layers_reused: Counter,
    pub bytes_served: Counter,
    pub requests: Family<StatusLabel, Counter>,
    pub connections_refused: Counter,
    pub reconciles: Counter,
    pub reconcile_errors: Counter,
    pub reconcile_duration: Histogram,
    pub objects_by_phase: Family<PhaseLabel, Gauge>,
    pub stored_bytes: Gauge,
    pub storage_limit: Gauge,
    pub evictions: Counter,
    pub pinned_images: Gauge,
    pub storage_kept_bytes: Family<KeptLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nixery");
        let m = Metrics {
            builds: Counter::default(),
            build_failures: Counter::default(),
            unknown_packages: Counter::default(),
            unknown_cached: Counter::default(),
            build_duration: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            builds_running: Gauge::default(),
            builds_queued: Gauge::default(),
            cache_hits: Counter::default(),
            shared_hits: Counter::default(),
            lease_waits: Counter::default(),
            cache_misses: Counter::default(),
            build_waits: Counter::default(),
            builds_refused: Counter::default(),
            blobs_corrupt: Counter::default(),
            builds_abandoned: Counter::default(),
            builders_killed: Counter::default(),
            layers_packed: Counter::default(),
            layers_reused: Counter::default(),
            bytes_served: Counter::default(),
            requests: Family::default(),
            connections_refused: Counter::default(),
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            objects_by_phase: Family::default(),
            stored_bytes: Gauge::default(),
            storage_limit: Gauge::default(),
            evictions: Counter::default(),
            pinned_images: Gauge::default(),
            storage_kept_bytes: Family::default(),
            registry: Registry::default(),
        };
        registry.register("builds", "Image builds started", m.builds.clone());
        registry.register(
            "build_failures",
            "Image builds that failed (unknown packages are counted apart)",
            m.build_failures.clone(),
        );
        registry.register(
            "unknown_packages",
            "Image requests that named packages the package source lacks (user errors, not build failures)",
            m.unknown_packages.clone(),
        );
        registry.register(
            "unknown_cached",
            "Unknown-package answers given from the name cache, without evaluating",
            m.unknown_cached.clone(),
        );
        registry.register(
            "build_duration_seconds",
            "Duration of image builds",
            m.build_duration.clone(),
        );
        registry.register(
            "builds_running",
            "Image builds running now",
            m.builds_running.clone(),
        );
        registry.register(
            "builds_queued",
            "Image builds waiting for a build slot",
            m.builds_queued.clone(),
        );
        registry.register(
            "cache_hits",
            "Manifest requests answered from the image cache",
            m.cache_hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Manifest requests that started a build",
            m.cache_misses.clone(),
        );
        registry.register(
            "object_store_errors",
            "Requests to the S3 bucket that failed or went unanswered (after retries)",
            crate::store::REMOTE_ERRORS.clone(),
        );
        registry.register(
            "shared_index_hits",
            "Images found in the shared bucket's index, built by another instance",
            m.shared_hits.clone(),
        );
        registry.register(
            "build_lease_waits",
            "Times a build waited for another instance holding its build lease",
            m.lease_waits.clone(),
        );
        registry.register(
            "build_waits",
            "Manifest requests that joined a build already running",
            m.build_waits.clone(),
        );
        registry.register(
            "builds_refused",
            "Image requests refused because the build queue was full",
            m.builds_refused.clone(),
        );
        registry.register(
            "blobs_corrupt",
            "Stored blobs found not to match their digest (removed, to be made again)",
            m.blobs_corrupt.clone(),
        );
        registry.register(
            "builds_abandoned",
            "Queued builds dropped because everyone who asked went away",
            m.builds_abandoned.clone(),
        );
        registry.register(
            "builders_killed",
            "Builds whose Nix builder was killed (signal 9) from outside nixery, built once more",
            m.builders_killed.clone(),
        );
        registry.register(
            "layers_packed",
            "Layers packed into tarballs",
            m.layers_packed.clone(),
        );
        registry.register(
            "layers_reused",
            "Layers found in the layer cache",
            m.layers_reused.clone(),
        );
        registry.register(
            "bytes_served",
            "Blob and manifest bytes sent to clients",
            m.bytes_served.clone(),
        );
        registry.register(
            "http_requests",
            "Registry requests by route class, method and status",
            m.requests.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused past the connection cap",
            m.connections_refused.clone(),
        );
        registry.register("reconciles", "NixImage reconciles", m.reconciles.clone());
        registry.register(
            "reconcile_errors",
            "NixImage reconciles that failed",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of NixImage reconciles",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "niximages",
            "NixImage objects by phase, as seen by this agent",
            m.objects_by_phase.clone(),
        );
        registry.register(
            "stored_bytes",
            "Bytes of blobs in the blob store, as of the last collection",
            m.stored_bytes.clone(),
        );
        registry.register(
            "storage_limit_bytes",
            "The blob store's size limit (--storage-limit)",
            m.storage_limit.clone(),
        );
        registry.register(
            "evictions",
            "Images evicted (least recently used first) to stay within the storage limit, or dropped with their NixImage",
            m.evictions.clone(),
        );
        registry.register(
            "pinned_images",
            "Images pinned by NixImage objects (never evicted)",
            m.pinned_images.clone(),
        );
        registry.register(
            "storage_kept_bytes",
            "Bytes of the images (and unreferenced blobs) the last collection kept while over the storage limit, by why: sending (a blob of it was being sent), recent (asked for within --eviction-grace; at most a quarter of the limit, or the one most recent image), newest, built (the image just built), pinned (a NixImage names it), unreferenced (blobs no image references yet, within their grace); all 0 when the store was within the limit",
            m.storage_kept_bytes.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::default();
        m.builds.inc();
        m.requests
            .get_or_create(&StatusLabel {
                route: "manifest",
                method: "HEAD",
                status: 404,
            })
            .inc();
        let text = m.render();
        assert!(text.contains("nixery_builds_total 1"), "{text}");
        assert!(
            text.contains(
                "nixery_http_requests_total{route=\"manifest\",method=\"HEAD\",status=\"404\"} 1"
            ),
            "{text}"
        );
    }
}
