#!/usr/bin/env bash
# The main job on its embedded default: a DiffusionNFT run, 20 steps on a tiny
# random-weight SANA pipeline (built once by diffusers into out/tiny-sana/pipeline,
# since no real weights can be downloaded here), rewarded by the embedded
# reward-service's jpeg_compressibility through the reward gateway. The controller
# starts every process itself; the run lands in out/runs/tiny-image-nft/<timestamp>/
# (metrics.jsonl, mm_data/ image grids, checkpoints/, safetensors/ the adapter).
# `--video` (first argument) runs the same on a tiny random SanaVideoPipeline
# (configs/demo/tiny-video-nft.toml; rollouts logged as mp4).
# Other args go to the controller (try --help, --dry-run, --max-steps N).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
CONFIG=configs/demo/tiny-image-nft.toml
OUT=out/tiny-sana
KIND=tiny
if [ "${1:-}" = "--video" ]; then
    shift
    CONFIG=configs/demo/tiny-video-nft.toml
    OUT=out/tiny-sana-video
    KIND=video
fi
log "building (release)"
cargo build --release -q --workspace --bins
if [ ! -f "$OUT/pipeline/model_index.json" ]; then
    log "writing a tiny random-weight $KIND SANA pipeline to $OUT/pipeline"
    python scripts/make_random_pipeline.py "$OUT" "$KIND" >/dev/null 2>&1
fi
exec ./target/release/controller --config "$CONFIG" "$@"
