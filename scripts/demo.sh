#!/usr/bin/env bash
# The main job on its embedded default: a DiffusionNFT run, 20 steps on a tiny
# random-weight SANA pipeline (built once by diffusers into out/tiny-sana/pipeline,
# since no real weights can be downloaded here), rewarded by the embedded
# reward-service's jpeg_compressibility through the reward gateway. The controller
# starts every process itself; the run lands in out/runs/tiny-image-nft/<timestamp>/
# (metrics.jsonl, mm_data/ image grids, checkpoints/, safetensors/ the adapter).
# Extra args go to the controller (try --help, --dry-run, --max-steps N).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
log "building (release)"
cargo build --release -q --workspace --bins
PIPE=out/tiny-sana/pipeline
if [ ! -f "$PIPE/model_index.json" ]; then
    log "writing a tiny random-weight SANA pipeline to $PIPE"
    python scripts/make_random_pipeline.py out/tiny-sana tiny >/dev/null 2>&1
fi
exec ./target/release/controller --config configs/demo/tiny-image-nft.toml "$@"
