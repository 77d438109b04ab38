//! Calling Nix: resolving a package list against a package source, realising
//! it (with GC roots), and reading the closure graph, all as JSON data. Every
//! input is an argument (`--argstr`); no name is ever pasted into Nix code.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::layers::PathInfo;

pub mod fake;
pub mod flake;

/// The Nix file that resolves package lists; written next to the state so
/// the binary carries everything it needs.
pub const PREPARE_IMAGE_NIX: &str = include_str!("../../nix/prepare-image.nix");

/// Where packages come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A local nixpkgs-shaped directory (`import PATH {}`).
    Path(PathBuf),
    /// A git repository; the image tag names the revision.
    Git { url: String },
    /// A nixpkgs channel name (`nixos-unstable`), or a tarball URL.
    Channel(String),
    /// A channel's tarball as it was when pinned: its URL and the sha256 (Nix
    /// base32) of its unpacked contents, so every node builds the same packages
    /// (or fails saying the tarball changed) however the URL moves.
    PinnedChannel { url: String, sha256: String },
    /// A flake reference (`github:acme/app`, `git+https://…?ref=main`,
    /// `path:/src/app`): names are its outputs, as `nix build FLAKE#NAME`
    /// finds them. It can move; it is locked before each evaluation.
    Flake { reference: String },
    /// A flake as it was when locked (`nix flake metadata`'s reference with
    /// its `narHash`): every node builds exactly that tree.
    PinnedFlake { locked: String },
}

impl Source {
    /// Whether a tag names a revision (git) or must be `latest`.
    pub fn tags_are_revisions(&self) -> bool {
        matches!(self, Source::Git { .. })
    }

    /// Whether this source at this tag always means the same packages: only
    /// a git commit does; branches, tags, channels and paths can move.
    pub fn is_immutable_at(&self, tag: &str) -> bool {
        match self {
            Source::Git { .. } => is_commit(tag),
            Source::PinnedChannel { .. } | Source::PinnedFlake { .. } => true,
            _ => false,
        }
    }

    /// The tarball a channel means: a name is that branch of nixpkgs on
    /// GitHub (as in Nixery), anything with a scheme is a URL.
    pub fn channel_url(&self) -> Option<String> {
        match self {
            Source::Channel(c) if c.contains("://") => Some(c.clone()),
            Source::Channel(c) => Some(format!(
                "https://github.com/NixOS/nixpkgs/archive/{c}.tar.gz"
            )),
            Source::PinnedChannel { url, .. } => Some(url.clone()),
            _ => None,
        }
    }

    /// `srcType` and `srcArgs` for prepare-image.nix at this tag.
    fn nix_args(&self, tag: &str) -> (&'static str, String) {
        match self {
            Source::Path(p) => ("path", serde_json::json!({ "path": p }).to_string()),
            Source::Git { url } => {
                let rev = if is_commit(tag) {
                    serde_json::json!({ "url": url, "rev": tag })
                } else {
                    serde_json::json!({ "url": url, "ref": tag })
                };
                ("git", rev.to_string())
            }
            Source::Channel(_) => (
                "channel",
                serde_json::json!({ "url": self.channel_url() }).to_string(),
            ),
            Source::PinnedChannel { url, sha256 } => (
                "channel",
                serde_json::json!({ "url": url, "sha256": sha256 }).to_string(),
            ),
            Source::Flake { reference: r } | Source::PinnedFlake { locked: r } => {
                ("flake", serde_json::json!({ "ref": r }).to_string())
            }
        }
    }

    /// A short human description for logs and errors, with any credentials
    /// in a URL replaced by `***`.
    pub fn describe(&self) -> String {
        match self {
            Source::Path(p) => format!("path {}", p.display()),
            Source::Git { url } => format!("git {}", redact_url(url)),
            Source::Channel(c) => format!("channel {}", redact_url(c)),
            Source::PinnedChannel { url, sha256 } => {
                format!("channel {} (sha256:{sha256})", redact_url(url))
            }
            Source::Flake { reference: r } | Source::PinnedFlake { locked: r } => {
                format!("flake {}", redact_url(r))
            }
        }
    }

    /// What a NixImage author may see: the kind and URL, never a server path.
    pub fn describe_public(&self) -> String {
        match self {
            Source::Path(_) => "a local path".into(),
            other => other.describe(),
        }
    }

    /// Whether this source, as an operator's `--allowed-source`, admits
    /// `other`: the same source, or for a flake any reference under its
    /// prefix (`flake:github:acme` admits `github:acme/app`).
    pub fn admits(&self, other: &Source) -> bool {
        match (self, other) {
            (Source::Flake { reference: prefix }, Source::Flake { reference }) => {
                flake::prefix_admits(prefix, reference)
            }
            _ => self == other,
        }
    }

    /// Parses `path:DIR`, `repo:URL`, `channel:NAME` or `flake:REFERENCE`,
    /// as `--allowed-source` takes them.
    pub fn parse_tagged(s: &str) -> Option<Source> {
        let (kind, value) = s.split_once(':')?;
        if value.is_empty() {
            return None;
        }
        match kind {
            "path" => Some(Source::Path(value.into())),
            "repo" | "git" => Some(Source::Git { url: value.into() }),
            "channel" => Some(Source::Channel(value.into())),
            "flake" => Some(Source::Flake {
                reference: value.into(),
            }),
            _ => None,
        }
    }
}

/// `https://user:token@host/x` -> `https://***@host/x`.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// What a channel's tarball holds now: the sha256 (Nix base32) of its
/// unpacked contents, which are left in the store under the name
/// `builtins.fetchTarball` gives them, so the build that follows downloads
/// nothing again. None when the URL does not exist (HTTP 404 or 410, or no such file).
/// The systems the local Nix builds for: its `system`, then its
/// `extra-platforms`, with `options` applied as every call gets them.
pub async fn systems(options: &[(String, String)]) -> Result<Vec<String>, NixError> {
    let mut args = vec![
        "--extra-experimental-features",
        "nix-command",
        "show-config",
    ];
    for (k, v) in options {
        args.extend(["--option", k.as_str(), v.as_str()]);
    }
    let out = run("nix", &args, "reading Nix's settings", None).await?;
    Ok(parse_systems(&out))
}

/// `system` and `extra-platforms` of `nix show-config`'s output.
pub fn parse_systems(config: &str) -> Vec<String> {
    let setting = |name: &str| {
        config.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let mut out: Vec<String> = setting("system").into_iter().collect();
    for s in setting("extra-platforms")
        .unwrap_or_default()
        .split_whitespace()
    {
        if !out.iter().any(|o| o == s) {
            out.push(s.to_string());
        }
    }
    out
}

pub async fn resolve_tarball(url: &str) -> Result<Option<String>, NixError> {
    let out = run(
        "nix-prefetch-url",
        &[
            "--unpack", "--name", "source", "--type", "sha256", "--", url,
        ],
        "resolving the channel",
        None,
    )
    .await;
    match out {
        Ok(out) => match out.lines().map(str::trim).rfind(|l| !l.is_empty()) {
            Some(h) if h.len() == 52 && h.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                Ok(Some(h.to_string()))
            }
            _ => Err(NixError::BadOutput {
                stage: "resolving the channel",
                message: format!("nix-prefetch-url printed {out:?}"),
            }),
        },
        Err(NixError::Failed { stage, log }) => {
            // curl's words: HTTP 404 or 410, a file:// path that is not there
            // (error 37: "Couldn't read a file:// file (37)" in Debian 12's
            // curl, "Could not read a file:// file (37)" in Debian 13's).
            let missing = [
                "read a file:// file (37)",
                "HTTP error 404",
                "HTTP error 410",
                "response code 404",
                "response code 410",
                "No such file",
            ]
            .iter()
            .any(|m| log.contains(m));
            if missing {
                return Ok(None);
            }
            // The URL may carry credentials: only the redacted form is kept.
            let last = log
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Err(NixError::Failed {
                stage,
                log: format!(
                    "nix-prefetch-url {} failed: {}",
                    redact_url(url),
                    last.replace(url, &redact_url(url))
                ),
            })
        }
        Err(e) => Err(e),
    }
}

/// Whether a build failed because a pinned tarball no longer has the
/// contents it was pinned at (Nix 2.8: "hash mismatch in file downloaded",
/// "NAR hash mismatch"; later: "hash mismatch in fixed-output derivation").
pub fn is_hash_mismatch(message: &str) -> bool {
    message.contains("hash mismatch")
}

/// The commit a git branch or tag names now (`git ls-remote`): a branch
/// first, then a tag (peeled, for an annotated one). None when neither exists.
pub async fn resolve_git_ref(url: &str, reference: &str) -> Result<Option<String>, NixError> {
    let out = run(
        "git",
        &["ls-remote", "--", url, reference],
        "resolving the revision",
        None,
    )
    .await
    .map_err(|e| match e {
        // The URL may carry credentials: never in a message.
        NixError::Failed { stage, .. } => NixError::Failed {
            stage,
            log: format!("git ls-remote {} failed", redact_url(url)),
        },
        other => other,
    })?;
    let refs: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once('\t')).collect();
    let find = |name: &str| {
        refs.iter()
            .find(|(_, r)| *r == name)
            .map(|(c, _)| c.to_string())
    };
    Ok(find(&format!("refs/heads/{reference}"))
        .or_else(|| find(&format!("refs/tags/{reference}^{{}}")))
        .or_else(|| find(&format!("refs/tags/{reference}"))))
}

pub fn is_commit(tag: &str) -> bool {
    tag.len() == 40 && tag.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum NixError {
    #[error("could not start {program}: {message}")]
    Spawn {
        program: &'static str,
        message: String,
    },
    #[error("{stage} failed: {log}")]
    Failed { stage: &'static str, log: String },
    #[error("{stage} returned data we could not read: {message}")]
    BadOutput {
        stage: &'static str,
        message: String,
    },
}

impl NixError {
    /// The system a failed build needed, when Nix failed because this host
    /// cannot build for it (no matching platform, substituter or remote builder).
    /// Nix 2.8 to 2.18 say "a 'aarch64-linux' with features {} is required to
    /// build ..."; 2.19 and later "Required system: 'aarch64-linux' ...".
    pub fn unsupported_system(&self) -> Option<String> {
        let NixError::Failed { log, .. } = self else {
            return None;
        };
        // The text between `start` and the next quote.
        let between = |line: &str, start: &str| {
            let (_, rest) = line.split_once(start)?;
            rest.split_once('\'').map(|(v, _)| v.to_string())
        };
        log.lines().find_map(|line| {
            between(line, "Required system: '").or_else(|| {
                line.contains("is required to build")
                    .then(|| between(line, "a '"))
                    .flatten()
            })
        })
    }
}

impl NixError {
    /// Whether a build failed because its builder was killed by SIGKILL from
    /// outside nixery (nixery stops builds only by dropping them, which
    /// ends the whole call): with two builds at once, Nix itself sometimes
    /// kills one (docs/nix.md), or the kernel's OOM killer did.
    pub fn builder_killed(&self) -> bool {
        matches!(self, NixError::Failed { log, .. } if log.contains("failed due to signal 9"))
    }
}

impl NixError {
    /// The file outside /nix/store that a failed builder could not find: with
    /// Nix's sandbox on (Debian 13's and NixOS's default), a builder sees only
    /// the store and its own build directory, so a package that runs a host
    /// program fails with a shell's "sh: /usr/bin/patchelf: not found" and
    /// exit code 127 (the shell's "command not found").
    pub fn hidden_host_path(&self) -> Option<String> {
        let NixError::Failed { log, .. } = self else {
            return None;
        };
        if !log.contains("exit code 127") {
            return None;
        }
        log.lines()
            .filter(|l| l.contains(": not found") || l.contains("No such file or directory"))
            .find_map(|line| {
                line.split(|c: char| c.is_whitespace() || matches!(c, ':' | '\'' | '"' | '`'))
                    .find(|w| {
                        w.len() > 1
                            && w.starts_with('/')
                            && !["/nix/", "/build", "/tmp", "/proc", "/dev"]
                                .iter()
                                .any(|p| w.starts_with(p))
                    })
                    .map(str::to_string)
            })
    }
}

/// What prepare-image.nix answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Prepared {
    pub unknown: Vec<String>,
    pub drvs: Vec<String>,
    pub outs: Vec<String>,
    /// How each requested name resolved (empty when some are unknown).
    #[serde(default)]
    pub resolved: Vec<Resolved>,
}

/// One requested name and what it means in the package set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Resolved {
    /// As requested (`bashinteractive`).
    pub name: String,
    /// The attribute path it found (`bashInteractive`).
    pub attr: String,
    /// Its output path.
    pub out: String,
    /// `meta.mainProgram`, else `pname`, when the package declares one.
    #[serde(default)]
    pub program: Option<String>,
    /// Its `version`, when it has one.
    #[serde(default)]
    pub version: Option<String>,
    /// Its `meta.license`: SPDX identifiers, else short names.
    #[serde(default)]
    pub licenses: Vec<String>,
}

/// Progress lines from Nix while it builds.
pub type LogSink = Arc<dyn Fn(&str) + Send + Sync>;

/// The Nix boundary, as the builder sees it.
pub trait Nix: Send + Sync + 'static {
    /// What the names mean in the source, evaluated without writing to the
    /// store: output and derivation paths are computed, not written (an
    /// image whose paths are all present needs nothing more from Nix than
    /// its GC roots; `instantiate` writes what a build needs).
    fn prepare<'a>(
        &'a self,
        source: &'a Source,
        tag: &'a str,
        packages: &'a [String],
        system: &'a str,
    ) -> BoxFuture<'a, Result<Prepared, NixError>>;
    /// The same evaluation, writing the derivations into the store for
    /// `realise` to build. (Its answer can differ from `prepare`'s where the
    /// package set is impure, as the offline set's `slow` is.)
    fn instantiate<'a>(
        &'a self,
        source: &'a Source,
        tag: &'a str,
        packages: &'a [String],
        system: &'a str,
    ) -> BoxFuture<'a, Result<Prepared, NixError>>;
    /// Makes `paths` valid under GC roots at `gcroot`: derivations are built
    /// (or their outputs substituted); output paths already present only
    /// get their roots.
    fn realise<'a>(
        &'a self,
        paths: &'a [String],
        gcroot: &'a Path,
        log: LogSink,
    ) -> BoxFuture<'a, Result<(), NixError>>;
    fn closure<'a>(&'a self, outs: &'a [String]) -> BoxFuture<'a, Result<Vec<PathInfo>, NixError>>;
    /// A flake reference's locked form, None when it names nothing.
    fn lock_flake<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<flake::LockedFlake>, NixError>>;
}

/// Nix through its command-line tools, as installed on the host.
pub struct NixCli {
    prepare_file: PathBuf,
    /// `--option NAME VALUE` pairs passed to every call.
    options: Vec<(String, String)>,
}

impl NixCli {
    /// Writes prepare-image.nix under `state_dir` for the tools to read,
    /// unless it is there already: a full state disk must not stop a start
    /// (then it goes to the temporary directory instead).
    pub fn new(state_dir: &Path, options: Vec<(String, String)>) -> std::io::Result<Self> {
        let mut prepare_file = state_dir.join("nix/prepare-image.nix");
        if std::fs::read(&prepare_file).ok().as_deref() != Some(PREPARE_IMAGE_NIX.as_bytes()) {
            if let Err(e) = crate::store::write_atomic(&prepare_file, PREPARE_IMAGE_NIX.as_bytes())
            {
                let digest = crate::name::Digest::of(PREPARE_IMAGE_NIX.as_bytes());
                let fallback = std::env::temp_dir()
                    .join(format!("nixery-prepare-image-{}.nix", &digest.hex()[..16]));
                tracing::warn!(error = %e, fallback = %fallback.display(), "cannot write prepare-image.nix in the state directory");
                crate::store::write_atomic(&fallback, PREPARE_IMAGE_NIX.as_bytes())?;
                prepare_file = fallback;
            }
        }
        Ok(Self {
            prepare_file,
            options,
        })
    }

    fn with_options<'a>(&'a self, mut args: Vec<&'a str>) -> Vec<&'a str> {
        for (k, v) in &self.options {
            args.extend(["--option", k.as_str(), v.as_str()]);
        }
        args
    }
}

/// Stops a Nix process and everything it started when dropped (on timeout or
/// cancellation). Nix runs each builder in a session of its own, as a build
/// user, and on SIGINT kills only the builder's first process, so we find the
/// builders' process groups by walking /proc and kill them ourselves.
struct ProcessGuard(Option<i32>);

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let Some(pid) = self.0 else { return };
        for pgid in descendant_groups(pid) {
            if pgid != pid {
                // SAFETY: killpg only sends a signal.
                unsafe { libc::killpg(pgid, libc::SIGKILL) };
            }
        }
        // SIGINT lets Nix release its locks and temporary build directories.
        unsafe { libc::killpg(pid, libc::SIGINT) };
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(3));
            unsafe { libc::killpg(pid, libc::SIGKILL) };
        });
    }
}

/// Process groups of all descendants of `root` (from /proc/*/stat).
fn descendant_groups(root: i32) -> Vec<i32> {
    let mut procs: Vec<(i32, i32, i32)> = Vec::new(); // (pid, ppid, pgid)
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // Fields after the command name, which is in parentheses.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            if let (Some(ppid), Some(pgid)) = (
                f.get(1).and_then(|x| x.parse().ok()),
                f.get(2).and_then(|x| x.parse().ok()),
            ) {
                procs.push((pid, ppid, pgid));
            }
        }
    }
    let mut found = vec![root];
    let mut groups = Vec::new();
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        for &(pid, ppid, pgid) in &procs {
            if ppid == parent && !found.contains(&pid) {
                found.push(pid);
                if !groups.contains(&pgid) {
                    groups.push(pgid);
                }
            }
        }
        i += 1;
    }
    groups
}

/// Runs a Nix tool, streaming stderr lines to `log`, and returns stdout.
async fn run(
    program: &'static str,
    args: &[&str],
    stage: &'static str,
    log: Option<LogSink>,
) -> Result<String, NixError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // If the server dies (even by SIGKILL), Nix gets SIGTERM, on which it
    // stops its builders and releases its locks: nothing is left orphaned.
    // SAFETY: prctl only sets a flag of the child, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| NixError::Spawn {
        program,
        message: e.to_string(),
    })?;
    let mut guard = ProcessGuard(child.id().map(|p| p as i32));
    let mut stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let read_out = async {
        let mut s = String::new();
        stdout.read_to_string(&mut s).await.map(|_| s)
    };
    let read_err = async {
        let mut tail: std::collections::VecDeque<String> = Default::default();
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(log) = &log {
                log(&line);
            }
            tail.push_back(line);
            if tail.len() > 25 {
                tail.pop_front();
            }
        }
        tail
    };
    let (out, tail) = tokio::join!(read_out, read_err);
    let status = child.wait().await.map_err(|e| NixError::Spawn {
        program,
        message: e.to_string(),
    })?;
    guard.0 = None;
    let out = out.map_err(|e| NixError::BadOutput {
        stage,
        message: e.to_string(),
    })?;
    if status.success() {
        Ok(out)
    } else {
        let log: Vec<String> = tail.into_iter().filter(|l| !l.trim().is_empty()).collect();
        Err(NixError::Failed {
            stage,
            log: log.join("\n"),
        })
    }
}

impl NixCli {
    /// prepare-image.nix, with `--read-write-mode` when the derivations are
    /// to be written (`--eval` alone computes their paths only).
    async fn evaluate(
        &self,
        source: &Source,
        tag: &str,
        packages: &[String],
        system: &str,
        write: bool,
    ) -> Result<Prepared, NixError> {
        const STAGE: &str = "evaluating the package set";
        let (src_type, src_args) = source.nix_args(tag);
        let packages = serde_json::to_string(packages).expect("strings serialise");
        let file = self.prepare_file.to_string_lossy();
        let mut args = vec!["--eval", "--strict", "--json"];
        if write {
            args.push("--read-write-mode");
        }
        if src_type == "flake" {
            // A flake is evaluated as `nix build` evaluates it: pure (an
            // operator's `--nix-option pure-eval=false` comes later and
            // wins), which also forbids reading prepare-image.nix from the
            // state directory, so its text is passed as the expression.
            args.extend([
                "--extra-experimental-features",
                flake::FEATURES,
                "--option",
                "pure-eval",
                "true",
                "--expr",
                PREPARE_IMAGE_NIX,
            ]);
        } else {
            args.push(&file);
        }
        args.extend([
            "--argstr", "srcType", src_type, "--argstr", "srcArgs", &src_args, "--argstr",
            "packages", &packages, "--argstr", "system", system,
        ]);
        let out = run("nix-instantiate", &self.with_options(args), STAGE, None).await?;
        serde_json::from_str(&out).map_err(|e| NixError::BadOutput {
            stage: STAGE,
            message: e.to_string(),
        })
    }
}

impl Nix for NixCli {
    fn prepare<'a>(
        &'a self,
        source: &'a Source,
        tag: &'a str,
        packages: &'a [String],
        system: &'a str,
    ) -> BoxFuture<'a, Result<Prepared, NixError>> {
        Box::pin(self.evaluate(source, tag, packages, system, false))
    }

    fn instantiate<'a>(
        &'a self,
        source: &'a Source,
        tag: &'a str,
        packages: &'a [String],
        system: &'a str,
    ) -> BoxFuture<'a, Result<Prepared, NixError>> {
        Box::pin(self.evaluate(source, tag, packages, system, true))
    }

    fn realise<'a>(
        &'a self,
        paths: &'a [String],
        gcroot: &'a Path,
        log: LogSink,
    ) -> BoxFuture<'a, Result<(), NixError>> {
        Box::pin(async move {
            if let Some(dir) = gcroot.parent() {
                std::fs::create_dir_all(dir).map_err(|e| NixError::Spawn {
                    program: "nix-store",
                    message: format!("creating {}: {e}", dir.display()),
                })?;
            }
            let root = gcroot.to_string_lossy();
            let mut args = self.with_options(vec!["--realise", "--add-root", &root, "--indirect"]);
            args.extend(paths.iter().map(String::as_str));
            run("nix-store", &args, "building the packages", Some(log))
                .await
                .map(|_| ())
        })
    }

    fn lock_flake<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<flake::LockedFlake>, NixError>> {
        Box::pin(flake::lock(reference, &self.options))
    }

    fn closure<'a>(&'a self, outs: &'a [String]) -> BoxFuture<'a, Result<Vec<PathInfo>, NixError>> {
        // Only nix-store's stable interface: `--query --requisites` for the
        // closure and `--dump-db` for sizes and references, in the registration
        // format that `--load-db` reads back, unchanged from Nix 2.0 to 2.3x and
        // Lix. (`nix path-info --json` is experimental and changed shape in 2.19.)
        Box::pin(async move {
            const STAGE: &str = "reading the closure";
            let mut args = self.with_options(vec!["--query", "--requisites"]);
            args.extend(outs.iter().map(String::as_str));
            let paths = run("nix-store", &args, STAGE, None).await?;
            let mut args = self.with_options(vec!["--dump-db"]);
            args.extend(paths.lines().filter(|l| !l.is_empty()));
            let db = run("nix-store", &args, STAGE, None).await?;
            parse_registration(&db).map_err(|message| NixError::BadOutput {
                stage: STAGE,
                message,
            })
        })
    }
}

/// Parses Nix's registration format (`nix-store --dump-db`): per path, its
/// path, NAR hash, NAR size, deriver (may be empty), reference count and one
/// line per reference.
pub fn parse_registration(text: &str) -> Result<Vec<PathInfo>, String> {
    let mut lines = text.lines();
    let mut out = Vec::new();
    while let Some(path) = lines.next() {
        let mut next = |what: &str| {
            lines
                .next()
                .ok_or_else(|| format!("record of {path:?} ends before its {what}"))
        };
        if !path.starts_with('/') {
            return Err(format!("expected a store path, found {path:?}"));
        }
        let nar_hash = next("NAR hash")?.to_string();
        let size = next("NAR size")?;
        let nar_size = size
            .parse()
            .map_err(|_| format!("NAR size of {path} is not a number: {size:?}"))?;
        let deriver = next("deriver")?.to_string();
        let count = next("reference count")?;
        let count: usize = count
            .parse()
            .map_err(|_| format!("reference count of {path} is not a number: {count:?}"))?;
        let mut references = Vec::with_capacity(count.min(4096));
        for _ in 0..count {
            let r = next("references")?;
            if !r.starts_with('/') {
                return Err(format!("reference of {path} is not a store path: {r:?}"));
            }
            references.push(r.to_string());
        }
        out.push(PathInfo {
            path: path.to_string(),
            nar_size,
            references,
            nar_hash,
            deriver,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systems_are_read_from_nix_settings() {
        let config = "experimental-features = nix-command\nextra-platforms = aarch64-linux i686-linux\nsystem = x86_64-linux\nsystem-features = kvm\n";
        assert_eq!(
            parse_systems(config),
            ["x86_64-linux", "aarch64-linux", "i686-linux"]
        );
        assert_eq!(
            parse_systems("extra-platforms = \nsystem = aarch64-linux\n"),
            ["aarch64-linux"]
        );
    }

    #[test]
    fn git_tags_choose_ref_or_rev() {
        let s = Source::Git {
            url: "file:///repo".into(),
        };
        let (_, args) = s.nix_args("main");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&args).unwrap()["ref"],
            "main"
        );
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let (_, args) = s.nix_args(commit);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&args).unwrap()["rev"],
            commit
        );
    }

    #[test]
    fn only_git_commits_are_immutable() {
        let git = Source::Git {
            url: "file:///r".into(),
        };
        assert!(git.is_immutable_at("0123456789abcdef0123456789abcdef01234567"));
        assert!(!git.is_immutable_at("main"));
        assert!(!Source::Channel("nixos-unstable".into())
            .is_immutable_at("0123456789abcdef0123456789abcdef01234567"));
        assert!(!Source::Path("/p".into()).is_immutable_at("latest"));
        let pinned = Source::PinnedChannel {
            url: "https://x/y.tar.gz".into(),
            sha256: "0".repeat(52),
        };
        assert!(pinned.is_immutable_at("latest"));
        assert!(!pinned.tags_are_revisions());
    }

    #[test]
    fn registration_format_parses() {
        // As `nix-store --dump-db` prints it (Nix 2.8 and 2.26 alike); the
        // second path has no deriver and references itself.
        let text = "/nix/store/aaa-hello\n\
            a521871f80b53bfbd45e07620235f79d8de9bef330a11dc10846fe02444de260\n\
            1272\n\
            /nix/store/ddd-hello.drv\n\
            2\n\
            /nix/store/bbb-glibc\n\
            /nix/store/aaa-hello\n\
            /nix/store/bbb-glibc\n\
            2a4ebb4b487c31adf5d164ed05627280bb278766881409fa679294cca7ddfed7\n\
            3173248\n\
            \n\
            1\n\
            /nix/store/bbb-glibc\n";
        let infos = parse_registration(text).unwrap();
        assert_eq!(
            infos,
            vec![
                PathInfo {
                    path: "/nix/store/aaa-hello".into(),
                    nar_size: 1272,
                    references: vec!["/nix/store/bbb-glibc".into(), "/nix/store/aaa-hello".into()],
                    nar_hash: "a521871f80b53bfbd45e07620235f79d8de9bef330a11dc10846fe02444de260"
                        .into(),
                    deriver: "/nix/store/ddd-hello.drv".into(),
                },
                PathInfo {
                    path: "/nix/store/bbb-glibc".into(),
                    nar_size: 3173248,
                    references: vec!["/nix/store/bbb-glibc".into()],
                    nar_hash: "2a4ebb4b487c31adf5d164ed05627280bb278766881409fa679294cca7ddfed7"
                        .into(),
                    deriver: String::new(),
                },
            ]
        );
        assert_eq!(parse_registration("").unwrap(), vec![]);
        for bad in [
            "/nix/store/a\nhash\n12\n\n2\n/nix/store/b\n", // fewer references than counted
            "/nix/store/a\nhash\nbig\n\n0\n",              // size not a number
            "/nix/store/a\nhash\n12\n\nx\n",               // count not a number
            "{\"/nix/store/a\": {}}\n",                    // JSON is not this format
            "/nix/store/a\nhash\n",                        // cut short
        ] {
            assert!(parse_registration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unsupported_systems_are_recognised_in_every_nix_wording() {
        let failed = |log: &str| NixError::Failed {
            stage: "building the packages",
            log: log.into(),
        };
        // Nix 2.8
        let old = failed("error: a 'aarch64-linux' with features {} is required to build '/nix/store/x.drv', but I am a 'x86_64-linux' with features {benchmark, big-parallel}");
        assert_eq!(old.unsupported_system().as_deref(), Some("aarch64-linux"));
        // Nix 2.19 and later
        let new = failed("error: Cannot build '/nix/store/x.drv'.\n       Reason: required system or feature not available\n       Required system: 'aarch64-linux' with features {}\n       Current system: 'x86_64-linux' with features {benchmark}");
        assert_eq!(new.unsupported_system().as_deref(), Some("aarch64-linux"));
        assert_eq!(
            failed("error: builder for '/nix/store/x.drv' failed").unsupported_system(),
            None
        );
    }

    #[test]
    fn host_files_hidden_by_the_sandbox_are_named() {
        let failed = |log: &str| NixError::Failed {
            stage: "building the packages",
            log: log.into(),
        };
        // As Nix 2.8 and 2.26 report the offline set's old builders with the
        // sandbox on: busybox sh, then Nix's own lines.
        let busybox = failed("building '/nix/store/x-libtinfo-host.drv'...\nsh: /usr/bin/patchelf: not found\nerror: builder for '/nix/store/x-libtinfo-host.drv' failed with exit code 127");
        assert_eq!(
            busybox.hidden_host_path().as_deref(),
            Some("/usr/bin/patchelf")
        );
        let bash = failed("/nix/store/y-bash/bin/bash: line 1: /opt/tool/bin/gen: No such file or directory\nerror: builder for '/nix/store/y.drv' failed with exit code 127;");
        assert_eq!(
            bash.hidden_host_path().as_deref(),
            Some("/opt/tool/bin/gen")
        );
        // Files of the store or of the build directory are the package's own
        // business, and a missing file that did not stop a command from
        // starting (another exit code) may be anything.
        for own in [
            "sh: /nix/store/z-patchelf/bin/patchelf: not found\nfailed with exit code 127",
            "sh: /build/src/configure: not found\nfailed with exit code 127",
            "cp: can't stat '/etc/ssl/certs/ca.crt': No such file or directory\nerror: builder for '/nix/store/x.drv' failed with exit code 1",
            "error: attribute 'nosuch' missing",
        ] {
            assert_eq!(failed(own).hidden_host_path(), None, "{own}");
        }
    }

    #[test]
    fn credentials_in_urls_are_redacted() {
        assert_eq!(
            redact_url("https://user:s3cret@git.example/org/repo.git"),
            "https://***@git.example/org/repo.git"
        );
        assert_eq!(
            redact_url("https://git.example/a@b"),
            "https://git.example/a@b"
        );
        assert_eq!(redact_url("/srv/nixpkgs"), "/srv/nixpkgs");
        let s = Source::Git {
            url: "https://tok@host/r".into(),
        };
        assert!(!s.describe().contains("tok"));
        assert_eq!(
            Source::Path("/srv/x".into()).describe_public(),
            "a local path"
        );
    }

    #[test]
    fn tagged_sources_parse() {
        assert_eq!(
            Source::parse_tagged("repo:https://h/r"),
            Some(Source::Git {
                url: "https://h/r".into()
            })
        );
        assert_eq!(
            Source::parse_tagged("path:/p"),
            Some(Source::Path("/p".into()))
        );
        assert_eq!(
            Source::parse_tagged("channel:nixos-24.05"),
            Some(Source::Channel("nixos-24.05".into()))
        );
        assert_eq!(Source::parse_tagged("nonsense"), None);
        assert_eq!(Source::parse_tagged("ftp:x"), None);
        assert_eq!(Source::parse_tagged("repo:"), None);
    }

    #[test]
    fn channels_become_tarball_urls() {
        let (t, args) = Source::Channel("nixos-unstable".into()).nix_args("latest");
        assert_eq!(t, "channel");
        assert!(args.contains("https://github.com/NixOS/nixpkgs/archive/nixos-unstable.tar.gz"));
        let (_, args) = Source::Channel("file:///tmp/pkgs.tar.gz".into()).nix_args("latest");
        assert!(args.contains("file:///tmp/pkgs.tar.gz"));
        // A pinned channel carries the hash its contents must have.
        let (t, args) = Source::PinnedChannel {
            url: "https://u:secret@x/y.tar.gz".into(),
            sha256: "1".repeat(52),
        }
        .nix_args("latest");
        assert_eq!(t, "channel");
        let v: serde_json::Value = serde_json::from_str(&args).unwrap();
        assert_eq!(v["sha256"], "1".repeat(52));
        assert_eq!(v["url"], "https://u:secret@x/y.tar.gz");
    }
}
