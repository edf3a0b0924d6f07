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
  w is at most `MAX_ADV_WEIGHT` = 1, the weight Eq. 8 gives L_adv (see there why).
- `reference="same_cond"`: score x_hat_0 against a *different* real image of the
  batch with the same conditioning (itself when there is none); `"any"`: against
  any other image. From a start near pure noise the rollout cannot recover the
  specifics of the image that was noised; asking it to is asking for the
  impossible and teaches the discriminator instance identity instead of realism.
- `adv_warmup_steps`: the adversarial term's weight ramps linearly from 0 while the
  diffusion term is at full weight, so early generator steps do not follow a
  discriminator that has not learnt anything yet.

What a run spends (every call's cost is counted, see `base.Cost`):

- `adt_every`, `adt_start`: only every n-th generator step (after the first
  `adt_start`) is an ADT step; the others are plain FT steps (FT's loss and draws,
  1 forward + 1 backward), so the adversarial term rides on a share of the steps;
- `rollout_buffer`: the latest n rollouts are kept, and a discriminator step with
  no fresh rollout of its own (a discriminator-only call, or an FT step of the mix)
  takes one of them: H discriminator steps per generator step cost one rollout,
  and a discriminator-only call makes no denoiser call;
- `rollout_share`: only the first share of the batch rolls out (the diffusion term
  still sees the whole batch).
The no-graph steps of a rollout run under `torch.inference_mode` (see rollout.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch
from torch.utils.checkpoint import checkpoint

from ..discriminator import Discriminator, build_discriminator
from ..distributed import all_true, average_batch_norm_stats, average_gradients, broadcast_from_rank0
from ..families import ModelFamily
from ..losses import diffusion_loss, hinge_d_loss, hinge_g_loss
from ..noise import NoiseSchedule
from ..rollout import Rollout
from .base import CountingAdapter, LossStrategy, StrategyOutput, TrainBatch, register_strategy

if TYPE_CHECKING:
    from ..settings import AdtSettings


def linear_warmup(steps: int):
    return lambda step: 1.0 if steps <= 0 else min(1.0, (step + 1) / steps)


#: The ceiling of the balanced adversarial weight w: 1, L_adv's weight in the paper's Eq. 8.
#:
#: The balance exists to tame an adversarial gradient that is too strong (taken
#: literally it is about 10x the diffusion gradient on the digits, and wrecks the
#: samples); it must not amplify one that is too weak. The adversarial gradient at
#: the first output is weak when the discriminator has almost nothing to say: an
#: untrained or near-constant discriminator, or a rollout whose first step barely
#: moves x_hat_0 (one step from t = 1: DDIM's eps coefficient there is about 0.01).
#: w = ratio * |g_diff| / |g_adv| then grows without bound (5e7 was seen in a real
#: sd-scripts run), and what it amplifies is the discriminator's noise, pushed with
#: the full force of `adv_ratio` x the diffusion gradient, while L_G's value grows
#: to where float32 loses the diffusion term beside it. Capped at 1, such a step
#: is the paper's own formulation (L_adv + lambda L_diff): the adversarial term
#: keeps the little say its gradient has and the diffusion term leads. The cap
#: needs no state and no new setting, and it does not bite where the balance does
#: its job (measured on the full digits demo, seed 0: w between 0.004 and 0.18).
MAX_ADV_WEIGHT = 1.0

#: the values of the settings `reference`, `adv_balance` and `diff_timestep` (checked by AdtSettings)
REFERENCES = ("self", "same_cond", "any")
ADV_BALANCES = ("none", "grad")
DIFF_TIMESTEPS = ("start", "uniform")


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


@register_strategy
class AdtStrategy(LossStrategy):
    name = "adt"
    description = "Adversarial Diffusion Tuning: rollout + discriminator + lambda x diffusion loss"

    def __init__(
        self,
        scheduler_config: Mapping[str, Any],
        settings: "AdtSettings",
        backbone: torch.nn.Module,
        device: Any = None,
        decoder: Optional[torch.nn.Module] = None,
        family: Optional[ModelFamily] = None,
        micro_batches: int = 1,
    ):
        super().__init__(settings.seed, micro_batches)
        self.settings = settings
        # the rollout's graph steps and the uniform diffusion term are checkpointed calls
        self.recomputes_graph = settings.gradient_checkpointing
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
        #: recent rollouts for discriminator steps without a fresh one (`rollout_buffer`), oldest first
        self.buffer: list[dict[str, Any]] = []
        # all processes start from rank 0's discriminator (heads, twins, batch-norm stats)
        broadcast_from_rank0(self.disc.state_for_checkpoint().values())

    @classmethod
    def from_settings(
        cls,
        settings: "AdtSettings",
        scheduler_config: Mapping[str, Any],
        *,
        micro_batches: int = 1,
        device: Any = None,
        backbone: Optional[torch.nn.Module] = None,
        backbone_loader: Optional[Callable[[], torch.nn.Module]] = None,
        family: Optional[ModelFamily] = None,
    ) -> "AdtStrategy":
        """Backbone: the one given, else `backbone_loader()`, else DINOv2 from
        `settings.backbone_path`; decoder: `settings.decoder_path` if set."""
        if backbone is None:
            if backbone_loader is None:
                from ..backbones import load_dinov2

                backbone = load_dinov2(settings.backbone_path, settings.taps)
            else:
                backbone = backbone_loader()
        decoder = None
        if settings.decoder_path:
            from ..decode import load_tiny_decoder

            decoder = load_tiny_decoder(settings.decoder_path, device)
        return cls(scheduler_config, settings, backbone.to(device), device=device, decoder=decoder, family=family, micro_batches=micro_batches)

    @property
    def discriminator(self) -> Discriminator:
        return self.disc

    def generator_lr_factor(self, step: Optional[int] = None) -> float:
        return self._g_warmup((self.step if step is None else step) // self.micro_batches)

    def call_kind(self, step: Optional[int] = None) -> str:
        """What call `step` (default: the next) does, decided per window of `micro_batches` calls:

        "d_only": a discriminator step, no generator loss (g_every - 1 windows of every g_every);
        "ft": a generator window that is a plain FT step (before `adt_start` generator steps,
              and all but every `adt_every`-th after), plus a discriminator step on a buffered
              rollout when `rollout_buffer` > 0;
        "adt": a rollout with a graph, a discriminator step and the generator loss of Eq. 8."""
        s = self.settings
        window = (self.step if step is None else step) // self.micro_batches
        if (window + 1) % s.g_every:
            return "d_only"
        g = (window + 1) // s.g_every - 1  # generator steps before this one
        if g < s.adt_start or (g - s.adt_start + 1) % s.adt_every:
            return "ft"
        return "adt"

    def is_generator_step(self, step: Optional[int] = None) -> bool:
        """Every g_every-th optimizer step (window of `micro_batches` calls) updates the generator."""
        return self.call_kind(step) != "d_only"

    def next_call_updates_generator(self) -> bool:
        return self.is_generator_step()

    def run(self, model: CountingAdapter, batch: TrainBatch) -> StrategyOutput:
        kind = self.call_kind()
        if kind == "ft":
            return self._ft_call(model, batch)
        if kind == "d_only" and self.buffer:
            # a discriminator step on a recent rollout: no denoiser call, no decode
            logs, diff = self._buffered_discriminator_step(model)
            logs.update({"loss/diff": diff, "adt/rollout_steps": 0.0, "adt/adversarial": 0.0})
            logs["lr/G_factor"] = self.generator_lr_factor()
            average_batch_norm_stats(self.disc)
            return StrategyOutput(batch.x0.new_tensor(diff), False, logs)
        return self._rollout_call(model, batch, g_step=kind == "adt")

    def _ft_call(self, model: CountingAdapter, batch: TrainBatch) -> StrategyOutput:
        """A plain FT step (FT's loss and draws), and a discriminator step on a buffered
        rollout if there is a buffer: the discriminator keeps learning between rollouts."""
        model.recomputes_graph = False  # not checkpointed: it costs what an FT step costs
        loss, _ = self._uniform_diffusion_loss(model, batch, checkpointed=False)
        logs = {"loss/diff": float(loss.detach()), "adt/rollout_steps": 0.0, "adt/adversarial": 0.0}
        if self.buffer:
            d_logs, _ = self._buffered_discriminator_step(model)
            logs.update(d_logs)
            average_batch_norm_stats(self.disc)
        logs["lr/G_factor"] = self.generator_lr_factor()
        return StrategyOutput(loss, True, logs)

    def _rollout_rows(self, batch: TrainBatch) -> TrainBatch:
        """The first ceil(rollout_share x B) rows (a loop's batches are shuffled already)."""
        b = batch.x0.shape[0]
        n = max(1, math.ceil(self.settings.rollout_share * b - 1e-9))
        if n >= b:
            return batch
        return TrainBatch(batch.x0[:n], {k: (v[:n] if v is not None else None) for k, v in batch.cond.items()})

    def _rollout_call(self, model: CountingAdapter, batch: TrainBatch, g_step: bool) -> StrategyOutput:
        rows = self._rollout_rows(batch)
        x0 = rows.x0
        plan = self.rollout.plan(self.generator)
        noise = self.randn_like(x0)
        x_start = self.rollout.start(x0, noise, plan)
        result = self.rollout.run(model, x_start, rows.cond, plan, grad_mode=None if g_step else "off")
        l_diff = diffusion_loss(result.first_prediction, self.rollout.target(x0, noise, plan))
        l_diff_g, diff_output = l_diff, None  # diff_output: the term's own prediction when it has one
        if g_step and self.settings.diff_timestep == "uniform":
            l_diff_g, diff_output = self._uniform_diffusion_loss(model, batch)  # the whole batch

        def decode(latents: torch.Tensor) -> torch.Tensor:
            return model.decode(latents) if self.decoder is None else model.counted_decode(self.decoder, latents)

        with torch.no_grad():
            real = decode(x0)
        with torch.set_grad_enabled(g_step):
            fake = decode(result.sample)

        disc = self.disc
        real_online, real_target, fake_features, ref = self._features(model, real, fake, rows.cond, None, g_step)
        if self.settings.rollout_buffer:
            self.buffer.append(
                {"real": real.detach(), "fake": fake.detach(), "ref": ref, "diff": float(l_diff.detach())}
            )
            del self.buffer[: -self.settings.rollout_buffer]

        logs = self._discriminator_step(real_online, real_target, fake_features)
        logs.update(
            {"loss/diff": float(l_diff.detach()), "adt/rollout_steps": float(plan.num_steps), "adt/adversarial": float(g_step)}
        )

        if g_step:
            reference = disc.reference(real_target) if disc.needs_reference else None  # twins after their update
            with disc.frozen():
                g_adv = hinge_g_loss(disc.scores(fake_features, reference))
            diff_term = self.settings.lambda_diff * l_diff_g
            if diff_output is not None:
                logs["loss/diff_uniform"] = float(l_diff_g.detach())
            weight = self._adv_warmup(self.step)
            if self.settings.adv_balance == "grad":
                g_adv_term, unbounded = balance_adversarial(
                    g_adv, result.sample, result.first_prediction, diff_term, self.settings.adv_ratio, diff_output
                )
                balance = min(unbounded, MAX_ADV_WEIGHT)
                weight *= balance
                logs["adt/balance"] = balance
                logs["adt/balance_unbounded"] = unbounded
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
        average_batch_norm_stats(disc)
        return StrategyOutput(loss, g_step, logs)

    def _features(self, model: CountingAdapter, real, fake, cond, ref, fake_grad: bool):
        """The discriminator's backbone features of the real images, their references and the
        samples: (real_online, real_target, fake_features, reference indices or None).
        `ref`: the references' indices (a buffered rollout's), else drawn from `cond`."""
        disc = self.disc
        with torch.no_grad():
            real_online = disc.features(real, self.generator)
            real_target = None
            if disc.needs_reference:
                if ref is None:
                    ref = reference_indices(cond, self.settings.reference, self.generator)
                if self.settings.reference == "self" and not disc.policy:
                    real_target = real_online  # no augmentation: the same features, not computed twice
                else:
                    real_target = disc.features(real if self.settings.reference == "self" else real[ref.to(real.device)], self.generator)
        with torch.set_grad_enabled(fake_grad):
            fake_features = disc.features(fake, self.generator)
        passes = 2 + (real_target is not None and real_target is not real_online)
        model.count_discriminator(real.shape[0] * passes)
        return real_online, real_target, fake_features, ref

    def _buffered_discriminator_step(self, model: CountingAdapter) -> tuple[dict[str, float], float]:
        """A discriminator step on one of the buffered rollouts (drawn at random; fresh
        augmentations): (logs, that rollout's diffusion loss)."""
        index = int(torch.randint(len(self.buffer), (1,), generator=self.generator))
        entry = self.buffer[index]
        real_online, real_target, fake_features, _ = self._features(
            model, entry["real"], entry["fake"], None, entry["ref"], False
        )
        logs = self._discriminator_step(real_online, real_target, fake_features)
        logs["adt/buffer_age"] = float(len(self.buffer) - 1 - index)
        return logs, entry["diff"]

    def _uniform_diffusion_loss(
        self, model: CountingAdapter, batch: TrainBatch, checkpointed: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain diffusion loss at a training timestep drawn uniformly (FT's), from
        its own noise: (loss, prediction). One more denoiser forward and backward per
        generator step; with a few-step sampler the rollout's start steps are only a
        handful of timesteps, and a diffusion term held to those leaves the others to drift."""
        x0 = batch.x0
        t = self.schedule.sample_timesteps(x0.shape[0], self.generator, latent_size=tuple(x0.shape[-2:])).to(x0.device)
        noise = self.randn_like(x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        if checkpointed and self.settings.gradient_checkpointing:  # like the rollout's graph steps: recomputed in backward
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
        # every process skips when any one's loss is not finite: the others would wait in the
        # gradient all-reduce below for a process that never joins it
        if not all_true(bool(torch.isfinite(l_d)), device=l_d.device):
            self.skipped_d_steps += 1
            logs["D/skipped"] = float(self.skipped_d_steps)
            return logs
        l_d.backward()
        # the same step in every process, so the twins (updated from these weights) stay identical
        average_gradients((p for group in self.d_optimizer.param_groups for p in group["params"]), zero_fill=False)
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
            buffer=[dict(entry) for entry in self.buffer],
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
        device = self.disc.trainable_parameters()[0].device
        self.buffer = [  # states saved before the buffer existed: empty
            {
                "real": entry["real"].to(device),
                "fake": entry["fake"].to(device),
                "ref": None if entry.get("ref") is None else entry["ref"].cpu(),
                "diff": float(entry["diff"]),
            }
            for entry in state.get("buffer", [])
        ]

