#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing, writes
# the diffusers parity references, checks formatting and lints, runs every test.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

# A one-off full build gains nothing from incremental state but ~20 GB of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
log "disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free before the build"

log "cargo fmt --check"
cargo fmt --all --check

log "parity references from diffusers (scripts/parity/make_reference.py)"
python scripts/parity/make_reference.py target/parity >/dev/null

log "cargo clippy -D warnings"
cargo clippy -q --workspace --all-targets -- -D warnings

log "binaries (the end-to-end tests in tests/ run them as a user does)"
cargo build -q --workspace --bins

log "tests"
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
# A missing reference fails the tests here instead of skipping.
export SANA_PARITY_REQUIRED=1 SANA_SLURM_REQUIRED=1
cargo nextest run --workspace --no-fail-fast "$@"
log "disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free, target/ is $(du -sh target | cut -f1)"
