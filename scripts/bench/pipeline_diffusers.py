#!/usr/bin/env python3
"""diffusers' side of `cargo bench -p sana --bench pipeline`: images/second of
SanaPipeline loaded from PIPELINE_DIR, same prompts/size/steps/CFG as ours.
Prints one JSON line.

Usage: pipeline_diffusers.py PIPELINE_DIR THREADS HEIGHT WIDTH STEPS GUIDANCE BATCH WARMUP ITERS
"""
import json
import sys
import time

import torch

from diffusers import SanaPipeline


def main() -> None:
    d, threads, h, w, steps, cfg, batch, warmup, iters = sys.argv[1:10]
    torch.set_num_threads(int(threads))
    pipe = SanaPipeline.from_pretrained(d)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a lighthouse at dawn"] * int(batch)
    kw = dict(prompt=prompts, height=int(h), width=int(w), num_inference_steps=int(steps),
              guidance_scale=float(cfg), use_resolution_binning=False, output_type="pt")
    for _ in range(int(warmup)):
        pipe(**kw)
    t0 = time.perf_counter()
    for _ in range(int(iters)):
        pipe(**kw)
    dt = (time.perf_counter() - t0) / int(iters)
    print(json.dumps({"seconds_per_call": dt, "images_per_second": int(batch) / dt}))


if __name__ == "__main__":
    main()
