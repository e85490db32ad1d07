//! Kubernetes Services and EndpointSlices as ferry's model of load balancing
//! (kube-proxy's inputs), whatever the store: the file store and etcd keep
//! them as the API's own JSON, the Kubernetes source reads them from the API.
//!
//! - [`model`]: parsing user documents (YAML/JSON, multi-document, `v1 List`)
//!   into k8s-openapi objects, and validating them — pure;
//! - [`alloc`]: ClusterIP and NodePort allocation against what the store
//!   already holds — pure;
//! - [`state`]: what ferryd keeps of them (what the plan reads), in maps
//!   that are cheap to share and compare — pure;
//! - [`plan`]: which endpoints serve which traffic on this node — pure;
//! - [`render`]: the nftables ruleset as data, kept per Service, and its
//!   diff — pure;
//! - [`datapath`]: that ruleset in the kernel, over netlink.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub mod alloc;
pub mod datapath;
pub mod model;
pub mod plan;
pub mod reconciler;
pub mod render;
pub mod state;

/// Services and EndpointSlices as the API's whole objects, as `ferryctl`
/// reads and writes them (ferryd keeps only a [`state::State`]). Keys are
/// `"<namespace>/<name>"` ([`model::key`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub services: BTreeMap<String, Service>,
    pub slices: BTreeMap<String, EndpointSlice>,
}

impl Snapshot {
    /// The objects of a YAML or JSON text ([`model::parse`]).
    pub fn from_documents(text: &str) -> Result<Snapshot, model::ModelError> {
        let mut s = Snapshot::default();
        for o in model::parse(text)? {
            s.insert(o);
        }
        Ok(s)
    }

    /// Adds (or replaces) `obj` under its `namespace/name`.
    pub fn insert(&mut self, obj: model::Object) {
        let key = obj.key();
        match obj {
            model::Object::Service(s) => {
                self.services.insert(key, *s);
            }
            model::Object::EndpointSlice(e) => {
                self.slices.insert(key, *e);
            }
        }
    }
}
