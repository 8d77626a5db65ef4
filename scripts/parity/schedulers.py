#!/usr/bin/env python3
"""Scheduler parity references for sana/src/schedulers (Rust), from diffusers itself.

Usage: schedulers.py OUT_DIR   (make_reference.py calls write_scheduler_cases(OUT_DIR))

Layout written, one folder per case:
  OUT_DIR/scheduler_<case>/scheduler_config.json  the scheduler's own `save_config` output
  OUT_DIR/scheduler_<case>/case.json              how to drive it (num_inference_steps, mu, SDE options)
  OUT_DIR/scheduler_<case>/trace.safetensors      timesteps, sigmas (float64 copies of diffusers' tables),
                                                  and per step i: sample_<i>, model_output_<i>, prev_sample_<i>
                                                  (SDE cases add noise_<i>, log_prob_<i>, prev_sample_mean_<i>,
                                                  std_dev_t_<i>; given-prev cases feed prev_sample_in_<i>)

Inputs are float32 of shape [2, 4, 6, 8] drawn from a fixed torch seed; each step feeds the scheduler its
own previous output, so the multistep history of DPM-Solver is exercised.

Only torch, numpy, safetensors and diffusers are used. The SDE reference cannot import cosmos_rl (it pulls
in a whole training stack), so `cosmos_sde_step_with_logprob` below restates its math line for line.
"""

import json
import math
import pathlib
import sys
from typing import Optional

import torch
from safetensors.torch import save_file

from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

SHAPE = (2, 4, 6, 8)

# SANA's published scheduler_config.json (Sana_1600M_1024px_diffusers), minus the `_` keys.
SANA_DPM = dict(
    algorithm_type="dpmsolver++",
    beta_end=0.02,
    beta_schedule="linear",
    beta_start=0.0001,
    dynamic_thresholding_ratio=0.995,
    euler_at_final=False,
    final_sigmas_type="zero",
    flow_shift=3.0,
    lambda_min_clipped=-float("inf"),
    lower_order_final=True,
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    sample_max_value=1.0,
    solver_order=2,
    solver_type="midpoint",
    steps_offset=0,
    thresholding=False,
    timestep_spacing="linspace",
    trained_betas=None,
    use_beta_sigmas=False,
    use_exponential_sigmas=False,
    use_flow_sigmas=True,
    use_karras_sigmas=False,
    use_lu_lambdas=False,
    variance_type=None,
)


def dpm(**overrides) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**dict(SANA_DPM, **overrides))


def dpm_plain(**overrides) -> DPMSolverMultistepScheduler:
    """Non-flow (VP) DPM-Solver++ as used by SD-style models."""
    return DPMSolverMultistepScheduler(**overrides)


# name -> (scheduler factory, num_inference_steps, set_timesteps extra kwargs)
SCHEDULER_CASES = {
    "dpm_sana_20": (lambda: dpm(), 20, {}),
    "dpm_sana_7": (lambda: dpm(), 7, {}),
    "dpm_order1_10": (lambda: dpm(solver_order=1), 10, {}),
    "dpm_order3_10": (lambda: dpm(solver_order=3), 10, {}),
    "dpm_order3_20": (lambda: dpm(solver_order=3), 20, {}),
    "dpm_heun_20": (lambda: dpm(solver_type="heun"), 20, {}),
    "dpm_sigma_min_20": (lambda: dpm(final_sigmas_type="sigma_min"), 20, {}),
    "dpm_sigma_min_euler_final_7": (lambda: dpm(final_sigmas_type="sigma_min", euler_at_final=True), 7, {}),
    "dpm_epsilon_linear_20": (lambda: dpm_plain(prediction_type="epsilon"), 20, {}),
    "dpm_vpred_scaled_trailing_12": (
        lambda: dpm_plain(prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, timestep_spacing="trailing"),
        12,
        {},
    ),
    "dpm_epsilon_leading_9": (
        lambda: dpm_plain(prediction_type="epsilon", beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, timestep_spacing="leading", steps_offset=1),
        9,
        {},
    ),
    "dpm_cosine_clipped_15": (
        lambda: dpm_plain(prediction_type="epsilon", beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1,
                          solver_order=3),
        15,
        {},
    ),
    "dpm_sample_zero_snr_8": (
        lambda: dpm_plain(prediction_type="sample", rescale_betas_zero_snr=True, final_sigmas_type="sigma_min",
                          timestep_spacing="trailing"),
        8,
        {},
    ),
    "euler_shift3_20": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), 20, {}),
    "euler_shift1_10": (lambda: FlowMatchEulerDiscreteScheduler(shift=1.0), 10, {}),
    "euler_shift_terminal_12": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1), 12, {}),
    "euler_karras_9": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True), 9, {}),
    "euler_exponential_9": (lambda: FlowMatchEulerDiscreteScheduler(shift=2.0, use_exponential_sigmas=True), 9, {}),
    "euler_invert_8": (lambda: FlowMatchEulerDiscreteScheduler(shift=1.5, invert_sigmas=True), 8, {}),
    "euler_dynamic_exp_10": (
        lambda: FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 10, {"mu": 0.8}),
    "euler_dynamic_linear_10": (
        lambda: FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear"), 10, {"mu": 2.5}),
}


def cosmos_sde_step_with_logprob(
    sigmas: torch.Tensor,
    step_index: list,
    model_output: torch.FloatTensor,
    sample: torch.FloatTensor,
    noise_level: float = 0.7,
    prev_sample: Optional[torch.FloatTensor] = None,
    variance_noise: Optional[torch.FloatTensor] = None,
    sde_type: Optional[str] = "sde",
    determistic: bool = False,
):
    """cosmos-rl 0.4.7, cosmos_rl/policy/model/diffusers/sana_model.py, SanaModel.sde_step_with_logprob
    (identical to Flow-GRPO's flow_grpo/diffusers_patch/sd3_sde_with_logprob.py::sde_step_with_logprob).

    Changes, none in the math: `self.pipeline.scheduler.sigmas` is the `sigmas` argument and
    `index_for_timestep(t)` is replaced by the step index itself; the noise is an argument instead of
    `randn_tensor(..., generator)`; `determistic` is the flag of Flow-GRPO's earlier version of this function
    and of cosmos-rl's cosmos_predict2_5_model.py::sde_step_with_logprob (replace prev_sample by the plain
    Euler/ODE step, then score it under the SDE Gaussian), which sana_model.py does not have.
    """
    # bf16 can overflow here when compute prev_sample_mean, we must convert all variable to fp32
    model_output = model_output.float()
    sample = sample.float()
    if prev_sample is not None:
        prev_sample = prev_sample.float()

    prev_step_index = [step + 1 for step in step_index]
    sigma = sigmas[step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_prev = sigmas[prev_step_index].view(-1, *([1] * (len(sample.shape) - 1)))
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma

    if sde_type == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
        # our sde
        prev_sample_mean = (
            sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
            + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        )

        if prev_sample is None:
            prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * variance_noise

        if determistic:
            prev_sample = sample + dt * model_output

        log_prob = (
            -((prev_sample.detach() - prev_sample_mean) ** 2)
            / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
            - torch.log(std_dev_t * torch.sqrt(-1 * dt))
            - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
        )

    elif sde_type == "cps":
        std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)  # sigma_t in paper
        pred_original_sample = sample - sigma * model_output  # predicted x_0 in paper
        noise_estimate = sample + model_output * (1 - sigma)  # predicted x_1 in paper
        prev_sample_mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * torch.sqrt(
            sigma_prev**2 - std_dev_t**2
        )

        if prev_sample is None:
            prev_sample = prev_sample_mean + std_dev_t * variance_noise

        # remove all constants
        log_prob = -((prev_sample.detach() - prev_sample_mean) ** 2)

    # mean along all but batch dimension
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))

    return prev_sample, log_prob, prev_sample_mean, std_dev_t


# name -> (scheduler factory giving the sigma table, num_inference_steps, SDE options)
SDE_CASES = {
    # Flow-GRPO's setting: FlowMatchEuler sigmas (sigma_0 == 1 exercises the `where`).
    "sde_euler_shift3_10": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), 10,
                            dict(sde_type="sde", noise_level=0.7)),
    # cosmos-rl's SANA setting: the pipeline's DPM-Solver flow sigmas.
    "sde_dpm_sana_10": (lambda: dpm(), 10, dict(sde_type="sde", noise_level=0.7)),
    # Training-time recomputation: prev_sample given (a rollout's), log-prob only.
    "sde_given_prev_10": (lambda: dpm(), 10, dict(sde_type="sde", noise_level=0.7, given_prev=True)),
    "sde_deterministic_10": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), 10,
                             dict(sde_type="sde", noise_level=0.7, deterministic=True)),
    "cps_euler_shift3_10": (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), 10,
                            dict(sde_type="cps", noise_level=0.7)),
}


def _save_case(out_dir: pathlib.Path, name: str, scheduler, case: dict, tensors: dict) -> None:
    d = out_dir / f"scheduler_{name}"
    d.mkdir(parents=True, exist_ok=True)
    scheduler.save_config(d)
    (d / "case.json").write_text(json.dumps(case, indent=1, sort_keys=True))
    # clone: a step's output is also the next step's input, and safetensors refuses shared storage.
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(d / "trace.safetensors"))


def _model_output(scheduler, i: int, sample: torch.Tensor, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flow models get plain noise (x0 = sample - sigma * v stays O(1)). VP models get an output consistent with
    a fixed x0 plus a small error: plain noise as epsilon makes x0 = (x - sigma eps) / alpha blow up to ~1e3 at
    t ~ 999, which would test fp32 rounding of huge numbers rather than the scheduler."""
    noise = torch.randn(SHAPE, generator=gen)
    prediction_type = getattr(scheduler.config, "prediction_type", "flow_prediction")
    if prediction_type == "flow_prediction":
        return noise
    s = scheduler.sigmas[i].double()
    alpha_t = 1 / (s**2 + 1) ** 0.5
    sigma_t = s * alpha_t
    eps = ((sample.double() - alpha_t * x0.double()) / sigma_t).float()
    if prediction_type == "epsilon":
        return eps + 0.05 * noise
    if prediction_type == "v_prediction":
        return (alpha_t * eps.double() - sigma_t * x0.double()).float() + 0.05 * noise
    if prediction_type == "sample":
        return x0 + 0.05 * noise
    raise ValueError(prediction_type)


def write_scheduler_case(out_dir: pathlib.Path, name: str, seed: int) -> None:
    factory, steps, extra = SCHEDULER_CASES[name]
    scheduler = factory()
    scheduler.set_timesteps(steps, **extra)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "timesteps": scheduler.timesteps.to(torch.float64),
        "sigmas": scheduler.sigmas.to(torch.float64),
    }
    sample = torch.randn(SHAPE, generator=gen)
    x0 = 0.5 * torch.randn(SHAPE, generator=gen)
    for i, t in enumerate(scheduler.timesteps):
        model_output = _model_output(scheduler, i, sample, x0, gen)
        prev = scheduler.step(model_output, t, sample, return_dict=False)[0]
        tensors[f"sample_{i}"] = sample
        tensors[f"model_output_{i}"] = model_output
        tensors[f"prev_sample_{i}"] = prev
        sample = prev
    case = dict(kind="scheduler", num_inference_steps=steps, **extra)
    _save_case(out_dir, name, scheduler, case, tensors)


def write_sde_case(out_dir: pathlib.Path, name: str, seed: int) -> None:
    factory, steps, opts = SDE_CASES[name]
    scheduler = factory()
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "timesteps": scheduler.timesteps.to(torch.float64),
        "sigmas": sigmas.to(torch.float64),
    }
    sample = torch.randn(SHAPE, generator=gen)
    for i in range(len(scheduler.timesteps)):
        model_output = torch.randn(SHAPE, generator=gen)
        noise = torch.randn(SHAPE, generator=gen)
        given = None
        if opts.get("given_prev"):
            # A rollout's sample from an "old policy" (slightly different velocity), scored under the current one.
            old_output = model_output + 0.1 * torch.randn(SHAPE, generator=gen)
            given = cosmos_sde_step_with_logprob(
                sigmas, [i] * SHAPE[0], old_output, sample, noise_level=opts["noise_level"], variance_noise=noise
            )[0]
        prev, log_prob, mean, std = cosmos_sde_step_with_logprob(
            sigmas,
            [i] * SHAPE[0],
            model_output,
            sample,
            noise_level=opts["noise_level"],
            prev_sample=given,
            variance_noise=None if given is not None else noise,
            sde_type=opts["sde_type"],
            determistic=opts.get("deterministic", False),
        )
        tensors[f"sample_{i}"] = sample
        tensors[f"model_output_{i}"] = model_output
        if given is not None:
            tensors[f"prev_sample_in_{i}"] = given
        else:
            tensors[f"noise_{i}"] = noise
        tensors[f"prev_sample_{i}"] = prev
        tensors[f"log_prob_{i}"] = log_prob
        tensors[f"prev_sample_mean_{i}"] = mean
        tensors[f"std_dev_t_{i}"] = std.flatten()
        sample = prev
    case = dict(kind="sde", num_inference_steps=steps, sde_type=opts["sde_type"], noise_level=opts["noise_level"],
                deterministic=opts.get("deterministic", False), given_prev=opts.get("given_prev", False))
    _save_case(out_dir, name, scheduler, case, tensors)


def write_scheduler_cases(out_dir: pathlib.Path) -> None:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(SCHEDULER_CASES):
        write_scheduler_case(out_dir, name, seed=2000 + i)
        print(f"scheduler_{name}: ok")
    for i, name in enumerate(SDE_CASES):
        write_sde_case(out_dir, name, seed=3000 + i)
        print(f"scheduler_{name}: ok")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    write_scheduler_cases(pathlib.Path(sys.argv[1]))
