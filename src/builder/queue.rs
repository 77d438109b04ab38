//! The build queue's rules: at most `max_queue` requests wait (past it, the
//! client is told to come back), at most `max_builds` build at once, and a
//! waiting build whose every requester went away leaves the queue unbuilt.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, SemaphorePermit};

use super::flight::Waiters;
use super::BuildError;

pub struct Queue {
    /// Requests admitted that have not yet taken a slot or left.
    queued: AtomicUsize,
    max_queue: usize,
    slots: Semaphore,
}

impl Queue {
    pub fn new(max_builds: usize, max_queue: usize) -> Self {
        Queue {
            queued: AtomicUsize::new(0),
            max_queue,
            slots: Semaphore::new(max_builds.max(1)),
        }
    }

    /// Admits a request, or refuses it when `max_queue` wait already.
    pub fn admit(&self) -> Result<(), BuildError> {
        self.queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max_queue).then_some(n + 1)
            })
            .map(|_| ())
            .map_err(|_| BuildError::QueueFull(self.max_queue))
    }

    /// An admitted request leaves without building (another instance's
    /// image was adopted, or that failed).
    pub fn leave(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }

    /// Waits for a build slot, leaving the queue either way: the slot, or
    /// None when everyone who waited for the build went away first (a build
    /// that has its slot goes on: its work is not wasted).
    pub async fn slot(&self, waiters: &Waiters) -> Option<SemaphorePermit<'_>> {
        let permit = tokio::select! {
            p = self.slots.acquire() => p.ok(),
            _ = waiters.all_gone() => None,
        };
        self.leave();
        permit
    }

    /// Requests waiting now.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn past_max_queue_requests_are_refused_until_one_leaves() {
        let q = Queue::new(1, 2);
        q.admit().unwrap();
        q.admit().unwrap();
        assert!(matches!(q.admit(), Err(BuildError::QueueFull(2))));
        q.leave();
        q.admit().unwrap();
        assert_eq!(q.waiting(), 2);
    }

    #[tokio::test]
    async fn slots_limit_builds_and_a_build_nobody_waits_for_leaves() {
        let q = Arc::new(Queue::new(1, 8));
        let waiters = Arc::new(Waiters::default());
        let _w = waiters.wait();
        q.admit().unwrap();
        let first = q.slot(&waiters).await.expect("a free slot");
        assert_eq!(q.waiting(), 0);
        // The second waits while the first builds...
        q.admit().unwrap();
        let (q2, others) = (q.clone(), Arc::new(Waiters::default()));
        let w2 = others.wait();
        let second = tokio::spawn({
            let others = others.clone();
            async move { q2.slot(&others).await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished());
        assert_eq!(q.waiting(), 1);
        // ...and leaves, unbuilt, when its requesters go.
        drop(w2);
        assert!(!second.await.unwrap(), "abandoned");
        assert_eq!(q.waiting(), 0);
        // A slot freed is taken by the next.
        drop(first);
        q.admit().unwrap();
        assert!(q.slot(&waiters).await.is_some());
    }
}
