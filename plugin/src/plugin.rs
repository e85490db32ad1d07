//! The `ferry` CNI plugin's verbs. Each verb validates everything first,
//! then acts; ADD undoes what it did when a later step fails.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use netlink_packet_route::AddressFamily;

use crate::attachment::{self, Record, Store};
use crate::bridge_config::{format_mac, BridgeConfig};
use crate::cni::{
    Attachment, CniEnv, CniError, CniOutput, CniResult, Code, Command, Interface, NetConf,
};
use crate::netlink::{Netlink, VethPair};
use crate::netns::Netns;
use crate::{delegate, ipam, log, nft, pod};

pub const ABOUT: &str = concat!(
    "CNI ferry plugin v",
    env!("CARGO_PKG_VERSION"),
    " - bridge networking, drop-in for the reference bridge plugin; CNI spec 0.3.0-1.1.0"
);

/// Entry point for every verb but VERSION (answered by the skeleton).
pub fn run(env: &CniEnv, stdin: &[u8]) -> CniResult<Option<String>> {
    let conf = NetConf::parse(stdin)?;
    conf.version.allows(env.command)?;
    let bc = BridgeConfig::parse(&conf, env)?;
    log::init(bc.log_file.as_deref());
    let ctx = Ctx {
        env,
        conf: &conf,
        bc: &bc,
        stdin,
    };
    match env.command {
        Command::Add => ctx.add().map(Some),
        Command::Del => ctx.del().map(|_| None),
        Command::Check => ctx.check().map(|_| None),
        Command::Status => ctx.status().map(|_| None),
        Command::Gc => ctx.gc().map(|_| None),
        Command::Version => unreachable!("answered by cni::skel"),
    }
}

struct Ctx<'a> {
    env: &'a CniEnv,
    conf: &'a NetConf,
    bc: &'a BridgeConfig,
    stdin: &'a [u8],
}

/// What ADD has done so far, to be undone in reverse if a later step fails.
#[derive(Default)]
struct Done {
    ipam: bool,
    record: bool,
    veth: bool,
    masq: bool,
}

fn nft_error(what: &str, e: nft::NftError) -> CniError {
    CniError::new(Code::Kernel, what.to_string()).with_details(e)
}

fn netlink() -> CniResult<Netlink> {
    Netlink::open().map_err(|e| pod::kernel_error("cannot open netlink", e))
}

impl Ctx<'_> {
    fn key(&self) -> String {
        attachment::key(&self.conf.name, &self.env.container_id, &self.env.ifname)
    }

    fn host_veth(&self) -> String {
        attachment::host_veth_name(&self.conf.name, &self.env.container_id, &self.env.ifname)
    }

    fn store(&self) -> Store {
        Store::new(&self.bc.data_dir, &self.conf.name)
    }

    fn masq_entries<'k>(&'k self, key: &'k str, ips: &[IpNetwork]) -> Vec<nft::MasqEntry<'k>> {
        ips.iter()
            .map(|ip| nft::MasqEntry {
                network: &self.conf.name,
                key,
                ip: ip.ip(),
                subnet: IpNetwork::new(ip.network(), ip.prefix()).expect("valid prefix"),
            })
            .collect()
    }

    fn add(&self) -> CniResult<String> {
        let ns = Netns::open_for_container(&self.env.netns)?;
        let mut nl = netlink()?;
        let host_veth = self.host_veth();
        let store = self.store();
        if store
            .load(&self.env.container_id, &self.env.ifname)?
            .is_some()
            && nl
                .link_by_name(&host_veth)
                .map_err(|e| pod::kernel_error("host veth lookup", e))?
                .is_some()
        {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!(
                    "container {} already has {} on network {}: DEL it first",
                    self.env.container_id, self.env.ifname, self.conf.name
                ),
            ));
        }
        let mut done = Done::default();
        let result = self.wire(&ns, &mut nl, &store, &host_veth, &mut done);
        if result.is_err() {
            self.undo(&mut nl, &store, &host_veth, &done);
        }
        result.map(|r| r.to_json(self.conf.version))
    }

    fn wire(
        &self,
        ns: &Netns,
        nl: &mut Netlink,
        store: &Store,
        host_veth: &str,
        done: &mut Done,
    ) -> CniResult<CniOutput> {
        let ipam_out = self.ipam_add()?;
        done.ipam = true;
        let plan = pod::plan(self.bc, &ipam_out)?;
        let bridge = pod::ensure_bridge(nl, self.bc)?;
        pod::ensure_bridge_addrs(nl, &bridge, &plan.bridge_addrs, self.bc.force_address)?;
        if self.bc.is_gateway {
            enable_forwarding(&plan.bridge_addrs)?;
        }
        let pod_ips: Vec<IpNetwork> = plan.ips.iter().map(|ip| ip.address).collect();
        store.save(&Record {
            container_id: self.env.container_id.clone(),
            ifname: self.env.ifname.clone(),
            host_veth: host_veth.to_string(),
            ips: pod_ips.clone(),
            ip_masq: self.bc.ip_masq,
        })?;
        done.record = true;
        let host_mac = pod::random_mac();
        let pod_mac = self.bc.mac.unwrap_or_else(pod::random_mac);
        pod::create_veth(
            nl,
            &VethPair {
                host: host_veth,
                host_mac,
                controller: bridge.index,
                peer: &self.env.ifname,
                peer_mac: pod_mac,
                peer_ns: ns.raw_fd(),
                mtu: self.bc.mtu,
            },
        )?;
        done.veth = true;
        pod::set_sysctl(&format!("ipv6/conf/{host_veth}/accept_ra"), "0")?;
        if self.bc.hairpin_mode {
            let index = nl
                .link_by_name(host_veth)
                .map_err(|e| pod::kernel_error("host veth lookup", e))?
                .ok_or_else(|| CniError::new(Code::Kernel, "host veth vanished"))?
                .index;
            pod::set_hairpin(nl, index)?;
        }
        let pod_link = pod::configure_pod(ns, &self.env.ifname, &plan, self.bc.enable_dad)?;
        if self.bc.ip_masq && !pod_ips.is_empty() {
            let key = self.key();
            nft::add_masq(&self.masq_entries(&key, &pod_ips))
                .map_err(|e| nft_error("cannot set up masquerade", e))?;
            done.masq = true;
            nft::release_socket_in_background();
        }
        Ok(CniOutput {
            interfaces: vec![
                Interface {
                    name: bridge.name.clone(),
                    mac: format_mac(&bridge.mac),
                    ..Default::default()
                },
                Interface {
                    name: host_veth.to_string(),
                    mac: format_mac(&host_mac),
                    mtu: self.bc.mtu,
                    ..Default::default()
                },
                Interface {
                    name: self.env.ifname.clone(),
                    mac: format_mac(&pod_mac),
                    mtu: Some(pod_link.mtu),
                    sandbox: self.env.netns.clone(),
                    ..Default::default()
                },
            ],
            ips: plan.ips,
            routes: plan.routes,
            dns: ipam_out.dns,
        })
    }

    /// Best effort: the original error is what the runtime must see.
    fn undo(&self, nl: &mut Netlink, store: &Store, host_veth: &str, done: &Done) {
        let (id, ifname) = (&self.env.container_id, &self.env.ifname);
        if done.masq {
            let key = self.key();
            if let Err(e) = nft::del_masq_by_key(&key) {
                log::warn(format!("rollback: masquerade of {key}: {e}"));
            }
        }
        if done.veth {
            if let Err(e) = pod::delete_link(nl, host_veth) {
                log::warn(format!("rollback: {e}"));
            }
        }
        if done.record {
            if let Err(e) = store.remove(id, ifname) {
                log::warn(format!("rollback: {e}"));
            }
        }
        if done.ipam {
            if let Err(e) = self.ipam_del() {
                log::warn(format!("rollback: IPAM release for {id}/{ifname}: {e}"));
            }
        }
    }

    /// Remove every host-side artefact of an attachment. Everything here is
    /// keyed by the attachment, so a missing netns or lease changes nothing.
    fn teardown(&self, nl: &mut Netlink, container_id: &str, ifname: &str) -> CniResult<()> {
        let store = self.store();
        let record = store.load(container_id, ifname)?;
        let key = attachment::key(&self.conf.name, container_id, ifname);
        match &record {
            Some(rec) if rec.ip_masq => nft::del_masq(&self.masq_entries(&key, &rec.ips)),
            // No record (a crash before it was written, or data lost):
            // find our elements by key instead of by IP.
            None if self.bc.ip_masq => nft::del_masq_by_key(&key),
            _ => Ok(()),
        }
        .map_err(|e| nft_error("cannot remove masquerade", e))?;
        nft::release_socket_in_background();
        let host_veth = attachment::host_veth_name(&self.conf.name, container_id, ifname);
        pod::delete_link_detached(nl, &host_veth)
    }

    /// Nothing DEL cleans lives in the pod's namespace (the host veth takes
    /// its peer along), so CNI_NETNS is not even opened: it may be empty,
    /// gone, or no namespace at all.
    fn del(&self) -> CniResult<()> {
        let mut nl = netlink()?;
        self.teardown(&mut nl, &self.env.container_id, &self.env.ifname)?;
        self.ipam_del()?;
        self.store()
            .remove(&self.env.container_id, &self.env.ifname)
    }

    fn check(&self) -> CniResult<()> {
        let prev = self.conf.prev_result.as_ref().ok_or_else(|| {
            CniError::new(Code::InvalidConfig, "CHECK needs prevResult in the config")
        })?;
        let ns = Netns::open_for_container(&self.env.netns)?;
        self.ipam_check()?;
        let fail = |msg: String| Err(CniError::new(Code::CheckFailed, msg));
        let Some(idx) = prev
            .interfaces
            .iter()
            .position(|i| i.name == self.env.ifname && !i.sandbox.is_empty())
        else {
            return fail(format!(
                "prevResult has no interface {} in a sandbox",
                self.env.ifname
            ));
        };
        let want = &prev.interfaces[idx];
        let mut nl = netlink()?;
        let bridge = nl
            .link_by_name(&self.bc.bridge)
            .map_err(|e| pod::kernel_error("bridge lookup", e))?;
        let host = nl
            .link_by_name(&self.host_veth())
            .map_err(|e| pod::kernel_error("host veth lookup", e))?;
        match (bridge, host) {
            (None, _) => return fail(format!("bridge {} is missing", self.bc.bridge)),
            (_, None) => return fail(format!("host veth {} is missing", self.host_veth())),
            (Some(b), Some(h)) if h.controller != Some(b.index) => {
                return fail(format!("{} is not on bridge {}", h.name, b.name))
            }
            _ => {}
        }
        let mut pod_nl = ns
            .run(Netlink::open)?
            .map_err(|e| pod::kernel_error("netlink in pod", e))?;
        let Some(link) = pod_nl
            .link_by_name(&self.env.ifname)
            .map_err(|e| pod::kernel_error("pod link lookup", e))?
        else {
            return fail(format!("{} is missing in the container", self.env.ifname));
        };
        if !want.mac.is_empty() && !want.mac.eq_ignore_ascii_case(&format_mac(&link.mac)) {
            return fail(format!(
                "{} has MAC {}, expected {}",
                link.name,
                format_mac(&link.mac),
                want.mac
            ));
        }
        let have = pod_nl
            .addresses(link.index)
            .map_err(|e| pod::kernel_error("pod addresses", e))?;
        for ip in prev
            .ips
            .iter()
            .filter(|ip| ip.interface.is_none_or(|i| i == idx))
        {
            if !have.contains(&ip.address) {
                return fail(format!("{} is missing on {}", ip.address, link.name));
            }
        }
        let mut routes = Vec::new();
        if !prev.routes.is_empty() {
            for family in [AddressFamily::Inet, AddressFamily::Inet6] {
                routes.extend(
                    pod_nl
                        .routes(family)
                        .map_err(|e| pod::kernel_error("pod routes", e))?,
                );
            }
        }
        for route in &prev.routes {
            let want = pod::route_spec(route, &prev.ips, link.index);
            if !routes
                .iter()
                .any(|r| r.dst == want.dst && (want.gw.is_none() || r.gw == want.gw))
            {
                return fail(format!(
                    "route to {} is missing in the container",
                    route.dst
                ));
            }
        }
        Ok(())
    }

    fn status(&self) -> CniResult<()> {
        if let Some(ready) = &self.bc.ferryd_ready_file {
            if !ready.exists() {
                return Err(CniError::new(
                    Code::NotAvailable,
                    format!(
                        "ferryd is not ready on this node ({} is missing)",
                        ready.display()
                    ),
                ));
            }
        }
        match self.bc.ipam_type.as_str() {
            "" => Ok(()),
            ipam::PLUGIN_NAME => ipam::status(self.conf),
            other if self.delegate_speaks_1_1(other)? => {
                delegate::exec(self.env, other, Command::Status, self.stdin).map(|_| ())
            }
            _ => Ok(()),
        }
    }

    fn gc(&self) -> CniResult<()> {
        match self.conf.valid_attachments()? {
            Some(valid) => self.gc_links_and_masquerade(valid)?,
            // Without the list no attachment is known to be stale: taking
            // it as "none is valid" would tear down every pod.
            None => eprintln!("ferry: GC without cni.dev/valid-attachments; nothing removed"),
        }
        match self.bc.ipam_type.as_str() {
            "" => Ok(()),
            ipam::PLUGIN_NAME => ipam::gc(self.conf),
            other if self.delegate_speaks_1_1(other)? => {
                delegate::exec(self.env, other, Command::Gc, self.stdin).map(|_| ())
            }
            _ => Ok(()),
        }
    }

    /// Tears down every attachment of this network that is not in `valid`.
    fn gc_links_and_masquerade(&self, valid: Vec<Attachment>) -> CniResult<()> {
        let valid: HashSet<(String, String)> = valid
            .into_iter()
            .map(|a| (a.container_id, a.ifname))
            .collect();
        let mut nl = netlink()?;
        let store = self.store();
        for (id, ifname) in store.list()? {
            if !valid.contains(&(id.clone(), ifname.clone())) {
                self.teardown(&mut nl, &id, &ifname)?;
                store.remove(&id, &ifname)?;
            }
        }
        // Elements whose record is gone (lost data dir): match by key.
        let prefix = format!("{}/", self.conf.name);
        let keys = nft::list_masq_keys().map_err(|e| nft_error("cannot list masquerade", e))?;
        for (key, _) in keys {
            let Some((id, ifname)) = key.strip_prefix(&prefix).and_then(|k| k.split_once('/'))
            else {
                continue;
            };
            if !valid.contains(&(id.to_string(), ifname.to_string())) {
                nft::del_masq_by_key(&key).map_err(|e| nft_error("cannot remove masquerade", e))?;
            }
        }
        Ok(())
    }

    /// STATUS and GC go only to delegates that know them (libcni does the
    /// same); older ones, like Debian's host-local 1.1.1, would fail.
    fn delegate_speaks_1_1(&self, plugin: &str) -> CniResult<bool> {
        let out = delegate::exec(
            self.env,
            plugin,
            Command::Version,
            br#"{"cniVersion":"1.1.0"}"#,
        )?;
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        Ok(v["supportedVersions"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "1.1.0")))
    }

    fn ipam_add(&self) -> CniResult<CniOutput> {
        match self.bc.ipam_type.as_str() {
            "" => Ok(CniOutput::default()),
            ipam::PLUGIN_NAME => ipam::add(self.conf, self.env),
            other => delegate::ipam_add(self.env, other, self.stdin),
        }
    }

    fn ipam_del(&self) -> CniResult<()> {
        match self.bc.ipam_type.as_str() {
            "" => Ok(()),
            ipam::PLUGIN_NAME => ipam::del(self.conf, self.env),
            other => delegate::exec(self.env, other, Command::Del, self.stdin).map(|_| ()),
        }
    }

    fn ipam_check(&self) -> CniResult<()> {
        match self.bc.ipam_type.as_str() {
            "" => Ok(()),
            ipam::PLUGIN_NAME => ipam::check(self.conf, self.env),
            other => delegate::exec(self.env, other, Command::Check, self.stdin).map(|_| ()),
        }
    }
}

/// A gateway bridge routes for its pods: the reference turns forwarding on too.
fn enable_forwarding(gateways: &[IpNetwork]) -> CniResult<()> {
    if gateways.iter().any(|g| matches!(g.ip(), IpAddr::V4(_))) {
        pod::set_sysctl("ipv4/ip_forward", "1")?;
    }
    if gateways.iter().any(|g| matches!(g.ip(), IpAddr::V6(_))) {
        pod::set_sysctl("ipv6/conf/all/forwarding", "1")?;
    }
    Ok(())
}
