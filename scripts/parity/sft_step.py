#!/usr/bin/env python3
"""Reference for sana/src/training/sft_trainer.rs: SFT steps on a tiny random
SanaTransformer2DModel as Cosmos-RL 0.4.7 runs them (SFTTrainer.step_training with
SanaModel.training_sft_step): per mini batch u from diffusers'
compute_density_for_timestep_sampling, index = long(u * 1000) into the flipped
timesteps of the pipeline's DPM-Solver scheduler at 1000 steps (flow shift =
train_flow_shift), noise = randn_like, scheduler.add_noise, one forward with the
caption mask, loss = mean_flat((noise - x0 - v)^2), loss.mean().backward() per mini
batch; then clip_grad_norm_, AdamW, EMA with the 0-based step. torch's default
generator is seeded with seed + step (1-based) at the start of each step.

Cases: "lora" (PEFT adapter "default", logit_normal, EMA) and "full" (every weight,
uniform timesteps, no EMA). Layout: OUT_DIR/sft_step_<case>/
  model/ adapter/ (lora)    the model and the adapter at start
  batch.safetensors         latents, prompt_embeds, prompt_attention_mask
  step<k>.safetensors       after step k: trained.*, exp_avg.*, exp_avg_sq.*, ema.* by name
  case.json                 config + per-step loss / grad_norm
"""
import json
import pathlib
import sys

import torch
from diffusers import DPMSolverMultistepScheduler, SanaTransformer2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from nft_step import LORA, MODEL  # noqa: E402
from pipeline import SANA_SCHEDULER  # noqa: E402

CASES = {
    "lora": dict(steps=2, lora=True, mini_batch=2, weighting_scheme="logit_normal", logit_mean=0.2, logit_std=1.1,
                 train_flow_shift=3.0, lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=1e-4, clip=1.0,
                 ema=[0.9, 1], seed=11),
    "full": dict(steps=2, lora=False, mini_batch=3, weighting_scheme="none", logit_mean=0.0, logit_std=1.0,
                 train_flow_shift=2.0, lr=1e-4, betas=[0.9, 0.95], eps=1e-8, weight_decay=1e-2, clip=0.5,
                 ema=None, seed=12),
}


def write_case(out_dir: pathlib.Path, name: str, c: dict, seed: int) -> None:
    d = out_dir / f"sft_step_{name}"
    d.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(**MODEL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(d / "model", safe_serialization=True)
    if c["lora"]:
        model.add_adapter(LoraConfig(**LORA), adapter_name="default")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".default." in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        (d / "adapter").mkdir(parents=True, exist_ok=True)
        LoraConfig(**LORA).save_pretrained(d / "adapter")
        state = get_peft_model_state_dict(model, adapter_name="default")
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()},
                  str(d / "adapter" / "adapter_model.safetensors"))
        for p in model.parameters():
            p.requires_grad_(False)
        model.set_adapter("default")
        named = [(n, p) for n, p in model.named_parameters() if ".default." in n]
    else:
        named = sorted(model.named_parameters(), key=lambda x: x[0])
    params = [p for _, p in named]
    model.train()

    b = 5
    latents = torch.randn(b, MODEL["in_channels"], 5, 6, generator=gen)
    embeds = torch.randn(b, 7, MODEL["caption_channels"], generator=gen)
    mask = torch.ones(b, 7, dtype=torch.int64)
    mask[1:3, 4:] = 0
    mask[4, 2:] = 0
    save_file(dict(latents=latents, prompt_embeds=embeds, prompt_attention_mask=mask), str(d / "batch.safetensors"))

    sched = DPMSolverMultistepScheduler(**dict(SANA_SCHEDULER, flow_shift=c["train_flow_shift"]))
    sched.set_timesteps(num_inference_steps=sched.config.num_train_timesteps)
    timestep_map = torch.flip(sched.timesteps, dims=(0,))
    opt = torch.optim.AdamW(params, lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"],
                            weight_decay=c["weight_decay"], foreach=True)
    ema = [p.detach().clone() for p in params] if c["ema"] else None
    metrics = []
    for step in range(1, c["steps"] + 1):
        torch.manual_seed(c["seed"] + step)
        opt.zero_grad()
        losses = []
        for i in range(0, b, c["mini_batch"]):
            x0 = latents[i:i + c["mini_batch"]]
            u = compute_density_for_timestep_sampling(weighting_scheme=c["weighting_scheme"], batch_size=x0.shape[0],
                                                      logit_mean=c["logit_mean"], logit_std=c["logit_std"],
                                                      mode_scale=None)
            idx = (u * sched.config.num_train_timesteps).long()
            timesteps = timestep_map[idx]
            noise = torch.randn_like(x0)
            sched._step_index = None
            noised = sched.add_noise(original_samples=x0, noise=noise, timesteps=timesteps)
            out = model(noised, timestep=timesteps, encoder_hidden_states=embeds[i:i + c["mini_batch"]],
                        encoder_attention_mask=mask[i:i + c["mini_batch"]], return_dict=False)[0]
            loss = ((noise - x0 - out) ** 2).mean(dim=tuple(range(1, x0.ndim)))
            loss.mean().backward()
            losses.append(loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c["clip"], foreach=True).item()
        opt.step()
        if ema is not None:
            k = step - 1  # Cosmos-RL's SFT passes the 0-based train_step
            decay = min((1 + k) / (10 + k), c["ema"][0])
            if (k + 1) % c["ema"][1] == 0:
                with torch.no_grad():
                    for e, p in zip(ema, params):
                        e.add_((1 - decay) * (p - e))
        metrics.append(dict(loss=torch.cat(losses).double().mean().item(), grad_norm=grad_norm))
        out = {}
        for i, (n, p) in enumerate(named):
            out[f"trained.{n}"] = p.detach().clone()
            out[f"exp_avg.{n}"] = opt.state[p]["exp_avg"].clone()
            out[f"exp_avg_sq.{n}"] = opt.state[p]["exp_avg_sq"].clone()
            if ema is not None:
                out[f"ema.{n}"] = ema[i].clone()
        save_file(out, str(d / f"step{step}.safetensors"))
    (d / "case.json").write_text(json.dumps(dict(config=c, metrics=metrics), indent=1))


def write_sft_step_cases(out_dir: pathlib.Path) -> None:
    for i, (name, c) in enumerate(CASES.items()):
        write_case(out_dir, name, c, seed=5200 + i)
        print(f"sft_step_{name}: ok")


if __name__ == "__main__":
    write_sft_step_cases(pathlib.Path(sys.argv[1]))
