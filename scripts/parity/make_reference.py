#!/usr/bin/env python3
"""Parity harness: builds tiny random-weight SANA models and scheduler traces with
diffusers (pinned in scripts/requirements.txt), saves them with `save_pretrained`,
and writes inputs and diffusers' outputs for the Rust tests to compare against.

Usage: make_reference.py OUT_DIR   (the test command uses target/parity[-<ATEN_CPU_CAPABILITY>])

Layout written:
  OUT_DIR/transformer_<case>/model/            config.json + diffusion_pytorch_model.safetensors
  OUT_DIR/transformer_<case>/inputs.safetensors  hidden_states, encoder_hidden_states,
                                                 encoder_attention_mask, timestep[, guidance]
  OUT_DIR/transformer_<case>/outputs.safetensors sample (diffusers' output, same dtype as case)
  OUT_DIR/scheduler_<case>/...                   see schedulers.py
"""

import json
import os
import pathlib
import sys

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import SanaTransformer2DModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import schedulers  # noqa: E402

EXPECTED_DIFFUSERS = "0.42.1"
EXPECTED_TORCH = "2.11.0"

# One tiny config per published family (shapes shrunk, options kept).
BASE = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=8,
    cross_attention_dim=16,
    caption_channels=12,
    mlp_ratio=2.5,
    sample_size=8,
    patch_size=1,
)

CASES = {
    # SANA 1.0 (600M/1.6B, 512/1024px): no qk-norm, no position embedding.
    "sana10": dict(config=dict(BASE), latent=(6, 10), batch=2, seq=7),
    # SANA 1.0 2K/4K style: sin-cos position embedding, patch size 2, non-square grid.
    "sana10_pe": dict(
        config=dict(BASE, interpolation_scale=1.0, patch_size=2, sample_size=8),
        latent=(8, 12), batch=2, seq=5,
    ),
    # SANA 1.5 (1.6B/4.8B): RMSNorm across heads on q/k, affine norm2.
    "sana15": dict(
        config=dict(BASE, qk_norm="rms_norm_across_heads", num_layers=3, norm_elementwise_affine=True),
        latent=(10, 6), batch=3, seq=9,
    ),
    # SANA-Sprint: guidance embedding, timestep/guidance scales in the config.
    "sprint": dict(
        config=dict(BASE, guidance_embeds=True, guidance_embeds_scale=0.1, timestep_scale=1000.0,
                    qk_norm="rms_norm_across_heads"),
        latent=(4, 4), batch=2, seq=6, guidance=True,
    ),
    # The same SANA 1.5 model in bfloat16 (looser tolerance, see the Rust test).
    "sana15_bf16": dict(
        config=dict(BASE, qk_norm="rms_norm_across_heads", norm_elementwise_affine=True),
        latent=(6, 8), batch=2, seq=7, dtype=torch.bfloat16,
    ),
}


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Default init leaves norms at 1/0; perturb every parameter so that a
    mis-wired or unloaded weight changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def write_transformer_case(out: pathlib.Path, name: str, case: dict, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(**case["config"]).eval()
    randomize_(model, gen)
    dtype = case.get("dtype", torch.float32)
    d = out / f"transformer_{name}"
    model.save_pretrained(d / "model", safe_serialization=True)
    model = model.to(dtype)

    cfg = model.config
    b, (h, w), seq = case["batch"], case["latent"], case["seq"]
    hidden = torch.randn(b, cfg.in_channels, h, w, generator=gen)
    enc = torch.randn(b, seq, cfg.caption_channels, generator=gen)
    mask = torch.ones(b, seq, dtype=torch.int64)
    for i in range(1, b):  # padded captions: row i keeps seq - 2i tokens
        mask[i, max(1, seq - 2 * i):] = 0
    timestep = torch.linspace(999.0, 1.5, b)
    inputs = dict(hidden_states=hidden, encoder_hidden_states=enc, encoder_attention_mask=mask, timestep=timestep)
    kwargs = {}
    if case.get("guidance"):
        inputs["guidance"] = torch.linspace(0.45, 0.2, b)
        kwargs["guidance"] = inputs["guidance"]
    with torch.no_grad():
        sample = model(
            hidden_states=hidden.to(dtype),
            encoder_hidden_states=enc.to(dtype),
            timestep=timestep,
            encoder_attention_mask=mask,
            return_dict=False,
            **kwargs,
        )[0]
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(d / "inputs.safetensors"))
    save_file({"sample": sample.contiguous()}, str(d / "outputs.safetensors"))
    (d / "case.json").write_text(json.dumps({"dtype": str(dtype).replace("torch.", "")}))


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    if diffusers.__version__ != EXPECTED_DIFFUSERS or not torch.__version__.startswith(EXPECTED_TORCH):
        sys.exit(f"need diffusers {EXPECTED_DIFFUSERS} and torch {EXPECTED_TORCH}, "
                 f"have {diffusers.__version__} / {torch.__version__}")
    torch.set_num_threads(1)
    out = pathlib.Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    # Written last, so that references cut short by a failure are never taken as complete.
    (out / "capability.json").unlink(missing_ok=True)
    for i, (name, case) in enumerate(CASES.items()):
        write_transformer_case(out, name, case, seed=1000 + i)
        print(f"transformer_{name}: ok")
    schedulers.write_scheduler_cases(out)
    __import__("dc_ae").write_dc_ae_cases(out)  # scripts/parity/dc_ae.py (DC-AE encode/decode)
    __import__("text_encoder").write_text_encoder_cases(out)
    __import__("training").write_training_cases(out)  # scripts/parity/training.py (NFT loss)
    __import__("nft_step").write_nft_step_cases(out)  # scripts/parity/nft_step.py (whole NFT steps, PEFT)
    __import__("solvers").write_solver_cases(out)  # scripts/parity/solvers.py (DiffusionNFT's rollout solvers)
    __import__("sft_step").write_sft_step_cases(out)  # scripts/parity/sft_step.py (SFT steps, full and LoRA)
    __import__("pipeline").write_pipeline_cases(out)  # scripts/parity/pipeline.py (full SanaPipeline)
    __import__("lora").write_lora_cases(out)  # scripts/parity/lora.py (PEFT / diffusers LoRA)
    __import__("video").write_video_cases(out)  # scripts/parity/video.py (SANA-Video transformer)
    __import__("video").write_wan_vae_cases(out)  # scripts/parity/video.py (Wan 2.1 VAE)
    __import__("video").write_video_pipeline_cases(out)  # scripts/parity/video.py (SanaVideoPipeline)
    # The Rust tests refuse references written under other CPU kernels than theirs.
    (out / "capability.json").write_text(json.dumps({
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", ""),
        "torch_reports": torch.backends.cpu.get_cpu_capability(),
    }))
    print(f"parity references written to {out}")


if __name__ == "__main__":
    main()
