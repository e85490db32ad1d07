//! ferry: a CNI bridge plugin and a host-local compatible IPAM plugin.

pub mod cni;
