//! The build service: answers "give me this image" once per image. It
//! starts a build or joins the running one (`flight`), admits it to the
//! queue (`queue`), builds within the timeout, and keeps the built images
//! and the index of several architectures; its keys are in `keys`, what
//! names mean in `names`, one build among instances in `instances`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, WeakShared};
use tracing::{info, info_span, warn, Instrument};

use super::flight::{Build, BuildResult, Failure, Failures, Inflight, Waiters};
use super::instances::Turn;
use super::keys;
use super::names::NameCache;
use super::pipeline::{Pipeline, PipelineConfig};
use super::queue::Queue;
use super::{BuildError, BuildState, BuiltImage, ImageSpec, Progress, ProgressFn};
use crate::catalog::Catalog;
use crate::layers::Popularity;
use crate::metrics::Metrics;
use crate::name::Arch;
use crate::nix::{Nix, Source};
use crate::oci;
use crate::store::BlobStore;
use tokio::sync::watch;

pub struct BuilderConfig {
    pub state_dir: PathBuf,
    pub source: Source,
    pub max_layers: usize,
    pub timeout: Duration,
    pub max_builds: usize,
    /// How long an image built from a reference that can move (a git branch or
    /// tag, a channel, a local path) is served before it is built again; an
    /// image from a git commit is kept for good.
    pub mutable_ttl: Duration,
    /// Builds that may wait for a slot; past it, requests are refused (429).
    pub max_queue: usize,
    pub compression: oci::Compression,
    pub popularity: Option<Popularity>,
    /// Signs each image and its attestations (`--signing-key`).
    pub signer: Option<Arc<crate::attest::Signer>>,
    /// The systems images are built for, the host's first when it is among
    /// them: with more than one, names have an image index.
    pub systems: Vec<Arch>,
    /// Blob bytes kept before least recently used images are evicted.
    pub storage_limit: u64,
    /// How long after its last pull an image is not evicted.
    pub eviction_grace: Duration,
    /// The index and build leases of a bucket shared with other instances.
    pub shared: Option<Arc<crate::shared::Shared>>,
    /// That bucket's blobs (behind the local cache of `store`).
    pub bucket: Option<Arc<crate::store::ObjectBlobStore>>,
    /// What garbage collection trims to `storage_limit` [default: the blob
    /// store]: with a shared bucket, the local cache in front of it, since
    /// other instances serve from the bucket.
    pub gc_store: Option<Arc<dyn BlobStore>>,
}

type ImageResult = Result<Arc<BuiltImage>, BuildError>;

pub struct Builder {
    pub(super) cfg: BuilderConfig,
    pub(super) nix: Arc<dyn Nix>,
    pub(super) store: Arc<dyn BlobStore>,
    pub(super) metrics: Arc<Metrics>,
    gc: Arc<crate::gc::Collector>,
    pipeline: Pipeline,
    /// The settings that shape every image (compression, layer budget,
    /// popularity table), as part of every key.
    shape: String,
    /// What exists: requests -> images (by image key, what the names
    /// resolved to, so spellings of one package set share one image, one
    /// build and one set of GC roots) -> manifests.
    pub(super) catalog: Arc<Catalog>,
    /// Running image builds by image key. Weak, so a build that every waiter
    /// gave up on (timeout) is dropped, which stops its Nix processes.
    image_builds: Mutex<HashMap<String, WeakShared<BoxFuture<'static, ImageResult>>>>,
    /// Whether names exist, per package source revision, so a repeated
    /// unknown name costs no evaluation.
    pub(super) names: NameCache,
    /// Running builds by request key: their result, state stream and waiters.
    inflight: Mutex<HashMap<String, Inflight>>,
    /// When each image's blobs were last found all present.
    verified: Mutex<HashMap<crate::name::Digest, Instant>>,
    /// The last builds that failed, newest last.
    failures: Failures,
    /// Builds waiting for a slot, and the slots.
    queue: Queue,
}

impl Builder {
    pub fn new(
        cfg: BuilderConfig,
        nix: Arc<dyn Nix>,
        store: Arc<dyn BlobStore>,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let queue = Queue::new(cfg.max_builds, cfg.max_queue);
        let shape = keys::shape(cfg.compression, cfg.max_layers, cfg.popularity.as_ref());
        // A blob no image references may be another process's build in
        // progress until a build's timeout has passed.
        let gc = crate::gc::Collector::new(
            cfg.gc_store.clone().unwrap_or_else(|| store.clone()),
            catalog.clone(),
            metrics.clone(),
            &cfg.state_dir,
            cfg.storage_limit,
            cfg.timeout,
            cfg.eviction_grace,
        );
        let pipeline = Pipeline {
            gc: gc.clone(),
            cfg: PipelineConfig {
                state_dir: cfg.state_dir.clone(),
                max_layers: cfg.max_layers,
                compression: cfg.compression,
                popularity: cfg.popularity.clone(),
                signer: cfg.signer.clone(),
            },
            nix: nix.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
        };
        Arc::new(Builder {
            cfg,
            gc,
            pipeline,
            shape,
            nix,
            store,
            metrics,
            catalog,
            image_builds: Default::default(),
            names: Default::default(),
            inflight: Default::default(),
            queue,
            failures: Default::default(),
            verified: Default::default(),
        })
    }

    /// The key images are signed with, if any.
    pub fn signer(&self) -> Option<&Arc<crate::attest::Signer>> {
        self.pipeline.cfg.signer.as_ref()
    }

    pub fn source(&self) -> &Source {
        &self.cfg.source
    }

    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }

    /// The systems images are built for, the host's first when it is among
    /// them.
    pub fn systems(&self) -> &[Arch] {
        &self.cfg.systems
    }

    /// The image for every system (`spec.arch` is ignored), built at once
    /// where not cached; the first failure is the answer.
    pub async fn get_or_build_all(
        self: &Arc<Self>,
        spec: &ImageSpec,
    ) -> Result<Vec<(Arch, Arc<BuiltImage>)>, Arc<BuildError>> {
        let builds = self.cfg.systems.iter().map(|&arch| {
            let spec = ImageSpec {
                arch,
                ..spec.clone()
            };
            async move { self.get_or_build(spec, None).await.map(|i| (arch, i)) }
        });
        futures::future::try_join_all(builds).await
    }

    /// The image index of one image per system (for `docker`, a Docker
    /// manifest list, where every image has a schema2 manifest), recorded
    /// in the catalog so it is served by digest too.
    pub fn index(
        &self,
        docker: bool,
        images: &[(Arch, Arc<BuiltImage>)],
    ) -> (&'static str, crate::name::Digest, bytes::Bytes) {
        let docker = docker && images.iter().all(|(_, i)| i.has_docker_manifest());
        // By architecture, as the NixImage status assembles it
        // (`k8s::status::platform_index`): one index on every node.
        let mut images = images.to_vec();
        images.sort_by_key(|(a, _)| *a);
        let manifests: Vec<(Arch, &[u8])> = images
            .iter()
            .map(|(a, i)| {
                let m = if docker {
                    &i.docker_manifest
                } else {
                    &i.oci_manifest
                };
                (*a, m.as_ref())
            })
            .collect();
        let bytes = oci::image_index(docker, &manifests);
        let media_type = if docker {
            oci::DOCKER_LIST
        } else {
            oci::OCI_INDEX
        };
        let members = images
            .iter()
            .map(|(_, i)| {
                if docker {
                    i.docker_digest.clone()
                } else {
                    i.oci_digest.clone()
                }
            })
            .collect();
        let digest = self.catalog.add_index(media_type, &bytes, members);
        (media_type, digest, bytes.into())
    }

    /// Returns the image, building it unless cached; concurrent callers for
    /// one image share one build. `progress` gets the events of that build's
    /// state stream, whether this call started the build or joined it.
    pub async fn get_or_build(
        self: &Arc<Self>,
        spec: ImageSpec,
        progress: Option<ProgressFn>,
    ) -> BuildResult {
        // A catalogued image whose blobs are not all stored any more (removed
        // by hand, or as corrupt) is built again: its missing layers are
        // packed anew from the store paths, to the same digests.
        let source = spec
            .source
            .clone()
            .unwrap_or_else(|| self.cfg.source.clone());
        if let Some(img) = self
            .catalog
            .request(&keys::request_key(&spec, &source, &self.shape))
        {
            if !self.blobs_present(&img).await {
                warn!(image = %img.oci_digest, "a stored image lost blobs; building it again");
                self.catalog.forget(&img);
            }
        }
        let build = match self.start(spec) {
            Ok(b) => b,
            Err(done) => return done,
        };
        let Build {
            state,
            result,
            _waiter,
        } = build;
        let Some(progress) = progress else {
            return result.await;
        };
        let mut state = state;
        let mut seen = BuildState {
            stage: String::new(),
            ..state.borrow().clone()
        };
        seen.log_lines = 0;
        tokio::pin!(result);
        loop {
            let now = state.borrow_and_update().clone();
            for p in now.events_since(&seen) {
                progress(p);
            }
            seen = now;
            tokio::select! {
                r = &mut result => {
                    let last = state.borrow().clone();
                    for p in last.events_since(&seen) {
                        progress(p);
                    }
                    return r;
                }
                changed = state.changed() => if changed.is_err() {
                    return result.await;
                }
            }
        }
    }

    /// Whether every blob of an image is in the store. A positive answer
    /// holds for a few seconds, so a pull storm by tag costs one check per
    /// image, not one per blob per request.
    async fn blobs_present(&self, img: &BuiltImage) -> bool {
        const FRESH: Duration = Duration::from_secs(5);
        if let Some(t) = self.verified.lock().unwrap().get(&img.oci_digest) {
            if t.elapsed() < FRESH {
                return true;
            }
        }
        for d in crate::image::digests_of(img) {
            if !matches!(self.store.stat(&d).await, Ok(Some(_))) {
                self.verified.lock().unwrap().remove(&img.oci_digest);
                return false;
            }
        }
        let mut verified = self.verified.lock().unwrap();
        // Bounded: forget answers that are no longer fresh.
        if verified.len() > 4096 {
            verified.retain(|_, t| t.elapsed() < FRESH);
        }
        verified.insert(img.oci_digest.clone(), Instant::now());
        true
    }

    /// The last builds that failed (at most 20), newest last.
    pub fn recent_failures(&self) -> Vec<Failure> {
        self.failures.recent()
    }

    /// The builds running now, with their state streams.
    pub fn running(&self) -> Vec<watch::Receiver<BuildState>> {
        self.inflight
            .lock()
            .unwrap()
            .values()
            .map(|(_, s, _)| s.clone())
            .collect()
    }

    /// Starts (or joins) the build of an image: its state stream and its
    /// result. `Err` holds the answer when there is nothing to build (the
    /// catalog has it, or the request is refused).
    pub fn start(self: &Arc<Self>, spec: ImageSpec) -> Result<Build, BuildResult> {
        let source = spec
            .source
            .clone()
            .unwrap_or_else(|| self.cfg.source.clone());
        if !source.tags_are_revisions() && spec.tag != "latest" {
            let source_kind = match source {
                Source::Path(_) => "local path",
                Source::Flake { .. } | Source::PinnedFlake { .. } => "flake",
                _ => "channel",
            };
            return Err(Err(Arc::new(BuildError::UnknownTag {
                tag: spec.tag.clone(),
                source_kind,
            })));
        }
        let key = keys::request_key(&spec, &source, &self.shape);
        if let Some(img) = self.catalog.request(&key) {
            self.metrics.cache_hits.inc();
            return Err(Ok(img));
        }
        let mut inflight = self.inflight.lock().unwrap();
        if let Some((result, state, waiters)) = inflight.get(&key) {
            self.metrics.build_waits.inc();
            return Ok(Build {
                state: state.clone(),
                result: result.clone(),
                _waiter: waiters.wait(),
            });
        }
        // A bounded queue: past it, the client is told to come back.
        if let Err(e) = self.queue.admit() {
            self.metrics.builds_refused.inc();
            return Err(Err(Arc::new(e)));
        }
        self.metrics.cache_misses.inc();
        // The first waiter exists before the task can look for one.
        let waiters = Arc::new(Waiters::default());
        let waiter = waiters.wait();
        let (tx, rx) = watch::channel(BuildState::new(&spec));
        let tx = Arc::new(tx);
        let report: ProgressFn = {
            let tx = tx.clone();
            Arc::new(move |p: Progress| tx.send_modify(|s| s.apply(&p)))
        };
        let this = self.clone();
        let k = key.clone();
        let w = waiters.clone();
        let handle = tokio::spawn(async move {
            let result = this
                .build_once(&k, &spec, &source, report, &w)
                .await
                .map_err(Arc::new);
            if let Err(e) = &result {
                tx.send_modify(|s| {
                    s.stage = "failed".into();
                    s.error = Some(e.to_string());
                });
                if !matches!(e.as_ref(), BuildError::Abandoned) {
                    this.failures.record(&tx.borrow(), e);
                }
            }
            this.inflight.lock().unwrap().remove(&k);
            result
        });
        let f = async move {
            handle
                .await
                .unwrap_or_else(|e| Err(Arc::new(BuildError::Internal(e.to_string()))))
        }
        .boxed()
        .shared();
        inflight.insert(key, (f.clone(), rx.clone(), waiters));
        Ok(Build {
            state: rx,
            result: f,
            _waiter: waiter,
        })
    }

    /// Builds, or with a shared bucket takes the image another instance built
    /// (or is building: it waits for that build's lease to end), so that an
    /// image is built once among all instances.
    async fn build_once(
        self: &Arc<Self>,
        key: &str,
        spec: &ImageSpec,
        source: &Source,
        report: ProgressFn,
        waiters: &Waiters,
    ) -> ImageResult {
        let Some(shared) = self.cfg.shared.clone() else {
            return self.build_limited(key, spec, source, report, waiters).await;
        };
        // Until it builds (and takes a slot), the request counts as queued.
        let turn = self
            .lease_or_adopt(&shared, key, spec, &report, waiters)
            .await;
        if !matches!(turn, Ok(Turn::Build(_))) {
            self.queue.leave();
        }
        let lease = match turn? {
            Turn::Build(lease) => lease,
            Turn::Adopted(img) => return Ok(img),
        };
        let img = self
            .build_limited(key, spec, source, report, waiters)
            .await?;
        self.publish(&shared, key, spec, source, &img).await;
        drop(lease);
        Ok(img)
    }

    /// Waits for a build slot, then builds within the timeout.
    async fn build_limited(
        self: &Arc<Self>,
        key: &str,
        spec: &ImageSpec,
        source: &Source,
        report: ProgressFn,
        waiters: &Waiters,
    ) -> ImageResult {
        report(Progress::Queued);
        self.metrics.builds_queued.inc();
        let permit = self.queue.slot(waiters).await;
        self.metrics.builds_queued.dec();
        let Some(_permit) = permit else {
            self.metrics.builds_abandoned.inc();
            return Err(BuildError::Abandoned);
        };
        self.metrics.builds.inc();
        self.metrics.builds_running.inc();
        let started = Instant::now();
        let span = info_span!("build", image = %spec.packages.join("/"), tag = %spec.tag, arch = spec.arch.oci(), key = &key[..12]);
        let result = tokio::time::timeout(
            self.cfg.timeout,
            self.build(key, spec, source, report.clone()),
        )
        .instrument(span.clone())
        .await;
        self.metrics.builds_running.dec();
        let elapsed = started.elapsed();
        self.metrics.build_duration.observe(elapsed.as_secs_f64());
        let result = result.unwrap_or(Err(BuildError::Timeout(self.cfg.timeout)));
        let _enter = span.enter();
        match &result {
            Ok(img) => {
                info!(digest = %img.oci_digest, layers = img.layers, size = img.size, seconds = elapsed.as_secs_f64(), "build finished");
                report(Progress::Done);
            }
            Err(e @ BuildError::UnknownPackages(_)) => {
                self.metrics.unknown_packages.inc();
                info!(error = %e, "unknown packages");
            }
            Err(e) => {
                self.metrics.build_failures.inc();
                warn!(error = %e, seconds = elapsed.as_secs_f64(), "build failed");
            }
        }
        result
    }

    /// Resolves the names, then returns the image they make: built already
    /// (under another spelling), being built, or built now.
    async fn build(
        self: &Arc<Self>,
        request: &str,
        spec: &ImageSpec,
        source: &Source,
        report: ProgressFn,
    ) -> ImageResult {
        let packages = spec.all_packages();
        report(Progress::Stage("evaluating"));
        let t = Instant::now();
        // This request resolves to its image for good at a git commit (or a
        // pinned channel or flake), else until the source may have moved: a
        // flake followed at a branch is locked again after the TTL.
        let ttl = (!source.is_immutable_at(&spec.tag)).then_some(self.cfg.mutable_ttl);
        let source = &self.locked(source).await?;
        let prepared = self.resolve(source, spec, &packages).await?;
        info!(seconds = t.elapsed().as_secs_f64(), "evaluated");
        // The default command of a one-package image is that package's program.
        let program = match spec.packages.as_slice() {
            [only] => prepared
                .resolved
                .iter()
                .find(|r| &r.name == only)
                .and_then(|r| r.program.clone()),
            _ => None,
        };
        let key = keys::image_key(&prepared, spec, program.as_deref(), &self.shape);
        if let Some(img) = self.catalog.image(&key) {
            self.metrics.cache_hits.inc();
            self.catalog
                .add_request(request, &key, spec.repository.as_deref(), &spec.tag, ttl);
            return Ok(img);
        }
        let fut = {
            let mut running = self.image_builds.lock().unwrap();
            match running.get(&key).and_then(WeakShared::upgrade) {
                Some(f) => {
                    self.metrics.build_waits.inc();
                    f
                }
                None => {
                    let this = self.clone();
                    let (k, spec, source) = (key.clone(), spec.clone(), source.clone());
                    let f = async move {
                        let result = this
                            .pipeline
                            .build_image(&k, &source, &prepared, &spec, program, &*report)
                            .await;
                        let result = match result {
                            Ok((img, guard)) => {
                                let img = Arc::new(img);
                                this.catalog.add_image(&k, img.clone());
                                drop(guard);
                                // Make room, keeping this image however large.
                                this.gc.collect_after_build(&k).await;
                                Ok(img)
                            }
                            Err(e) => Err(e),
                        };
                        this.image_builds.lock().unwrap().remove(&k);
                        result
                    }
                    .boxed()
                    .shared();
                    if let Some(weak) = f.downgrade() {
                        running.insert(key.clone(), weak);
                    }
                    f
                }
            }
        };
        let img = fut.await?;
        self.catalog
            .add_request(request, &key, spec.repository.as_deref(), &spec.tag, ttl);
        Ok(img)
    }

    /// How long an answer from a source that can move holds.
    pub fn mutable_ttl(&self) -> Duration {
        self.cfg.mutable_ttl
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// The garbage collector of this builder's store.
    pub fn gc(&self) -> &Arc<crate::gc::Collector> {
        &self.gc
    }
}
