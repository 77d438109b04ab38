//! Kubernetes: the NixImage custom resource, the controller that each node's
//! agent runs, and the node Leases by which the agents know who is alive.

pub mod controller;
pub mod crd;
pub mod lease;
