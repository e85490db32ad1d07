//! The CNI protocol: environment, config, results, errors, versions. Pure.

pub mod config;
pub mod env;
pub mod error;
pub mod result;
pub mod skel;
pub mod version;

pub use config::{Attachment, NetConf};
pub use env::{CniEnv, Command};
pub use error::{CniError, CniResult, Code};
pub use result::{CniOutput, Dns, Interface, IpConfig, Route};
pub use version::Version;
