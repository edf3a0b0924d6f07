"""Image-to-image rollout with the real sampler, and the backward-path constraint.

Given x_ts (a real sample noised to the start step t_s of the inference schedule),
run the sampler from t_s to 0 exactly as inference would (same scheduler config,
same guidance), while shaping the graph that the adversarial loss flows back through.

Every sampler step is x_{i-1} = step(eps_hat, t_i, x_i) = a_i x_i + b_i eps_hat.
Gradient modes (paper Sec. 3.2):

    adt    (Eq. 11)  x_{i-1} = step(eps(sg(x_i)), t_i, sg(x_i)) + (x_i - sg(x_i))
                     value: the exact sampler step; d x_{i-1}/d x_i = I, so
                     dL/dx_{t_i} = dL/dx_hat0 at every step; d x_{i-1}/d eps = b_i.
    drtune (Eq. 4)   x_{i-1} = step(eps(sg(x_i)), t_i, x_i)
                     the gradient is multiplied by a_i at every step: for DDIM
                     prod a = alpha_0 / alpha_{t_i}, which explodes for early steps.
    off              no graph at all (discriminator-only iterations).

Only the first step (whose prediction also feeds the diffusion loss) and K further
steps drawn among the rest call the denoiser with a graph; every other step runs
under torch.inference_mode (its output copied out), so a generator iteration holds
activations for at most K + 1 calls.

Guidance is the model family's (`families`): "cfg" batches the conditional and
unconditional passes, eps = eps_u + w (eps_c - eps_u); "embedded" (FLUX.1-dev)
hands the value to the denoiser in the conditioning, one pass; "none" (FLUX.1-
schnell, Z-Image-Turbo) is one plain pass. Every mode is affine in the denoiser's
outputs, so Eq. 11 holds unchanged. The timesteps are set per latent size as the
family's pipeline sets them (FLUX.1-dev shifts them by the image's token count):
one prepared scheduler per size, built on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .adapter import Cond, ModelAdapter, guided_denoise
from .families import ModelFamily, family_for_scheduler, guidance_cond
from .noise import noised_start, prediction_target, prediction_type_of, start_levels
from .samplers import build_scheduler, detach_history, fresh_copy, resolve_sampler_name

GRAD_MODES = ("adt", "drtune", "off")


@dataclass(frozen=True)
class RolloutConfig:
    """The rollout's part of `AdtSettings` (`AdtSettings.rollout_config()`; the
    defaults and the meaning of each field live there)."""

    sampler: str
    num_inference_steps: int
    guidance_scale: float
    grad_mode: str
    k_graph_steps: int
    gradient_checkpointing: bool

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {self.grad_mode!r}")
        resolve_sampler_name(self.sampler)  # unknown names fail here, not mid-run
        if self.k_graph_steps < 0:
            raise ValueError(f"k_graph_steps must be >= 0, got {self.k_graph_steps}")


@dataclass(frozen=True)
class RolloutPlan:
    """Which steps run: the last `num_steps` of the inference schedule, starting at
    `begin_index`; the positions (0 = first step) whose denoiser call keeps a graph."""

    begin_index: int
    num_steps: int
    graph_positions: frozenset[int]


@dataclass
class StepRecord:
    position: int
    timestep: torch.Tensor
    sample: torch.Tensor  # the live x_{t_i} entering the step (a node of the graph)
    model_output: torch.Tensor  # guided output, detached
    with_graph: bool


@dataclass
class RolloutResult:
    sample: torch.Tensor  # x_hat_0, in the sampler's sample space (latents)
    first_prediction: torch.Tensor  # conditional denoiser output at t_s (graph unless mode off)
    plan: RolloutPlan
    graph_calls: int
    trace: Optional[list[StepRecord]] = None


class Rollout:
    """A sampler prepared from the model's scheduler config and family; each `run`
    works on a private copy of the scheduler prepared for its latent size."""

    def __init__(
        self,
        scheduler_config: Mapping[str, Any],
        config: RolloutConfig,
        device: Any = None,
        family: Optional[ModelFamily] = None,
    ):
        self.config = config
        self.scheduler_config = dict(scheduler_config)
        self.family = family or family_for_scheduler(scheduler_config)
        self.device = device
        self.prediction_type = prediction_type_of(scheduler_config)
        if self.family.prediction and (self.family.prediction == "flow") != (self.prediction_type == "flow"):
            raise ValueError(
                f"the scheduler config ({scheduler_config.get('_class_name', 'unknown')}) is a {self.prediction_type} "
                f"one, but {self.family.label} is a {self.family.prediction} model: pass the model's own scheduler config"
            )
        self.family.guidance.check(config.guidance_scale, self.family.label)
        self._schedulers: dict[tuple[int, int], Any] = {}
        # The scheduler at the family's usual size: builds (and so checks) the sampler now.
        self.template = self.scheduler_for(self.family.default_latent_size)

    def scheduler_for(self, shape: Sequence[int]):
        """The prepared scheduler for latents of `shape` ([..., H, W] or (H, W)); cached.
        Do not step it: `run` and `start` work on copies."""
        size = (int(shape[-2]), int(shape[-1]))
        if not self.family.depends_on_size(self.scheduler_config) and self._schedulers:
            return next(iter(self._schedulers.values()))  # one schedule for every size
        if size not in self._schedulers:
            self._schedulers[size] = build_scheduler(
                self.scheduler_config, self.config.sampler, self.config.num_inference_steps, self.device, self.family, size
            )
        return self._schedulers[size]

    @property
    def schedule_length(self) -> int:
        return len(self.template.timesteps)

    def plan(self, generator: torch.Generator, num_steps: Optional[int] = None) -> RolloutPlan:
        """Draw s uniformly over the inference schedule (or take it) and the K graph steps."""
        m = self.schedule_length
        s = int(torch.randint(1, m + 1, (1,), generator=generator)) if num_steps is None else int(num_steps)
        if not 1 <= s <= m:
            raise ValueError(f"a rollout runs 1..{m} steps of this schedule, got {s}")
        k = min(self.config.k_graph_steps, s - 1)
        others = (torch.randperm(s - 1, generator=generator)[:k] + 1).tolist() if k else []
        return RolloutPlan(begin_index=m - s, num_steps=s, graph_positions=frozenset([0, *others]))

    def start(self, x0: torch.Tensor, noise: torch.Tensor, plan: RolloutPlan) -> torch.Tensor:
        """x_ts: `x0` noised to the plan's first timestep, in the sampler's sample space."""
        return noised_start(fresh_copy(self.scheduler_for(x0.shape), plan.begin_index), x0, noise, plan.begin_index)

    def start_timestep(self, plan: RolloutPlan, shape: Optional[Sequence[int]] = None) -> torch.Tensor:
        scheduler = self.template if shape is None else self.scheduler_for(shape)
        return scheduler.timesteps[plan.begin_index]

    def target(self, x0: torch.Tensor, noise: torch.Tensor, plan: RolloutPlan) -> torch.Tensor:
        """The diffusion-loss target for the first step's prediction (the model's own type)."""
        alpha, sigma = start_levels(self.scheduler_for(x0.shape), plan.begin_index, self.prediction_type)
        return prediction_target(self.prediction_type, x0, noise, alpha, sigma)

    def run(
        self,
        model: ModelAdapter,
        x_start: torch.Tensor,
        cond: Cond,
        plan: RolloutPlan,
        grad_mode: Optional[str] = None,
        record: bool = False,
    ) -> RolloutResult:
        mode = grad_mode or self.config.grad_mode
        if mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {mode!r}")
        if mode == "off":
            with torch.no_grad():
                return self._run(model, x_start, cond, plan, mode, record)
        return self._run(model, x_start, cond, plan, mode, record)

    def guided_inputs(self, model: ModelAdapter, cond: Cond, like: torch.Tensor) -> tuple[Cond, Optional[Cond], Optional[float]]:
        """(conditioning, unconditional conditioning or None, CFG scale or None) for the
        family's guidance mode and the configured guidance value."""
        guidance = self.family.guidance
        value = self.config.guidance_scale
        if guidance.mode == "embedded":
            return guidance_cond(cond, value, like), None, None
        scale = guidance.cfg_scale(value)
        return cond, (model.uncond(cond) if scale is not None else None), scale

    def _run(self, model, x_start, cond, plan, mode, record) -> RolloutResult:
        cond, uncond, scale = self.guided_inputs(model, cond, x_start)
        scheduler = fresh_copy(self.scheduler_for(x_start.shape), plan.begin_index)
        timesteps: Sequence[torch.Tensor] = scheduler.timesteps[plan.begin_index :]
        trace: Optional[list[StepRecord]] = [] if record else None
        x = x_start
        first_prediction = None
        graph_calls = 0
        for pos, t in enumerate(timesteps):
            with_graph = mode != "off" and pos in plan.graph_positions
            x_in = x.detach()  # sg(x): the denoiser never sees the path's graph
            if with_graph:
                model_input = _scale_model_input(scheduler, x_in, t)
                out, out_cond = self._denoise(model, model_input, t, cond, uncond, scale, True)
            else:
                with torch.inference_mode():  # no graph, and no autograd bookkeeping at all
                    model_input = _scale_model_input(scheduler, x_in, t)
                    out, out_cond = self._denoise(model, model_input, t, cond, uncond, scale, False)
                # Inference tensors may not enter autograd later (the straight-through sum, a
                # multistep sampler's history used at a graph step): a copy outside inference
                # mode is an ordinary tensor, for the price of copying one output.
                unguided = out_cond is out
                out = out.clone()
                out_cond = out if unguided else out_cond.clone()
            graph_calls += int(with_graph)
            if pos == 0:
                first_prediction = out_cond
            if trace is not None:
                trace.append(StepRecord(pos, t, x, out.detach(), with_graph))
            if mode == "adt":
                with torch.set_grad_enabled(with_graph):
                    prev = scheduler.step(out, t, x_in).prev_sample
                # straight-through: value of the exact step, identity Jacobian along the path
                x = prev + (x - x_in) if x.requires_grad else prev
            elif mode == "drtune":
                with torch.set_grad_enabled(torch.is_grad_enabled() and (with_graph or x.requires_grad)):
                    x = scheduler.step(out if with_graph else out.detach(), t, x).prev_sample
            else:
                x = scheduler.step(out, t, x).prev_sample
            detach_history(scheduler)
        return RolloutResult(x, first_prediction, plan, graph_calls, trace)

    def _denoise(self, model, model_input, t, cond, uncond, scale, with_graph):
        """(guided output, conditional output); `scale` None: one conditional pass."""
        if scale is None or uncond is None:
            scale, uncond = 1.0, None
        if with_graph and self.config.gradient_checkpointing:
            if uncond is None:
                return checkpoint(lambda inp: guided_denoise(model, inp, t, cond, None, 1.0), model_input, use_reentrant=False)
            # Guidance as two checkpointed halves, not one batch of 2B: backward then
            # recomputes one batch-B forward at a time, so a graph step's peak is that
            # of one fine-tuning step rather than twice it.
            def half(c):
                return checkpoint(lambda inp: guided_denoise(model, inp, t, c, None, 1.0)[0], model_input, use_reentrant=False)

            out_uncond, out_cond = half(uncond), half(cond)
            return out_uncond + scale * (out_cond - out_uncond), out_cond
        return guided_denoise(model, model_input, t, cond, uncond, scale)


def _scale_model_input(scheduler, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Euler-type schedulers keep x in sigma space and scale it for the model;
    # flow-matching schedulers have no such method.
    scale = getattr(type(scheduler), "scale_model_input", None)
    return sample if scale is None else scheduler.scale_model_input(sample, t)
