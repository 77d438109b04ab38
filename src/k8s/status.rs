//! A NixImage's aggregate status, a pure function of its live nodes' entries:
//! every agent computes the same one, so agents that agree write nothing.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::k8s::crd::{NixImage, NixImageStatus, NodeStatus, PlatformImage};

/// The OCI image index of several architectures' images, and its bytes:
/// what every agent serves for the object's digest.
pub fn platform_index(platforms: &[PlatformImage]) -> Option<(crate::name::Digest, Vec<u8>)> {
    let mut listed = Vec::new();
    for p in platforms {
        let arch = crate::name::Arch::parse(&p.architecture)?;
        listed.push((arch, p.digest.parse().ok()?, u64::try_from(p.size).ok()?));
    }
    listed.sort();
    let bytes = crate::oci::index_of_digests(&listed);
    Some((crate::name::Digest::of(&bytes), bytes))
}

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

/// A build that failed for another reason: retried with backoff.
pub const REASON_BUILD_FAILED: &str = "BuildFailed";

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
    // Nodes agree only with nodes of their architecture: every image a
    // ready node built, by architecture (a node's own one is `digest`; an
    // entry without `arch` is of an agent from before architectures).
    let mut by_arch: BTreeMap<&str, BTreeMap<&str, i64>> = BTreeMap::new();
    for n in &ready {
        let own = n
            .digest
            .as_deref()
            .filter(|_| n.platforms.is_empty())
            .map(|d| (n.arch.as_deref().unwrap_or(""), d, 0));
        let all = n
            .platforms
            .iter()
            .map(|p| (p.architecture.as_str(), p.digest.as_str(), p.size))
            .chain(own);
        for (arch, digest, size) in all {
            by_arch.entry(arch).or_default().insert(digest, size);
        }
    }
    let disagree: Vec<String> = by_arch
        .iter()
        .filter(|(_, d)| d.len() > 1)
        .map(|(arch, d)| {
            let list = d.keys().cloned().collect::<Vec<_>>().join(", ");
            if arch.is_empty() {
                list
            } else {
                format!("{arch}: {list}")
            }
        })
        .collect();
    // What the object names: the one image, or with several architectures
    // the index of their images, the same bytes whichever agent makes it.
    let platforms: Vec<PlatformImage> = by_arch
        .iter()
        .filter(|(arch, d)| !arch.is_empty() && d.len() == 1)
        .map(|(arch, d)| {
            let (digest, size) = d.iter().next().expect("one");
            PlatformImage {
                architecture: arch.to_string(),
                digest: digest.to_string(),
                size: *size,
            }
        })
        .collect();
    let digest = if !disagree.is_empty() || by_arch.is_empty() {
        None
    } else if platforms.len() > 1 && platforms.len() == by_arch.len() {
        platform_index(&platforms).map(|(d, _)| d.to_string())
    } else if by_arch.len() == 1 {
        by_arch
            .values()
            .next()
            .and_then(|d| d.keys().next())
            .map(|d| d.to_string())
    } else {
        // Entries with and without an architecture: the newer ones name it.
        platforms.first().map(|p| p.digest.clone())
    };
    let total = nodes.len();
    let (phase, reason, message) = if total == 0 {
        (
            PHASE_PENDING,
            "NoNodes".to_string(),
            "no node has picked the image up yet".to_string(),
        )
    } else if !disagree.is_empty() {
        (
            PHASE_INCONSISTENT,
            "DigestMismatch".to_string(),
            format!("nodes built different digests: {}", disagree.join("; ")),
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
    let one = digest.is_some() && phase != PHASE_INCONSISTENT;
    let sample = ready.first();
    // The repository most ready nodes give (nodes may serve on different
    // hosts or ports during a rollout; ties go to the smallest, so all
    // agents agree), at the object's digest.
    let image = one
        .then(|| {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for n in &ready {
                if let Some(i) = n.image.as_deref() {
                    *counts
                        .entry(i.split_once('@').map_or(i, |(r, _)| r))
                        .or_default() += 1;
                }
            }
            let best = counts.values().copied().max()?;
            counts
                .into_iter()
                .find(|(_, c)| *c == best)
                .map(|(i, _)| format!("{i}@{}", digest.as_deref().unwrap_or_default()))
        })
        .flatten();
    NixImageStatus {
        observed_generation: nodes.iter().map(|n| n.observed_generation).min(),
        phase: Some(phase.into()),
        image,
        digest: digest.clone().filter(|_| one),
        platforms: if one { platforms } else { vec![] },
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
        sbom: if one {
            sample.and_then(|n| n.sbom.clone())
        } else {
            None
        },
        signature: if one {
            sample.and_then(|n| n.signature.clone())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::names::API_VERSION;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

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

    fn on(node: &str, arch: &str, digest: &str, size: i64) -> serde_json::Value {
        let mut n = ready(node, 1, digest, "127.0.0.1:5000");
        n["arch"] = json!(arch);
        n["platforms"] = json!([{ "architecture": arch, "digest": digest, "size": size }]);
        n
    }

    /// Nodes agree only with nodes of their architecture; the object names
    /// the index of every architecture's image.
    #[test]
    fn architectures_are_compared_apart_and_indexed_together() {
        let now = Time(Timestamp::UNIX_EPOCH);
        let live = |_: &str| false;
        let (amd, arm) = (
            format!("sha256:{}", "a".repeat(64)),
            format!("sha256:{}", "b".repeat(64)),
        );
        let mixed = object(
            1,
            json!([
                on("a1", "amd64", &amd, 500),
                on("a2", "amd64", &amd, 500),
                on("b", "arm64", &arm, 501)
            ]),
        );
        let s = aggregate(&mixed, &live, now.clone());
        assert_eq!(s.phase.as_deref(), Some(PHASE_READY));
        assert_eq!(s.ready_nodes.as_deref(), Some("3/3"));
        let (index, bytes) = platform_index(&s.platforms).unwrap();
        assert_eq!(s.digest.as_deref(), Some(index.as_str()));
        assert_eq!(
            s.image.as_deref(),
            Some(format!("127.0.0.1:5000/niximage/default/img:v1@{index}").as_str())
        );
        let listed: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(listed["manifests"][0]["digest"], amd.as_str());
        assert_eq!(listed["manifests"][0]["size"], 500);
        assert_eq!(listed["manifests"][1]["platform"]["architecture"], "arm64");
        // The same status, whichever order the entries come in.
        let reordered = object(
            1,
            json!([
                on("b", "arm64", &arm, 501),
                on("a2", "amd64", &amd, 500),
                on("a1", "amd64", &amd, 500)
            ]),
        );
        assert_eq!(aggregate(&reordered, &live, now.clone()).digest, s.digest);

        // Two nodes of one architecture that disagree: Inconsistent, saying which.
        let other = format!("sha256:{}", "c".repeat(64));
        let split = object(
            1,
            json!([
                on("a1", "amd64", &amd, 500),
                on("a2", "amd64", &other, 500),
                on("b", "arm64", &arm, 501)
            ]),
        );
        let s = aggregate(&split, &live, now.clone());
        assert_eq!(s.phase.as_deref(), Some(PHASE_INCONSISTENT));
        assert!(
            s.conditions[0]
                .message
                .starts_with("nodes built different digests: amd64: "),
            "{}",
            s.conditions[0].message
        );
        assert_eq!((s.digest, s.image), (None, None));

        // One architecture: the object names its manifest, as before.
        let single = object(1, json!([on("a1", "amd64", &amd, 500)]));
        assert_eq!(
            aggregate(&single, &live, now).digest.as_deref(),
            Some(amd.as_str())
        );
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
}
