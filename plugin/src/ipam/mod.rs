//! ferry-ipam: a drop-in for the reference `host-local` IPAM plugin (same
//! config keys, same on-disk layout), made crash-safe and fast. The `ferry`
//! plugin calls these functions in-process; the `ferry-ipam` binary wraps
//! them with [`run`].

pub mod alloc;
pub mod config;
pub mod dns;
pub mod store;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use ipnetwork::IpNetwork;
use nix::unistd::{access, AccessFlags};

use crate::cni::error::io_error;
use crate::cni::{CniEnv, CniError, CniOutput, CniResult, Code, Command, Dns, IpConfig, NetConf};
use alloc::AllocError;
use config::IpamConfig;
use store::{Lease, Owner, Store};

/// The `ipam.type` that selects this IPAM (in-process in `ferry`).
pub const PLUGIN_NAME: &str = "ferry-ipam";

/// ADD: one address per range set for (containerID, ifname), with the
/// range's gateway, plus `ipam.routes` and the resolvConf's dns.
///
/// Unlike host-local (which errors), a repeated ADD for an attachment that
/// already holds leases returns those leases: runtimes retry ADD after
/// timeouts, and handing back what the pod already has is the safe answer.
pub fn add(conf: &NetConf, env: &CniEnv) -> CniResult<CniOutput> {
    let cfg = IpamConfig::from_netconf(conf)?;
    let requested = config::requested_ips(conf, env.arg("IP"))?;
    let wanted = alloc::assign_requested(&cfg.ranges, &requested).map_err(alloc_error)?;
    let dns = match &cfg.resolv_conf {
        Some(path) => dns::read(path)?,
        None => Dns::default(),
    };
    let store = Store::open(&cfg.data_dir, &conf.name).map_err(|e| {
        io_error(
            format!(
                "cannot create lease directory in {}",
                cfg.data_dir.display()
            ),
            e,
        )
    })?;
    let owner = Owner::new(&env.container_id, &env.ifname);
    let ips = allocate(&cfg, &store, &owner, &wanted)?;
    Ok(CniOutput {
        interfaces: Vec::new(),
        ips,
        routes: cfg.routes,
        dns,
    })
}

/// The store part of ADD. Slow work happens before the lock: one directory
/// listing (what this attachment holds, what is taken) and writing the lease
/// files. Under the lock only link(2)s: the listing is a snapshot, and link's
/// EEXIST has the last word on whether an address is free, as with
/// host-local's O_EXCL. The critical section is thus a dozen syscalls,
/// independent of how many leases exist. (What an attachment holds is read
/// before the lock: the spec forbids parallel operations on one container.)
fn allocate(
    cfg: &IpamConfig,
    store: &Store,
    owner: &Owner,
    wanted: &[Option<IpAddr>],
) -> CniResult<Vec<IpConfig>> {
    let err = store_error(store);
    let listing = store.list().map_err(&err)?;
    let held = store::owned_by(&store.lookup(&listing).map_err(&err)?, owner);
    let mut in_use = listing.leases;
    let existing: Vec<Option<IpAddr>> = cfg
        .ranges
        .iter()
        .map(|set| {
            held.iter()
                .copied()
                .find(|&ip| alloc::range_for(set, ip).is_some())
        })
        .collect();
    for (i, (w, e)) in wanted.iter().zip(&existing).enumerate() {
        if let (Some(w), Some(e)) = (w, e) {
            if w != e {
                return Err(CniError::new(
                    Code::IpamExhausted,
                    format!(
                        "requested address {w} is unavailable: {} already holds {e} from range set {i}",
                        owner_text(owner)
                    ),
                ));
            }
        }
    }
    let mut temps = Vec::new();
    for e in &existing {
        temps.push(match e {
            Some(_) => None,
            None => Some(store.prepare(owner).map_err(&err)?),
        });
    }

    let locked = store.lock().map_err(&err)?;
    let mut fresh: Vec<IpAddr> = Vec::new();
    let mut out = Vec::new();
    let result = (|| -> CniResult<()> {
        for (i, set) in cfg.ranges.iter().enumerate() {
            if let Some(ip) = existing[i] {
                // Still ours now that we hold the lock? (A concurrent DEL of
                // the same attachment may have raced us.)
                if locked
                    .owner(ip)
                    .map_err(&err)?
                    .is_some_and(|o| owner.claims(&o))
                {
                    out.push(ip_config(set, ip));
                    continue;
                }
                // A stale index entry: drop it, allocate afresh.
                locked.unindex(owner, ip).map_err(&err)?;
            }
            let tmp = match &mut temps[i] {
                Some(t) => t,
                slot => slot.insert(store.prepare(owner).map_err(&err)?),
            };
            let last = locked.last_reserved(i);
            let mut refreshed = false;
            let ip = loop {
                match alloc::choose(set, &|ip| in_use.contains(&ip), last, wanted[i]) {
                    Ok(ip) if locked.commit(tmp, owner, ip).map_err(&err)? => break ip,
                    // Taken since the snapshot.
                    Ok(ip) => _ = in_use.insert(ip),
                    // The snapshot may hold addresses released since: before
                    // saying no, look once more, under the lock.
                    Err(AllocError::Exhausted | AllocError::InUse(_)) if !refreshed => {
                        in_use = locked.in_use().map_err(&err)?;
                        refreshed = true;
                    }
                    Err(e) => return Err(range_error(i, set, e)),
                }
            };
            fresh.push(ip);
            if let Err(e) = locked.set_last_reserved(i, ip) {
                eprintln!("ferry-ipam: cannot record last reserved address: {e}");
            }
            out.push(ip_config(set, ip));
        }
        Ok(())
    })();
    if let Err(e) = result {
        // Give back what this call took; leases held before stay.
        for ip in fresh {
            let _ = locked.release(owner, ip);
        }
        return Err(e);
    }
    Ok(out)
}

/// DEL: release every lease of (containerID, ifname). Idempotent; only
/// `ipam.dataDir` is read, so a config whose ranges went bad still deletes.
pub fn del(conf: &NetConf, env: &CniEnv) -> CniResult<()> {
    let data_dir = config::data_dir(&conf.raw)?;
    let Some(store) = Store::existing(&data_dir, &conf.name) else {
        return Ok(());
    };
    let owner = Owner::new(&env.container_id, &env.ifname);
    let held = match store.list().and_then(|l| store.lookup(&l)) {
        Ok(leases) => store::owned_by(&leases, &owner),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(store_error(&store)(e)),
    };
    if held.is_empty() {
        return Ok(());
    }
    let locked = store.lock().map_err(store_error(&store))?;
    for ip in held {
        // Re-checked under the lock: the address may have been released and
        // handed to someone else since the lookup. Then only our (stale)
        // index entry goes.
        let ours = locked
            .owner(ip)
            .map_err(store_error(&store))?
            .is_some_and(|o| owner.claims(&o));
        if ours {
            locked.release(&owner, ip)
        } else {
            locked.unindex(&owner, ip)
        }
        .map_err(store_error(&store))?;
    }
    Ok(())
}

/// CHECK: the attachment holds a lease, and the addresses of prevResult that
/// lie in our ranges are exactly the ones it holds there.
pub fn check(conf: &NetConf, env: &CniEnv) -> CniResult<()> {
    let cfg = IpamConfig::from_netconf(conf)?;
    let owner = Owner::new(&env.container_id, &env.ifname);
    let held = match Store::existing(&cfg.data_dir, &conf.name) {
        Some(store) => {
            let leases = store.list().and_then(|l| store.lookup(&l));
            let mut held = store::owned_by(&leases.map_err(store_error(&store))?, &owner);
            // Index entries are hints: confirm by content (a file or two).
            held.retain(|&ip| matches!(store.read_lease(ip), Ok(Some(o)) if owner.claims(&o)));
            held
        }
        None => Vec::new(),
    };
    if held.is_empty() {
        return Err(CniError::new(
            Code::UnknownContainer,
            format!("no address is leased to {}", owner_text(&owner)),
        ));
    }
    let Some(prev) = &conf.prev_result else {
        return Ok(());
    };
    let ours = |ip: IpAddr| cfg.ranges.iter().any(|s| alloc::range_for(s, ip).is_some());
    let prev_ips: Vec<IpAddr> = prev
        .ips
        .iter()
        .map(|c| c.address.ip())
        .filter(|&ip| ours(ip))
        .collect();
    let held: Vec<IpAddr> = held.into_iter().filter(|&ip| ours(ip)).collect();
    let missing = |a: &[IpAddr], b: &[IpAddr]| a.iter().find(|ip| !b.contains(ip)).copied();
    if let Some(ip) = missing(&prev_ips, &held) {
        return Err(CniError::new(
            Code::CheckFailed,
            format!(
                "prevResult address {ip} is not leased to {}",
                owner_text(&owner)
            ),
        ));
    }
    if let Some(ip) = missing(&held, &prev_ips) {
        return Err(CniError::new(
            Code::CheckFailed,
            format!("{} holds {ip}, which prevResult lacks", owner_text(&owner)),
        ));
    }
    Ok(())
}

/// STATUS: can an ADD succeed now? The store must be creatable, writable and
/// lockable, and every range set must have a free address. Else code 50.
pub fn status(conf: &NetConf) -> CniResult<()> {
    let cfg = IpamConfig::from_netconf(conf)?;
    let unavailable = |why: String| CniError::new(Code::NotAvailable, why);
    let store = Store::open(&cfg.data_dir, &conf.name).map_err(|e| {
        unavailable(format!(
            "cannot create lease directory in {}: {e}",
            cfg.data_dir.display()
        ))
    })?;
    access(store.dir(), AccessFlags::W_OK).map_err(|e| {
        unavailable(format!(
            "lease directory {} is not writable: {e}",
            store.dir().display()
        ))
    })?;
    let in_use = match store.try_lock_for(Duration::from_secs(1)) {
        Ok(Some(locked)) => locked.in_use(),
        Ok(None) => {
            return Err(unavailable(format!(
                "lease store {} stays locked",
                store.dir().display()
            )))
        }
        Err(e) => Err(e),
    }
    .map_err(|e| {
        unavailable(format!(
            "lease store {} is unusable: {e}",
            store.dir().display()
        ))
    })?;
    for (i, set) in cfg.ranges.iter().enumerate() {
        if alloc::choose(set, &|ip| in_use.contains(&ip), None, None).is_err() {
            return Err(unavailable(format!(
                "range set {i} ({}) is exhausted",
                describe(set)
            )));
        }
    }
    Ok(())
}

/// GC: release every lease whose attachment is not in
/// `cni.dev/valid-attachments`. A GC without that list knows of no stale
/// attachment and releases nothing (it must not wipe the network).
pub fn gc(conf: &NetConf) -> CniResult<()> {
    let Some(valid) = conf.valid_attachments()? else {
        eprintln!("ferry-ipam: GC without cni.dev/valid-attachments; nothing released");
        // Abandoned temps belong to no attachment: they go regardless (the
        // listing sweeps them).
        let data_dir = config::data_dir(&conf.raw).ok();
        if let Some(store) = data_dir.and_then(|d| Store::existing(&d, &conf.name)) {
            let _ = store.list();
        }
        return Ok(());
    };
    let data_dir = config::data_dir(&conf.raw)?;
    let Some(store) = Store::existing(&data_dir, &conf.name) else {
        return Ok(());
    };
    // Held throughout: GC is rare, and no ADD may link while we judge. The
    // listing also sweeps abandoned temps.
    let locked = store.lock().map_err(store_error(&store))?;
    let listing = store.list().map_err(store_error(&store))?;
    let leases = store.read_all(&listing).map_err(store_error(&store))?;
    let valid: HashSet<Owner> = valid
        .iter()
        .map(|a| Owner::new(&a.container_id, &a.ifname))
        .collect();
    let valid_ids: HashSet<&str> = valid.iter().map(|o| o.id.as_str()).collect();
    // An old id-only lease stays while any interface of its container does.
    let is_valid = |o: &Owner| match o.ifname {
        Some(_) => valid.contains(o),
        None => valid_ids.contains(o.id.as_str()),
    };
    let current: HashMap<IpAddr, &Owner> = leases.iter().map(|l| (l.ip, &l.owner)).collect();
    let doomed: Vec<&Lease> = leases.iter().filter(|l| !is_valid(&l.owner)).collect();
    // Index entries first (see store.rs): those of leases about to go, and
    // stale ones, whose lease is gone or names someone else.
    for (owner, ip) in &listing.index {
        let keep = current.get(ip).is_some_and(|o| *o == owner && is_valid(o));
        if !keep {
            locked.unindex(owner, *ip).map_err(store_error(&store))?;
        }
    }
    for lease in doomed {
        locked
            .release(&lease.owner, lease.ip)
            .map_err(store_error(&store))?;
    }
    Ok(())
}

/// The binary's dispatch: stdout text for the verb, if any.
pub fn run(env: &CniEnv, stdin: &[u8]) -> CniResult<Option<String>> {
    let conf = NetConf::parse(stdin)?;
    conf.version.allows(env.command)?;
    match env.command {
        Command::Add => return Ok(Some(add(&conf, env)?.to_json(conf.version))),
        Command::Del => del(&conf, env)?,
        Command::Check => check(&conf, env)?,
        Command::Status => status(&conf)?,
        Command::Gc => gc(&conf)?,
        Command::Version => unreachable!("answered by cni::skel"),
    }
    Ok(None)
}

fn ip_config(set: &[config::Range], ip: IpAddr) -> IpConfig {
    let r = alloc::range_for(set, ip).expect("allocated addresses lie in their set");
    IpConfig {
        address: IpNetwork::new(ip, r.subnet.prefix()).expect("prefix of a valid subnet"),
        gateway: Some(r.gateway),
        interface: None,
    }
}

fn describe(set: &[config::Range]) -> String {
    set.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn owner_text(o: &Owner) -> String {
    format!(
        "container {} interface {}",
        o.id,
        o.ifname.as_deref().unwrap_or("?")
    )
}

fn alloc_error(e: AllocError) -> CniError {
    CniError::new(Code::IpamExhausted, e.to_string())
}

fn range_error(i: usize, set: &[config::Range], e: AllocError) -> CniError {
    match e {
        AllocError::Exhausted => CniError::new(
            Code::IpamExhausted,
            format!("no free address in range set {i} ({})", describe(set)),
        ),
        e => alloc_error(e),
    }
}

fn store_error(store: &Store) -> impl Fn(std::io::Error) -> CniError + '_ {
    move |e| io_error(format!("lease store {}", store.dir().display()), e)
}
