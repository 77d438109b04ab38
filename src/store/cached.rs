//! A local read-through cache in front of a shared blob store: blobs are
//! written to the shared store first and then kept locally; a blob read that
//! misses locally streams from the shared store while a background copy,
//! verified against its digest, fills the cache for the next reader. The
//! cache is a `LocalStore`, which garbage collection keeps within
//! `--storage-limit`; the shared store is never collected from here, since
//! other instances serve from it.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use super::{object::ObjectBlobStore, BlobStore, ByteStream, LocalStore, Staged, StoreError};
use crate::name::Digest;

pub struct CachedStore {
    local: Arc<LocalStore>,
    remote: Arc<ObjectBlobStore>,
    /// Blobs being copied into the cache now.
    filling: Arc<Mutex<HashSet<Digest>>>,
    /// Cached bytes past which a fill removes the oldest cached blobs.
    limit: u64,
}

impl CachedStore {
    pub fn new(local: Arc<LocalStore>, remote: Arc<ObjectBlobStore>, limit: u64) -> Self {
        CachedStore {
            local,
            remote,
            filling: Default::default(),
            limit,
        }
    }

    pub fn local(&self) -> &Arc<LocalStore> {
        &self.local
    }

    pub fn remote(&self) -> &Arc<ObjectBlobStore> {
        &self.remote
    }

    /// Copies a blob from the shared store into the cache, in the background,
    /// once at a time per blob; a copy that does not match its digest is
    /// dropped.
    fn fill(&self, digest: &Digest) {
        if !self.filling.lock().unwrap().insert(digest.clone()) {
            return;
        }
        let (local, remote, filling) = (
            self.local.clone(),
            self.remote.clone(),
            self.filling.clone(),
        );
        let (digest, limit) = (digest.clone(), self.limit);
        tokio::spawn(async move {
            match copy(&remote, &local, &digest).await {
                Ok(()) => trim(&local, limit).await,
                Err(e) => {
                    tracing::warn!(blob = %digest, error = %e, "caching a blob from the object store failed")
                }
            }
            filling.lock().unwrap().remove(&digest);
        });
    }
}

/// Removes the blobs cached longest ago until the cache holds at most 90% of
/// `limit`. Always safe: every cached blob is in the bucket too.
async fn trim(local: &LocalStore, limit: u64) {
    let Ok(blobs) = local.list().await else {
        return;
    };
    let mut total: u64 = blobs.iter().map(|(_, s)| s).sum();
    if total <= limit {
        return;
    }
    let mut aged: Vec<_> = blobs
        .into_iter()
        .map(|(d, size)| {
            let t = std::fs::metadata(local.blob_path(&d))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, d, size)
        })
        .collect();
    aged.sort();
    for (_, d, size) in aged {
        if total <= limit / 10 * 9 {
            break;
        }
        if matches!(local.delete(&d).await, Ok(true)) {
            total -= size;
        }
    }
    tracing::debug!(cached = total, limit, "trimmed the blob cache");
}

async fn copy(
    remote: &ObjectBlobStore,
    local: &LocalStore,
    digest: &Digest,
) -> Result<(), StoreError> {
    if let Some(staged) = super::stage_copy(remote, digest, local.staging_dir()).await? {
        local.put(staged).await?;
    }
    Ok(())
}

impl BlobStore for CachedStore {
    fn staging_dir(&self) -> &Path {
        self.local.staging_dir()
    }

    fn stat<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            match self.local.stat(digest).await? {
                Some(size) => Ok(Some(size)),
                None => self.remote.stat(digest).await,
            }
        })
    }

    fn get<'a>(
        &'a self,
        digest: &'a Digest,
        range: Option<(u64, u64)>,
    ) -> BoxFuture<'a, Result<Option<ByteStream>, StoreError>> {
        Box::pin(async move {
            if let Some(s) = self.local.get(digest, range).await? {
                return Ok(Some(s));
            }
            let got = self.remote.get(digest, range).await?;
            if got.is_some() {
                self.fill(digest);
            }
            Ok(got)
        })
    }

    fn send<'a>(
        &'a self,
        digest: &'a Digest,
        range: Option<(u64, u64)>,
    ) -> BoxFuture<'a, Result<Option<ByteStream>, StoreError>> {
        Box::pin(async move {
            if let Some(s) = self.local.send(digest, range).await? {
                return Ok(Some(s));
            }
            self.get(digest, range).await
        })
    }

    fn put(&self, staged: Staged) -> BoxFuture<'_, Result<Digest, StoreError>> {
        Box::pin(async move {
            // Shared first: a blob is cached locally only once every
            // instance can have it.
            self.remote.upload_staged(&staged).await?;
            self.local.put(staged).await
        })
    }

    fn delete<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let here = self.local.delete(digest).await?;
            let there = self.remote.delete(digest).await?;
            Ok(here || there)
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<(Digest, u64)>, StoreError>> {
        self.remote.list()
    }
}
