//! ferryctl: see [`ferryd::ctl`].

fn main() -> std::process::ExitCode {
    ferryd::ctl::main()
}
