#!/usr/bin/env python3
"""diffusers' side of `sana bench-forward`: the same random-weight transformer
config, batch, latent size, caption length and dtype, timed the same way
(warm-up, then the mean over ITERS with device syncs). Prints one JSON line.

Usage: forward_diffusers.py CONFIG_JSON BATCH LATENT CAPTION_LEN DTYPE(bf16|fp32|fp16) WARMUP ITERS [--backward]
"""
import json
import sys
import time

import torch

from diffusers import SanaTransformer2DModel


def main() -> None:
    cfg_path, b, lat, cap, dtype, warmup, iters = sys.argv[1:8]
    backward = "--backward" in sys.argv[8:]
    b, lat, cap, warmup, iters = int(b), int(lat), int(cap), int(warmup), int(iters)
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = {k: v for k, v in json.load(open(cfg_path)).items() if not k.startswith("_")}
    model = SanaTransformer2DModel(**cfg).to(dev, dt)
    c = model.config
    x = torch.randn(b, c.in_channels, lat, lat, device=dev, dtype=dt)
    enc = torch.randn(b, cap, c.caption_channels, device=dev, dtype=dt)
    mask = torch.ones(b, cap, dtype=torch.int64, device=dev)
    t = torch.full((b,), 500.0, device=dev)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def fwd():
        with torch.no_grad():
            model(x, encoder_hidden_states=enc, timestep=t, encoder_attention_mask=mask, return_dict=False)

    def fwd_bwd():
        out = model(x, encoder_hidden_states=enc, timestep=t, encoder_attention_mask=mask, return_dict=False)[0]
        out.float().square().mean().backward()

    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    for name, fn in [("forward_ms", fwd)] + ([("forward_backward_ms", fwd_bwd)] if backward else []):
        for _ in range(warmup):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        res[name] = (time.perf_counter() - t0) / iters * 1e3
    print(json.dumps(res))


if __name__ == "__main__":
    main()
