//! Kubernetes Services and EndpointSlices as ferry's model of load balancing
//! (kube-proxy's inputs), whatever the store: the file store and etcd keep
//! them as the API's own JSON, the Kubernetes source reads them from the API.
//!
//! - [`model`]: parsing user documents (YAML/JSON, multi-document, `v1 List`)
//!   into k8s-openapi objects, and validating them — pure;
//! - [`alloc`]: ClusterIP and NodePort allocation against what the store
//!   already holds — pure.

pub mod alloc;
pub mod model;
