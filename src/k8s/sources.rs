//! What a NixImage asks to build: its spec checked and turned into the
//! pipeline's request, and a moving source (a git branch or tag, a channel)
//! pinned to one revision that every node builds.

use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::ResourceExt;
use serde_json::json;
use tracing::{info, warn};

use crate::builder::ImageSpec;
use crate::k8s::context::{Context, Error};
use crate::k8s::crd::{NixImage, NixImageSpec};
use crate::k8s::names::{API_VERSION, REVISION_MANAGER};
use crate::name;
use crate::nix::Source;
use crate::oci::RunConfig;

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
        out.source = Some(match (&src.path, &src.repo, &src.channel, &src.flake) {
            (Some(p), None, None, None) => Source::Path(p.into()),
            (None, Some(r), None, None) => Source::Git { url: r.clone() },
            (None, None, Some(c), None) => Source::Channel(c.clone()),
            (None, None, None, Some(f)) => Source::Flake {
                reference: f.clone(),
            },
            _ => {
                return Err("spec.source must set exactly one of path, repo, channel, flake".into())
            }
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

/// What a moving source names now.
pub(super) enum Pin {
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

/// Makes the pipeline's request build the pinned revision: a flake's locked
/// reference, a channel's tarball with its pinned contents, else the git
/// commit as the tag.
pub fn pin_spec(spec: &mut ImageSpec, source: &Source, revision: &str) {
    if let Source::Flake { reference } = source {
        spec.source = Some(Source::PinnedFlake {
            locked: with_credentials_of(revision, reference),
        });
        return;
    }
    match (
        source.channel_url(),
        revision.strip_prefix(CHANNEL_REVISION_PREFIX),
    ) {
        (Some(url), Some(sha256)) => {
            spec.source = Some(Source::PinnedChannel {
                url,
                sha256: sha256.to_string(),
            })
        }
        _ => spec.tag = revision.to_string(),
    }
}

/// A locked flake reference as `status.revision` shows it (credentials
/// redacted, as everywhere in status) made whole again from the spec's
/// reference, which has them.
fn with_credentials_of(revision: &str, reference: &str) -> String {
    let userinfo = reference
        .split_once("://")
        .and_then(|(_, rest)| rest.split('/').next()?.rsplit_once('@'))
        .map(|(u, _)| u);
    match userinfo {
        Some(u) => revision.replacen("://***@", &format!("://{u}@"), 1),
        None => revision.to_string(),
    }
}

/// For a git source at a branch or tag: the commit it names; for a flake:
/// its locked reference (with `rev` and `narHash`); for a channel:
/// the hash of its tarball's contents. Resolved once and shared by every node
/// through `status.revision`, resolved again after the cache TTL (written only
/// when it changed, so agents that agree write nothing), or at once when a
/// node found the pinned tarball changed. For any other source, None (and an
/// old revision is cleared).
pub(super) async fn pin_revision(
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
        Source::Flake { reference } => crate::nix::redact_url(reference),
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
        Source::Flake { reference } => ctx.builder.lock_flake(reference).await.map(|l| {
            l.map(|l| crate::nix::redact_url(&l.url)).ok_or_else(|| {
                format!(
                    "the flake {of} names nothing: no such repository, path, branch, tag or commit, or no flake.nix there"
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

#[cfg(test)]
mod tests {
    use super::*;

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
            flake: None,
        });
        assert!(image_spec(&s, &path).is_err());
        s.source = Some(crate::k8s::crd::PackageSource {
            repo: Some("b".into()),
            ..Default::default()
        });
        assert_eq!(image_spec(&s, &path).unwrap().tag, "v1");
    }

    #[test]
    fn a_flake_builds_its_locked_reference_with_the_specs_credentials() {
        let locked = "git+https://***@git.example.com/app?ref=main&rev=0123456789abcdef0123456789abcdef01234567&narHash=sha256-x";
        let flake = Source::Flake {
            reference: "git+https://bot:s3cret@git.example.com/app?ref=main".into(),
        };
        let mut spec = ImageSpec::ad_hoc(
            &name::parse_packages(&["default".to_string()]).unwrap(),
            "latest",
        );
        pin_spec(&mut spec, &flake, locked);
        assert_eq!(spec.tag, "latest");
        assert_eq!(
            spec.source,
            Some(Source::PinnedFlake {
                locked: locked.replace("***", "bot:s3cret")
            })
        );
        let plain = Source::Flake {
            reference: "github:acme/app".into(),
        };
        pin_spec(&mut spec, &plain, "github:acme/app/0123?narHash=sha256-x");
        assert_eq!(
            spec.source,
            Some(Source::PinnedFlake {
                locked: "github:acme/app/0123?narHash=sha256-x".into()
            })
        );
        // A flake's tag is not a revision: `spec.tag` only names the image.
        let mut s = NixImageSpec {
            contents: vec!["default".into()],
            tag: "v1".into(),
            source: Some(crate::k8s::crd::PackageSource {
                flake: Some("github:acme/app".into()),
                ..Default::default()
            }),
            config: None,
        };
        let out = image_spec(&s, &Source::Path("/p".into())).unwrap();
        assert_eq!((out.tag.as_str(), out.source), ("latest", Some(plain)));
        s.source.as_mut().unwrap().repo = Some("file:///r".into());
        assert!(image_spec(&s, &Source::Path("/p".into())).is_err());
    }

    #[test]
    fn a_pinned_revision_is_what_gets_built() {
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let git = Source::Git {
            url: "file:///r".into(),
        };
        let mut spec = ImageSpec::ad_hoc(
            &name::parse_packages(&["curl".to_string()]).unwrap(),
            "main",
        );
        pin_spec(&mut spec, &git, commit);
        assert_eq!((spec.tag.as_str(), spec.source.as_ref()), (commit, None));

        let channel = Source::Channel("nixos-24.05".into());
        let mut spec = ImageSpec::ad_hoc(
            &name::parse_packages(&["curl".to_string()]).unwrap(),
            "latest",
        );
        pin_spec(&mut spec, &channel, "sha256:abc");
        assert_eq!(spec.tag, "latest");
        assert_eq!(
            spec.source,
            Some(Source::PinnedChannel {
                url: channel.channel_url().unwrap(),
                sha256: "abc".into()
            })
        );
    }
}
