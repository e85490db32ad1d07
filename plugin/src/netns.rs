//! Network namespaces: check that a path really is one, and enter it for a
//! moment with a guard that always returns.
//!
//! The plugin is single-threaded, so `setns` on the main thread is safe; the
//! guard restores the original namespace on every path, errors included.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;

use nix::sched::{setns, CloneFlags};

use crate::cni::{CniError, CniResult, Code};

const NSFS_MAGIC: i64 = 0x6e73_6673;
// ioctl(NS_GET_NSTYPE) = _IO(0xb7, 0x3)
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// An open network namespace.
pub struct Netns {
    file: File,
}

impl Netns {
    /// Open a container's namespace: `path` must be a network namespace and
    /// not our own. Missing means the container is unknown (code 3).
    pub fn open_for_container(path: &str) -> CniResult<Netns> {
        let refused = |why: String| CniError::new(Code::InvalidEnv, why);
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CniError::new(
                    Code::UnknownContainer,
                    format!("network namespace {path} does not exist"),
                ))
            }
            Err(e) => return Err(refused(format!("cannot open {path}: {e}"))),
        };
        let fs = nix::sys::statfs::fstatfs(file.as_fd())
            .map_err(|e| refused(format!("statfs {path}: {e}")))?;
        // SAFETY: the ioctl takes no argument and only reads the fd's type.
        let nstype = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
        if fs.filesystem_type().0 as i64 != NSFS_MAGIC || nstype != libc::CLONE_NEWNET {
            return Err(refused(format!("{path} is not a network namespace")));
        }
        let own = std::fs::metadata("/proc/thread-self/ns/net")
            .map_err(|e| refused(format!("cannot read own namespace: {e}")))?;
        let theirs = file
            .metadata()
            .map_err(|e| refused(format!("stat {path}: {e}")))?;
        if (own.dev(), own.ino()) == (theirs.dev(), theirs.ino()) {
            return Err(refused(format!(
                "{path} is the plugin's own network namespace, not a container's"
            )));
        }
        Ok(Netns { file })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Run `f` inside this namespace and come back, whatever `f` returns.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> CniResult<T> {
        let home = File::open("/proc/thread-self/ns/net")
            .map_err(|e| CniError::new(Code::Io, "cannot open own namespace").with_details(e))?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            CniError::new(Code::Io, "cannot enter the container's namespace").with_details(e)
        })?;
        let _back = Return(home);
        Ok(f())
    }
}

struct Return(File);

impl Drop for Return {
    fn drop(&mut self) {
        // Failing to return would run the rest of the plugin in the pod's
        // namespace: abort rather than do that.
        if setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
            eprintln!("ferry: cannot return to the host network namespace");
            std::process::abort();
        }
    }
}
