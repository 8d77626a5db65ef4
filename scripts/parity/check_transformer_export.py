#!/usr/bin/env python3
"""Loads a full-weight transformer folder that sana-rl exported with diffusers'
SanaTransformer2DModel.from_pretrained (single file or sharded index) and checks
its output against sana-rl's own output for the same inputs. Run by the Rust test
`models::transformers::sana_transformer::tests::full_weight_export_loads_in_diffusers`.

Usage: check_transformer_export.py EXPORT_DIR INPUTS EXPECTED TOL
  INPUTS    safetensors with hidden_states, encoder_hidden_states, encoder_attention_mask, timestep
  EXPECTED  safetensors with `sample`: sana-rl's output of the exported weights (fp32 compute)
Exits 1 when the max abs difference exceeds TOL.
"""
import sys

import torch
from safetensors.torch import load_file

from diffusers import SanaTransformer2DModel


def main():
    export_dir, inputs_path, expected_path, tol = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    model = SanaTransformer2DModel.from_pretrained(export_dir, torch_dtype=torch.float32).eval()
    inputs = load_file(inputs_path)
    with torch.no_grad():
        got = model(**inputs, return_dict=False)[0]
    want = load_file(expected_path)["sample"]
    err = (got - want).abs().max().item()
    print(f"{export_dir}: diffusers from_pretrained output vs sana-rl max abs err {err:.3e} (tol {tol:g})")
    sys.exit(0 if err <= tol else 1)


if __name__ == "__main__":
    main()
