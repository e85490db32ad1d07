//! A small synchronous rtnetlink client: one socket, request/ack and dumps.
//!
//! The plugin runs once per pod, so it avoids an async runtime: a blocking
//! socket opened in the namespace it should act on (see `netns`) is all it
//! needs, and it starts in microseconds (netavark made the same move).

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoBridge, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkExtentMask, LinkFlags, LinkInfo,
    LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;

/// Route protocol id that marks routes ferry made, so ferry can find and
/// prune its own (DESIGN.md). Unassigned in /etc/iproute2/rt_protos.
pub const RTPROT_FERRY: u8 = 0xfe;

#[derive(Debug, thiserror::Error)]
pub enum NlError {
    #[error("{op}: {errno}")]
    Kernel { op: &'static str, errno: Errno },
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("netlink decode: {0}")]
    Decode(String),
}

impl NlError {
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NlError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    pub fn is(&self, e: Errno) -> bool {
        self.errno() == Some(e)
    }
}

pub type NlResult<T> = Result<T, NlError>;

/// A link as ferry needs to see it.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
    pub kind: Option<InfoKind>,
    pub controller: Option<u32>,
    /// A bridge's own bridge-netfilter switches (nf_call_iptables,
    /// nf_call_ip6tables); `None` when the kernel reports neither (not a
    /// bridge, or a kernel built without bridge netfilter).
    pub bridge_nf_call: Option<(bool, bool)>,
}

pub struct Netlink {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Open a socket in the calling thread's current network namespace; it
    /// stays bound to that namespace wherever the thread goes afterwards.
    pub fn open() -> NlResult<Netlink> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Errors need not echo our request back; dumps honour the filters
        // in the request (one link's addresses, not the whole namespace's).
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_netlink_get_strict_chk(true);
        Ok(Netlink {
            sock,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> NlResult<u32> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.sock.send(&bytes, 0)?;
        Ok(self.seq)
    }

    /// Receive until `seq` is answered; hands each inner message to `each`.
    /// Returns whether the dump was interrupted (NLM_F_DUMP_INTR).
    fn receive(
        &mut self,
        op: &'static str,
        seq: u32,
        mut each: impl FnMut(RouteNetlinkMessage),
    ) -> NlResult<bool> {
        let mut interrupted = false;
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..n])
                    .map_err(|e| NlError::Decode(e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(NlError::Decode("zero-length message".into()));
                }
                offset += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue; // a late answer to an earlier request
                }
                interrupted |= msg.header.flags & NLM_F_DUMP_INTR != 0;
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(interrupted),
                            Some(code) => Err(NlError::Kernel {
                                op,
                                errno: Errno::from_raw(-code.get()),
                            }),
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(interrupted),
                    NetlinkPayload::InnerMessage(inner) => each(inner),
                    _ => {}
                }
            }
        }
    }

    /// Send a change and wait for the kernel's ack.
    pub fn request(
        &mut self,
        op: &'static str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> NlResult<()> {
        let seq = self.send(msg, flags | NLM_F_ACK)?;
        self.receive(op, seq, |_| {}).map(|_| ())
    }

    /// Dump, retrying when the kernel says the dump was interrupted by a change.
    pub fn dump(
        &mut self,
        op: &'static str,
        msg: RouteNetlinkMessage,
    ) -> NlResult<Vec<RouteNetlinkMessage>> {
        for _ in 0..10 {
            let seq = self.send(msg.clone(), NLM_F_DUMP)?;
            let mut out = Vec::new();
            if !self.receive(op, seq, |m| out.push(m))? {
                return Ok(out);
            }
        }
        Err(NlError::Kernel {
            op,
            errno: Errno::EINTR,
        })
    }

    /// Look a link up by name; `None` when it does not exist.
    pub fn link_by_name(&mut self, name: &str) -> NlResult<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        // Statistics are most of the answer and nobody here reads them.
        msg.attributes
            .push(LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats]));
        let seq = self.send(RouteNetlinkMessage::GetLink(msg), NLM_F_ACK)?;
        let mut found = None;
        match self.receive("get link", seq, |m| {
            if let RouteNetlinkMessage::NewLink(l) = m {
                found = Some(link_from(&l));
            }
        }) {
            Ok(_) => Ok(found),
            Err(e) if e.is(Errno::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Create a bridge. EEXIST is left to the caller: many ADDs race for it.
    pub fn create_bridge(&mut self, name: &str, mtu: Option<u32>, mac: [u8; 6]) -> NlResult<()> {
        let mut msg = LinkMessage::default();
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            // Without ForwardDelay 0 the bridge waits for STP-less
            // forwarding delay before new ports forward; the reference sets
            // it the same way. NfCall*: see `set_bridge_nf_call`.
            LinkInfo::Data(InfoData::Bridge(vec![
                InfoBridge::ForwardDelay(0),
                InfoBridge::NfCallIpTables(true),
                InfoBridge::NfCallIp6Tables(true),
            ])),
        ]));
        self.request(
            "create bridge",
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Turn on a bridge's own bridge-netfilter switches, so that frames it
    /// forwards between its ports pass the IP hooks: a Service reply from a
    /// pod to a client on the same bridge is un-DNATed only then, whatever
    /// the namespace's net.bridge.bridge-nf-call-* sysctls say (off, or
    /// absent, on many hosts). Bridge attributes change through NEWLINK on
    /// the existing link (SETLINK ignores IFLA_LINKINFO).
    pub fn set_bridge_nf_call(&mut self, index: u32) -> NlResult<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Bridge),
            LinkInfo::Data(InfoData::Bridge(vec![
                InfoBridge::NfCallIpTables(true),
                InfoBridge::NfCallIp6Tables(true),
            ])),
        ]));
        self.request(
            "set bridge nf_call_iptables",
            RouteNetlinkMessage::NewLink(msg),
            0,
        )
    }

    /// Create a veth pair in one message: the host end `host` enslaved to
    /// `controller` and up, the peer `peer` born inside the namespace `peer_ns`.
    pub fn create_veth(&mut self, pair: &VethPair) -> NlResult<()> {
        let mut peer = LinkMessage::default();
        peer.attributes
            .push(LinkAttribute::IfName(pair.peer.to_string()));
        peer.attributes
            .push(LinkAttribute::Address(pair.peer_mac.to_vec()));
        peer.attributes.push(LinkAttribute::NetNsFd(pair.peer_ns));
        let mut msg = LinkMessage::default();
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes
            .push(LinkAttribute::IfName(pair.host.to_string()));
        msg.attributes
            .push(LinkAttribute::Address(pair.host_mac.to_vec()));
        msg.attributes
            .push(LinkAttribute::Controller(pair.controller));
        if let Some(mtu) = pair.mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
            peer.attributes.push(LinkAttribute::Mtu(mtu));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.request(
            "create veth",
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Change a link's flags (up, promiscuous) and optionally its attributes.
    pub fn set_link(
        &mut self,
        index: u32,
        flags: LinkFlags,
        mask: LinkFlags,
        attributes: Vec<LinkAttribute>,
    ) -> NlResult<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = flags;
        msg.header.change_mask = mask;
        msg.attributes = attributes;
        self.request("set link", RouteNetlinkMessage::SetLink(msg), 0)
    }

    pub fn del_link_by_name(&mut self, name: &str) -> NlResult<()> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.request("delete link", RouteNetlinkMessage::DelLink(msg), 0)
    }

    /// Addresses of a link (all links when `index` is 0).
    pub fn addresses(&mut self, index: u32) -> NlResult<Vec<IpNetwork>> {
        let mut q = AddressMessage::default();
        q.header.index = index;
        let msgs = self.dump("list addresses", RouteNetlinkMessage::GetAddress(q))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) if index == 0 || a.header.index == index => {
                    address_of(&a)
                }
                _ => None,
            })
            .collect())
    }

    /// Add an address; `nodad` skips IPv6 duplicate address detection, which
    /// would otherwise keep a fresh pod address unusable for a second or two.
    pub fn add_address(&mut self, index: u32, addr: IpNetwork, nodad: bool) -> NlResult<()> {
        let mut msg = address_message(index, addr);
        if let IpAddr::V4(v4) = addr.ip() {
            if let IpNetwork::V4(net) = addr {
                if net.prefix() < 31 {
                    msg.attributes
                        .push(AddressAttribute::Broadcast(net.broadcast()));
                }
            }
            msg.attributes.push(AddressAttribute::Local(IpAddr::V4(v4)));
        }
        if nodad && addr.is_ipv6() {
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.request(
            "add address",
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    pub fn del_address(&mut self, index: u32, addr: IpNetwork) -> NlResult<()> {
        let msg = address_message(index, addr);
        self.request("delete address", RouteNetlinkMessage::DelAddress(msg), 0)
    }

    /// Add (or replace) a route in the main table, marked with RTPROT_FERRY.
    pub fn add_route(&mut self, route: &RouteSpec) -> NlResult<()> {
        let msg = route_message(route);
        self.request(
            "add route",
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
    }

    /// Routes of the main table in one family.
    pub fn routes(&mut self, family: AddressFamily) -> NlResult<Vec<RouteSpec>> {
        let mut q = RouteMessage::default();
        q.header.address_family = family;
        let msgs = self.dump("list routes", RouteNetlinkMessage::GetRoute(q))?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => route_spec_of(&r),
                _ => None,
            })
            .collect())
    }
}

pub struct VethPair<'a> {
    pub host: &'a str,
    pub host_mac: [u8; 6],
    pub controller: u32,
    pub peer: &'a str,
    pub peer_mac: [u8; 6],
    pub peer_ns: std::os::fd::RawFd,
    pub mtu: Option<u32>,
}

/// A main-table unicast route as ferry writes and compares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
    pub mtu: Option<u32>,
    pub priority: Option<u32>,
}

fn link_from(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
        up: l.header.flags.contains(LinkFlags::Up),
        kind: None,
        controller: None,
        bridge_nf_call: None,
    };
    for attr in &l.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(m) => link.mac = m.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            LinkAttribute::Controller(c) => link.controller = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(k.clone()),
                        LinkInfo::Data(InfoData::Bridge(data)) => {
                            for d in data {
                                let nf = &mut link.bridge_nf_call;
                                match d {
                                    InfoBridge::NfCallIpTables(on) => {
                                        nf.get_or_insert((false, false)).0 = *on
                                    }
                                    InfoBridge::NfCallIp6Tables(on) => {
                                        nf.get_or_insert((false, false)).1 = *on
                                    }
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn family_of(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn address_message(index: u32, addr: IpNetwork) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = family_of(addr.ip());
    msg.header.prefix_len = addr.prefix();
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Address(addr.ip()));
    msg
}

fn address_of(a: &AddressMessage) -> Option<IpNetwork> {
    // IFA_LOCAL is the interface's own address on point-to-point links;
    // IFA_ADDRESS is it everywhere else.
    let ip = a
        .attributes
        .iter()
        .find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .or_else(|| {
            a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        })?;
    IpNetwork::new(ip, a.header.prefix_len).ok()
}

fn route_message(r: &RouteSpec) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family_of(r.dst.ip());
    msg.header.destination_prefix_length = r.dst.prefix();
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Other(RTPROT_FERRY);
    msg.header.kind = RouteType::Unicast;
    msg.header.scope = if r.gw.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    if r.dst.prefix() > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(
                r.dst.network(),
            )));
    }
    if let Some(gw) = r.gw {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
    }
    if let Some(oif) = r.oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(p) = r.priority {
        msg.attributes.push(RouteAttribute::Priority(p));
    }
    if let Some(mtu) = r.mtu {
        msg.attributes.push(RouteAttribute::Metrics(vec![
            netlink_packet_route::route::RouteMetric::Mtu(mtu),
        ]));
    }
    msg
}

fn route_spec_of(r: &RouteMessage) -> Option<RouteSpec> {
    if r.header.table != RouteHeader::RT_TABLE_MAIN || r.header.kind != RouteType::Unicast {
        return None;
    }
    let ip = |a: &RouteAddress| match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    };
    let mut spec = RouteSpec {
        dst: match r.header.address_family {
            AddressFamily::Inet6 => "::/0".parse().ok()?,
            _ => "0.0.0.0/0".parse().ok()?,
        },
        gw: None,
        oif: None,
        mtu: None,
        priority: None,
    };
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Destination(a) => {
                spec.dst = IpNetwork::new(ip(a)?, r.header.destination_prefix_length).ok()?
            }
            RouteAttribute::Gateway(a) => spec.gw = ip(a),
            RouteAttribute::Oif(o) => spec.oif = Some(*o),
            RouteAttribute::Priority(p) => spec.priority = Some(*p),
            _ => {}
        }
    }
    Some(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_message_round_trips_to_spec() {
        let spec = RouteSpec {
            dst: "10.2.0.0/16".parse().unwrap(),
            gw: Some("10.1.0.1".parse().unwrap()),
            oif: Some(3),
            mtu: None,
            priority: Some(5),
        };
        let msg = route_message(&spec);
        assert_eq!(msg.header.protocol, RouteProtocol::Other(RTPROT_FERRY));
        assert_eq!(route_spec_of(&msg), Some(spec));
    }

    #[test]
    fn default_route_has_no_destination_attribute() {
        let spec = RouteSpec {
            dst: "::/0".parse().unwrap(),
            gw: Some("fd00::1".parse().unwrap()),
            oif: None,
            mtu: None,
            priority: None,
        };
        let msg = route_message(&spec);
        assert!(!msg
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Destination(_))));
        assert_eq!(route_spec_of(&msg).unwrap().dst, spec.dst);
    }
}
