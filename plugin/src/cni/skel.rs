//! The process edge every CNI plugin binary shares: read env and stdin,
//! dispatch, print the result or the error JSON, pick the exit code.

use std::io::{Read, Write};

use super::env::CniEnv;
use super::error::{CniError, CniResult, Code};
use super::version::{version_json, LATEST};

/// Run a plugin. `about` is printed for humans who run the binary by hand
/// (no CNI_COMMAND); `run` returns what goes to stdout on success.
pub fn main(about: &str, run: fn(&CniEnv, &[u8]) -> CniResult<Option<String>>) -> ! {
    init_process();
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

/// What std's runtime does before `main` and a plugin relies on, for
/// binaries that skip it (`#![no_main]`); harmless when it already ran.
/// Closed standard descriptors are reopened on /dev/null, so that no socket
/// or file of ours becomes stdout; SIGPIPE is ignored, so that a runtime
/// closing our stdout early gets an exit code rather than a signal death.
fn init_process() {
    // SAFETY: poll on a local array; open/signal have no memory effects.
    unsafe {
        let mut fds = [0, 1, 2].map(|fd| libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        });
        if libc::poll(fds.as_mut_ptr(), 3, 0) != -1 {
            for p in fds {
                if p.revents & libc::POLLNVAL != 0
                    && libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) == -1
                {
                    libc::abort();
                }
            }
        }
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
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
