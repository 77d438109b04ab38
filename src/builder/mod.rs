//! Building images: what to build (`ImageSpec`), how it can fail
//! (`BuildError`) and how far it got (`Progress`); what a build gives is
//! `crate::image::BuiltImage`. The steps are in `pipeline`; who builds what,
//! when and once, in `service`, with its keys (`keys`), name answers
//! (`names`), waiters (`flight`), queue (`queue`) and other instances
//! (`instances`).

mod flight;
mod instances;
mod keys;
mod names;
mod pipeline;
mod queue;
mod service;

pub use flight::{Build, Failure};
pub use service::{Builder, BuilderConfig};
// What a build gives lives below the builder and the catalog, which both use it.
pub use crate::image::BuiltImage;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest as _;

use crate::name::{AdHocImage, Arch};
use crate::nix::{NixError, Source};
use crate::oci::RunConfig;
use crate::store::StoreError;

/// Packages every image gets, as Nixery does.
pub const ALWAYS: &[&str] = &["cacert", "iana-etc"];
/// What the `shell` meta-package stands for, as in Nixery.
pub const SHELL: &[&str] = &["bashInteractive", "coreutils", "moreutils", "nano"];

/// What to build: a package set at a tag, for an architecture, with a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// The packages the user asked for (metas expanded, sorted, unique).
    pub packages: Vec<String>,
    pub arch: Arch,
    pub tag: String,
    pub run: RunConfig,
    /// Overrides the builder's package source (NixImage `spec.source`).
    pub source: Option<Source>,
    /// The repository it is asked under (canonical name), if any.
    pub repository: Option<String>,
}

impl ImageSpec {
    pub fn ad_hoc(img: &AdHocImage, tag: &str) -> Self {
        let mut packages: BTreeSet<String> = img.packages.clone();
        if img.shell {
            packages.extend(SHELL.iter().map(|s| s.to_string()));
        }
        ImageSpec {
            packages: packages.into_iter().collect(),
            arch: img.arch,
            tag: tag.to_string(),
            run: RunConfig::default(),
            source: None,
            repository: Some(img.name()),
        }
    }

    /// Everything Nix is asked for: the user's packages and the ones every image gets.
    fn all_packages(&self) -> Vec<String> {
        let set: BTreeSet<String> = self
            .packages
            .iter()
            .cloned()
            .chain(ALWAYS.iter().map(|s| s.to_string()))
            .collect();
        set.into_iter().collect()
    }

    /// The request key: sorted package names as spelled, source and
    /// revision, arch, config. Spellings of one package set differ here and
    /// meet again at the image key (`image_key`).
    fn key(&self, source: &Source) -> String {
        let mut h = sha2::Sha256::new();
        h.update(format!(
            "{:?}\0{:?}\0{}\0{:?}\0{:?}",
            self.all_packages(),
            source,
            self.tag,
            self.arch,
            self.run
        ));
        hex::encode(h.finalize())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BuildError {
    #[error("unknown packages: {}", .0.join(", "))]
    UnknownPackages(Vec<String>),
    #[error("this registry cannot build {system} images: its Nix builds only for other systems, and no substituter or remote builder supplied {system} packages")]
    UnsupportedSystem { system: String },
    #[error(
        "tag '{tag}' is unknown: with a {source_kind} package source the only tag is 'latest'"
    )]
    UnknownTag {
        tag: String,
        source_kind: &'static str,
    },
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error("the build took longer than its timeout of {}s and was stopped", .0.as_secs())]
    Timeout(Duration),
    #[error("revision '{0}' does not exist in the package source's repository")]
    UnknownRevision(String),
    #[error("the flake '{0}' names nothing: no such repository, path, branch, tag or commit, or no flake.nix there")]
    UnknownFlake(String),
    #[error("the flake '{0}' has no flake.lock, or one its flake.nix has outgrown: run `nix flake lock` and commit flake.lock (nixery builds what the lock pins, and never writes it)")]
    UnlockedFlake(String),
    #[error("the build queue is full ({0} builds wait already); try again shortly")]
    QueueFull(usize),
    #[error("the build was dropped from the queue: everyone who asked for it went away")]
    Abandoned,
    #[error("storing the image failed: {0}")]
    Store(String),
    /// The shared object store failed or did not answer.
    #[error("the registry's object store is unavailable: {0}")]
    StoreUnavailable(String),
    #[error("the build stopped unexpectedly: {0}")]
    Internal(String),
}

impl BuildError {
    /// One line for people: for a failed Nix step, the step and Nix's last line.
    pub fn summary(&self) -> String {
        match self {
            BuildError::Nix(e @ NixError::Failed { stage, log }) => match e.hidden_host_path() {
                Some(path) => format!(
                    "{stage} failed: a builder needed {path}, which is outside /nix/store and hidden by Nix's build sandbox; set `sandbox = false` in nix.conf (or NIX_CONFIG) or make the package import that file into the store"
                ),
                None => {
                    let last = log
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("");
                    format!("{stage} failed: {}", last.trim())
                }
            },
            other => other.to_string(),
        }
    }

    /// The end of Nix's log, when Nix failed.
    pub fn log_tail(&self) -> Vec<String> {
        match self {
            BuildError::Nix(NixError::Failed { log, .. }) => {
                log.lines().map(str::to_string).collect()
            }
            _ => Vec::new(),
        }
    }
}

impl From<StoreError> for BuildError {
    fn from(e: StoreError) -> Self {
        match e {
            // The path is ours; the reason is what an operator needs.
            StoreError::Io { source, .. } => BuildError::Store(io_reason(&source)),
            StoreError::Remote { what, detail } => {
                tracing::error!(request = %what, error = %detail, "the object store failed");
                BuildError::StoreUnavailable(format!("{what} failed"))
            }
            other => BuildError::Store(other.to_string()),
        }
    }
}

impl From<std::io::Error> for BuildError {
    fn from(e: std::io::Error) -> Self {
        BuildError::Store(io_reason(&e))
    }
}

/// The operating system's reason for an I/O error, without the paths that
/// some errors carry: users see "No space left on device", not our layout.
fn io_reason(e: &std::io::Error) -> String {
    tracing::error!(error = %e, "storage I/O failed");
    // Wrappers (tempfile's, for one) keep the OS error as their source.
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(code) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.raw_os_error())
        {
            return std::io::Error::from_raw_os_error(code).to_string();
        }
        cur = err.source();
    }
    match e.kind() {
        std::io::ErrorKind::StorageFull => "No space left on device".into(),
        kind => kind.to_string(),
    }
}

/// Build progress, for `nixery build` and NixImage status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Queued,
    Stage(&'static str),
    NixLog(String),
    Layers { done: usize, total: usize },
    Done,
}

pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// How many of Nix's last log lines a build's state keeps.
pub const LOG_TAIL: usize = 20;

/// A build's state as everyone interested sees it (the starting request and
/// any that join it, `nixery build`, the controller, the page): one
/// `tokio::sync::watch` channel per build.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BuildState {
    /// The image as asked for (`curl/shell`).
    pub image: String,
    pub tag: String,
    /// queued, evaluating, building, reading closure, packing layers, done, failed.
    pub stage: String,
    /// Layers packed and in all, once packing started.
    pub layers: Option<(usize, usize)>,
    /// The end of Nix's log.
    pub log: std::collections::VecDeque<String>,
    /// Log lines seen in all (so a reader can tell new lines from old).
    pub log_lines: u64,
    /// Why it failed.
    pub error: Option<String>,
}

impl BuildState {
    pub fn new(spec: &ImageSpec) -> Self {
        BuildState {
            image: spec.packages.join("/"),
            tag: spec.tag.clone(),
            stage: "queued".into(),
            layers: None,
            log: Default::default(),
            log_lines: 0,
            error: None,
        }
    }

    /// Applies one progress event.
    pub fn apply(&mut self, p: &Progress) {
        match p {
            Progress::Queued => self.stage = "queued".into(),
            Progress::Stage(s) => self.stage = (*s).into(),
            Progress::NixLog(line) => {
                self.log.push_back(line.clone());
                if self.log.len() > LOG_TAIL {
                    self.log.pop_front();
                }
                self.log_lines += 1;
            }
            Progress::Layers { done, total } => self.layers = Some((*done, *total)),
            Progress::Done => self.stage = "done".into(),
        }
    }

    /// The progress events that lead from `old` to `self`, for callers that
    /// take events (`nixery build`, the controller's status).
    pub fn events_since(&self, old: &BuildState) -> Vec<Progress> {
        let mut out = Vec::new();
        if self.stage != old.stage {
            out.push(match self.stage.as_str() {
                "queued" => Progress::Queued,
                "done" => Progress::Done,
                "evaluating" => Progress::Stage("evaluating"),
                "building" => Progress::Stage("building"),
                "reading closure" => Progress::Stage("reading closure"),
                "packing layers" => Progress::Stage("packing layers"),
                _ => Progress::Stage("failed"),
            });
        }
        let new_lines = (self.log_lines - old.log_lines.min(self.log_lines)) as usize;
        let skip = self.log.len().saturating_sub(new_lines);
        out.extend(self.log.iter().skip(skip).cloned().map(Progress::NixLog));
        if self.layers != old.layers {
            if let Some((done, total)) = self.layers {
                out.push(Progress::Layers { done, total });
            }
        }
        out
    }
}
