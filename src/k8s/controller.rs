//! The NixImage controller, one per node: builds each object's image into the
//! node's /nix/store through the shared pipeline, registers it with the
//! registry, and reports per-node and aggregate status with server-side apply.
//!
//! Writes never fight: each agent applies only its own `status.nodes[node=X]`
//! entry under a field manager of its own; the aggregate fields are computed
//! from the node entries alone (never from an agent's own settings) by
//! whichever agent sees a change, under one shared field manager, and written
//! only when they differ, so agents that agree write nothing. A node whose
//! Lease expired (see `lease`) has left, and the live agents remove its entry.
//!
//! No finalizers: nothing may hold up a deletion or an uninstall. Each agent
//! drops a deleted object's image and GC roots when its watch reports the
//! deletion, and, for deletions it missed (it was down, or its watch was
//! re-listed), at every sync of the watch by comparing the catalog with the
//! objects that exist. Finalizers written by older agents are removed.
//!
//! A reconcile starts or joins a build and returns; the build's completion
//! triggers the object again, so a spec change or a delete never waits behind
//! a build. What this agent last wrote and how its last build ended are kept
//! in memory, so a reconcile that reads a stale cached object (or one caused
//! by our own status write) neither rebuilds nor flips a Ready image back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, info_span, warn, Instrument};

use crate::build::{BuildError, Builder, BuiltImage, ImageSpec, Progress, ProgressFn};
use crate::catalog::{Catalog, NamedEntry};
use crate::k8s::crd::{NixImage, NixImageSpec, NixImageStatus, NodeStatus};
use crate::k8s::lease::{self, Liveness};
use crate::metrics::{Metrics, PhaseLabel};
use crate::name;
use crate::nix::Source;
use crate::oci::RunConfig;

/// Field manager of the aggregate status fields, shared by all agents.
pub const FIELD_MANAGER: &str = "nixery.k8s.nixos.org";
pub const API_VERSION: &str = "k8s.nixos.org/v1alpha1";
/// Older agents' finalizers started with this; the rest names the node.
pub const FINALIZER_PREFIX: &str = "k8s.nixos.org/nixery-";

pub const PHASE_BUILDING: &str = "Building";
pub const PHASE_READY: &str = "Ready";
pub const PHASE_FAILED: &str = "Failed";
pub const PHASE_PENDING: &str = "Pending";
pub const PHASE_INCONSISTENT: &str = "Inconsistent";

/// `Ready=False` reasons that are the user's to fix: not retried until the
/// spec changes.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
pub const REASON_UNKNOWN_PACKAGES: &str = "UnknownPackages";
pub const REASON_SOURCE_NOT_ALLOWED: &str = "SourceNotAllowed";
pub const REASON_UNSUPPORTED_SYSTEM: &str = "UnsupportedSystem";
pub const REASON_UNKNOWN_REVISION: &str = "UnknownRevision";
/// Field manager of the resolved revision (`status.revision*`), shared by all agents.
pub const REVISION_MANAGER: &str = "nixery.k8s.nixos.org-revision";
/// A build that failed for another reason: retried with backoff.
pub const REASON_BUILD_FAILED: &str = "BuildFailed";

/// How long a Ready image waits before its next routine check.
const RECHECK: Duration = Duration::from_secs(3600);

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
enum NodeBuild {
    Running {
        generation: i64,
        revision: Option<String>,
        task: tokio::task::JoinHandle<()>,
    },
    Done {
        generation: i64,
        revision: Option<String>,
        result: Result<Arc<BuiltImage>, Arc<BuildError>>,
        /// Whether BuildStarted was announced (a restarted agent re-registers quietly).
        announced: bool,
    },
}

/// When a failed build of a generation may be tried again (None: only after
/// a spec change, for the user's errors).
struct Failure {
    generation: i64,
    /// The pinned revision the failed build was of.
    revision: Option<String>,
    retry_at: Option<Instant>,
    /// The pinned channel's tarball no longer had its pinned contents: resolve
    /// it again before the retry instead of waiting for the cache TTL.
    repin: bool,
    /// Resolving the moving source failed (its server did not answer): no
    /// new attempt before `retry_at`.
    unresolved: bool,
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
    /// Failures per object UID, for exponential backoff; reset on success.
    pub failures: Mutex<HashMap<String, u32>>,
    builds: Arc<Mutex<HashMap<String, NodeBuild>>>,
    /// The node entry this agent last wrote, per object UID.
    written: Mutex<HashMap<String, NodeStatus>>,
    failed: Mutex<HashMap<String, Failure>>,
    /// When this agent last resolved each object's moving source (and to what).
    resolved: Mutex<HashMap<String, (String, Instant)>>,
    /// Objects whose build finished, to reconcile again.
    completions: tokio::sync::mpsc::UnboundedSender<ObjectRef<NixImage>>,
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
    fn source_allowed(&self, source: &Source) -> bool {
        source == self.builder.source() || self.allowed_sources.contains(source)
    }
}

pub fn finalizer_of(node: &str) -> String {
    format!("{FINALIZER_PREFIX}{}", short(node, 56))
}

/// The name itself when short enough, else a prefix and a hash.
pub fn short(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let hash = &name::Digest::of(s.as_bytes()).hex()[..8].to_string();
    format!("{}-{hash}", &s[..max - 9])
}

/// Events with current text. kube's `Recorder` merges every event of one
/// object and reason into a series and keeps the first note, so a second
/// `BuildSucceeded` would still show the first digest. One recorder per
/// (object, reason, note) keeps that merging for repeats of the same text
/// (as client-go's correlator does) and makes a new event when the text changes.
pub struct Events {
    client: Client,
    reporter: Reporter,
    recorders: Mutex<HashMap<(String, String), (String, Recorder)>>,
}

impl Events {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Events {
            client,
            reporter,
            recorders: Default::default(),
        }
    }

    /// Best effort: a failure to record one is logged, not retried.
    pub async fn publish(&self, obj: &NixImage, type_: EventType, reason: &str, note: &str) {
        let note: String = note.chars().take(1000).collect();
        let recorder = {
            let mut recorders = self.recorders.lock().unwrap();
            let key = (obj.uid().unwrap_or_default(), reason.to_string());
            match recorders.get(&key) {
                Some((n, r)) if *n == note => r.clone(),
                _ => {
                    let r = Recorder::new(self.client.clone(), self.reporter.clone());
                    recorders.insert(key, (note.clone(), r.clone()));
                    r
                }
            }
        };
        let event = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Build".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(error = %e, reason, "publishing an event");
        }
    }

    fn forget(&self, uid: &str) {
        self.recorders.lock().unwrap().retain(|(u, _), _| u != uid);
    }
}

/// Turns a NixImage spec into the pipeline's request; errors are user errors.
/// `spec.tag` names the image; it names the Nix revision only when the
/// package source is a git repository (else the revision is `latest`).
pub fn image_spec(spec: &NixImageSpec, default_source: &Source) -> Result<ImageSpec, String> {
    name::validate_tag(&spec.tag).map_err(|e| e.to_string())?;
    if spec.contents.is_empty() {
        return Err("spec.contents is empty".into());
    }
    let img = name::parse_packages(&spec.contents)?;
    let mut out = ImageSpec::ad_hoc(&img, &spec.tag);
    // Not asked for under the ad-hoc name: the object names it (and drops it
    // when deleted, unless someone asks for it ad hoc meanwhile).
    out.repository = None;
    if let Some(src) = &spec.source {
        out.source = Some(match (&src.path, &src.repo, &src.channel) {
            (Some(p), None, None) => Source::Path(p.into()),
            (None, Some(r), None) => Source::Git { url: r.clone() },
            (None, None, Some(c)) => Source::Channel(c.clone()),
            _ => return Err("spec.source must set exactly one of path, repo, channel".into()),
        });
    }
    if !out
        .source
        .as_ref()
        .unwrap_or(default_source)
        .tags_are_revisions()
    {
        out.tag = "latest".into();
    }
    if let Some(c) = &spec.config {
        out.run = RunConfig {
            entrypoint: c.entrypoint.clone(),
            cmd: c.cmd.clone(),
            env: c
                .env
                .iter()
                .map(|e| format!("{}={}", e.name, e.value))
                .collect(),
            working_dir: c.working_dir.clone(),
            user: c.user.clone(),
            exposed_ports: c.exposed_ports.clone(),
        };
    }
    Ok(out)
}

pub async fn reconcile(obj: Arc<NixImage>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<NixImage> = Api::namespaced(ctx.client.clone(), &ns);
    let span = info_span!("reconcile", namespace = %ns, name = %obj.name_any(), generation = obj.metadata.generation.unwrap_or(0), node = %ctx.node);
    let result = async {
        // Nodes that left never hold anything up, deletions least of all.
        let obj = sweep_departed(&api, obj, &ctx).await?;
        let obj = drop_legacy_finalizer(&api, obj, &ctx).await?;
        if obj.metadata.deletion_timestamp.is_some() {
            // Going (another finalizer holds it, or a foreground deletion):
            // nothing more to build for it here.
            forget_object(&ctx, &ns, &obj.name_any(), obj.uid().as_deref()).await;
            return Ok(Action::await_change());
        }
        apply(obj, &ctx, &api).await
    }
    .instrument(span)
    .await;
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Backs off exponentially per object (5s, 10s, ... up to 5 minutes).
pub fn error_policy(obj: Arc<NixImage>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    let uid = obj.uid().unwrap_or_default();
    let n = match err {
        // A failed build has counted itself already (see `finish`).
        e if e.is_build_failure() => *ctx.failures.lock().unwrap().get(&uid).unwrap_or(&1),
        _ => {
            let mut failures = ctx.failures.lock().unwrap();
            let n = failures.entry(uid).or_insert(0);
            *n += 1;
            *n
        }
    };
    let delay = backoff(n);
    warn!(name = %obj.name_any(), error = %err, failures = n, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(
        5u64.saturating_mul(1 << failures.saturating_sub(1).min(6))
            .min(300),
    )
}

/// Removes the status entries and finalizers of nodes whose Lease expired.
/// JSON patches with a `test` of each index, so a concurrent change makes the
/// patch fail (and the reconcile retry) rather than remove the wrong entry.
async fn sweep_departed(
    api: &Api<NixImage>,
    obj: Arc<NixImage>,
    ctx: &Context,
) -> Result<Arc<NixImage>, Error> {
    let now = Timestamp::now();
    let gone = |node: &str| node != ctx.node && ctx.liveness.departed(node, now);
    let name = obj.name_any();
    let mut obj = obj;
    let entries: Vec<(usize, String)> = obj
        .status
        .iter()
        .flat_map(|s| s.nodes.iter().enumerate())
        .filter(|(_, n)| gone(&n.node))
        .map(|(i, n)| (i, n.node.clone()))
        .collect();
    if !entries.is_empty() {
        let patch = test_and_remove("/status/nodes", "/node", &entries);
        let updated = api
            .patch_status(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
            .map_err(Error::Departed)?;
        info!(nodes = ?entries.iter().map(|(_, n)| n).collect::<Vec<_>>(), "removed the status of departed nodes");
        obj = Arc::new(updated);
    }
    // Finalizers of departed nodes: only names that a live Lease holder could
    // have written are considered, by matching each node's finalizer name.
    let departed_nodes: BTreeSet<String> = entries.into_iter().map(|(_, n)| n).collect();
    let stale: Vec<(usize, String)> = obj
        .finalizers()
        .iter()
        .enumerate()
        .filter(|(_, f)| f.starts_with(FINALIZER_PREFIX) && **f != ctx.finalizer())
        .filter(|(_, f)| {
            departed_nodes.iter().any(|n| finalizer_of(n) == **f)
                || finalizer_node_departed(f, ctx, now)
        })
        .map(|(i, f)| (i, f.clone()))
        .collect();
    if !stale.is_empty() {
        let patch = test_and_remove("/metadata/finalizers", "", &stale);
        let updated = api
            .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
            .map_err(Error::Departed)?;
        info!(finalizers = ?stale.iter().map(|(_, f)| f).collect::<Vec<_>>(), "removed the finalizers of departed nodes");
        obj = Arc::new(updated);
    }
    Ok(obj)
}

/// A JSON patch removing `list[i]` for each (i, value), each removal preceded
/// by a `test` that `list[i]<field>` still holds the value; highest index
/// first, so earlier removals do not shift later ones.
fn test_and_remove(list: &str, field: &str, items: &[(usize, String)]) -> json_patch::Patch {
    let mut ops = Vec::new();
    for (i, value) in items.iter().rev() {
        ops.push(json!({ "op": "test", "path": format!("{list}/{i}{field}"), "value": value }));
        ops.push(json!({ "op": "remove", "path": format!("{list}/{i}") }));
    }
    serde_json::from_value(json!(ops)).expect("valid JSON patch ops")
}

/// Removes this node's finalizer where an older agent wrote it (they held up
/// deletions and uninstalls), with a `test` so a concurrent change is not undone.
async fn drop_legacy_finalizer(
    api: &Api<NixImage>,
    obj: Arc<NixImage>,
    ctx: &Context,
) -> Result<Arc<NixImage>, Error> {
    let own = ctx.finalizer();
    let Some(i) = obj.finalizers().iter().position(|f| *f == own) else {
        return Ok(obj);
    };
    let patch = test_and_remove("/metadata/finalizers", "", &[(i, own)]);
    let updated = api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
        .map_err(Error::LegacyFinalizer)?;
    info!("removed this node's finalizer, written by an older agent");
    Ok(Arc::new(updated))
}

/// Whether a finalizer belongs to a node with an expired Lease that has no
/// status entry (it left before writing one).
fn finalizer_node_departed(f: &str, ctx: &Context, now: Timestamp) -> bool {
    ctx.liveness
        .holders()
        .iter()
        .any(|n| finalizer_of(n) == f && ctx.liveness.departed(n, now))
}

async fn apply(obj: Arc<NixImage>, ctx: &Context, api: &Api<NixImage>) -> Result<Action, Error> {
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let name = obj.name_any();
    let uid = obj.uid().unwrap_or_default();
    let generation = obj.metadata.generation.unwrap_or(0);

    let spec = match image_spec(&obj.spec, ctx.builder.source()) {
        Ok(s) => s,
        Err(message) => return user_error(api, &obj, ctx, REASON_INVALID_SPEC, &message).await,
    };
    let source = spec
        .source
        .clone()
        .unwrap_or_else(|| ctx.builder.source().clone());
    if !ctx.source_allowed(&source) {
        let message = format!(
            "the package source {} is not allowed on this cluster (an operator can allow it with --allowed-source)",
            source.describe_public()
        );
        return user_error(api, &obj, ctx, REASON_SOURCE_NOT_ALLOWED, &message).await;
    }

    // A moving source builds what it names now, the same on every node: a
    // git branch or tag its commit, a channel its tarball's contents.
    let mut spec = spec;
    let revision = match pin_revision(api, &obj, ctx, &source, &spec.tag).await? {
        Pin::Fixed(r) => r,
        Pin::Unknown(message) => {
            return user_error(api, &obj, ctx, REASON_UNKNOWN_REVISION, &message).await
        }
        Pin::Failed(message) => {
            let current = obj.status.as_ref().and_then(|s| s.revision.clone());
            return retry_later(api, &obj, ctx, current, false, true, &message).await;
        }
        Pin::Wait(d) => return Ok(Action::requeue(d)),
    };
    if let Some(r) = &revision {
        match (
            source.channel_url(),
            r.strip_prefix(CHANNEL_REVISION_PREFIX),
        ) {
            (Some(url), Some(sha256)) => {
                spec.source = Some(Source::PinnedChannel {
                    url,
                    sha256: sha256.to_string(),
                })
            }
            _ => spec.tag = r.clone(),
        }
    }

    // This node's entry: what we last wrote, else (after a restart) what the object says.
    let mine = ctx.written.lock().unwrap().get(&uid).cloned().or_else(|| {
        obj.status
            .iter()
            .flat_map(|s| s.nodes.iter())
            .find(|n| n.node == ctx.node)
            .cloned()
    });
    let ready_here = mine.as_ref().is_some_and(|m| {
        m.phase == PHASE_READY && m.observed_generation == generation && m.revision == revision
    });
    let registered = match ctx.catalog.named.get(&ns, &name) {
        Some(NamedEntry::Ready { tag, image }) if tag == obj.spec.tag => {
            Some(image.oci_digest.to_string())
        }
        _ => None,
    };
    if ready_here
        && registered.is_some()
        && mine.as_ref().and_then(|m| m.digest.clone()) == registered
    {
        // Nothing to build; write the aggregate only if it is out of date.
        ensure_aggregate(api, &obj, ctx).await?;
        return Ok(Action::requeue(RECHECK));
    }

    // A build of this generation that ended: report it.
    let done = {
        let mut builds = ctx.builds.lock().unwrap();
        match builds.get(&uid) {
            Some(NodeBuild::Done {
                generation: g,
                revision: r,
                ..
            }) if *g == generation && *r == revision => builds.remove(&uid),
            Some(NodeBuild::Running {
                generation: g,
                revision: r,
                ..
            }) if *g == generation && *r == revision => {
                // Its completion triggers this object again.
                return Ok(Action::requeue(RECHECK));
            }
            _ => None,
        }
    };
    if let Some(NodeBuild::Done {
        result, announced, ..
    }) = done
    {
        return finish(api, &obj, ctx, result, revision, announced || !ready_here).await;
    }

    // A failed build waits for its backoff (or, for the user's errors, for a
    // spec change), whatever triggered this reconcile (our own status write does).
    if let Some(f) = ctx.failed.lock().unwrap().get(&uid) {
        // A user's error waits for a spec change; a failed build, for its
        // backoff, unless the source has moved to another revision since.
        if f.generation == generation && (f.retry_at.is_none() || f.revision == revision) {
            match f.retry_at {
                None => return Ok(Action::await_change()),
                Some(t) if t > Instant::now() => return Ok(Action::requeue(t - Instant::now())),
                Some(_) => {}
            }
        }
    }

    // A restarted agent rebuilds (from cache) what status already calls ready:
    // it re-registers the image without announcing a new build.
    let announce = !ready_here;
    if announce {
        let node = NodeStatus {
            node: ctx.node.clone(),
            phase: PHASE_BUILDING.into(),
            observed_generation: generation,
            message: Some("queued".into()),
            ..Default::default()
        };
        let updated = patch_node(api, &name, &uid, ctx, &node).await?;
        ensure_aggregate(api, &updated, ctx).await?;
        ctx.events
            .publish(
                &obj,
                EventType::Normal,
                "BuildStarted",
                &format!(
                    "building {} (generation {generation}) on {}",
                    obj.spec.contents.join(", "),
                    ctx.node
                ),
            )
            .await;
        ctx.catalog.named.set(
            &ns,
            &name,
            NamedEntry::Pending {
                tag: obj.spec.tag.clone(),
                message: "building".into(),
            },
        );
    }
    start_build(api, &obj, ctx, spec, generation, revision, announce);
    Ok(Action::requeue(RECHECK))
}

/// What a moving source names now.
enum Pin {
    /// The commit to build (None: the source does not move, or is a commit).
    Fixed(Option<String>),
    /// The branch, tag or channel does not exist (the user's error).
    Unknown(String),
    /// Resolving failed (its server did not answer): retried after a backoff.
    Failed(String),
    /// Resolving failed a moment ago: not before this long.
    Wait(Duration),
}

/// How a channel's pinned revision is written in `status.revision`: the
/// sha256 of its unpacked tarball.
const CHANNEL_REVISION_PREFIX: &str = "sha256:";

/// For a git source at a branch or tag: the commit it names; for a channel:
/// the hash of its tarball's contents. Resolved once and shared by every node
/// through `status.revision`, resolved again after the cache TTL (written only
/// when it changed, so agents that agree write nothing), or at once when a
/// node found the pinned tarball changed. For any other source, None (and an
/// old revision is cleared).
async fn pin_revision(
    api: &Api<NixImage>,
    obj: &NixImage,
    ctx: &Context,
    source: &Source,
    tag: &str,
) -> Result<Pin, Error> {
    let status = obj.status.clone().unwrap_or_default();
    let apply = |fields: serde_json::Value| async move {
        let patch = json!({ "apiVersion": API_VERSION, "kind": "NixImage", "status": fields });
        api.patch_status(
            &obj.name_any(),
            &PatchParams::apply(REVISION_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::PatchStatus)
    };
    let of = match source {
        Source::Git { url } if !crate::nix::is_commit(tag) => {
            format!("{}#{tag}", crate::nix::redact_url(url))
        }
        Source::Channel(_) => crate::nix::redact_url(&source.channel_url().unwrap_or_default()),
        _ => {
            if status.revision.is_some() {
                apply(json!({})).await?;
            }
            return Ok(Pin::Fixed(None));
        }
    };
    let uid = obj.uid().unwrap_or_default();
    let generation = obj.metadata.generation.unwrap_or(0);
    let wait = ctx.failed.lock().unwrap().get(&uid).and_then(|f| {
        let t = f.retry_at?;
        (f.unresolved && f.generation == generation && t > Instant::now())
            .then(|| t - Instant::now())
    });
    if let Some(d) = wait {
        return Ok(Pin::Wait(d));
    }
    let ttl = ctx.builder.mutable_ttl();
    let resolved_at = status
        .revision_resolved
        .as_deref()
        .and_then(|t| t.parse::<Timestamp>().ok());
    let fresh =
        resolved_at.is_some_and(|t| Timestamp::now().duration_since(t).unsigned_abs() < ttl);
    let checked = ctx
        .resolved
        .lock()
        .unwrap()
        .get(&uid)
        .is_some_and(|(o, at)| *o == of && at.elapsed() < ttl);
    let repin = ctx.failed.lock().unwrap().get(&uid).is_some_and(|f| {
        f.repin && f.revision == status.revision && f.retry_at.is_some_and(|t| t <= Instant::now())
    });
    if status.revision.is_some()
        && status.revision_of.as_deref() == Some(&of)
        && (fresh || checked)
        && !repin
    {
        return Ok(Pin::Fixed(status.revision));
    }
    let resolved = match source {
        Source::Git { url } => crate::nix::resolve_git_ref(url, tag).await.map(|c| {
            c.ok_or_else(|| {
                format!(
                    "{} has no branch or tag '{tag}'",
                    crate::nix::redact_url(url)
                )
            })
        }),
        _ => crate::nix::resolve_tarball(&source.channel_url().unwrap_or_default())
            .await
            .map(|h| {
                h.map(|h| format!("{CHANNEL_REVISION_PREFIX}{h}"))
                    .ok_or_else(|| format!("the channel {of} does not exist"))
            }),
    };
    let revision = match resolved {
        Ok(Ok(r)) => r,
        Ok(Err(message)) => return Ok(Pin::Unknown(message)),
        Err(e) => {
            if status.revision.is_some() && status.revision_of.as_deref() == Some(&of) && !repin {
                // The source's server is down: the image stays at its pin
                // (a failure of re-resolving never fails a Ready image);
                // looked at again after the TTL.
                warn!(error = %e, source = %of, "could not resolve the source again; keeping its revision");
                ctx.resolved
                    .lock()
                    .unwrap()
                    .insert(uid, (of.clone(), Instant::now()));
                return Ok(Pin::Fixed(status.revision));
            }
            return Ok(Pin::Failed(e.to_string()));
        }
    };
    if repin {
        if let Some(f) = ctx.failed.lock().unwrap().get_mut(&uid) {
            f.repin = false;
        }
    }
    ctx.resolved
        .lock()
        .unwrap()
        .insert(uid, (of.clone(), Instant::now()));
    // A git branch is written only when it moved (agents that agree write
    // nothing); a channel's check time is written every time, so that the
    // other nodes do not each download the tarball again (one write per TTL).
    if status.revision.as_deref() != Some(&revision)
        || status.revision_of.as_deref() != Some(&of)
        || matches!(source, Source::Channel(_))
    {
        apply(json!({
            "revision": revision,
            "revisionOf": of,
            "revisionResolved": Timestamp::now().to_string(),
        }))
        .await?;
        info!(%revision, source = %of, "resolved the source's revision");
    }
    Ok(Pin::Fixed(Some(revision)))
}

/// Starts this generation's build in the background (replacing a build of an
/// older generation); its end is kept in `builds` and triggers the object.
fn start_build(
    api: &Api<NixImage>,
    obj: &NixImage,
    ctx: &Context,
    spec: ImageSpec,
    generation: i64,
    revision: Option<String>,
    announced: bool,
) {
    let uid = obj.uid().unwrap_or_default();
    let (progress, reporter) = progress_reporter(api.clone(), obj.name_any(), ctx, generation);
    let builder = ctx.builder.clone();
    let completions = ctx.completions.clone();
    let obj_ref = ObjectRef::from_obj(obj);
    let builds = ctx.builds.clone();
    let key = uid.clone();
    let rev = revision.clone();
    // The map is locked until the Running entry is in, so the task's Done
    // entry always comes after it.
    let mut map = ctx.builds.lock().unwrap();
    let task = tokio::spawn(async move {
        let result = builder.get_or_build(spec, Some(progress)).await;
        reporter.abort();
        let _ = reporter.await;
        let mut builds = builds.lock().unwrap();
        // Only this generation's own entry is replaced: a newer spec's build
        // is never overwritten by an older one that finished late.
        if matches!(builds.get(&key), Some(NodeBuild::Running { generation: g, revision: r, .. }) if g == &generation && *r == rev)
        {
            builds.insert(
                key,
                NodeBuild::Done {
                    generation,
                    revision: rev,
                    result,
                    announced,
                },
            );
            drop(builds);
            let _ = completions.send(obj_ref);
        }
    });
    if let Some(NodeBuild::Running { task: old, .. }) = map.insert(
        uid,
        NodeBuild::Running {
            generation,
            revision,
            task,
        },
    ) {
        old.abort();
    }
}

/// Reports how a build ended: Ready, a user's error (waits for a spec
/// change), or a failure (retried with backoff).
async fn finish(
    api: &Api<NixImage>,
    obj: &NixImage,
    ctx: &Context,
    result: Result<Arc<BuiltImage>, Arc<BuildError>>,
    revision: Option<String>,
    announce: bool,
) -> Result<Action, Error> {
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let name = obj.name_any();
    let uid = obj.uid().unwrap_or_default();
    let generation = obj.metadata.generation.unwrap_or(0);
    let image = match result {
        Ok(image) => image,
        Err(e) => {
            ctx.catalog.named.set(
                &ns,
                &name,
                NamedEntry::Pending {
                    tag: obj.spec.tag.clone(),
                    message: e.to_string(),
                },
            );
            let reason = match e.as_ref() {
                BuildError::UnknownPackages(_) => Some(REASON_UNKNOWN_PACKAGES),
                BuildError::UnsupportedSystem { .. } => Some(REASON_UNSUPPORTED_SYSTEM),
                _ => None,
            };
            if let Some(reason) = reason {
                return user_error(api, obj, ctx, reason, &e.to_string()).await;
            }
            let repin = revision.is_some() && crate::nix::is_hash_mismatch(&e.to_string());
            return retry_later(api, obj, ctx, revision, repin, false, &e.to_string()).await;
        }
    };
    let digest = image.oci_digest.to_string();
    ctx.catalog
        .claim(&image.oci_digest, &format!("{ns}/{name}"));
    ctx.catalog.named.set(
        &ns,
        &name,
        NamedEntry::Ready {
            tag: obj.spec.tag.clone(),
            image: image.clone(),
        },
    );
    let previous = ctx.written.lock().unwrap().get(&uid).cloned().or_else(|| {
        obj.status
            .iter()
            .flat_map(|s| s.nodes.iter())
            .find(|n| n.node == ctx.node)
            .cloned()
    });
    let node = NodeStatus {
        node: ctx.node.clone(),
        phase: PHASE_READY.into(),
        observed_generation: generation,
        digest: Some(digest.clone()),
        revision,
        image: Some(format!(
            "{}/{}:{}@{digest}",
            ctx.public_host,
            name::Repository::Named {
                namespace: ns.clone(),
                name: name.clone()
            }
            .name(),
            obj.spec.tag
        )),
        layers: Some(image.layers as i64),
        size: Some(image.size as i64),
        message: Some(format!(
            "built {} layers, {} bytes",
            image.layers, image.size
        )),
        reason: None,
    };
    // After a restart the entry often says just this already: no write.
    if previous.as_ref() == Some(&node) {
        ctx.written.lock().unwrap().insert(uid.clone(), node);
        ensure_aggregate(api, obj, ctx).await?;
    } else {
        let updated = patch_node(api, &name, &uid, ctx, &node).await?;
        ensure_aggregate(api, &updated, ctx).await?;
    }
    if announce || previous.and_then(|m| m.digest) != Some(digest.clone()) {
        ctx.events
            .publish(
                obj,
                EventType::Normal,
                "BuildSucceeded",
                &format!("{digest} (generation {generation}) on {}", ctx.node),
            )
            .await;
    }
    ctx.failures.lock().unwrap().remove(&uid);
    ctx.failed.lock().unwrap().remove(&uid);
    info!(%digest, "image ready");
    Ok(Action::requeue(RECHECK))
}

/// A failure that may pass (a build, a source's server): this node's entry
/// and the aggregate say `BuildFailed` with the message, and the object is
/// tried again after its backoff, which grows with its failures.
async fn retry_later(
    api: &Api<NixImage>,
    obj: &NixImage,
    ctx: &Context,
    revision: Option<String>,
    repin: bool,
    unresolved: bool,
    message: &str,
) -> Result<Action, Error> {
    let uid = obj.uid().unwrap_or_default();
    let n = {
        let mut failures = ctx.failures.lock().unwrap();
        let n = failures.entry(uid.clone()).or_insert(0);
        *n += 1;
        *n
    };
    ctx.failed.lock().unwrap().insert(
        uid,
        Failure {
            generation: obj.metadata.generation.unwrap_or(0),
            revision,
            retry_at: Some(Instant::now() + backoff(n)),
            repin,
            unresolved,
        },
    );
    report_failure(api, obj, ctx, REASON_BUILD_FAILED, message).await?;
    Err(Error::Build(message.to_string()))
}

/// The user's error: this node's entry says why, the aggregate's `Ready`
/// condition carries the reason, and nothing is retried until the spec changes.
async fn user_error(
    api: &Api<NixImage>,
    obj: &NixImage,
    ctx: &Context,
    reason: &str,
    message: &str,
) -> Result<Action, Error> {
    ctx.failed.lock().unwrap().insert(
        obj.uid().unwrap_or_default(),
        Failure {
            generation: obj.metadata.generation.unwrap_or(0),
            revision: None,
            retry_at: None,
            repin: false,
            unresolved: false,
        },
    );
    report_failure(api, obj, ctx, reason, message).await?;
    Ok(Action::await_change())
}

/// Marks this node's entry Failed with a reason, updates the aggregate and
/// records a warning, unless the entry already says exactly that.
async fn report_failure(
    api: &Api<NixImage>,
    obj: &NixImage,
    ctx: &Context,
    reason: &str,
    message: &str,
) -> Result<(), Error> {
    let uid = obj.uid().unwrap_or_default();
    let node = NodeStatus {
        node: ctx.node.clone(),
        phase: PHASE_FAILED.into(),
        observed_generation: obj.metadata.generation.unwrap_or(0),
        message: Some(message.to_string()),
        reason: Some(reason.to_string()),
        ..Default::default()
    };
    let same = ctx.written.lock().unwrap().get(&uid) == Some(&node)
        || obj
            .status
            .iter()
            .flat_map(|s| s.nodes.iter())
            .any(|n| *n == node);
    if same {
        ensure_aggregate(api, obj, ctx).await?;
        return Ok(());
    }
    let updated = patch_node(api, &obj.name_any(), &uid, ctx, &node).await?;
    ensure_aggregate(api, &updated, ctx).await?;
    ctx.events
        .publish(
            obj,
            EventType::Warning,
            reason,
            &format!("on {}: {message}", ctx.node),
        )
        .await;
    Ok(())
}

/// Forwards build progress into this node's status entry, at most once per
/// `progress_interval`, so a long build shows how far it got.
fn progress_reporter(
    api: Api<NixImage>,
    name: String,
    ctx: &Context,
    generation: i64,
) -> (ProgressFn, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let progress: ProgressFn = Arc::new(move |p: Progress| {
        let msg = match p {
            Progress::Queued => "queued".to_string(),
            Progress::Stage(s) => s.to_string(),
            Progress::Layers { done, total } => format!("packing layers {done}/{total}"),
            Progress::NixLog(_) | Progress::Done => return,
        };
        let _ = tx.send(msg);
    });
    let interval = ctx.progress_interval;
    let node = ctx.node.clone();
    let manager = ctx.node_field_manager();
    let handle = tokio::spawn(async move {
        let mut last = Instant::now();
        let mut latest: Option<String> = None;
        loop {
            let wait = interval.saturating_sub(last.elapsed());
            tokio::select! {
                m = rx.recv() => match m { Some(m) => latest = Some(m), None => return },
                _ = tokio::time::sleep(wait), if latest.is_some() => {
                    let status = NodeStatus { node: node.clone(), phase: PHASE_BUILDING.into(), observed_generation: generation, message: latest.take(), ..Default::default() };
                    let patch = json!({ "apiVersion": API_VERSION, "kind": "NixImage", "status": { "nodes": [status] } });
                    if let Err(e) = api.patch_status(&name, &PatchParams::apply(&manager).force(), &Patch::Apply(&patch)).await {
                        warn!(error = %e, "writing build progress");
                    }
                    last = Instant::now();
                }
            }
        }
    });
    (progress, handle)
}

/// Applies this node's status entry (and nothing else) under its own manager.
async fn patch_node(
    api: &Api<NixImage>,
    name: &str,
    uid: &str,
    ctx: &Context,
    node: &NodeStatus,
) -> Result<NixImage, Error> {
    let patch =
        json!({ "apiVersion": API_VERSION, "kind": "NixImage", "status": { "nodes": [node] } });
    let updated = api
        .patch_status(
            name,
            &PatchParams::apply(&ctx.node_field_manager()).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::PatchStatus)?;
    ctx.written
        .lock()
        .unwrap()
        .insert(uid.to_string(), node.clone());
    Ok(updated)
}

/// The aggregate status that the node entries of the live nodes imply. It is
/// computed from the entries alone, so every agent computes the same one.
pub fn aggregate(obj: &NixImage, departed: &dyn Fn(&str) -> bool, now: Time) -> NixImageStatus {
    let generation = obj.metadata.generation.unwrap_or(0);
    let current = obj.status.clone().unwrap_or_default();
    let nodes: Vec<&NodeStatus> = current
        .nodes
        .iter()
        .filter(|n| !departed(&n.node))
        .collect();
    // Entries of this generation (and, for a moving source, of the revision
    // it was resolved to).
    let current_gen: Vec<&NodeStatus> = nodes
        .iter()
        .copied()
        .filter(|n| n.observed_generation == generation)
        .filter(|n| {
            current.revision.is_none() || n.phase != PHASE_READY || n.revision == current.revision
        })
        .collect();
    let ready: Vec<&NodeStatus> = current_gen
        .iter()
        .copied()
        .filter(|n| n.phase == PHASE_READY)
        .collect();
    let failed: Vec<&NodeStatus> = current_gen
        .iter()
        .copied()
        .filter(|n| n.phase == PHASE_FAILED)
        .collect();
    let digests: BTreeSet<&str> = ready.iter().filter_map(|n| n.digest.as_deref()).collect();
    let total = nodes.len();
    let (phase, reason, message) = if total == 0 {
        (
            PHASE_PENDING,
            "NoNodes".to_string(),
            "no node has picked the image up yet".to_string(),
        )
    } else if digests.len() > 1 {
        (
            PHASE_INCONSISTENT,
            "DigestMismatch".to_string(),
            format!(
                "nodes built different digests: {}",
                digests.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    } else if let Some(f) = failed.first() {
        (
            PHASE_FAILED,
            f.reason
                .clone()
                .unwrap_or_else(|| REASON_BUILD_FAILED.into()),
            format!("{}: {}", f.node, f.message.clone().unwrap_or_default()),
        )
    } else if ready.len() == total {
        (
            PHASE_READY,
            "AllNodesReady".to_string(),
            format!("ready on {total}/{total} nodes"),
        )
    } else {
        (
            PHASE_BUILDING,
            "Building".to_string(),
            format!("ready on {}/{total} nodes", ready.len()),
        )
    };
    let status = if phase == PHASE_READY {
        "True"
    } else {
        "False"
    };
    let last_transition_time = current
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(now);
    let one = digests.len() == 1 && phase != PHASE_INCONSISTENT;
    let sample = ready.first();
    // The reference most ready nodes give (nodes may serve on different hosts
    // or ports during a rollout); ties go to the smallest, so all agents agree.
    let image = one
        .then(|| {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for n in &ready {
                if let Some(i) = n.image.as_deref() {
                    *counts.entry(i).or_default() += 1;
                }
            }
            let best = counts.values().copied().max()?;
            counts
                .into_iter()
                .find(|(_, c)| *c == best)
                .map(|(i, _)| i.to_string())
        })
        .flatten();
    NixImageStatus {
        observed_generation: nodes.iter().map(|n| n.observed_generation).min(),
        phase: Some(phase.into()),
        image,
        digest: one.then(|| digests.first().unwrap().to_string()),
        layers: if one {
            sample.and_then(|n| n.layers)
        } else {
            None
        },
        size: if one {
            sample.and_then(|n| n.size)
        } else {
            None
        },
        ready_nodes: Some(format!("{}/{total}", ready.len())),
        revision: None,
        revision_of: None,
        revision_resolved: None,
        nodes: vec![],
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason,
            message,
            observed_generation: Some(generation),
            last_transition_time,
        }],
    }
}

/// Writes the aggregate if it differs from what the object holds.
async fn ensure_aggregate(api: &Api<NixImage>, obj: &NixImage, ctx: &Context) -> Result<(), Error> {
    let now = Timestamp::now();
    let departed = |node: &str| node != ctx.node && ctx.liveness.departed(node, now);
    let want = aggregate(obj, &departed, Time(now));
    let have = obj.status.clone().unwrap_or_default();
    let same = have.observed_generation == want.observed_generation
        && have.phase == want.phase
        && have.image == want.image
        && have.digest == want.digest
        && have.layers == want.layers
        && have.size == want.size
        && have.ready_nodes == want.ready_nodes
        && have.conditions == want.conditions;
    if same {
        return Ok(());
    }
    let patch = json!({ "apiVersion": API_VERSION, "kind": "NixImage", "status": want });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::PatchStatus)?;
    Ok(())
}

/// A NixImage is gone (or going): stop its build, forget it, and drop the
/// images of every generation with their blobs and GC roots, unless another
/// object or an ad-hoc request still wants them (those stay until evicted as
/// least recently used). Without the UID (a deletion this agent missed),
/// nothing of the object is in memory but the registry's entry.
pub async fn forget_object(ctx: &Context, namespace: &str, name: &str, uid: Option<&str>) {
    if let Some(uid) = uid {
        forget_uid(ctx, uid);
    }
    ctx.catalog.named.remove(namespace, name);
    match ctx.builder.gc().drop_object(namespace, name).await {
        Ok(_) => info!(namespace, name, "dropped the image of a deleted NixImage"),
        Err(e) => warn!(namespace, name, error = %e, "dropping a deleted NixImage's images"),
    }
}

/// Registers, for each object whose current generation this node's status
/// entry calls Ready, the catalogued image of that digest, unless something
/// is registered for it already. Returns how many were.
fn restore_named(ctx: &Context, objects: &[Arc<NixImage>]) -> usize {
    let mut restored = 0;
    for obj in objects {
        let (Some(ns), name) = (obj.namespace(), obj.name_any()) else {
            continue;
        };
        let mine = obj
            .status
            .iter()
            .flat_map(|s| s.nodes.iter())
            .find(|n| n.node == ctx.node);
        let Some(digest) = mine
            .filter(|n| {
                n.phase == PHASE_READY && Some(n.observed_generation) == obj.metadata.generation
            })
            .and_then(|n| n.digest.as_deref()?.parse().ok())
        else {
            continue;
        };
        if ctx.catalog.named.get(&ns, &name).is_some() {
            continue;
        }
        if let Some(image) = ctx.catalog.image_with_digest(&digest) {
            ctx.catalog.named.set(
                &ns,
                &name,
                NamedEntry::Ready {
                    tag: obj.spec.tag.clone(),
                    image,
                },
            );
            restored += 1;
        }
    }
    restored
}

/// Stops the object's build and forgets what this agent kept of it in memory.
fn forget_uid(ctx: &Context, uid: &str) {
    if let Some(NodeBuild::Running { task, .. }) = ctx.builds.lock().unwrap().remove(uid) {
        task.abort();
    }
    ctx.written.lock().unwrap().remove(uid);
    ctx.failed.lock().unwrap().remove(uid);
    ctx.failures.lock().unwrap().remove(uid);
    ctx.resolved.lock().unwrap().remove(uid);
    ctx.events.forget(uid);
}

/// Deletions this agent did not see (it was down, or its watch had to list
/// again): every object the catalog holds images for, in the watched scope,
/// that no longer exists, is forgotten as `forget_object` does.
pub async fn forget_missing(
    ctx: &Context,
    scope: Option<&str>,
    existing: &BTreeSet<(String, String)>,
) {
    for object in ctx.catalog.objects() {
        let Some((ns, name)) = object.split_once('/') else {
            continue;
        };
        if scope.is_some_and(|s| s != ns) || existing.contains(&(ns.to_string(), name.to_string()))
        {
            continue;
        }
        forget_object(ctx, ns, name, None).await;
    }
}

/// Watch retries: quick, and capped at 5 s, so that the agent is back within
/// seconds of the API server (kube's default waits up to 30 s, then longer
/// after a reset timer).
#[derive(Debug, Clone, Default)]
pub struct WatchBackoff {
    next: Option<Duration>,
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next.unwrap_or(Duration::from_millis(250));
        self.next = Some((d * 2).min(Self::MAX));
        Some(d)
    }
}

impl WatchBackoff {
    pub const MAX: Duration = Duration::from_secs(5);
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = None;
    }
}

/// What one agent watches and where the agents' Leases live.
pub struct Scope {
    pub lease_namespace: String,
    /// Only NixImages of this namespace (None: all namespaces).
    pub watch_namespace: Option<String>,
}

/// The readiness part of the NixImage watch.
pub const READINESS_PART: &str = "watch";

/// Runs the controller until shutdown: renews this node's Lease, watches the
/// other agents' Leases and every NixImage. Ready once the NixImage watch has
/// delivered its initial list and this node holds its Lease (`/readyz` says
/// which is missing). Every sync of the watch forgets the objects deleted
/// while it was not looking; a deletion it sees is forgotten at once.
pub async fn run(
    ctx: Context,
    wiring: Wiring,
    scope: Scope,
    ready: Arc<crate::registry::Readiness>,
) -> Result<(), Error> {
    let mut ctx = ctx;
    let api = match &scope.watch_namespace {
        Some(ns) => Api::<NixImage>::namespaced(ctx.client.clone(), ns),
        None => Api::<NixImage>::all(ctx.client.clone()),
    };
    api.list(&ListParams::default().limit(1))
        .await
        .map_err(Error::List)?;

    // Leases: ours renewed, everyone's watched.
    ready.wait_for(READINESS_PART, "waiting for the controller's watch to sync");
    ready.wait_for(lease::READINESS_PART, "waiting to hold this node's Lease");
    let lease_api: Api<Lease> = Api::namespaced(ctx.client.clone(), &scope.lease_namespace);
    tokio::spawn(lease::keep_renewing(
        lease_api.clone(),
        ctx.node.clone(),
        ctx.node_field_manager(),
        ready.clone(),
    ));
    let (lease_store, lease_writer) = reflector::store::<Lease>();
    let lease_watch = watcher(
        lease_api,
        watcher::Config::default().labels(&format!(
            "{}={}",
            lease::LEASE_LABEL,
            lease::LEASE_LABEL_VALUE
        )),
    )
    .backoff(WatchBackoff::default())
    .reflect(lease_writer)
    .for_each(|e| async move {
        if let Err(e) = e {
            warn!(error = %e, "watching node leases");
        }
    });
    tokio::spawn(lease_watch);
    ctx.liveness = Arc::new(lease_store);
    let ctx = Arc::new(ctx);

    // NixImages: readiness from the watch itself. (kube's Store::wait_until_ready
    // wakes only its last waiter, and the controller's runner waits on it too.)
    let (reader, writer) = reflector::store::<NixImage>();
    let synced = ready.clone();
    let (janitor_ctx, janitor_store) = (ctx.clone(), reader.clone());
    let watch_namespace = scope.watch_namespace.clone();
    let objects = watcher(api, watcher::Config::default().any_semantic())
        .reflect(writer)
        .inspect(move |e| match e {
            Ok(watcher::Event::InitDone) => {
                let objects = janitor_store.state();
                // Before this agent says it is ready, what its status calls
                // ready here is served again (after a restart or an upgrade,
                // pods may pull at once); reconciles confirm it afterwards.
                let restored = restore_named(&janitor_ctx, &objects);
                if synced.clear(READINESS_PART) {
                    info!(restored, "NixImage watch synced");
                }
                let existing: BTreeSet<(String, String)> = objects
                    .iter()
                    .filter_map(|o| Some((o.namespace()?, o.name_any())))
                    .collect();
                let (ctx, scope) = (janitor_ctx.clone(), watch_namespace.clone());
                tokio::spawn(
                    async move { forget_missing(&ctx, scope.as_deref(), &existing).await },
                );
            }
            Ok(watcher::Event::Delete(o)) => {
                let (ctx, store) = (janitor_ctx.clone(), janitor_store.clone());
                let (ns, name, uid) = (o.namespace().unwrap_or_default(), o.name_any(), o.uid());
                tokio::spawn(async move {
                    // Created again under the same name meanwhile: the new
                    // object keeps the name's images (they go with it).
                    let again = store
                        .get(&ObjectRef::new(&name).within(&ns))
                        .is_some_and(|n| n.uid() != uid);
                    match uid {
                        Some(uid) if again => forget_uid(&ctx, &uid),
                        uid => forget_object(&ctx, &ns, &name, uid.as_deref()).await,
                    }
                });
            }
            _ => {}
        })
        .applied_objects();
    // A finished build triggers its object again.
    let store = reader.clone();
    let completions = tokio_stream_from(wiring.completions).filter_map(move |r| {
        let obj = store.get(&r).map(|o| Ok((*o).clone()));
        async move { obj }
    });
    let triggers = futures::stream::select(objects, completions);
    tokio::spawn(reconcile_on_departures(ctx.clone(), reader.clone()));

    let metrics = ctx.metrics.clone();
    let node = ctx.node.clone();
    let phases = reader.clone();
    tokio::spawn(async move {
        loop {
            let mut counts: HashMap<String, i64> = HashMap::new();
            for o in phases.state() {
                let phase = o
                    .status
                    .as_ref()
                    .and_then(|s| s.nodes.iter().find(|n| n.node == node))
                    .map(|n| n.phase.clone())
                    .unwrap_or_else(|| PHASE_PENDING.into());
                *counts.entry(phase).or_default() += 1;
            }
            for phase in [PHASE_PENDING, PHASE_BUILDING, PHASE_READY, PHASE_FAILED] {
                metrics
                    .objects_by_phase
                    .get_or_create(&PhaseLabel {
                        phase: phase.into(),
                    })
                    .set(counts.get(phase).copied().unwrap_or(0));
            }
            tokio::time::sleep(Duration::from_secs(15)).await;
        }
    });
    Controller::for_stream(triggers, reader)
        .trigger_backoff(WatchBackoff::default())
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile");
            }
        })
        .await;
    Ok(())
}

/// When another node's Lease expires, reconciles every object with a status
/// entry of that node, so its entry goes and `readyNodes` counts live nodes
/// only (nothing else would trigger those objects).
async fn reconcile_on_departures(ctx: Arc<Context>, objects: reflector::Store<NixImage>) {
    let mut known: BTreeSet<String> = BTreeSet::new();
    loop {
        tokio::time::sleep(lease::RENEW_EVERY).await;
        let now = Timestamp::now();
        let departed: BTreeSet<String> = ctx
            .liveness
            .holders()
            .into_iter()
            .filter(|n| *n != ctx.node && ctx.liveness.departed(n, now))
            .collect();
        let new: Vec<&String> = departed.difference(&known).collect();
        if !new.is_empty() {
            info!(nodes = ?new, "nodes departed (their Leases expired)");
            for o in objects.state() {
                let theirs = o
                    .status
                    .iter()
                    .flat_map(|s| s.nodes.iter())
                    .any(|n| new.contains(&&n.node));
                if theirs {
                    let _ = ctx.completions.send(ObjectRef::from_obj(&*o));
                }
            }
        }
        known = departed;
    }
}

/// An mpsc receiver as a stream.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(generation: i64, nodes: serde_json::Value) -> NixImage {
        serde_json::from_value(json!({
            "apiVersion": API_VERSION, "kind": "NixImage",
            "metadata": { "name": "img", "namespace": "default", "generation": generation },
            "spec": { "contents": ["hello"], "tag": "v1" },
            "status": { "nodes": nodes }
        }))
        .unwrap()
    }

    fn ready(node: &str, generation: i64, digest: &str, host: &str) -> serde_json::Value {
        json!({ "node": node, "phase": "Ready", "observedGeneration": generation, "digest": digest,
                "image": format!("{host}/niximage/default/img:v1@{digest}"), "layers": 3, "size": 10 })
    }

    #[test]
    fn aggregate_phases() {
        let now = Time(Timestamp::UNIX_EPOCH);
        let live = |_: &str| false;
        let agg = |o: &NixImage| aggregate(o, &live, now.clone());

        let s = agg(&object(1, json!([])));
        assert_eq!(
            (s.phase.as_deref(), s.conditions[0].reason.as_str()),
            (Some("Pending"), "NoNodes")
        );

        // Nodes that disagree: no image, no digest, the digests named.
        let s = agg(&object(
            1,
            json!([
                ready("a", 1, "sha256:x", "h"),
                ready("b", 1, "sha256:y", "h")
            ]),
        ));
        assert_eq!(
            (s.phase.as_deref(), s.conditions[0].reason.as_str()),
            (Some("Inconsistent"), "DigestMismatch")
        );
        assert_eq!((s.image, s.digest), (None, None));
        assert!(
            s.conditions[0].message.contains("sha256:x")
                && s.conditions[0].message.contains("sha256:y")
        );

        // A failing node's own reason becomes the condition's.
        let failed = json!({ "node": "b", "phase": "Failed", "observedGeneration": 1,
                             "reason": "UnknownPackages", "message": "unknown packages: x" });
        let s = agg(&object(1, json!([ready("a", 1, "sha256:x", "h"), failed])));
        assert_eq!(
            (s.phase.as_deref(), s.conditions[0].reason.as_str()),
            (Some("Failed"), "UnknownPackages")
        );
        assert_eq!(s.conditions[0].status, "False");

        // An entry of an older generation is not ready for this one.
        let s = agg(&object(
            2,
            json!([
                ready("a", 2, "sha256:x", "h"),
                ready("b", 1, "sha256:x", "h")
            ]),
        ));
        assert_eq!(
            (s.phase.as_deref(), s.ready_nodes.as_deref()),
            (Some("Building"), Some("1/2"))
        );
        assert_eq!(s.observed_generation, Some(1));

        // Departed nodes do not count at all.
        let gone = |n: &str| n == "b";
        let s = aggregate(
            &object(
                2,
                json!([
                    ready("a", 2, "sha256:x", "h"),
                    ready("b", 1, "sha256:x", "h")
                ]),
            ),
            &gone,
            now.clone(),
        );
        assert_eq!(
            (s.phase.as_deref(), s.ready_nodes.as_deref()),
            (Some("Ready"), Some("1/1"))
        );

        // The image reference most nodes give; a tie goes to the smallest.
        let three = json!([
            ready("a", 1, "sha256:x", "h2:1"),
            ready("b", 1, "sha256:x", "h1:1"),
            ready("c", 1, "sha256:x", "h2:1")
        ]);
        assert_eq!(
            agg(&object(1, three)).image.as_deref(),
            Some("h2:1/niximage/default/img:v1@sha256:x")
        );
        let tie = json!([
            ready("a", 1, "sha256:x", "h2:1"),
            ready("b", 1, "sha256:x", "h1:1")
        ]);
        assert_eq!(
            agg(&object(1, tie.clone())).image.as_deref(),
            Some("h1:1/niximage/default/img:v1@sha256:x")
        );
        // The same whichever way round the entries come.
        let reversed = json!([tie[1].clone(), tie[0].clone()]);
        assert_eq!(agg(&object(1, tie)), agg(&object(1, reversed)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(3), Duration::from_secs(20));
        assert_eq!(backoff(30), Duration::from_secs(300));
    }

    #[test]
    fn long_node_names_make_valid_finalizers() {
        let long = "n".repeat(200);
        let s = short(&long, 56);
        assert_eq!(s.len(), 56);
        assert_ne!(
            short(&format!("{long}a"), 56),
            short(&format!("{long}b"), 56)
        );
        assert_eq!(short("node-1", 56), "node-1");
    }

    #[test]
    fn spec_validation() {
        let spec = |contents: &[&str]| NixImageSpec {
            contents: contents.iter().map(|s| s.to_string()).collect(),
            tag: "v1".into(),
            source: None,
            config: None,
        };
        let path = Source::Path("/pkgs".into());
        let git = Source::Git {
            url: "file:///r".into(),
        };
        assert_eq!(
            image_spec(&spec(&["curl", "shell"]), &path).unwrap().tag,
            "latest"
        );
        assert_eq!(image_spec(&spec(&["curl"]), &git).unwrap().tag, "v1");
        assert!(image_spec(&spec(&[]), &path).is_err());
        assert!(image_spec(&spec(&["$(x)"]), &path).is_err());
        assert!(image_spec(&spec(&["niximage"]), &path).is_err());
        let mut s = spec(&["curl"]);
        s.source = Some(crate::k8s::crd::PackageSource {
            path: Some("/a".into()),
            repo: Some("b".into()),
            channel: None,
        });
        assert!(image_spec(&s, &path).is_err());
        s.source = Some(crate::k8s::crd::PackageSource {
            repo: Some("b".into()),
            ..Default::default()
        });
        assert_eq!(image_spec(&s, &path).unwrap().tag, "v1");
    }
}
