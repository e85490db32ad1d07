//! ferry's own record of each attachment, keyed by (network, containerID,
//! ifname), so DEL and GC can clean up without the pod's netns or IP.
//!
//! Written before any kernel object exists and removed after the last one is
//! gone; a crash in between leaves a record that DEL or GC finishes. A crash
//! while writing one leaves a temp file, `.tmp.<pid>.<n>.<pidns>`, which the
//! next ADD or GC on the network sweeps once its writer is dead (the lease
//! store's rule, [`abandoned`](crate::ipam::store::abandoned)).

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::cni::error::io_error;
use crate::cni::CniResult;
use crate::ipam::store::{sweep_temp, temp_name};

const TEMP_PREFIX: &str = ".tmp.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub container_id: String,
    pub ifname: String,
    pub host_veth: String,
    /// Pod addresses with their prefix; masquerade entries derive from them.
    pub ips: Vec<IpNetwork>,
    pub ip_masq: bool,
}

/// Stable 64-bit FNV-1a: names derived from it must not change between
/// releases (std's hashers make no such promise), and it is five lines.
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The nftables/record key of an attachment.
pub fn key(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{network}/{container_id}/{ifname}")
}

/// Host-side veth name, derived from the attachment so DEL finds it without
/// entering the pod: "veth" + 11 hex digits (15 bytes, the kernel's limit).
pub fn host_veth_name(network: &str, container_id: &str, ifname: &str) -> String {
    let h = fnv1a64(key(network, container_id, ifname).as_bytes());
    format!("veth{:011x}", h & 0xfff_ffff_ffff)
}

/// Records of one network: `<data_dir>/<network>/<containerID>:<ifname>`.
/// Neither part can contain ':' or '/' (validated), so names are unambiguous.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(data_dir: &Path, network: &str) -> Store {
        Store {
            dir: data_dir.join(network),
        }
    }

    fn path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir.join(format!("{container_id}:{ifname}"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Write atomically (temp + rename). No fsync: the records guard against
    /// a killed plugin, and after a machine crash the pods' netns and the
    /// nftables state they describe are gone too. Sweeps abandoned temps
    /// first: a single readdir on ADD, and nothing else would remove them
    /// between GCs.
    pub fn save(&self, rec: &Record) -> CniResult<()> {
        fs::create_dir_all(&self.dir)
            .map_err(|e| io_error(format!("cannot create {}", self.dir.display()), e))?;
        // The sweep; failing to list only leaves temps for the next one.
        let _ = self.names();
        let path = self.path(&rec.container_id, &rec.ifname);
        let body = serde_json::to_vec(rec).expect("record serializes");
        let write = || {
            let tmp = self.dir.join(temp_name(TEMP_PREFIX));
            let written = fs::write(&tmp, &body).and_then(|_| fs::rename(&tmp, &path));
            if written.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            written
        };
        // A sweep never takes a live writer's fresh temp, but a writer stopped
        // for over a minute between write and rename is judged by age alone:
        // write it once more. (A data dir removed under us fails again.)
        match write() {
            Err(e) if e.kind() == ErrorKind::NotFound => write(),
            other => other,
        }
        .map_err(|e| io_error(format!("cannot write {}", path.display()), e))
    }

    pub fn load(&self, container_id: &str, ifname: &str) -> CniResult<Option<Record>> {
        let path = self.path(container_id, ifname);
        match fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(format!("cannot read {}", path.display()), e)),
        }
    }

    pub fn remove(&self, container_id: &str, ifname: &str) -> CniResult<()> {
        let path = self.path(container_id, ifname);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(io_error(format!("cannot remove {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }

    /// Every (containerID, ifname) with a record; missing dir means none.
    /// Sweeps abandoned temps on the way (GC).
    pub fn list(&self) -> CniResult<Vec<(String, String)>> {
        Ok(self
            .names()?
            .into_iter()
            .filter_map(|n| {
                let (id, ifname) = n.split_once(':')?;
                Some((id.to_string(), ifname.to_string()))
            })
            .collect())
    }

    /// The directory's names but temps, sweeping those that are abandoned.
    /// Records can never look like temps: container IDs start alphanumeric.
    fn names(&self) -> CniResult<Vec<String>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(format!("cannot list {}", self.dir.display()), e)),
        };
        let mut names = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            match name.strip_prefix(TEMP_PREFIX) {
                Some(writer) => sweep_temp(&entry.path(), writer),
                None => names.push(name),
            }
        }
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_are_stable_short_and_distinct() {
        let a = host_veth_name("net", "c1", "eth0");
        assert_eq!(a, host_veth_name("net", "c1", "eth0"));
        assert_eq!(a.len(), 15);
        assert_ne!(a, host_veth_name("net", "c1", "eth1"));
        assert_ne!(a, host_veth_name("net2", "c1", "eth0"));
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn store_round_trip_list_and_idempotent_remove() {
        let dir = std::env::temp_dir().join(format!("ferry-att-{}", std::process::id()));
        let store = Store::new(&dir, "net");
        assert!(store.list().unwrap().is_empty());
        let rec = Record {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            host_veth: host_veth_name("net", "c1", "eth0"),
            ips: vec!["10.1.0.5/24".parse().unwrap()],
            ip_masq: true,
        };
        store.save(&rec).unwrap();
        assert_eq!(store.load("c1", "eth0").unwrap(), Some(rec));
        assert_eq!(store.list().unwrap(), vec![("c1".into(), "eth0".into())]);
        store.remove("c1", "eth0").unwrap();
        store.remove("c1", "eth0").unwrap();
        assert_eq!(store.load("c1", "eth0").unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A dead writer's fresh temp and a live writer's old one go, a live
    /// writer's fresh one stays; GC (list) and ADD (save) both sweep.
    #[test]
    fn abandoned_temps_are_swept_by_list_and_save() {
        use crate::ipam::store::testing::{assert_swept, dead_pid, plant_temps, write_aged};
        use std::time::Duration;

        let dir = std::env::temp_dir().join(format!("ferry-att-sweep-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::new(&dir, "net");
        let rec = |id: &str| Record {
            container_id: id.into(),
            ifname: "eth0".into(),
            host_veth: host_veth_name("net", id, "eth0"),
            ips: Vec::new(),
            ip_masq: false,
        };
        store.save(&rec("c1")).unwrap();
        let plant = |n| plant_temps(store.dir(), TEMP_PREFIX, n);
        let check = |temps: &[PathBuf; 3], after: &str| {
            assert_swept(temps, after);
            fs::remove_file(&temps[2]).unwrap();
        };
        // The name of older releases: no namespace, so judged by age.
        let old_name = store.dir().join(format!(".tmp.{}", dead_pid()));
        write_aged(&old_name, Duration::from_secs(120));

        let temps = plant(1000);
        assert_eq!(store.list().unwrap(), vec![("c1".into(), "eth0".into())]);
        check(&temps, "list");
        assert!(!old_name.exists());

        let temps = plant(2000);
        store.save(&rec("c2")).unwrap();
        check(&temps, "save");

        // Nothing but the records is left: save's own temps are renamed.
        let mut names: Vec<String> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["c1:eth0", "c2:eth0"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
