//! One build among instances that share a bucket: a request's build lease,
//! or the image another instance built (adopted from the shared index, its
//! blobs checked), and, after a build here, its blobs uploaded and its
//! record published.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::flight::Waiters;
use super::{BuildError, Builder, BuiltImage, ImageSpec, Progress, ProgressFn};
use crate::nix::Source;
use crate::store::BlobStore;

/// With a shared bucket: build it here, holding its lease, or take the image
/// another instance built.
pub(super) enum Turn {
    Build(crate::shared::Lease),
    Adopted(Arc<BuiltImage>),
}

impl Builder {
    /// The build lease of a request, or the image another instance built
    /// for it, waiting while another instance holds the lease.
    pub(super) async fn lease_or_adopt(
        &self,
        shared: &crate::shared::Shared,
        key: &str,
        spec: &ImageSpec,
        report: &ProgressFn,
        waiters: &Waiters,
    ) -> Result<Turn, BuildError> {
        let deadline = Instant::now() + self.cfg.timeout;
        let mut waiting_for = None;
        loop {
            if let Some(img) = self.adopt(shared, key, spec).await? {
                return Ok(Turn::Adopted(img));
            }
            let pause = match shared.try_lease(key).await? {
                crate::shared::Attempt::Won(lease) => {
                    // It may have been finished between the look and the lease.
                    if let Some(img) = self.adopt(shared, key, spec).await? {
                        return Ok(Turn::Adopted(img));
                    }
                    return Ok(Turn::Build(lease));
                }
                crate::shared::Attempt::Held(holder) => {
                    if waiting_for.as_ref() != Some(&holder) {
                        info!(builder = %holder, "another instance is building this image; waiting for it");
                        self.metrics.lease_waits.inc();
                        report(Progress::Stage("waiting for another instance's build"));
                        waiting_for = Some(holder);
                    }
                    Duration::from_millis(500)
                }
                crate::shared::Attempt::Contended => {
                    crate::shared::jitter(Duration::from_millis(50), Duration::from_millis(700))
                }
            };
            if Instant::now() + pause > deadline {
                return Err(BuildError::Timeout(self.cfg.timeout));
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = waiters.all_gone() => return Err(BuildError::Abandoned),
            }
        }
    }

    /// Records a built image in the shared index.
    pub(super) async fn publish(
        &self,
        shared: &crate::shared::Shared,
        key: &str,
        spec: &ImageSpec,
        source: &Source,
        img: &BuiltImage,
    ) {
        // An image is recorded only once all its blobs are in the bucket: one
        // reused from the local cache may have left it (a lifecycle rule).
        if let Some(bucket) = &self.cfg.bucket {
            if let Err(e) = self.upload_missing(bucket, img).await {
                warn!(error = %e, "storing the image's blobs in the bucket failed; not recording it in the shared index");
                return;
            }
        }
        if let Some(image_key) = self.catalog.request_image_key(key) {
            let ttl = (!source.is_immutable_at(&spec.tag)).then_some(self.cfg.mutable_ttl);
            let record = crate::shared::Record {
                image_key,
                oci_digest: img.oci_digest.clone(),
                docker_digest: img.docker_digest.clone(),
                layers: img.layers,
                size: img.size,
                roots: img.roots.clone(),
                built: crate::shared::now_secs(),
                expires: ttl.map(|t| crate::shared::now_secs() + t.as_secs()),
                builder: shared.instance().to_string(),
                attached: img.attached.iter().map(|(d, _)| d.clone()).collect(),
            };
            // This instance serves it either way; if the record is not
            // written, other instances build it themselves.
            if let Err(e) = shared.publish(key, &record).await {
                warn!(error = %e, "recording the image in the shared index failed");
            }
        }
    }

    /// Uploads the blobs of an image that the bucket lacks, from here.
    async fn upload_missing(
        &self,
        bucket: &crate::store::ObjectBlobStore,
        img: &BuiltImage,
    ) -> Result<(), crate::store::StoreError> {
        for d in crate::image::digests_of(img) {
            if bucket.stat(&d).await?.is_some() {
                continue;
            }
            warn!(blob = %d, "a blob of a built image is missing from the bucket; uploading it again");
            let staged = crate::store::stage_copy(&*self.store, &d, bucket.staging_dir())
                .await?
                .ok_or_else(|| {
                    crate::store::StoreError::remote(
                        format!("blob {d}"),
                        "in neither the cache nor the bucket",
                    )
                })?;
            bucket.upload_staged(&staged).await?;
        }
        Ok(())
    }

    /// The image another instance built for this request, read from the
    /// shared index, catalogued here: served without Nix.
    async fn adopt(
        &self,
        shared: &crate::shared::Shared,
        key: &str,
        spec: &ImageSpec,
    ) -> Result<Option<Arc<BuiltImage>>, BuildError> {
        let Some(r) = shared.lookup(key).await? else {
            return Ok(None);
        };
        let read = |d: crate::name::Digest| {
            let store = self.store.clone();
            async move { crate::store::get_small(&*store, &d, crate::catalog::MAX_MANIFEST).await }
        };
        let (Some(oci_manifest), Some(docker_manifest)) = (
            read(r.oci_digest.clone()).await?,
            read(r.docker_digest.clone()).await?,
        ) else {
            warn!(image = %r.oci_digest, "the shared index names an image whose manifests the bucket lacks; building it");
            return Ok(None);
        };
        let mut attached = Vec::with_capacity(r.attached.len());
        for d in &r.attached {
            let Some(m) = read(d.clone()).await? else {
                warn!(image = %r.oci_digest, manifest = %d, "the shared index names an image whose attached manifest the bucket lacks; building it");
                return Ok(None);
            };
            attached.push((d.clone(), m.into()));
        }
        let img = Arc::new(BuiltImage {
            oci_digest: r.oci_digest,
            oci_manifest: oci_manifest.into(),
            docker_digest: r.docker_digest,
            docker_manifest: docker_manifest.into(),
            layers: r.layers,
            size: r.size,
            roots: r.roots,
            gcroot_dir: self.cfg.state_dir.join("gcroots").join(&r.image_key),
            attached,
        });
        // Every blob must be there (a bucket lifecycle rule, or a hand, may
        // have removed some): else it is built again, which stores them anew.
        let digests: Vec<_> = crate::image::digests_of(&img).into_iter().collect();
        let present = futures::future::join_all(digests.iter().map(|d| self.store.stat(d))).await;
        for (d, p) in digests.iter().zip(present) {
            if p?.is_none() {
                warn!(image = %img.oci_digest, blob = %d, "the shared index names an image with a blob the bucket lacks; building it again");
                return Ok(None);
            }
        }
        self.catalog.add_image(&r.image_key, img.clone());
        let ttl = r
            .expires
            .map(|t| Duration::from_secs(t.saturating_sub(crate::shared::now_secs())));
        self.catalog.add_request(
            key,
            &r.image_key,
            spec.repository.as_deref(),
            &spec.tag,
            ttl,
        );
        self.metrics.shared_hits.inc();
        info!(image = %img.oci_digest, builder = %r.builder, "image found in the shared index");
        Ok(Some(img))
    }
}
