//! Instances that share one bucket: which images exist (the shared index),
//! and who builds one now (build leases).
//!
//! The index maps a request key (package source and revision, names, tag,
//! arch, config, and every setting that shapes an image) to the image it
//! resolved to, as `<prefix>/index/<key>.json`. It is written only after all
//! of the image's blobs are in the bucket, so an instance that reads it can
//! serve the image at once, without Nix.
//!
//! A build lease keeps two instances from building one image at once. It is
//! a claim object, `<prefix>/leases/<key>/<instance>`, renewed while the
//! build runs and deleted when it ends; a claim not renewed within the lease
//! TTL (its builder died) counts for nothing. Conditional writes
//! (`If-None-Match: *`) are not used, because not every S3 server honours
//! them (Garage 2.5 accepts the header and ignores it: a lock built on it
//! would always be granted). Instead an instance takes the lease by writing
//! its claim and then listing the claims: it holds the lease only if its
//! claim is the only live one; if another claim is there too, it withdraws
//! its own and tries again after a random pause. Two instances cannot both
//! see themselves alone, given read-after-write consistent listing (AWS S3,
//! Garage, MinIO and Ceph RGW give it): whichever lists second sees the
//! other's claim. The cost is that two instances racing may both withdraw
//! and retry. Clocks of instances must agree within a small part of the TTL.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload};

use crate::name::Digest;
use crate::store::object::{list_all, remote, small, SMALL_OP_TIMEOUT};
use crate::store::StoreError;

/// One image in the shared index.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub image_key: String,
    pub oci_digest: Digest,
    pub docker_digest: Digest,
    pub layers: usize,
    pub size: u64,
    /// The store paths it was built from (on its builder).
    pub roots: Vec<String>,
    /// When built (seconds since the epoch).
    pub built: u64,
    /// Until when the request resolves to it (seconds since the epoch), for
    /// sources that can move; None: for good.
    pub expires: Option<u64>,
    /// The instance that built it.
    pub builder: String,
    /// Manifests attached to it (SBOMs, provenance, signatures).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attached: Vec<Digest>,
}

pub struct Shared {
    os: Arc<dyn ObjectStore>,
    prefix: String,
    /// This instance's name in claims: host, process and a random part.
    instance: String,
    lease_ttl: Duration,
}

/// The outcome of one attempt at a build lease.
pub enum Attempt {
    /// This instance holds the lease until the `Lease` is dropped.
    Won(Lease),
    /// Another instance holds it (its name).
    Held(String),
    /// Another instance tried at the same moment; both withdrew.
    Contended,
}

/// A held build lease: renewed in the background, released when dropped.
pub struct Lease {
    renew: tokio::task::JoinHandle<()>,
    os: Arc<dyn ObjectStore>,
    claim: Key,
}

impl Lease {
    /// Stops renewing without releasing, as a holder that crashed does
    /// (for tests).
    pub fn abandon(self) {
        self.renew.abort();
        std::mem::forget(self);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
        let (os, claim) = (self.os.clone(), self.claim.clone());
        // Released now if the store answers; else it expires.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = tokio::time::timeout(SMALL_OP_TIMEOUT, os.delete(&claim)).await;
            });
        }
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

pub fn now_secs() -> u64 {
    now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Shared {
    pub fn new(os: Arc<dyn ObjectStore>, prefix: &str, lease_ttl: Duration) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        let random = random_u64();
        let safe: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Shared {
            os,
            prefix: prefix.trim_matches('/').to_string(),
            instance: format!("{safe}-{}-{random:016x}", std::process::id()),
            lease_ttl,
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    fn key(&self, rest: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rest)
        } else {
            Key::from(format!("{}/{rest}", self.prefix))
        }
    }

    /// The image a request resolves to, if an instance built it and the
    /// answer still holds.
    pub async fn lookup(&self, request: &str) -> Result<Option<Record>, StoreError> {
        let key = self.key(&format!("index/{request}.json"));
        let got = match small("GET", &key, self.os.get(&key)).await? {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(remote("GET", &key, e)),
        };
        let bytes = small("GET", &key, got.bytes())
            .await?
            .map_err(|e| remote("GET", &key, e))?;
        match serde_json::from_slice::<Record>(&bytes) {
            Ok(r) if r.expires.is_some_and(|t| now_secs() >= t) => Ok(None),
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                // Unreadable (another version's format): built again.
                tracing::warn!(key = %key, error = %e, "an index record is unreadable; ignoring it");
                Ok(None)
            }
        }
    }

    /// Records the image a request resolves to (its blobs already stored).
    pub async fn publish(&self, request: &str, record: &Record) -> Result<(), StoreError> {
        let key = self.key(&format!("index/{request}.json"));
        let body = serde_json::to_vec_pretty(record).expect("serialisable");
        small("PUT", &key, self.os.put(&key, PutPayload::from(body)))
            .await?
            .map(|_| ())
            .map_err(|e| remote("PUT", &key, e))
    }

    /// Live claims on a key's lease (instance names), removing dead ones.
    async fn live_claims(&self, dir: &Key) -> Result<Vec<String>, StoreError> {
        let mut live = Vec::new();
        for meta in list_all(&*self.os, dir).await? {
            let Some(name) = meta.location.filename().map(str::to_string) else {
                continue;
            };
            let age = now()
                .duration_since(meta.last_modified.into())
                .unwrap_or_default();
            if age > self.lease_ttl {
                // Its builder stopped renewing: gone, or cut off.
                tracing::info!(claim = %meta.location, age_s = age.as_secs(), "removing an expired build lease");
                let _ = small("DELETE", &meta.location, self.os.delete(&meta.location)).await;
            } else {
                live.push(name);
            }
        }
        Ok(live)
    }

    /// One attempt at the build lease of a request key.
    pub async fn try_lease(&self, request: &str) -> Result<Attempt, StoreError> {
        let dir = self.key(&format!("leases/{request}"));
        let claim = self.key(&format!("leases/{request}/{}", self.instance));
        let others: Vec<String> = self
            .live_claims(&dir)
            .await?
            .into_iter()
            .filter(|c| *c != self.instance)
            .collect();
        if let Some(holder) = others.into_iter().next() {
            return Ok(Attempt::Held(holder));
        }
        let body = PutPayload::from(self.instance.clone().into_bytes());
        small("PUT", &claim, self.os.put(&claim, body.clone()))
            .await?
            .map_err(|e| remote("PUT", &claim, e))?;
        let live = self.live_claims(&dir).await?;
        if live.len() == 1 && live[0] == self.instance {
            let (os, c, every) = (self.os.clone(), claim.clone(), self.lease_ttl / 3);
            let renew = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match small("PUT", &c, os.put(&c, body.clone())).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(claim = %c, error = %e, "renewing a build lease")
                        }
                        Err(e) => tracing::warn!(claim = %c, error = %e, "renewing a build lease"),
                    }
                }
            });
            return Ok(Attempt::Won(Lease {
                renew,
                os: self.os.clone(),
                claim,
            }));
        }
        // Someone else claimed at the same moment: withdraw, and let the
        // caller pause for a random while.
        let _ = small("DELETE", &claim, self.os.delete(&claim)).await;
        Ok(Attempt::Contended)
    }
}

/// A random pause between `lo` and `hi`, for retries that must not meet again.
pub fn jitter(lo: Duration, hi: Duration) -> Duration {
    let span = hi.saturating_sub(lo).as_millis().max(1) as u64;
    lo + Duration::from_millis(random_u64() % span)
}

/// A random number (std's randomly keyed hasher over the time; no crate
/// needed for names and pauses).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}
