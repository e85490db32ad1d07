//! `ferry-ipam`: the CNI IPAM plugin binary. All logic lives in the library;
//! the shared skeleton prints only the result or the error object on stdout.

const ABOUT: &str = concat!(
    "CNI ferry-ipam plugin v",
    env!("CARGO_PKG_VERSION"),
    " — host-local compatible IPAM; CNI spec 0.3.0–1.1.0"
);

fn main() {
    ferry::cni::skel::main(ABOUT, ferry::ipam::run)
}
