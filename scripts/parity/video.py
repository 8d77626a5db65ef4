"""Parity references for SANA-Video: tiny random SanaVideoTransformer3DModel
cases (diffusers 0.42.1), written like the image transformer's:
OUT/transformer_<case>/{model/, inputs.safetensors, outputs.safetensors, case.json}."""

import json
import pathlib

import torch
from safetensors.torch import save_file

from diffusers import SanaVideoTransformer3DModel

BASE = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=12,  # rope t/h/w = 4/4/4
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=12,
    cross_attention_dim=24,  # = inner_dim, as the model needs
    caption_channels=16,
    mlp_ratio=2.5,
    sample_size=8,
    patch_size=(1, 2, 2),
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)

CASES = {
    # SANA-Video 480p shape: patch (1, 2, 2), qk-norm across heads; 3 latent frames.
    "video": dict(config=dict(BASE), video=(3, 8, 8), batch=2, seq=7),
    # 720p-style patch (1, 1, 1), no qk-norm, affine norm2, odd grid, 5 frames.
    "video_p111": dict(
        config=dict(BASE, patch_size=(1, 1, 1), qk_norm=None, norm_elementwise_affine=True,
                    attention_head_dim=8, num_attention_heads=3, cross_attention_dim=24,
                    num_cross_attention_heads=3, cross_attention_head_dim=8),
        video=(5, 4, 6), batch=2, seq=5,
    ),
}


def write_video_cases(out: pathlib.Path) -> None:
    for i, (name, case) in enumerate(CASES.items()):
        seed = 3000 + i
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = SanaVideoTransformer3DModel(**case["config"]).eval()
        with torch.no_grad():  # perturb every weight, so an unloaded one shows
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        d = out / f"transformer_{name}"
        model.save_pretrained(d / "model", safe_serialization=True)
        cfg = model.config
        b, (t, h, w), seq = case["batch"], case["video"], case["seq"]
        hidden = torch.randn(b, cfg.in_channels, t, h, w, generator=gen)
        enc = torch.randn(b, seq, cfg.caption_channels, generator=gen)
        mask = torch.ones(b, seq, dtype=torch.int64)
        mask[1, seq - 2:] = 0
        timestep = torch.linspace(999.0, 3.0, b)
        with torch.no_grad():
            sample = model(hidden, encoder_hidden_states=enc, timestep=timestep,
                           encoder_attention_mask=mask, return_dict=False)[0]
        inputs = dict(hidden_states=hidden, encoder_hidden_states=enc,
                      encoder_attention_mask=mask, timestep=timestep)
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(d / "inputs.safetensors"))
        save_file({"sample": sample.contiguous()}, str(d / "outputs.safetensors"))
        (d / "case.json").write_text(json.dumps({"dtype": "float32"}))
        print(f"transformer_{name}: ok")


def write_wan_vae_cases(out: pathlib.Path) -> None:
    """A tiny random AutoencoderKLWan (Wan 2.1 layout): posterior parameters
    and decoded videos for 1, 5 and 9 frames (odd counts: 1 + 4k)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 2.0, 0.5, 1.0],
    ).eval()
    with torch.no_grad():  # RMS gammas start at 1: perturb every weight
        for p in vae.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    d = out / "wan_vae"
    vae.save_pretrained(d / "model", safe_serialization=True)
    tensors = {}
    with torch.no_grad():
        for t in (1, 5, 9):
            x = torch.rand(1, 3, t, 16, 16, generator=gen) * 2 - 1
            params = vae.encode(x).latent_dist.parameters
            mean = params[:, : vae.config.z_dim]
            tensors[f"x_T{t}"] = x
            tensors[f"enc_params_T{t}"] = params
            tensors[f"dec_T{t}"] = vae.decode(mean).sample
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "io.safetensors"))
    print("wan_vae: ok")


# SANA-Video's converter writes DPM-Solver++ with flow sigmas and shift 8.
VIDEO_SCHEDULER = dict(flow_shift=8.0, use_flow_sigmas=True, prediction_type="flow_prediction")
VIDEO_PROMPTS = ["a red fox running in the snow", "Two cats playing chess, slow pan"]
VIDEO_PIPELINE_CASES = {
    "dpm_cfg": dict(sampler="dpm", guidance_scale=6.0, steps=4, frames=5),
    "dpm_nocfg": dict(sampler="dpm", guidance_scale=1.0, steps=3, frames=9),
    "euler_cfg": dict(sampler="euler", guidance_scale=4.0, steps=3, frames=5),
    "dpm_cfg_2per_prompt": dict(sampler="dpm", guidance_scale=6.0, steps=3, frames=1, num_videos_per_prompt=2,
                                prompts="unequal"),
    "euler_nocfg_2per_prompt": dict(sampler="euler", guidance_scale=1.0, steps=3, frames=5,
                                    num_videos_per_prompt=2, prompts="unequal"),
}
VIDEO_HEIGHT, VIDEO_WIDTH = 64, 96  # multiples of 32 (diffusers' check); the Wan VAE compresses by 8


def build_video_pipeline(out: pathlib.Path, seed: int):
    """A tiny random SanaVideoPipeline: the tiny Gemma-2 and tokenizer of text_encoder.py,
    a tiny Wan 2.1 VAE and a tiny video transformer, saved with save_pretrained."""
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import text_encoder
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast
    from diffusers import AutoencoderKLWan, DPMSolverMultistepScheduler, SanaVideoPipeline

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    text_encoder.build_tokenizer(out / "tok")
    tokenizer = GemmaTokenizerFast.from_pretrained(out / "tok")
    tokenizer.padding_side = "right"
    te = Gemma2Model(Gemma2Config(**text_encoder.MODEL)).eval()
    text_encoder.randomize_(te, gen)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 2.0, 0.5, 1.0],
    ).eval()
    transformer = SanaVideoTransformer3DModel(
        **dict(BASE, in_channels=4, out_channels=4, caption_channels=te.config.hidden_size)
    ).eval()
    with torch.no_grad():
        for m in (vae, transformer):
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    pipe = SanaVideoPipeline(tokenizer=tokenizer, text_encoder=te, vae=vae, transformer=transformer,
                             scheduler=DPMSolverMultistepScheduler(**VIDEO_SCHEDULER))
    pipe.save_pretrained(out / "pipeline")
    return SanaVideoPipeline.from_pretrained(out / "pipeline")


def write_video_pipeline_cases(out_dir: pathlib.Path) -> None:
    """OUT/pipeline_sana_video/{pipeline/, <case>.safetensors (noise, latents, videos [B,3,T,H,W]
    in [0,1] before 8-bit quantisation), cases.json}."""

    out = out_dir / "pipeline_sana_video"
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_video_pipeline(out, seed=5151)
    dpm_config = pipe.scheduler.config
    meta = {}
    import pipeline as image_pipeline  # scripts/parity/pipeline.py

    for i, (name, case) in enumerate(VIDEO_PIPELINE_CASES.items()):
        n = case.get("num_videos_per_prompt", 1)
        prompts = image_pipeline.UNEQUAL_PROMPTS if case.get("prompts") == "unequal" else VIDEO_PROMPTS
        c = pipe.transformer.config.in_channels
        f, ft = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        lat_t = (case["frames"] - 1) // ft + 1
        noise = torch.randn(len(prompts) * n, c, lat_t, VIDEO_HEIGHT // f, VIDEO_WIDTH // f,
                            generator=torch.Generator().manual_seed(i))

        def run(prompt, latents, output_type):
            pipe.scheduler = image_pipeline.fresh_scheduler(case["sampler"], dpm_config)
            with torch.no_grad():
                frames = pipe(
                    prompt=prompt, negative_prompt="", num_inference_steps=case["steps"],
                    guidance_scale=case["guidance_scale"], height=VIDEO_HEIGHT, width=VIDEO_WIDTH,
                    frames=case["frames"], num_videos_per_prompt=n, use_resolution_binning=False,
                    latents=latents.clone(), output_type=output_type,
                ).frames
            # frames come as [B, T, 3, H, W]; the reference keeps [B, 3, T, H, W]
            return frames if output_type == "latent" else frames.permute(0, 2, 1, 3, 4)

        tensors = image_pipeline.per_prompt_reference(run, prompts, n, noise, media_key="videos")
        save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(out / f"{name}.safetensors"))
        meta[name] = dict(prompts=prompts, negative_prompt="", steps=case["steps"],
                          guidance_scale=case["guidance_scale"], sampler=case["sampler"],
                          height=VIDEO_HEIGHT, width=VIDEO_WIDTH, frames=case["frames"],
                          num_videos_per_prompt=n)
        print(f"pipeline_sana_video {name}: ok")
    (out / "cases.json").write_text(json.dumps(meta, indent=1))
