//! What each node publishes, and subnet allocation as a pure function.
//!
//! Every store keeps one record per allocated subnet (flannel's layout): the
//! subnet is the key, so two nodes can never hold the same one, and
//! allocation is "create this key if it does not exist" — a compare-and-swap
//! in etcd, an exclusive create under a lock in the file store.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A MAC address, written as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Mac, String> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts.next().ok_or_else(|| format!("bad MAC {s:?}"))?;
            if p.len() != 2 {
                return Err(format!("bad MAC {s:?}"));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC {s:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("bad MAC {s:?}"));
        }
        Ok(Mac(mac))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Mac, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Mac {
    /// The VTEP MAC of a node: derived from its name and the VNI, so a
    /// restarted ferryd (or a recreated device) keeps the MAC its peers have
    /// in their FDB. Locally administered, unicast.
    pub fn for_vtep(node: &str, vni: u32) -> Mac {
        // FNV-1a, 64 bit.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in node.as_bytes().iter().chain(&vni.to_be_bytes()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        Mac([(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }
}

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub node: String,
    pub subnet: Ipv4Network,
    pub underlay_ip: Ipv4Addr,
    pub vtep_mac: Mac,
    /// Set by `ferryd leave`: peers drop the node at once, but the subnet
    /// stays reserved until the record's lease expires.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub left: bool,
}

/// The store key of a subnet: `10.244.3.0-24` (flannel's spelling).
pub fn subnet_key(subnet: Ipv4Network) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix())
}

pub fn parse_subnet_key(key: &str) -> Option<Ipv4Network> {
    let (ip, len) = key.rsplit_once('-')?;
    let net = Ipv4Network::new(ip.parse().ok()?, len.parse().ok()?).ok()?;
    (net.network() == net.ip()).then_some(net)
}

/// One existing subnet reservation as the allocator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub subnet: Ipv4Network,
    pub node: String,
    /// The lease ran out: the subnet may be taken over.
    pub expired: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocation {
    /// The node holds this subnet already (a restart): keep it.
    Keep(Ipv4Network),
    /// Reserve a subnet nobody holds, or whose lease expired.
    Take(Ipv4Network),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("no free /{len} subnet left in cluster CIDR {cluster}")]
    Exhausted { cluster: Ipv4Network, len: u8 },
    #[error("subnet length /{len} does not fit cluster CIDR {cluster} (must be {}..=30)", cluster.prefix())]
    BadLength { cluster: Ipv4Network, len: u8 },
}

/// All subnets of length `len` in `cluster`, lowest first.
pub fn subnets(
    cluster: Ipv4Network,
    len: u8,
) -> Result<impl Iterator<Item = Ipv4Network>, AllocError> {
    if len < cluster.prefix() || len > 30 {
        return Err(AllocError::BadLength { cluster, len });
    }
    let base = u32::from(cluster.network());
    let count = 1u64 << (len - cluster.prefix());
    let step = 1u64 << (32 - len);
    Ok((0..count).map(move |i| {
        Ipv4Network::new(Ipv4Addr::from(base + (i * step) as u32), len).expect("valid prefix")
    }))
}

/// Which subnet `node` should hold, given the reservations in the store.
///
/// A node keeps a subnet it holds (also an expired one nobody took over);
/// otherwise it takes `prefer` (the subnet its pods already use, read from
/// the node itself) when that is free, else the lowest subnet that is free
/// or whose lease expired. `skip` lists subnets a concurrent allocator just
/// won, to try the next one. Reservations outside the cluster CIDR or of
/// another size (a changed configuration) are ignored for keeping but still
/// block.
pub fn allocate(
    cluster: Ipv4Network,
    len: u8,
    node: &str,
    existing: &[Reservation],
    skip: &[Ipv4Network],
    prefer: Option<Ipv4Network>,
) -> Result<Allocation, AllocError> {
    let all = subnets(cluster, len)?;
    if let Some(own) = existing
        .iter()
        .filter(|r| r.node == node && r.subnet.prefix() == len && cluster.is_supernet_of(r.subnet))
        .min_by_key(|r| r.subnet)
    {
        return Ok(Allocation::Keep(own.subnet));
    }
    let blocked = |s: Ipv4Network| {
        skip.contains(&s)
            || existing
                .iter()
                .any(|r| !r.expired && (r.subnet.overlaps(s)))
    };
    prefer
        .filter(|p| p.prefix() == len && cluster.is_supernet_of(*p) && p.ip() == p.network())
        .into_iter()
        .chain(all)
        .find(|s| !blocked(*s))
        .map(Allocation::Take)
        .ok_or(AllocError::Exhausted { cluster, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn res(s: &str, node: &str, expired: bool) -> Reservation {
        Reservation {
            subnet: net(s),
            node: node.into(),
            expired,
        }
    }

    #[test]
    fn first_node_gets_lowest_subnet() {
        let a = allocate(net("10.244.0.0/16"), 24, "a", &[], &[], None).unwrap();
        assert_eq!(a, Allocation::Take(net("10.244.0.0/24")));
    }

    #[test]
    fn node_keeps_its_subnet() {
        let ex = [
            res("10.244.0.0/24", "a", false),
            res("10.244.1.0/24", "b", false),
        ];
        let a = allocate(net("10.244.0.0/16"), 24, "b", &ex, &[], None).unwrap();
        assert_eq!(a, Allocation::Keep(net("10.244.1.0/24")));
    }

    #[test]
    fn node_keeps_its_expired_subnet() {
        let ex = [res("10.244.5.0/24", "b", true)];
        let a = allocate(net("10.244.0.0/16"), 24, "b", &ex, &[], None).unwrap();
        assert_eq!(a, Allocation::Keep(net("10.244.5.0/24")));
    }

    #[test]
    fn held_subnets_are_skipped_expired_reused() {
        let ex = [
            res("10.244.0.0/24", "a", false),
            res("10.244.1.0/24", "b", true),
            res("10.244.2.0/24", "c", false),
        ];
        let a = allocate(net("10.244.0.0/16"), 24, "d", &ex, &[], None).unwrap();
        assert_eq!(a, Allocation::Take(net("10.244.1.0/24")));
        // A subnet left but not expired stays reserved.
        let ex = [res("10.244.0.0/24", "a", false)];
        let a = allocate(
            net("10.244.0.0/16"),
            24,
            "d",
            &ex,
            &[net("10.244.1.0/24")],
            None,
        )
        .unwrap();
        assert_eq!(a, Allocation::Take(net("10.244.2.0/24")));
    }

    #[test]
    fn preferred_subnet_is_taken_when_free() {
        let ex = [res("10.244.0.0/24", "a", false)];
        let p = Some(net("10.244.9.0/24"));
        let a = allocate(net("10.244.0.0/16"), 24, "b", &ex, &[], p).unwrap();
        assert_eq!(a, Allocation::Take(net("10.244.9.0/24")));
        // Held by someone else: the lowest free one instead.
        let a = allocate(
            net("10.244.0.0/16"),
            24,
            "b",
            &ex,
            &[],
            Some(net("10.244.0.0/24")),
        )
        .unwrap();
        assert_eq!(a, Allocation::Take(net("10.244.1.0/24")));
        // Wrong size or outside the cluster: ignored.
        let a = allocate(
            net("10.244.0.0/16"),
            24,
            "b",
            &ex,
            &[],
            Some(net("10.9.0.0/24")),
        )
        .unwrap();
        assert_eq!(a, Allocation::Take(net("10.244.1.0/24")));
        // Own reservation beats the preference.
        let ex = [res("10.244.4.0/24", "b", false)];
        let a = allocate(net("10.244.0.0/16"), 24, "b", &ex, &[], p).unwrap();
        assert_eq!(a, Allocation::Keep(net("10.244.4.0/24")));
    }

    #[test]
    fn exhaustion_and_bad_length() {
        let ex = [
            res("10.0.0.0/25", "a", false),
            res("10.0.0.128/25", "b", false),
        ];
        assert!(matches!(
            allocate(net("10.0.0.0/24"), 25, "c", &ex, &[], None),
            Err(AllocError::Exhausted { .. })
        ));
        assert!(matches!(
            allocate(net("10.0.0.0/24"), 23, "c", &[], &[], None),
            Err(AllocError::BadLength { .. })
        ));
        assert!(matches!(
            allocate(net("10.0.0.0/24"), 31, "c", &[], &[], None),
            Err(AllocError::BadLength { .. })
        ));
    }

    #[test]
    fn foreign_sized_reservation_blocks_overlap() {
        // A /23 from an older configuration covers two /24s.
        let ex = [res("10.244.0.0/23", "old", false)];
        let a = allocate(net("10.244.0.0/16"), 24, "n", &ex, &[], None).unwrap();
        assert_eq!(a, Allocation::Take(net("10.244.2.0/24")));
    }

    #[test]
    fn many_nodes_get_distinct_subnets() {
        let mut ex = Vec::new();
        for i in 0..50 {
            let name = format!("n{i}");
            match allocate(net("10.244.0.0/16"), 24, &name, &ex, &[], None).unwrap() {
                Allocation::Take(s) => ex.push(Reservation {
                    subnet: s,
                    node: name,
                    expired: false,
                }),
                k => panic!("{k:?}"),
            }
        }
        let mut s: Vec<_> = ex.iter().map(|r| r.subnet).collect();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 50);
    }

    #[test]
    fn keys_round_trip() {
        let n = net("10.244.3.0/24");
        assert_eq!(subnet_key(n), "10.244.3.0-24");
        assert_eq!(parse_subnet_key("10.244.3.0-24"), Some(n));
        assert_eq!(parse_subnet_key("10.244.3.1-24"), None);
        assert_eq!(parse_subnet_key("junk"), None);
    }

    #[test]
    fn vtep_mac_is_stable_unicast_local() {
        let a = Mac::for_vtep("node-a", 1);
        assert_eq!(a, Mac::for_vtep("node-a", 1));
        assert_ne!(a, Mac::for_vtep("node-b", 1));
        assert_ne!(a, Mac::for_vtep("node-a", 2));
        assert_eq!(a.0[0] & 0x03, 0x02);
        assert_eq!(a.to_string().parse::<Mac>().unwrap(), a);
    }

    #[test]
    fn record_json() {
        let r = NodeRecord {
            node: "a".into(),
            subnet: net("10.244.1.0/24"),
            underlay_ip: "192.168.1.2".parse().unwrap(),
            vtep_mac: Mac([2, 0, 0, 0, 0, 1]),
            left: false,
        };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(
            j,
            r#"{"node":"a","subnet":"10.244.1.0/24","underlayIp":"192.168.1.2","vtepMac":"02:00:00:00:00:01"}"#
        );
        assert_eq!(serde_json::from_str::<NodeRecord>(&j).unwrap(), r);
    }
}
