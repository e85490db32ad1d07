//! Running another CNI plugin (a foreign IPAM such as `host-local` or
//! `static`) exactly as the spec says: found in CNI_PATH, same environment
//! with CNI_COMMAND set, the network config on stdin, result on stdout.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};

use crate::cni::{CniEnv, CniError, CniOutput, CniResult, Code, Command};

fn find(env: &CniEnv, plugin: &str) -> CniResult<PathBuf> {
    env.path
        .iter()
        .map(|dir| dir.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                format!("plugin {plugin:?} not found in CNI_PATH"),
            )
            .with_details(format!("searched {:?}", env.path))
        })
}

/// Run `plugin` for `command` with `stdin`; returns its stdout on success and
/// its own CNI error (code preserved) on failure.
pub fn exec(env: &CniEnv, plugin: &str, command: Command, stdin: &[u8]) -> CniResult<Vec<u8>> {
    let path = find(env, plugin)?;
    let mut child = Process::new(&path)
        .env("CNI_COMMAND", command.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            CniError::new(Code::Io, format!("cannot run {}", path.display())).with_details(e)
        })?;
    // A plugin that exits without reading stdin closes the pipe: not our error.
    let _ = child.stdin.take().expect("piped").write_all(stdin);
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::new(Code::Io, format!("waiting for {plugin}")).with_details(e))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    #[derive(serde::Deserialize)]
    struct Wire {
        code: u32,
        #[serde(default)]
        msg: String,
        #[serde(default)]
        details: String,
    }
    Err(match serde_json::from_slice::<Wire>(&out.stdout) {
        Ok(w) => CniError {
            code: w.code,
            msg: format!("{plugin}: {}", w.msg),
            details: w.details,
        },
        Err(_) => CniError::new(Code::Delegate, format!("{plugin} failed ({})", out.status))
            .with_details(String::from_utf8_lossy(&out.stdout).trim()),
    })
}

/// ADD through a delegated IPAM: parse the result it printed.
pub fn ipam_add(env: &CniEnv, plugin: &str, stdin: &[u8]) -> CniResult<CniOutput> {
    CniOutput::from_slice(&exec(env, plugin, Command::Add, stdin)?)
}
