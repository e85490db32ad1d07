//! `ferry`: the CNI bridge plugin binary. All logic lives in the library.

fn main() {
    ferry::cni::skel::main(ferry::plugin::ABOUT, ferry::plugin::run)
}
