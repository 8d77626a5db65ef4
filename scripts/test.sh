#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what is missing, writes
# the diffusers parity references, checks formatting and lints, runs every test.
#
#   scripts/test.sh [--cpu-capability default|avx2|avx512] [cargo-nextest args…]
#
# --cpu-capability (or ATEN_CPU_CAPABILITY in the environment) picks libtorch's
# CPU kernels for the Python references and every test process alike: they
# round differently (even randn streams differ), so each setting writes and
# checks its own references, target/parity-<setting>. Unset: the CPU's best.
if [ "${1:-}" = "--cpu-capability" ]; then
    export ATEN_CPU_CAPABILITY="${2:?--cpu-capability needs default, avx2 or avx512}"
    shift 2
fi
case "${ATEN_CPU_CAPABILITY:-}" in
    "" | default | avx2 | avx512) ;;
    *) echo "ATEN_CPU_CAPABILITY=$ATEN_CPU_CAPABILITY: expected default, avx2 or avx512" >&2; exit 2 ;;
esac
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

# A one-off full build gains nothing from incremental state but ~20 GB of disk.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
log "disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free before the build"

log "cargo fmt --check"
cargo fmt --all --check

export SANA_PARITY_DIR="$SANA_RL_ROOT/target/parity${ATEN_CPU_CAPABILITY:+-$ATEN_CPU_CAPABILITY}"
log "CPU kernels: $(python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())') (ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-unset})"
log "parity references from diffusers (scripts/parity/make_reference.py → ${SANA_PARITY_DIR#"$SANA_RL_ROOT/"})"
python scripts/parity/make_reference.py "$SANA_PARITY_DIR" >/dev/null

log "cargo clippy -D warnings"
cargo clippy -q --workspace --all-targets -- -D warnings

log "binaries (the end-to-end tests in tests/ run them as a user does)"
cargo build -q --workspace --bins

log "tests"
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
# The Slurm test needs the one-node cluster env.sh installs: required here.
export SANA_SLURM_REQUIRED=1
# Profile `errors` (.config/nextest.toml) keeps each test's output, so that the
# worst error every parity test printed can be listed per CPU-kernel setting.
status=0
cargo nextest run --workspace --no-fail-fast --profile errors "$@" || status=$?
junit="target/nextest/errors/junit-${ATEN_CPU_CAPABILITY:-native}.xml"
if [ -f target/nextest/errors/junit.xml ]; then
    cp target/nextest/errors/junit.xml "$junit"
    python scripts/parity/error_table.py "$junit" > "${junit%.xml}.md"
    log "worst error per test: ${junit%.xml}.md (all settings run so far: python scripts/parity/error_table.py target/nextest/errors/junit-*.xml)"
fi
log "disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free, target/ is $(du -sh target | cut -f1)"
exit "$status"
