//! The CNI conflist ferryd writes once the node is ready, and the
//! readiness file the plugin's STATUS checks.
//!
//! Readiness contract with the plugin: the `ferry` plugin entry carries
//! `"ferrydReadyFile": "<run-dir>/ready"`. While that file does not exist,
//! `ferry STATUS` answers error 50 ("plugin not available"). ferryd writes it
//! (atomically) after a reconcile succeeded and removes it when a reconcile
//! fails, at start-up and on SIGTERM/SIGINT.

use std::io::Write;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use serde_json::json;

pub const FILE_NAME: &str = "10-ferry.conflist";
pub const CNI_VERSION: &str = "1.1.0";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflistParams<'a> {
    pub network: &'a str,
    pub bridge: &'a str,
    pub subnet: Ipv4Network,
    pub mtu: u32,
    pub data_dir: &'a Path,
    pub ipam_data_dir: &'a Path,
    pub ready_file: &'a Path,
}

/// The conflist text (pure).
pub fn render(p: &ConflistParams) -> String {
    let net = Ipv4Network::new(p.subnet.network(), p.subnet.prefix()).expect("valid");
    let gw = std::net::Ipv4Addr::from(u32::from(net.network()) + 1);
    let v = json!({
        "cniVersion": CNI_VERSION,
        "name": p.network,
        "plugins": [{
            "type": "ferry",
            "bridge": p.bridge,
            "isGateway": true,
            "isDefaultGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "mtu": p.mtu,
            "dataDir": p.data_dir,
            "ferrydReadyFile": p.ready_file,
            "ipam": {
                "type": "ferry-ipam",
                "ranges": [[{ "subnet": net.to_string(), "gateway": gw.to_string() }]],
                "dataDir": p.ipam_data_dir,
            }
        }]
    });
    let mut s = serde_json::to_string_pretty(&v).expect("serialisable");
    s.push('\n');
    s
}

/// The pod subnet of a conflist ferryd wrote (to keep it across restarts
/// even if the store lost the node's record).
pub fn subnet_of(text: &str) -> Option<Ipv4Network> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v["plugins"][0]["ipam"]["ranges"][0][0]["subnet"]
        .as_str()?
        .parse()
        .ok()
}

/// Writes `contents` to `path` atomically (temp file + rename) unless it
/// holds exactly that already. Returns whether it wrote.
pub fn write_atomic(path: &Path, contents: &str) -> std::io::Result<bool> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(contents) {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    // A leading dot and no .conf/.conflist suffix: runtimes ignore it.
    let tmp: PathBuf = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.map(|_| true)
}

pub fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden() {
        let got = render(&ConflistParams {
            network: "ferry",
            bridge: "ferry0",
            subnet: "10.244.3.0/24".parse().unwrap(),
            mtu: 1450,
            data_dir: Path::new("/var/lib/cni/ferry"),
            ipam_data_dir: Path::new("/var/lib/cni/networks"),
            ready_file: Path::new("/run/ferry/ready"),
        });
        assert_eq!(got, include_str!("testdata/10-ferry.conflist"));
        assert_eq!(subnet_of(&got), Some("10.244.3.0/24".parse().unwrap()));
        assert_eq!(subnet_of("{}"), None);
    }

    #[test]
    fn atomic_write_only_when_changed() {
        let dir = std::env::temp_dir().join(format!("ferryd-cl-{}", std::process::id()));
        let p = dir.join("x.conflist");
        assert!(write_atomic(&p, "a").unwrap());
        assert!(!write_atomic(&p, "a").unwrap());
        assert!(write_atomic(&p, "b").unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "b");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left"
        );
        remove_if_exists(&p).unwrap();
        remove_if_exists(&p).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
