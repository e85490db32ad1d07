//! Diagnostics: to the config's `logFile` when set, else stderr. Never
//! stdout, which carries only the result or the error.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

static LOG_FILE: OnceLock<Option<std::fs::File>> = OnceLock::new();

/// Choose the destination once; later calls keep the first choice.
pub fn init(path: Option<&Path>) {
    LOG_FILE.get_or_init(|| {
        path.and_then(|p| OpenOptions::new().create(true).append(true).open(p).ok())
    });
}

pub fn warn(msg: impl std::fmt::Display) {
    let line = format!("ferry[{}]: {msg}\n", std::process::id());
    match LOG_FILE.get() {
        Some(Some(f)) => {
            let mut f = f;
            let _ = f.write_all(line.as_bytes());
        }
        _ => {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}
