#!/usr/bin/env python3
"""Peer of sana/benches/wan_vae.rs: diffusers' AutoencoderKLWan (Wan 2.1, the
SANA-Video 480p VAE, default config, random weights) decoding latents of each
frame count, with its time and the peak extra resident memory of the decode.
Writes the VAE to OUT/vae for the Rust side to load the same weights.

Usage: wan_vae_python.py OUT HEIGHT WIDTH LATENT_FRAMES[,..] THREADS
Prints one JSON line: {"<T>": {"seconds": s, "peak_mb": m, "frames": n}}.
"""
import json
import pathlib
import sys
import time

import torch
from diffusers import AutoencoderKLWan


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024.0  # MB
    return 0.0


def main():
    out, h, w, ts, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = AutoencoderKLWan().eval()
    d = pathlib.Path(out) / "vae"
    if not (d / "config.json").exists():
        vae.save_pretrained(d, safe_serialization=True)
    res = {}
    for t in (int(x) for x in ts.split(",")):
        z = torch.randn(1, vae.config.z_dim, t, h // 8, w // 8, generator=torch.Generator().manual_seed(t))
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to now
        base = status("VmRSS")
        t0 = time.perf_counter()
        with torch.no_grad():
            video = vae.decode(z).sample
        secs = time.perf_counter() - t0
        res[str(t)] = {"seconds": secs, "peak_mb": status("VmHWM") - base, "frames": video.shape[2]}
        del video
    print(json.dumps(res))


if __name__ == "__main__":
    main()
