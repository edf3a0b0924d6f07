"""The core's self-check on a tiny random UNet (used by `adt doctor` and the tests).

For each supported sampler it checks, against an independent plain sampling loop
of the same scheduler:
  values     the rollout's output equals the loop's output from the same x_ts;
  path grad  (adt mode) dL/dx_{t_i} = dL/dx_hat0 at every step i (Eq. 11);
  param grad the denoiser's parameter gradient equals
             sum over graph steps of b_i * (dL/dx_hat0 . d eps_i / d theta), with
             b_i = d step / d model_output measured on copies of the scheduler;
  graph      exactly 1 + min(K, s - 1) denoiser calls carried a graph.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from .adapter import guided_denoise
from .rollout import Rollout, _scale_model_input
from .samplers import fresh_copy

DDPM_EPS = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
}
DDPM_V = {**DDPM_EPS, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}

CASES = (
    ("ddim", DDPM_EPS),
    ("ddim", DDPM_V),
    ("dpmsolver++", DDPM_EPS),
    ("euler", DDPM_EPS),
    ("flow_euler", FLOW),
)


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str


class TinyUNetAdapter:
    """A tiny random diffusers UNet2DConditionModel behind the ModelAdapter interface."""

    def __init__(self, scheduler_config, seed: int = 0):
        from diffusers import UNet2DConditionModel

        torch.manual_seed(seed)
        self.unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        self.scheduler_config = scheduler_config
        self.null = torch.randn(1, 3, 16)
        self.graph_calls = 0

    def denoise(self, sample, timestep, cond):
        out = self.unet(sample, timestep, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        self.graph_calls += int(out.requires_grad)
        return out

    def uncond(self, cond):
        return {"encoder_hidden_states": self.null.expand_as(cond["encoder_hidden_states"])}

    def decode(self, latents):
        return latents


def _reference_loop(model, rollout: Rollout, x_start, cond, plan):
    """A plain no-grad sampling loop; also records, per step, the model input and
    b_i = step(1) - step(0) measured on copies of the scheduler state."""
    guidance = rollout.config.guidance_scale
    uncond = model.uncond(cond) if guidance > 1 else None
    scheduler = fresh_copy(rollout.template, plan.begin_index)
    x = x_start.detach()
    records = []
    with torch.no_grad():
        for t in scheduler.timesteps[plan.begin_index :]:
            model_input = _scale_model_input(scheduler, x, t)
            out, _ = guided_denoise(model, model_input, t, cond, uncond, guidance)
            b = (
                copy.deepcopy(scheduler).step(torch.ones_like(out), t, x).prev_sample
                - copy.deepcopy(scheduler).step(torch.zeros_like(out), t, x).prev_sample
            )
            records.append((t, model_input, b))
            x = scheduler.step(out, t, x).prev_sample
    return x, records


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def check_sampler(sampler: str, scheduler_config, steps: int = 8, rollout_steps: int = 6, k: int = 2, tol: float = 1e-4) -> list[CheckResult]:
    model = TinyUNetAdapter(scheduler_config)
    kind = scheduler_config.get("prediction_type", "flow") if "prediction_type" in scheduler_config else "flow"
    tag = f"{sampler}/{kind}"
    from .settings import AdtSettings

    config = AdtSettings(sampler=sampler, num_inference_steps=steps, guidance_scale=3.0, k_graph_steps=k).rollout_config()
    rollout = Rollout(scheduler_config, config)
    gen = torch.Generator().manual_seed(0)
    plan = rollout.plan(gen, num_steps=rollout_steps)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 16, generator=gen)}
    x_start = rollout.start(x0, noise, plan).requires_grad_(True)
    weight = torch.randn(2, 4, 8, 8, generator=gen)  # L = sum(weight * x_hat0), so dL/dx_hat0 = weight

    result = rollout.run(model, x_start, cond, plan, record=True)
    x_ref, records = _reference_loop(model, rollout, x_start, cond, plan)
    out: list[CheckResult] = []
    err = _rel(result.sample.detach(), x_ref)
    out.append(CheckResult(f"{tag} values", err < tol, f"rollout vs plain loop rel. err {err:.1e}"))

    loss = (weight * result.sample).sum()
    params = [p for p in model.unet.parameters()]
    grads = torch.autograd.grad(loss, [r.sample for r in result.trace] + params, allow_unused=True)
    path_grads, param_grads = grads[: len(result.trace)], grads[len(result.trace) :]
    path_err = max(_rel(g, weight) for g in path_grads)
    out.append(CheckResult(f"{tag} path grad", path_err < tol, f"max_i |dL/dx_t_i - dL/dx0| rel. {path_err:.1e} over {len(path_grads)} steps"))

    uncond = model.uncond(cond)
    expected_loss = 0
    for (t, model_input, b), rec in zip(records, result.trace):
        if rec.with_graph:
            eps, _ = guided_denoise(model, model_input, t, cond, uncond, rollout.config.guidance_scale)
            expected_loss = expected_loss + (weight * b * eps).sum()
    expected = torch.autograd.grad(expected_loss, params, allow_unused=True)
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])  # noqa: E731
    perr = _rel(flat(param_grads), flat(expected))
    out.append(CheckResult(f"{tag} param grad", perr < tol, f"vs sum_i b_i dL/dx0 . d eps_i/d theta rel. {perr:.1e}"))

    want = 1 + min(k, rollout_steps - 1)
    out.append(CheckResult(f"{tag} graph calls", result.graph_calls == want, f"{result.graph_calls} denoiser calls with a graph (expected {want})"))
    return out


def run_selfcheck(cases: Iterable = CASES, report: Optional[Callable[[CheckResult], None]] = None) -> list[CheckResult]:
    results = []
    for sampler, config in cases:
        for r in check_sampler(sampler, config):
            results.append(r)
            if report:
                report(r)
    return results
