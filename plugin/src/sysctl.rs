//! Network sysctls of the calling thread's namespace. /proc/sys/net shows
//! the namespace of whoever opens the file, so call this where you stand.

use std::io;

/// Set `/proc/sys/net/<path>`; no write when it already holds `value`.
pub fn set_net(path: &str, value: &str) -> io::Result<()> {
    let full = format!("/proc/sys/net/{path}");
    if std::fs::read_to_string(&full)?.trim() == value {
        return Ok(());
    }
    std::fs::write(full, value)
}
