//! The pipeline's steps for one image whose names are resolved: realise the
//! packages under the image's GC roots, read the closure graph, plan the
//! layers, pack them (or find them in the layer cache), and store config and
//! manifests. No single flight, caching of images or timeouts: see `service`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::Digest as _;
use tracing::{debug, info, warn};

use super::{BuildError, BuiltImage, ImageSpec, Progress};
use crate::layers::{self, PathInfo, PlannedLayer, Popularity};
use crate::metrics::Metrics;
use crate::nix::{LogSink, Nix, Prepared, Source};
use crate::oci::{self, LayerBlob};
use crate::store::{put_bytes, BlobStore, Staged, Stager};

/// What shapes the layers and where the layer cache lives.
pub struct PipelineConfig {
    pub state_dir: PathBuf,
    pub max_layers: usize,
    pub compression: oci::Compression,
    pub popularity: Option<Popularity>,
    /// Signs each image and its attestations (`--signing-key`).
    pub signer: Option<Arc<crate::attest::Signer>>,
}

pub struct Pipeline {
    pub cfg: PipelineConfig,
    pub gc: Arc<crate::gc::Collector>,
    pub nix: Arc<dyn Nix>,
    pub store: Arc<dyn BlobStore>,
    pub metrics: Arc<Metrics>,
}

/// How many times a build whose builder was killed from outside is tried again.
const KILLED_BUILDER_RETRIES: usize = 2;

impl Pipeline {
    /// `Nix::realise`, with Nix's log lines passed on as progress; when
    /// `errors` is false, without what it says of paths it cannot make
    /// (`don't know how to build these paths:` and the list, `error: ...`).
    async fn realise(
        &self,
        paths: &[String],
        gcroot: &Path,
        errors: bool,
        report: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(), crate::nix::NixError> {
        // Nix's log lines arrive on its reader task; forward them from here.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let listing = std::sync::atomic::AtomicBool::new(false);
        let sink: LogSink = Arc::new(move |line: &str| {
            use std::sync::atomic::Ordering::Relaxed;
            if !errors {
                if line.starts_with("don't know how to build") {
                    listing.store(true, Relaxed);
                    return;
                }
                if listing.load(Relaxed) && line.starts_with(' ') {
                    return;
                }
                listing.store(false, Relaxed);
                if line.starts_with("error") {
                    return;
                }
            }
            let _ = tx.send(line.to_string());
        });
        let realise = self.nix.realise(paths, gcroot, sink);
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
        realised
    }

    /// Realises the packages under GC roots of this image, plans and packs the
    /// layers, and stores config and manifests. The guard it returns keeps
    /// the garbage collector away until the image is catalogued.
    pub async fn build_image(
        &self,
        key: &str,
        source: &Source,
        prepared: &Prepared,
        spec: &ImageSpec,
        program: Option<String>,
        report: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(BuiltImage, crate::gc::BuildGuard), BuildError> {
        report(Progress::Stage("building"));
        let t = Instant::now();
        let gcroot_dir = self.cfg.state_dir.join("gcroots").join(key);
        let gcroot = gcroot_dir.join("root");
        // Nix reads the closure of valid paths only, and roots present
        // output paths without building: when both succeed, every path is
        // present (on a node, most images) and no derivation was written (the
        // evaluation was read-only). Else the derivations are written and
        // built, under the same roots. Rooting shows Nix's progress (a binary
        // cache may send the outputs now) but not its errors: for missing
        // paths it says what it cannot do without their derivations.
        let (closure, rooted) = tokio::join!(
            self.nix.closure(&prepared.outs),
            self.realise(&prepared.outs, &gcroot, false, report),
        );
        let (prepared, closure) = match (closure, rooted) {
            (Ok(closure), Ok(())) => (Cow::Borrowed(prepared), closure),
            _ => {
                let packages = spec.all_packages();
                let system = spec.arch.nix_system();
                let written = self
                    .nix
                    .instantiate(source, &spec.tag, &packages, system)
                    .await?;
                if !written.unknown.is_empty() {
                    // The source moved between the two evaluations.
                    return Err(BuildError::UnknownPackages(written.unknown));
                }
                let mut built = self.realise(&written.drvs, &gcroot, true, report).await;
                // A builder lost to a SIGKILL from outside is built again,
                // after a pause of its own (Nix kills one of two concurrent
                // builders now and then: docs/nix.md); a third loss is the
                // build's failure.
                for _ in 0..KILLED_BUILDER_RETRIES {
                    if !built.as_ref().is_err_and(|e| e.builder_killed()) {
                        break;
                    }
                    warn!("a builder was killed (signal 9) from outside nixery; building again");
                    self.metrics.builders_killed.inc();
                    tokio::time::sleep(crate::shared::jitter(
                        Duration::from_millis(200),
                        Duration::from_millis(1500),
                    ))
                    .await;
                    built = self.realise(&written.drvs, &gcroot, true, report).await;
                }
                built.map_err(|e| match e.unsupported_system() {
                    Some(system) => BuildError::UnsupportedSystem { system },
                    None => BuildError::Nix(e),
                })?;
                report(Progress::Stage("reading closure"));
                let closure = self.nix.closure(&written.outs).await?;
                (Cow::Owned(written), closure)
            }
        };
        info!(seconds = t.elapsed().as_secs_f64(), "realised");
        self.assemble(
            &prepared, source, spec, program, closure, gcroot_dir, report,
        )
        .await
    }

    /// Plans and packs the layers of a closure and stores config and manifests.
    #[allow(clippy::too_many_arguments)]
    async fn assemble(
        &self,
        prepared: &Prepared,
        source: &Source,
        spec: &ImageSpec,
        program: Option<String>,
        closure: Vec<PathInfo>,
        gcroot_dir: PathBuf,
        report: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<(BuiltImage, crate::gc::BuildGuard), BuildError> {
        let roots = root_order(prepared, self.cfg.popularity.as_ref());
        let planned = layers::plan(
            &closure,
            &roots,
            self.cfg.max_layers,
            self.cfg.popularity.as_ref(),
        );

        report(Progress::Stage("packing layers"));
        // From here on the build relies on stored blobs (cached layers) that
        // no catalogued image may hold yet.
        let guard = self.gc.guard().await;
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
        // The largest layers start first (each is packed on one core), so
        // the last to finish is a small one: with shell/curl's 7 MB layer
        // planned 11th of 12, in plan order the other core idled while it packed.
        let mut order: Vec<(usize, PlannedLayer)> = planned.into_iter().enumerate().collect();
        order.sort_by_key(|(_, l)| std::cmp::Reverse(l.nar_size));
        let mut packed: Vec<Option<LayerBlob>> = (0..order.len()).map(|_| None).collect();
        let mut done = 0;
        // After a failure no new layer starts, and the error is returned only
        // once the layers already packing have stopped: nothing of a failed
        // build goes on writing after its error is reported.
        let failed = std::sync::atomic::AtomicBool::new(false);
        // A core per layer while it packs; storing it (fsync) frees the core
        // for the next. The semaphore is fair, so layers start in this order.
        let cores = tokio::sync::Semaphore::new(parallel);
        let jobs = order.into_iter().map(|(i, l)| {
            let (failed, cores) = (&failed, &cores);
            async move {
                let core = cores.acquire().await.expect("never closed");
                if failed.load(std::sync::atomic::Ordering::SeqCst) {
                    return (i, None);
                }
                (i, Some(self.store_path_layer(l.paths, core).await))
            }
        });
        // The customisation layer (symlinks, a few small files) is packed
        // beside the others, not after them.
        let staging = self.store.staging_dir().to_path_buf();
        let compression = self.cfg.compression;
        let custom = async {
            let stored = async {
                let (blob, staged, bin) = tokio::task::spawn_blocking(
                    move || -> Result<(LayerBlob, Staged, Vec<String>), BuildError> {
                        let c = oci::customisation(&roots)?;
                        let (w, blob) =
                            oci::pack_layer(&c.entries, Stager::new(&staging)?, compression)?;
                        let staged = w.finish(Some(&blob.digest))?;
                        Ok((blob, staged, c.bin))
                    },
                )
                .await
                .map_err(|e| BuildError::Internal(e.to_string()))??;
                self.store.put(staged).await?;
                Ok::<_, BuildError>((blob, bin))
            }
            .await;
            if stored.is_err() {
                failed.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            stored
        };
        let mut stream = futures::stream::iter(jobs).buffer_unordered(2 * parallel);
        let store_path_layers = async {
            let mut first_error: Option<BuildError> = None;
            while let Some((i, result)) = stream.next().await {
                match result {
                    Some(Ok(blob)) => {
                        packed[i] = Some(blob);
                        done += 1;
                        report(Progress::Layers { done, total });
                    }
                    Some(Err(e)) => {
                        failed.store(true, std::sync::atomic::Ordering::SeqCst);
                        first_error.get_or_insert(e);
                    }
                    None => {}
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            Ok(())
        };
        // Both run to their end before an error is returned.
        let (layers_done, custom) = tokio::join!(store_path_layers, custom);
        drop(stream);
        layers_done?;
        let (custom, bin) = custom?;
        // In plan order again: the image's layers are the plan's.
        let mut blobs: Vec<LayerBlob> = packed.into_iter().flatten().collect();
        if blobs.len() + 1 != total {
            return Err(BuildError::Internal(format!(
                "{} of {} layers packed",
                blobs.len(),
                total - 1
            )));
        }
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
        let oci_manifest = oci::manifest(false, &config, &blobs, compression)
            .map_err(|e| BuildError::Internal(e.to_string()))?;
        // Docker schema2 has no zstd layers: such images have OCI manifests only.
        let docker_manifest = match compression.docker_layer_media_type() {
            Some(_) => oci::manifest(true, &config, &blobs, compression)
                .map_err(|e| BuildError::Internal(e.to_string()))?,
            None => oci_manifest.clone(),
        };
        // Manifests are blobs too, so they can be served by digest after a
        // restart. The three are stored at once (nothing serves them before
        // the build has finished), and all three have ended before an error
        // is returned.
        let store = &*self.store;
        let (config_stored, oci_digest, docker_digest) = tokio::join!(
            put_bytes(store, &config),
            put_bytes(store, &oci_manifest),
            async {
                if docker_manifest == oci_manifest {
                    Ok(crate::name::Digest::of(&docker_manifest))
                } else {
                    put_bytes(store, &docker_manifest).await
                }
            }
        );
        config_stored?;
        let (oci_digest, docker_digest) = (oci_digest?, docker_digest?);
        let attached = self
            .attach(
                prepared,
                source,
                spec,
                &closure,
                &oci_digest,
                oci_manifest.len(),
            )
            .await?;
        let image = BuiltImage {
            oci_digest,
            oci_manifest: oci_manifest.into(),
            docker_digest,
            docker_manifest: docker_manifest.into(),
            layers: blobs.len(),
            size: config.len() as u64 + blobs.iter().map(|b| b.size).sum::<u64>(),
            roots: prepared.outs.clone(),
            gcroot_dir,
            attached,
        };
        Ok((image, guard))
    }

    /// Computes and stores the image's SBOMs, provenance and (with a key)
    /// signatures; returns the manifests that attach them to the image.
    async fn attach(
        &self,
        prepared: &Prepared,
        source: &Source,
        spec: &ImageSpec,
        closure: &[PathInfo],
        oci_digest: &crate::name::Digest,
        oci_size: usize,
    ) -> Result<Vec<(crate::name::Digest, bytes::Bytes)>, BuildError> {
        let t = Instant::now();
        // The image's name from what its packages resolved to (not how a
        // request spelled them), so every node names it alike.
        let mut attrs: Vec<&str> = prepared
            .resolved
            .iter()
            .filter(|r| spec.packages.contains(&r.name))
            .map(|r| r.attr.as_str())
            .collect();
        attrs.sort();
        attrs.dedup();
        let facts = crate::attest::Facts {
            subject: crate::attest::Subject {
                digest: oci_digest.clone(),
                size: oci_size as u64,
            },
            repository: attrs.join("/"),
            closure,
            resolved: &prepared.resolved,
            outs: &prepared.outs,
            derivations: &prepared.drvs,
            source,
            revision: &spec.tag,
            settings: serde_json::json!({
                "system": spec.arch.nix_system(),
                "maxLayers": self.cfg.max_layers,
                "layerCompression": self.cfg.compression.cache_tag(),
                "popularity": self.cfg.popularity.is_some(),
                "config": {
                    "entrypoint": spec.run.entrypoint,
                    "cmd": spec.run.cmd,
                    "env": spec.run.env,
                    "workingDir": spec.run.working_dir,
                    "user": spec.run.user,
                    "exposedPorts": spec.run.exposed_ports,
                },
            }),
            builder_version: env!("CARGO_PKG_VERSION"),
        };
        let out = crate::attest::attach(&facts);
        let store = &*self.store;
        for blob in &out.blobs {
            put_bytes(store, blob).await?;
        }
        let mut attached = Vec::with_capacity(out.manifests.len());
        for m in out.manifests {
            let digest = put_bytes(store, &m).await?;
            attached.push((digest, bytes::Bytes::from(m)));
        }
        info!(
            seconds = t.elapsed().as_secs_f64(),
            documents = attached.len(),
            "SBOMs, provenance and signatures attached"
        );
        Ok(attached)
    }

    /// A layer of store paths: from the layer cache, or packed and stored.
    async fn store_path_layer(
        &self,
        paths: Vec<String>,
        core: tokio::sync::SemaphorePermit<'_>,
    ) -> Result<LayerBlob, BuildError> {
        let cache_file = self.layer_cache_file(&paths);
        if let Some(blob) = self.cached_layer(&cache_file).await {
            self.metrics.layers_reused.inc();
            return Ok(blob);
        }
        let staging = self.store.staging_dir().to_path_buf();
        let compression = self.cfg.compression;
        let (blob, staged) =
            tokio::task::spawn_blocking(move || -> Result<(LayerBlob, Staged), BuildError> {
                let t = Instant::now();
                let entries = oci::store_path_entries(&paths)?;
                let (w, blob) = oci::pack_layer(&entries, Stager::new(&staging)?, compression)?;
                let staged = w.finish(Some(&blob.digest))?;
                debug!(
                    paths = paths.len(),
                    size = blob.size,
                    seconds = t.elapsed().as_secs_f64(),
                    "layer packed"
                );
                Ok((blob, staged))
            })
            .await
            .map_err(|e| BuildError::Internal(e.to_string()))??;
        drop(core);
        self.store.put(staged).await?;
        // Recorded only once the blob is stored.
        crate::store::write_atomic(
            &cache_file,
            &serde_json::to_vec(&blob).expect("serialisable"),
        )?;
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

    async fn cached_layer(&self, file: &Path) -> Option<LayerBlob> {
        let blob: LayerBlob = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
        // Trust the record only while its blob is really there.
        (self.store.stat(&blob.digest).await.ok()?? == blob.size).then_some(blob)
    }
}

/// The image's packages in the order their layer groups take: the packages
/// every image gets (one group together), then the `shell` set, then the rest
/// (more popular first with a table, else by attribute name), one group
/// each. Outputs of no resolved name (none, normally) come last.
pub fn root_order(prepared: &Prepared, popularity: Option<&Popularity>) -> Vec<Vec<String>> {
    let tier = |attr: &str| {
        if super::ALWAYS.contains(&attr) {
            0
        } else if super::SHELL.contains(&attr) {
            1
        } else {
            2
        }
    };
    let pop = |out: &str| layers::popularity_of(popularity, out);
    let mut named: Vec<(u8, std::cmp::Reverse<u64>, &str, &str)> = prepared
        .resolved
        .iter()
        .map(|r| {
            (
                tier(&r.attr),
                std::cmp::Reverse(pop(&r.out)),
                r.attr.as_str(),
                r.out.as_str(),
            )
        })
        .collect();
    named.sort();
    let mut seen: Vec<&str> = Vec::new();
    let mut sets: Vec<Vec<String>> = Vec::new();
    for (t, _, _, o) in named {
        if seen.contains(&o) {
            continue;
        }
        seen.push(o);
        match sets.last_mut() {
            Some(first) if t == 0 && seen.len() > 1 => first.push(o.to_string()),
            _ => sets.push(vec![o.to_string()]),
        }
    }
    let mut others: Vec<String> = prepared
        .outs
        .iter()
        .filter(|o| !seen.contains(&o.as_str()))
        .cloned()
        .collect();
    others.sort();
    others.dedup();
    if !others.is_empty() {
        sets.push(others);
    }
    sets
}
