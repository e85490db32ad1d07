//! Kernel work for one pod: the node bridge, the veth pair, addresses and
//! routes. `plan` is pure; the rest are thin netlink edges.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use netlink_packet_core::NLM_F_ACK;
use netlink_packet_route::link::{
    InfoBridgePort, InfoKind, InfoPortData, InfoPortKind, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::RouteNetlinkMessage;
use nix::errno::Errno;

use crate::bridge_config::BridgeConfig;
use crate::cni::{CniError, CniOutput, CniResult, Code, IpConfig, Route};
use crate::netlink::{Link, Netlink, NlError, RouteSpec, VethPair};
use crate::netns::Netns;

pub fn kernel_error(what: &str, e: NlError) -> CniError {
    CniError::new(Code::Kernel, what.to_string()).with_details(e)
}

/// What the pod and the bridge get, derived from the IPAM result.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Gateway addresses (with the pod subnet's prefix) for the bridge.
    pub bridge_addrs: Vec<IpNetwork>,
    /// Pod addresses, gateways filled in when the bridge is the gateway.
    pub ips: Vec<IpConfig>,
    /// Routes for the pod: the IPAM's, plus a default route when asked.
    pub routes: Vec<Route>,
}

/// First host address of a subnet: the reference bridge's gateway default.
fn first_host(net: IpNetwork) -> Option<IpAddr> {
    match net {
        IpNetwork::V4(n) => n.nth(1).map(IpAddr::V4),
        IpNetwork::V6(n) => {
            let base = u128::from(n.network());
            Some(IpAddr::V6((base + 1).into()))
        }
    }
}

pub fn plan(bc: &BridgeConfig, ipam: &CniOutput) -> CniResult<Plan> {
    let mut ips = ipam.ips.clone();
    let mut routes = ipam.routes.clone();
    let mut bridge_addrs = Vec::new();
    for ip in &mut ips {
        ip.interface = Some(2);
        if !bc.is_gateway {
            continue;
        }
        let subnet = IpNetwork::new(ip.address.network(), ip.address.prefix())
            .expect("prefix taken from a valid network");
        let gw = match ip.gateway.or_else(|| first_host(subnet)) {
            Some(gw) if gw != ip.address.ip() => gw,
            _ => {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    format!("no usable gateway for {}", ip.address),
                ))
            }
        };
        ip.gateway = Some(gw);
        let addr = IpNetwork::new(gw, ip.address.prefix()).expect("same prefix");
        if !bridge_addrs.contains(&addr) {
            bridge_addrs.push(addr);
        }
        if bc.is_default_gateway {
            let default: IpNetwork = if gw.is_ipv4() {
                "0.0.0.0/0".parse().unwrap()
            } else {
                "::/0".parse().unwrap()
            };
            if !routes.iter().any(|r| r.dst == default) {
                routes.push(Route::new(default, Some(gw)));
            }
        }
    }
    Ok(Plan {
        bridge_addrs,
        ips,
        routes,
    })
}

/// The kernel form of a result route: without a gateway it takes the pod's
/// gateway of the same family, as the reference `ipam.ConfigureIface` does.
pub fn route_spec(route: &Route, ips: &[IpConfig], oif: u32) -> RouteSpec {
    let gw = route.gw.or_else(|| {
        ips.iter()
            .filter(|ip| ip.address.is_ipv4() == route.dst.is_ipv4())
            .find_map(|ip| ip.gateway)
    });
    RouteSpec {
        dst: route.dst,
        gw,
        oif: Some(oif),
        mtu: route.mtu,
        priority: route.priority,
    }
}

/// Random locally administered unicast MAC.
pub fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most mac.len() bytes into mac.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        // getrandom cannot fail for 6 bytes after boot; fall back to time.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            ^ u128::from(std::process::id());
        mac.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

/// Write a sysctl under /proc/sys/net of the current namespace. Missing
/// files (IPv6 disabled) are not an error: there is nothing to harden then.
pub fn set_sysctl(path: &str, value: &str) -> CniResult<()> {
    match crate::sysctl::set_net(path, value) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(CniError::new(Code::Io, format!("cannot set /proc/sys/net/{path}")).with_details(e))
        }
        _ => Ok(()),
    }
}

/// Find or create the bridge. Creation races with other ADDs: EEXIST means
/// another plugin won, which is fine.
pub fn ensure_bridge(nl: &mut Netlink, bc: &BridgeConfig) -> CniResult<Link> {
    let link = match nl
        .link_by_name(&bc.bridge)
        .map_err(|e| kernel_error("bridge lookup", e))?
    {
        Some(l) => l,
        None => {
            match nl.create_bridge(&bc.bridge, bc.mtu, random_mac()) {
                Ok(()) => set_sysctl(&format!("ipv6/conf/{}/accept_ra", bc.bridge), "0")?,
                Err(e) if e.is(Errno::EEXIST) => {}
                Err(e) => {
                    return Err(kernel_error(
                        &format!("cannot create bridge {}", bc.bridge),
                        e,
                    ))
                }
            }
            nl.link_by_name(&bc.bridge)
                .map_err(|e| kernel_error("bridge lookup", e))?
                .ok_or_else(|| {
                    CniError::new(Code::TryAgainLater, "bridge vanished while creating it")
                })?
        }
    };
    if link.kind != Some(InfoKind::Bridge) {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!("{} exists and is not a bridge", bc.bridge),
        ));
    }
    // Read from the lookup above: no extra round trip once they are on (a
    // bridge ferry created has them from birth). `None`: this kernel has no
    // bridge netfilter, nothing to switch on.
    if matches!(link.bridge_nf_call, Some(nf) if nf != (true, true)) {
        nl.set_bridge_nf_call(link.index)
            .map_err(|e| kernel_error("cannot enable bridge netfilter on the bridge", e))?;
    }
    let mut want = LinkFlags::Up;
    if bc.promisc_mode {
        want |= LinkFlags::Promisc;
    }
    if !link.up || bc.promisc_mode {
        nl.set_link(link.index, want, want, vec![])
            .map_err(|e| kernel_error("cannot bring the bridge up", e))?;
    }
    Ok(link)
}

/// Put the gateway addresses on the bridge. An address of another pod subnet
/// overlapping ours is a conflict unless `forceAddress`, which replaces it.
pub fn ensure_bridge_addrs(
    nl: &mut Netlink,
    bridge: &Link,
    want: &[IpNetwork],
    force: bool,
) -> CniResult<()> {
    if want.is_empty() {
        return Ok(());
    }
    let have = nl
        .addresses(bridge.index)
        .map_err(|e| kernel_error("cannot list bridge addresses", e))?;
    for addr in want {
        if have.contains(addr) {
            continue;
        }
        let clash = have.iter().find(|h| {
            h.is_ipv4() == addr.is_ipv4()
                && !is_link_local(h.ip())
                && (h.contains(addr.ip()) || addr.contains(h.ip()))
        });
        if let Some(old) = clash {
            if !force {
                return Err(CniError::new(
                    Code::InvalidConfig,
                    format!(
                        "bridge {} already has address {old}, different from {addr} (set forceAddress to replace it)",
                        bridge.name
                    ),
                ));
            }
            nl.del_address(bridge.index, *old)
                .map_err(|e| kernel_error("cannot remove the old bridge address", e))?;
        }
        match nl.add_address(bridge.index, *addr, true) {
            Ok(()) => {}
            Err(e) if e.is(Errno::EEXIST) => {}
            Err(e) => return Err(kernel_error("cannot add the gateway address", e)),
        }
    }
    Ok(())
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Hairpin lets a pod reach itself through a Service address.
pub fn set_hairpin(nl: &mut Netlink, index: u32) -> CniResult<()> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::PortKind(InfoPortKind::Bridge),
        LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
            true,
        )])),
    ]));
    nl.request("hairpin", RouteNetlinkMessage::NewLink(msg), NLM_F_ACK)
        .map_err(|e| kernel_error("cannot set hairpin mode", e))
}

/// Create the pair with the host end on the bridge and the pod end in the
/// pod's namespace; EEXIST means the pod already has `ifname` (or the
/// attachment already exists), which ADD must not paper over.
pub fn create_veth(nl: &mut Netlink, pair: &VethPair) -> CniResult<()> {
    nl.create_veth(pair).map_err(|e| {
        if e.is(Errno::EEXIST) {
            CniError::new(
                Code::InvalidConfig,
                format!(
                    "interface {} already exists in the container or {} on the host",
                    pair.peer, pair.host
                ),
            )
        } else {
            kernel_error("cannot create the veth pair", e)
        }
    })
}

/// Inside the pod: addresses (no DAD unless asked), link up, routes.
/// Returns the pod interface as the kernel sees it.
pub fn configure_pod(ns: &Netns, ifname: &str, plan: &Plan, enable_dad: bool) -> CniResult<Link> {
    let mut nl = ns
        .run(Netlink::open)?
        .map_err(|e| kernel_error("netlink in pod", e))?;
    let link = nl
        .link_by_name(ifname)
        .map_err(|e| kernel_error("pod link lookup", e))?
        .ok_or_else(|| CniError::new(Code::Kernel, format!("{ifname} vanished from the pod")))?;
    for ip in &plan.ips {
        nl.add_address(link.index, ip.address, !enable_dad)
            .map_err(|e| kernel_error(&format!("cannot add {} in the pod", ip.address), e))?;
    }
    nl.set_link(link.index, LinkFlags::Up, LinkFlags::Up, vec![])
        .map_err(|e| kernel_error("cannot bring the pod interface up", e))?;
    for route in &plan.routes {
        nl.add_route(&route_spec(route, &plan.ips, link.index))
            .map_err(|e| {
                kernel_error(&format!("cannot add route to {} in the pod", route.dst), e)
            })?;
    }
    Ok(link)
}

/// Delete a host veth by name; already gone is success (DEL is idempotent).
pub fn delete_link(nl: &mut Netlink, name: &str) -> CniResult<()> {
    match nl.del_link_by_name(name) {
        Ok(()) => Ok(()),
        Err(e) if e.is(Errno::ENODEV) || e.is(Errno::ENOENT) => Ok(()),
        Err(e) => Err(kernel_error(&format!("cannot delete {name}"), e)),
    }
}

/// Delete a link and return as soon as it is gone from the namespace.
///
/// The kernel unlists a deleted device within microseconds but then, still
/// inside the deleting task's syscall, waits for an RCU barrier before it
/// frees it: 10-40 ms here, most of a DEL. A forked child issues the delete
/// and pays that wait; we poll until the name is gone (or the child reports
/// an error) and return. The child holds no stdio, so a runtime reading our
/// stdout to EOF does not wait for it.
pub fn delete_link_detached(nl: &mut Netlink, name: &str) -> CniResult<()> {
    use nix::unistd::{fork, pipe2, ForkResult};
    use std::io::Read;
    use std::os::fd::AsRawFd;

    if nl
        .link_by_name(name)
        .map_err(|e| kernel_error("link lookup", e))?
        .is_none()
    {
        return Ok(());
    }
    let (read_end, write_end) = pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| CniError::new(Code::Io, "pipe").with_details(e))?;
    // SAFETY: the plugin is single-threaded, so the child may allocate and
    // make syscalls; it leaves with _exit and never returns into our code.
    match unsafe { fork() } {
        Err(_) => delete_link(nl, name),
        Ok(ForkResult::Child) => {
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null");
            if let Ok(null) = &null {
                for fd in 0..=2 {
                    // SAFETY: dup2 onto the standard descriptors only.
                    unsafe { libc::dup2(null.as_raw_fd(), fd) };
                }
            }
            let errno = match Netlink::open().and_then(|mut own| own.del_link_by_name(name)) {
                Ok(()) => 0,
                Err(e) => e.errno().map_or(libc::EIO, |e| e as i32),
            };
            let _ = nix::unistd::write(&write_end, &errno.to_le_bytes());
            // SAFETY: terminate the child without running the parent's exit path.
            unsafe { libc::_exit(0) }
        }
        Ok(ForkResult::Parent { .. }) => {
            drop(write_end);
            let mut report = std::fs::File::from(read_end);
            nix::fcntl::fcntl(
                &report,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .map_err(|e| CniError::new(Code::Io, "pipe").with_details(e))?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let mut buf = [0u8; 4];
                match report.read(&mut buf) {
                    Ok(4) => {
                        return match Errno::from_raw(i32::from_le_bytes(buf)) {
                            Errno::UnknownErrno | Errno::ENODEV | Errno::ENOENT => Ok(()),
                            errno => Err(kernel_error(
                                &format!("cannot delete {name}"),
                                NlError::Kernel {
                                    op: "delete link",
                                    errno,
                                },
                            )),
                        };
                    }
                    // The child died without a word: do it ourselves.
                    Ok(_) => return delete_link(nl, name),
                    Err(_) => {}
                }
                if nl
                    .link_by_name(name)
                    .map_err(|e| kernel_error("link lookup", e))?
                    .is_none()
                {
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    return Err(CniError::new(
                        Code::TryAgainLater,
                        format!("{name} is still being deleted"),
                    ));
                }
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn bc(gw: bool, default_gw: bool) -> BridgeConfig {
        BridgeConfig {
            bridge: "cni0".into(),
            is_gateway: gw || default_gw,
            is_default_gateway: default_gw,
            force_address: false,
            ip_masq: false,
            mtu: None,
            hairpin_mode: false,
            promisc_mode: false,
            enable_dad: false,
            ipam_type: "ferry-ipam".into(),
            mac: None,
            data_dir: PathBuf::from("/tmp"),
            log_file: None,
            ferryd_ready_file: None,
        }
    }

    fn ipam(addrs: &[(&str, Option<&str>)]) -> CniOutput {
        CniOutput {
            ips: addrs
                .iter()
                .map(|(a, g)| IpConfig {
                    address: a.parse().unwrap(),
                    gateway: g.map(|g| g.parse().unwrap()),
                    interface: None,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn default_gateway_fills_gateways_and_adds_default_routes() {
        let p = plan(
            &bc(false, true),
            &ipam(&[("10.1.0.5/24", None), ("fd00::5/64", Some("fd00::1"))]),
        )
        .unwrap();
        assert_eq!(
            p.bridge_addrs,
            vec![
                "10.1.0.1/24".parse().unwrap(),
                "fd00::1/64".parse().unwrap()
            ]
        );
        assert_eq!(p.ips[0].gateway, Some("10.1.0.1".parse().unwrap()));
        assert_eq!(p.ips[0].interface, Some(2));
        assert_eq!(p.routes.len(), 2);
        assert_eq!(p.routes[0].dst, "0.0.0.0/0".parse::<IpNetwork>().unwrap());
        assert_eq!(p.routes[1].gw, Some("fd00::1".parse().unwrap()));
    }

    #[test]
    fn no_gateway_means_nothing_on_the_bridge_and_gateway_equal_to_pod_ip_fails() {
        let p = plan(
            &bc(false, false),
            &ipam(&[("10.1.0.5/24", Some("10.1.0.1"))]),
        )
        .unwrap();
        assert!(p.bridge_addrs.is_empty() && p.routes.is_empty());
        assert!(plan(
            &bc(true, false),
            &ipam(&[("10.1.0.5/24", Some("10.1.0.5"))])
        )
        .is_err());
    }

    #[test]
    fn routes_without_gateway_use_the_pod_gateway_of_their_family() {
        let p = plan(&bc(true, false), &ipam(&[("10.1.0.5/24", None)])).unwrap();
        let r = route_spec(&Route::new("10.9.0.0/16".parse().unwrap(), None), &p.ips, 7);
        assert_eq!(r.gw, Some("10.1.0.1".parse().unwrap()));
        assert_eq!(r.oif, Some(7));
        let r6 = route_spec(&Route::new("fd09::/16".parse().unwrap(), None), &p.ips, 7);
        assert_eq!(r6.gw, None);
    }

    #[test]
    fn random_macs_are_local_unicast() {
        let m = random_mac();
        assert_eq!(m[0] & 0x03, 0x02);
    }
}
