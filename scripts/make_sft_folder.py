#!/usr/bin/env python3
"""Writes a small SFT image folder in Cosmos-RL's local format: OUT/<i>.json
({"prompt": ...}) beside OUT/<i>.png (or .jpg): smooth colour gradients with
prompts naming their colours, so a flow-matching model has something to learn.

Usage: make_sft_folder.py OUT_DIR [N] [SIZE]
"""
import json
import pathlib
import sys

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 30), "green": (40, 180, 60), "blue": (30, 60, 210), "yellow": (230, 210, 40),
           "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (240, 240, 240), "black": (15, 15, 15)}


def main():
    out = pathlib.Path(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    out.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    ramp = np.linspace(0.0, 1.0, size)[None, :, None]
    for i in range(n):
        a, b = names[i % len(names)], names[(i * 3 + 1) % len(names)]
        ca, cb = np.array(COLOURS[a], float), np.array(COLOURS[b], float)
        img = (ca * (1 - ramp) + cb * ramp) * np.ones((size, 1, 1))
        if i % 2:
            img = img.transpose(1, 0, 2)
        ext = "jpg" if i % 4 == 3 else "png"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(out / f"{i:03d}.{ext}")
        (out / f"{i:03d}.json").write_text(json.dumps({"prompt": f"a smooth gradient from {a} to {b}"}))
    print(json.dumps({"dir": str(out), "samples": n}))


if __name__ == "__main__":
    main()
