//! ferry's own record of each attachment, keyed by (network, containerID,
//! ifname), so DEL and GC can clean up without the pod's netns or IP.
//!
//! Written before any kernel object exists and removed after the last one is
//! gone; a crash in between leaves a record that DEL or GC finishes.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::cni::error::io_error;
use crate::cni::CniResult;

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
    /// nftables state they describe are gone too.
    pub fn save(&self, rec: &Record) -> CniResult<()> {
        fs::create_dir_all(&self.dir)
            .map_err(|e| io_error(format!("cannot create {}", self.dir.display()), e))?;
        let path = self.path(&rec.container_id, &rec.ifname);
        let tmp = self.dir.join(format!(".tmp.{}", std::process::id()));
        let body = serde_json::to_vec(rec).expect("record serializes");
        fs::write(&tmp, body)
            .and_then(|_| fs::rename(&tmp, &path))
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
    pub fn list(&self) -> CniResult<Vec<(String, String)>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(format!("cannot list {}", self.dir.display()), e)),
        };
        Ok(entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| {
                let (id, ifname) = n.split_once(':')?;
                Some((id.to_string(), ifname.to_string()))
            })
            .collect())
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
}
