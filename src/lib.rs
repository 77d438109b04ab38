//! Nixery: container images built by Nix on demand, served by a read-only OCI
//! registry, and declared in Kubernetes as NixImage objects.

pub mod archive;
pub mod attest;
pub mod builder;
pub mod catalog;
pub mod config;
pub mod cri;
pub mod gc;
pub mod image;
pub mod k8s;
pub mod layers;
pub mod metrics;
pub mod name;
pub mod nix;
pub mod oci;
pub mod registry;
pub mod shared;
pub mod store;
pub mod telemetry;

use std::sync::Arc;

use crate::builder::{Builder, BuilderConfig};
use crate::catalog::Catalog;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::registry::AppState;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("opening the blob store")]
    Store(#[from] store::StoreError),
    #[error("preparing the state directory {0}: {1}")]
    StateDir(std::path::PathBuf, #[source] std::io::Error),
    #[error("listening on {0}: {1}")]
    Listen(std::net::SocketAddr, #[source] std::io::Error),
    #[error("serving: {0}")]
    Serve(#[source] std::io::Error),
}

/// Builds the shared state of a registry from settings, with the host's Nix.
pub async fn app_state(settings: &Settings) -> Result<AppState, Error> {
    std::fs::create_dir_all(&settings.state_dir)
        .map_err(|e| Error::StateDir(settings.state_dir.clone(), e))?;
    let nix = Arc::new(
        nix::NixCli::new(&settings.state_dir, settings.nix_options.clone())
            .map_err(|e| Error::StateDir(settings.state_dir.clone(), e))?,
    );
    let mut settings = settings.clone();
    settings.systems = systems(&settings).await;
    app_state_with(&settings, nix).await
}

/// The systems to build for: `--systems`, else what the local Nix builds
/// (its `system` and `extra-platforms`) among those nixery knows.
async fn systems(settings: &Settings) -> Vec<name::Arch> {
    let nix = match nix::systems(&settings.nix_options).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "could not read which systems Nix builds for");
            None
        }
    };
    if settings.systems.is_empty() {
        let mut found: Vec<name::Arch> = nix
            .iter()
            .flatten()
            .filter_map(|s| name::Arch::parse(s))
            .collect();
        found.dedup();
        if found.is_empty() {
            found.push(name::Arch::host());
        }
        return found;
    }
    for arch in &settings.systems {
        if nix
            .as_ref()
            .is_some_and(|n| !n.iter().any(|s| s == arch.nix_system()))
        {
            // A binary cache or a remote builder may still supply it.
            tracing::warn!(
                system = arch.nix_system(),
                "--systems asks for {arch}, which the local Nix does not build for (its system and extra-platforms are {}): its images are made only from what substituters or remote builders supply; add `extra-platforms = {arch}` to nix.conf (with qemu-user-static registered in binfmt_misc) to build them here",
                nix.as_deref().unwrap_or_default().join(", ")
            );
        }
    }
    settings.systems.clone()
}

/// Builds the shared state of a registry from settings and a Nix (the
/// host's, or the tests' fake).
pub async fn app_state_with(
    settings: &Settings,
    nix: Arc<dyn nix::Nix>,
) -> Result<AppState, Error> {
    std::fs::create_dir_all(&settings.state_dir)
        .map_err(|e| Error::StateDir(settings.state_dir.clone(), e))?;
    let local = Arc::new(store::LocalStore::open(&settings.state_dir)?);
    let Storage {
        store,
        shared,
        gc_store,
        bucket,
        redirect,
    } = open_storage(settings, &local).await?;
    if store::free_bytes(&settings.state_dir).is_some_and(|b| b < 1 << 20) {
        tracing::warn!(
            state_dir = %settings.state_dir.display(),
            "the state disk is full: serving the images stored; new builds fail until space is freed"
        );
    }
    let catalog = Arc::new(Catalog::open(&settings.state_dir, &*store).await);
    let store_for_scrub = local;
    let metrics = Arc::new(Metrics::default());
    // Verify every stored blob once, in the background: a corrupt one is
    // removed, and the image it belongs to is made again when next asked for.
    {
        let (store, metrics) = (store_for_scrub, metrics.clone());
        tokio::task::spawn_blocking(move || match store.scrub() {
            Ok((checked, removed)) => {
                metrics.blobs_corrupt.inc_by(removed.len() as u64);
                tracing::info!(checked, removed = removed.len(), "stored blobs verified");
            }
            Err(e) => tracing::warn!(error = %e, "verifying the stored blobs"),
        });
    }
    let builder = Builder::new(
        BuilderConfig {
            state_dir: settings.state_dir.clone(),
            source: settings.source.clone(),
            max_layers: settings.max_layers,
            timeout: settings.build_timeout,
            max_builds: settings.max_builds,
            max_queue: settings.max_queue,
            mutable_ttl: settings.cache_ttl,
            compression: settings.compression,
            systems: if settings.systems.is_empty() {
                vec![name::Arch::host()]
            } else {
                settings.systems.clone()
            },
            popularity: settings.popularity.clone(),
            signer: settings.signer.clone(),
            eviction_grace: settings.eviction_grace,
            storage_limit: settings
                .storage_limit
                .unwrap_or_else(|| gc::default_limit(&settings.state_dir)),
            shared,
            bucket,
            gc_store,
        },
        nix,
        store,
        catalog.clone(),
        metrics.clone(),
    );
    // Signatures are made when asked for, under the current key (or none):
    // those that builds before stored with an image's documents go.
    for img in catalog.images() {
        if let Some(attached) = attest::without_signatures(&img.attached) {
            tracing::info!(image = %img.oci_digest, "stored signatures dropped: they are made when asked for");
            catalog.set_attached(&img.oci_digest, attached);
        }
    }
    // Measure (and enforce) the limit before serving (a smaller limit than
    // last time takes effect at once), then write last-use times now and
    // then, and at a stop, rather than on every pull.
    if let Err(e) = builder.gc().collect(None).await {
        tracing::warn!(error = %e, "collecting garbage");
    }
    {
        let builder = Arc::downgrade(&builder);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(builder) = builder.upgrade() else {
                    return;
                };
                builder.catalog().flush();
            }
        });
    }
    Ok(AppState {
        builder,
        catalog,
        metrics,
        ready: Default::default(),
        limits: settings.limits,
        redirect,
        public_host: settings.public_host.clone(),
        signatures: Default::default(),
    })
}

/// The stores one storage setting makes.
struct Storage {
    /// Where builds write and the registry reads.
    store: Arc<dyn store::BlobStore>,
    shared: Option<Arc<shared::Shared>>,
    /// What garbage collection trims, if not `store`.
    gc_store: Option<Arc<dyn store::BlobStore>>,
    bucket: Option<Arc<store::ObjectBlobStore>>,
    /// Where blob GETs are redirected to, with `--s3-redirect`.
    redirect: Option<Arc<store::ObjectBlobStore>>,
}

async fn open_storage(
    settings: &Settings,
    local: &Arc<store::LocalStore>,
) -> Result<Storage, Error> {
    let (s3, redirect, lease_ttl) = match &settings.storage {
        config::Storage::Filesystem => {
            return Ok(Storage {
                store: local.clone(),
                shared: None,
                gc_store: None,
                bucket: None,
                redirect: None,
            })
        }
        config::Storage::S3 {
            s3,
            redirect,
            lease_ttl,
        } => (s3, *redirect, lease_ttl),
    };
    let s3_client = s3.connect()?;
    let os: Arc<dyn object_store::ObjectStore> = s3_client.clone();
    let remote = Arc::new(
        store::ObjectBlobStore::new(os.clone(), &s3.prefix, &settings.state_dir.join("tmp"))?
            .with_signer(s3_client),
    );
    let shared = Arc::new(shared::Shared::new(os, &s3.prefix, *lease_ttl));
    let endpoint = s3.endpoint.as_deref().unwrap_or("AWS");
    match remote.probe(shared.instance()).await {
        Ok(true) => {
            tracing::info!(bucket = %s3.bucket, endpoint, prefix = %s3.prefix, "blobs and the image index are in an S3 bucket, cached in the state directory")
        }
        Ok(false) => {
            tracing::warn!(bucket = %s3.bucket, endpoint, "the object store does not answer; requests that need it fail with 503 until it does")
        }
        Err(store::StoreError::Remote { detail, .. }) => {
            return Err(Error::Store(store::StoreError::Remote {
                what: format!(
                    "bucket '{}' at {endpoint} cannot be written (check the bucket, the region and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
                    s3.bucket
                ),
                detail,
            }))
        }
        Err(e) => return Err(Error::Store(e)),
    }
    let limit = settings
        .storage_limit
        .unwrap_or_else(|| gc::default_limit(&settings.state_dir));
    let cached = store::CachedStore::new(local.clone(), remote.clone(), limit);
    Ok(Storage {
        store: Arc::new(cached),
        shared: Some(shared),
        gc_store: Some(local.clone()),
        bucket: Some(remote.clone()),
        redirect: redirect.then_some(remote),
    })
}

/// Serves the registry on an already-bound listener until `shutdown` resolves.
/// Every connection must send a request's headers within the header timeout
/// (which also closes idle kept-alive connections); past the connection cap
/// a new connection gets a 503 at once and is closed, so slow or abandoned
/// clients cannot starve the others.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let limits = state.limits;
    let metrics = state.metrics.clone();
    let catalog = state.catalog.clone();
    let service = hyper_util::service::TowerToHyperService::new(registry::router(state));
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: wait, do not spin.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        prepare_connection(&stream);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            tokio::spawn(refuse(stream));
            continue;
        };
        // A connection buffers at most 64 KiB of a response beyond the chunk
        // it writes (hyper's default is about 400 KiB), so a thousand slow
        // downloads hold tens of MiB, not hundreds.
        let conn = hyper::server::conn::http1::Builder::new()
            .max_buf_size(64 * 1024)
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(stream), service.clone());
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    // Requests in flight may finish (a blob download, a build), for a while.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), graceful.shutdown()).await;
    // Last-use times since the last write, for the eviction order.
    catalog.flush();
    Ok(())
}

/// Socket options of an accepted connection. No Nagle: a streamed body goes
/// out after its headers in a second write, which Nagle's algorithm holds
/// until the client's delayed ACK (40 ms on Linux) whenever the body is small:
/// a config blob was served at 0.66 MB/s (0.37x the reference registry), 45.8
/// MB/s without it (benches/blobs.sh).
fn prepare_connection(stream: &tokio::net::TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "setting TCP_NODELAY");
    }
}

/// A connection past the cap: a 503 with the registry's error JSON, then close.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"too many connections; try again shortly","detail":null}]}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    /// Accepted connections send small responses at once (no Nagle). A
    /// timing test would say more but cannot be trusted on a shared machine;
    /// benches/blobs.sh measures the effect.
    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_delayed_acks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        assert!(!stream.nodelay().unwrap(), "Linux's default is Nagle on");
        super::prepare_connection(&stream);
        assert!(stream.nodelay().unwrap());
    }
}
