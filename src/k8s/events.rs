//! Kubernetes Events about a NixImage, each with its current text (kube's
//! `Recorder` alone would keep the first text of a series).

use std::collections::HashMap;
use std::sync::Mutex;

use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use tracing::warn;

use crate::k8s::crd::NixImage;

/// Events with current text. kube's `Recorder` merges every event of one
/// object and reason into a series and keeps the first note, so a second
/// `BuildSucceeded` would still show the first digest. One recorder per
/// (object, reason, note) keeps that merging for repeats of the same text
/// (as client-go's correlator does) and makes a new event when the text changes.
pub struct Events {
    client: Client,
    reporter: Reporter,
    recorders: Mutex<HashMap<(String, String), (String, Recorder)>>,
}

impl Events {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Events {
            client,
            reporter,
            recorders: Default::default(),
        }
    }

    /// Best effort: a failure to record one is logged, not retried.
    pub async fn publish(&self, obj: &NixImage, type_: EventType, reason: &str, note: &str) {
        let note: String = note.chars().take(1000).collect();
        let recorder = {
            let mut recorders = self.recorders.lock().unwrap();
            let key = (obj.uid().unwrap_or_default(), reason.to_string());
            match recorders.get(&key) {
                Some((n, r)) if *n == note => r.clone(),
                _ => {
                    let r = Recorder::new(self.client.clone(), self.reporter.clone());
                    recorders.insert(key, (note.clone(), r.clone()));
                    r
                }
            }
        };
        let event = KubeEvent {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Build".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(error = %e, reason, "publishing an event");
        }
    }

    pub(super) fn forget(&self, uid: &str) {
        self.recorders.lock().unwrap().retain(|(u, _), _| u != uid);
    }
}
