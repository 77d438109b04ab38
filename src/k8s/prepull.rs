//! Pre-pull: a NixImage that is ready on this node is pulled into the node's
//! container runtime through its CRI, so that a Pod naming it starts without
//! a pull. The images this agent pulled, and only those, are removed through
//! the CRI when their object goes, unless a container still uses them.
//!
//! What the agent owns is kept as the references it added to the runtime
//! (`<state>/prepulled.json`), so a restarted agent still knows them. A
//! released reference is removed with its image once every name that image
//! has is a released one of ours and no container uses it; until then (a
//! Pod still runs it, or another object shares the image) it waits for a
//! later sweep.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::cri;

/// How soon a failed pre-pull may be tried again.
const RETRY: Duration = Duration::from_secs(60);

/// Where one object's image stands in the runtime.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Being pulled; the object is triggered again when it ends.
    Pulling,
    /// In the runtime, named `<runtime> <version>`.
    InRuntime(String),
    Failed(String),
}

enum Job {
    /// (With the failure it retries after, which it reports meanwhile.)
    Running {
        digest: String,
        retrying: Option<String>,
    },
    Done {
        digest: String,
        runtime: String,
    },
    Failed {
        digest: String,
        message: String,
        at: Instant,
    },
}

/// Each reference this agent added to the runtime, with the object
/// (`namespace/name`) it was pulled for, or none once that object let go.
#[derive(Default, Serialize, Deserialize)]
struct Owned {
    refs: BTreeMap<String, Option<String>>,
}

pub struct Prepuller {
    runtime: cri::Runtime,
    file: PathBuf,
    owned: Mutex<Owned>,
    jobs: Mutex<HashMap<String, Job>>,
    /// One pull or sweep at a time: what the runtime holds is read, changed
    /// and recorded without another job in between.
    gate: tokio::sync::Mutex<()>,
    /// How soon a failed pull is tried again (`RETRY`).
    retry: Duration,
}

/// The two references an object's image is pulled under: its tag, which a
/// Pod may name, and its digest, which `status.image` pins.
#[derive(Debug, Clone)]
pub struct Target {
    pub object: String,
    pub tag_ref: String,
    pub digest_ref: String,
    pub digest: String,
}

impl Prepuller {
    /// Owns what `<state_dir>/prepulled.json` says this agent pulled before.
    pub fn new(runtime: cri::Runtime, state_dir: &std::path::Path) -> Self {
        let file = state_dir.join("prepulled.json");
        let owned = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                warn!(file = %file.display(), error = %e, "unreadable; pre-pulled images of before will stay");
                Owned::default()
            }),
            Err(_) => Owned::default(),
        };
        Prepuller {
            runtime,
            file,
            owned: Mutex::new(owned),
            jobs: Mutex::default(),
            gate: tokio::sync::Mutex::new(()),
            retry: RETRY,
        }
    }

    pub fn runtime(&self) -> &cri::Runtime {
        &self.runtime
    }

    /// Where the target's image stands; starts its pull when it is neither
    /// pulled nor being pulled (nor failed within the last minute), and calls
    /// `done` when that pull ends, and a minute after it failed (to try again).
    pub fn ensure(
        self: &Arc<Self>,
        target: &Target,
        done: impl Fn() + Send + Sync + 'static,
    ) -> State {
        let mut jobs = self.jobs.lock().unwrap();
        let mut retrying = None;
        match jobs.get(&target.object) {
            Some(Job::Done { digest, runtime }) if *digest == target.digest => {
                return State::InRuntime(runtime.clone())
            }
            Some(Job::Running {
                digest,
                retrying: r,
            }) if *digest == target.digest => {
                return match r {
                    Some(m) => State::Failed(m.clone()),
                    None => State::Pulling,
                }
            }
            Some(Job::Failed {
                digest,
                message,
                at,
            }) if *digest == target.digest => {
                if at.elapsed() < self.retry {
                    return State::Failed(message.clone());
                }
                retrying = Some(message.clone());
            }
            _ => {}
        }
        jobs.insert(
            target.object.clone(),
            Job::Running {
                digest: target.digest.clone(),
                retrying: retrying.clone(),
            },
        );
        let this = self.clone();
        let target = target.clone();
        tokio::spawn(async move {
            let result = this.pull(&target).await;
            let failed = result.is_err();
            let job = match result {
                Ok(runtime) => {
                    info!(image = %target.digest_ref, %runtime, "pre-pulled into the container runtime");
                    Job::Done {
                        digest: target.digest.clone(),
                        runtime,
                    }
                }
                Err(e) => {
                    warn!(image = %target.digest_ref, error = %e, "pre-pulling into the container runtime");
                    Job::Failed {
                        digest: target.digest.clone(),
                        message: e.to_string(),
                        at: Instant::now(),
                    }
                }
            };
            {
                let mut jobs = this.jobs.lock().unwrap();
                // A newer target's job is not overwritten by an older one.
                if matches!(jobs.get(&target.object), Some(Job::Running { digest, .. }) if *digest == target.digest)
                {
                    jobs.insert(target.object.clone(), job);
                }
            }
            done();
            if failed {
                // The runtime may be back by then (it restarted, or the
                // node's came up after the agent).
                tokio::time::sleep(this.retry).await;
                done();
            } else {
                this.sweep().await;
            }
        });
        match retrying {
            Some(m) => State::Failed(m),
            None => State::Pulling,
        }
    }

    /// Pulls the target under its tag and its digest, and records as ours
    /// the names the image did not have before. The object's references to
    /// an older image are released.
    async fn pull(&self, target: &Target) -> Result<String, cri::Error> {
        let _gate = self.gate.lock().await;
        let runtime = self.runtime.version().await?;
        let before = self.runtime.image(&target.digest_ref).await?;
        let before = before.as_ref().map(cri::names).unwrap_or_default();
        self.runtime.pull(&target.tag_ref).await?;
        let mut image = self.runtime.image(&target.digest_ref).await?;
        if image.is_none() {
            // The tag moved on meanwhile: the digest is what status names.
            self.runtime.pull(&target.digest_ref).await?;
            image = self.runtime.image(&target.digest_ref).await?;
        }
        let after = image.as_ref().map(cri::names).unwrap_or_default();
        let mut owned = self.owned.lock().unwrap();
        for (r, object) in owned.refs.iter_mut() {
            if object.as_deref() == Some(&target.object) && !after.contains(r) {
                *object = None;
            }
        }
        let id = image.as_ref().map(|i| i.id.clone()).unwrap_or_default();
        for name in after.difference(&before) {
            if *name != id {
                owned.refs.insert(name.clone(), Some(target.object.clone()));
            }
        }
        self.save(&owned);
        Ok(runtime)
    }

    /// The object went: what was pulled for it is released, and removed
    /// unless a container uses it.
    pub async fn release(&self, object: &str) {
        self.jobs.lock().unwrap().remove(object);
        {
            let mut owned = self.owned.lock().unwrap();
            let mut changed = false;
            for o in owned.refs.values_mut() {
                if o.as_deref() == Some(object) {
                    *o = None;
                    changed = true;
                }
            }
            if !changed {
                return;
            }
            self.save(&owned);
        }
        self.sweep().await;
    }

    /// The objects this agent pulled images for.
    pub fn objects(&self) -> Vec<String> {
        let owned = self.owned.lock().unwrap();
        let mut objects: Vec<String> = owned.refs.values().flatten().cloned().collect();
        objects.sort();
        objects.dedup();
        objects
    }

    /// Removes each released image whose every name is a released reference
    /// of ours and that no container uses; forgets references the runtime no
    /// longer has. Runs after each pull and release, and now and then.
    pub async fn sweep(&self) {
        let _gate = self.gate.lock().await;
        if let Err(e) = self.sweep_now().await {
            warn!(error = %e, "removing pre-pulled images");
        }
    }

    async fn sweep_now(&self) -> Result<(), cri::Error> {
        let released: Vec<String> = {
            let owned = self.owned.lock().unwrap();
            owned
                .refs
                .iter()
                .filter(|(_, o)| o.is_none())
                .map(|(r, _)| r.clone())
                .collect()
        };
        if released.is_empty() {
            return Ok(());
        }
        let in_use = self.runtime.images_in_use().await?;
        let mut gone = Vec::new();
        for r in released {
            if gone.contains(&r) {
                continue;
            }
            let Some(image) = self.runtime.image(&r).await? else {
                gone.push(r);
                continue;
            };
            let names = cri::names(&image);
            let ours = {
                let owned = self.owned.lock().unwrap();
                names
                    .iter()
                    .filter(|n| **n != image.id)
                    .all(|n| matches!(owned.refs.get(n), Some(None)))
            };
            if !ours || image.pinned {
                debug!(image = %r, "kept: the runtime has it under other names too");
                continue;
            }
            if names.iter().any(|n| in_use.contains(n)) {
                debug!(image = %r, "kept while a container uses it");
                continue;
            }
            self.runtime.remove(&image.id).await?;
            info!(image = %r, "removed a pre-pulled image whose object is gone");
            gone.extend(names);
        }
        let mut owned = self.owned.lock().unwrap();
        for r in gone {
            if matches!(owned.refs.get(&r), Some(None)) {
                owned.refs.remove(&r);
            }
        }
        self.save(&owned);
        Ok(())
    }

    fn save(&self, owned: &Owned) {
        let tmp = self.file.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(owned).expect("plain data serialises");
        if let Err(e) = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &self.file))
        {
            warn!(file = %self.file.display(), error = %e, "recording pre-pulled images");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime that does not answer: the failure is reported, the object
    /// is triggered again once the retry delay has passed, and the retry reports the failure
    /// until it ends (no flapping to "pulling" in the status entry).
    #[tokio::test]
    async fn a_failed_pull_is_tried_again_later_reporting_its_failure_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = cri::Runtime::new(&dir.path().join("no-such.sock")).unwrap();
        let mut p = Prepuller::new(runtime, dir.path());
        // (A minute in the agent.)
        p.retry = Duration::from_millis(300);
        let p = Arc::new(p);
        let target = Target {
            object: "ns/name".into(),
            tag_ref: "127.0.0.1:5000/niximage/ns/name:v1".into(),
            digest_ref: "127.0.0.1:5000/niximage/ns/name@sha256:00".into(),
            digest: "sha256:00".into(),
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let done = move || {
            let _ = tx.send(());
        };
        assert_eq!(p.ensure(&target, done.clone()), State::Pulling);
        rx.recv().await.unwrap();
        let started = Instant::now();
        let State::Failed(message) = p.ensure(&target, done.clone()) else {
            panic!("not failed");
        };
        assert!(message.contains("Version"), "{message}");
        // Triggered again once the minute has passed; the retry says the
        // failure until it ends.
        rx.recv().await.unwrap();
        assert!(started.elapsed() >= p.retry);
        assert!(matches!(p.ensure(&target, done.clone()), State::Failed(_)));
        rx.recv().await.unwrap();
        assert!(matches!(p.ensure(&target, done), State::Failed(_)));
    }
}
