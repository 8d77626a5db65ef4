#!/usr/bin/env python3
"""Loads what a sana-rl run exported with the real diffusers / PEFT and checks it
does something: a LoRA folder (adapter_config.json + adapter_model.safetensors +
pytorch_lora_weights.safetensors) through PeftModel.from_pretrained and
SanaPipeline.load_lora_weights, or a full-weight transformer/ folder through
SanaTransformer2DModel.from_pretrained. A SanaVideoPipeline's exports load into
SanaVideoTransformer3DModel / SanaVideoPipeline the same way. Each must load and
give a finite output that differs from the base model's on the same random inputs.

Usage: check_export_loads.py PIPELINE_DIR EXPORT_DIR
Prints one JSON line; exits 1 on a failure.
"""
import json
import sys

import torch
from diffusers import SanaPipeline, SanaTransformer2DModel, SanaVideoPipeline, SanaVideoTransformer3DModel
from peft import PeftModel


def run(model, cfg):
    g = torch.Generator().manual_seed(0)
    shape = (2, cfg.in_channels, 3, 8, 8) if isinstance(cfg.patch_size, (list, tuple)) else (2, cfg.in_channels, 8, 8)
    x = torch.randn(*shape, generator=g)
    enc = torch.randn(2, 5, cfg.caption_channels, generator=g)
    with torch.no_grad():
        return model(x, encoder_hidden_states=enc, timestep=torch.tensor([700.0, 300.0]), return_dict=False)[0]


def main():
    pipe_dir, export = sys.argv[1], sys.argv[2]
    import pathlib
    video = json.loads((pathlib.Path(pipe_dir) / "model_index.json").read_text())["_class_name"] == "SanaVideoPipeline"
    Transformer = SanaVideoTransformer3DModel if video else SanaTransformer2DModel
    Pipeline = SanaVideoPipeline if video else SanaPipeline
    base = Transformer.from_pretrained(pipe_dir, subfolder="transformer").eval()
    ref = run(base, base.config)
    outs = {}
    ex = pathlib.Path(export)
    if (ex / "transformer").is_dir():
        full = Transformer.from_pretrained(ex / "transformer", torch_dtype=torch.float32).eval()
        outs["diffusers_from_pretrained"] = run(full, full.config)
    else:
        peft = PeftModel.from_pretrained(Transformer.from_pretrained(pipe_dir, subfolder="transformer"), export).eval()
        outs["peft"] = run(peft, base.config)
        pipe = Pipeline.from_pretrained(pipe_dir)
        pipe.load_lora_weights(export, weight_name="pytorch_lora_weights.safetensors")
        outs["diffusers_load_lora_weights"] = run(pipe.transformer.eval(), base.config)
    report = {k: {"finite": bool(torch.isfinite(v).all()), "diff_vs_base": float((v - ref).abs().max())}
              for k, v in outs.items()}
    if "peft" in outs:
        report["peft_vs_diffusers"] = float((outs["peft"] - outs["diffusers_load_lora_weights"]).abs().max())
    print(json.dumps(report))
    ok = all(r["finite"] and r["diff_vs_base"] > 0 for k, r in report.items() if isinstance(r, dict))
    ok = ok and report.get("peft_vs_diffusers", 0.0) < 1e-4
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
