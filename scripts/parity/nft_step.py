#!/usr/bin/env python3
"""Reference for sana/src/training/nft_trainer.rs: whole DiffusionNFT steps on a
tiny random SanaTransformer2DModel with two PEFT LoRA adapters ("default" trained,
"old" the rollout policy), written as Cosmos-RL 0.4.7's NFTTrainer.step_training
runs them (shuffles, per-sample timestep permutations, optimize and mini batches,
three forwards, loss scaling, clip + AdamW + EMA per optimize batch, the decayed
copy into "old"), on CPU with torch's default generator seeded with seed + step
at the start of each step (as sana-rl does).

The caption mask goes to the cross-attention (`encoder_attention_mask`), as
sana-rl uses it (see ../shared nft-algorithm.md, note on the caption mask).

Layout per case: OUT_DIR/nft_step_<case>/
  model/                         base model (save_pretrained)
  adapter/                       "default" at start, PEFT layout
  batch.safetensors              latents_clean, timesteps, prompt_embeds, prompt_attention_mask, advantages
  step<k>.safetensors            after step k: default.*, old.*, exp_avg.*, exp_avg_sq.*, ema.* by PEFT name
  grads.safetensors              (grad case) gradients before clipping at the first optimizer step
  case.json                      config + per-step metrics
"""
import json
import pathlib
import sys

import torch
from diffusers import SanaTransformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
MODEL = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8, num_layers=2,
             num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
             mlp_ratio=2.5, sample_size=8, patch_size=1, qk_norm="rms_norm_across_heads")
LORA = dict(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS)

CASES = {
    # One optimizer step: its gradients are read back from AdamW's first moment.
    "grad": dict(steps=1, mu_iterations=1, batch_size_per_optimize=None, mini_batch=2, num_steps=4,
                 num_train_timesteps=3, nft_beta=1.0, kl_beta=1e-2, adv_low=-5.0, adv_high=5.0, lr=1e-3,
                 betas=[0.9, 0.999], eps=1e-8, weight_decay=1e-4, clip=1.0, decay_type=1, ema=None, seed=42),
    # Three steps, two passes each, two optimize batches (4 + 2), EMA, the "old" decay.
    "steps": dict(steps=3, mu_iterations=2, batch_size_per_optimize=4, mini_batch=3, num_steps=4,
                  num_train_timesteps=2, nft_beta=0.5, kl_beta=1e-3, adv_low=-2.0, adv_high=3.0, lr=2e-3,
                  betas=[0.9, 0.95], eps=1e-8, weight_decay=1e-2, clip=0.05, decay_type=1, ema=[0.9, 1], seed=7),
}


def build(d: pathlib.Path, seed: int):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SanaTransformer2DModel(**MODEL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(d / "model", safe_serialization=True)
    model.add_adapter(LoraConfig(**LORA), adapter_name="default")
    model.add_adapter(LoraConfig(**LORA), adapter_name="old")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".default." in n:  # B != 0 so the adapter moves the output from the start
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.set_adapter("default")
    (d / "adapter").mkdir(parents=True, exist_ok=True)
    LoraConfig(**LORA).save_pretrained(d / "adapter")
    state = get_peft_model_state_dict(model, adapter_name="default")
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()},
              str(d / "adapter" / "adapter_model.safetensors"))

    b, prompts = 6, 3
    latents = torch.randn(b, MODEL["in_channels"], 5, 6, generator=gen)
    ts = torch.sort(torch.rand(prompts, 4, generator=gen) * 990 + 5, dim=1, descending=True).values
    timesteps = ts.repeat_interleave(b // prompts, dim=0)
    embeds = torch.randn(prompts, 7, MODEL["caption_channels"], generator=gen).repeat_interleave(2, dim=0)
    mask = torch.ones(b, 7, dtype=torch.int64)
    mask[2:4, 5:] = 0
    mask[4:, 3:] = 0
    adv = torch.tensor([1.3, -0.4, 7.0, -6.0, 0.2, -0.9])
    batch = dict(latents_clean=latents, timesteps=timesteps, prompt_embeds=embeds, prompt_attention_mask=mask,
                 advantages=adv)
    return model, batch


def named(model, adapter):
    return [(n, p) for n, p in model.named_parameters() if f".{adapter}." in n]


def step_training(model, batch, c, current_step, opt, ema, grads_out):
    """Cosmos-RL's NFTTrainer.step_training on one rank (no CFG)."""
    torch.manual_seed(c["seed"] + current_step)
    params = [p for _, p in named(model, "default")]
    batch_size, num_timesteps = batch["timesteps"].shape
    per_opt = min(c["batch_size_per_optimize"], batch_size) if c["batch_size_per_optimize"] else batch_size
    info, grad_norms = {}, []
    beta, adv_low, adv_high = c["nft_beta"], c["adv_low"], c["adv_high"]
    for _ in range(c["mu_iterations"]):
        perm = torch.randperm(batch_size)
        tb = {k: v[perm] for k, v in batch.items()}
        perms_time = torch.stack([torch.randperm(num_timesteps) for _ in range(batch_size)])
        tb["timesteps"] = tb["timesteps"][torch.arange(batch_size)[:, None], perms_time]
        for i_opt in range(0, batch_size, per_opt):
            opt_end = min(i_opt + per_opt, batch_size)
            ob = {k: v[i_opt:opt_end] for k, v in tb.items()}
            osz = opt_end - i_opt
            mini = min(c["mini_batch"], osz) if c["mini_batch"] else osz
            for i_mini in range(0, osz, mini):
                mini_end = min(i_mini + mini, osz)
                mb = {k: v[i_mini:mini_end] for k, v in ob.items()}
                scale = (mini_end - i_mini) / osz
                for j in range(c["num_train_timesteps"]):
                    x0 = mb["latents_clean"]
                    t = mb["timesteps"][:, j] / 1000.0
                    te = t.view(-1, *([1] * (x0.ndim - 1)))
                    noise = torch.randn_like(x0.float())
                    xt = (1 - te) * x0 + te * noise
                    inputs = dict(hidden_states=xt, encoder_hidden_states=mb["prompt_embeds"],
                                  encoder_attention_mask=mb["prompt_attention_mask"], timestep=mb["timesteps"][:, j],
                                  return_dict=False)
                    model.set_adapter("old")
                    with torch.no_grad():
                        old = model(**inputs)[0].detach()
                    model.set_adapter("default")
                    fwd = model(**inputs)[0]
                    with torch.no_grad():
                        model.disable_adapters()
                        ref = model(**inputs)[0]
                        model.enable_adapters()
                    model.set_adapter("default")
                    r = torch.clamp((torch.clamp(mb["advantages"], adv_low, adv_high) / adv_high) / 2.0 + 0.5, 0, 1)
                    pos = beta * fwd + (1 - beta) * old.detach()
                    neg = (1.0 + beta) * old.detach() - beta * fwd
                    dims = tuple(range(1, x0.ndim))
                    x0p = xt - te * pos
                    with torch.no_grad():
                        w = torch.abs(x0p.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
                    pl = ((x0p - x0) ** 2 / w).mean(dim=dims)
                    x0n = xt - te * neg
                    with torch.no_grad():
                        nw = torch.abs(x0n.double() - x0.double()).mean(dim=dims, keepdim=True).clip(min=0.00001)
                    nl = ((x0n - x0) ** 2 / nw).mean(dim=dims)
                    ori = r * pl / beta + (1.0 - r) * nl / beta
                    policy = (ori * adv_high).mean()
                    kl = ((fwd - ref) ** 2).mean(dim=dims).mean()
                    loss = policy + c["kl_beta"] * kl
                    (loss * scale * (1.0 / max(c["num_train_timesteps"], 1))).backward()
                    dev = (fwd - old) ** 2
                    terms = dict(loss=loss, policy_loss=policy, unweighted_policy_loss=ori.mean(), kl_loss=kl,
                                 old_kl=((old - ref) ** 2).mean(dim=dims).mean(), old_deviation=dev.mean(),
                                 old_deviation_max=dev.max(), x0_norm=(x0 ** 2).mean(), x0_norm_max=(x0 ** 2).max())
                    for k, v in terms.items():
                        info.setdefault(k, []).append(v.detach().double().item())
            if grads_out is not None and not grads_out:
                grads_out.update({n: p.grad.detach().clone() for n, p in named(model, "default")})
            grad_norms.append(torch.nn.utils.clip_grad_norm_(params, c["clip"], foreach=True).item())
            opt.step()
            opt.zero_grad()
            if ema is not None:
                decay = min((1 + current_step) / (10 + current_step), ema["decay"])
                if (current_step + 1) % ema["interval"] == 0:
                    with torch.no_grad():
                        for e, p in zip(ema["params"], params):
                            e.add_((1 - decay) * (p - e))
    decay = {0: 0.0, 1: min(0.001 * current_step, 0.5),
             2: 0.0 if current_step < 75 else min(0.0075 * (current_step - 75), 0.999)}[c["decay_type"]]
    with torch.no_grad():
        for (_, o), (_, s) in zip(named(model, "old"), named(model, "default")):
            o.copy_(decay * o + (1 - decay) * s)
    metrics = {k: sum(v) / len(v) for k, v in info.items()}
    metrics["grad_norm"] = sum(grad_norms) / len(grad_norms)
    metrics["old_decay"] = decay
    return metrics


def write_case(out_dir: pathlib.Path, name: str, c: dict, seed: int) -> None:
    d = out_dir / f"nft_step_{name}"
    d.mkdir(parents=True, exist_ok=True)
    model, batch = build(d, seed)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():  # Cosmos-RL starts "old" as a copy of "default"
        for (_, o), (_, s) in zip(named(model, "old"), named(model, "default")):
            o.copy_(s)
    model.set_adapter("default")  # PEFT: only the active adapter requires grad
    params = [p for _, p in named(model, "default")]
    opt = torch.optim.AdamW(params, lr=c["lr"], betas=tuple(c["betas"]), eps=c["eps"],
                            weight_decay=c["weight_decay"], foreach=True)
    ema = None
    if c["ema"]:
        ema = dict(decay=c["ema"][0], interval=c["ema"][1], params=[p.detach().clone() for p in params])
    save_file({k: v.contiguous() for k, v in batch.items()}, str(d / "batch.safetensors"))
    grads = {} if name == "grad" else None
    all_metrics = []
    for step in range(1, c["steps"] + 1):
        all_metrics.append(step_training(model, batch, c, step, opt, ema, grads))
        out = {}
        for (n, p) in named(model, "default"):
            st = opt.state[p]
            out[f"default.{n}"] = p.detach().clone()
            out[f"exp_avg.{n}"] = st["exp_avg"].clone()
            out[f"exp_avg_sq.{n}"] = st["exp_avg_sq"].clone()
        for (n, p) in named(model, "old"):
            out[f"old.{n}"] = p.detach().clone()
        if ema is not None:
            for (n, _), e in zip(named(model, "default"), ema["params"]):
                out[f"ema.{n}"] = e.clone()
        save_file(out, str(d / f"step{step}.safetensors"))
    if grads is not None:
        save_file(grads, str(d / "grads.safetensors"))
    (d / "case.json").write_text(json.dumps(dict(config=c, metrics=all_metrics), indent=1))


def write_nft_step_cases(out_dir: pathlib.Path) -> None:
    for i, (name, c) in enumerate(CASES.items()):
        write_case(out_dir, name, c, seed=5100 + i)
        print(f"nft_step_{name}: ok")


if __name__ == "__main__":
    write_nft_step_cases(pathlib.Path(sys.argv[1]))
