//! ferry's network config: the reference `bridge` plugin's keys, validated
//! up front so that nothing is touched when the config is wrong.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use crate::cni::env::validate_ifname;
use crate::cni::error::{invalid_config, CniError, CniResult, Code};
use crate::cni::{CniEnv, NetConf};

/// Where ferry keeps its own per-attachment records when `dataDir` is unset.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/ferry";

#[derive(Debug, Clone, PartialEq)]
pub struct BridgeConfig {
    pub bridge: String,
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub force_address: bool,
    pub ip_masq: bool,
    pub mtu: Option<u32>,
    pub hairpin_mode: bool,
    pub promisc_mode: bool,
    /// Keep IPv6 duplicate address detection on in the pod (reference key).
    pub enable_dad: bool,
    /// `ipam.type`; empty means layer-2 only (no addresses), as in the reference.
    pub ipam_type: String,
    /// Requested MAC for the pod interface.
    pub mac: Option<[u8; 6]>,
    /// ferry's own records live in `<data_dir>/<network>/`.
    pub data_dir: PathBuf,
    /// Diagnostics go here instead of stderr when set.
    pub log_file: Option<PathBuf>,
    /// Set in the conflist ferryd writes: STATUS reports "not available"
    /// while this file is missing (ferryd not ready on this node).
    pub ferryd_ready_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    #[serde(default)]
    bridge: Option<String>,
    #[serde(default)]
    is_gateway: bool,
    #[serde(default)]
    is_default_gateway: bool,
    #[serde(default)]
    force_address: bool,
    #[serde(default)]
    ip_masq: bool,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    hairpin_mode: bool,
    #[serde(default)]
    promisc_mode: bool,
    #[serde(default, rename = "enabledad")]
    enable_dad: bool,
    #[serde(default)]
    ipam: Option<Value>,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    log_file: Option<PathBuf>,
    #[serde(default)]
    ferryd_ready_file: Option<PathBuf>,
}

/// Keys the reference bridge accepts that ferry does not implement yet, with
/// the value that means "feature off" (which is accepted).
fn unsupported(raw: &Value) -> Option<&'static str> {
    let on = |k: &str| match raw.get(k) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => n.as_u64() != Some(0),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    [
        "vlan",
        "vlanTrunk",
        "macspoofchk",
        "disableContainerInterface",
        "portIsolation",
    ]
    .into_iter()
    .find(|k| on(k))
    .or_else(|| match raw.get("ipMasqBackend").and_then(Value::as_str) {
        Some("iptables") => Some("ipMasqBackend"),
        _ => None,
    })
}

impl BridgeConfig {
    pub fn parse(conf: &NetConf, env: &CniEnv) -> CniResult<BridgeConfig> {
        if let Some(key) = unsupported(&conf.raw) {
            return Err(CniError::new(
                Code::UnsupportedField,
                format!("config key {key:?} is not supported by ferry yet"),
            ));
        }
        let raw: Raw = crate::cni::config::typed(&conf.raw, "bridge")?;
        let bridge = raw.bridge.unwrap_or_else(|| "cni0".to_string());
        validate_ifname(&bridge)
            .map_err(|e| invalid_config(format!("invalid \"bridge\": {}", e.msg)))?;
        if let Some(mtu) = raw.mtu {
            if mtu != 0 && !(68..=65535).contains(&mtu) {
                return Err(invalid_config(format!(
                    "\"mtu\" {mtu} is out of range 68..65535"
                )));
            }
        }
        let ipam_type = match &raw.ipam {
            None | Some(Value::Null) => String::new(),
            Some(v) => match v.get("type") {
                Some(Value::String(t)) => t.clone(),
                None => String::new(),
                Some(_) => return Err(invalid_config("\"ipam.type\" must be a string")),
            },
        };
        if !ipam_type.is_empty() && !crate::cni::env::is_safe_name(&ipam_type) {
            return Err(invalid_config(format!(
                "invalid \"ipam.type\" {ipam_type:?}"
            )));
        }
        check_cni_args(env)?;
        Ok(BridgeConfig {
            bridge,
            is_gateway: raw.is_gateway || raw.is_default_gateway,
            is_default_gateway: raw.is_default_gateway,
            force_address: raw.force_address,
            ip_masq: raw.ip_masq,
            mtu: raw.mtu.filter(|m| *m != 0),
            hairpin_mode: raw.hairpin_mode,
            promisc_mode: raw.promisc_mode,
            enable_dad: raw.enable_dad,
            ipam_type,
            mac: requested_mac(conf, env)?,
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            log_file: raw.log_file,
            ferryd_ready_file: raw.ferryd_ready_file,
        })
    }
}

/// CNI_ARGS keys ferry (and its IPAM) understand; others are an error unless
/// the runtime says `IgnoreUnknown=1`, as with the reference plugins.
fn check_cni_args(env: &CniEnv) -> CniResult<()> {
    let ignore = matches!(env.arg("IgnoreUnknown"), Some("1" | "true" | "True"));
    match env
        .args
        .iter()
        .find(|(k, _)| !matches!(k.as_str(), "IgnoreUnknown" | "IP" | "MAC"))
    {
        Some((k, _)) if !ignore => Err(CniError::new(
            Code::UnsupportedField,
            format!("unknown CNI_ARGS key {k:?} (set IgnoreUnknown=1 to ignore)"),
        )),
        _ => Ok(()),
    }
}

/// runtimeConfig `mac`, then `args.cni.mac`, then CNI_ARGS `MAC=`.
fn requested_mac(conf: &NetConf, env: &CniEnv) -> CniResult<Option<[u8; 6]>> {
    let text = conf
        .runtime_config("mac")
        .or_else(|| conf.args_cni("mac"))
        .and_then(Value::as_str)
        .or_else(|| env.arg("MAC"));
    match text {
        None | Some("") => Ok(None),
        Some(t) => parse_mac(t)
            .map(Some)
            .ok_or_else(|| invalid_config(format!("invalid MAC address {t:?}"))),
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    // A unicast address only: multicast MACs break neighbour discovery.
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(args: &str) -> CniEnv {
        let vars: HashMap<String, String> = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", args),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        CniEnv::from_vars(&vars).unwrap()
    }

    fn parse(json: &str, args: &str) -> CniResult<BridgeConfig> {
        let conf = NetConf::parse(json.as_bytes()).unwrap();
        BridgeConfig::parse(&conf, &env(args))
    }

    #[test]
    fn defaults_match_the_reference_bridge() {
        let c = parse(r#"{"cniVersion":"1.0.0","name":"n","type":"ferry"}"#, "").unwrap();
        assert_eq!(c.bridge, "cni0");
        assert!(!c.is_gateway && !c.ip_masq && !c.hairpin_mode);
        assert_eq!(c.ipam_type, "");
        assert_eq!(c.mac, None);
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn default_gateway_implies_gateway_and_mac_sources_are_read() {
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"n","type":"ferry","isDefaultGateway":true,
               "runtimeConfig":{"mac":"0a:00:00:00:00:01"},"ipam":{"type":"host-local"}}"#,
            "",
        )
        .unwrap();
        assert!(c.is_gateway);
        assert_eq!(c.mac, Some([0x0a, 0, 0, 0, 0, 1]));
        assert_eq!(c.ipam_type, "host-local");
        let c = parse(
            r#"{"cniVersion":"1.0.0","name":"n","type":"ferry"}"#,
            "MAC=0a:00:00:00:00:02",
        )
        .unwrap();
        assert_eq!(c.mac, Some([0x0a, 0, 0, 0, 0, 2]));
    }

    #[test]
    fn bad_values_are_code_7_and_unsupported_keys_code_2() {
        let base = r#""cniVersion":"1.0.0","name":"n","type":"ferry""#;
        for (extra, code) in [
            (r#""bridge":"way-too-long-bridge-name""#, 7),
            (r#""bridge":"a/b""#, 7),
            (r#""mtu":10"#, 7),
            (r#""mtu":"big""#, 7),
            (r#""isGateway":"yes""#, 7),
            (r#""runtimeConfig":{"mac":"zz:00:00:00:00:01"}"#, 7),
            (r#""runtimeConfig":{"mac":"01:00:00:00:00:01"}"#, 7),
            (r#""ipam":{"type":"../evil"}"#, 7),
            (r#""vlan":100"#, 2),
            (r#""macspoofchk":true"#, 2),
            (r#""ipMasqBackend":"iptables""#, 2),
        ] {
            let got = parse(&format!("{{{base},{extra}}}"), "").unwrap_err();
            assert_eq!(got.code, code, "{extra}: {got}");
        }
        // "off" values of unsupported features are fine, unknown keys ignored.
        assert!(parse(
            &format!(r#"{{{base},"vlan":0,"macspoofchk":false,"whatever":1}}"#),
            ""
        )
        .is_ok());
    }

    #[test]
    fn unknown_cni_args_need_ignore_unknown() {
        let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"ferry"}"#;
        assert_eq!(parse(conf, "K8S_POD_NAME=x").unwrap_err().code, 2);
        assert!(parse(conf, "IgnoreUnknown=1;K8S_POD_NAME=x").is_ok());
        assert!(parse(conf, "IP=10.0.0.2").is_ok());
    }

    #[test]
    fn mac_round_trip() {
        assert_eq!(
            format_mac(&parse_mac("0a:1b:2c:3d:4e:5f").unwrap()),
            "0a:1b:2c:3d:4e:5f"
        );
        assert!(parse_mac("0a:1b:2c:3d:4e").is_none());
        assert!(parse_mac("0a:1b:2c:3d:4e:5f:00").is_none());
    }
}
