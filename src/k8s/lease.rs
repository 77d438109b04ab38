//! Node liveness the Kubernetes way: each agent holds a `coordination.k8s.io`
//! Lease that it renews, as the kubelet does; a node whose Lease expired has
//! left, and the live agents stop waiting for it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::Store;
use serde_json::json;

/// How long a Lease holds without renewal, and how often it is renewed
/// (the kubelet's node lease uses the same 40 s and 10 s).
pub const LEASE_DURATION: Duration = Duration::from_secs(40);
pub const RENEW_EVERY: Duration = Duration::from_secs(10);
/// Label on every agent Lease, which the agents watch.
pub const LEASE_LABEL: &str = "app.kubernetes.io/component";
pub const LEASE_LABEL_VALUE: &str = "nixery-node-lease";

/// The Lease name of a node's agent.
pub fn lease_name(node: &str) -> String {
    format!("nixery-node-{}", crate::k8s::controller::short(node, 240))
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

/// Renews this node's Lease forever; failures are logged and retried.
pub async fn keep_renewing(api: Api<Lease>, node: String, manager: String) {
    loop {
        if let Err(e) = renew(&api, &node, &manager).await {
            tracing::warn!(error = %e, "renewing this node's lease");
        }
        tokio::time::sleep(RENEW_EVERY).await;
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
