//! `ferry-ipam`: the CNI IPAM plugin binary. All logic lives in the library;
//! the shared skeleton prints only the result or the error object on stdout.
//! `no_main` for start-up time, as in `ferry`.
#![no_main]

const ABOUT: &str = concat!(
    "CNI ferry-ipam plugin v",
    env!("CARGO_PKG_VERSION"),
    " — host-local compatible IPAM; CNI spec 0.3.0–1.1.0"
);

#[no_mangle]
extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    ferry::cni::skel::main(ABOUT, ferry::ipam::run)
}
