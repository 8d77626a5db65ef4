#!/usr/bin/env python3
"""LoRA parity references for sana/src/lora.rs: PEFT 0.21.2 on diffusers 0.42.1's
SanaTransformer2DModel and SanaPipeline.

Per transformer case (several target specs: Cosmos-RL's attention list with
rank/alpha patterns, all-linear with rsLoRA on a SANA-Sprint model, a regex, and
layers_to_transform with exclude_modules), a tiny random model gets a PEFT adapter
whose A and B are then randomised (B != 0, so the adapter changes the output):

  OUT_DIR/lora_<case>/model/                  base model (save_pretrained)
  OUT_DIR/lora_<case>/adapter/                PeftModel.save_pretrained (adapter_config.json + adapter_model.safetensors)
  OUT_DIR/lora_<case>/diffusers/              SanaPipeline.save_lora_weights with the config as metadata
  OUT_DIR/lora_<case>/diffusers_nometa/       the same weights without metadata (diffusers then takes alpha = r)
  OUT_DIR/lora_<case>/inputs.safetensors      transformer inputs (as make_reference.py)
  OUT_DIR/lora_<case>/outputs.safetensors     active (adapter on), disabled (PEFT disable_adapter), scaled
                                              (attention_kwargs scale), nometa (diffusers-loaded file without metadata)
  OUT_DIR/lora_<case>/init.safetensors        the adapter PEFT creates under torch.manual_seed(init_seed), before
                                              randomising (PEFT's saved key names)
  OUT_DIR/lora_<case>/case.json               init_seed, scale, and per targeted module PEFT's r, lora_alpha, scaling

And one pipeline case (a tiny SanaPipeline as pipeline.py builds it, with a PEFT adapter):

  OUT_DIR/lora_pipeline/pipeline/             the saved pipeline (no adapter)
  OUT_DIR/lora_pipeline/adapter/              the PEFT adapter; diffusers/ the same as pytorch_lora_weights.safetensors
  OUT_DIR/lora_pipeline/<case>.safetensors    noise, latents, images ([0,1]) of diffusers' pipeline with the adapter
  OUT_DIR/lora_pipeline/cases.json            per case: prompts, sampler, steps, guidance, size, lora (sub-folder), lora_scale
"""

import json
import pathlib
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

INIT_SEED = 7
SCALE = 0.5

BASE = dict(
    in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, num_layers=2,
    num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
    mlp_ratio=2.5, sample_size=8, patch_size=1,
)
COSMOS_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                  "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]

CASES = {
    # Cosmos-RL's SANA preset targets, gaussian init, per-module ranks and alphas by pattern.
    "list_patterns": dict(
        config=dict(BASE),
        lora=dict(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=COSMOS_TARGETS,
                  rank_pattern={"attn2.to_k": 2, "^transformer_blocks.1.attn1.to_q": 6},
                  alpha_pattern={"to_out.0": 3, r"transformer_blocks\.0\.attn2\.to_.": 5}),
    ),
    # Every Linear (time/guidance embedders, caption projection, proj_out) of a SANA-Sprint
    # model, rsLoRA, dropout (inactive in eval), Kaiming init.
    "all_linear_rslora": dict(
        config=dict(BASE, guidance_embeds=True, qk_norm="rms_norm_across_heads", timestep_scale=1000.0),
        lora=dict(r=4, lora_alpha=6, use_rslora=True, lora_dropout=0.1, target_modules="all-linear"),
        guidance=True, adapter_std=0.1,  # LoRA on the time embedding moves the output a lot
    ),
    # A regex target on SANA 1.5, init_lora_weights=False (random A and B).
    "regex": dict(
        config=dict(BASE, qk_norm="rms_norm_across_heads", num_layers=3, norm_elementwise_affine=True),
        lora=dict(r=3, lora_alpha=5, init_lora_weights=False, target_modules=r".*attn2\.(to_q|to_v)|proj_out"),
    ),
    # layers_to_transform (with layers_pattern; exact names bypass it) and exclude_modules.
    "layers": dict(
        config=dict(BASE, num_layers=3),
        lora=dict(r=2, lora_alpha=2, target_modules=["to_q", "to_v", "transformer_blocks.1.attn2.to_k"],
                  layers_to_transform=[0, 2], layers_pattern="transformer_blocks", exclude_modules=["attn2.to_v"]),
    ),
}


def randomize_(params, gen, scale):
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def bare_pipeline(transformer):
    """A SanaPipeline holding only a transformer: enough for `load_lora_weights`."""
    return SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=None)


def peft_state(peft_model):
    """`get_peft_model_state_dict` without PeftModel's `base_model.model.` prefix."""
    return {k.removeprefix("base_model.model."): v.contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}


def make_inputs(cfg, gen, b, h, w, seq, guidance):
    hidden = torch.randn(b, cfg.in_channels, h, w, generator=gen)
    enc = torch.randn(b, seq, cfg.caption_channels, generator=gen)
    mask = torch.ones(b, seq, dtype=torch.int64)
    for i in range(1, b):
        mask[i, max(1, seq - 2 * i):] = 0
    inputs = dict(hidden_states=hidden, encoder_hidden_states=enc, encoder_attention_mask=mask,
                  timestep=torch.linspace(999.0, 1.5, b))
    if guidance:
        inputs["guidance"] = torch.linspace(0.45, 0.2, b)
    return inputs


def run(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, return_dict=False, **kw)[0].contiguous()


def write_transformer_case(out, name, case, seed):
    d = out / f"lora_{name}"
    d.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(**case["config"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(d / "model", safe_serialization=True)

    torch.manual_seed(INIT_SEED)
    peft_model = get_peft_model(model, LoraConfig(**case["lora"])).eval()
    save_file(peft_state(peft_model), str(d / "init.safetensors"))
    randomize_([p for n, p in peft_model.named_parameters() if "lora_" in n], gen, case.get("adapter_std", 0.3))
    peft_model.save_pretrained(d / "adapter")

    inputs = make_inputs(model.config, gen, 2, 5, 6, 7, case.get("guidance"))
    outputs = dict(active=run(peft_model, inputs), scaled=run(peft_model, inputs, attention_kwargs={"scale": SCALE}))
    with peft_model.disable_adapter():
        outputs["disabled"] = run(peft_model, inputs)

    state = peft_state(peft_model)
    config = peft_model.peft_config["default"]
    SanaPipeline.save_lora_weights(d / "diffusers", transformer_lora_layers=state,
                                   transformer_lora_adapter_metadata=config.to_dict())
    SanaPipeline.save_lora_weights(d / "diffusers_nometa", transformer_lora_layers=state)
    for sub, key in [("diffusers", "diffusers_check"), ("diffusers_nometa", "nometa")]:
        pipe = bare_pipeline(SanaTransformer2DModel.from_pretrained(d / "model").eval())
        pipe.load_lora_weights(d / sub, weight_name="pytorch_lora_weights.safetensors")
        outputs[key] = run(pipe.transformer.eval(), inputs)  # eval: the injected dropout starts in train mode
    # diffusers must read back what PEFT computes, or the references disagree among themselves.
    assert torch.allclose(outputs.pop("diffusers_check"), outputs["active"], atol=1e-5), name

    modules = {
        n: dict(r=m.r["default"], lora_alpha=m.lora_alpha["default"], scaling=m.scaling["default"])
        for n, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)
    }
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(d / "inputs.safetensors"))
    save_file(outputs, str(d / "outputs.safetensors"))
    (d / "case.json").write_text(json.dumps(dict(init_seed=INIT_SEED, scale=SCALE, modules=modules), indent=1))


PIPELINE_LORA = dict(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=COSMOS_TARGETS + ["proj_out"])
PIPELINE_CASES = {
    "dpm_cfg": dict(sampler="dpm", guidance_scale=4.5, steps=5, lora="adapter", lora_scale=1.0),
    "euler_scaled": dict(sampler="euler", guidance_scale=1.0, steps=4, lora="diffusers", lora_scale=0.6),
}


def write_pipeline_case(out_dir):
    import pipeline  # scripts/parity/pipeline.py

    out = out_dir / "lora_pipeline"
    out.mkdir(parents=True, exist_ok=True)
    pipe = pipeline.build_pipeline(out, seed=4343)
    dpm_config = pipe.scheduler.config
    torch.manual_seed(INIT_SEED)
    peft_model = get_peft_model(pipe.transformer, LoraConfig(**PIPELINE_LORA)).eval()  # injects in place
    gen = torch.Generator().manual_seed(99)
    randomize_([p for n, p in peft_model.named_parameters() if "lora_" in n], gen, 0.2)
    peft_model.save_pretrained(out / "adapter")
    SanaPipeline.save_lora_weights(out / "diffusers", transformer_lora_layers=peft_state(peft_model),
                                   transformer_lora_adapter_metadata=peft_model.peft_config["default"].to_dict())
    meta = {}
    for i, (name, case) in enumerate(PIPELINE_CASES.items()):
        c = pipe.transformer.config.in_channels
        f = pipe.vae_scale_factor
        noise = torch.randn(len(pipeline.PROMPTS), c, pipeline.HEIGHT // f, pipeline.WIDTH // f,
                            generator=torch.Generator().manual_seed(i))
        if case["sampler"] == "dpm":
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(dpm_config)
        else:
            pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=dpm_config.flow_shift)
        kw = dict(prompt=pipeline.PROMPTS, negative_prompt="", num_inference_steps=case["steps"],
                  guidance_scale=case["guidance_scale"], height=pipeline.HEIGHT, width=pipeline.WIDTH,
                  use_resolution_binning=False, attention_kwargs={"scale": case["lora_scale"]})
        with torch.no_grad():
            latents = pipe(**kw, latents=noise.clone(), output_type="latent").images
            images = pipe(**kw, latents=noise.clone(), output_type="pt").images
        save_file({"noise": noise.contiguous(), "latents": latents.float().contiguous(),
                   "images": images.float().contiguous()}, str(out / f"{name}.safetensors"))
        meta[name] = dict(prompts=pipeline.PROMPTS, negative_prompt="", steps=case["steps"],
                          guidance_scale=case["guidance_scale"], sampler=case["sampler"], height=pipeline.HEIGHT,
                          width=pipeline.WIDTH, num_images_per_prompt=1, lora=case["lora"],
                          lora_scale=case["lora_scale"])
    (out / "cases.json").write_text(json.dumps(meta, indent=1))


def write_lora_cases(out_dir: pathlib.Path) -> None:
    for i, (name, case) in enumerate(CASES.items()):
        write_transformer_case(out_dir, name, case, seed=3000 + i)
        print(f"lora_{name}: ok")
    write_pipeline_case(out_dir)
    print("lora_pipeline: ok")


if __name__ == "__main__":
    torch.set_num_threads(1)
    write_lora_cases(pathlib.Path(sys.argv[1]))
