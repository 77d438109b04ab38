//! What goes when objects or nodes go. No finalizers: nothing may hold up a
//! deletion or an uninstall.
//!
//! Each agent drops a deleted object's image and GC roots when its watch
//! reports the deletion, and, for deletions it missed (it was down, or its
//! watch was re-listed), at every sync of the watch by comparing the catalog
//! with the objects that exist. A node whose Lease expired has left: the live
//! agents remove its status entry. Finalizers written by older agents are removed.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::json;
use tracing::{info, warn};

use crate::k8s::context::{Context, Error, NodeBuild};
use crate::k8s::crd::NixImage;
use crate::k8s::names::{finalizer_of, FINALIZER_PREFIX};

/// Removes the status entries and finalizers of nodes whose Lease expired.
/// JSON patches with a `test` of each index, so a concurrent change makes the
/// patch fail (and the reconcile retry) rather than remove the wrong entry.
pub(super) async fn sweep_departed(
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
pub(super) async fn drop_legacy_finalizer(
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
    if let Some(prepull) = &ctx.prepull {
        prepull.release(&format!("{namespace}/{name}")).await;
    }
    match ctx.builder.gc().drop_object(namespace, name).await {
        Ok(_) => info!(namespace, name, "dropped the image of a deleted NixImage"),
        Err(e) => warn!(namespace, name, error = %e, "dropping a deleted NixImage's images"),
    }
}

/// Stops the object's build and forgets what this agent kept of it in memory.
pub(super) fn forget_uid(ctx: &Context, uid: &str) {
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
    let mut objects = ctx.catalog.objects();
    if let Some(prepull) = &ctx.prepull {
        objects.extend(prepull.objects());
    }
    for object in objects {
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
