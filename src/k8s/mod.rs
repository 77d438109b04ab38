//! Kubernetes: the NixImage custom resource, the controller that each node's
//! agent runs, and the node Leases by which the agents know who is alive.

pub mod cleanup;
pub mod context;
pub mod controller;
pub mod crd;
pub mod events;
pub mod lease;
pub mod names;
pub mod prepull;
pub mod reconcile;
pub mod sources;
pub mod status;
