#!/usr/bin/env python3
"""Writes a random-weight SANA pipeline (diffusers `save_pretrained` layout) to
OUT_DIR/pipeline, built by diffusers/transformers themselves: the demo's model
and the pipeline benchmark's. No weights are downloaded.

Usage: make_random_pipeline.py OUT_DIR [tiny|mid]
  tiny  Gemma-2 4×32, transformer 2×16, DC-AE f8c4 (seconds on a CPU)
  mid   Gemma-2 4×256, transformer 4×512, DC-AE f8c32 (the benchmark size)
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "parity"))
import pipeline  # noqa: E402

if len(sys.argv) not in (2, 3) or (sys.argv[2:] and sys.argv[2] not in ("tiny", "mid")):
    sys.exit(__doc__)
out = pathlib.Path(sys.argv[1])
pipeline.build_pipeline(out, seed=7, mid=sys.argv[2:] == ["mid"])
print(json.dumps({"pipeline": str(out / "pipeline")}))
