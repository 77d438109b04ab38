//! Names the agents write into the cluster: the API version, the field
//! managers, older agents' finalizers, and long node names shortened to fit.

use crate::name;

/// Field manager of the aggregate status fields, shared by all agents.
pub const FIELD_MANAGER: &str = "nixery.k8s.nixos.org";

pub const API_VERSION: &str = "k8s.nixos.org/v1alpha1";

/// Field manager of the resolved revision (`status.revision*`), shared by all agents.
pub const REVISION_MANAGER: &str = "nixery.k8s.nixos.org-revision";

/// Older agents' finalizers started with this; the rest names the node.
pub const FINALIZER_PREFIX: &str = "k8s.nixos.org/nixery-";

pub fn finalizer_of(node: &str) -> String {
    format!("{FINALIZER_PREFIX}{}", short(node, 56))
}

/// The name itself when short enough, else a prefix and a hash.
pub fn short(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let hash = &name::Digest::of(s.as_bytes()).hex()[..8].to_string();
    format!("{}-{hash}", &s[..max - 9])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_node_names_make_valid_finalizers() {
        let long = "n".repeat(200);
        let s = short(&long, 56);
        assert_eq!(s.len(), 56);
        assert_ne!(
            short(&format!("{long}a"), 56),
            short(&format!("{long}b"), 56)
        );
        assert_eq!(short("node-1", 56), "node-1");
    }
}
