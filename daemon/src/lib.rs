//! ferryd: the ferry node daemon.
//!
//! Store snapshots → desired state (pure: [`overlay::desired`],
//! [`service::render`], [`masq`]) → diff against what the kernel holds or
//! what was last written (pure) → apply over netlink (links, routes,
//! neighbours; nftables in one transaction). See DESIGN.md and
//! [`daemon`] for the tasks.

pub mod config;
pub mod conflist;
pub mod conntrack;
pub mod ctl;
pub mod daemon;
pub mod health;
pub mod kernel;
pub mod masq;
pub mod overlay;
pub mod parallel;
pub mod record;
pub mod service;
pub mod store;

#[cfg(test)]
mod manifest_tests;
