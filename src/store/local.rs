//! Blobs as files under `<root>/blobs/sha256/<hex>`, staged in `<root>/tmp`
//! and renamed into place (after an fsync) once complete and verified.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;

use super::{io_at, BlobStore, ByteStream, Staged, StoreError};
use crate::name::Digest;

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

    /// Reads every blob and removes those whose content does not match their
    /// name (a disk error, a hand edit), so that they are made again rather
    /// than served. Returns (checked, removed).
    pub fn scrub(&self) -> io::Result<(usize, Vec<Digest>)> {
        use sha2::Digest as _;
        let mut checked = 0;
        let mut removed = Vec::new();
        for e in std::fs::read_dir(&self.blobs)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(expected) = format!("sha256:{name}").parse::<Digest>() else {
                continue;
            };
            let mut f = match std::fs::File::open(e.path()) {
                Ok(f) => f,
                Err(_) => continue, // removed meanwhile
            };
            let mut h = sha2::Sha256::new();
            if io::copy(&mut f, &mut h).is_err() {
                continue;
            }
            checked += 1;
            if Digest::from_sha256(h.finalize().into()) != expected {
                tracing::warn!(blob = %expected, "a stored blob does not match its digest; removed, it will be made again");
                let _ = std::fs::remove_file(e.path());
                removed.push(expected);
            }
        }
        Ok((checked, removed))
    }
}

impl BlobStore for LocalStore {
    fn staging_dir(&self) -> &Path {
        &self.tmp
    }

    fn stat<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let p = self.blob_path(digest);
            match tokio::fs::metadata(&p).await {
                Ok(m) => Ok(Some(m.len())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_at(&p)(e)),
            }
        })
    }

    fn get<'a>(
        &'a self,
        digest: &'a Digest,
        range: Option<(u64, u64)>,
    ) -> BoxFuture<'a, Result<Option<ByteStream>, StoreError>> {
        Box::pin(async move {
            use tokio::io::{AsyncReadExt, AsyncSeekExt};
            let p = self.blob_path(digest);
            let mut f = match tokio::fs::File::open(&p).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_at(&p)(e)),
            };
            let (start, end) = match range {
                Some(r) => r,
                None => (0, f.metadata().await.map_err(io_at(&p))?.len()),
            };
            if start > 0 {
                f.seek(io::SeekFrom::Start(start))
                    .await
                    .map_err(io_at(&p))?;
            }
            let stream = tokio_util::io::ReaderStream::with_capacity(
                f.take(end.saturating_sub(start)),
                read_chunk(),
            );
            Ok(Some(Box::pin(Counted::new(stream)) as ByteStream))
        })
    }

    fn put(&self, staged: Staged) -> BoxFuture<'_, Result<Digest, StoreError>> {
        let blobs = self.blobs.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let Staged { file, digest, .. } = staged;
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
                Ok(digest)
            })
            .await
            .map_err(|e| StoreError::Io {
                path: "<put>".into(),
                source: io::Error::other(e.to_string()),
            })?
        })
    }

    fn delete<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let p = self.blob_path(digest);
            match tokio::fs::remove_file(&p).await {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io_at(&p)(e)),
            }
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<(Digest, u64)>, StoreError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let mut dir = tokio::fs::read_dir(&self.blobs)
                .await
                .map_err(io_at(&self.blobs))?;
            while let Some(e) = dir.next_entry().await.map_err(io_at(&self.blobs))? {
                let name = e.file_name().to_string_lossy().into_owned();
                // Only files named by a digest are blobs.
                if let Ok(d) = format!("sha256:{name}").parse::<Digest>() {
                    let size = e.metadata().await.map_err(io_at(&e.path()))?.len();
                    out.push((d, size));
                }
            }
            out.sort();
            Ok(out)
        })
    }
}

/// Downloads streaming now, in this process.
static STREAMING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Bytes read per chunk of a download: large while few downloads run (fewer
/// reads and writes, faster), smaller as more run, so that all of them
/// together hold about `READ_BUDGET` in chunks (each chunk is in about three
/// places at once: the file's buffer, the stream's, the connection's queue),
/// whatever their number. Measured: 1,000 stalled downloads of a 64 MiB blob
/// take the server from 16 to 152 MiB (tests/clients.rs).
fn read_chunk() -> usize {
    const READ_BUDGET: usize = 8 << 20;
    let n = STREAMING.load(std::sync::atomic::Ordering::Relaxed) + 1;
    (READ_BUDGET / n).clamp(16 << 10, 256 << 10)
}

/// A download's stream, counted while it lives.
struct Counted<S>(S);

impl<S> Counted<S> {
    fn new(s: S) -> Self {
        STREAMING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Counted(s)
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        STREAMING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<S: futures::Stream + Unpin> futures::Stream for Counted<S> {
    type Item = S::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        std::pin::Pin::new(&mut self.0).poll_next(cx)
    }
}

/// The filesystem holding `path`, as statvfs reports it.
fn statvfs(path: &Path) -> Option<libc::statvfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then_some(st)
}

/// Bytes free for this process on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    statvfs(path).map(|st| st.f_bavail * st.f_frsize)
}

/// Size of the filesystem holding `path`.
pub fn total_bytes(path: &Path) -> Option<u64> {
    statvfs(path).map(|st| st.f_blocks * st.f_frsize)
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

    #[tokio::test]
    async fn local_store_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        crate::store::conformance::run(&store).await;
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
