//! The `ipam` section in host-local's format, parsed and validated. Pure: every
//! mistake is found here (code 7, naming the key) before anything touches disk.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnetwork::IpNetwork;
use serde_json::Value;

use crate::cni::config::typed;
use crate::cni::error::invalid_config;
use crate::cni::{CniResult, NetConf, Route};

/// host-local's default; leases live in `<dataDir>/<network name>/`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

/// One range after defaults are applied; `start..=end` is what may be handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// Host bits cleared.
    pub subnet: IpNetwork,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: IpAddr,
}

/// Ranges of one family that together yield one address per attachment.
pub type RangeSet = Vec<Range>;

#[derive(Debug, Clone, PartialEq)]
pub struct IpamConfig {
    /// In host-local's order: runtimeConfig.ipRanges, the legacy single range,
    /// then `ranges`. The index names `last_reserved_ip.<index>` on disk.
    pub ranges: Vec<RangeSet>,
    pub routes: Vec<Route>,
    pub data_dir: PathBuf,
    pub resolv_conf: Option<PathBuf>,
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}-{})", self.subnet, self.start, self.end)
    }
}

impl Range {
    /// May `ip` be handed out from this range (ignoring leases)?
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.start <= ip && ip <= self.end && ip.is_ipv4() == self.start.is_ipv4()
    }

    /// Never handed out even inside `start..=end`: the gateway, the network
    /// address and the IPv4 broadcast address.
    pub fn is_reserved(&self, ip: IpAddr) -> bool {
        ip == self.gateway
            || ip == self.subnet.network()
            || matches!(self.subnet, IpNetwork::V4(n) if IpAddr::V4(n.broadcast()) == ip)
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.start.is_ipv4() == other.start.is_ipv4()
            && self.start <= other.end
            && other.start <= self.end
    }
}

impl IpamConfig {
    pub fn from_netconf(conf: &NetConf) -> CniResult<IpamConfig> {
        parse(&conf.raw)
    }
}

/// Parse and validate the whole network config's IPAM part.
pub fn parse(raw: &Value) -> CniResult<IpamConfig> {
    let ipam = ipam_section(raw)?;

    // Each set with the config path of each of its ranges, for messages.
    let mut sets: Vec<(Vec<String>, RangeSet)> = Vec::new();
    if let Some(list) = raw.get("runtimeConfig").and_then(|r| r.get("ipRanges")) {
        sets.extend(parse_range_sets(list, "runtimeConfig.ipRanges")?);
    }
    if ipam.get("subnet").is_some() {
        sets.push((vec!["ipam".into()], vec![parse_range(ipam, "ipam")?]));
    } else if let Some(key) = ["rangeStart", "rangeEnd", "gateway"]
        .into_iter()
        .find(|k| ipam.get(*k).is_some())
    {
        return Err(invalid_config(format!(
            "ipam.{key} is given without ipam.subnet"
        )));
    }
    if let Some(list) = ipam.get("ranges") {
        sets.extend(parse_range_sets(list, "ipam.ranges")?);
    }
    if sets.is_empty() {
        return Err(invalid_config(
            "ipam has no address ranges: set ipam.subnet or ipam.ranges",
        ));
    }
    check_overlaps(&sets)?;

    let routes = match ipam.get("routes") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => typed(v, "ipam.routes")?,
    };
    let resolv_conf = opt_str(ipam, "resolvConf", "ipam")?.map(PathBuf::from);
    Ok(IpamConfig {
        ranges: sets.into_iter().map(|(_, set)| set).collect(),
        routes,
        data_dir: data_dir(raw)?,
        resolv_conf,
    })
}

/// `ipam.dataDir` alone, for DEL and GC: they must work even when a range in
/// the config became invalid, or a pod could never be deleted.
pub fn data_dir(raw: &Value) -> CniResult<PathBuf> {
    let dir = match raw.get("ipam") {
        Some(ipam) => opt_str(ipam, "dataDir", "ipam")?,
        None => None,
    };
    Ok(PathBuf::from(dir.unwrap_or(DEFAULT_DATA_DIR)))
}

fn ipam_section(raw: &Value) -> CniResult<&Value> {
    match raw.get("ipam") {
        Some(v @ Value::Object(_)) => Ok(v),
        None | Some(Value::Null) => Err(invalid_config("config has no \"ipam\" section")),
        Some(_) => Err(invalid_config("\"ipam\" must be an object")),
    }
}

fn parse_range_sets(list: &Value, path: &str) -> CniResult<Vec<(Vec<String>, RangeSet)>> {
    let Value::Array(sets) = list else {
        return Err(invalid_config(format!(
            "{path} must be a list of range sets"
        )));
    };
    sets.iter()
        .enumerate()
        .map(|(i, set)| {
            let path = format!("{path}[{i}]");
            let ranges = match set {
                Value::Array(r) if !r.is_empty() => r,
                Value::Array(_) => return Err(invalid_config(format!("{path} is empty"))),
                _ => return Err(invalid_config(format!("{path} must be a list of ranges"))),
            };
            let names: Vec<String> = (0..ranges.len()).map(|j| format!("{path}[{j}]")).collect();
            let ranges = ranges
                .iter()
                .zip(&names)
                .map(|(r, name)| parse_range(r, name))
                .collect::<CniResult<RangeSet>>()?;
            if ranges
                .iter()
                .any(|r| r.start.is_ipv4() != ranges[0].start.is_ipv4())
            {
                return Err(invalid_config(format!("{path} mixes IPv4 and IPv6 ranges")));
            }
            Ok((names, ranges))
        })
        .collect()
}

/// One range with host-local's defaults: start = network+1, end = last
/// address (IPv4: broadcast-1), gateway = network+1.
fn parse_range(v: &Value, path: &str) -> CniResult<Range> {
    if !v.is_object() {
        return Err(invalid_config(format!("{path} must be an object")));
    }
    let key = |k: &str| format!("{path}.{k}");
    let subnet_str = opt_str(v, "subnet", path)?
        .ok_or_else(|| invalid_config(format!("{} is missing", key("subnet"))))?;
    let subnet: IpNetwork = match subnet_str.contains('/').then(|| subnet_str.parse()) {
        Some(Ok(n)) => n,
        _ => {
            return Err(invalid_config(format!(
                "{} {subnet_str:?} is not a CIDR (address/prefix)",
                key("subnet")
            )))
        }
    };
    // Normalise 10.1.2.3/24 to 10.1.0.0/24; the prefix length always fits.
    let subnet = IpNetwork::new(subnet.network(), subnet.prefix()).expect("valid prefix");
    let max = if subnet.is_ipv4() { 32 } else { 128 };
    if subnet.prefix() > max - 2 {
        return Err(invalid_config(format!(
            "{} {subnet} is too small to allocate from",
            key("subnet")
        )));
    }
    let first = next_ip(subnet.network());
    let last = match subnet {
        IpNetwork::V4(n) => IpAddr::V4((u32::from(n.broadcast()) - 1).into()),
        IpNetwork::V6(n) => IpAddr::V6(n.broadcast()),
    };
    let ip_in_subnet = |k: &str| -> CniResult<Option<IpAddr>> {
        let Some(s) = opt_str(v, k, path)? else {
            return Ok(None);
        };
        let ip: IpAddr = s
            .parse()
            .map_err(|_| invalid_config(format!("{} {s:?} is not an IP address", key(k))))?;
        if !subnet.contains(ip) {
            return Err(invalid_config(format!(
                "{} {ip} is outside subnet {subnet}",
                key(k)
            )));
        }
        Ok(Some(ip))
    };
    let start = ip_in_subnet("rangeStart")?.unwrap_or(first);
    let end = ip_in_subnet("rangeEnd")?.unwrap_or(last);
    let gateway = ip_in_subnet("gateway")?.unwrap_or(first);
    if end < start {
        return Err(invalid_config(format!(
            "{} {end} is before rangeStart {start}",
            key("rangeEnd")
        )));
    }
    Ok(Range {
        subnet,
        start,
        end,
        gateway,
    })
}

/// No address may belong to two ranges, within a set or across sets.
fn check_overlaps(sets: &[(Vec<String>, RangeSet)]) -> CniResult<()> {
    let all: Vec<(&String, &Range)> = sets
        .iter()
        .flat_map(|(names, set)| names.iter().zip(set))
        .collect();
    for (i, (pa, a)) in all.iter().enumerate() {
        if let Some((pb, b)) = all[i + 1..].iter().find(|(_, b)| a.overlaps(b)) {
            return Err(invalid_config(format!(
                "range {pa} ({}-{}) overlaps {pb} ({}-{})",
                a.start, a.end, b.start, b.end
            )));
        }
    }
    Ok(())
}

fn opt_str<'a>(v: &'a Value, k: &str, path: &str) -> CniResult<Option<&'a str>> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid_config(format!("{path}.{k} must be a string"))),
    }
}

/// The address after `ip` (wrapping; callers stay inside a subnet).
pub fn next_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(a) => IpAddr::V4(u32::from(a).wrapping_add(1).into()),
        IpAddr::V6(a) => IpAddr::V6(u128::from(a).wrapping_add(1).into()),
    }
}

/// Addresses the runtime asks for, from (in host-local's order) CNI_ARGS
/// `IP=` (comma separated allowed), `args.cni.ips` and `runtimeConfig.ips`.
/// Each is "ip" or "ip/prefix"; the prefix is ignored (the range decides).
pub fn requested_ips(conf: &NetConf, cni_args_ip: Option<&str>) -> CniResult<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = Vec::new();
    let mut push = |s: &str, source: &str| -> CniResult<()> {
        let s = s.trim();
        let ip = match s.split_once('/') {
            Some(_) => s.parse::<IpNetwork>().map(|n| n.ip()).ok(),
            None => s.parse::<IpAddr>().ok(),
        }
        .ok_or_else(|| invalid_config(format!("{source}: {s:?} is not an IP address")))?;
        if !out.contains(&ip) {
            out.push(ip);
        }
        Ok(())
    };
    for s in cni_args_ip.into_iter().flat_map(|v| v.split(',')) {
        if !s.trim().is_empty() {
            push(s, "CNI_ARGS IP")?;
        }
    }
    for (value, source) in [
        (conf.args_cni("ips"), "args.cni.ips"),
        (conf.runtime_config("ips"), "runtimeConfig.ips"),
    ] {
        match value {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) => {
                for item in list {
                    let s = item.as_str().ok_or_else(|| {
                        invalid_config(format!("{source} must be a list of strings"))
                    })?;
                    push(s, source)?;
                }
            }
            Some(_) => return Err(invalid_config(format!("{source} must be a list"))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn net(ipam: Value) -> Value {
        json!({"cniVersion": "1.1.0", "name": "n", "type": "ferry-ipam", "ipam": ipam})
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn legacy_v4_defaults() {
        let c = parse(&net(json!({"type": "ferry-ipam", "subnet": "10.9.0.0/24"}))).unwrap();
        assert_eq!(c.ranges.len(), 1);
        let r = &c.ranges[0][0];
        assert_eq!(r.subnet.to_string(), "10.9.0.0/24");
        assert_eq!(
            (r.start, r.end, r.gateway),
            (ip("10.9.0.1"), ip("10.9.0.254"), ip("10.9.0.1"))
        );
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert!(c.routes.is_empty() && c.resolv_conf.is_none());
    }

    #[test]
    fn v6_defaults_and_host_bits_are_cleared() {
        let c = parse(&net(json!({"ranges": [[{"subnet": "fd00:1::7/64"}]]}))).unwrap();
        let r = &c.ranges[0][0];
        assert_eq!(r.subnet.to_string(), "fd00:1::/64");
        assert_eq!(r.start, ip("fd00:1::1"));
        assert_eq!(r.end, ip("fd00:1::ffff:ffff:ffff:ffff"));
        assert_eq!(r.gateway, ip("fd00:1::1"));
        assert!(r.is_reserved(ip("fd00:1::")) && r.is_reserved(ip("fd00:1::1")));
        assert!(!r.is_reserved(ip("fd00:1::2")));
    }

    #[test]
    fn explicit_values_routes_and_order() {
        let raw = json!({
            "cniVersion": "1.1.0", "name": "n", "type": "t",
            "runtimeConfig": {"ipRanges": [[{"subnet": "10.3.0.0/16"}]]},
            "ipam": {
                "subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.20",
                "gateway": "10.1.0.254",
                "ranges": [[{"subnet": "fd00::/120"}], [{"subnet": "10.2.0.0/24"}, {"subnet": "10.2.1.0/24"}]],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.1.0.254"}],
                "dataDir": "/tmp/x", "resolvConf": "/etc/resolv.conf", "unknownKey": 1
            }
        });
        let c = parse(&raw).unwrap();
        let first: Vec<String> = c.ranges.iter().map(|s| s[0].subnet.to_string()).collect();
        assert_eq!(
            first,
            ["10.3.0.0/16", "10.1.0.0/24", "fd00::/120", "10.2.0.0/24"]
        );
        let r = &c.ranges[1][0];
        assert_eq!(
            (r.start, r.end, r.gateway),
            (ip("10.1.0.10"), ip("10.1.0.20"), ip("10.1.0.254"))
        );
        assert_eq!(c.ranges[2][0].end, ip("fd00::ff"));
        assert_eq!(c.ranges[3].len(), 2);
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.routes[1].gw, Some(ip("10.1.0.254")));
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.resolv_conf, Some(PathBuf::from("/etc/resolv.conf")));
    }

    #[test]
    fn every_bad_key_is_code_7_and_named() {
        let cases: Vec<(Value, &str)> = vec![
            (json!(null), "\"ipam\""),
            (json!({"type": "ferry-ipam"}), "no address ranges"),
            (json!({"subnet": "10.0.0.0"}), "ipam.subnet"),
            (json!({"subnet": "10.0.0.300/24"}), "ipam.subnet"),
            (json!({"subnet": 5}), "ipam.subnet"),
            (json!({"subnet": "10.0.0.0/31"}), "ipam.subnet"),
            (json!({"subnet": "fd00::/127"}), "ipam.subnet"),
            (
                json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.1.1"}),
                "ipam.rangeStart",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "rangeStart": "x"}),
                "ipam.rangeStart",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "rangeEnd": "fd00::1"}),
                "ipam.rangeEnd",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.9", "rangeEnd": "10.0.0.8"}),
                "ipam.rangeEnd",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "gateway": "10.0.1.1"}),
                "ipam.gateway",
            ),
            (json!({"gateway": "10.0.1.1"}), "ipam.gateway"),
            (json!({"ranges": {}}), "ipam.ranges"),
            (json!({"ranges": [[]]}), "ipam.ranges[0]"),
            (
                json!({"ranges": [[{"rangeStart": "10.0.0.1"}]]}),
                "ipam.ranges[0][0].subnet",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24"}, {"subnet": "fd00::/64"}]]}),
                "ipam.ranges[0] mixes",
            ),
            (
                json!({"ranges": [[{"subnet": "10.0.0.0/24"}, {"subnet": "10.0.0.0/25"}]]}),
                "overlaps",
            ),
            (
                json!({"subnet": "10.0.0.0/16", "ranges": [[{"subnet": "10.0.5.0/24"}]]}),
                "range ipam (10.0.0.1-10.0.255.254) overlaps ipam.ranges[0][0]",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "routes": [{"dst": "x"}]}),
                "ipam.routes",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "dataDir": 1}),
                "ipam.dataDir",
            ),
            (
                json!({"subnet": "10.0.0.0/24", "resolvConf": []}),
                "ipam.resolvConf",
            ),
        ];
        for (ipam, named) in cases {
            let e = parse(&net(ipam.clone())).unwrap_err();
            assert_eq!(e.code, 7, "{ipam}");
            let text = format!("{e}");
            assert!(
                text.contains(named),
                "{ipam}: {text:?} should name {named:?}"
            );
        }
    }

    #[test]
    fn ranges_in_one_subnet_may_sit_side_by_side() {
        let c = parse(&net(json!({"ranges": [[
            {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.2", "rangeEnd": "10.0.0.9"},
            {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.10", "rangeEnd": "10.0.0.20"}
        ]]})));
        assert!(c.is_ok());
    }

    #[test]
    fn requested_ips_from_all_sources() {
        let conf = NetConf::parse(
            net(json!({"subnet": "10.0.0.0/24"}))
                .as_object()
                .map(|o| {
                    let mut o = o.clone();
                    o.insert("args".into(), json!({"cni": {"ips": ["10.0.0.7/24"]}}));
                    o.insert(
                        "runtimeConfig".into(),
                        json!({"ips": ["fd00::5", "10.0.0.5"]}),
                    );
                    Value::Object(o).to_string()
                })
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
        let got = requested_ips(&conf, Some("10.0.0.5,10.0.0.6")).unwrap();
        let want: Vec<IpAddr> = ["10.0.0.5", "10.0.0.6", "10.0.0.7", "fd00::5"]
            .iter()
            .map(|s| ip(s))
            .collect();
        assert_eq!(got, want);
        assert_eq!(requested_ips(&conf, Some("nope")).unwrap_err().code, 7);
    }

    #[test]
    fn data_dir_alone_tolerates_broken_ranges() {
        let raw = net(json!({"subnet": "garbage", "dataDir": "/tmp/d"}));
        assert_eq!(data_dir(&raw).unwrap(), PathBuf::from("/tmp/d"));
        assert_eq!(
            data_dir(&json!({"name": "n"})).unwrap(),
            PathBuf::from(DEFAULT_DATA_DIR)
        );
    }
}
