"""Inference samplers the rollout can run: a name -> diffusers scheduler registry.

Every sampler is built from the *model's own* scheduler config (beta schedule,
prediction type, timestep spacing, shift), and its timesteps are set as the model
family's pipeline sets them for the latent size at hand (FLUX's sigmas and
resolution-dependent shift: `families`), so that the rollout follows exactly the
path the user's inference follows. Adding a sampler is one entry in `SAMPLERS`.

The backward-path constraint (Eq. 11) needs `step()` to be affine in the model
output and in the sample; the overrides below switch off the non-affine options
(sample clipping, dynamic thresholding, stochastic noise).
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .families import ModelFamily, family_for_scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerSpec:
    scheduler_class: type[SchedulerMixin]
    overrides: Mapping[str, Any] = field(default_factory=dict)
    flow: bool = False  # True: needs a flow-matching (velocity) model
    description: str = ""


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(
        DDIMScheduler,
        {"clip_sample": False, "thresholding": False},
        description="DDIM (eta 0)",
    ),
    "dpmsolver++": SamplerSpec(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "thresholding": False},
        description="DPM-Solver++ 2M",
    ),
    "dpmsolver++_karras": SamplerSpec(
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "thresholding": False, "use_karras_sigmas": True},
        description="DPM-Solver++ 2M with Karras sigmas",
    ),
    "euler": SamplerSpec(EulerDiscreteScheduler, {}, description="Euler (deterministic)"),
    "flow_euler": SamplerSpec(
        FlowMatchEulerDiscreteScheduler,
        {"stochastic_sampling": False},
        flow=True,
        description="flow-matching Euler (SD3)",
    ),
}

# Names users know from sd-scripts' --sample_sampler and ComfyUI.
ALIASES = {"dpmpp_2m": "dpmsolver++", "dpm++": "dpmsolver++", "dpms": "dpmsolver++", "flow": "flow_euler"}


def is_flow_config(scheduler_config: Mapping[str, Any]) -> bool:
    """True for flow-matching (rectified flow) models such as SD3."""
    return "FlowMatch" in str(scheduler_config.get("_class_name", ""))


def resolve_sampler_name(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(sorted(SAMPLERS))}")
    return key


def build_scheduler(
    scheduler_config: Mapping[str, Any],
    sampler: str,
    num_inference_steps: int,
    device: Any = None,
    family: Optional[ModelFamily] = None,
    latent_size: Optional[tuple[int, int]] = None,
) -> SchedulerMixin:
    """A scheduler for `sampler`, from the model's scheduler config, with timesteps set
    as `family`'s pipeline sets them for a latent of `latent_size` (h, w); default: the
    facts of a bare scheduler config at the family's usual size."""
    name = resolve_sampler_name(sampler)
    spec = SAMPLERS[name]
    flow_model = is_flow_config(scheduler_config)
    if spec.flow != flow_model:
        kind = "a flow-matching" if flow_model else "a noise-prediction (epsilon / v)"
        fitting = sorted(n for n, s in SAMPLERS.items() if s.flow == flow_model)
        raise ValueError(
            f"sampler {name!r} does not fit this model: its scheduler "
            f"({scheduler_config.get('_class_name', 'unknown')}) is {kind} model; use one of {', '.join(fitting)}"
        )
    config = dict(scheduler_config)
    for key in ("clip_sample", "thresholding"):
        if config.get(key):
            log.warning("the model's scheduler sets %s=True, which is not affine; the rollout turns it off", key)
    # Only options this diffusers version knows (older ones lack e.g. stochastic_sampling).
    accepted = inspect.signature(spec.scheduler_class.__init__).parameters
    config.update({k: v for k, v in spec.overrides.items() if k in accepted})
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    scheduler = spec.scheduler_class.from_config(config)
    family = family or family_for_scheduler(scheduler_config)
    family.set_timesteps(scheduler, num_inference_steps, tuple(latent_size or family.default_latent_size), device)
    return scheduler


def fresh_copy(template: SchedulerMixin, begin_index: int) -> SchedulerMixin:
    """A private copy of a prepared scheduler, positioned to start at `begin_index`.

    The copy keeps the rollout from touching the trainer's scheduler and from
    carrying multistep history from one rollout into the next.
    """
    scheduler = copy.deepcopy(template)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin_index)
    return scheduler


def detach_history(scheduler: SchedulerMixin) -> None:
    """Detach every tensor a scheduler keeps between steps (e.g. DPM-Solver's
    `model_outputs`), so that no gradient leaks from one step into another through
    the solver's history."""
    for name, value in vars(scheduler).items():
        if isinstance(value, list) and any(getattr(v, "requires_grad", False) for v in value):
            setattr(scheduler, name, [v.detach() if getattr(v, "requires_grad", False) else v for v in value])
        elif getattr(value, "requires_grad", False):
            setattr(scheduler, name, value.detach())
