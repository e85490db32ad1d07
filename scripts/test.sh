#!/usr/bin/env bash
# ferry's test command: installs what the tests need, checks formatting and
# lints, builds everything and runs unit and end-to-end tests (as root: the
# end-to-end tests build hosts and pods out of network namespaces they make).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
ferry_install_deps
# A test that cannot run here fails instead of passing as "skipped"
# (tests/src/lib.rs, `skip`): a green run has run every test.
export FERRY_REQUIRE_ALL=1
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build"
cargo build --workspace --locked
echo "==> cargo test"
cargo test --workspace --locked -- --test-threads="${FERRY_TEST_THREADS:-4}"
