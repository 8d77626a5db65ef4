#!/usr/bin/env python3
"""The diffusers side of `cargo bench -p sana --bench transformer`: times the
forward and forward+backward of a SanaTransformer2DModel loaded from MODEL_DIR on
the inputs in INPUTS (safetensors), and prints one JSON line of seconds per iteration.

Usage: transformer_diffusers.py MODEL_DIR INPUTS THREADS WARMUP ITERS
"""
import json
import sys
import time

import torch
from safetensors.torch import load_file

from diffusers import SanaTransformer2DModel


def main() -> None:
    model_dir, inputs_path, threads, warmup, iters = sys.argv[1:6]
    torch.set_num_threads(int(threads))
    model = SanaTransformer2DModel.from_pretrained(model_dir).float()
    x = load_file(inputs_path)
    kw = dict(
        hidden_states=x["hidden_states"],
        encoder_hidden_states=x["encoder_hidden_states"],
        timestep=x["timestep"],
        encoder_attention_mask=x["encoder_attention_mask"],
        return_dict=False,
    )

    def fwd():
        with torch.no_grad():
            model(**kw)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        out = model(**kw)[0]
        out.square().mean().backward()

    res = {}
    for name, fn in (("forward", fwd), ("forward_backward", fwd_bwd)):
        for _ in range(int(warmup)):
            fn()
        t0 = time.perf_counter()
        for _ in range(int(iters)):
            fn()
        res[name] = (time.perf_counter() - t0) / int(iters)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
