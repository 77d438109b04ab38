//! SLSA Provenance v1 in an in-toto Statement v1, pure: which source at
//! which revision, the names asked for and what they resolved to, the
//! derivations and outputs, the builder and the settings that shape the image.

use serde_json::{json, Value};

use super::Facts;
use crate::nix::Source;

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const SLSA_PROVENANCE_V1: &str = "https://slsa.dev/provenance/v1";
/// Our build type (a URN: the project has no web address of its own yet);
/// what `externalParameters` and `internalParameters` mean is documented in
/// docs/supply-chain.md.
pub const BUILD_TYPE: &str = "urn:nixery:buildtype:image:v1";

/// The source as a resource descriptor: URI and, where it is pinned, digest.
fn source_descriptor(source: &Source, revision: &str) -> Value {
    match source {
        Source::Path(p) => json!({ "uri": format!("file://{}", p.display()) }),
        Source::Git { url } => {
            let url = crate::nix::redact_url(url);
            if crate::nix::is_commit(revision) {
                json!({ "uri": format!("git+{url}@{revision}"), "digest": { "gitCommit": revision } })
            } else {
                json!({ "uri": format!("git+{url}@{revision}") })
            }
        }
        Source::Channel(_) => {
            json!({ "uri": crate::nix::redact_url(&source.channel_url().unwrap_or_default()) })
        }
        Source::PinnedChannel { url, sha256 } => json!({
            "uri": crate::nix::redact_url(url),
            "annotations": { "nixUnpackedSha256": sha256 },
        }),
    }
}

/// The in-toto predicate alone (cosign attests a predicate).
pub fn predicate(facts: &Facts) -> Value {
    let mut resolved = vec![{
        let mut s = source_descriptor(facts.source, facts.revision);
        s["name"] = json!("source");
        s
    }];
    for r in facts.resolved {
        let mut d = json!({
            "name": r.attr,
            "uri": format!("nix:{}", r.out),
            "annotations": { "requested": r.name },
        });
        if let Some(drv) = facts.derivation_of(&r.out) {
            d["annotations"]["derivation"] = json!(drv);
        }
        if let Some(h) = facts
            .closure
            .iter()
            .find(|p| p.path == r.out)
            .and_then(|p| super::sbom::nar_hash_hex(&p.nar_hash))
        {
            d["digest"] = json!({ "sha256": h });
        }
        resolved.push(d);
    }
    json!({
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {
                "repository": facts.repository,
                "packages": facts.resolved.iter().map(|r| r.name.clone()).collect::<Vec<_>>(),
                "source": source_descriptor(facts.source, facts.revision),
                "revision": facts.revision,
            },
            "internalParameters": facts.settings,
            "resolvedDependencies": resolved,
        },
        "runDetails": {
            "builder": {
                "id": format!("urn:nixery:builder:{}", facts.builder_version),
                "version": { "nixery": facts.builder_version },
            },
            "metadata": { "invocationId": facts.subject.digest.to_string() },
        },
    })
}

/// An in-toto Statement v1 about the image with this predicate.
pub fn statement(
    repository: &str,
    subject: &crate::name::Digest,
    predicate_type: &str,
    predicate: Value,
) -> Value {
    json!({
        "_type": STATEMENT_TYPE,
        "subject": [{
            "name": repository,
            "digest": { "sha256": subject.hex() },
        }],
        "predicateType": predicate_type,
        "predicate": predicate,
    })
}
