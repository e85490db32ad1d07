//! `ferry`: the CNI bridge plugin binary. All logic lives in the library.
//!
//! `no_main`: the plugin starts once per pod, and std's runtime set-up
//! (stack-overflow handler: a sigaltstack and a read of /proc/self/maps) is
//! start-up time it does not need. `cni::skel::main` does the rest of that
//! set-up itself.
#![no_main]

#[no_mangle]
extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    ferry::cni::skel::main(ferry::plugin::ABOUT, ferry::plugin::run)
}
