//! ferryd: the ferry node daemon.
//!
//! Store events → desired state (pure, [`overlay::desired`]) → diff against
//! what the kernel holds (pure, [`overlay::diff`]) → apply (netlink, one
//! `nft -f` transaction). See DESIGN.md.

pub mod config;
pub mod conflist;
pub mod conntrack;
pub mod ctl;
pub mod daemon;
pub mod health;
pub mod kernel;
pub mod masq;
pub mod overlay;
pub mod record;
pub mod service;
pub mod store;
