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
        Source::Flake { reference } => json!({ "uri": crate::nix::redact_url(reference) }),
        // The locked reference, its commit as the digest where it has one,
        // and the NAR hash of its source tree.
        Source::PinnedFlake { locked } => {
            let mut d = json!({ "uri": crate::nix::redact_url(locked) });
            if let Some(rev) = crate::nix::flake::query_value(locked, "rev")
                .or_else(|| locked_path_rev(locked))
                .filter(|r| crate::nix::is_commit(r))
            {
                d["digest"] = json!({ "gitCommit": rev });
            }
            if let Some(h) = crate::nix::flake::query_value(locked, "narHash") {
                d["annotations"] = json!({ "narHash": h });
            }
            d
        }
    }
}

/// The commit of a locked `github:`/`gitlab:`/`sourcehut:` reference, which
/// Nix writes as the path's third part (`github:acme/app/<rev>`).
fn locked_path_rev(locked: &str) -> Option<String> {
    let path = locked.split(['?', '#']).next()?;
    let (scheme, rest) = path.split_once(':')?;
    if !matches!(scheme, "github" | "gitlab" | "sourcehut") {
        return None;
    }
    rest.split('/').nth(2).map(str::to_string)
}

/// The source as one line, for an SBOM: its URI (a flake's locked
/// reference, a git repository at its revision, a channel's URL).
pub fn source_uri(source: &Source, revision: &str) -> String {
    source_descriptor(source, revision)["uri"]
        .as_str()
        .unwrap_or_default()
        .to_string()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_flake_names_its_commit_and_tree() {
        let rev = "1e73408a20146497888827094581836564add8d0";
        let git = Source::PinnedFlake {
            locked: format!(
                "git+https://bot:tok@git.example.com/app?ref=main&rev={rev}&narHash=sha256-3tqz%3D"
            ),
        };
        let d = source_descriptor(&git, "latest");
        assert_eq!(
            d["uri"],
            format!(
                "git+https://***@git.example.com/app?ref=main&rev={rev}&narHash=sha256-3tqz%3D"
            )
        );
        assert_eq!(d["digest"]["gitCommit"], rev);
        assert_eq!(d["annotations"]["narHash"], "sha256-3tqz=");
        let github = Source::PinnedFlake {
            locked: format!("github:acme/app/{rev}?narHash=sha256-x"),
        };
        assert_eq!(
            source_descriptor(&github, "latest")["digest"]["gitCommit"],
            rev
        );
        // A path flake has its tree's hash and no commit.
        let path = Source::PinnedFlake {
            locked: "path:/src/app?lastModified=1&narHash=sha256-y".into(),
        };
        let d = source_descriptor(&path, "latest");
        assert!(d.get("digest").is_none());
        assert_eq!(
            source_uri(&path, "latest"),
            "path:/src/app?lastModified=1&narHash=sha256-y"
        );
    }
}
