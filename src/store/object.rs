//! Blobs in an object store (S3 and what speaks it: AWS, MinIO, Garage, Ceph
//! RGW), through the `object_store` crate, as `<prefix>/blobs/sha256/<hex>`.
//! A blob is staged and verified on local disk first (as for `LocalStore`),
//! then uploaded whole: a single PUT, or a multipart upload that becomes
//! visible only when completed, so an interrupted upload never shows under a
//! digest.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload};

use super::{io_at, BlobStore, ByteStream, Staged, StoreError};
use crate::name::Digest;

/// Blobs up to this size go up in one PUT; larger ones in parts of this size
/// (S3's smallest part is 5 MiB), two at a time: an upload holds ~16 MiB.
const PART: usize = 8 << 20;
/// How long a metadata request (HEAD, a small GET, a PUT of a small object,
/// a DELETE, one LIST page) may take before the store counts as not answering.
pub const SMALL_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// The S3 settings of `--storage-backend s3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `http(s)://host:port` of an S3-compatible server; None: AWS.
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    /// Keys start with this (no leading or trailing slash; may be empty).
    pub prefix: String,
    /// Access key ID and secret; None (what the command line gives): from
    /// the AWS environment.
    pub credentials: Option<(String, String)>,
}

impl S3Config {
    /// Connects (lazily: nothing is sent until the first request) with the
    /// credentials of the usual AWS environment variables, path-style.
    pub fn connect(&self) -> Result<Arc<object_store::aws::AmazonS3>, StoreError> {
        use object_store::aws::AmazonS3Builder;
        use object_store::{BackoffConfig, ClientOptions, RetryConfig};
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_virtual_hosted_style_request(false)
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    // No deadline on a whole request: a blob streams from the
                    // bucket at its client's pace, which may be slow. Requests
                    // without a body to stream have their own (SMALL_OP_TIMEOUT);
                    // an upload is bounded by its build's timeout.
                    .with_timeout_disabled()
                    .with_allow_http(true),
            )
            // A store that is down is said so within seconds, not minutes.
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
            });
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some((id, secret)) = &self.credentials {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        let s3 = b
            .build()
            .map_err(|e| StoreError::remote("object store settings", e))?;
        Ok(Arc::new(s3))
    }
}

pub struct ObjectBlobStore {
    os: Arc<dyn ObjectStore>,
    prefix: String,
    staging: PathBuf,
    signer: Option<Arc<dyn object_store::signer::Signer>>,
}

/// An object store error, said the way an operator reads it.
pub(crate) fn remote(op: &str, key: &Key, e: object_store::Error) -> StoreError {
    StoreError::remote(format!("{op} {key}"), e)
}

/// Runs a small request with the store's deadline.
pub(crate) async fn small<T>(
    op: &str,
    key: &Key,
    f: impl std::future::Future<Output = object_store::Result<T>>,
) -> Result<object_store::Result<T>, StoreError> {
    tokio::time::timeout(SMALL_OP_TIMEOUT, f)
        .await
        .map_err(|_| {
            StoreError::remote(
                format!("{op} {key}"),
                format!("no answer within {}s", SMALL_OP_TIMEOUT.as_secs()),
            )
        })
}

/// Every object under `dir`, each page of the listing within the store's
/// deadline.
pub(crate) async fn list_all(
    os: &dyn ObjectStore,
    dir: &Key,
) -> Result<Vec<object_store::ObjectMeta>, StoreError> {
    let mut out = Vec::new();
    let mut listing = os.list(Some(dir));
    loop {
        let next = tokio::time::timeout(SMALL_OP_TIMEOUT, listing.next())
            .await
            .map_err(|_| {
                StoreError::remote(
                    format!("LIST {dir}"),
                    format!("no answer within {}s", SMALL_OP_TIMEOUT.as_secs()),
                )
            })?;
        match next {
            None => return Ok(out),
            Some(meta) => out.push(meta.map_err(|e| remote("LIST", dir, e))?),
        }
    }
}

impl ObjectBlobStore {
    /// Blobs under `prefix` in `os`, staged in `staging` (created).
    pub fn new(os: Arc<dyn ObjectStore>, prefix: &str, staging: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(staging).map_err(io_at(staging))?;
        Ok(ObjectBlobStore {
            os,
            prefix: prefix.trim_matches('/').to_string(),
            staging: staging.to_path_buf(),
            signer: None,
        })
    }

    /// Signs presigned URLs of blobs with `signer` (the S3 client).
    pub fn with_signer(mut self, signer: Arc<dyn object_store::signer::Signer>) -> Self {
        self.signer = Some(signer);
        self
    }

    fn key(&self, digest: &Digest) -> Key {
        self.under(&format!("blobs/sha256/{}", digest.hex()))
    }

    /// A key under this store's prefix.
    pub fn under(&self, rest: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rest)
        } else {
            Key::from(format!("{}/{rest}", self.prefix))
        }
    }

    /// Writes and removes a small object, so that a bucket that does not
    /// exist or credentials it refuses are said at start, not at the first
    /// pull. Ok(false): the store did not answer (it may come back; requests
    /// fail with 503 meanwhile); Err: it answered no.
    pub async fn probe(&self, instance: &str) -> Result<bool, StoreError> {
        let key = self.under(&format!("probe/{instance}"));
        let put = small(
            "PUT",
            &key,
            self.os.put(&key, PutPayload::from_static(b"ok")),
        )
        .await;
        let answer = match put {
            Err(_) => return Ok(false),
            Ok(r) => r,
        };
        match answer {
            Ok(_) => {
                let _ = small("DELETE", &key, self.os.delete(&key)).await;
                Ok(true)
            }
            // No HTTP answer at all: down or unreachable for now.
            Err(e) if e.to_string().contains("error sending request") => Ok(false),
            Err(e) => Err(remote("PUT", &key, e)),
        }
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.os
    }

    /// A URL that fetches the blob without credentials for `ttl`, if the
    /// store can sign one (S3 can).
    pub async fn signed_url(&self, digest: &Digest, ttl: Duration) -> Option<String> {
        self.signer
            .as_ref()?
            .signed_url(http::Method::GET, &self.key(digest), ttl)
            .await
            .ok()
            .map(|u| u.to_string())
    }

    /// Uploads a staged blob under its digest, unless it is there already
    /// (content-addressed: one already there is this very blob).
    pub async fn upload_staged(&self, staged: &Staged) -> Result<(), StoreError> {
        let key = self.key(&staged.digest);
        if self.stat(&staged.digest).await? != Some(staged.size) {
            self.upload(staged, &key).await?;
        }
        Ok(())
    }

    async fn upload(&self, staged: &Staged, key: &Key) -> Result<(), StoreError> {
        let path = staged.file.path().to_path_buf();
        if staged.size as usize <= PART {
            let bytes = tokio::fs::read(&path).await.map_err(io_at(&path))?;
            // The client's own deadline: a body can take a while on a slow link.
            return self
                .os
                .put(key, PutPayload::from(bytes))
                .await
                .map(|_| ())
                .map_err(|e| remote("PUT", key, e));
        }
        let upload = self
            .os
            .put_multipart(key)
            .await
            .map_err(|e| remote("starting the upload of", key, e))?;
        let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, PART);
        let mut file = std::fs::File::open(&path).map_err(io_at(&path))?;
        let mut buf = vec![0u8; PART];
        let result: Result<(), StoreError> = async {
            loop {
                // Two parts in flight at most: memory stays ~2 parts.
                w.wait_for_capacity(2)
                    .await
                    .map_err(|e| remote("uploading", key, e))?;
                let n = read_full(&mut file, &mut buf).map_err(io_at(&path))?;
                if n == 0 {
                    break;
                }
                w.write(&buf[..n]);
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => w
                .finish()
                .await
                .map(|_| ())
                .map_err(|e| remote("completing the upload of", key, e)),
            Err(e) => {
                // Nothing shows under the key; the parts are dropped.
                let _ = w.abort().await;
                Err(e)
            }
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

impl BlobStore for ObjectBlobStore {
    fn staging_dir(&self) -> &Path {
        &self.staging
    }

    fn stat<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let key = self.key(digest);
            match small("HEAD", &key, self.os.head(&key)).await? {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(remote("HEAD", &key, e)),
            }
        })
    }

    fn get<'a>(
        &'a self,
        digest: &'a Digest,
        range: Option<(u64, u64)>,
    ) -> BoxFuture<'a, Result<Option<ByteStream>, StoreError>> {
        Box::pin(async move {
            let key = self.key(digest);
            if range.is_some_and(|(a, b)| a >= b) {
                return Ok(Some(Box::pin(futures::stream::empty()) as ByteStream));
            }
            let opts = GetOptions {
                range: range.map(|(a, b)| GetRange::Bounded(a..b)),
                ..Default::default()
            };
            // The response's head within the deadline; its body as it comes.
            let got = match small("GET", &key, self.os.get_opts(&key, opts)).await? {
                Ok(g) => g,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(remote("GET", &key, e)),
            };
            let k = key.clone();
            let stream = got
                .into_stream()
                .map_err(move |e| std::io::Error::other(remote("reading", &k, e)));
            Ok(Some(Box::pin(stream) as ByteStream))
        })
    }

    fn put(&self, staged: Staged) -> BoxFuture<'_, Result<Digest, StoreError>> {
        Box::pin(async move {
            self.upload_staged(&staged).await?;
            Ok(staged.digest.clone())
        })
    }

    fn delete<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let key = self.key(digest);
            // S3 answers a DELETE the same whether the object was there.
            if self.stat(digest).await?.is_none() {
                return Ok(false);
            }
            match small("DELETE", &key, self.os.delete(&key)).await? {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
                Err(e) => Err(remote("DELETE", &key, e)),
            }
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<(Digest, u64)>, StoreError>> {
        Box::pin(async move {
            let dir = self.under("blobs/sha256");
            let mut out: Vec<(Digest, u64)> = list_all(&*self.os, &dir)
                .await?
                .into_iter()
                .filter_map(|meta| {
                    let name = meta.location.filename()?;
                    // Only objects named by a digest are blobs.
                    let d = format!("sha256:{name}").parse::<Digest>().ok()?;
                    Some((d, meta.size))
                })
                .collect();
            out.sort();
            Ok(out)
        })
    }
}
