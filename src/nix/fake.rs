//! A fake Nix behind the same trait, for the fast tests of the registry, the
//! build service and the controller: canned packages whose store paths are
//! real directories in a temporary store, so layer planning and packing stay
//! real. Real Nix stays in the Nix-contract, client and end-to-end tests.
//! It resolves names as prepare-image.nix does (exact, then the top-level
//! name case-insensitively) and counts its calls.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;

use super::{LogSink, Nix, NixError, Prepared, Resolved, Source};
use crate::layers::PathInfo;

/// One canned package.
#[derive(Clone, Debug, Default)]
pub struct FakePackage {
    /// Packages (by attribute name) this one refers to.
    pub refs: Vec<String>,
    /// Files under the output, with their contents.
    pub files: Vec<(String, String)>,
    /// `meta.mainProgram`.
    pub program: Option<String>,
    /// Its build fails, saying so.
    pub fails: bool,
    /// Its build takes this long.
    pub build_time: Duration,
}

pub struct FakeNix {
    store: PathBuf,
    packages: BTreeMap<String, FakePackage>,
    /// `prepare` calls so far (evaluations).
    pub evaluations: AtomicUsize,
    /// `instantiate` calls so far (evaluations that write derivations).
    pub instantiations: AtomicUsize,
    /// `realise` calls of derivations so far (builds; roots for present
    /// output paths are not counted).
    pub realisations: AtomicUsize,
    /// The source of each `prepare` call, in order.
    pub sources: std::sync::Mutex<Vec<Source>>,
    /// Pinned channel hashes whose tarball has other contents now: evaluating
    /// one fails as Nix does ("hash mismatch").
    pub moved: std::sync::Mutex<BTreeSet<String>>,
    /// Builds that lose their builder to a SIGKILL from outside, as Nix says
    /// it ("failed due to signal 9"), before the rest build as usual.
    pub killed_builders: AtomicUsize,
}

fn pkg(refs: &[&str], files: &[(&str, &str)], program: Option<&str>) -> FakePackage {
    FakePackage {
        refs: refs.iter().map(|s| s.to_string()).collect(),
        files: files
            .iter()
            .map(|(p, c)| (p.to_string(), c.to_string()))
            .collect(),
        program: program.map(str::to_string),
        ..Default::default()
    }
}

impl FakeNix {
    /// The usual packages (hello, curl, jq, the `shell` set, cacert and
    /// iana-etc that every image gets, a shared library or two), plus
    /// `broken` (fails) and `slow` (takes 30 s), in a store under `dir`.
    pub fn standard(dir: &Path) -> Self {
        let mut p = BTreeMap::new();
        p.insert(
            "glibc".into(),
            pkg(&[], &[("lib/libc.so.6", "fake libc")], None),
        );
        p.insert(
            "openssl".into(),
            pkg(&["glibc"], &[("lib/libssl.so.3", "fake ssl")], None),
        );
        p.insert(
            "hello".into(),
            pkg(&["glibc"], &[("bin/hello", "#!fake hello")], Some("hello")),
        );
        p.insert(
            "curl".into(),
            pkg(
                &["glibc", "openssl"],
                &[("bin/curl", "#!fake curl")],
                Some("curl"),
            ),
        );
        p.insert(
            "jq".into(),
            pkg(&["glibc"], &[("bin/jq", "#!fake jq")], Some("jq")),
        );
        p.insert(
            "bashInteractive".into(),
            pkg(
                &["glibc"],
                &[("bin/bash", "#!fake bash"), ("bin/sh", "#!fake sh")],
                Some("bash"),
            ),
        );
        p.insert(
            "coreutils".into(),
            pkg(
                &["glibc"],
                &[("bin/ls", "#!fake ls"), ("bin/env", "#!fake env")],
                None,
            ),
        );
        p.insert(
            "moreutils".into(),
            pkg(&["glibc"], &[("bin/sponge", "#!fake sponge")], None),
        );
        p.insert(
            "nano".into(),
            pkg(&["glibc"], &[("bin/nano", "#!fake nano")], Some("nano")),
        );
        p.insert(
            "cacert".into(),
            pkg(&[], &[("etc/ssl/certs/ca-bundle.crt", "fake certs")], None),
        );
        p.insert(
            "iana-etc".into(),
            pkg(
                &[],
                &[
                    ("etc/services", "fake services"),
                    ("etc/protocols", "fake protocols"),
                ],
                None,
            ),
        );
        p.insert(
            "broken".into(),
            FakePackage {
                fails: true,
                ..Default::default()
            },
        );
        p.insert(
            "slow".into(),
            FakePackage {
                build_time: Duration::from_secs(30),
                files: vec![("share/slow".into(), "slow".into())],
                ..Default::default()
            },
        );
        Self::new(dir, p)
    }

    pub fn new(dir: &Path, packages: BTreeMap<String, FakePackage>) -> Self {
        FakeNix {
            store: dir.join("nix/store"),
            packages,
            evaluations: AtomicUsize::new(0),
            instantiations: AtomicUsize::new(0),
            realisations: AtomicUsize::new(0),
            sources: Default::default(),
            moved: Default::default(),
            killed_builders: Default::default(),
        }
    }

    /// Adds (or replaces) a package.
    pub fn add_package(&mut self, name: &str, package: FakePackage) {
        self.packages.insert(name.to_string(), package);
    }

    /// Makes a package's build take `d`.
    pub fn set_build_time(&mut self, name: &str, d: Duration) {
        if let Some(p) = self.packages.get_mut(name) {
            p.build_time = d;
        }
    }

    /// The store path of a package: `<store>/<32 hex>-<name>`.
    pub fn out_path(&self, name: &str) -> String {
        let hash = crate::name::Digest::of(name.as_bytes());
        format!("{}/{}-{name}", self.store.display(), &hash.hex()[..32])
    }

    fn name_of(&self, path: &str) -> Option<&str> {
        let base = path.rsplit('/').next()?;
        let base = base.strip_suffix(".drv").unwrap_or(base);
        self.packages
            .keys()
            .find(|n| base.get(33..) == Some(n.as_str()))
            .map(String::as_str)
    }

    /// The top-level name a requested one means, as prepare-image.nix finds it.
    fn resolve(&self, requested: &str) -> Option<String> {
        if self.packages.contains_key(requested) {
            return Some(requested.to_string());
        }
        let (first, rest) = match requested.split_once('.') {
            Some((f, r)) => (f, Some(r)),
            None => (requested, None),
        };
        let top = if self.packages.contains_key(first) {
            first.to_string()
        } else {
            self.packages
                .keys()
                .find(|n| n.eq_ignore_ascii_case(first))?
                .clone()
        };
        // `pkg.out` is the package itself; other nested names do not exist.
        match rest {
            None => Some(top),
            Some(r) if r.split('.').all(|p| p == "out") => Some(top),
            Some(_) => None,
        }
    }

    fn closure_names(&self, roots: &[&str]) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<String> = roots.iter().map(|s| s.to_string()).collect();
        while let Some(n) = todo.pop() {
            if seen.insert(n.clone()) {
                if let Some(p) = self.packages.get(&n) {
                    todo.extend(p.refs.iter().cloned());
                }
            }
        }
        seen
    }

    fn write_out(&self, name: &str) -> std::io::Result<()> {
        let out = PathBuf::from(self.out_path(name));
        if out.exists() {
            return Ok(());
        }
        let tmp = out.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        for (rel, content) in &self.packages[name].files {
            let f = tmp.join(rel);
            std::fs::create_dir_all(f.parent().unwrap())?;
            std::fs::write(&f, content)?;
        }
        // References, as Nix finds them: the referenced store paths in a file.
        let refs: Vec<String> = self.packages[name]
            .refs
            .iter()
            .map(|r| self.out_path(r))
            .collect();
        if !refs.is_empty() {
            std::fs::create_dir_all(tmp.join("nix-support"))?;
            std::fs::write(tmp.join("nix-support/refs"), refs.join("\n"))?;
        }
        std::fs::rename(&tmp, &out)
    }
}

impl Nix for FakeNix {
    fn prepare<'a>(
        &'a self,
        source: &'a Source,
        _tag: &'a str,
        packages: &'a [String],
        _system: &'a str,
    ) -> BoxFuture<'a, Result<Prepared, NixError>> {
        Box::pin(async move {
            self.evaluations.fetch_add(1, Ordering::SeqCst);
            self.sources.lock().unwrap().push(source.clone());
            if let Source::PinnedChannel { url, sha256 } = source {
                if self.moved.lock().unwrap().contains(sha256) {
                    return Err(NixError::Failed {
                        stage: "evaluating the package list",
                        log: format!(
                            "error: NAR hash mismatch in input '{url}', expected 'sha256:{sha256}'"
                        ),
                    });
                }
            }
            let mut unknown = Vec::new();
            let mut resolved = Vec::new();
            for name in packages {
                match self.resolve(name) {
                    Some(attr) => resolved.push(Resolved {
                        name: name.clone(),
                        out: self.out_path(&attr),
                        program: self.packages[&attr].program.clone(),
                        version: None,
                        licenses: Vec::new(),
                        attr,
                    }),
                    None => unknown.push(name.clone()),
                }
            }
            if !unknown.is_empty() {
                resolved.clear();
            }
            Ok(Prepared {
                drvs: resolved.iter().map(|r| format!("{}.drv", r.out)).collect(),
                outs: resolved.iter().map(|r| r.out.clone()).collect(),
                unknown,
                resolved,
            })
        })
    }

    fn instantiate<'a>(
        &'a self,
        source: &'a Source,
        tag: &'a str,
        packages: &'a [String],
        system: &'a str,
    ) -> BoxFuture<'a, Result<Prepared, NixError>> {
        Box::pin(async move {
            self.instantiations.fetch_add(1, Ordering::SeqCst);
            // Its evaluation is counted as an instantiation, not again.
            let prepared = self.prepare(source, tag, packages, system).await;
            self.evaluations.fetch_sub(1, Ordering::SeqCst);
            prepared
        })
    }

    fn realise<'a>(
        &'a self,
        paths: &'a [String],
        gcroot: &'a Path,
        log: LogSink,
    ) -> BoxFuture<'a, Result<(), NixError>> {
        Box::pin(async move {
            if paths.iter().any(|p| p.ends_with(".drv")) {
                self.realisations.fetch_add(1, Ordering::SeqCst);
            }
            // Output paths are only checked (there is no substituter), and
            // missing ones said as Nix 2.8 to 2.26 say them; derivations are
            // built with their dependencies.
            let absent: Vec<&String> = paths
                .iter()
                .filter(|p| !p.ends_with(".drv") && !Path::new(p).exists())
                .collect();
            if !absent.is_empty() {
                log("don't know how to build these paths:");
                for p in &absent {
                    log(&format!("  {p}"));
                }
                let failed = format!("error: build of '{}' failed", absent[0]);
                log(&failed);
                return Err(NixError::Failed {
                    stage: "building the packages",
                    log: failed,
                });
            }
            let roots: Vec<&str> = paths.iter().filter_map(|d| self.name_of(d)).collect();
            let drvs: Vec<&str> = paths
                .iter()
                .filter(|p| p.ends_with(".drv"))
                .filter_map(|d| self.name_of(d))
                .collect();
            for name in self.closure_names(&drvs) {
                let p = &self.packages[&name];
                log(&format!("building '{}'", self.out_path(&name)));
                let killed =
                    self.killed_builders
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                if killed.is_ok() {
                    return Err(NixError::Failed {
                        stage: "building the packages",
                        log: format!(
                            "error: builder for '{}.drv' failed due to signal 9 (Killed)",
                            self.out_path(&name)
                        ),
                    });
                }
                if p.fails {
                    return Err(NixError::Failed {
                        stage: "building the packages",
                        log: format!("{name}: this package fails to build on purpose"),
                    });
                }
                if !p.build_time.is_zero() {
                    tokio::time::sleep(p.build_time).await;
                }
                self.write_out(&name).map_err(|e| NixError::Spawn {
                    program: "fake-nix",
                    message: e.to_string(),
                })?;
            }
            if let Some(dir) = gcroot.parent() {
                let _ = std::fs::create_dir_all(dir);
                if let Some(first) = roots.first() {
                    let _ = std::os::unix::fs::symlink(self.out_path(first), gcroot);
                }
            }
            Ok(())
        })
    }

    fn closure<'a>(&'a self, outs: &'a [String]) -> BoxFuture<'a, Result<Vec<PathInfo>, NixError>> {
        Box::pin(async move {
            // Nix knows the closure of valid paths only.
            if let Some(absent) = outs.iter().find(|p| !Path::new(p).exists()) {
                return Err(NixError::Failed {
                    stage: "reading the closure",
                    log: format!("error: path '{absent}' is not valid"),
                });
            }
            let roots: Vec<&str> = outs.iter().filter_map(|o| self.name_of(o)).collect();
            Ok(self
                .closure_names(&roots)
                .into_iter()
                .map(|n| {
                    let p = &self.packages[&n];
                    PathInfo {
                        path: self.out_path(&n),
                        nar_size: 128 + p.files.iter().map(|(_, c)| c.len() as u64).sum::<u64>(),
                        references: p.refs.iter().map(|r| self.out_path(r)).collect(),
                        ..Default::default()
                    }
                })
                .collect())
        })
    }

    fn lock_flake<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<Option<super::flake::LockedFlake>, NixError>> {
        // Flakes are tested with the real Nix (tests/flake.rs) only.
        Box::pin(async move {
            Err(NixError::Failed {
                stage: "resolving the flake",
                log: format!("the fake Nix has no flakes ({reference})"),
            })
        })
    }
}
