//! Node liveness the Kubernetes way: each agent holds a `coordination.k8s.io`
//! Lease that it renews, as the kubelet does; a node whose Lease expired has
//! left, and the live agents stop waiting for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use serde_json::json;

use crate::registry::Readiness;

/// How long a Lease holds without renewal, and how often it is renewed
/// (the kubelet's node lease uses the same 40 s and 10 s).
pub const LEASE_DURATION: Duration = Duration::from_secs(40);
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// Label on every agent Lease, which the agents watch.
pub const LEASE_LABEL: &str = "app.kubernetes.io/component";
pub const LEASE_LABEL_VALUE: &str = "nixery-node-lease";

/// The Lease name of a node's agent.
pub fn lease_name(node: &str) -> String {
    format!("nixery-node-{}", crate::k8s::names::short(node, 240))
}

/// Creates or renews this node's Lease (server-side apply, one field manager
/// per node).
pub async fn renew(api: &Api<Lease>, node: &str, manager: &str) -> Result<(), kube::Error> {
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": lease_name(node),
            "labels": { LEASE_LABEL: LEASE_LABEL_VALUE },
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": LEASE_DURATION.as_secs(),
            "renewTime": MicroTime(Timestamp::now()),
        }
    });
    api.patch(
        &lease_name(node),
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&lease),
    )
    .await
    .map(|_| ())
}

/// The readiness part this module owns.
pub const READINESS_PART: &str = "lease";

/// Renews this node's Lease forever. The agent is not ready while it cannot
/// hold it: at once when the API server refuses (the namespace does not
/// exist, RBAC denies it), and when renewals have failed for longer than the
/// Lease lasts (the other agents count this node as gone by then). Each new
/// reason is logged once, in one line, as /readyz says it.
pub async fn keep_renewing(
    api: Api<Lease>,
    node: String,
    manager: String,
    readiness: Arc<Readiness>,
) {
    let namespace = api.namespace().unwrap_or("default").to_string();
    let mut held_at: Option<Instant> = None;
    loop {
        match renew(&api, &node, &manager).await {
            Ok(()) => {
                held_at = Some(Instant::now());
                if readiness.clear(READINESS_PART) {
                    tracing::info!(lease = %lease_name(&node), namespace, "holding this node's Lease");
                }
            }
            Err(e) => {
                let why = cannot_hold(&namespace, &node, &e);
                let refused = matches!(&e, kube::Error::Api(s) if (400..500).contains(&s.code));
                let lapsed = held_at.is_none_or(|t| t.elapsed() >= LEASE_DURATION);
                if refused || lapsed {
                    if readiness.wait_for(READINESS_PART, why.clone()) {
                        tracing::error!("not ready: {why}");
                    }
                } else {
                    tracing::warn!("{why} (retrying; the Lease still holds)");
                }
            }
        }
        tokio::time::sleep(RENEW_EVERY).await;
    }
}

/// One line on why this node's Lease cannot be held, with what to change.
pub fn cannot_hold(namespace: &str, node: &str, e: &kube::Error) -> String {
    let lease = format!("{namespace}/{}", lease_name(node));
    match e {
        kube::Error::Api(s) if s.code == 404 => format!(
            "cannot hold this node's Lease {lease}: {} (create the namespace, or point --lease-namespace at one that exists)",
            s.message
        ),
        kube::Error::Api(s) if s.code == 403 => format!(
            "cannot hold this node's Lease {lease}: {} (the agent's RBAC must allow get, list, watch, create and patch on leases in {namespace})",
            s.message
        ),
        kube::Error::Api(s) => format!("cannot hold this node's Lease {lease}: {}", s.message),
        other => format!("cannot hold this node's Lease {lease}: {other}"),
    }
}

/// What the agents know of each other.
pub trait Liveness: Send + Sync {
    /// When `node`'s Lease expires (or expired); None when it has none. A node
    /// without a Lease (an agent from before Leases) is never counted as gone.
    fn expires(&self, node: &str) -> Option<Timestamp>;

    /// The nodes that hold a Lease, expired or not.
    fn holders(&self) -> Vec<String>;

    /// Whether `node` has left: its Lease expired at `now`.
    fn departed(&self, node: &str, now: Timestamp) -> bool {
        self.expires(node).is_some_and(|t| t <= now)
    }
}

impl Liveness for Store<Lease> {
    fn holders(&self) -> Vec<String> {
        self.state()
            .iter()
            .filter_map(|l| l.spec.as_ref()?.holder_identity.clone())
            .collect()
    }

    fn expires(&self, node: &str) -> Option<Timestamp> {
        self.state()
            .iter()
            .filter_map(|l| {
                let spec = l.spec.as_ref()?;
                if spec.holder_identity.as_deref() != Some(node) {
                    return None;
                }
                let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
                let secs = spec.lease_duration_seconds.unwrap_or(0).max(0);
                renewed.checked_add(jiff_secs(secs as u64)).ok()
            })
            .max()
    }
}

fn jiff_secs(secs: u64) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_secs(secs as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};

    fn lease(node: &str, renewed_secs_ago: i64, duration: i32) -> Lease {
        serde_json::from_value(json!({
            "metadata": { "name": lease_name(node), "namespace": "nixery-system" },
            "spec": {
                "holderIdentity": node,
                "leaseDurationSeconds": duration,
                "renewTime": MicroTime(Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(renewed_secs_ago)),
            }
        }))
        .unwrap()
    }

    #[test]
    fn expired_leases_mean_departed_nodes() {
        let (store, mut writer) = reflector::store::<Lease>();
        writer.apply_watcher_event(&watcher::Event::Apply(lease("alive", 5, 40)));
        writer.apply_watcher_event(&watcher::Event::Apply(lease("gone", 100, 40)));
        let now = Timestamp::now();
        assert!(!store.departed("alive", now));
        assert!(store.departed("gone", now));
        // No Lease at all: an older agent, never counted as gone.
        assert!(!store.departed("never-had-one", now));
        assert_eq!(store.expires("never-had-one"), None);
    }

    #[test]
    fn lease_names_are_valid_for_long_node_names() {
        assert_eq!(lease_name("node-1"), "nixery-node-node-1");
        assert!(lease_name(&"n".repeat(300)).len() <= 253);
    }
}
