//! The parts of a network config every CNI plugin shares: name, version,
//! prevResult, runtimeConfig, args, and GC's list of valid attachments.

use serde_json::Value;

use super::env::is_safe_name;
use super::error::{invalid_config, CniError, CniResult, Code};
use super::result::CniOutput;
use super::version::Version;

/// A parsed network config. `raw` is kept verbatim: delegated plugins (IPAM
/// exec) must receive exactly what the runtime sent.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub raw: Value,
    pub name: String,
    pub version: Version,
    pub plugin_type: String,
    pub prev_result: Option<CniOutput>,
}

/// One attachment a runtime still uses (GC input).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// Parse stdin. Version is checked first, so a config from an unknown
    /// spec version gets code 1 rather than a confusing decode error.
    pub fn parse(bytes: &[u8]) -> CniResult<NetConf> {
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(Code::Decode, "cannot decode network config").with_details(e)
        })?;
        if !raw.is_object() {
            return Err(CniError::new(
                Code::Decode,
                "network config is not a JSON object",
            ));
        }
        let version = Version::parse(raw["cniVersion"].as_str().unwrap_or(""))?;
        let name = str_field(&raw, "name")?.to_string();
        if !is_safe_name(&name) {
            return Err(invalid_config(format!(
                "invalid network name {name:?}: must match ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$"
            )));
        }
        let plugin_type = str_field(&raw, "type")?.to_string();
        let prev_result = match raw.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v) => Some(CniOutput::from_value(v)?),
        };
        Ok(NetConf {
            name,
            version,
            plugin_type,
            prev_result,
            raw,
        })
    }

    /// `runtimeConfig.<key>`, if present.
    pub fn runtime_config(&self, key: &str) -> Option<&Value> {
        self.raw.get("runtimeConfig")?.get(key)
    }

    /// `args.cni.<key>` (CONVENTIONS.md "args in network config").
    pub fn args_cni(&self, key: &str) -> Option<&Value> {
        self.raw.get("args")?.get("cni")?.get(key)
    }

    /// GC's `cni.dev/valid-attachments` (older runtimes: `cni.dev/attachments`);
    /// `None` when the config has neither: such a GC knows of no stale
    /// attachment, and must not take it as "none is valid".
    pub fn valid_attachments(&self) -> CniResult<Option<Vec<Attachment>>> {
        let list = match self
            .raw
            .get("cni.dev/valid-attachments")
            .filter(|v| !v.is_null())
            .or_else(|| self.raw.get("cni.dev/attachments"))
        {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(list)) => list,
            Some(_) => return Err(invalid_config("cni.dev/valid-attachments must be a list")),
        };
        list.iter()
            .map(|a| {
                let s = |k: &str| a.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                let att = Attachment {
                    container_id: s("containerID"),
                    ifname: s("ifname"),
                };
                if att.container_id.is_empty() || att.ifname.is_empty() {
                    Err(invalid_config(
                        "cni.dev/valid-attachments entries need containerID and ifname",
                    ))
                } else {
                    Ok(att)
                }
            })
            .collect::<CniResult<_>>()
            .map(Some)
    }
}

fn str_field<'a>(raw: &'a Value, key: &str) -> CniResult<&'a str> {
    match raw.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) | None => Err(invalid_config(format!("config has no {key:?}"))),
        Some(_) => Err(invalid_config(format!("{key:?} must be a string"))),
    }
}

/// Deserialize a typed view of the config; serde errors become code 7 with the
/// offending field in the details.
pub fn typed<T: serde::de::DeserializeOwned>(raw: &Value, what: &str) -> CniResult<T> {
    serde_json::from_value(raw.clone())
        .map_err(|e| invalid_config(format!("invalid {what} config")).with_details(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_minimal_config() {
        let c = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n1","type":"ferry"}"#).unwrap();
        assert_eq!(c.name, "n1");
        assert_eq!(c.version, Version::V1_1_0);
        assert!(c.prev_result.is_none());
        assert!(c.valid_attachments().unwrap().is_none());
    }

    #[test]
    fn bad_configs_get_the_right_code() {
        let cases: &[(&[u8], u32)] = &[
            (b"not json", 6),
            (b"[1]", 6),
            (br#"{"cniVersion":"0.2.0","name":"n","type":"t"}"#, 1),
            (br#"{"name":"n","type":"t"}"#, 1),
            (br#"{"cniVersion":"1.0.0","type":"t"}"#, 7),
            (br#"{"cniVersion":"1.0.0","name":"../etc","type":"t"}"#, 7),
            (br#"{"cniVersion":"1.0.0","name":"n"}"#, 7),
            (
                br#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{"ips":7}}"#,
                6,
            ),
        ];
        for (input, code) in cases {
            let got = NetConf::parse(input).unwrap_err().code;
            assert_eq!(got, *code, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn reads_both_spellings_of_valid_attachments() {
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            let raw = format!(
                r#"{{"cniVersion":"1.1.0","name":"n","type":"t","{key}":[{{"containerID":"a","ifname":"eth0"}}]}}"#
            );
            let c = NetConf::parse(raw.as_bytes()).unwrap();
            assert_eq!(c.valid_attachments().unwrap().unwrap()[0].container_id, "a");
        }
    }
}
