#!/usr/bin/env python3
"""Rollout-solver parity references for sana/src/schedulers/solver.rs (Rust), from DiffusionNFT's own code.

Usage: solvers.py OUT_DIR   (make_reference.py calls write_solver_cases(OUT_DIR))

The reference is DiffusionNFT's `flow_grpo/diffusers_patch/solver.py`, which Cosmos-RL 0.4.7 ships verbatim as
`cosmos_rl/utils/diffusers/solver.py`. That file itself runs here, imported by path (it needs only torch,
diffusers and tqdm; the cosmos_rl package is not imported): `$COSMOS_RL_SOLVER_PY` if set, else
`$SANA_RL_CACHE/cosmos-rl-0.4.7/cosmos_rl/utils/diffusers/solver.py` (SANA_RL_CACHE defaults to
~/.cache/sana-rl), downloaded with `pip download --no-deps cosmos-rl==0.4.7` and unzipped there when missing.

Each case calls the module's `run_sampling(v_pred_fn, z, sigma_schedule, solver, determistic, eta)` on:
  sigma_schedule  SANA's DPMSolverMultistepScheduler (schedulers.SANA_DPM: flow sigmas, flow_shift 3) after
                  set_timesteps(n), then `.sigmas.float()` as cosmos-rl's pipelines pass it;
  v_pred_fn       a closed form Rust computes identically: tanh(z * A + sigma * B) * 0.8 + z * 0.3 (A, B fp32);
  z               fp32 latents of shape [2, 4, 6, 5];
with torch's global RNG seeded per case. While it runs, the module's step functions, `randn_tensor` and
`torch.randn_like` are wrapped by recorders that call the originals and keep their results.

Layout written, one folder per case:
  OUT_DIR/solver_<case>/case.json              solver, deterministic, eta, num_inference_steps, noise_steps
                                               (the steps that drew noise), python_error (see dance_det_10)
  OUT_DIR/solver_<case>/scheduler_config.json  the sigma scheduler's save_config
  OUT_DIR/solver_<case>/trace.safetensors      sigmas (the float32 schedule), A, B, z0, and per step i:
                                               z_<i> (v_pred_fn's input), v_<i> (its output), noise_<i> (the
                                               standard-normal draw, when the step drew one), prev_sample_<i>,
                                               pred_original_<i>, log_prob_<i> (when not None)
"""

import hashlib
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import types
import zipfile

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import schedulers  # noqa: E402  (SANA's DPM-Solver config)

COSMOS_RL_VERSION = "0.4.7"
SOLVER_IN_WHEEL = "cosmos_rl/utils/diffusers/solver.py"
SHAPE = (2, 4, 6, 5)

# name -> (solver, deterministic, eta, num_inference_steps). Every solver deterministic; the stochastic ones at
# DiffusionNFT's default noise level 0.7 (flow also at 1.0); dpm2 also with >= 15 steps (dpm_step's
# lower_order_second depends on len(timesteps) < 15).
CASES = {
    "flow_det_10": ("flow", True, 0.7, 10),
    "dance_det_10": ("dance", True, 0.7, 10),
    "ddim_det_10": ("ddim", True, 0.7, 10),
    "dpm1_det_10": ("dpm1", True, 0.7, 10),
    "dpm2_det_10": ("dpm2", True, 0.7, 10),
    "dpm2_det_20": ("dpm2", True, 0.7, 20),
    "flow_eta07_10": ("flow", False, 0.7, 10),
    "flow_eta10_10": ("flow", False, 1.0, 10),
    "dance_eta07_10": ("dance", False, 0.7, 10),
    "ddim_eta07_10": ("ddim", False, 0.7, 10),
    "ddim_eta07_20": ("ddim", False, 0.7, 20),
}


def solver_path() -> pathlib.Path:
    """The wheel's solver.py: $COSMOS_RL_SOLVER_PY, else the cache (downloaded and unzipped when missing)."""
    env = os.environ.get("COSMOS_RL_SOLVER_PY")
    if env:
        p = pathlib.Path(env)
        if not p.is_file():
            sys.exit(f"COSMOS_RL_SOLVER_PY={env} is not a file")
        return p
    cache = pathlib.Path(os.environ.get("SANA_RL_CACHE", pathlib.Path.home() / ".cache" / "sana-rl"))
    root = cache / f"cosmos-rl-{COSMOS_RL_VERSION}"
    p = root / SOLVER_IN_WHEEL
    if p.is_file():
        return p
    print(f"downloading cosmos-rl=={COSMOS_RL_VERSION} (for {SOLVER_IN_WHEEL}) into {root}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            f"cosmos-rl=={COSMOS_RL_VERSION}", "-d", tmp])
        wheels = sorted(pathlib.Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            sys.exit(f"could not download cosmos-rl=={COSMOS_RL_VERSION} (pip exit {r.returncode}); "
                     f"set COSMOS_RL_SOLVER_PY to a copy of its {SOLVER_IN_WHEEL}")
        root.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as whl:
            whl.extractall(root)
    if not p.is_file():
        sys.exit(f"{wheels[0].name} has no {SOLVER_IN_WHEEL}")
    return p


def load_solver_module(path: pathlib.Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("diffusionnft_solver", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sigma_schedule(steps: int):
    scheduler = schedulers.dpm()
    scheduler.set_timesteps(steps)
    return scheduler, scheduler.sigmas.float()


class _MathLogZeroIsMinusInf:
    """`math` for the dance deterministic case only (see write_solver_case)."""

    def __getattr__(self, name):
        return getattr(math, name)

    @staticmethod
    def log(x):
        return -math.inf if x == 0 else math.log(x)


def run_case(module, solver: str, deterministic: bool, eta: float, sigmas, A, B, z0, seed: int):
    """Runs module.run_sampling with recorders around its step functions and noise draws."""
    rec = {}
    noise_steps = []
    state = {"step": -1}

    def v_pred_fn(z, sigma):
        state["step"] += 1
        v = torch.tanh(z * A + sigma * B) * 0.8 + z * 0.3
        rec[f"z_{state['step']}"] = z
        rec[f"v_{state['step']}"] = v
        return v

    def record_noise(t):
        key = f"noise_{state['step']}"
        if key in rec:
            raise RuntimeError(f"step {state['step']} drew noise twice")
        rec[key] = t
        noise_steps.append(state["step"])
        return t

    def wrap_step(fn):
        def wrapped(*args, **kwargs):
            prev, pred_original, log_prob = fn(*args, **kwargs)
            i = state["step"]
            rec[f"prev_sample_{i}"] = prev
            rec[f"pred_original_{i}"] = pred_original
            if log_prob is not None:
                rec[f"log_prob_{i}"] = log_prob
            return prev, pred_original, log_prob
        return wrapped

    orig_randn_like = torch.randn_like
    orig_randn_tensor = module.randn_tensor
    saved = {name: getattr(module, name) for name in ("flow_grpo_step", "dance_grpo_step", "ddim_step", "dpm_step")}
    torch.randn_like = lambda *a, **k: record_noise(orig_randn_like(*a, **k))
    module.randn_tensor = lambda *a, **k: record_noise(orig_randn_tensor(*a, **k))
    for name, fn in saved.items():
        setattr(module, name, wrap_step(fn))
    torch.manual_seed(seed)
    try:
        latents, all_latents, all_log_probs = module.run_sampling(
            v_pred_fn, z0.clone(), sigmas, solver=solver, determistic=deterministic, eta=eta)
    finally:
        torch.randn_like = orig_randn_like
        module.randn_tensor = orig_randn_tensor
        for name, fn in saved.items():
            setattr(module, name, fn)
    n = len(sigmas) - 1
    assert state["step"] == n - 1 and len(all_latents) == n + 1
    for i in range(n):  # the recorders saw what run_sampling returns
        assert torch.equal(all_latents[i + 1], rec[f"prev_sample_{i}"])
        assert (all_log_probs[i] is None) == (f"log_prob_{i}" not in rec)
    assert torch.equal(latents, rec[f"prev_sample_{n - 1}"])
    return rec, noise_steps


def write_solver_case(out_dir: pathlib.Path, module, src_sha256: str, name: str, seed: int) -> None:
    solver, deterministic, eta, steps = CASES[name]
    scheduler, sigmas = sigma_schedule(steps)
    gen = torch.Generator().manual_seed(seed)
    A = 0.6 * torch.randn(SHAPE, generator=gen)
    B = torch.randn(SHAPE, generator=gen)
    z0 = torch.randn(SHAPE, generator=gen)
    case = dict(solver=solver, deterministic=deterministic, eta=eta, num_inference_steps=steps, shape=list(SHAPE),
                seed=seed, solver_py_sha256=src_sha256)

    shimmed = None
    if solver == "dance" and deterministic:
        # run_sampling passes eta = 0, so dance_grpo_step's std_dev_t is 0.0 and its no-op statement
        # `-math.log(std_dev_t) - ...` raises "math domain error": DiffusionNFT cannot run this case. Check
        # that it does raise, then run the unchanged code with the module's `math` answering log(0) = -inf;
        # that statement's value is discarded, so every returned value is what the code computes before
        # it fails.
        try:
            run_case(module, solver, deterministic, eta, sigmas, A, B, z0, seed)
        except ValueError as e:
            case["python_error"] = f"ValueError: {e}"
        else:
            raise AssertionError("dance with determistic=True was expected to raise in math.log(0)")
        shimmed, module.math = module.math, _MathLogZeroIsMinusInf()
    try:
        rec, noise_steps = run_case(module, solver, deterministic, eta, sigmas, A, B, z0, seed)
    finally:
        if shimmed is not None:
            module.math = shimmed
    case["noise_steps"] = noise_steps

    d = out_dir / f"solver_{name}"
    d.mkdir(parents=True, exist_ok=True)
    scheduler.save_config(d)
    (d / "case.json").write_text(json.dumps(case, indent=1, sort_keys=True))
    tensors = dict(sigmas=sigmas, A=A, B=B, z0=z0, **rec)
    # clone: a step's output is the next step's input, and safetensors refuses shared storage.
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(d / "trace.safetensors"))
    lp = [rec[k] for k in rec if k.startswith("log_prob_")]
    nan_lp = sum(int(t.isnan().any()) for t in lp)
    print(f"solver_{name}: ok ({steps} steps, noise drawn at {len(noise_steps)} steps, "
          f"{len(lp)} log_probs ({nan_lp} NaN){', ' + case['python_error'] if 'python_error' in case else ''})")


def write_solver_cases(out_dir) -> None:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = solver_path()
    src_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    module = load_solver_module(path)
    for i, name in enumerate(CASES):
        write_solver_case(out_dir, module, src_sha256, name, seed=4000 + i)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    torch.set_num_threads(1)
    write_solver_cases(pathlib.Path(sys.argv[1]))
