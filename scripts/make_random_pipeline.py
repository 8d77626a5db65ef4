#!/usr/bin/env python3
"""Writes a random-weight SANA pipeline (diffusers `save_pretrained` layout) to
OUT_DIR/pipeline, built by diffusers/transformers themselves: the demo's model
and the pipeline benchmark's. No weights are downloaded.

Usage: make_random_pipeline.py OUT_DIR [tiny|mid|video]
  tiny   Gemma-2 4×32, transformer 2×16, DC-AE f8c4 (seconds on a CPU)
  mid    Gemma-2 4×256, transformer 4×512, DC-AE f8c32 (the benchmark size)
  video  a SanaVideoPipeline: Gemma-2 4×32, video transformer 2×24, Wan 2.1 VAE
         base 8, z 4 (time ×4, space ×8)
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "parity"))
import pipeline  # noqa: E402

if len(sys.argv) not in (2, 3) or (sys.argv[2:] and sys.argv[2] not in ("tiny", "mid", "video")):
    sys.exit(__doc__)
out = pathlib.Path(sys.argv[1])
if sys.argv[2:] == ["video"]:
    __import__("video").build_video_pipeline(out, seed=7)
else:
    pipeline.build_pipeline(out, seed=7, mid=sys.argv[2:] == ["mid"])
print(json.dumps({"pipeline": str(out / "pipeline")}))
