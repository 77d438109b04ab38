//! Single flight: who waits for a build (a queued build nobody waits for
//! leaves the queue), what a caller holds while it waits, and the builds
//! that failed lately, for the page.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, Shared};
use tokio::sync::watch;

use super::{BuildError, BuildState, BuiltImage};

/// How many failed builds the page shows.
const RECENT_FAILURES: usize = 20;

pub type BuildResult = Result<Arc<BuiltImage>, Arc<BuildError>>;
pub type SharedResult = Shared<BoxFuture<'static, BuildResult>>;
/// A running build: its result, its state stream, who waits for it.
pub type Inflight = (SharedResult, watch::Receiver<BuildState>, Arc<Waiters>);

/// A build that failed, for the page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub image: String,
    pub tag: String,
    pub error: String,
    /// The end of Nix's log.
    pub log: Vec<String>,
    /// Seconds since the epoch.
    pub at: u64,
}

/// A build started or joined: its state stream and its result. While a
/// `Build` lives, someone waits for the build; a queued build that nobody
/// waits for any more leaves the queue.
pub struct Build {
    pub state: watch::Receiver<BuildState>,
    pub result: SharedResult,
    pub(super) _waiter: Waiter,
}

/// Who waits for one build.
#[derive(Default)]
pub struct Waiters {
    count: std::sync::atomic::AtomicUsize,
    gone: tokio::sync::Notify,
}

impl Waiters {
    pub fn wait(self: &Arc<Self>) -> Waiter {
        self.count.fetch_add(1, Ordering::SeqCst);
        Waiter(self.clone())
    }

    /// Resolves once nobody waits.
    pub async fn all_gone(&self) {
        loop {
            let notified = self.gone.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub struct Waiter(Arc<Waiters>);

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.gone.notify_waiters();
        }
    }
}

/// The last builds that failed (at most `RECENT_FAILURES`), newest last.
#[derive(Default)]
pub struct Failures(Mutex<VecDeque<Failure>>);

impl Failures {
    /// Records a failed build: what it was, its error, and the end of Nix's
    /// log (else of the build's own log lines).
    pub fn record(&self, state: &BuildState, e: &BuildError) {
        let log = match e.log_tail() {
            l if l.is_empty() => state.log.iter().cloned().collect(),
            l => l,
        };
        let mut failures = self.0.lock().unwrap();
        failures.push_back(Failure {
            image: state.image.clone(),
            tag: state.tag.clone(),
            error: e.summary(),
            log,
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        });
        if failures.len() > RECENT_FAILURES {
            failures.pop_front();
        }
    }

    pub fn recent(&self) -> Vec<Failure> {
        self.0.lock().unwrap().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_build_is_abandoned_only_once_every_waiter_is_gone() {
        let waiters = Arc::new(Waiters::default());
        let (a, b) = (waiters.wait(), waiters.wait());
        let gone = tokio::spawn({
            let w = waiters.clone();
            async move { w.all_gone().await }
        });
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!gone.is_finished(), "one waiter is still there");
        drop(b);
        tokio::time::timeout(Duration::from_secs(10), gone)
            .await
            .expect("all_gone resolves when the last waiter goes")
            .unwrap();
        // With nobody waiting, at once.
        waiters.all_gone().await;
    }

    #[test]
    fn failures_keep_the_newest_with_the_end_of_their_log() {
        let failures = Failures::default();
        let spec = super::super::ImageSpec::ad_hoc(
            &crate::name::parse_packages(&["curl"]).unwrap(),
            "latest",
        );
        let mut state = BuildState::new(&spec);
        state.log.push_back("building curl".into());
        for i in 0..RECENT_FAILURES + 5 {
            failures.record(&state, &BuildError::Internal(format!("failure {i}")));
        }
        let recent = failures.recent();
        assert_eq!(recent.len(), RECENT_FAILURES);
        assert!(
            recent[0].error.contains("failure 5"),
            "{:?}",
            recent[0].error
        );
        assert!(recent
            .last()
            .unwrap()
            .error
            .contains(&format!("failure {}", RECENT_FAILURES + 4)));
        // No log of Nix's own: the build's lines.
        assert_eq!(recent[0].log, ["building curl"]);
        assert_eq!(recent[0].image, state.image);
    }
}
