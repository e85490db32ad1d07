//! Kubernetes Services and EndpointSlices as ferry's model of load balancing
//! (kube-proxy's inputs), whatever the store: the file store and etcd keep
//! them as the API's own JSON, the Kubernetes source reads them from the API.
//!
//! - [`model`]: parsing user documents (YAML/JSON, multi-document, `v1 List`)
//!   into k8s-openapi objects, and validating them — pure;
//! - [`alloc`]: ClusterIP and NodePort allocation against what the store
//!   already holds — pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub mod alloc;
pub mod model;

/// Everything a source knows about load balancing, as the Services
/// reconciler consumes it. Keys are `"<namespace>/<name>"` ([`model::key`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub services: BTreeMap<String, Service>,
    pub slices: BTreeMap<String, EndpointSlice>,
}
