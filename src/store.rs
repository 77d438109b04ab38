//! Content-addressed blob storage. A blob is written to a temporary name and
//! renamed to its digest only once the bytes are verified, so an interrupted
//! write never becomes a served blob. Local disk is the one backend today; the
//! `BlobStore` trait is the seam for object storage.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;

use crate::name::Digest;
use crate::oci::HashingWriter;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob store I/O at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// A blob being written: bytes go in through `Write`, `commit` verifies and
/// publishes it. Dropping it uncommitted discards it.
pub trait BlobWriter: Write + Send {
    fn commit(self: Box<Self>, expected: Option<&Digest>) -> Result<(Digest, u64), StoreError>;
}

/// Storage of blobs by digest.
pub trait BlobStore: Send + Sync + 'static {
    /// Size of a stored blob, or None.
    fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError>;
    /// Starts writing a new blob.
    fn writer(&self) -> Result<Box<dyn BlobWriter>, StoreError>;
    /// Reads `range` (start, end exclusive) of a blob, or None if absent.
    fn read(
        &self,
        digest: &Digest,
        range: (u64, u64),
    ) -> Pin<
        Box<dyn std::future::Future<Output = Result<Option<ByteStream>, StoreError>> + Send + '_>,
    >;
    /// Reads a whole small blob (manifests, configs) into memory.
    fn read_small(&self, digest: &Digest, limit: u64) -> Result<Option<Vec<u8>>, StoreError>;

    /// Stores bytes already in memory.
    fn put(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let mut w = self.writer()?;
        w.write_all(bytes).map_err(|e| StoreError::Io {
            path: "<blob writer>".into(),
            source: e,
        })?;
        Ok(w.commit(Some(&Digest::of(bytes)))?.0)
    }
}

/// Blobs as files under `<root>/blobs/sha256/<hex>`, temporaries in `<root>/tmp`.
pub struct LocalStore {
    blobs: PathBuf,
    tmp: PathBuf,
}

impl LocalStore {
    /// Opens (creating) the store and removes temporaries a crash left behind.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let blobs = root.join("blobs/sha256");
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&blobs).map_err(io_at(&blobs))?;
        std::fs::create_dir_all(&tmp).map_err(io_at(&tmp))?;
        // Temporaries are named blob-<pid>-...: those of a process that is
        // gone were cut off by a crash; those of a live one (a `nixery build`
        // next to a running server) are still being written.
        for entry in std::fs::read_dir(&tmp).map_err(io_at(&tmp))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("blob-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<i32>().ok());
            if !pid.is_some_and(process_alive) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(io_at(&path))?;
            }
        }
        Ok(Self { blobs, tmp })
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.hex())
    }
}

struct LocalWriter {
    inner: HashingWriter<io::BufWriter<tempfile::NamedTempFile>>,
    blobs: PathBuf,
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl BlobWriter for LocalWriter {
    fn commit(self: Box<Self>, expected: Option<&Digest>) -> Result<(Digest, u64), StoreError> {
        let LocalWriter { inner, blobs } = *self;
        let (buf, digest, size) = inner.finish();
        let file = buf.into_inner().map_err(|e| StoreError::Io {
            path: blobs.clone(),
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
        let tmp_path = file.path().to_path_buf();
        file.as_file().sync_all().map_err(io_at(&tmp_path))?;
        let dest = blobs.join(digest.hex());
        file.persist(&dest).map_err(|e| StoreError::Io {
            path: dest.clone(),
            source: e.error,
        })?;
        // Make the rename itself durable.
        if let Ok(dir) = std::fs::File::open(&blobs) {
            let _ = dir.sync_all();
        }
        Ok((digest, size))
    }
}

impl BlobStore for LocalStore {
    fn stat(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let p = self.blob_path(digest);
        match std::fs::metadata(&p) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_at(&p)(e)),
        }
    }

    fn writer(&self) -> Result<Box<dyn BlobWriter>, StoreError> {
        let file = tempfile::Builder::new()
            .prefix(&format!("blob-{}-", std::process::id()))
            .tempfile_in(&self.tmp)
            .map_err(io_at(&self.tmp))?;
        Ok(Box::new(LocalWriter {
            inner: HashingWriter::new(io::BufWriter::with_capacity(256 * 1024, file)),
            blobs: self.blobs.clone(),
        }))
    }

    fn read(
        &self,
        digest: &Digest,
        (start, end): (u64, u64),
    ) -> Pin<
        Box<dyn std::future::Future<Output = Result<Option<ByteStream>, StoreError>> + Send + '_>,
    > {
        let p = self.blob_path(digest);
        Box::pin(async move {
            use tokio::io::{AsyncReadExt, AsyncSeekExt};
            let mut f = match tokio::fs::File::open(&p).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_at(&p)(e)),
            };
            if start > 0 {
                f.seek(io::SeekFrom::Start(start))
                    .await
                    .map_err(io_at(&p))?;
            }
            let stream =
                tokio_util::io::ReaderStream::with_capacity(f.take(end - start), 256 * 1024);
            Ok(Some(Box::pin(stream) as ByteStream))
        })
    }

    fn read_small(&self, digest: &Digest, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match self.stat(digest)? {
            None => Ok(None),
            Some(size) if size > limit => Ok(None),
            Some(_) => {
                let p = self.blob_path(digest);
                std::fs::read(&p).map(Some).map_err(io_at(&p))
            }
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Writes a small file atomically (temp file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut f = tempfile::NamedTempFile::new_in(dir)?;
    f.write_all(bytes)?;
    f.as_file().sync_all()?;
    f.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    async fn read_all(store: &dyn BlobStore, d: &Digest, range: (u64, u64)) -> Option<Vec<u8>> {
        let mut s = store.read(d, range).await.unwrap()?;
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        Some(out)
    }

    /// The contract every BlobStore implementation must meet.
    async fn conformance(store: &dyn BlobStore) {
        let data = b"hello blob store".to_vec();
        let d = store.put(&data).unwrap();
        assert_eq!(d, Digest::of(&data));
        assert_eq!(store.stat(&d).unwrap(), Some(data.len() as u64));
        assert_eq!(
            read_all(store, &d, (0, data.len() as u64)).await.unwrap(),
            data
        );
        assert_eq!(read_all(store, &d, (6, 10)).await.unwrap(), b"blob");
        assert_eq!(store.read_small(&d, 1024).unwrap().unwrap(), data);
        assert_eq!(store.read_small(&d, 3).unwrap(), None);
        // Writing the same blob twice is fine.
        assert_eq!(store.put(&data).unwrap(), d);

        // A wrong expected digest never publishes the blob.
        let mut w = store.writer().unwrap();
        w.write_all(b"other bytes").unwrap();
        let wrong = Digest::of(b"something else");
        assert!(matches!(
            w.commit(Some(&wrong)),
            Err(StoreError::DigestMismatch { .. })
        ));
        assert_eq!(store.stat(&wrong).unwrap(), None);
        assert_eq!(store.stat(&Digest::of(b"other bytes")).unwrap(), None);

        // An abandoned writer leaves nothing behind.
        let mut w = store.writer().unwrap();
        w.write_all(b"abandoned").unwrap();
        drop(w);
        assert_eq!(store.stat(&Digest::of(b"abandoned")).unwrap(), None);
        assert!(read_all(store, &Digest::of(b"absent"), (0, 1))
            .await
            .is_none());
    }

    #[tokio::test]
    async fn local_store_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        conformance(&store).await;
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0,
            "no temporaries left"
        );
    }

    #[test]
    fn temporaries_of_dead_processes_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        // A process that is gone, and a name we did not write.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::write(tmp.join(format!("blob-{dead}-abc")), b"partial").unwrap();
        std::fs::write(tmp.join("blob-half-written"), b"partial").unwrap();
        // A live writer's temporary (this process) is left alone.
        let live = tmp.join(format!("blob-{}-xyz", std::process::id()));
        std::fs::write(&live, b"in progress").unwrap();
        LocalStore::open(dir.path()).unwrap();
        let left: Vec<_> = std::fs::read_dir(&tmp)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert_eq!(left, vec![live]);
    }
}
