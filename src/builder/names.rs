//! What names mean in a package source: the cache of answers per source
//! revision (so a repeated unknown name costs no evaluation), locking a
//! flake, and Nix's failures told apart (a revision or lock that is the
//! user's to fix, not a failed build).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::{BuildError, Builder, ImageSpec};
use crate::nix::{NixError, Prepared, Source};

/// Most source revisions answered at once; past it, expired ones go, then all.
const MAX_REVISIONS: usize = 64;
/// Most names answered for one revision; past it, its answers start over.
const MAX_NAMES: usize = 50_000;

/// Whether each name exists in one package source revision, and until when
/// the answer holds (None: for good, as for a git commit).
type NameAnswers = (HashMap<String, bool>, Option<Instant>);

/// Answers per revision (`revision_key`), bounded.
#[derive(Default)]
pub struct NameCache(Mutex<HashMap<String, NameAnswers>>);

/// The revision names are answered for: the source (a flake's locked
/// form), the tag, the architecture.
pub fn revision_key(source: &Source, spec: &ImageSpec) -> String {
    format!("{source:?}\0{}\0{:?}", spec.tag, spec.arch)
}

impl NameCache {
    /// The names of `packages` known not to exist, when every one of them
    /// has an answer (fresh at `now`) and some are unknown; else None (ask Nix).
    pub fn known_unknown(
        &self,
        revision: &str,
        packages: &[String],
        now: Instant,
    ) -> Option<Vec<String>> {
        let mut names = self.0.lock().unwrap();
        let (answers, until) = names.get(revision)?;
        if until.is_some_and(|t| now >= t) {
            names.remove(revision);
            return None;
        }
        if !packages.iter().all(|p| answers.contains_key(p)) {
            return None;
        }
        let unknown: Vec<String> = packages.iter().filter(|p| !answers[*p]).cloned().collect();
        (!unknown.is_empty()).then_some(unknown)
    }

    /// Records Nix's answer for `packages`: those in `unknown` do not exist,
    /// the others do (each name resolves on its own), until `until`.
    pub fn record(
        &self,
        revision: &str,
        packages: &[String],
        unknown: &[String],
        until: Option<Instant>,
        now: Instant,
    ) {
        let mut names = self.0.lock().unwrap();
        // Bounded: a few revisions at a time, and a name flood clears its
        // revision's answers rather than growing them without end.
        if names.len() >= MAX_REVISIONS && !names.contains_key(revision) {
            names.retain(|_, (_, until)| until.is_none_or(|t| now < t));
            if names.len() >= MAX_REVISIONS {
                names.clear();
            }
        }
        let (answers, _) = names
            .entry(revision.to_string())
            .or_insert_with(|| (HashMap::new(), until));
        if answers.len() > MAX_NAMES {
            answers.clear();
        }
        for p in packages {
            answers.insert(p.clone(), !unknown.contains(p));
        }
    }

    /// How many revisions have answers.
    #[cfg(test)]
    pub fn revisions(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A failed evaluation as the user should hear it: a commit the repository
/// lacks is `UnknownRevision`, a flake whose lock file Nix would have to
/// write is `UnlockedFlake`; anything else is Nix's failure.
pub fn evaluation_error(source: &Source, tag: &str, e: NixError) -> BuildError {
    match &e {
        // A commit the repository does not have.
        NixError::Failed { log, .. }
            if matches!(source, Source::Git { .. })
                && log.contains(tag)
                && (log.contains("Cannot find Git revision")
                    || log.contains("not found")
                    || log.contains("bad object")) =>
        {
            BuildError::UnknownRevision(tag.to_string())
        }
        // Nix 2.8's getFlake locks a flake's inputs only by writing its
        // flake.lock, which nixery never does.
        NixError::Failed { log, .. }
            if matches!(source, Source::PinnedFlake { .. })
                && log.contains("cannot write modified lock file") =>
        {
            BuildError::UnlockedFlake(source.describe())
        }
        _ => BuildError::Nix(e),
    }
}

impl Builder {
    /// The names of a spec that its package source lacks (none: all exist),
    /// from the cache of name answers or one evaluation.
    pub async fn unknown_names(&self, spec: &ImageSpec) -> Result<Vec<String>, BuildError> {
        let source = spec
            .source
            .clone()
            .unwrap_or_else(|| self.cfg.source.clone());
        let source = self.locked(&source).await?;
        match self.resolve(&source, spec, &spec.all_packages()).await {
            Ok(_) => Ok(vec![]),
            Err(BuildError::UnknownPackages(names)) => Ok(names),
            Err(e) => Err(e),
        }
    }

    /// A flake locked to what its reference names now (the image records
    /// the locked form, and its names are looked up in exactly that tree);
    /// any other source as it is.
    pub async fn locked(&self, source: &Source) -> Result<Source, BuildError> {
        let Source::Flake { reference } = source else {
            return Ok(source.clone());
        };
        match self.nix.lock_flake(reference).await? {
            Some(l) => Ok(Source::PinnedFlake { locked: l.url }),
            None => Err(BuildError::UnknownFlake(crate::nix::redact_url(reference))),
        }
    }

    /// A flake reference's locked form (None: it names nothing), for the
    /// controller's pin.
    pub async fn lock_flake(
        &self,
        reference: &str,
    ) -> Result<Option<crate::nix::flake::LockedFlake>, NixError> {
        self.nix.lock_flake(reference).await
    }

    /// Asks Nix what the names mean, unless every answer is known for this
    /// package source revision and one of them is "unknown".
    pub(super) async fn resolve(
        &self,
        source: &Source,
        spec: &ImageSpec,
        packages: &[String],
    ) -> Result<Prepared, BuildError> {
        let revision = revision_key(source, spec);
        if let Some(unknown) = self
            .names
            .known_unknown(&revision, packages, Instant::now())
        {
            self.metrics.unknown_cached.inc();
            return Err(BuildError::UnknownPackages(unknown));
        }
        // A branch or tag that does not exist is the user's error, said as
        // such (Nix would fail with the repository's path in its words).
        if let Source::Git { url } = source {
            if !crate::nix::is_commit(&spec.tag)
                && matches!(crate::nix::resolve_git_ref(url, &spec.tag).await, Ok(None))
            {
                return Err(BuildError::UnknownRevision(spec.tag.clone()));
            }
        }
        let prepared = self
            .nix
            .prepare(source, &spec.tag, packages, spec.arch.nix_system())
            .await
            .map_err(|e| evaluation_error(source, &spec.tag, e))?;
        let until =
            (!source.is_immutable_at(&spec.tag)).then(|| Instant::now() + self.cfg.mutable_ttl);
        self.names.record(
            &revision,
            packages,
            &prepared.unknown,
            until,
            Instant::now(),
        );
        if prepared.unknown.is_empty() {
            Ok(prepared)
        } else {
            Err(BuildError::UnknownPackages(prepared.unknown))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_unknown_name_is_answered_from_the_cache_until_its_revision_may_move() {
        let cache = NameCache::default();
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        cache.record(
            "rev",
            &names(&["curl", "nope"]),
            &names(&["nope"]),
            Some(later),
            now,
        );
        assert_eq!(
            cache.known_unknown("rev", &names(&["curl", "nope"]), now),
            Some(names(&["nope"]))
        );
        // All known and all there: Nix is asked (the image may need building).
        assert_eq!(cache.known_unknown("rev", &names(&["curl"]), now), None);
        // A name never asked about: Nix is asked.
        assert_eq!(
            cache.known_unknown("rev", &names(&["nope", "jq"]), now),
            None
        );
        // Another revision knows nothing.
        assert_eq!(cache.known_unknown("other", &names(&["nope"]), now), None);
        // Past the TTL the answers go.
        assert_eq!(cache.known_unknown("rev", &names(&["nope"]), later), None);
        assert_eq!(cache.revisions(), 0);
        // A commit's answers hold for good.
        cache.record("commit", &names(&["nope"]), &names(&["nope"]), None, now);
        assert_eq!(
            cache.known_unknown(
                "commit",
                &names(&["nope"]),
                now + Duration::from_secs(1 << 30)
            ),
            Some(names(&["nope"]))
        );
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = NameCache::default();
        let now = Instant::now();
        let soon = Some(now + Duration::from_secs(1));
        for i in 0..MAX_REVISIONS {
            cache.record(
                &format!("r{i}"),
                &names(&["x"]),
                &[],
                if i % 2 == 0 { soon } else { None },
                now,
            );
        }
        assert_eq!(cache.revisions(), MAX_REVISIONS);
        // One more, after half expired: the expired ones go.
        let after = now + Duration::from_secs(2);
        cache.record("new", &names(&["x"]), &[], None, after);
        assert_eq!(cache.revisions(), MAX_REVISIONS / 2 + 1);
        // Full of answers that hold for good: they all go.
        for i in 0..MAX_REVISIONS {
            cache.record(&format!("k{i}"), &names(&["x"]), &[], None, after);
        }
        assert!(cache.revisions() <= MAX_REVISIONS);
    }

    #[test]
    fn failures_that_are_the_users_are_told_apart() {
        let failed = |log: &str| NixError::Failed {
            stage: "evaluating the package set",
            log: log.into(),
        };
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let git = Source::Git {
            url: "file:///r".into(),
        };
        let e = evaluation_error(
            &git,
            commit,
            failed(&format!(
                "error: Cannot find Git revision '{commit}' in ref 'HEAD'"
            )),
        );
        assert!(matches!(e, BuildError::UnknownRevision(r) if r == commit));
        let flake = Source::PinnedFlake {
            locked: "path:/f?narHash=sha256-x".into(),
        };
        let e = evaluation_error(
            &flake,
            "latest",
            failed("error: cannot write modified lock file of flake 'path:/f'"),
        );
        assert!(matches!(e, BuildError::UnlockedFlake(_)));
        // The same words from another source, or other words: Nix's failure.
        let e = evaluation_error(
            &git,
            commit,
            failed("error: cannot write modified lock file"),
        );
        assert!(matches!(e, BuildError::Nix(_)));
        let e = evaluation_error(&flake, "latest", failed("error: attribute 'x' missing"));
        assert!(matches!(e, BuildError::Nix(_)));
    }
}
