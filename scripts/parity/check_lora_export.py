#!/usr/bin/env python3
"""Loads a LoRA adapter that sana-rl exported (PEFT folder + diffusers file in one
folder) with the real PEFT and diffusers, and checks that the transformer output
equals the reference of a lora.py case. Run by the Rust test
`lora::tests::export_loads_in_peft_and_diffusers`.

Usage: check_lora_export.py CASE_DIR EXPORT_DIR [TOL [EXPECTED]]
  CASE_DIR    OUT_DIR/lora_<case> written by lora.py (model/, inputs, outputs)
  EXPORT_DIR  adapter_config.json + adapter_model.safetensors + pytorch_lora_weights.safetensors
  EXPECTED    outputs to compare with instead of CASE_DIR/outputs.safetensors (`active`, `scaled`;
              sana-rl's own outputs for an adapter it trained)
Exits 1 (printing the errors) when an output differs by more than TOL (default 1e-4).
"""

import json
import pathlib
import sys

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers import SanaPipeline, SanaTransformer2DModel


def run(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, return_dict=False, **kw)[0]


def main():
    case, export = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    tol = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-4
    inputs = load_file(str(case / "inputs.safetensors"))
    expected = load_file(sys.argv[4] if len(sys.argv) > 4 else str(case / "outputs.safetensors"))
    reference = json.loads((case / "case.json").read_text())
    failures = []

    def compare(what, got, key):
        err = float((got - expected[key]).abs().max())
        print(f"{what}: max abs err {err:.3e} vs {key}")
        if not err <= tol:
            failures.append(f"{what}: {err:e} > {tol:e}")

    # PEFT: PeftModel.from_pretrained on the base transformer.
    base = SanaTransformer2DModel.from_pretrained(case / "model")
    peft_model = PeftModel.from_pretrained(base, export).eval()
    compare("PEFT PeftModel.from_pretrained", run(peft_model, inputs), "active")
    compare("PEFT, scale via attention_kwargs", run(peft_model, inputs, attention_kwargs={"scale": reference["scale"]}),
            "scaled")
    modules = {n: (m.r["default"], m.scaling["default"]) for n, m in peft_model.base_model.model.named_modules()
               if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})}
    want = {n: (v["r"], v["scaling"]) for n, v in reference["modules"].items()}
    if modules != want:
        failures.append(f"PEFT built different LoRA modules: {sorted(set(modules.items()) ^ set(want.items()))[:4]}")

    # diffusers: SanaPipeline.load_lora_weights (adapter config from the safetensors metadata).
    with safe_open(str(export / "pytorch_lora_weights.safetensors"), "pt") as f:
        if "lora_adapter_metadata" not in (f.metadata() or {}):
            failures.append("pytorch_lora_weights.safetensors has no lora_adapter_metadata")
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None,
                        transformer=SanaTransformer2DModel.from_pretrained(case / "model"), scheduler=None)
    pipe.load_lora_weights(export, weight_name="pytorch_lora_weights.safetensors")
    pipe.transformer.eval()  # the injected dropout modules start in train mode
    compare("diffusers load_lora_weights", run(pipe.transformer, inputs), "active")

    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
