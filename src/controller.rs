//! The NixImage controller, one per node: builds each object's image into the
//! node's /nix/store through the shared pipeline, registers it with the
//! registry, and reports per-node and aggregate status with server-side apply.
//!
//! Writes never fight: each agent applies only its own `status.nodes[node=X]`
//! entry under a field manager of its own; the aggregate fields are computed
//! from the node entries by whichever agent sees a change, under one shared
//! field manager, and written only when they differ, so agents that agree make
//! no writes. Each node has its own finalizer, since each has GC roots to drop.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, info_span, warn, Instrument};

use crate::builder::{BuildError, Builder, ImageSpec, Progress, ProgressFn};
use crate::crd::{NixImage, NixImageSpec, NixImageStatus, NodeStatus};
use crate::metrics::{Metrics, PhaseLabel};
use crate::name::{self, AdHocImage, Arch};
use crate::nix::Source;
use crate::oci::RunConfig;
use crate::registry::{NamedEntry, NamedImages};

/// Field manager of the aggregate status fields, shared by all agents.
pub const FIELD_MANAGER: &str = "nixery.k8s.nixos.org";
pub const API_VERSION: &str = "k8s.nixos.org/v1alpha1";

pub const PHASE_BUILDING: &str = "Building";
pub const PHASE_READY: &str = "Ready";
pub const PHASE_FAILED: &str = "Failed";
pub const PHASE_PENDING: &str = "Pending";
pub const PHASE_INCONSISTENT: &str = "Inconsistent";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("patching status: {0}")]
    PatchStatus(#[source] kube::Error),
    #[error("building the image: {0}")]
    Build(String),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the object has no namespace")]
    NoNamespace,
    #[error("listing NixImages: {0} (is the CRD installed? kubectl apply -f crds/niximage.yaml)")]
    List(#[source] kube::Error),
}

/// What reconcile needs: the API, the pipeline, and this node's identity.
pub struct Context {
    pub client: Client,
    pub builder: Arc<Builder>,
    pub named: Arc<NamedImages>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub node: String,
    /// The registry host pods pull from (each node's loopback registry).
    pub public_host: String,
    /// How often a running build may write progress into status.
    pub progress_interval: Duration,
    /// Failures per object UID, for exponential backoff; reset on success.
    pub failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn node_field_manager(&self) -> String {
        format!("{FIELD_MANAGER}/{}", short(&self.node, 90))
    }

    /// `k8s.nixos.org/nixery-<node>`: a finalizer name's part after the slash
    /// is at most 63 characters, so long node names are shortened.
    pub fn finalizer(&self) -> String {
        format!("k8s.nixos.org/nixery-{}", short(&self.node, 56))
    }
}

/// The name itself when short enough, else a prefix and a hash.
fn short(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let hash = &name::Digest::of(s.as_bytes()).hex()[..8].to_string();
    format!("{}-{hash}", &s[..max - 9])
}

/// Turns a NixImage spec into the pipeline's request; errors are user errors.
/// `spec.tag` names the image; it names the Nix revision only when the
/// package source is a git repository (else the revision is `latest`).
pub fn image_spec(spec: &NixImageSpec, default_source: &Source) -> Result<ImageSpec, String> {
    name::validate_tag(&spec.tag).map_err(|e| e.to_string())?;
    let mut img = AdHocImage {
        packages: BTreeSet::new(),
        shell: false,
        arch: Arch::host(),
    };
    for p in &spec.contents {
        if !name::is_attr_path(p) || p == name::NIXIMAGE_PREFIX {
            return Err(format!(
                "'{}' is not a package attribute path",
                name::printable(p)
            ));
        }
        match p.as_str() {
            name::META_SHELL => img.shell = true,
            name::META_ARM64 => img.arch = Arch::Arm64,
            _ => {
                img.packages.insert(p.clone());
            }
        }
    }
    if spec.contents.is_empty() {
        return Err("spec.contents is empty".into());
    }
    let mut out = ImageSpec::ad_hoc(&img, &spec.tag);
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
    let result = finalizer(&api, &ctx.finalizer(), obj, |event| async {
        match event {
            Finalizer::Apply(o) => apply(o, &ctx, &api).await,
            Finalizer::Cleanup(o) => cleanup(o, &ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    result
}

/// Backs off exponentially per object (5s, 10s, ... up to 5 minutes).
pub fn error_policy(obj: Arc<NixImage>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    let uid = obj.uid().unwrap_or_default();
    let mut failures = ctx.failures.lock().unwrap();
    let n = failures.entry(uid).or_insert(0);
    *n += 1;
    let delay = backoff(*n);
    warn!(name = %obj.name_any(), error = %err, failures = *n, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(
        5u64.saturating_mul(1 << failures.saturating_sub(1).min(6))
            .min(300),
    )
}

async fn apply(obj: Arc<NixImage>, ctx: &Context, api: &Api<NixImage>) -> Result<Action, Error> {
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let name = obj.name_any();
    let generation = obj.metadata.generation.unwrap_or(0);
    let status = obj.status.clone().unwrap_or_default();
    let mine = status.nodes.iter().find(|n| n.node == ctx.node).cloned();
    let ready_here = mine
        .as_ref()
        .is_some_and(|m| m.phase == PHASE_READY && m.observed_generation == generation);
    let registered = match ctx.named.get(&ns, &name) {
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
        ctx.failures
            .lock()
            .unwrap()
            .remove(&obj.uid().unwrap_or_default());
        return Ok(Action::requeue(Duration::from_secs(3600)));
    }

    let spec = match image_spec(&obj.spec, ctx.builder.source()) {
        Ok(s) => s,
        Err(message) => {
            report_failure(api, &obj, ctx, "InvalidSpec", &message).await?;
            return Ok(Action::await_change());
        }
    };

    // A restarted agent rebuilds (from cache) what status already calls ready:
    // it re-registers the image without announcing a new build.
    if !ready_here {
        let node = NodeStatus {
            node: ctx.node.clone(),
            phase: PHASE_BUILDING.into(),
            observed_generation: generation,
            message: Some("queued".into()),
            ..Default::default()
        };
        let updated = patch_node(api, &name, ctx, &node).await?;
        ensure_aggregate(api, &updated, ctx).await?;
        publish(
            ctx,
            &obj,
            EventType::Normal,
            "BuildStarted",
            &format!("building {} on {}", obj.spec.contents.join(", "), ctx.node),
        )
        .await;
        ctx.named.set(
            &ns,
            &name,
            NamedEntry::Pending {
                tag: obj.spec.tag.clone(),
                message: "building".into(),
            },
        );
    }

    let (progress, reporter) = progress_reporter(api.clone(), name.clone(), ctx, generation);
    let result = ctx.builder.get_or_build(spec, Some(progress)).await;
    reporter.abort();
    let _ = reporter.await;

    match result {
        Ok(image) => {
            let digest = image.oci_digest.to_string();
            ctx.named.set(
                &ns,
                &name,
                NamedEntry::Ready {
                    tag: obj.spec.tag.clone(),
                    image: image.clone(),
                },
            );
            let node = NodeStatus {
                node: ctx.node.clone(),
                phase: PHASE_READY.into(),
                observed_generation: generation,
                digest: Some(digest.clone()),
                layers: Some(image.layers as i64),
                size: Some(image.size as i64),
                message: Some(format!(
                    "built {} layers, {} bytes",
                    image.layers, image.size
                )),
            };
            let updated = patch_node(api, &name, ctx, &node).await?;
            ensure_aggregate(api, &updated, ctx).await?;
            if !ready_here || mine.and_then(|m| m.digest) != Some(digest.clone()) {
                publish(
                    ctx,
                    &obj,
                    EventType::Normal,
                    "BuildSucceeded",
                    &format!("{digest} on {}", ctx.node),
                )
                .await;
            }
            ctx.failures
                .lock()
                .unwrap()
                .remove(&obj.uid().unwrap_or_default());
            info!(%digest, "image ready");
            Ok(Action::requeue(Duration::from_secs(3600)))
        }
        Err(e) => {
            let message = e.to_string();
            ctx.named.set(
                &ns,
                &name,
                NamedEntry::Pending {
                    tag: obj.spec.tag.clone(),
                    message: message.clone(),
                },
            );
            let reason = if matches!(e.as_ref(), BuildError::UnknownPackages(_)) {
                "UnknownPackages"
            } else {
                "BuildFailed"
            };
            report_failure(api, &obj, ctx, reason, &message).await?;
            Err(Error::Build(message))
        }
    }
}

/// Marks this node's entry Failed, updates the aggregate, records a warning.
async fn report_failure(
    api: &Api<NixImage>,
    obj: &NixImage,
    ctx: &Context,
    reason: &str,
    message: &str,
) -> Result<(), Error> {
    let node = NodeStatus {
        node: ctx.node.clone(),
        phase: PHASE_FAILED.into(),
        observed_generation: obj.metadata.generation.unwrap_or(0),
        message: Some(message.to_string()),
        ..Default::default()
    };
    let updated = patch_node(api, &obj.name_any(), ctx, &node).await?;
    ensure_aggregate(api, &updated, ctx).await?;
    publish(
        ctx,
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
    ctx: &Context,
    node: &NodeStatus,
) -> Result<NixImage, Error> {
    let patch =
        json!({ "apiVersion": API_VERSION, "kind": "NixImage", "status": { "nodes": [node] } });
    api.patch_status(
        name,
        &PatchParams::apply(&ctx.node_field_manager()).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::PatchStatus)
}

/// The aggregate status that the node entries imply.
pub fn aggregate(obj: &NixImage, public_host: &str, now: Time) -> NixImageStatus {
    let generation = obj.metadata.generation.unwrap_or(0);
    let current = obj.status.clone().unwrap_or_default();
    let nodes = &current.nodes;
    let current_gen: Vec<&NodeStatus> = nodes
        .iter()
        .filter(|n| n.observed_generation == generation)
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
            "NoNodes",
            "no node has picked the image up yet".to_string(),
        )
    } else if digests.len() > 1 {
        (
            PHASE_INCONSISTENT,
            "DigestMismatch",
            format!(
                "nodes built different digests: {}",
                digests.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        )
    } else if let Some(f) = failed.first() {
        (
            PHASE_FAILED,
            "BuildFailed",
            format!("{}: {}", f.node, f.message.clone().unwrap_or_default()),
        )
    } else if ready.len() == total {
        (
            PHASE_READY,
            "AllNodesReady",
            format!("ready on {total}/{total} nodes"),
        )
    } else {
        (
            PHASE_BUILDING,
            "Building",
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
    let ns = obj.namespace().unwrap_or_default();
    NixImageStatus {
        observed_generation: nodes.iter().map(|n| n.observed_generation).min(),
        phase: Some(phase.into()),
        image: one.then(|| {
            format!(
                "{public_host}/niximage/{ns}/{}:{}@{}",
                obj.name_any(),
                obj.spec.tag,
                digests.first().unwrap()
            )
        }),
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
        nodes: vec![],
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: Some(generation),
            last_transition_time,
        }],
    }
}

/// Writes the aggregate if it differs from what the object holds.
async fn ensure_aggregate(api: &Api<NixImage>, obj: &NixImage, ctx: &Context) -> Result<(), Error> {
    let want = aggregate(
        obj,
        &ctx.public_host,
        Time(k8s_openapi::jiff::Timestamp::now()),
    );
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

/// On delete: forget the image and drop the GC roots that kept its closure.
async fn cleanup(obj: Arc<NixImage>, ctx: &Context) -> Result<Action, Error> {
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    if let Some(NamedEntry::Ready { image, .. }) = ctx.named.remove(&ns, &obj.name_any()) {
        ctx.builder.forget(&image);
        if let Err(e) = std::fs::remove_dir_all(&image.gcroot_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(error = %e, dir = %image.gcroot_dir.display(), "removing GC roots");
            }
        }
    }
    publish(
        ctx,
        &obj,
        EventType::Normal,
        "Deleted",
        &format!("image dropped from {}", ctx.node),
    )
    .await;
    Ok(Action::await_change())
}

/// Events are best effort: a failure to record one is logged, not retried.
async fn publish(ctx: &Context, obj: &NixImage, type_: EventType, reason: &str, note: &str) {
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Build".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, reason, "publishing an event");
    }
}

/// Runs the controller until shutdown; `ready` turns true once the watch has
/// synced, and `/readyz` reports it.
pub async fn run(ctx: Arc<Context>, ready: Arc<AtomicBool>) -> Result<(), Error> {
    let api = Api::<NixImage>::all(ctx.client.clone());
    api.list(&ListParams::default().limit(1))
        .await
        .map_err(Error::List)?;
    let controller = Controller::new(api, watcher::Config::default().any_semantic());
    let store = controller.store();
    let metrics = ctx.metrics.clone();
    let node = ctx.node.clone();
    tokio::spawn(async move {
        if store.wait_until_ready().await.is_ok() {
            ready.store(true, Ordering::SeqCst);
            info!("NixImage watch synced");
        }
        loop {
            let mut counts: HashMap<String, i64> = HashMap::new();
            for o in store.state() {
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
    controller
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

#[cfg(test)]
mod tests {
    use super::*;

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
        s.source = Some(crate::crd::PackageSource {
            path: Some("/a".into()),
            repo: Some("b".into()),
            channel: None,
        });
        assert!(image_spec(&s, &path).is_err());
        s.source = Some(crate::crd::PackageSource {
            repo: Some("b".into()),
            ..Default::default()
        });
        assert_eq!(image_spec(&s, &path).unwrap().tag, "v1");
    }
}
