//! Node-level egress masquerade: pod traffic leaving the cluster CIDR gets
//! the node's address; pod↔pod traffic keeps its source.
//!
//! ferryd owns exactly one object, the chain `node-postrouting` in the
//! table `inet ferry` it shares with the plugin (which owns the `cni-*`
//! objects). It never flushes or deletes the table. The rendered ruleset
//! carries a hash of itself as a rule comment, so checking whether the
//! kernel holds the right rules is one `nft list chain`; fixing them is one
//! atomic `nft -f -` transaction.

use std::io::Write;
use std::process::{Command, Stdio};

use ipnetwork::Ipv4Network;

pub const TABLE: &str = "ferry";
pub const CHAIN: &str = "node-postrouting";

/// The rule comment that identifies a rendered ruleset.
pub fn marker(subnet: Ipv4Network, cluster: Ipv4Network) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in format!("v1 {subnet} {cluster}").bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("ferryd:{h:08x}")
}

/// The nft script that makes `node-postrouting` hold exactly ferryd's rules.
pub fn render(subnet: Ipv4Network, cluster: Ipv4Network) -> String {
    let subnet = Ipv4Network::new(subnet.network(), subnet.prefix()).expect("valid");
    format!(
        "add table inet {TABLE}\n\
         add chain inet {TABLE} {CHAIN} {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         flush chain inet {TABLE} {CHAIN}\n\
         add rule inet {TABLE} {CHAIN} ip saddr {subnet} ip daddr != {cluster} ip daddr != 224.0.0.0/4 masquerade comment \"{m}\"\n",
        m = marker(subnet, cluster)
    )
}

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("cannot run nft: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft -f failed: {0}")]
    Failed(String),
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<(bool, String), MasqError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(MasqError::Spawn)?;
    if let Some(s) = stdin {
        let mut i = child.stdin.take().expect("piped");
        i.write_all(s.as_bytes()).map_err(MasqError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(MasqError::Spawn)?;
    let text = if out.status.success() {
        out.stdout
    } else {
        out.stderr
    };
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&text).into_owned(),
    ))
}

/// Makes the kernel hold the masquerade rules (or none of ferryd's when
/// `enabled` is false). Returns whether it changed anything.
pub fn ensure(enabled: bool, subnet: Ipv4Network, cluster: Ipv4Network) -> Result<bool, MasqError> {
    let (exists, listing) = nft(&["list", "chain", "inet", TABLE, CHAIN], None)?;
    if !enabled {
        if !exists {
            return Ok(false);
        }
        let (ok, err) = nft(
            &["-f", "-"],
            Some(&format!("delete chain inet {TABLE} {CHAIN}\n")),
        )?;
        return if ok {
            Ok(true)
        } else {
            Err(MasqError::Failed(err.trim().to_string()))
        };
    }
    let m = marker(subnet, cluster);
    if exists
        && listing.contains(&format!("comment \"{m}\""))
        && listing.matches("masquerade").count() == 1
    {
        return Ok(false);
    }
    let (ok, err) = nft(&["-f", "-"], Some(&render(subnet, cluster)))?;
    if ok {
        Ok(true)
    } else {
        Err(MasqError::Failed(err.trim().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden() {
        let got = render(
            "10.244.3.7/24".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
        );
        assert_eq!(got, include_str!("testdata/masq.nft"));
    }

    #[test]
    fn marker_depends_on_inputs() {
        let a = marker(
            "10.244.3.0/24".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
        );
        let b = marker(
            "10.244.4.0/24".parse().unwrap(),
            "10.244.0.0/16".parse().unwrap(),
        );
        assert_ne!(a, b);
        assert!(a.starts_with("ferryd:"));
    }
}
