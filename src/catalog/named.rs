//! The images of NixImage objects by namespace and name, as the controller
//! registers them (pending while they build), for the registry to serve
//! under `niximage/<namespace>/<name>`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::image::BuiltImage;
use crate::name;

/// Images of NixImage objects, registered by the controller.
#[derive(Default)]
pub struct NamedImages {
    inner: RwLock<BTreeMap<(String, String), NamedEntry>>,
}

#[derive(Clone, Debug)]
pub enum NamedEntry {
    /// The object exists; its image is not built yet (or its build failed).
    Pending { tag: String, message: String },
    Ready {
        tag: String,
        /// The image of the first of `--systems` (the node's own), and its
        /// architecture.
        image: Arc<BuiltImage>,
        arch: crate::name::Arch,
        /// The other systems' images: with them, the tag has an index.
        others: Vec<(crate::name::Arch, Arc<BuiltImage>)>,
    },
}

impl NamedEntry {
    /// A ready entry's images, its own first.
    pub fn images(&self) -> Vec<(crate::name::Arch, Arc<BuiltImage>)> {
        match self {
            NamedEntry::Pending { .. } => vec![],
            NamedEntry::Ready {
                image,
                arch,
                others,
                ..
            } => std::iter::once((*arch, image.clone()))
                .chain(others.iter().cloned())
                .collect(),
        }
    }
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
    /// Every NixImage: namespace, name, and its entry.
    pub fn entries(&self) -> Vec<(String, String, NamedEntry)> {
        self.inner
            .read()
            .unwrap()
            .iter()
            .map(|((ns, n), e)| (ns.clone(), n.clone(), e.clone()))
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_named_by_namespace_and_name() {
        let named = NamedImages::default();
        let pending = |tag: &str| NamedEntry::Pending {
            tag: tag.into(),
            message: "building".into(),
        };
        named.set("team-b", "web", pending("v1"));
        named.set("team-a", "web", pending("v2"));
        assert_eq!(
            named.names(),
            ["niximage/team-a/web", "niximage/team-b/web"]
        );
        assert!(named.get("team-a", "web").unwrap().images().is_empty());
        assert!(named.get("team-a", "api").is_none());
        assert!(
            matches!(named.remove("team-b", "web"), Some(NamedEntry::Pending { tag, .. }) if tag == "v1")
        );
        assert_eq!(named.entries().len(), 1);
    }
}
