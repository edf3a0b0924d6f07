"""Running a loss strategy inside a training loop we do not own.

sd-scripts and OneTrainer back-propagate the per-batch loss and step the
optimizer on every iteration. ADT's discriminator-only iterations (4 of 5 by
default) must leave the generator exactly where it is, so a trainer plugin uses
three small pieces from here:

  FunctionAdapter    a `ModelAdapter` from the trainer's own model calls;
  StrategyRunner     calls the strategy once per micro-batch and turns its output
                     into the tensor the foreign loop back-propagates (`loop_loss`);
  GeneratorStepGate  wraps the generator optimizer's `step`: skipped for
                     discriminator-only windows (AdamW's momentum and decoupled
                     weight decay would move the weights even with zero gradients),
                     and applying ADT's generator learning-rate warm-up to the steps
                     it lets through.

The loss handed to the loop has the *value* of the plain diffusion loss, which is
what the trainer's progress bar and loss curves have always shown, and the
*gradient* of the strategy's generator loss (none at all on D-only iterations).
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from .adapter import Cond
from .checkpoint import load_discriminator, save_discriminator
from .strategies import STRATEGIES, LossStrategy, StrategyOutput, TrainBatch

log = logging.getLogger(__name__)


@dataclass
class FunctionAdapter:
    """A `ModelAdapter` made of the trainer's own calls."""

    scheduler_config: Mapping[str, Any]
    denoise_fn: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
    uncond_fn: Callable[[Cond], Cond]
    decode_fn: Callable[[torch.Tensor], torch.Tensor]

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.denoise_fn(sample, timestep, cond)

    def uncond(self, cond: Cond) -> Cond:
        return self.uncond_fn(cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_fn(latents)


def loop_loss(out: StrategyOutput, zero_grad_params: Optional[Iterable[torch.Tensor]] = None) -> torch.Tensor:
    """The tensor to hand a loop that always calls backward on it.

    Its value is the diffusion loss (`logs["loss/diff"]`, else the strategy's loss).
    Generator iterations: its gradient is that of `out.loss`. Discriminator-only
    iterations: no gradient reaches the generator; by default nothing at all (a
    fresh leaf), or, given `zero_grad_params`, exact zero gradients for those
    parameters (for loops whose GradScaler insists that every stepped optimizer
    recorded gradients).

    The shown value is `shown + (loss - loss)`: `loss - loss` is exactly 0 for
    any finite loss, so the value is the diffusion loss to the last bit however
    large the generator loss is. (`loss + (shown - loss)` would round `shown`
    away in float32 once |loss| is some 1e7 times larger.)"""
    shown = out.logs.get("loss/diff")
    if out.updates_generator:
        if shown is None:
            return out.loss
        return torch.as_tensor(shown, dtype=out.loss.dtype, device=out.loss.device) + (out.loss - out.loss.detach())
    value = out.loss.detach().clone()
    if zero_grad_params is None:
        return value.requires_grad_(True)
    zero = value.new_zeros(())
    for param in zero_grad_params:
        if param.requires_grad:
            zero = zero + param.sum().to(value.dtype) * 0.0
    return value + zero


GENERATOR_STEPS = "generator_steps"  # discriminator-file metadata: StrategyRunner.generator_steps


class StrategyRunner:
    """One strategy inside a foreign loop: decisions, logs, checkpoints.

    The loop's gradient accumulation is the strategy's `micro_batches` (a
    constructor argument: `build_strategy(..., micro_batches=...)`): generator and
    discriminator-only iterations then alternate by whole optimizer steps."""

    def __init__(self, strategy: LossStrategy):
        self.strategy = strategy
        self.updates_generator = True  # the decision of the latest call (= of its window)
        self.logs: dict[str, float] = {}
        #: windows that updated the generator so far; saved with the discriminator, so a
        #: resumed run counts on
        self.generator_steps = 0

    @property
    def micro_batches(self) -> int:
        return self.strategy.micro_batches

    def __call__(
        self,
        adapter: FunctionAdapter,
        x0: torch.Tensor,
        cond: Cond,
        zero_grad_params: Optional[Iterable[torch.Tensor]] = None,
        closes_window: Optional[bool] = None,
    ) -> torch.Tensor:
        """Run the strategy on one micro-batch; return the loss for the loop.

        `closes_window`: whether the loop steps its optimizer after this micro-batch.
        A window the loop closes early (the last, partial window of an epoch) is
        rounded up, so that the strategy's windows keep starting where the loop's do."""
        out = self.strategy(adapter, TrainBatch(x0=x0, cond=cond))
        if closes_window:
            self.strategy.close_window()
        closes = closes_window if closes_window is not None else self.strategy.step % self.micro_batches == 0
        if out.updates_generator and closes:
            self.generator_steps += 1
        self.updates_generator = out.updates_generator
        self.logs = {**out.logs, "adt/generator_steps": float(self.generator_steps)}
        return loop_loss(out, zero_grad_params)

    def generator_lr_factor(self) -> float:
        """Warm-up factor for the optimizer step that closes the latest call's window."""
        return self.strategy.latest_generator_lr_factor()

    @property
    def has_discriminator(self) -> bool:
        return self.strategy.has_discriminator

    def save(self, path: str | Path, extra_metadata: Optional[Mapping[str, Any]] = None) -> Optional[Path]:
        if not self.has_discriminator:
            return None
        return save_discriminator(path, self.strategy, {**(extra_metadata or {}), GENERATOR_STEPS: str(self.generator_steps)})

    def load(self, path: str | Path) -> dict[str, str]:
        metadata = load_discriminator(path, self.strategy)
        self.generator_steps = int(metadata.get(GENERATOR_STEPS, 0))
        return metadata


class GeneratorStepGate:
    """Wraps `optimizer.step` on the instance: no step for windows that did not
    update the generator; the generator warm-up factor on the learning rates of
    the steps it lets through (restored right after, so the trainer's own
    scheduler and logs are untouched). `on_skip` runs instead of a skipped step
    (e.g. to clear a GradScaler's per-step state). `steps_now` says whether a call
    is a real step (accelerate's optimizer ignores calls between accumulation
    boundaries; those pass through untouched)."""

    def __init__(
        self,
        optimizer: Any,
        runner: StrategyRunner,
        on_skip: Optional[Callable[[], None]] = None,
        steps_now: Optional[Callable[[], bool]] = None,
    ):
        self.optimizer = optimizer
        self.runner = runner
        self.on_skip = on_skip
        self.steps_now = steps_now
        self.skipped = 0
        self.taken = 0
        self.removed = False
        self._had_instance_step = "step" in vars(optimizer)
        self._step = optimizer.step
        gate = self

        def step(optimizer_self: Any, *args: Any, **kwargs: Any) -> Any:
            return gate._gated_step(*args, **kwargs)

        # bound to the optimizer like its own `step`: torch's LR schedulers re-bind
        # `optimizer.step.__func__` to the optimizer when they wrap it
        self._gated = types.MethodType(step, optimizer)
        optimizer.step = self._gated

    def _gated_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.removed or (self.steps_now is not None and not self.steps_now()):
            return self._step(*args, **kwargs)
        if not self.runner.updates_generator:
            self.skipped += 1
            if self.on_skip is not None:
                self.on_skip()
            return None
        self.taken += 1
        factor = self.runner.generator_lr_factor()
        groups = self.optimizer.param_groups
        saved = [group["lr"] for group in groups]
        try:
            if factor != 1.0:
                for group in groups:
                    group["lr"] = group["lr"] * factor
            return self._step(*args, **kwargs)
        finally:
            for group, lr in zip(groups, saved):
                group["lr"] = lr

    def remove(self) -> None:
        """Stop gating (the optimizer's own step runs again)."""
        self.removed = True
        if vars(self.optimizer).get("step") is self._gated:
            if self._had_instance_step:
                self.optimizer.step = self._step
            else:
                del self.optimizer.step


def check_family_fits(settings: Any, family: Any, prefix: str = "") -> None:
    """Refuse, before any model loads, ADT settings the model family's sampler would not
    run: a rollout sampler of the other kind (flow vs noise prediction), a guidance value
    a guidance-distilled family ignores. `prefix` spells the settings as the front end
    does ("--adt_", "adt."). Only the `adt` strategy rolls out."""
    from .samplers import SAMPLERS, resolve_sampler_name
    from .settings import SettingsError

    if settings.strategy != "adt":
        return
    if family.prediction and SAMPLERS[resolve_sampler_name(settings.sampler)].flow != family.flow:
        fitting = sorted(name for name, spec in SAMPLERS.items() if spec.flow == family.flow)
        raise SettingsError(f"{prefix}sampler {settings.sampler!r} does not fit {family.label}; use one of {', '.join(fitting)}")
    try:
        family.guidance.check(settings.guidance_scale, family.label)
    except ValueError as err:
        raise SettingsError(f"{prefix}guidance_scale: {err}") from None


def start_line(settings: Any, model_label: str, family: Any = None) -> str:
    """What a trainer plugin prints at start: the strategy and what it does with its settings
    (the rollout, its guidance as the model family uses it, and H only where the strategy
    has them)."""
    s = settings
    if s.strategy == "adt":
        mode = family.guidance.mode if family is not None else "cfg"
        guidance = {"cfg": f"CFG {s.guidance_scale}", "embedded": f"embedded guidance {s.guidance_scale}",
                    "none": "no guidance"}[mode]
        mix = f"; an ADT step every {s.adt_every} generator update(s), plain FT steps between" if s.adt_every > 1 else ""
        mix += f"; the first {s.adt_start} generator updates plain FT steps" if s.adt_start else ""
        what = (
            f"rollout {s.sampler} x {s.num_inference_steps} steps (graph through {s.k_graph_steps}) on "
            f"{s.rollout_share:g} of the batch, "
            f"{guidance}, {s.discriminator} discriminator on {s.backbone_path} taps "
            f"{','.join(map(str, s.taps))}"
            + (f" (between rollouts on the latest {s.rollout_buffer})" if s.rollout_buffer else "")
            + f", generator update every {s.g_every} iteration(s){mix}"
        )
    elif s.strategy == "ft":
        what = "plain diffusion loss at uniform timesteps, a generator update every iteration"
    elif s.strategy == "ip":
        what = f"input perturbation (DDPM-IP) gamma {s.ip_gamma}, a generator update every iteration"
    elif s.strategy == "at":
        what = (
            f"adversarial input perturbation, {s.at_steps} replays, epsilon {s.at_epsilon}, step {s.at_step_size}, "
            "a generator update every iteration"
        )
    else:  # a strategy registered later: its one-line description
        what = getattr(STRATEGIES.get(s.strategy), "description", "")
    return f"ADT: strategy {s.strategy}, {model_label}: {what}"


__all__ = ["FunctionAdapter", "GeneratorStepGate", "StrategyRunner", "check_family_fits", "loop_loss", "start_line"]
