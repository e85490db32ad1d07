//! ferry: a CNI bridge plugin and a host-local compatible IPAM plugin.

pub mod attachment;
pub mod bridge_config;
pub mod cni;
pub mod delegate;
pub mod ipam;
pub mod log;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod plugin;
pub mod pod;
pub mod sysctl;
