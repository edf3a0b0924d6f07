"""`adt`: Adversarial Diffusion Tuning (Algorithm 1).

One iteration:
  1. draw s over the inference schedule, noise x0 to x_ts, roll out with the real
     sampler (a graph through K + 1 denoiser calls on generator iterations only);
  2. decode x_hat_0 and x0 to pixels; update the discriminator with the hinge loss
     (Eq. 9) and its own AdamW; move the EMA twins;
  3. every H-th iteration return L_G = -sum_i D_i(x_hat_0) + lambda * L_diff(t_s)
     (Eq. 8) for the trainer to back-propagate; otherwise return the detached
     diffusion loss and `updates_generator=False`.

Options beyond the paper (the paper's formulation is `adv_balance="none"`,
`reference="self"`, `adv_warmup_steps=0`):

- `adv_balance="grad"`: L_G = w * L_adv + lambda * L_diff with w chosen every
  generator step so that, at the denoiser's first output (the one both terms
  share), the adversarial gradient's norm is `adv_ratio` times the diffusion
  term's. The balance then does not depend on the number of taps, the score's
  scale, the loss reductions, the resolution or the batch size, and it follows
  the diffusion loss as the model fits. It costs no extra pass through the
  discriminator or the decoder: their gradient w.r.t. x_hat_0 is taken once and
  the trainer's backward continues from it.
- `reference="same_cond"`: score x_hat_0 against a *different* real image of the
  batch with the same conditioning (itself when there is none); `"any"`: against
  any other image. From a start near pure noise the rollout cannot recover the
  specifics of the image that was noised; asking it to is asking for the
  impossible and teaches the discriminator instance identity instead of realism.
- `adv_warmup_steps`: the adversarial term's weight ramps linearly from 0 while the
  diffusion term is at full weight, so early generator steps do not follow a
  discriminator that has not learnt anything yet.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from ..adapter import ModelAdapter
from ..discriminator import Discriminator, build_discriminator
from ..families import ModelFamily
from ..losses import diffusion_loss, hinge_d_loss, hinge_g_loss
from ..noise import NoiseSchedule
from ..rollout import Rollout
from ..settings import AdtSettings
from .base import LossStrategy, StrategyOutput, TrainBatch


def linear_warmup(steps: int):
    return lambda step: 1.0 if steps <= 0 else min(1.0, (step + 1) / steps)


REFERENCES = ("self", "same_cond", "any")


def reference_indices(cond: Mapping[str, Optional[torch.Tensor]], mode: str, generator: torch.Generator) -> torch.Tensor:
    """For each sample i, the index of the real image its rollout is scored against.

    self: i. same_cond: a random j != i whose conditioning equals i's in every key
    (i itself if there is none). any: a random j != i."""
    tensors = [t for t in cond.values() if t is not None]
    if not tensors:
        raise ValueError("reference choice needs at least one conditioning tensor to read the batch size from")
    batch = tensors[0].shape[0]
    if mode == "self" or batch == 1:
        return torch.arange(batch)
    allowed = ~torch.eye(batch, dtype=torch.bool)
    if mode == "same_cond":
        for t in tensors:
            flat = t.detach().flatten(1).cpu() if t.ndim > 1 else t.detach().view(-1, 1).cpu()
            allowed &= (flat[:, None, :] == flat[None, :, :]).all(dim=-1)
    elif mode != "any":
        raise ValueError(f"reference must be one of {REFERENCES}, got {mode!r}")
    # a uniform random choice among the allowed j per row, drawn from the strategy's generator
    weights = torch.rand(batch, batch, generator=generator) * allowed
    choice = weights.argmax(dim=1)
    return torch.where(allowed.any(dim=1), choice, torch.arange(batch))


def balance_adversarial(
    g_adv: torch.Tensor,
    sample: torch.Tensor,
    first: torch.Tensor,
    diff_term: torch.Tensor,
    ratio: float,
    diff_output: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, float]:
    """(a stand-in for g_adv with the same value and parameter gradient, w) with
    w = ratio * |d diff_term / d diff_output| / |d g_adv / d first|.

    `first` is the denoiser output both terms depend on (the first rollout step's
    conditional prediction), `sample` the rollout's result x_hat_0; `diff_output`
    the prediction the diffusion term is computed from (default: `first`; another
    forward of the same shape when the term is taken at its own timestep). dg_adv/dx_hat_0
    is computed once (through the discriminator and the decoder, whose graph is
    then freed); the stand-in <g, x_hat_0> carries it on to the denoiser calls,
    so the trainer's backward does not repeat that part."""
    (grad_sample,) = torch.autograd.grad(g_adv, sample)
    stand_in = (grad_sample.detach() * (sample - sample.detach())).sum() + g_adv.detach()
    (adv_at_first,) = torch.autograd.grad(stand_in, first, retain_graph=True, allow_unused=True)
    (diff_at_first,) = torch.autograd.grad(diff_term, first if diff_output is None else diff_output, retain_graph=True)
    adv_norm = 0.0 if adv_at_first is None else float(adv_at_first.float().norm())
    if adv_norm == 0.0:  # the discriminator gives no signal: nothing to balance
        return stand_in, 0.0
    return stand_in, ratio * float(diff_at_first.float().norm()) / adv_norm


class AdtStrategy(LossStrategy):
    name = "adt"

    def __init__(
        self,
        scheduler_config: Mapping[str, Any],
        settings: AdtSettings,
        backbone: torch.nn.Module,
        device: Any = None,
        decoder: Optional[torch.nn.Module] = None,
        family: Optional[ModelFamily] = None,
    ):
        super().__init__(settings.seed)
        self.settings = settings
        # family: the model's facts (guidance mode, timesteps per latent size); None:
        # what a bare scheduler config implies (families.family_for_scheduler)
        self.rollout = Rollout(scheduler_config, settings.rollout_config(), device=device, family=family)
        self.schedule = NoiseSchedule(scheduler_config, family)  # for diff_timestep="uniform"
        self.decoder = decoder  # None: the model adapter's own decode
        self.disc: Discriminator = build_discriminator(backbone, settings.discriminator_config()).to(device)
        self.d_optimizer = torch.optim.AdamW(
            self.disc.trainable_parameters(), lr=settings.d_lr, weight_decay=settings.d_weight_decay
        )
        self.d_scheduler = torch.optim.lr_scheduler.LambdaLR(self.d_optimizer, linear_warmup(settings.d_warmup_steps))
        self._g_warmup = linear_warmup(settings.g_warmup_steps)
        self._adv_warmup = linear_warmup(settings.adv_warmup_steps)
        self.skipped_d_steps = 0
        _broadcast_from_rank0(self.disc)

    def generator_lr_factor(self, step: Optional[int] = None) -> float:
        return self._g_warmup((self.step if step is None else step) // self.micro_batches)

    def is_generator_step(self, step: Optional[int] = None) -> bool:
        """Every g_every-th optimizer step (window of `micro_batches` calls) updates the generator."""
        step = self.step if step is None else step
        return (step // self.micro_batches + 1) % self.settings.g_every == 0

    def __call__(self, model: ModelAdapter, batch: TrainBatch) -> StrategyOutput:
        g_step = self.is_generator_step()
        x0 = batch.x0
        plan = self.rollout.plan(self.generator)
        noise = self.randn_like(x0)
        x_start = self.rollout.start(x0, noise, plan)
        result = self.rollout.run(model, x_start, batch.cond, plan, grad_mode=None if g_step else "off")
        l_diff = diffusion_loss(result.first_prediction, self.rollout.target(x0, noise, plan))
        l_diff_g, diff_output = l_diff, None  # diff_output: the term's own prediction when it has one
        if g_step and self.settings.diff_timestep == "uniform":
            l_diff_g, diff_output = self._uniform_diffusion_loss(model, batch)

        decode = self.decoder or model.decode
        with torch.no_grad():
            real = decode(x0)
        with torch.set_grad_enabled(g_step):
            fake = decode(result.sample)

        disc = self.disc
        with torch.no_grad():
            real_online = disc.features(real, self.generator)
            real_target = None
            if disc.needs_reference:
                ref = reference_indices(batch.cond, self.settings.reference, self.generator)
                real_target = disc.features(real if self.settings.reference == "self" else real[ref.to(real.device)], self.generator)
        with torch.set_grad_enabled(g_step):
            fake_features = disc.features(fake, self.generator)

        logs = self._discriminator_step(real_online, real_target, fake_features)
        logs.update({"loss/diff": float(l_diff.detach()), "adt/rollout_steps": float(plan.num_steps)})

        if g_step:
            reference = disc.reference(real_target) if disc.needs_reference else None  # twins after their update
            with disc.frozen():
                g_adv = hinge_g_loss(disc.scores(fake_features, reference))
            diff_term = self.settings.lambda_diff * l_diff_g
            if diff_output is not None:
                logs["loss/diff_uniform"] = float(l_diff_g.detach())
            weight = self._adv_warmup(self.step)
            if self.settings.adv_balance == "grad":
                g_adv_term, balance = balance_adversarial(
                    g_adv, result.sample, result.first_prediction, diff_term, self.settings.adv_ratio, diff_output
                )
                weight *= balance
                logs["adt/balance"] = balance
            else:
                g_adv_term = g_adv
            loss = weight * g_adv_term + diff_term
            logs["adt/adv_weight"] = weight
            logs["loss/G_adv"] = float(g_adv.detach())
            logs["loss/G"] = float(loss.detach())
        else:
            loss = l_diff.detach()
        logs["lr/G_factor"] = self.generator_lr_factor()
        # Every forward in train mode (the D step, the twins' reference, the G scoring)
        # moved batch-norm statistics with this process's batch: make them equal again.
        _average_buffers(disc)
        self.step += 1
        return StrategyOutput(loss, g_step, logs)

    def _uniform_diffusion_loss(self, model: ModelAdapter, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain diffusion loss at a training timestep drawn uniformly (FT's), from
        its own noise: (loss, prediction). One more denoiser forward and backward per
        generator step; with a few-step sampler the rollout's start steps are only a
        handful of timesteps, and a diffusion term held to those leaves the others to drift."""
        x0 = batch.x0
        t = self.schedule.sample_timesteps(x0.shape[0], self.generator, latent_size=tuple(x0.shape[-2:])).to(x0.device)
        noise = self.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        if self.settings.gradient_checkpointing:  # like the rollout's graph steps: recomputed in backward
            prediction = checkpoint(lambda inp: model.denoise(inp, t, batch.cond), x_t, use_reentrant=False)
        else:
            prediction = model.denoise(x_t, t, batch.cond)
        return diffusion_loss(prediction, self.schedule.target(x0, noise, t)), prediction

    def _discriminator_step(self, real_online, real_target, fake_features) -> dict[str, float]:
        disc = self.disc
        reference = disc.reference(real_target) if disc.needs_reference else None
        d_real = disc.scores(real_online, reference)
        d_fake = disc.scores([f.detach() for f in fake_features], reference)
        l_d = hinge_d_loss(d_real, d_fake)
        logs = {
            "loss/D": float(l_d.detach()),
            "D/real": float(torch.stack([r.detach().mean() for r in d_real]).mean()),
            "D/fake": float(torch.stack([f.detach().mean() for f in d_fake]).mean()),
            "lr/D": self.d_optimizer.param_groups[0]["lr"],
        }
        self.d_optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(l_d):
            self.skipped_d_steps += 1
            logs["D/skipped"] = float(self.skipped_d_steps)
            return logs
        l_d.backward()
        _all_reduce_grads(self.d_optimizer)
        logs["grad_norm/D"] = float(
            torch.nn.utils.clip_grad_norm_(self.disc.trainable_parameters(), max_norm=float("inf"))
        )
        self.d_optimizer.step()
        self.d_optimizer.zero_grad(set_to_none=True)  # free them; the generator pass adds none
        self.d_scheduler.step()
        disc.update_twins()
        return logs

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            discriminator=self.disc.state_for_checkpoint(),
            d_optimizer=self.d_optimizer.state_dict(),
            d_scheduler=self.d_scheduler.state_dict(),
            skipped_d_steps=self.skipped_d_steps,
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        missing, unexpected = self.disc.load_state_dict(state["discriminator"], strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"discriminator state does not fit: missing {missing}, unexpected {unexpected}")
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.d_scheduler.load_state_dict(state["d_scheduler"])
        self.skipped_d_steps = int(state.get("skipped_d_steps", 0))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _broadcast_from_rank0(module: torch.nn.Module) -> None:
    """All processes start from rank 0's discriminator (heads, twins, batch-norm stats)."""
    if _distributed():
        for tensor in module.state_for_checkpoint().values():
            dist.broadcast(tensor, src=0)


def _average_buffers(module: torch.nn.Module) -> None:
    """Batch-norm running statistics (heads, predictors and twins) see each process's
    own batch; average them so that the discriminator and a saved checkpoint are the
    same everywhere. Only those: the other buffers (the input normalisation's mean
    and std) are constants. The generator's graph holds the running statistics too
    (batch norm's backward takes them as inputs, but in training mode does not use
    them), so they are averaged through `.data`, which leaves autograd's version
    counter alone."""
    if _distributed():
        world = dist.get_world_size()
        for name, buf in module.named_buffers():
            if name.endswith(("running_mean", "running_var")) and not name.startswith("backbone."):
                dist.all_reduce(buf.data, op=dist.ReduceOp.SUM)
                buf.data.div_(world)


def _all_reduce_grads(optimizer: torch.optim.Optimizer) -> None:
    """Average the discriminator's gradients over processes, so that every process
    takes the same step and the twins, updated from those weights, stay identical."""
    if not _distributed():
        return
    world = dist.get_world_size()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(world)
