//! Allocation decisions, pure: which address a range set hands out next. The
//! store supplies what is in use; nothing here touches disk.

use std::net::IpAddr;

use super::config::{next_ip, Range, RangeSet};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("no free address left")]
    Exhausted,
    #[error("requested address {0} is in use by another container")]
    InUse(IpAddr),
    #[error("requested address {0} is not in any configured range")]
    OutOfRange(IpAddr),
    #[error("requested address {0} is reserved (gateway, network or broadcast address)")]
    Reserved(IpAddr),
    #[error(
        "requested addresses {0} and {1} fall in the same range set; one address per range set"
    )]
    TwoInOneSet(IpAddr, IpAddr),
}

/// The range of `set` that may hand out `ip`.
pub fn range_for(set: &[Range], ip: IpAddr) -> Option<&Range> {
    set.iter().find(|r| r.contains(ip))
}

/// Give each requested address its range set (index-aligned with `sets`).
/// Checked before disk: each must lie in exactly one set (ranges never
/// overlap, config.rs made sure), at most one per set, none reserved.
pub fn assign_requested(
    sets: &[RangeSet],
    requested: &[IpAddr],
) -> Result<Vec<Option<IpAddr>>, AllocError> {
    let mut out = vec![None; sets.len()];
    for &ip in requested {
        let (i, r) = sets
            .iter()
            .enumerate()
            .find_map(|(i, set)| range_for(set, ip).map(|r| (i, r)))
            .ok_or(AllocError::OutOfRange(ip))?;
        if r.is_reserved(ip) {
            return Err(AllocError::Reserved(ip));
        }
        if let Some(other) = out[i] {
            return Err(AllocError::TwoInOneSet(other, ip));
        }
        out[i] = Some(ip);
    }
    Ok(out)
}

/// The address to hand out from `set`: the requested one if free, else
/// round-robin like host-local: start after `last_reserved` (when it lies in
/// the set; else at the first range's start), walk the ranges in order, wrap
/// around, and end with `last_reserved` itself. Reserved and in-use
/// addresses are skipped.
pub fn choose(
    set: &[Range],
    in_use: &dyn Fn(IpAddr) -> bool,
    last_reserved: Option<IpAddr>,
    requested: Option<IpAddr>,
) -> Result<IpAddr, AllocError> {
    if let Some(ip) = requested {
        let r = range_for(set, ip).ok_or(AllocError::OutOfRange(ip))?;
        return if r.is_reserved(ip) {
            Err(AllocError::Reserved(ip))
        } else if in_use(ip) {
            Err(AllocError::InUse(ip))
        } else {
            Ok(ip)
        };
    }
    candidates(set, last_reserved)
        .find(|&(r, ip)| !r.is_reserved(ip) && !in_use(ip))
        .map(|(_, ip)| ip)
        .ok_or(AllocError::Exhausted)
}

/// Every address of `set` exactly once, in round-robin order. Lazy: an IPv6
/// /64 is only walked as far as the first free address.
pub fn candidates(
    set: &[Range],
    last_reserved: Option<IpAddr>,
) -> impl Iterator<Item = (&Range, IpAddr)> + '_ {
    let step = move |(i, ip): (usize, IpAddr)| {
        if ip == set[i].end {
            let j = (i + 1) % set.len();
            (j, set[j].start)
        } else {
            (i, next_ip(ip))
        }
    };
    let first =
        match last_reserved.and_then(|l| set.iter().position(|r| r.contains(l)).map(|i| (i, l))) {
            Some(cursor) => step(cursor),
            None => (0, set[0].start),
        };
    std::iter::successors(Some(first), move |&c| Some(step(c)).filter(|&n| n != first))
        .map(move |(i, ip)| (&set[i], ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::config::parse;
    use serde_json::json;
    use std::collections::HashSet;

    fn sets(ipam: serde_json::Value) -> Vec<RangeSet> {
        parse(&json!({"name": "n", "ipam": ipam})).unwrap().ranges
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn free(_: IpAddr) -> bool {
        false
    }

    #[test]
    fn first_address_skips_the_gateway() {
        let s = &sets(json!({"subnet": "10.9.0.0/24"}))[0];
        assert_eq!(choose(s, &free, None, None), Ok(ip("10.9.0.2")));
        let s = &sets(json!({"subnet": "fd00::/64"}))[0];
        assert_eq!(choose(s, &free, None, None), Ok(ip("fd00::2")));
    }

    #[test]
    fn continues_after_last_reserved_and_wraps() {
        let s = &sets(json!({"subnet": "10.9.0.0/24"}))[0];
        assert_eq!(
            choose(s, &free, Some(ip("10.9.0.5")), None),
            Ok(ip("10.9.0.6"))
        );
        // .254 is the end: wrap to the start, .1 is the gateway.
        assert_eq!(
            choose(s, &free, Some(ip("10.9.0.254")), None),
            Ok(ip("10.9.0.2"))
        );
        // A last_reserved outside the set (config changed): start over.
        assert_eq!(
            choose(s, &free, Some(ip("10.8.0.5")), None),
            Ok(ip("10.9.0.2"))
        );
        let used: HashSet<IpAddr> = [ip("10.9.0.6"), ip("10.9.0.7")].into();
        let in_use = |a| used.contains(&a);
        assert_eq!(
            choose(s, &in_use, Some(ip("10.9.0.5")), None),
            Ok(ip("10.9.0.8"))
        );
    }

    #[test]
    fn walks_every_range_of_a_set_in_order_then_last_reserved_itself() {
        let s = &sets(json!({"ranges": [[
            {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.10", "rangeEnd": "10.0.0.11"},
            {"subnet": "10.0.1.0/24", "rangeStart": "10.0.1.1", "rangeEnd": "10.0.1.2"}
        ]]}))[0];
        let order: Vec<String> = candidates(s, Some(ip("10.0.0.10")))
            .map(|(_, a)| a.to_string())
            .collect();
        assert_eq!(order, ["10.0.0.11", "10.0.1.1", "10.0.1.2", "10.0.0.10"]);
        // 10.0.1.1 is that range's gateway.
        assert_eq!(
            choose(s, &free, Some(ip("10.0.0.11")), None),
            Ok(ip("10.0.1.2"))
        );
        // Everything else in use: the last reserved one comes back last.
        let in_use = |a| a != ip("10.0.0.10");
        assert_eq!(
            choose(s, &in_use, Some(ip("10.0.0.10")), None),
            Ok(ip("10.0.0.10"))
        );
    }

    #[test]
    fn network_and_broadcast_are_never_handed_out() {
        let s = &sets(json!({"subnet": "10.0.0.0/30", "rangeStart": "10.0.0.0",
                             "rangeEnd": "10.0.0.3", "gateway": "10.0.0.2"}))[0];
        assert_eq!(choose(s, &free, None, None), Ok(ip("10.0.0.1")));
        let in_use = |a| a == ip("10.0.0.1");
        assert_eq!(choose(s, &in_use, None, None), Err(AllocError::Exhausted));
    }

    #[test]
    fn exhaustion() {
        let s = &sets(json!({"subnet": "10.0.0.0/29"}))[0];
        let mut used = HashSet::new();
        for _ in 0..5 {
            let got = choose(s, &|a| used.contains(&a), None, None).unwrap();
            assert!(used.insert(got));
        }
        assert_eq!(
            choose(s, &|a| used.contains(&a), None, None),
            Err(AllocError::Exhausted)
        );
        assert_eq!(used.len(), 5, ".2-.6: not .0, .1 (gateway), .7");
    }

    #[test]
    fn requested_addresses() {
        let s = &sets(json!({"subnet": "10.9.0.0/24"}))[0];
        let busy = |a| a == ip("10.9.0.7");
        assert_eq!(
            choose(s, &busy, None, Some(ip("10.9.0.8"))),
            Ok(ip("10.9.0.8"))
        );
        assert_eq!(
            choose(s, &busy, None, Some(ip("10.9.0.7"))),
            Err(AllocError::InUse(ip("10.9.0.7")))
        );
        assert_eq!(
            choose(s, &busy, None, Some(ip("10.9.0.1"))),
            Err(AllocError::Reserved(ip("10.9.0.1")))
        );
        assert_eq!(
            choose(s, &busy, None, Some(ip("10.9.1.1"))),
            Err(AllocError::OutOfRange(ip("10.9.1.1")))
        );
    }

    #[test]
    fn assigns_requested_addresses_to_their_sets() {
        let all = sets(json!({"ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "fd00::/64"}]]}));
        assert_eq!(
            assign_requested(&all, &[ip("fd00::9"), ip("10.0.0.9")]),
            Ok(vec![Some(ip("10.0.0.9")), Some(ip("fd00::9"))])
        );
        assert_eq!(assign_requested(&all, &[]), Ok(vec![None, None]));
        assert_eq!(
            assign_requested(&all, &[ip("10.0.0.9"), ip("10.0.0.8")]),
            Err(AllocError::TwoInOneSet(ip("10.0.0.9"), ip("10.0.0.8")))
        );
        assert_eq!(
            assign_requested(&all, &[ip("10.1.0.9")]),
            Err(AllocError::OutOfRange(ip("10.1.0.9")))
        );
        assert_eq!(
            assign_requested(&all, &[ip("10.0.0.255")]),
            Err(AllocError::OutOfRange(ip("10.0.0.255"))),
            "the broadcast address is past rangeEnd"
        );
        assert_eq!(
            assign_requested(&all, &[ip("fd00::1")]),
            Err(AllocError::Reserved(ip("fd00::1")))
        );
    }
}
