#!/usr/bin/env python3
"""Training-math references for sana/src/training (Rust): the DiffusionNFT loss,
its metrics and its gradient, written as Cosmos-RL 0.4.7's NFTTrainer computes them
(cosmos_rl/policy/trainer/diffusers_trainer/nft_trainer.py, step_training) and as
../shared nft-algorithm.md specifies.

Layout: OUT_DIR/training_nft/{inputs,outputs}.safetensors, case.json
"""
import json
import pathlib
import sys

import torch
from safetensors.torch import save_file

CFG = dict(beta=0.1, kl_beta=0.01, adv_low=-5.0, adv_high=5.0)


def nft_reference(x0, t, eps, adv, v, v_old, v_ref, beta, kl_beta, adv_low, adv_high):
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    xt = (1 - t_expanded) * x0 + t_expanded * eps
    advantages_clip = torch.clamp(adv, adv_low, adv_high)
    r = torch.clamp((advantages_clip / adv_high) / 2.0 + 0.5, 0, 1)
    positive = beta * v + (1 - beta) * v_old.detach()
    negative = (1.0 + beta) * v_old.detach() - beta * v
    x0_pred = xt - t_expanded * positive
    with torch.no_grad():
        w = torch.abs(x0_pred.double() - x0.double()).mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=1e-5)
    positive_loss = ((x0_pred - x0) ** 2 / w).mean(dim=tuple(range(1, x0.ndim)))
    neg_x0 = xt - t_expanded * negative
    with torch.no_grad():
        nw = torch.abs(neg_x0.double() - x0.double()).mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clip(min=1e-5)
    negative_loss = ((neg_x0 - x0) ** 2 / nw).mean(dim=tuple(range(1, x0.ndim)))
    ori = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy = (ori * adv_high).mean()
    kl = ((v - v_ref) ** 2).mean(dim=tuple(range(1, x0.ndim))).mean()
    loss = policy + kl_beta * kl
    dev = (v - v_old) ** 2
    metrics = dict(
        policy_loss=policy, unweighted_policy_loss=ori.mean(), kl_loss=kl,
        old_kl=((v_old - v_ref) ** 2).mean(dim=tuple(range(1, x0.ndim))).mean(),
        old_deviation=dev.mean(), old_deviation_max=dev.max(), x0_norm=(x0 ** 2).mean(), x0_norm_max=(x0 ** 2).max(),
    )
    return loss, metrics


def write_training_cases(out_dir: pathlib.Path) -> None:
    d = out_dir / "training_nft"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(77)
    shape = (4, 8, 6, 10)
    x0 = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    t = torch.tensor([0.95, 0.6, 0.31, 0.05])
    adv = torch.tensor([2.5, -7.0, 0.3, 6.0])  # two outside [adv_low, adv_high]
    v_old = eps - x0 + 0.3 * torch.randn(shape, generator=g)
    v_ref = eps - x0 + 0.3 * torch.randn(shape, generator=g)
    v = (v_old + 0.05 * torch.randn(shape, generator=g)).requires_grad_(True)
    loss, metrics = nft_reference(x0, t, eps, adv, v, v_old, v_ref, **CFG)
    loss.backward()
    save_file({"x0": x0, "eps": eps, "t": t, "adv": adv, "v": v.detach(), "v_old": v_old, "v_ref": v_ref},
              str(d / "inputs.safetensors"))
    out = {k: m.detach().double().reshape(()) for k, m in metrics.items()}
    out["loss"] = loss.detach().double().reshape(())
    out["grad_v"] = v.grad
    save_file(out, str(d / "outputs.safetensors"))
    (d / "case.json").write_text(json.dumps(CFG))
    write_adamw_case(out_dir)
    write_sft_noise_case(out_dir)


def write_adamw_case(out_dir: pathlib.Path) -> None:
    """torch.optim.AdamW + clip_grad_norm_ over 4 steps with given gradients."""
    d = out_dir / "training_adamw"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(7, 5, generator=g).requires_grad_(True), torch.randn(11, generator=g).requires_grad_(True)]
    tensors = {f"p{i}_init": p.detach().clone() for i, p in enumerate(params)}
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05, foreach=False)
    lrs = [1e-2, 5e-3, 1e-2, 2e-3]
    for step, lr in enumerate(lrs):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=g) * (3.0 if step == 1 else 0.5)
            tensors[f"g{i}_{step}"] = grad
            p.grad = grad.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        tensors[f"norm_{step}"] = torch.nn.utils.clip_grad_norm_(params, 1.0).reshape(())
        opt.step()
        for i, p in enumerate(params):
            tensors[f"p{i}_{step}"] = p.detach().clone()
    save_file(tensors, str(d / "trace.safetensors"))
    (d / "case.json").write_text(json.dumps({"lrs": lrs, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.05,
                                             "max_norm": 1.0}))


def write_sft_noise_case(out_dir: pathlib.Path) -> None:
    """Cosmos-RL's SanaModel.add_noise: the pipeline scheduler at num_train_timesteps,
    timestep_map = flip(timesteps), scheduler.add_noise(x0, noise, timestep_map[idx])."""
    import sys as _sys
    _sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from diffusers import DPMSolverMultistepScheduler
    import pipeline

    d = out_dir / "training_sft_noise"
    d.mkdir(parents=True, exist_ok=True)
    sched = DPMSolverMultistepScheduler(**pipeline.SANA_SCHEDULER)
    sched.set_timesteps(num_inference_steps=sched.config.num_train_timesteps)
    timestep_map = torch.flip(sched.timesteps, dims=(0,))
    g = torch.Generator().manual_seed(9)
    idx = torch.tensor([0, 1, 2, 337, 500, 998, 999])
    x0 = torch.randn(len(idx), 4, 3, 5, generator=g)
    noise = torch.randn(len(idx), 4, 3, 5, generator=g)
    t = timestep_map[idx]
    noised = sched.add_noise(original_samples=x0, noise=noise, timesteps=t)
    save_file({"idx": idx, "x0": x0, "noise": noise, "timesteps": t.double(), "noised": noised},
              str(d / "trace.safetensors"))


if __name__ == "__main__":
    write_training_cases(pathlib.Path(sys.argv[1]))
