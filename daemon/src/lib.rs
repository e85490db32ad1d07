//! ferryd: the ferry node daemon.
//!
//! Store events → desired state (pure, [`overlay::desired`]) → diff against
//! what the kernel holds (pure, [`overlay::diff`]) → apply (netlink, one
//! `nft -f` transaction). See DESIGN.md.

pub mod config;
pub mod record;
pub mod store;
pub mod overlay;
pub mod kernel;
pub mod conflist;
pub mod health;
pub mod masq;
pub mod daemon;
