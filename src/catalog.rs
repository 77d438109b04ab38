//! The catalog: which images exist and under what names. Today it holds the
//! images of NixImage objects, which the controller registers and the
//! registry serves.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::build::BuiltImage;
use crate::name;

/// Images of NixImage objects, registered by the controller.
#[derive(Default)]
pub struct NamedImages {
    inner: RwLock<BTreeMap<(String, String), NamedEntry>>,
}

#[derive(Clone, Debug)]
pub enum NamedEntry {
    /// The object exists; its image is not built yet (or its build failed).
    Pending {
        tag: String,
        message: String,
    },
    Ready {
        tag: String,
        image: Arc<BuiltImage>,
    },
}

impl NamedImages {
    pub fn set(&self, namespace: &str, name: &str, entry: NamedEntry) {
        self.inner
            .write()
            .unwrap()
            .insert((namespace.into(), name.into()), entry);
    }
    pub fn remove(&self, namespace: &str, name: &str) -> Option<NamedEntry> {
        self.inner
            .write()
            .unwrap()
            .remove(&(namespace.into(), name.into()))
    }
    pub fn get(&self, namespace: &str, name: &str) -> Option<NamedEntry> {
        self.inner
            .read()
            .unwrap()
            .get(&(namespace.into(), name.into()))
            .cloned()
    }
    pub fn names(&self) -> Vec<String> {
        self.inner
            .read()
            .unwrap()
            .keys()
            .map(|(ns, n)| format!("{}/{ns}/{n}", name::NIXIMAGE_PREFIX))
            .collect()
    }
}
