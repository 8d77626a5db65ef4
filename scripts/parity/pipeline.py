#!/usr/bin/env python3
"""Full `SanaPipeline` parity references for sana/src/pipelines/pipeline_sana.rs.

Builds a tiny random SANA pipeline (the Gemma-style tokenizer and tiny Gemma-2 of
text_encoder.py, the tiny SANA-layout DC-AE of dc_ae.py, a tiny transformer, SANA's
DPM-Solver++ scheduler config), saves it with `save_pretrained`, and runs diffusers'
pipeline on fixed initial noise for both samplers, with and without CFG.

Layout written:
  OUT_DIR/pipeline_sana/pipeline/             the saved pipeline
  OUT_DIR/pipeline_sana/<case>.safetensors    noise [B,C,h,w], latents (final, before the VAE),
                                              images [B,3,H,W] in [0,1] before 8-bit quantisation;
                                              cases with several prompts × several images: each prompt
                                              alone (see per_prompt_reference), and
                                              latents_diffusers_batched
  OUT_DIR/pipeline_sana/cases.json            {case: {prompts, negative_prompt, steps, guidance_scale,
                                               sampler, height, width, num_images_per_prompt}}
"""

import json
import pathlib
import sys

import torch
from safetensors.torch import save_file
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaPipeline,
    SanaTransformer2DModel,
)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import dc_ae  # noqa: E402
import text_encoder  # noqa: E402

# SANA's published scheduler_config.json (DPM-Solver++ 2M, flow sigmas, shift 3).
SANA_SCHEDULER = dict(
    algorithm_type="dpmsolver++", beta_end=0.02, beta_schedule="linear", beta_start=0.0001,
    dynamic_thresholding_ratio=0.995, euler_at_final=False, final_sigmas_type="zero", flow_shift=3.0,
    lambda_min_clipped=-float("inf"), lower_order_final=True, num_train_timesteps=1000,
    prediction_type="flow_prediction", sample_max_value=1.0, solver_order=2, solver_type="midpoint",
    steps_offset=0, thresholding=False, timestep_spacing="linspace", trained_betas=None,
    use_beta_sigmas=False, use_exponential_sigmas=False, use_flow_sigmas=True, use_karras_sigmas=False,
    use_lu_lambdas=False, variance_type=None,
)

PROMPTS = ["a red fox in the snow", "Two cats playing chess, 4k"]
# Prompts of very different lengths: several images per prompt is where diffusers'
# tiled caption mask gives samples another prompt's mask (see per_prompt_reference).
UNEQUAL_PROMPTS = [
    "a cat",
    "An old lighthouse keeper in a yellow raincoat climbs the spiral stairs at dusk, carrying a brass "
    "lantern, while storm clouds gather over a grey sea and gulls circle the tower, oil painting, "
    "warm and cold light, highly detailed",
]
CASES = {
    "dpm_cfg": dict(sampler="dpm", guidance_scale=4.5, steps=6),
    "dpm_nocfg": dict(sampler="dpm", guidance_scale=1.0, steps=5),
    "euler_cfg": dict(sampler="euler", guidance_scale=3.0, steps=6),
    "euler_nocfg": dict(sampler="euler", guidance_scale=1.0, steps=4),
    "dpm_cfg_2per_prompt": dict(sampler="dpm", guidance_scale=4.5, steps=4, num_images_per_prompt=2,
                                prompts=UNEQUAL_PROMPTS),
    "euler_nocfg_2per_prompt": dict(sampler="euler", guidance_scale=1.0, steps=4, num_images_per_prompt=2,
                                    prompts=UNEQUAL_PROMPTS),
}
HEIGHT, WIDTH = 64, 96  # multiples of 32 (diffusers' check); the tiny DC-AE compresses by 8


# A mid-size variant for benchmarks (scripts/bench): wider models, same layout.
MID_TEXT_ENCODER = dict(text_encoder.MODEL, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, sliding_window=64)
MID_VAE = dict(dc_ae.SANA, latent_channels=32, attention_head_dim=16,
               encoder_block_out_channels=[32, 64, 128, 128], decoder_block_out_channels=[32, 64, 128, 128])
MID_TRANSFORMER = dict(num_attention_heads=16, attention_head_dim=32, num_layers=4, num_cross_attention_heads=16,
                       cross_attention_head_dim=32, cross_attention_dim=512)
TINY_TRANSFORMER = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, num_cross_attention_heads=2,
                        cross_attention_head_dim=8, cross_attention_dim=16)


def build_pipeline(out: pathlib.Path, seed: int, mid: bool = False) -> SanaPipeline:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    text_encoder.build_tokenizer(out / "tok")
    tokenizer = GemmaTokenizerFast.from_pretrained(out / "tok")
    tokenizer.padding_side = "right"
    te = Gemma2Model(Gemma2Config(**(MID_TEXT_ENCODER if mid else text_encoder.MODEL))).eval()
    text_encoder.randomize_(te, gen)
    vae = AutoencoderDC(**(MID_VAE if mid else dc_ae.SANA)).eval()
    dc_ae.randomize_(vae, gen)
    transformer = SanaTransformer2DModel(
        in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
        caption_channels=te.config.hidden_size, sample_size=8, qk_norm="rms_norm_across_heads",
        **(MID_TRANSFORMER if mid else TINY_TRANSFORMER),
    ).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    scheduler = DPMSolverMultistepScheduler(**SANA_SCHEDULER)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=te, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(out / "pipeline")
    return SanaPipeline.from_pretrained(out / "pipeline")


def fresh_scheduler(sampler, dpm_config):
    """The pipeline's own DPM-Solver++ (`dpm`) or flow-matching Euler with its shift."""
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(dpm_config)
    return FlowMatchEulerDiscreteScheduler(shift=dpm_config.flow_shift)


def per_prompt_reference(run, prompts, n, noise, media_key="images"):
    """The reference outputs of one case: `run(prompts, noise, output_type)` calls the
    diffusers pipeline. With one prompt, or one sample per prompt, diffusers' batched
    call is the reference. With several prompts and several samples each, diffusers
    pairs sample k with prompt k // n's embeddings but prompt k mod B's caption mask
    (it tiles the mask), so the reference is each prompt generated alone from its
    own slice of the noise — what diffusers computes right — concatenated; the
    batched call is kept as `latents_diffusers_batched` to show the departure."""
    tensors = {"noise": noise}
    if len(prompts) > 1 and n > 1:
        latents, media = [], []
        for j, p in enumerate(prompts):
            part = noise[j * n:(j + 1) * n]
            latents.append(run([p], part, "latent"))
            media.append(run([p], part, "pt"))
        tensors["latents"], tensors[media_key] = torch.cat(latents), torch.cat(media)
        tensors["latents_diffusers_batched"] = run(prompts, noise, "latent")
    else:
        tensors["latents"], tensors[media_key] = run(prompts, noise, "latent"), run(prompts, noise, "pt")
    return tensors


def write_pipeline_cases(out_dir: pathlib.Path) -> None:
    out = out_dir / "pipeline_sana"
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(out, seed=4242)
    dpm_config = pipe.scheduler.config
    meta = {}
    for i, (name, case) in enumerate(CASES.items()):
        n = case.get("num_images_per_prompt", 1)
        prompts = case.get("prompts", PROMPTS)
        c = pipe.transformer.config.in_channels
        f = pipe.vae_scale_factor
        noise = torch.randn(len(prompts) * n, c, HEIGHT // f, WIDTH // f, generator=torch.Generator().manual_seed(i))

        def run(prompt, latents, output_type):
            pipe.scheduler = fresh_scheduler(case["sampler"], dpm_config)
            with torch.no_grad():
                return pipe(
                    prompt=prompt, negative_prompt="", num_inference_steps=case["steps"],
                    guidance_scale=case["guidance_scale"], height=HEIGHT, width=WIDTH, num_images_per_prompt=n,
                    use_resolution_binning=False, latents=latents.clone(), output_type=output_type,
                ).images

        tensors = per_prompt_reference(run, prompts, n, noise)
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))
        meta[name] = dict(prompts=prompts, negative_prompt="", steps=case["steps"],
                          guidance_scale=case["guidance_scale"], sampler=case["sampler"], height=HEIGHT,
                          width=WIDTH, num_images_per_prompt=n)
    (out / "cases.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    write_pipeline_cases(pathlib.Path(sys.argv[1]))
