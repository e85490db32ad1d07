//! CNI spec versions ferry speaks and how results differ between them.

use super::env::Command;
use super::error::{CniError, CniResult, Code};

pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

/// A supported spec version, ordered oldest to newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub fn parse(s: &str) -> CniResult<Version> {
        Ok(match s {
            "0.3.0" => Version::V0_3_0,
            "0.3.1" => Version::V0_3_1,
            "0.4.0" => Version::V0_4_0,
            "1.0.0" => Version::V1_0_0,
            "1.1.0" => Version::V1_1_0,
            "" => {
                return Err(CniError::new(
                    Code::IncompatibleVersion,
                    "config has no cniVersion",
                ))
            }
            other => {
                return Err(CniError::new(
                    Code::IncompatibleVersion,
                    format!("incompatible CNI version {other:?}"),
                )
                .with_details(format!("supported versions: {}", SUPPORTED.join(", "))))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        SUPPORTED[self as usize]
    }

    /// 0.3.x and 0.4.0 results tag every IP with "version": "4"|"6".
    pub fn ips_carry_version(self) -> bool {
        self < Version::V1_0_0
    }

    /// Fields that only exist from 1.1.0 on (interface mtu, socketPath, pciID;
    /// route mtu, advmss, priority, table, scope).
    pub fn has_1_1_fields(self) -> bool {
        self >= Version::V1_1_0
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= Version::V0_4_0
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn has_status_and_gc(self) -> bool {
        self >= Version::V1_1_0
    }

    /// Whether a config of this version may be used with `command`.
    pub fn allows(self, command: Command) -> CniResult<()> {
        let ok = match command {
            Command::Check => self.has_check(),
            Command::Status | Command::Gc => self.has_status_and_gc(),
            Command::Add | Command::Del | Command::Version => true,
        };
        if ok {
            Ok(())
        } else {
            Err(CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "{} is not defined for cniVersion {}",
                    command.as_str(),
                    self.as_str()
                ),
            ))
        }
    }
}

/// The VERSION verb's answer.
pub fn version_json(asked: &str) -> String {
    serde_json::json!({ "cniVersion": asked, "supportedVersions": SUPPORTED }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_and_rejects_others_with_code_1() {
        for s in SUPPORTED {
            assert_eq!(Version::parse(s).unwrap().as_str(), *s);
        }
        for bad in ["0.1.0", "0.2.0", "2.0.0", "", "1.1"] {
            assert_eq!(Version::parse(bad).unwrap_err().code, 1, "{bad}");
        }
        assert!(Version::V0_4_0 < Version::V1_0_0);
    }

    #[test]
    fn verbs_are_gated_by_version() {
        assert!(Version::V0_3_1.allows(Command::Check).is_err());
        assert!(Version::V0_4_0.allows(Command::Check).is_ok());
        assert_eq!(Version::V1_0_0.allows(Command::Gc).unwrap_err().code, 1);
        assert!(Version::V1_1_0.allows(Command::Status).is_ok());
        assert!(Version::V0_3_0.allows(Command::Add).is_ok());
    }
}
