//! The agent's loop: this node's Lease renewed and everyone's watched, the
//! NixImage watch with its readiness, and the triggers that run `reconcile`
//! (a change, a finished build, a node that left).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use tracing::{info, warn};

use crate::catalog::NamedEntry;
use crate::k8s::cleanup::{forget_missing, forget_object, forget_uid};
use crate::k8s::context::{Context, Error, Wiring};
use crate::k8s::crd::NixImage;
use crate::k8s::lease;
use crate::k8s::reconcile::{error_policy, reconcile};
use crate::k8s::status::{PHASE_BUILDING, PHASE_FAILED, PHASE_PENDING, PHASE_READY};
use crate::metrics::PhaseLabel;

/// How often released pre-pulled images that a container used are looked at
/// again (a sweep with nothing released asks the runtime nothing).
const PRE_PULL_SWEEP: Duration = Duration::from_secs(30);

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

    // Pre-pulled images a container kept in use are removed once it is gone.
    if let Some(prepull) = ctx.prepull.clone() {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PRE_PULL_SWEEP).await;
                prepull.sweep().await;
            }
        });
    }

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
            // The other systems' images the entry lists, where catalogued.
            let own = mine
                .and_then(|n| n.arch.as_deref())
                .and_then(crate::name::Arch::parse);
            let others = mine
                .map(|n| n.platforms.as_slice())
                .unwrap_or_default()
                .iter()
                .filter(|p| p.digest != digest.as_str())
                .filter_map(|p| {
                    let arch = crate::name::Arch::parse(&p.architecture)?;
                    Some((
                        arch,
                        ctx.catalog.image_with_digest(&p.digest.parse().ok()?)?,
                    ))
                })
                .collect();
            ctx.catalog.named.set(
                &ns,
                &name,
                NamedEntry::Ready {
                    tag: obj.spec.tag.clone(),
                    image,
                    arch: own.unwrap_or_else(|| ctx.builder.systems()[0]),
                    others,
                },
            );
            restored += 1;
        }
    }
    restored
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
