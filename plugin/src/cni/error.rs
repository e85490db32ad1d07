//! CNI errors: the spec's error codes and the JSON error object on stdout.

use serde::Serialize;

/// Error codes from the CNI spec (SPEC.md, "Error").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    NotAvailableLimitedConnectivity = 51,
    /// First of the plugin-specific codes (100+): kernel (netlink) failure.
    Kernel = 100,
    /// IPAM range exhausted or requested address unavailable.
    IpamExhausted = 101,
    /// A delegated plugin (IPAM exec) failed without a CNI error.
    Delegate = 102,
    /// CHECK found the attachment differs from prevResult.
    CheckFailed = 103,
}

/// An error a CNI verb returns. `msg` is short; `details` carries the cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        CniError {
            code: code as u32,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl std::fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    /// The error as the spec's JSON object, encoded for `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .expect("error object serializes")
    }
}

/// Shorthand constructors used across the crate.
pub fn invalid_config(msg: impl Into<String>) -> CniError {
    CniError::new(Code::InvalidConfig, msg)
}

pub fn io_error(msg: impl Into<String>, err: impl std::fmt::Display) -> CniError {
    CniError::new(Code::Io, msg).with_details(err)
}

pub type CniResult<T> = std::result::Result<T, CniError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_code_and_omits_empty_details() {
        let e = CniError::new(Code::InvalidEnv, "CNI_IFNAME is missing");
        assert_eq!(
            e.to_json("1.1.0"),
            r#"{"cniVersion":"1.1.0","code":4,"msg":"CNI_IFNAME is missing"}"#
        );
        let e = e.with_details("x");
        assert!(e.to_json("1.0.0").ends_with(r#""details":"x"}"#));
    }
}
