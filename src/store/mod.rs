//! Content-addressed blob storage behind one async trait: stat, get (with a
//! byte range), put, delete, list. A blob is first written to local staging
//! (`Stager`), where its digest is computed as it is written and checked; only
//! a verified, complete blob is ever `put`, so an interrupted write never
//! becomes a served blob, whatever the backend. `LocalStore` keeps blobs on
//! disk, `ObjectBlobStore` in an S3 bucket, `CachedStore` is a local cache in
//! front of a bucket. Every implementation passes `conformance`.

mod cached;
mod local;
pub(crate) mod object;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt};

pub use cached::CachedStore;
pub use local::{free_bytes, total_bytes, write_atomic, LocalStore};
pub use object::{ObjectBlobStore, S3Config};

use crate::name::Digest;
use crate::oci::HashingWriter;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    /// The object store failed or did not answer: what was asked (said to
    /// clients) and the store's answer (logged).
    #[error("object store: {what}: {detail}")]
    Remote { what: String, detail: String },
    #[error("blob store I/O at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Object store requests that failed or went unanswered, in this process
/// (`nixery_object_store_errors_total`).
pub static REMOTE_ERRORS: std::sync::LazyLock<prometheus_client::metrics::counter::Counter> =
    std::sync::LazyLock::new(Default::default);

impl StoreError {
    pub(crate) fn remote(what: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        REMOTE_ERRORS.inc();
        StoreError::Remote {
            what: what.into(),
            detail: detail.to_string(),
        }
    }
}

pub(crate) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// A complete blob on local staging, its digest computed as it was written
/// (and checked against the digest its writer expected): what `put` takes.
pub struct Staged {
    pub(crate) file: tempfile::NamedTempFile,
    pub digest: Digest,
    pub size: u64,
}

/// Writes a blob to staging. Dropping it unfinished discards it.
pub struct Stager {
    inner: HashingWriter<io::BufWriter<tempfile::NamedTempFile>>,
}

impl Stager {
    /// A new blob in `dir`, named `blob-<pid>-...` so that a restart can tell
    /// a crashed writer's temporaries from a live one's.
    pub fn new(dir: &Path) -> Result<Self, StoreError> {
        let file = tempfile::Builder::new()
            .prefix(&format!("blob-{}-", std::process::id()))
            .tempfile_in(dir)
            .map_err(io_at(dir))?;
        Ok(Stager {
            inner: HashingWriter::new(io::BufWriter::with_capacity(256 * 1024, file)),
        })
    }

    /// Ends the blob; with `expected`, its digest must be that one.
    pub fn finish(self, expected: Option<&Digest>) -> Result<Staged, StoreError> {
        let (buf, digest, size) = self.inner.finish();
        let file = buf.into_inner().map_err(|e| StoreError::Io {
            path: "<staging>".into(),
            source: e.into_error(),
        })?;
        if let Some(expected) = expected {
            if *expected != digest {
                return Err(StoreError::DigestMismatch {
                    expected: expected.clone(),
                    actual: digest,
                });
            }
        }
        Ok(Staged { file, digest, size })
    }
}

impl Write for Stager {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Storage of blobs by digest.
pub trait BlobStore: Send + Sync + 'static {
    /// Where blobs are staged before `put` (local disk).
    fn staging_dir(&self) -> &Path;
    /// Size of a stored blob, or None.
    fn stat<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Result<Option<u64>, StoreError>>;
    /// A blob's bytes (`range`: start, end exclusive), or None if absent.
    fn get<'a>(
        &'a self,
        digest: &'a Digest,
        range: Option<(u64, u64)>,
    ) -> BoxFuture<'a, Result<Option<ByteStream>, StoreError>>;
    /// A blob's bytes for a client's socket, and only for that: a store may
    /// hand out memory that only the kernel should read (a mapped file), so
    /// nothing in this process may look at these bytes. Same as `get` unless
    /// a store does better.
    fn send<'a>(
        &'a self,
        digest: &'a Digest,
        range: Option<(u64, u64)>,
    ) -> BoxFuture<'a, Result<Option<ByteStream>, StoreError>> {
        self.get(digest, range)
    }
    /// Stores a staged blob under its digest; storing one that exists is fine.
    fn put(&self, staged: Staged) -> BoxFuture<'_, Result<Digest, StoreError>>;
    /// Removes a blob; false if it was not there.
    fn delete<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Every stored blob, with its size.
    fn list(&self) -> BoxFuture<'_, Result<Vec<(Digest, u64)>, StoreError>>;
}

/// Copies a blob from `from` into verified staging in `dir`, ready to `put`
/// into another store (None: `from` lacks it). Its digest is checked, so a
/// corrupt copy is never staged.
pub async fn stage_copy(
    from: &dyn BlobStore,
    digest: &Digest,
    dir: &Path,
) -> Result<Option<Staged>, StoreError> {
    let Some(mut stream) = from.get(digest, None).await? else {
        return Ok(None);
    };
    let mut w = Stager::new(dir)?;
    while let Some(chunk) = stream.next().await {
        w.write_all(&chunk.map_err(io_at(dir))?)
            .map_err(io_at(dir))?;
    }
    w.finish(Some(digest)).map(Some)
}

/// Stores bytes already in memory (configs, manifests).
pub async fn put_bytes(store: &dyn BlobStore, bytes: &[u8]) -> Result<Digest, StoreError> {
    let mut s = Stager::new(store.staging_dir())?;
    s.write_all(bytes).map_err(io_at(store.staging_dir()))?;
    store.put(s.finish(Some(&Digest::of(bytes)))?).await
}

/// A whole small blob (manifests, configs), or None if absent or over `limit`.
pub async fn get_small(
    store: &dyn BlobStore,
    digest: &Digest,
    limit: u64,
) -> Result<Option<Vec<u8>>, StoreError> {
    match store.stat(digest).await? {
        Some(size) if size <= limit => {}
        _ => return Ok(None),
    }
    let Some(mut stream) = store.get(digest, None).await? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.map_err(|e| StoreError::Io {
            path: digest.hex().into(),
            source: e,
        })?);
    }
    Ok(Some(out))
}

/// The contract every BlobStore implementation must meet.
pub mod conformance {
    use super::*;

    /// A whole blob, or its `range` (None: absent); panics on a store error.
    pub async fn read_all(
        store: &dyn BlobStore,
        d: &Digest,
        range: Option<(u64, u64)>,
    ) -> Option<Vec<u8>> {
        Some(drain(store.get(d, range).await.unwrap()?).await)
    }

    /// The same through `send`, the path to a client's socket.
    pub async fn sent_all(
        store: &dyn BlobStore,
        d: &Digest,
        range: Option<(u64, u64)>,
    ) -> Option<Vec<u8>> {
        Some(drain(store.send(d, range).await.unwrap()?).await)
    }

    async fn drain(mut s: ByteStream) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    }

    /// Runs the whole contract against an empty store.
    pub async fn run(store: &dyn BlobStore) {
        assert!(store.list().await.unwrap().is_empty(), "start empty");
        let data = b"hello blob store".to_vec();
        let d = put_bytes(store, &data).await.unwrap();
        assert_eq!(d, Digest::of(&data));
        assert_eq!(store.stat(&d).await.unwrap(), Some(data.len() as u64));
        assert_eq!(read_all(store, &d, None).await.unwrap(), data);
        assert_eq!(read_all(store, &d, Some((6, 10))).await.unwrap(), b"blob");
        assert_eq!(get_small(store, &d, 1024).await.unwrap().unwrap(), data);
        assert_eq!(get_small(store, &d, 3).await.unwrap(), None);
        // Writing the same blob twice is fine.
        assert_eq!(put_bytes(store, &data).await.unwrap(), d);
        assert_eq!(
            store.list().await.unwrap(),
            vec![(d.clone(), data.len() as u64)]
        );

        // A wrong expected digest never stages the blob, so it is never put.
        let mut w = Stager::new(store.staging_dir()).unwrap();
        w.write_all(b"other bytes").unwrap();
        let wrong = Digest::of(b"something else");
        assert!(matches!(
            w.finish(Some(&wrong)),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert_eq!(store.stat(&wrong).await.unwrap(), None);
        assert_eq!(store.stat(&Digest::of(b"other bytes")).await.unwrap(), None);

        // An abandoned writer leaves nothing behind.
        let mut w = Stager::new(store.staging_dir()).unwrap();
        w.write_all(b"abandoned").unwrap();
        drop(w);
        assert_eq!(store.stat(&Digest::of(b"abandoned")).await.unwrap(), None);
        assert!(read_all(store, &Digest::of(b"absent"), None)
            .await
            .is_none());

        // A large blob streams whole, and by range across chunk boundaries.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let bd = put_bytes(store, &big).await.unwrap();
        assert_eq!(read_all(store, &bd, None).await.unwrap(), big);
        assert_eq!(
            read_all(store, &bd, Some((262_000, 1_300_000)))
                .await
                .unwrap(),
            &big[262_000..1_300_000]
        );
        // `send` gives the same bytes as `get`, whole and by range (across
        // its chunks too), nothing for an absent blob, and an empty blob.
        assert_eq!(sent_all(store, &bd, None).await.unwrap(), big);
        assert_eq!(
            sent_all(store, &bd, Some((262_000, 2_300_001)))
                .await
                .unwrap(),
            &big[262_000..2_300_001]
        );
        assert_eq!(sent_all(store, &d, Some((6, 10))).await.unwrap(), b"blob");
        assert!(sent_all(store, &Digest::of(b"absent"), None)
            .await
            .is_none());
        let empty = put_bytes(store, b"").await.unwrap();
        assert_eq!(sent_all(store, &empty, None).await.unwrap(), b"");
        assert!(store.delete(&empty).await.unwrap());
        // A blob removed while it is being sent (the GC) is sent whole.
        let mut s = store.send(&bd, None).await.unwrap().unwrap();
        let mut out = s.next().await.unwrap().unwrap().to_vec();
        assert!(store.delete(&bd).await.unwrap());
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(out, big);
        let bd = put_bytes(store, &big).await.unwrap();

        // Delete: gone, and deleting again says so.
        assert!(store.delete(&d).await.unwrap());
        assert!(!store.delete(&d).await.unwrap());
        assert_eq!(store.stat(&d).await.unwrap(), None);
        assert_eq!(store.list().await.unwrap(), vec![(bd, big.len() as u64)]);
    }
}
