//! Nixery: container images built by Nix on demand, served by a read-only OCI
//! registry, and declared in Kubernetes as NixImage objects.

pub mod build;
pub mod catalog;
pub mod config;
pub mod k8s;
pub mod layers;
pub mod metrics;
pub mod name;
pub mod nix;
pub mod oci;
pub mod registry;
pub mod store;
pub mod telemetry;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::build::{Builder, BuilderConfig};
use crate::catalog::Catalog;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::registry::AppState;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("opening the blob store: {0}")]
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
    app_state_with(settings, nix).await
}

/// Builds the shared state of a registry from settings and a Nix (the
/// host's, or the tests' fake).
pub async fn app_state_with(
    settings: &Settings,
    nix: Arc<dyn nix::Nix>,
) -> Result<AppState, Error> {
    std::fs::create_dir_all(&settings.state_dir)
        .map_err(|e| Error::StateDir(settings.state_dir.clone(), e))?;
    let store = Arc::new(store::LocalStore::open(&settings.state_dir)?);
    let catalog = Arc::new(Catalog::open(&settings.state_dir, &*store).await);
    let metrics = Arc::new(Metrics::default());
    let builder = Builder::new(
        BuilderConfig {
            state_dir: settings.state_dir.clone(),
            source: settings.source.clone(),
            max_layers: settings.max_layers,
            timeout: settings.build_timeout,
            max_builds: settings.max_builds,
            mutable_ttl: settings.cache_ttl,
            compression: settings.compression,
            popularity: settings.popularity.clone(),
        },
        nix,
        store,
        catalog.clone(),
        metrics.clone(),
    );
    Ok(AppState {
        builder,
        catalog,
        metrics,
        ready: Arc::new(AtomicBool::new(true)),
    })
}

/// Serves the registry on an already-bound listener until `shutdown` resolves.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    axum::serve(listener, registry::router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(Error::Serve)
}
