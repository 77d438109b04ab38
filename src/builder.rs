//! The pipeline from an image request to a stored manifest: Nix resolves and
//! builds, layers are planned, packed (or found in the layer cache) and stored,
//! then config and manifests. Concurrent requests for one image share a build;
//! builds beyond the limit queue; each has a timeout; failures are not cached.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared, WeakShared};
use futures::StreamExt;
use sha2::Digest as _;
use tracing::{info, info_span, warn, Instrument};

use crate::layers::{self, PathInfo, Popularity};
use crate::metrics::Metrics;
use crate::name::{AdHocImage, Arch, Digest};
use crate::nix::{LogSink, Nix, NixError, Prepared, Source};
use crate::oci::{self, LayerBlob, RunConfig};
use crate::store::{BlobStore, StoreError};

/// Packages every image gets, as Nixery does.
pub const ALWAYS: &[&str] = &["cacert", "iana-etc"];
/// What the `shell` meta-package stands for, as in Nixery.
pub const SHELL: &[&str] = &["bashInteractive", "coreutils", "moreutils", "nano"];

/// What to build: a package set at a tag, for an architecture, with a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The packages the user asked for (metas expanded, sorted, unique).
    pub packages: Vec<String>,
    pub arch: Arch,
    pub tag: String,
    pub run: RunConfig,
    /// Overrides the builder's package source (NixImage `spec.source`).
    pub source: Option<Source>,
}

impl ImageSpec {
    pub fn ad_hoc(img: &AdHocImage, tag: &str) -> Self {
        let mut packages: BTreeSet<String> = img.packages.clone();
        if img.shell {
            packages.extend(SHELL.iter().map(|s| s.to_string()));
        }
        ImageSpec {
            packages: packages.into_iter().collect(),
            arch: img.arch,
            tag: tag.to_string(),
            run: RunConfig::default(),
            source: None,
        }
    }

    /// Everything Nix is asked for: the user's packages and the ones every image gets.
    fn all_packages(&self) -> Vec<String> {
        let set: BTreeSet<String> = self
            .packages
            .iter()
            .cloned()
            .chain(ALWAYS.iter().map(|s| s.to_string()))
            .collect();
        set.into_iter().collect()
    }

    /// The request key: sorted package names as spelled, source and
    /// revision, arch, config. Spellings of one package set differ here and
    /// meet again at the image key (`image_key`).
    fn key(&self, source: &Source) -> String {
        let mut h = sha2::Sha256::new();
        h.update(format!(
            "{:?}\0{:?}\0{}\0{:?}\0{:?}",
            self.all_packages(),
            source,
            self.tag,
            self.arch,
            self.run
        ));
        hex::encode(h.finalize())
    }
}

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
}

impl BuiltImage {
    /// Whether a Docker schema2 manifest exists beside the OCI one.
    pub fn has_docker_manifest(&self) -> bool {
        self.docker_digest != self.oci_digest
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BuildError {
    #[error("unknown packages: {}", .0.join(", "))]
    UnknownPackages(Vec<String>),
    #[error("this registry cannot build {system} images: its Nix builds only for other systems, and no substituter or remote builder supplied {system} packages")]
    UnsupportedSystem { system: String },
    #[error(
        "tag '{tag}' is unknown: with a {source_kind} package source the only tag is 'latest'"
    )]
    UnknownTag {
        tag: String,
        source_kind: &'static str,
    },
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error("the build took longer than its timeout of {}s and was stopped", .0.as_secs())]
    Timeout(Duration),
    #[error("storing the image failed: {0}")]
    Store(String),
    #[error("the build stopped unexpectedly: {0}")]
    Internal(String),
}

impl From<StoreError> for BuildError {
    fn from(e: StoreError) -> Self {
        match e {
            // The path is ours; the reason is what an operator needs.
            StoreError::Io { source, .. } => BuildError::Store(io_reason(&source)),
            other => BuildError::Store(other.to_string()),
        }
    }
}

impl From<std::io::Error> for BuildError {
    fn from(e: std::io::Error) -> Self {
        BuildError::Store(io_reason(&e))
    }
}

/// The operating system's reason for an I/O error, without the paths that
/// some errors carry: users see "No space left on device", not our layout.
fn io_reason(e: &std::io::Error) -> String {
    tracing::error!(error = %e, "storage I/O failed");
    // Wrappers (tempfile's, for one) keep the OS error as their source.
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(code) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.raw_os_error())
        {
            return std::io::Error::from_raw_os_error(code).to_string();
        }
        cur = err.source();
    }
    match e.kind() {
        std::io::ErrorKind::StorageFull => "No space left on device".into(),
        kind => kind.to_string(),
    }
}

/// Build progress, for `nixery build` and NixImage status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Queued,
    Stage(&'static str),
    NixLog(String),
    Layers { done: usize, total: usize },
    Done,
}

pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

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
    pub compression: oci::Compression,
    pub popularity: Option<Popularity>,
}

type BuildResult = Result<Arc<BuiltImage>, Arc<BuildError>>;
/// A built image and when it expires (None: never).
type CacheEntry = (Arc<BuiltImage>, Option<Instant>);
type ImageResult = Result<Arc<BuiltImage>, BuildError>;
/// Whether each name exists in one package source revision, and until when
/// the answer holds (None: for good, as for a git commit).
type NameAnswers = (HashMap<String, bool>, Option<Instant>);

pub struct Builder {
    cfg: BuilderConfig,
    nix: Arc<dyn Nix>,
    store: Arc<dyn BlobStore>,
    metrics: Arc<Metrics>,
    /// Built images by request key, with when they expire (None: never).
    cache: Mutex<HashMap<String, CacheEntry>>,
    /// Built images by image key (what the names resolved to): spellings of
    /// one package set share one image, one build and one set of GC roots.
    images: Mutex<HashMap<String, Arc<BuiltImage>>>,
    /// Running image builds by image key. Weak, so a build that every waiter
    /// gave up on (timeout) is dropped, which stops its Nix processes.
    image_builds: Mutex<HashMap<String, WeakShared<BoxFuture<'static, ImageResult>>>>,
    /// Whether names exist, per package source revision, so a repeated
    /// unknown name costs no evaluation.
    names: Mutex<HashMap<String, NameAnswers>>,
    /// Manifests of built images by digest, so GETs by digest skip the disk.
    manifests: Mutex<HashMap<Digest, (&'static str, bytes::Bytes)>>,
    inflight: Mutex<HashMap<String, Shared<BoxFuture<'static, BuildResult>>>>,
    slots: tokio::sync::Semaphore,
}

impl Builder {
    pub fn new(
        cfg: BuilderConfig,
        nix: Arc<dyn Nix>,
        store: Arc<dyn BlobStore>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let slots = tokio::sync::Semaphore::new(cfg.max_builds.max(1));
        Arc::new(Builder {
            cfg,
            nix,
            store,
            metrics,
            cache: Default::default(),
            images: Default::default(),
            image_builds: Default::default(),
            names: Default::default(),
            manifests: Default::default(),
            inflight: Default::default(),
            slots,
        })
    }

    pub fn source(&self) -> &Source {
        &self.cfg.source
    }

    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }

    /// Returns the image, building it unless cached; concurrent callers for
    /// one image share one build. `progress` follows the build this call
    /// starts (a caller that joins a running build sees only the result).
    pub async fn get_or_build(
        self: &Arc<Self>,
        spec: ImageSpec,
        progress: Option<ProgressFn>,
    ) -> BuildResult {
        let source = spec
            .source
            .clone()
            .unwrap_or_else(|| self.cfg.source.clone());
        if !source.tags_are_revisions() && spec.tag != "latest" {
            let source_kind = if matches!(source, Source::Path(_)) {
                "local path"
            } else {
                "channel"
            };
            return Err(Arc::new(BuildError::UnknownTag {
                tag: spec.tag.clone(),
                source_kind,
            }));
        }
        let key = spec.key(&source);
        let expires =
            (!source.is_immutable_at(&spec.tag)).then(|| Instant::now() + self.cfg.mutable_ttl);
        if let Some((img, until)) = self.cache.lock().unwrap().get(&key) {
            if until.is_none_or(|t| Instant::now() < t) {
                self.metrics.cache_hits.inc();
                return Ok(img.clone());
            }
        }
        let fut = {
            let mut inflight = self.inflight.lock().unwrap();
            match inflight.get(&key) {
                Some(f) => {
                    self.metrics.build_waits.inc();
                    f.clone()
                }
                None => {
                    self.metrics.cache_misses.inc();
                    let this = self.clone();
                    let k = key.clone();
                    let handle = tokio::spawn(async move {
                        let result = this
                            .build_limited(&k, &spec, &source, progress)
                            .await
                            .map_err(Arc::new);
                        if let Ok(img) = &result {
                            this.cache
                                .lock()
                                .unwrap()
                                .insert(k.clone(), (img.clone(), expires));
                            let mut manifests = this.manifests.lock().unwrap();
                            manifests.insert(
                                img.oci_digest.clone(),
                                (oci::OCI_MANIFEST, img.oci_manifest.clone()),
                            );
                            if img.has_docker_manifest() {
                                manifests.insert(
                                    img.docker_digest.clone(),
                                    (oci::DOCKER_MANIFEST, img.docker_manifest.clone()),
                                );
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
                    inflight.insert(key, f.clone());
                    f
                }
            }
        };
        fut.await
    }

    /// Waits for a build slot, then builds within the timeout.
    async fn build_limited(
        self: &Arc<Self>,
        key: &str,
        spec: &ImageSpec,
        source: &Source,
        progress: Option<ProgressFn>,
    ) -> ImageResult {
        let report: ProgressFn = Arc::new(move |p: Progress| {
            if let Some(f) = &progress {
                f(p)
            }
        });
        report(Progress::Queued);
        self.metrics.builds_queued.inc();
        let permit = self.slots.acquire().await;
        self.metrics.builds_queued.dec();
        let _permit = permit.map_err(|e| BuildError::Internal(e.to_string()))?;
        self.metrics.builds.inc();
        self.metrics.builds_running.inc();
        let started = Instant::now();
        let span = info_span!("build", image = %spec.packages.join("/"), tag = %spec.tag, arch = spec.arch.oci(), key = &key[..12]);
        let result =
            tokio::time::timeout(self.cfg.timeout, self.build(spec, source, report.clone()))
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
        spec: &ImageSpec,
        source: &Source,
        report: ProgressFn,
    ) -> ImageResult {
        let packages = spec.all_packages();
        report(Progress::Stage("evaluating"));
        let t = Instant::now();
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
        let key = self.image_key(&prepared, spec, program.as_deref());
        if let Some(img) = self.images.lock().unwrap().get(&key) {
            self.metrics.cache_hits.inc();
            return Ok(img.clone());
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
                    let (k, spec) = (key.clone(), spec.clone());
                    let f = async move {
                        let result = this
                            .build_image(&k, &prepared, &spec, program, &*report)
                            .await
                            .map(Arc::new);
                        if let Ok(img) = &result {
                            this.images.lock().unwrap().insert(k.clone(), img.clone());
                        }
                        this.image_builds.lock().unwrap().remove(&k);
                        result
                    }
                    .boxed()
                    .shared();
                    if let Some(weak) = f.downgrade() {
                        running.insert(key, weak);
                    }
                    f
                }
            }
        };
        fut.await
    }

    /// Asks Nix what the names mean, unless every answer is known for this
    /// package source revision and one of them is "unknown".
    async fn resolve(
        &self,
        source: &Source,
        spec: &ImageSpec,
        packages: &[String],
    ) -> Result<Prepared, BuildError> {
        let revision = format!("{source:?}\0{}\0{:?}", spec.tag, spec.arch);
        {
            let mut names = self.names.lock().unwrap();
            if let Some((answers, until)) = names.get(&revision) {
                if until.is_some_and(|t| Instant::now() >= t) {
                    names.remove(&revision);
                } else if packages.iter().all(|p| answers.contains_key(p)) {
                    let unknown: Vec<String> =
                        packages.iter().filter(|p| !answers[*p]).cloned().collect();
                    if !unknown.is_empty() {
                        self.metrics.unknown_cached.inc();
                        return Err(BuildError::UnknownPackages(unknown));
                    }
                }
            }
        }
        let prepared = self
            .nix
            .prepare(source, &spec.tag, packages, spec.arch.nix_system())
            .await?;
        let until =
            (!source.is_immutable_at(&spec.tag)).then(|| Instant::now() + self.cfg.mutable_ttl);
        let mut names = self.names.lock().unwrap();
        let (answers, _) = names
            .entry(revision)
            .or_insert_with(|| (HashMap::new(), until));
        // Each name resolves on its own: those not unknown exist.
        for p in packages {
            answers.insert(p.clone(), !prepared.unknown.contains(p));
        }
        if prepared.unknown.is_empty() {
            Ok(prepared)
        } else {
            Err(BuildError::UnknownPackages(prepared.unknown))
        }
    }

    /// The image key: the output paths the names resolved to (sorted, unique),
    /// the default program, and everything else that shapes the image.
    fn image_key(&self, prepared: &Prepared, spec: &ImageSpec, program: Option<&str>) -> String {
        let outs: BTreeSet<&str> = prepared.outs.iter().map(String::as_str).collect();
        let mut h = sha2::Sha256::new();
        h.update(format!(
            "{outs:?}\0{:?}\0{:?}\0{program:?}\0{}\0{}\0{}",
            spec.arch,
            spec.run,
            self.cfg.compression.cache_tag(),
            self.cfg.max_layers,
            self.cfg.popularity.is_some(),
        ));
        hex::encode(h.finalize())
    }

    /// Realises the packages under GC roots of this image, plans and packs the
    /// layers, and stores config and manifests.
    async fn build_image(
        &self,
        key: &str,
        prepared: &Prepared,
        spec: &ImageSpec,
        program: Option<String>,
        report: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<BuiltImage, BuildError> {
        report(Progress::Stage("building"));
        let t = Instant::now();
        let gcroot_dir = self.cfg.state_dir.join("gcroots").join(key);
        // Nix's log lines arrive on its reader task; forward them from here.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let sink: LogSink = Arc::new(move |line: &str| {
            let _ = tx.send(line.to_string());
        });
        let gcroot = gcroot_dir.join("root");
        let realise = self.nix.realise(&prepared.drvs, &gcroot, sink);
        tokio::pin!(realise);
        let realised = loop {
            tokio::select! {
                r = &mut realise => break r,
                Some(line) = rx.recv() => report(Progress::NixLog(line)),
            }
        };
        while let Ok(line) = rx.try_recv() {
            report(Progress::NixLog(line));
        }
        realised.map_err(|e| match e.unsupported_system() {
            Some(system) => BuildError::UnsupportedSystem { system },
            None => BuildError::Nix(e),
        })?;
        info!(seconds = t.elapsed().as_secs_f64(), "realised");

        report(Progress::Stage("reading closure"));
        let closure: Vec<PathInfo> = self.nix.closure(&prepared.outs).await?;
        let planned = layers::plan(&closure, self.cfg.max_layers, self.cfg.popularity.as_ref());

        report(Progress::Stage("packing layers"));
        let t = Instant::now();
        let total = planned.len() + 1;
        let roots: Vec<PathBuf> = prepared.outs.iter().map(PathBuf::from).collect();
        let mut history: Vec<String> = planned
            .iter()
            .map(|l| match l.paths.as_slice() {
                [one] => format!("nixery: {}", one.rsplit('/').next().unwrap_or(one)),
                many => format!("nixery: {} store paths", many.len()),
            })
            .collect();
        history.push("nixery: customisation layer".into());

        let parallel = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        let mut blobs: Vec<LayerBlob> = Vec::with_capacity(total);
        // After a failure no new layer starts, and the error is returned only
        // once the layers already packing have stopped: nothing of a failed
        // build goes on writing after its error is reported.
        let failed = std::sync::atomic::AtomicBool::new(false);
        let mut first_error: Option<BuildError> = None;
        let jobs = planned.into_iter().map(|l| {
            let failed = &failed;
            async move {
                if failed.load(std::sync::atomic::Ordering::SeqCst) {
                    return None;
                }
                Some(self.store_path_layer(l.paths).await)
            }
        });
        let mut stream = futures::stream::iter(jobs).buffered(parallel);
        while let Some(result) = stream.next().await {
            match result {
                Some(Ok(blob)) => {
                    blobs.push(blob);
                    report(Progress::Layers {
                        done: blobs.len(),
                        total,
                    });
                }
                Some(Err(e)) => {
                    failed.store(true, std::sync::atomic::Ordering::SeqCst);
                    first_error.get_or_insert(e);
                }
                None => {}
            }
        }
        drop(stream);
        if let Some(e) = first_error {
            return Err(e);
        }
        let store = self.store.clone();
        let compression = self.cfg.compression;
        let roots_for_custom = roots.clone();
        let (custom, bin) =
            tokio::task::spawn_blocking(move || -> Result<(LayerBlob, Vec<String>), BuildError> {
                let c = oci::customisation(&roots_for_custom)?;
                let (w, blob) = oci::pack_layer(&c.entries, store.writer()?, compression)?;
                w.commit(Some(&blob.digest))?;
                Ok((blob, c.bin))
            })
            .await
            .map_err(|e| BuildError::Internal(e.to_string()))??;
        blobs.push(custom);
        report(Progress::Layers {
            done: blobs.len(),
            total,
        });
        info!(
            seconds = t.elapsed().as_secs_f64(),
            layers = blobs.len(),
            "packed"
        );

        let mut run = spec.run.clone();
        if run.cmd.is_none() && run.entrypoint.is_none() {
            run.cmd = oci::default_cmd(&bin, program.as_deref());
        }
        let config = oci::image_config(spec.arch, &blobs, &run, &history)
            .map_err(|e| BuildError::Internal(e.to_string()))?;
        self.store.put(&config)?;
        let compression = self.cfg.compression;
        let oci_manifest = oci::manifest(false, &config, &blobs, compression)
            .map_err(|e| BuildError::Internal(e.to_string()))?;
        // Docker schema2 has no zstd layers: such images have OCI manifests only.
        let docker_manifest = match compression {
            oci::Compression::Gzip => oci::manifest(true, &config, &blobs, compression)
                .map_err(|e| BuildError::Internal(e.to_string()))?,
            oci::Compression::Zstd => oci_manifest.clone(),
        };
        // Manifests are blobs too, so they can be served by digest after a restart.
        let oci_digest = self.store.put(&oci_manifest)?;
        let docker_digest = self.store.put(&docker_manifest)?;
        Ok(BuiltImage {
            oci_digest,
            oci_manifest: oci_manifest.into(),
            docker_digest,
            docker_manifest: docker_manifest.into(),
            layers: blobs.len(),
            size: config.len() as u64 + blobs.iter().map(|b| b.size).sum::<u64>(),
            roots: prepared.outs.clone(),
            gcroot_dir,
        })
    }

    /// A layer of store paths: from the layer cache, or packed and stored.
    async fn store_path_layer(&self, paths: Vec<String>) -> Result<LayerBlob, BuildError> {
        let cache_file = self.layer_cache_file(&paths);
        if let Some(blob) = self.cached_layer(&cache_file) {
            self.metrics.layers_reused.inc();
            return Ok(blob);
        }
        let store = self.store.clone();
        let compression = self.cfg.compression;
        let blob = tokio::task::spawn_blocking(move || -> Result<LayerBlob, BuildError> {
            let entries = oci::store_path_entries(&paths)?;
            let (w, blob) = oci::pack_layer(&entries, store.writer()?, compression)?;
            w.commit(Some(&blob.digest))?;
            crate::store::write_atomic(
                &cache_file,
                &serde_json::to_vec(&blob).expect("serialisable"),
            )?;
            Ok(blob)
        })
        .await
        .map_err(|e| BuildError::Internal(e.to_string()))??;
        self.metrics.layers_packed.inc();
        Ok(blob)
    }

    /// Layers are keyed by their store paths and compression.
    fn layer_cache_file(&self, paths: &[String]) -> PathBuf {
        let mut h = sha2::Sha256::new();
        h.update(format!("{}\n", self.cfg.compression.cache_tag()));
        for p in paths {
            h.update(p.as_bytes());
            h.update(b"\n");
        }
        self.cfg
            .state_dir
            .join("layers")
            .join(format!("{}.json", hex::encode(h.finalize())))
    }

    fn cached_layer(&self, file: &Path) -> Option<LayerBlob> {
        let blob: LayerBlob = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
        // Trust the record only while its blob is really there.
        (self.store.stat(&blob.digest).ok()?? == blob.size).then_some(blob)
    }

    /// A manifest this builder built, by digest, with its media type.
    pub fn manifest(&self, digest: &Digest) -> Option<(&'static str, bytes::Bytes)> {
        self.manifests.lock().unwrap().get(digest).cloned()
    }

    /// Drops an image from the cache (used when its NixImage is deleted).
    pub fn forget(&self, img: &BuiltImage) {
        self.cache
            .lock()
            .unwrap()
            .retain(|_, (v, _)| v.oci_digest != img.oci_digest);
    }
}
