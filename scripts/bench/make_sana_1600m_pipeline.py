#!/usr/bin/env python3
"""Writes a random-weight SANA pipeline at published size (SANA 1.6B 1024px
transformer, Gemma-2-2B text encoder, DC-AE f32c32) in bf16 to OUT_DIR/pipeline,
for GPU timing (scripts/gpu_check.sh). The tokenizer is the small Gemma-style one
of the parity harness (no downloads); ids stay inside Gemma's vocabulary.

Usage: make_sana_1600m_pipeline.py OUT_DIR
"""
import json
import pathlib
import sys

import torch
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "parity"))
import dc_ae  # noqa: E402
import pipeline  # noqa: E402
import text_encoder  # noqa: E402

GEMMA_2_2B = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=8192,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    text_encoder.build_tokenizer(out / "tok")
    tokenizer = GemmaTokenizerFast.from_pretrained(out / "tok")
    tokenizer.padding_side = "right"
    with torch.device(dev):
        te = Gemma2Model(Gemma2Config(**GEMMA_2_2B)).to(torch.bfloat16)
        vae = AutoencoderDC(**dc_ae.SANA_FULL).to(torch.bfloat16)
        cfg = json.loads((ROOT / "configs/models/sana-1600m-1024px-transformer.json").read_text())
        transformer = SanaTransformer2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        transformer = transformer.to(torch.bfloat16)
    scheduler = DPMSolverMultistepScheduler(**pipeline.SANA_SCHEDULER)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=te, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(out / "pipeline")
    print(json.dumps({"pipeline": str(out / "pipeline")}))


if __name__ == "__main__":
    main()
