#!/usr/bin/env bash
# The main job on its embedded default. Today: sample latents from a tiny
# random-weight SANA transformer (DPM-Solver++, 20 steps, CFG 4.5) and write
# out/sample/latents.safetensors plus a preview PNG. Extra args go to `sana sample`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
log "building (release)"
cargo build --release -q -p sana --bin sana
exec ./target/release/sana sample "$@"
