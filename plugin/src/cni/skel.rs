//! The process edge every CNI plugin binary shares: read env and stdin,
//! dispatch, print the result or the error JSON, pick the exit code.

use std::io::{Read, Write};

use super::env::CniEnv;
use super::error::{CniError, CniResult, Code};
use super::version::{version_json, LATEST};

/// Run a plugin. `about` is printed for humans who run the binary by hand
/// (no CNI_COMMAND); `run` returns what goes to stdout on success.
pub fn main(about: &str, run: fn(&CniEnv, &[u8]) -> CniResult<Option<String>>) -> ! {
    if std::env::var_os("CNI_COMMAND").is_none() {
        println!("{about}");
        std::process::exit(0);
    }
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let asked = asked_version(&stdin);
    let outcome = read
        .map_err(|e| CniError::new(Code::Io, "cannot read stdin").with_details(e))
        .and_then(|_| CniEnv::from_process())
        .and_then(|env| match env.command {
            // VERSION needs no valid config: answer in the version asked.
            super::env::Command::Version => Ok(Some(version_json(&asked))),
            _ => run(&env, &stdin),
        });
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(text) => {
            if let Some(text) = text {
                let _ = writeln!(out, "{text}");
            }
            std::process::exit(0)
        }
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&asked));
            std::process::exit(1)
        }
    }
}

/// The cniVersion of stdin when it has one we speak, else the latest.
fn asked_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| super::version::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn asked_version_falls_back_to_latest() {
        assert_eq!(super::asked_version(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(super::asked_version(br#"{"cniVersion":"0.1.0"}"#), "1.1.0");
        assert_eq!(super::asked_version(b""), "1.1.0");
    }
}
