"""The core's self-check on tiny random denoisers (used by `adt doctor` and the tests).

For each supported sampler (a tiny UNet, batched CFG), and for each guidance mode
on tiny FLUX.1 transformers (dev: the guidance value embedded, on its shifted
schedule at two resolutions; schnell: no guidance), it checks, against an
independent plain sampling loop of the same scheduler:
  values     the rollout's output equals the loop's output from the same x_ts;
  path grad  (adt mode) dL/dx_{t_i} = dL/dx_hat0 at every step i (Eq. 11);
  param grad the denoiser's parameter gradient equals
             sum over graph steps of b_i * (dL/dx_hat0 . d eps_i / d theta), with
             b_i = d step / d model_output measured on copies of the scheduler;
  graph      exactly 1 + min(K, s - 1) denoiser calls carried a graph;
and for the families, that the rollout's timesteps at that latent size are the
ones diffusers' FluxPipeline sets (its own calculate_shift and sigmas).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from .adapter import GUIDANCE_KEY, guided_denoise
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


def _guided(model, family, value: float, sample, t, cond):
    """The guided denoiser output as the family's pipeline forms it, written out per mode
    (the rollout's own code path is not reused here)."""
    batch = sample.shape[0]
    t = t.reshape(-1).expand(batch)
    mode = family.guidance.mode
    if mode == "embedded":
        return model.denoise(sample, t, {**cond, GUIDANCE_KEY: torch.full((batch,), float(value))})
    scale = family.guidance.cfg_scale(value)
    if mode == "none" or scale is None:
        return model.denoise(sample, t, cond)
    out, _ = guided_denoise(model, sample, t, cond, model.uncond(cond), scale)
    return out


def _reference_loop(model, rollout: Rollout, x_start, cond, plan, scheduler=None):
    """A plain no-grad sampling loop (on `scheduler`, prepared for the whole schedule;
    default: a copy of the rollout's own); also records, per step, the model input and
    b_i = step(1) - step(0) measured on copies of the scheduler state."""
    scheduler = fresh_copy(scheduler if scheduler is not None else rollout.scheduler_for(x_start.shape), plan.begin_index)
    x = x_start.detach()
    records = []
    with torch.no_grad():
        for t in scheduler.timesteps[plan.begin_index :]:
            model_input = _scale_model_input(scheduler, x, t)
            out = _guided(model, rollout.family, rollout.config.guidance_scale, model_input, t, cond)
            b = (
                copy.deepcopy(scheduler).step(torch.ones_like(out), t, x).prev_sample
                - copy.deepcopy(scheduler).step(torch.zeros_like(out), t, x).prev_sample
            )
            records.append((t, model_input, b))
            x = scheduler.step(out, t, x).prev_sample
    return x, records


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _check_rollout(
    tag: str, model, params, rollout: Rollout, x0, noise, cond, rollout_steps: int, k: int, tol: float, scheduler=None
) -> list[CheckResult]:
    """values, path grad, param grad and graph calls of one rollout against the plain loop."""
    gen = torch.Generator().manual_seed(1)
    plan = rollout.plan(gen, num_steps=rollout_steps)
    x_start = rollout.start(x0, noise, plan).requires_grad_(True)
    weight = torch.randn(x0.shape, generator=gen)  # L = sum(weight * x_hat0), so dL/dx_hat0 = weight

    result = rollout.run(model, x_start, cond, plan, record=True)
    x_ref, records = _reference_loop(model, rollout, x_start, cond, plan, scheduler)
    out: list[CheckResult] = []
    err = _rel(result.sample.detach(), x_ref)
    out.append(CheckResult(f"{tag} values", err < tol, f"rollout vs plain loop rel. err {err:.1e}"))

    loss = (weight * result.sample).sum()
    grads = torch.autograd.grad(loss, [r.sample for r in result.trace] + params, allow_unused=True)
    path_grads, param_grads = grads[: len(result.trace)], grads[len(result.trace) :]
    path_err = max(_rel(g, weight) for g in path_grads)
    out.append(CheckResult(f"{tag} path grad", path_err < tol, f"max_i |dL/dx_t_i - dL/dx0| rel. {path_err:.1e} over {len(path_grads)} steps"))

    expected_loss = 0
    for (t, model_input, b), rec in zip(records, result.trace):
        if rec.with_graph:
            eps = _guided(model, rollout.family, rollout.config.guidance_scale, model_input, t, cond)
            expected_loss = expected_loss + (weight * b * eps).sum()
    expected = torch.autograd.grad(expected_loss, params, allow_unused=True)
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])  # noqa: E731
    perr = _rel(flat(param_grads), flat(expected))
    out.append(CheckResult(f"{tag} param grad", perr < tol, f"vs sum_i b_i dL/dx0 . d eps_i/d theta rel. {perr:.1e}"))

    want = 1 + min(k, rollout_steps - 1)
    out.append(CheckResult(f"{tag} graph calls", result.graph_calls == want, f"{result.graph_calls} denoiser calls with a graph (expected {want})"))
    return out


def check_sampler(sampler: str, scheduler_config, steps: int = 8, rollout_steps: int = 6, k: int = 2, tol: float = 1e-4) -> list[CheckResult]:
    model = TinyUNetAdapter(scheduler_config)
    kind = scheduler_config.get("prediction_type", "flow") if "prediction_type" in scheduler_config else "flow"
    from .settings import AdtSettings

    config = AdtSettings(sampler=sampler, num_inference_steps=steps, guidance_scale=3.0, k_graph_steps=k).rollout_config()
    rollout = Rollout(scheduler_config, config)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 16, generator=gen)}
    return _check_rollout(f"{sampler}/{kind}", model, list(model.unet.parameters()), rollout, x0, noise, cond, rollout_steps, k, tol)


# --- guidance modes and resolution-dependent schedules: tiny FLUX.1 transformers ---------

# FLUX.1-dev's scheduler with the token-count anchors scaled to the check's tiny latents
# (8x8 and 16x16 latents are 16 and 64 tokens; the real anchors are 256 and 4096).
FLUX_DEV = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 16,
    "max_image_seq_len": 256,
}
FLUX_SCHNELL = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}

#: (family, scheduler config, guidance value, latent size): embedded guidance on the
#: shifted schedule at two resolutions, and no guidance
FAMILY_CASES = (
    ("flux_dev", FLUX_DEV, 3.5, (8, 8)),
    ("flux_dev", FLUX_DEV, 3.5, (16, 16)),
    ("flux_schnell", FLUX_SCHNELL, 0.0, (8, 8)),
)


def tiny_flux_adapter(family, scheduler_config, seed: int = 0):
    """A tiny random FluxTransformer2DModel (with the guidance embedding for dev) behind
    the family's own adapter: packing, ids and the guidance input as in training."""
    from diffusers import FluxTransformer2DModel

    from .families import FamilyAdapter

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels x 2 x 2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        guidance_embeds=family.guidance.mode == "embedded",
        axes_dims_rope=(2, 2, 4),
    )
    empty = {"encoder_hidden_states": torch.zeros(1, 3, 16), "pooled_projections": torch.zeros(1, 16)}
    return FamilyAdapter(family, transformer, scheduler_config, empty, decoder=lambda z: z)


def pipeline_scheduler(scheduler_config, steps: int, latent_size: tuple[int, int]):
    """The scheduler as diffusers' FluxPipeline prepares it (its own calculate_shift and
    sigmas), for the reference loop: independent of the family module's code."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    seq_len = (latent_size[0] // 2) * (latent_size[1] // 2)
    mu = calculate_shift(
        seq_len,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler


def check_family(
    name: str, scheduler_config, guidance: float, latent_size: tuple[int, int], steps: int = 6, rollout_steps: int = 5, k: int = 2, tol: float = 1e-4
) -> list[CheckResult]:
    from .families import get_family

    family = get_family(name)
    model = tiny_flux_adapter(family, scheduler_config)
    h, w = latent_size
    tag = f"{name}/{family.guidance.mode} {h}x{w}"
    from .settings import AdtSettings

    config = AdtSettings(sampler="flow_euler", num_inference_steps=steps, guidance_scale=guidance, k_graph_steps=k).rollout_config()
    rollout = Rollout(scheduler_config, config, family=family)
    reference = pipeline_scheduler(scheduler_config, steps, latent_size)
    ours = rollout.scheduler_for((h, w)).timesteps
    terr = float((ours - reference.timesteps).abs().max())
    out = [CheckResult(f"{tag} schedule", terr < 1e-3, f"timesteps vs the pipeline's max |diff| {terr:.1e}: {[round(float(t)) for t in ours]}")]
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, h, w, generator=gen), torch.randn(2, 4, h, w, generator=gen)
    cond = {"encoder_hidden_states": torch.randn(2, 3, 16, generator=gen), "pooled_projections": torch.randn(2, 16, generator=gen)}
    params = list(model.denoiser.parameters())
    return out + _check_rollout(tag, model, params, rollout, x0, noise, cond, rollout_steps, k, tol, reference)


def run_selfcheck(
    cases: Iterable = CASES,
    report: Optional[Callable[[CheckResult], None]] = None,
    family_cases: Iterable = FAMILY_CASES,
) -> list[CheckResult]:
    results = []
    checks = [lambda s=s, c=c: check_sampler(s, c) for s, c in cases]
    checks += [lambda case=case: check_family(*case) for case in family_cases]
    for check in checks:
        for r in check():
            results.append(r)
            if report:
                report(r)
    return results
