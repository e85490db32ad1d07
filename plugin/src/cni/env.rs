//! The CNI_* environment a runtime passes, parsed and validated before any
//! kernel or disk work (rules of the reference `pkg/utils`).

use std::collections::HashMap;
use std::path::PathBuf;

use super::error::{CniError, CniResult, Code};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(s: &str) -> CniResult<Command> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::new(
                    Code::InvalidEnv,
                    format!("unknown CNI_COMMAND {other:?}"),
                ))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

/// Everything from the environment, validated for the command.
#[derive(Debug, Clone)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: String,
    /// Empty when the runtime passed none (allowed for DEL).
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS as key/value pairs, in order.
    pub args: Vec<(String, String)>,
    pub path: Vec<PathBuf>,
}

impl CniEnv {
    /// Read from the process environment.
    pub fn from_process() -> CniResult<CniEnv> {
        let vars: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("CNI_"))
            .collect();
        CniEnv::from_vars(&vars)
    }

    /// Parse and validate; pure so it can be unit tested.
    pub fn from_vars(vars: &HashMap<String, String>) -> CniResult<CniEnv> {
        let get = |k: &str| vars.get(k).map(String::as_str).unwrap_or("");
        let command = match get("CNI_COMMAND") {
            "" => return Err(CniError::new(Code::InvalidEnv, "CNI_COMMAND is not set")),
            c => Command::parse(c)?,
        };
        let env = CniEnv {
            command,
            container_id: get("CNI_CONTAINERID").to_string(),
            netns: get("CNI_NETNS").to_string(),
            ifname: get("CNI_IFNAME").to_string(),
            args: parse_args(get("CNI_ARGS"))?,
            path: std::env::split_paths(get("CNI_PATH"))
                .filter(|p| !p.as_os_str().is_empty())
                .collect(),
        };
        let (needs_id, needs_netns, needs_ifname) = match command {
            Command::Add | Command::Check => (true, true, true),
            Command::Del => (true, false, true),
            Command::Version | Command::Status | Command::Gc => (false, false, false),
        };
        if needs_id {
            require("CNI_CONTAINERID", &env.container_id)?;
            validate_container_id(&env.container_id)?;
        }
        if needs_netns {
            require("CNI_NETNS", &env.netns)?;
        }
        if needs_ifname {
            require("CNI_IFNAME", &env.ifname)?;
            validate_ifname(&env.ifname)?;
        }
        Ok(env)
    }

    /// Value of a CNI_ARGS key.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn require(name: &str, value: &str) -> CniResult<()> {
    if value.is_empty() {
        Err(CniError::new(
            Code::InvalidEnv,
            format!("{name} is missing"),
        ))
    } else {
        Ok(())
    }
}

/// CNI_ARGS: `K=V;K2=V2`. A pair without `=` is malformed.
fn parse_args(raw: &str) -> CniResult<Vec<(String, String)>> {
    raw.split(';')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CniError::new(
                Code::InvalidEnv,
                format!("CNI_ARGS: invalid pair {pair:?}"),
            )),
        })
        .collect()
}

/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`: container IDs and network names are used
/// in file names and nftables keys, so nothing else may pass.
pub fn is_safe_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

pub fn validate_container_id(id: &str) -> CniResult<()> {
    if is_safe_name(id) {
        Ok(())
    } else {
        Err(CniError::new(
            Code::InvalidEnv,
            format!("invalid characters in CNI_CONTAINERID {id:?}"),
        ))
    }
}

/// Linux interface name rules: non-empty, < 16 bytes, not `.`/`..`, no `/`,
/// `:` or whitespace.
pub fn validate_ifname(name: &str) -> CniResult<()> {
    let bad = |why: &str| {
        Err(CniError::new(
            Code::InvalidEnv,
            format!("invalid CNI_IFNAME {name:?}: {why}"),
        ))
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 15 {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("reserved name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return bad("contains '/', ':' or whitespace");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn add_env(extra: &[(&str, &str)]) -> CniResult<CniEnv> {
        let mut v = vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ]);
        for (k, val) in extra {
            v.insert(k.to_string(), val.to_string());
        }
        CniEnv::from_vars(&v)
    }

    #[test]
    fn parses_a_complete_add() {
        let e = add_env(&[("CNI_ARGS", "IgnoreUnknown=1;IP=10.0.0.9")]).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.path.len(), 2);
        assert_eq!(e.arg("IP"), Some("10.0.0.9"));
        assert_eq!(e.arg("nope"), None);
    }

    #[test]
    fn every_bad_env_is_code_4() {
        for extra in [
            vec![("CNI_COMMAND", "")],
            vec![("CNI_COMMAND", "FROB")],
            vec![("CNI_CONTAINERID", "")],
            vec![("CNI_CONTAINERID", "-starts-with-dash")],
            vec![("CNI_CONTAINERID", "has/slash")],
            vec![("CNI_NETNS", "")],
            vec![("CNI_IFNAME", "")],
            vec![("CNI_IFNAME", "sixteen-bytes-xx")],
            vec![("CNI_IFNAME", "..")],
            vec![("CNI_IFNAME", "a:b")],
            vec![("CNI_IFNAME", "a b")],
            vec![("CNI_ARGS", "novalue")],
        ] {
            assert_eq!(add_env(&extra).unwrap_err().code, 4, "{extra:?}");
        }
    }

    #[test]
    fn del_allows_empty_netns_and_version_needs_nothing() {
        assert!(add_env(&[("CNI_COMMAND", "DEL"), ("CNI_NETNS", "")]).is_ok());
        assert!(CniEnv::from_vars(&vars(&[("CNI_COMMAND", "VERSION")])).is_ok());
        assert!(CniEnv::from_vars(&vars(&[("CNI_COMMAND", "GC")])).is_ok());
    }

    #[test]
    fn safe_names() {
        assert!(is_safe_name("a-b_c.d9"));
        assert!(!is_safe_name(""));
        assert!(!is_safe_name(".hidden"));
        assert!(!is_safe_name("a b"));
    }
}
