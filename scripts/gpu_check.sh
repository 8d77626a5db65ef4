#!/usr/bin/env bash
# GPU checks, run on a lent GPU machine over a copy of the tree with the x86-64
# `sana` binary carried in .carry/ (and diffusers wheels in .whl/ when the
# machine's Python lacks diffusers). Writes logs under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TORCH_LIB
python3 -c 'import torch;print("torch", torch.__version__, "cuda", torch.version.cuda)'
if ! python3 -c 'import diffusers' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
SANA=.carry/sana
CHECKS=${GPU_CHECKS:-transformer pipeline}
set -x
if [[ " $CHECKS " == *" transformer "* ]]; then
# 1. CUDA is visible to our binary (libtorch_cuda linked) and sampling runs in bf16.
$SANA sample --device cuda --steps 20 --out "$OUT/sample"
# 2. SANA-1.6B-sized transformer, random weights, bf16, 1024x1024 (32x32 latents), 300 caption tokens.
for b in 1 2; do
    $SANA bench-forward --device cuda --dtype bf16 --batch $b --latent-size 32 --warmup 3 --iters 20 --backward
    python3 scripts/bench/forward_diffusers.py configs/models/sana-1600m-1024px-transformer.json $b 32 300 bf16 3 20 --backward
done
# 3. The parity tests' models on the GPU in fp32 (cuda kernels vs CPU reference) via `sana forward`.
for d in .carry/parity/transformer_*; do
    case=$(basename "$d")
    dtype=fp32; [[ $case == *bf16 ]] && dtype=bf16
    $SANA forward --device cuda --dtype $dtype --model "$d/model" --inputs "$d/inputs.safetensors" --out "$OUT/$case.safetensors" \
      && python3 -c "
import sys; from safetensors.torch import load_file
a = load_file('$OUT/$case.safetensors')['sample'].float(); b = load_file('$d/outputs.safetensors')['sample'].float()
print('$case cuda-vs-diffusers-cpu max abs err %.3e (output max %.3f)' % ((a - b).abs().max(), b.abs().max()))"
done
fi

if [[ " $CHECKS " == *" pipeline "* ]]; then
# 4. The tiny parity pipeline on the GPU (fp32) against diffusers' CPU images, same noise.
P=.carry/parity/pipeline_sana
python3 - "$P" <<'PY'
import sys
from safetensors.torch import load_file, save_file
d = sys.argv[1]
save_file({"noise": load_file(f"{d}/dpm_cfg.safetensors")["noise"]}, "/tmp/noise.safetensors")
PY
$SANA generate --device cuda --dtype fp32 --model $P/pipeline --prompt "a red fox in the snow" --prompt "Two cats playing chess, 4k" \
    --steps 6 --guidance-scale 4.5 --height 64 --width 96 --no-resolution-binning --init-noise /tmp/noise.safetensors \
    --save-latents "$OUT/gpu_latents.safetensors" --out "$OUT/gpu_pipeline.png"
python3 -c "
from safetensors.torch import load_file
a = load_file('$OUT/gpu_latents.safetensors')['latents']; b = load_file('$P/dpm_cfg.safetensors')['latents']
print('pipeline dpm_cfg cuda-vs-diffusers-cpu latents max abs err %.3e' % (a - b).abs().max())"
# 5. SANA-1.6B-size pipeline (Gemma-2-2B, 1.6B transformer, DC-AE f32c32), random bf16 weights,
#    1024x1024, 20 DPM steps, CFG 4.5: sana-rl and diffusers in one run.
python3 scripts/bench/make_sana_1600m_pipeline.py /tmp/sana1600m
SANA_RL_ROOT=$PWD BENCH_PIPELINE_DIR=/tmp/sana1600m/pipeline BENCH_DEVICE=cuda BENCH_DTYPE=bf16 \
    BENCH_SIZE=1024 BENCH_STEPS=20 BENCH_BATCH=1 BENCH_WARMUP=1 BENCH_ITERS=3 BENCH_THREADS=8 .carry/bench_pipeline
fi
