//! The CNI result object, parsed from any supported version and encoded for
//! the version a config asks for.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{CniError, CniResult, Code};
use super::version::Version;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub socket_path: String,
    #[serde(default, rename = "pciID", skip_serializing_if = "String::is_empty")]
    pub pci_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix length, e.g. 10.1.0.5/24.
    pub address: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    pub dst: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

impl Route {
    pub fn new(dst: IpNetwork, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        *self == Dns::default()
    }
}

/// A result in the 1.x shape; older shapes are produced by `to_json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniOutput {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

impl CniOutput {
    /// Parse a result (or prevResult) of any supported version. The 0.3/0.4
    /// per-IP "version" tag is redundant with the address and is dropped.
    pub fn from_value(v: &Value) -> CniResult<CniOutput> {
        serde_json::from_value(v.clone())
            .map_err(|e| CniError::new(Code::Decode, "cannot decode CNI result").with_details(e))
    }

    pub fn from_slice(bytes: &[u8]) -> CniResult<CniOutput> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| CniError::new(Code::Decode, "cannot decode CNI result").with_details(e))?;
        CniOutput::from_value(&v)
    }

    /// Encode for `version`: add the 0.x "version" tags, drop 1.1-only fields.
    pub fn to_value(&self, version: Version) -> Value {
        let mut v = serde_json::to_value(self).expect("result serializes");
        let obj = v.as_object_mut().expect("result is an object");
        if version.ips_carry_version() {
            for ip in obj
                .get_mut("ips")
                .and_then(Value::as_array_mut)
                .into_iter()
                .flatten()
            {
                let four = ip["address"].as_str().is_some_and(|a| !a.contains(':'));
                ip["version"] = Value::from(if four { "4" } else { "6" });
            }
        }
        if !version.has_1_1_fields() {
            strip(obj, "interfaces", &["mtu", "socketPath", "pciID"]);
            strip(
                obj,
                "routes",
                &["mtu", "advmss", "priority", "table", "scope"],
            );
        }
        let mut out = Map::new();
        out.insert("cniVersion".into(), Value::from(version.as_str()));
        out.append(obj);
        Value::Object(out)
    }

    pub fn to_json(&self, version: Version) -> String {
        self.to_value(version).to_string()
    }
}

fn strip(obj: &mut Map<String, Value>, list: &str, keys: &[&str]) {
    for item in obj
        .get_mut(list)
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(item) = item.as_object_mut() {
            for k in keys {
                item.remove(*k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniOutput {
        CniOutput {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "0a:58:0a:01:00:05".into(),
                mtu: Some(1450),
                sandbox: "/var/run/netns/p".into(),
                ..Default::default()
            }],
            ips: vec![
                IpConfig {
                    address: "10.1.0.5/24".parse().unwrap(),
                    gateway: Some("10.1.0.1".parse().unwrap()),
                    interface: Some(0),
                },
                IpConfig {
                    address: "fd00::5/64".parse().unwrap(),
                    gateway: None,
                    interface: Some(0),
                },
            ],
            routes: vec![Route {
                mtu: Some(1400),
                ..Route::new(
                    "0.0.0.0/0".parse().unwrap(),
                    Some("10.1.0.1".parse().unwrap()),
                )
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn encodes_1_1_with_new_fields_and_no_ip_version() {
        let v = sample().to_value(Version::V1_1_0);
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["interfaces"][0]["mtu"], 1450);
        assert_eq!(v["routes"][0]["mtu"], 1400);
        assert!(v["ips"][0].get("version").is_none());
        assert!(v.get("dns").is_none());
    }

    #[test]
    fn encodes_0_x_with_ip_version_and_without_1_1_fields() {
        for ver in [Version::V0_3_0, Version::V0_3_1, Version::V0_4_0] {
            let v = sample().to_value(ver);
            assert_eq!(v["cniVersion"], ver.as_str());
            assert_eq!(v["ips"][0]["version"], "4");
            assert_eq!(v["ips"][1]["version"], "6");
            assert!(v["interfaces"][0].get("mtu").is_none());
            assert!(v["routes"][0].get("mtu").is_none());
        }
        let v = sample().to_value(Version::V1_0_0);
        assert!(v["ips"][0].get("version").is_none());
        assert!(v["interfaces"][0].get("mtu").is_none());
    }

    #[test]
    fn round_trips_through_every_version() {
        for ver in [
            Version::V0_3_0,
            Version::V0_4_0,
            Version::V1_0_0,
            Version::V1_1_0,
        ] {
            let parsed = CniOutput::from_slice(sample().to_json(ver).as_bytes()).unwrap();
            assert_eq!(parsed.ips, sample().ips);
        }
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert_eq!(CniOutput::from_slice(b"{").unwrap_err().code, 6);
        assert_eq!(
            CniOutput::from_slice(br#"{"ips":[{"address":"x"}]}"#)
                .unwrap_err()
                .code,
            6
        );
    }
}
