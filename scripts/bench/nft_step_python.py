#!/usr/bin/env python3
"""The Python side of `cargo bench -p sana --bench nft_step`: times Cosmos-RL's
DiffusionNFT training step (scripts/parity/nft_step.py's `step_training`, the code
the parity check holds sana-rl to) on a SanaTransformer2DModel from MODEL_DIR with
PEFT adapters "default" and "old", on the batch in BATCH, and prints one JSON line
of seconds per step.

Usage: nft_step_python.py MODEL_DIR BATCH CONFIG_JSON THREADS WARMUP ITERS
  CONFIG_JSON  the step config (nft_step.py's keys) plus `lora` (LoraConfig kwargs)
"""
import json
import pathlib
import sys
import time

import torch
from peft import LoraConfig
from safetensors.torch import load_file

from diffusers import SanaTransformer2DModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "parity"))
from nft_step import named, step_training  # noqa: E402


def main() -> None:
    model_dir, batch_path, config_path, threads, warmup, iters = sys.argv[1:7]
    torch.set_num_threads(int(threads))
    c = json.loads(pathlib.Path(config_path).read_text())
    model = SanaTransformer2DModel.from_pretrained(model_dir).float()
    for name in ("default", "old"):
        model.add_adapter(LoraConfig(**c["lora"]), adapter_name=name)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.set_adapter("default")
    params = [p for _, p in named(model, "default")]
    opt = torch.optim.AdamW(params, lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"],
                            weight_decay=c["weight_decay"], foreach=True)
    ema = dict(decay=c["ema"][0], interval=c["ema"][1], params=[p.detach().clone() for p in params])
    batch = load_file(batch_path)
    for step in range(1, int(warmup) + 1):
        step_training(model, batch, c, step, opt, ema, None)
    t0 = time.perf_counter()
    for step in range(int(warmup) + 1, int(warmup) + int(iters) + 1):
        step_training(model, batch, c, step, opt, ema, None)
    print(json.dumps({"step": (time.perf_counter() - t0) / int(iters)}))


if __name__ == "__main__":
    main()
