#!/usr/bin/env bash
# The main job on its embedded default. Today: text to image with `sana generate`
# on a tiny random-weight SANA pipeline (Gemma-2 text encoder, SANA transformer,
# DC-AE; built once by diffusers into out/tiny-sana/pipeline, since no real weights
# can be downloaded here), 20 DPM-Solver++ steps with CFG 4.5, writing
# out/generate/image_<i>.png. Extra args go to `sana generate` (try --help).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
log "building (release)"
cargo build --release -q -p sana --bin sana
PIPE=out/tiny-sana/pipeline
if [ ! -f "$PIPE/model_index.json" ]; then
    log "writing a tiny random-weight SANA pipeline to $PIPE"
    python scripts/make_random_pipeline.py out/tiny-sana tiny >/dev/null 2>&1
fi
exec ./target/release/sana generate --model "$PIPE" \
    --prompt "a red fox in the snow, golden hour" --prompt "a lighthouse on a cliff" \
    --height 256 --width 256 --no-resolution-binning --seed 0 --out out/generate "$@"
