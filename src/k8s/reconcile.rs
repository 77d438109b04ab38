//! One NixImage on this node: build its image through the shared pipeline,
//! register it with the registry, and write this node's status entry and the
//! aggregate with server-side apply.
//!
//! Writes never fight: each agent applies only its own `status.nodes[node=X]`
//! entry under a field manager of its own; the aggregate fields are computed
//! from the node entries alone (never from an agent's own settings) by
//! whichever agent sees a change, under one shared field manager, and written
//! only when they differ, so agents that agree write nothing.
//!
//! A reconcile starts or joins a build and returns; the build's completion
//! triggers the object again, so a spec change or a delete never waits behind
//! a build. What this agent last wrote and how its last build ended are kept
//! in memory, so a reconcile that reads a stale cached object (or one caused
//! by our own status write) neither rebuilds nor flips a Ready image back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::ResourceExt;
use serde_json::json;
use tracing::{info, info_span, warn, Instrument};

use crate::builder::{BuildError, BuiltImage, ImageSpec, Progress, ProgressFn};
use crate::catalog::NamedEntry;
use crate::k8s::cleanup::{drop_legacy_finalizer, forget_object, sweep_departed};
use crate::k8s::context::{Context, Error, Failure, NodeBuild};
use crate::k8s::crd::{NixImage, NodeStatus, PlatformImage};
use crate::k8s::names::{API_VERSION, FIELD_MANAGER};
use crate::k8s::prepull;
use crate::k8s::sources::{image_spec, pin_revision, pin_spec, Pin};
use crate::k8s::status::{
    aggregate, PHASE_BUILDING, PHASE_FAILED, PHASE_READY, REASON_BUILD_FAILED, REASON_INVALID_SPEC,
    REASON_SOURCE_NOT_ALLOWED, REASON_UNKNOWN_PACKAGES, REASON_UNKNOWN_REVISION,
    REASON_UNSUPPORTED_SYSTEM,
};
use crate::name::{self, Arch};

/// How long a Ready image waits before its next routine check.
const RECHECK: Duration = Duration::from_secs(3600);

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
        pin_spec(&mut spec, &source, r);
    }

    let mine = own_entry(ctx, &obj, &uid);
    let ready_here = mine.as_ref().is_some_and(|m| {
        m.phase == PHASE_READY && m.observed_generation == generation && m.revision == revision
    });
    let registered = match ctx.catalog.named.get(&ns, &name) {
        Some(entry @ NamedEntry::Ready { .. }) if matches!(&entry, NamedEntry::Ready { tag, .. } if *tag == obj.spec.tag) => {
            Some(entry.images())
        }
        _ => None,
    };
    if let Some(images) = registered.filter(|i| {
        ready_here
            && mine.as_ref().and_then(|m| m.digest.clone()) == Some(i[0].1.oci_digest.to_string())
            && mine.as_ref().map(|m| m.platforms.len().max(1)) == Some(i.len())
    }) {
        let image = images[0].1.clone();
        let (sbom, signature) = attested(ctx, &obj, &image);
        let (pre_pulled, pre_pull_failed) = pre_pull(&obj, ctx, &images);
        let message = ready_message(&image, pre_pull_failed);
        // (An entry of an agent from before architectures is written again,
        // with them.)
        if mine.as_ref().is_some_and(|m| {
            m.sbom == sbom
                && m.signature == signature
                && m.arch.is_some()
                && m.pre_pulled == pre_pulled
                && m.message.as_ref() == Some(&message)
        }) {
            // Nothing to build; write the aggregate only if it is out of date.
            ensure_aggregate(api, &obj, ctx).await?;
            return Ok(Action::requeue(RECHECK));
        }
        // The same image, signed since (or under another key, or no longer):
        // the entry says what this node serves now.
        return finish(api, &obj, ctx, Ok(images), revision, false).await;
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
        // The node's own system first, with progress; then the others
        // (`--systems`), which reuse its evaluation's cache of names.
        let systems = builder.systems().to_vec();
        let own = ImageSpec {
            arch: systems[0],
            ..spec.clone()
        };
        let result = match builder.get_or_build(own, Some(progress)).await {
            Ok(image) if systems.len() == 1 => Ok(vec![(systems[0], image)]),
            Ok(_) => builder.get_or_build_all(&spec).await,
            Err(e) => Err(e),
        };
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
    result: Result<Vec<(Arch, Arc<BuiltImage>)>, Arc<BuildError>>,
    revision: Option<String>,
    announce: bool,
) -> Result<Action, Error> {
    let ns = obj.namespace().ok_or(Error::NoNamespace)?;
    let name = obj.name_any();
    let uid = obj.uid().unwrap_or_default();
    let generation = obj.metadata.generation.unwrap_or(0);
    let images = match result {
        Ok(images) if !images.is_empty() => images,
        Ok(_) => unreachable!("a build gives at least one image"),
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
                BuildError::UnknownRevision(_) | BuildError::UnknownFlake(_) => {
                    Some(REASON_UNKNOWN_REVISION)
                }
                _ => None,
            };
            if let Some(reason) = reason {
                return user_error(api, obj, ctx, reason, &e.to_string()).await;
            }
            let repin = revision.is_some() && crate::nix::is_hash_mismatch(&e.to_string());
            return retry_later(api, obj, ctx, revision, repin, false, &e.to_string()).await;
        }
    };
    let (arch, image) = images[0].clone();
    let digest = image.oci_digest.to_string();
    for (_, image) in &images {
        ctx.catalog
            .claim(&image.oci_digest, &format!("{ns}/{name}"));
    }
    ctx.catalog.named.set(
        &ns,
        &name,
        NamedEntry::Ready {
            tag: obj.spec.tag.clone(),
            image: image.clone(),
            arch,
            others: images[1..].to_vec(),
        },
    );
    // What the tag serves: with several systems, their index.
    let served = if images.len() > 1 {
        ctx.builder.index(false, &images).1.to_string()
    } else {
        digest.clone()
    };
    let previous = own_entry(ctx, obj, &uid);
    let (sbom, signature) = attested(ctx, obj, &image);
    let (pre_pulled, pre_pull_failed) = pre_pull(obj, ctx, &images);
    let mut platforms: Vec<PlatformImage> = images
        .iter()
        .map(|(a, i)| PlatformImage {
            architecture: a.oci().into(),
            digest: i.oci_digest.to_string(),
            size: i.oci_manifest.len() as i64,
        })
        .collect();
    platforms.sort();
    let node = NodeStatus {
        node: ctx.node.clone(),
        phase: PHASE_READY.into(),
        observed_generation: generation,
        arch: Some(arch.oci().into()),
        digest: Some(digest.clone()),
        platforms,
        revision,
        image: Some(format!(
            "{}/{}:{}@{served}",
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
        sbom,
        signature,
        pre_pulled,
        message: Some(ready_message(&image, pre_pull_failed)),
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

/// A ready entry's message.
fn ready_message(image: &BuiltImage, pre_pull_failed: Option<String>) -> String {
    let built = format!("built {} layers, {} bytes", image.layers, image.size);
    match pre_pull_failed {
        None => built,
        Some(e) => format!("{built}; pre-pulling into the container runtime failed: {e}"),
    }
}

/// Where the object's image stands in this node's container runtime, as its
/// status entry says it: the runtime that holds it, or why the pull failed.
/// Starts the pull (of what the tag serves: with several systems, their
/// index) when the runtime does not have it yet; its end triggers the object.
fn pre_pull(
    obj: &NixImage,
    ctx: &Context,
    images: &[(Arch, Arc<BuiltImage>)],
) -> (Option<String>, Option<String>) {
    let (Some(prepull), Some(ns)) = (&ctx.prepull, obj.namespace()) else {
        return (None, None);
    };
    let name = obj.name_any();
    let served = if images.len() > 1 {
        ctx.builder.index(false, images).1.to_string()
    } else {
        images[0].1.oci_digest.to_string()
    };
    let repository = format!(
        "{}/{}",
        ctx.public_host,
        name::Repository::Named {
            namespace: ns.clone(),
            name: name.clone()
        }
        .name()
    );
    let target = prepull::Target {
        object: format!("{ns}/{name}"),
        tag_ref: format!("{repository}:{}", obj.spec.tag),
        digest_ref: format!("{repository}@{served}"),
        digest: served,
    };
    let completions = ctx.completions.clone();
    let obj_ref = ObjectRef::from_obj(obj);
    match prepull.ensure(&target, move || {
        let _ = completions.send(obj_ref.clone());
    }) {
        prepull::State::InRuntime(runtime) => (Some(runtime), None),
        prepull::State::Pulling => (None, None),
        prepull::State::Failed(e) => (None, Some(e)),
    }
}

/// The digests of an image's CycloneDX SBOM and, with a key, of the cosign
/// signature that Pods on this node get with it: made for the reference they
/// pull (`<public host>/niximage/<namespace>/<name>`), the same on every node.
fn attested(ctx: &Context, obj: &NixImage, image: &BuiltImage) -> (Option<String>, Option<String>) {
    let sbom = crate::attest::document_digest(&image.attached, crate::attest::CYCLONEDX);
    let signature = ctx
        .builder
        .signer()
        .zip(obj.namespace())
        .map(|(signer, ns)| {
            let repository = name::Repository::Named {
                namespace: ns,
                name: obj.name_any(),
            }
            .name();
            let identity = crate::registry::signatures::identity(
                Some(&ctx.public_host),
                &Default::default(),
                &repository,
            );
            let made = crate::attest::signature(signer, &identity, &image.oci_digest);
            name::Digest::of(&made.manifests[0])
        });
    (
        sbom.map(|d| d.to_string()),
        signature.map(|d| d.to_string()),
    )
}

/// This node's entry: what this agent last wrote, else (after a restart)
/// what the object says.
fn own_entry(ctx: &Context, obj: &NixImage, uid: &str) -> Option<NodeStatus> {
    ctx.written.lock().unwrap().get(uid).cloned().or_else(|| {
        obj.status
            .iter()
            .flat_map(|s| s.nodes.iter())
            .find(|n| n.node == ctx.node)
            .cloned()
    })
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

/// Writes the aggregate if it differs from what the object holds.
/// Serves the index the aggregate names (of every architecture the nodes
/// built) by its digest here, where this node has one of its images: a pod
/// pulls the object's `image` from its own node's registry, and takes the
/// manifest of its node's architecture.
async fn register_platform_index(
    obj: &NixImage,
    ctx: &Context,
    want: &crate::k8s::crd::NixImageStatus,
) {
    if want.platforms.len() < 2 {
        return;
    }
    let Some((digest, bytes)) = crate::k8s::status::platform_index(&want.platforms) else {
        return;
    };
    let (Some(ns), name) = (obj.namespace(), obj.name_any()) else {
        return;
    };
    if ctx.catalog.index(&digest).is_some() {
        return;
    }
    let held = ctx
        .catalog
        .named
        .get(&ns, &name)
        .map(|e| e.images())
        .unwrap_or_default();
    let members: Vec<name::Digest> = want
        .platforms
        .iter()
        .filter_map(|p| p.digest.parse().ok())
        .collect();
    if held.iter().any(|(_, i)| members.contains(&i.oci_digest)) {
        ctx.catalog
            .add_index(crate::oci::OCI_INDEX, &bytes, members);
    }
}

async fn ensure_aggregate(api: &Api<NixImage>, obj: &NixImage, ctx: &Context) -> Result<(), Error> {
    let now = Timestamp::now();
    let departed = |node: &str| node != ctx.node && ctx.liveness.departed(node, now);
    let want = aggregate(obj, &departed, Time(now));
    register_platform_index(obj, ctx, &want).await;
    let have = obj.status.clone().unwrap_or_default();
    let same = have.observed_generation == want.observed_generation
        && have.phase == want.phase
        && have.image == want.image
        && have.digest == want.digest
        && have.platforms == want.platforms
        && have.layers == want.layers
        && have.size == want.size
        && have.sbom == want.sbom
        && have.signature == want.signature
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
}
