#!/usr/bin/env bash
# ferry's test command: installs what the tests need, checks formatting and
# lints, builds everything and runs unit and end-to-end tests (as root: the
# end-to-end tests build hosts and pods out of network namespaces they make).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ferry_install_deps
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build"
cargo build --workspace --locked
echo "==> cargo test"
cargo test --workspace --locked -- --test-threads="${FERRY_TEST_THREADS:-4}"
