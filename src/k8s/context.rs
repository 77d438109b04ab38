//! What reconcile needs and keeps between calls: the API client, the
//! pipeline, this node's identity, and what it remembers of each object.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef};
use kube::Client;

use crate::builder::{BuildError, Builder, BuiltImage};
use crate::catalog::Catalog;
use crate::k8s::crd::{NixImage, NodeStatus};
use crate::k8s::events::Events;
use crate::k8s::lease::Liveness;
use crate::k8s::names::{finalizer_of, short, FIELD_MANAGER};
use crate::metrics::Metrics;
use crate::nix::Source;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("patching status: {0}")]
    PatchStatus(#[source] kube::Error),
    #[error("removing a departed node's entry or finalizer: {0}")]
    Departed(#[source] kube::Error),
    #[error("removing this node's finalizer, written by an older agent: {0}")]
    LegacyFinalizer(#[source] kube::Error),
    #[error("building the image: {0}")]
    Build(String),
    #[error("the object has no namespace")]
    NoNamespace,
    #[error("listing NixImages: {0} (is the CRD installed? kubectl apply -f crds/niximage.yaml)")]
    List(#[source] kube::Error),
}

impl Error {
    pub fn is_build_failure(&self) -> bool {
        matches!(self, Error::Build(_))
    }
}

/// How a build of one generation ended, or that it is still running.
pub(super) enum NodeBuild {
    Running {
        generation: i64,
        revision: Option<String>,
        task: tokio::task::JoinHandle<()>,
    },
    Done {
        generation: i64,
        revision: Option<String>,
        /// The images of every system, the node's own first.
        result: Result<Vec<(crate::name::Arch, Arc<BuiltImage>)>, Arc<BuildError>>,
        /// Whether BuildStarted was announced (a restarted agent re-registers quietly).
        announced: bool,
    },
}

/// When a failed build of a generation may be tried again (None: only after
/// a spec change, for the user's errors).
pub(super) struct Failure {
    pub(super) generation: i64,
    /// The pinned revision the failed build was of.
    pub(super) revision: Option<String>,
    pub(super) retry_at: Option<Instant>,
    /// The pinned channel's tarball no longer had its pinned contents: resolve
    /// it again before the retry instead of waiting for the cache TTL.
    pub(super) repin: bool,
    /// Resolving the moving source failed (its server did not answer): no
    /// new attempt before `retry_at`.
    pub(super) unresolved: bool,
}

/// What reconcile needs: the API, the pipeline, and this node's identity.
pub struct Context {
    pub client: Client,
    pub builder: Arc<Builder>,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    pub events: Events,
    pub node: String,
    /// The registry host pods on this node pull from (its loopback registry);
    /// written only into this node's own status entry.
    pub public_host: String,
    /// How often a running build may write progress into status.
    pub progress_interval: Duration,
    /// Package sources a NixImage may name besides the agent's own: evaluating
    /// one runs its Nix code as root on every node.
    pub allowed_sources: Vec<Source>,
    /// Whether the other nodes' agents are alive.
    pub liveness: Arc<dyn Liveness>,
    /// Pulls ready images into this node's container runtime (none: off).
    pub prepull: Option<Arc<crate::k8s::prepull::Prepuller>>,
    /// Failures per object UID, for exponential backoff; reset on success.
    pub failures: Mutex<HashMap<String, u32>>,
    pub(super) builds: Arc<Mutex<HashMap<String, NodeBuild>>>,
    /// The node entry this agent last wrote, per object UID.
    pub(super) written: Mutex<HashMap<String, NodeStatus>>,
    pub(super) failed: Mutex<HashMap<String, Failure>>,
    /// When this agent last resolved each object's moving source (and to what).
    pub(super) resolved: Mutex<HashMap<String, (String, Instant)>>,
    /// Objects whose build finished, to reconcile again.
    pub(super) completions: tokio::sync::mpsc::UnboundedSender<ObjectRef<NixImage>>,
}

/// The receiving ends `run` needs, handed out with a new `Context`.
pub struct Wiring {
    pub completions: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<NixImage>>,
}

impl Context {
    pub fn new(
        client: Client,
        builder: Arc<Builder>,
        catalog: Arc<Catalog>,
        metrics: Arc<Metrics>,
        node: &str,
        public_host: &str,
    ) -> (Self, Wiring) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let events = Events::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(node.into()),
            },
        );
        let ctx = Context {
            client,
            builder,
            catalog,
            metrics,
            events,
            node: node.into(),
            public_host: public_host.into(),
            progress_interval: Duration::from_secs(2),
            allowed_sources: Vec::new(),
            liveness: Arc::new(reflector::store::<Lease>().0),
            prepull: None,
            failures: Default::default(),
            builds: Default::default(),
            written: Default::default(),
            failed: Default::default(),
            resolved: Default::default(),
            completions: tx,
        };
        (ctx, Wiring { completions: rx })
    }

    pub fn node_field_manager(&self) -> String {
        format!("{FIELD_MANAGER}/{}", short(&self.node, 90))
    }

    /// `k8s.nixos.org/nixery-<node>`, as older agents wrote it: a finalizer
    /// name's part after the slash is at most 63 characters, so long node
    /// names are shortened.
    pub fn finalizer(&self) -> String {
        finalizer_of(&self.node)
    }

    /// The agent's own package source is always allowed; others only if listed.
    pub(super) fn source_allowed(&self, source: &Source) -> bool {
        source == self.builder.source() || self.allowed_sources.iter().any(|a| a.admits(source))
    }
}
