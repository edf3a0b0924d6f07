"""`at`: adversarial training of the denoiser's input (Wang et al., ICLR 2025,
"Improved Diffusion-based Generative Model with Better Adversarial Robustness").

Sampling feeds the denoiser inputs that are off the training distribution; AT
trains on the worst inputs in a small ball around x_t instead of x_t itself:

    min_theta  E  max_{||delta|| <= eps}  || model(x_t + delta, t) - target(x0, eps + delta / sigma_t, t) ||^2

The target is corrected so that it stays consistent with the perturbed input:
x_t + delta = alpha_t x0 + sigma_t (eps + delta / sigma_t), i.e. the perturbation is
read as extra noise that the model must name (epsilon models: eps + delta / sigma_t;
v and flow targets follow from the same corrected noise). This is what makes it
different from IP, which keeps the original target.

delta is found Free-AT style, by normalised gradient ascent that reuses the
forward passes of training: start at delta = 0, and for each of `steps` replays of
the batch compute the loss, take its gradient w.r.t. delta, step by `step_size`
along the per-sample L2-normalised gradient and project back into the ball. The
paper's code takes an optimizer step after every replay; behind a once-per-step
interface the replays' losses are averaged instead (FreeLB), so the trainer's one
backward accumulates the parameter gradients of all replays.

Norms are per-element RMS, so one value fits every resolution and latent size:
||delta||_2 <= epsilon * sqrt(numel per sample); each ascent step has L2 norm
step_size * sqrt(numel). (The paper's CIFAR-10 script: 3 replays, ball 0.1 RMS,
step 0.1 in absolute L2 on 3x32x32, i.e. about 0.0018 RMS.)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ..adapter import ModelAdapter
from ..losses import diffusion_loss
from .base import StrategyOutput, TrainBatch, register_strategy
from .ft import FtStrategy

if TYPE_CHECKING:
    from ..settings import AdtSettings


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).float().norm(dim=1).view(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def project_to_ball(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale each sample's delta back onto the L2 ball of `radius` if it left it."""
    norm = _per_sample_norm(delta).clamp_min(1e-12)
    return delta * (radius / norm).clamp(max=1.0)


def ascend(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
    steps: int,
    epsilon: float,
    step_size: float,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(delta_k, loss_k)] for k = 0..steps-1: delta_0 = 0, then normalised ascent.

    `loss_fn(delta)` must return a scalar with a graph to delta; the graphs of all
    returned losses are kept for the caller's backward."""
    per_sample = math.sqrt(like[0].numel())
    radius, step = epsilon * per_sample, step_size * per_sample
    delta = torch.zeros_like(like)
    out = []
    for k in range(steps):
        last = k == steps - 1
        leaf = delta if last else delta.detach().requires_grad_(True)
        loss = loss_fn(leaf)
        out.append((delta.detach(), loss))
        if not last:
            (grad,) = torch.autograd.grad(loss, leaf, retain_graph=True)
            direction = grad / _per_sample_norm(grad).clamp_min(1e-12)
            delta = project_to_ball(delta.detach() + step * direction, radius)
    return out


@register_strategy
class AtStrategy(FtStrategy):
    name = "at"
    description = "adversarial training of the denoiser input: worst delta in a norm ball, target corrected (AT)"

    def __init__(
        self,
        scheduler_config: Mapping[str, Any],
        steps: int,
        epsilon: float,
        step_size: float,
        seed: int,
        micro_batches: int = 1,
        timestep_weighting: str = "uniform",
        family=None,
    ):
        super().__init__(scheduler_config, seed=seed, micro_batches=micro_batches, timestep_weighting=timestep_weighting, family=family)
        if steps < 1:
            raise ValueError(f"at_steps must be >= 1, got {steps}")
        self.steps, self.epsilon, self.step_size = int(steps), float(epsilon), float(step_size)

    @classmethod
    def from_settings(cls, settings: "AdtSettings", scheduler_config: Mapping[str, Any], *, micro_batches: int = 1, family=None, **_: Any):
        strategy = cls(
            scheduler_config,
            steps=settings.at_steps,
            epsilon=settings.at_epsilon,
            step_size=settings.at_step_size,
            seed=settings.seed,
            micro_batches=micro_batches,
            family=family,
        )
        strategy.settings = settings
        return strategy

    def run(self, model: ModelAdapter, batch: TrainBatch) -> StrategyOutput:
        x0, cond = batch.x0, batch.cond
        t, noise = self.draw(x0)
        _, sigma = self.schedule.alpha_sigma(t)
        sigma = sigma.to(device=x0.device, dtype=x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        x_t = self.schedule.add_noise(x0, noise, t)

        def loss_at(delta: torch.Tensor) -> torch.Tensor:
            # the perturbation is extra noise the model must name: the target uses eps + delta / sigma
            target = self.schedule.target(x0, noise + delta.detach() / sigma, t)
            return diffusion_loss(model.denoise(x_t + delta, t, cond), target)

        replays = ascend(loss_at, x_t, self.steps, self.epsilon, self.step_size)
        loss = torch.stack([l for _, l in replays]).mean()
        delta = replays[-1][0]
        rms = float(_per_sample_norm(delta).mean()) / math.sqrt(x0[0].numel())
        return StrategyOutput(
            loss,
            True,
            {"loss/diff": float(replays[0][1].detach()), "loss/at": float(loss.detach()), "at/delta_rms": rms},
        )
