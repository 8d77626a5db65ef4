#!/usr/bin/env python3
"""Text-encoder parity references for sana/src/models/text_encoders (Gemma-2) and
sana/src/pipelines/text_encoding.rs (tokenizer + SanaPipeline.encode_prompt).

Usage: text_encoder.py OUT_DIR   (make_reference.py calls write_text_encoder_cases(OUT_DIR))

Everything is built offline: a Gemma-style BPE tokenizer (Gemma's special-token ids, byte
fallback, the "▁" space normalizer) is trained here on a small corpus and wrapped in
transformers' GemmaTokenizerFast; a tiny random Gemma-2 (GQA, head_dim != hidden/heads,
alternating sliding-window/global layers with a 4-token window, attention soft-capping)
is saved with `save_pretrained` and reloaded with `from_pretrained`, as SanaPipeline does.

Layout written, one folder per case:
  OUT_DIR/text_encoder_<case>/tokenizer/        GemmaTokenizerFast.save_pretrained
  OUT_DIR/text_encoder_<case>/text_encoder/     Gemma2Model (or Gemma2ForCausalLM) save_pretrained
  OUT_DIR/text_encoder_<case>/case.json         {"dtype", "encode": [{name, prompts, negative_prompt,
                                                 num_images_per_prompt, max_sequence_length,
                                                 complex_human_instruction ("default" | null | [..]),
                                                 do_classifier_free_guidance}]}
  OUT_DIR/text_encoder_<case>/encode_<name>.safetensors
      prompt_input_ids, prompt_tokenizer_mask, prompt_last_hidden_state   what diffusers fed the text
                                                                          encoder and what it returned
      negative_input_ids, negative_tokenizer_mask                         the same for the negative prompt
      prompt_embeds, negative_prompt_embeds,
      negative_prompt_attention_mask                                      SanaPipeline.encode_prompt's outputs
      prompt_attention_mask                                               its mask, repeated per prompt as
                                                                          the embeddings are (sana-rl)
      diffusers_prompt_attention_mask                                     its mask as diffusers tiles it
Cases: fp32 (Gemma2Model), bf16 (saved in bf16, loaded with dtype=bfloat16), causal_lm (saved from
Gemma2ForCausalLM, `model.`-prefixed keys, config.json rewritten in the transformers-4.x style of the
published SANA checkpoints: top-level rope_theta, no layer_types).
"""

import inspect
import json
import pathlib
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma2Model, GemmaTokenizerFast

from diffusers import SanaPipeline

# diffusers' default (SanaPipeline.__call__'s `complex_human_instruction`), read from its signature
# so that a diffusers change shows up as a parity failure instead of a stale copy here.
DEFAULT_CHI = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]

CORPUS = [
    "A cat sleeping on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "A busy city street at dusk, glowing street lamps, a crowd of people in colorful clothing.",
    "A double-decker bus passing by towering glass skyscrapers in the rain.",
    "a photo of an astronaut riding a horse on the moon, high quality, detailed",
    "blurry, low quality, watermark, text, deformed hands",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "portrait of a young woman with freckles, soft light, 85mm lens, shallow depth of field",
] + list(DEFAULT_CHI) * 3

PROMPTS = {
    "cat": "A cat sleeping on a warm sunny windowsill",
    "spaces": "  Leading and TRAILING spaces, UPPER Case \t",
    "empty": "",
    # Characters the corpus never saw go through byte fallback; "Σ" tests final-sigma lowercasing.
    "unicode": "Ein Café im Schnee — 雪の中のカフェ 🐱☕ ΟΔΟΣ",
    "special": "a <eos> token\tand\nnew lines",
    "long": "a photo of an astronaut riding a horse on the moon, " * 12 + "high quality, detailed",
}

# Tiny Gemma-2: GQA (4 query / 2 kv heads), head_dim 16 != hidden/heads, a 4-token sliding window,
# soft-capping low enough to bite with the randomised weights, a rope_theta that is not the default.
MODEL = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=20,
    sliding_window=4,
    attn_logit_softcapping=2.0,
    final_logit_softcapping=30.0,
    max_position_embeddings=1024,
    rope_parameters={"rope_type": "default", "rope_theta": 100.0},
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

ENCODE = [
    # SanaPipeline.__call__'s defaults: the instruction, 300 tokens, CFG with "".
    dict(name="chi_default", prompts=["cat", "spaces"], negative_prompt="", num_images_per_prompt=1,
         max_sequence_length=300, complex_human_instruction="default", do_classifier_free_guidance=True),
    # No instruction, a short max length (truncation), several images per prompt, a custom negative.
    dict(name="plain_trunc", prompts=["cat", "empty", "unicode", "special", "long"],
         negative_prompt="blurry, low quality", num_images_per_prompt=2, max_sequence_length=12,
         complex_human_instruction=None, do_classifier_free_guidance=True),
    # Instruction + prompt longer than the extended max length: truncation, then BOS + the last tokens.
    dict(name="chi_trunc", prompts=["long", "unicode"], negative_prompt="", num_images_per_prompt=1,
         max_sequence_length=20, complex_human_instruction="default", do_classifier_free_guidance=True),
    # A custom instruction, no guidance.
    dict(name="chi_custom_no_cfg", prompts=["special"], negative_prompt="", num_images_per_prompt=3,
         max_sequence_length=16, complex_human_instruction=["Describe:", "User Prompt: "],
         do_classifier_free_guidance=False),
]


def build_tokenizer(out: pathlib.Path) -> None:
    """A Gemma-style BPE: <pad>=0 <eos>=1 <bos>=2 <unk>=3, <0x00>..<0xFF> byte-fallback tokens,
    merges learnt on CORPUS; GemmaTokenizerFast rebuilds Gemma's normalizer/decoder around it."""
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    # Only for training: word pieces that start at "▁", as Gemma's vocabulary has them.
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=SPECIALS + byte_tokens, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS, trainer=trainer)
    spec = json.loads(trainer_tok.to_str())
    vocab = spec["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    assert [vocab[t] for t in SPECIALS[:4]] == [0, 1, 2, 3], "Gemma's special-token ids"
    tok = GemmaTokenizerFast(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    tok.save_pretrained(out)


def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Gemma's init leaves norms at 0 and projections tiny; give every parameter its own
    values, large enough that soft-capping and the sliding window change the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1.0 if "embed_tokens" in name else (0.3 if "norm" in name else 0.25)
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def legacy_config(path: pathlib.Path) -> None:
    """Rewrites a transformers-5 config.json the way the published SANA text encoders (saved with
    transformers 4.4x) spell it: top-level rope_theta, no layer_types/rope_parameters, torch_dtype."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg.pop("layer_types")
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["hidden_act"] = cfg["hidden_activation"]
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg["cache_implementation"] = "hybrid"
    cfg["eos_token_id"] = [1, 107]
    cfg["transformers_version"] = "4.42.4"
    path.write_text(json.dumps(cfg, indent=2))


def chi_arg(spec):
    return list(DEFAULT_CHI) if spec == "default" else spec


def write_case(out: pathlib.Path, name: str, dtype: torch.dtype, causal_lm: bool, seed: int) -> None:
    d = out / f"text_encoder_{name}"
    build_tokenizer(d / "tokenizer")
    tokenizer = GemmaTokenizerFast.from_pretrained(d / "tokenizer")

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=len(tokenizer), **MODEL)
    model = (Gemma2ForCausalLM if causal_lm else Gemma2Model)(config).eval()
    randomize_(model, gen)
    model.to(dtype).save_pretrained(d / "text_encoder")
    if causal_lm:
        legacy_config(d / "text_encoder" / "config.json")
        # SanaPipeline calls text_encoder(...)[0]: with a CausalLM that would be logits; SANA uses the base model.
        text_encoder = Gemma2ForCausalLM.from_pretrained(d / "text_encoder", dtype=dtype).model.eval()
    else:
        text_encoder = Gemma2Model.from_pretrained(d / "text_encoder", dtype=dtype).eval()
    assert text_encoder.config._attn_implementation == "eager"

    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None)

    calls = []

    def hook(_module, args, kwargs, output):
        calls.append((kwargs.get("input_ids", args[0] if args else None), kwargs["attention_mask"], output[0]))

    handle = text_encoder.register_forward_hook(hook, with_kwargs=True)
    encode = []
    for spec in ENCODE:
        calls.clear()
        prompts = [PROMPTS[p] for p in spec["prompts"]]
        with torch.no_grad():
            pe, pm, ne, nm = pipe.encode_prompt(
                prompts,
                do_classifier_free_guidance=spec["do_classifier_free_guidance"],
                negative_prompt=spec["negative_prompt"],
                num_images_per_prompt=spec["num_images_per_prompt"],
                device=torch.device("cpu"),
                max_sequence_length=spec["max_sequence_length"],
                complex_human_instruction=chi_arg(spec["complex_human_instruction"]),
            )
        # diffusers tiles the mask over the batch (m0 m1 m0 m1) while it repeats the
        # embeddings per prompt (p0 p0 p1 p1); sana-rl gives each sample its own
        # prompt's mask. The first B rows of the tiled mask are m0..m(B-1).
        b, n = len(prompts), spec["num_images_per_prompt"]
        tensors = dict(
            prompt_input_ids=calls[0][0],
            prompt_tokenizer_mask=calls[0][1],
            prompt_last_hidden_state=calls[0][2],
            prompt_embeds=pe,
            prompt_attention_mask=pm[:b].repeat_interleave(n, dim=0),
            diffusers_prompt_attention_mask=pm,
        )
        if spec["do_classifier_free_guidance"]:
            tensors.update(
                negative_input_ids=calls[1][0],
                negative_tokenizer_mask=calls[1][1],
                negative_prompt_embeds=ne,
                negative_prompt_attention_mask=nm,
            )
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / f"encode_{spec['name']}.safetensors"))
        encode.append(dict(spec, prompts=prompts, complex_human_instruction=chi_arg(spec["complex_human_instruction"])))
    handle.remove()
    case = dict(dtype=str(dtype).replace("torch.", ""), causal_lm=causal_lm, encode=encode)
    (d / "case.json").write_text(json.dumps(case, indent=1, ensure_ascii=False))


def write_text_encoder_cases(out_dir: pathlib.Path) -> None:
    torch.set_num_threads(1)
    write_case(out_dir, "fp32", torch.float32, causal_lm=False, seed=3000)
    write_case(out_dir, "bf16", torch.bfloat16, causal_lm=False, seed=3001)
    write_case(out_dir, "causal_lm", torch.float32, causal_lm=True, seed=3002)
    print("text_encoder_{fp32,bf16,causal_lm}: ok")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    write_text_encoder_cases(pathlib.Path(sys.argv[1]))
