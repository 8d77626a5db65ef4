#!/usr/bin/env python3
"""diffusers' side of `cargo bench -p sana --bench pipeline`: images/second of
SanaPipeline loaded from PIPELINE_DIR, same prompts/size/steps/CFG as ours.
Prints one JSON line.

Usage: pipeline_diffusers.py PIPELINE_DIR THREADS HEIGHT WIDTH STEPS GUIDANCE BATCH WARMUP ITERS [DEVICE DTYPE]
"""
import json
import sys
import time

import torch

from diffusers import SanaPipeline


def main() -> None:
    d, threads, h, w, steps, cfg, batch, warmup, iters = sys.argv[1:10]
    device, dtype = (sys.argv[10:12] + ["cpu", "fp32"])[:2] if len(sys.argv) > 10 else ("cpu", "fp32")
    torch.set_num_threads(int(threads))
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    pipe = SanaPipeline.from_pretrained(d, torch_dtype=dt).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a lighthouse at dawn"] * int(batch)
    kw = dict(prompt=prompts, height=int(h), width=int(w), num_inference_steps=int(steps),
              guidance_scale=float(cfg), use_resolution_binning=False, output_type="pt")
    for _ in range(int(warmup)):
        pipe(**kw).images.cpu()
    t0 = time.perf_counter()
    for _ in range(int(iters)):
        pipe(**kw).images.cpu()  # read back to the host, as our side does
    sec = (time.perf_counter() - t0) / int(iters)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(json.dumps({"seconds_per_call": sec, "images_per_second": int(batch) / sec, "device": name}))


if __name__ == "__main__":
    main()
