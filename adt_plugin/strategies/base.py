"""The contract between a loss strategy and the training loop that calls it.

    strategy = build_strategy(settings, scheduler_config, micro_batches=accumulation)
    for each micro-batch:
        out = strategy(model_adapter, TrainBatch(x0=latents, cond=conditioning))
        if out.updates_generator:
            backward(out.loss)
        if this micro-batch closes the loop's optimizer window:
            if the loop closed it early (end of an epoch): strategy.close_window()
            if out.updates_generator: step the generator's optimizer at
                lr x strategy.latest_generator_lr_factor()
        log(out.logs)                       # includes cost/... (see `Cost`)
    save: strategy.state_dict() (and, if strategy.has_discriminator, the
          discriminator file, see checkpoint.py); resume: load_state_dict

What a strategy declares, so that no loop has to look inside it:

- `updates_generator` on every output, and `next_call_updates_generator()` before
  a call (a loop that prepares differently for discriminator-only calls asks it);
- `micro_batches`, fixed at construction: the calls that make up one optimizer
  step. A strategy that alternates generator and discriminator-only calls decides
  per window of that many calls, so an accumulated step never mixes the two;
  `close_window()` tells it the loop stepped before the window was full;
- `generator_lr_factor(step)` / `latest_generator_lr_factor()`: the multiplier
  the loop applies to the generator's learning rate (ADT's warm-up);
- `has_discriminator` and `discriminator` (None without one): what is saved
  beside the model, fingerprinted and kept in sync across processes;
- `settings`: the `AdtSettings` it was built from (recorded in checkpoints);
- `state_dict()` / `load_state_dict()`: everything the strategy owns (its call
  count, random generator, cost totals; ADT: discriminator and its optimizer),
  so that a resumed run draws exactly what an uninterrupted run would have drawn;
- `cost_total`: what all calls so far spent (`Cost`), part of the state.

A subclass implements `run(model, batch)` and registers itself by name with
`@register_strategy`; `__call__` wraps the model in a `CountingAdapter`, counts the
call, and adds the cost to the output and its logs.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch

from ..adapter import Cond, ModelAdapter
from ..distributed import rank

if TYPE_CHECKING:  # settings import the registry below; strategies only need the type
    from ..discriminator import Discriminator
    from ..families import ModelFamily
    from ..settings import AdtSettings


@dataclass
class TrainBatch:
    x0: torch.Tensor  # clean latents (pixels for pixel-space models), [B, ...]
    cond: Cond


@dataclass(frozen=True)
class Cost:
    """What a call spent, in denoiser forward-equivalents on the training batch.

    One denoiser forward on the B training samples is 1; a classifier-free-guided
    forward on 2B rows is 2; a backward through the denoiser counts as 2 forwards;
    a forward recomputed in backward (gradient checkpointing at the adapter
    boundary) as 1 more. One plain fine-tuning step (FT) is 1 forward + 1 backward
    = 3, so `ft_steps` = `forward_equiv` / 3 says what the same compute would buy
    in FT steps. Counted rows through `ModelAdapter.denoise`, not by formula (see
    `CountingAdapter`); the backward the loop runs after a generator call is
    included (2 per graph forward), checkpointing inside the trainer's own model
    is not (it costs FT the same).

    The decoder (VAE or tiny decoder) and the discriminator are not denoiser
    passes; their forward passes are reported on their own, in batch units
    (the generator's backward through them is not counted)."""

    forwards: float = 0.0  # denoiser forwards, with a graph or without
    graph_forwards: float = 0.0  # of those, the ones that kept a graph for backward
    backward: float = 0.0  # backward passes through the denoiser, in forward-equivalents
    recompute: float = 0.0  # forwards recomputed in backward (gradient checkpointing)
    decoder: float = 0.0  # decoder forward passes
    discriminator: float = 0.0  # discriminator forward passes (frozen backbone + heads)

    @property
    def forward_equiv(self) -> float:
        return self.forwards + self.backward + self.recompute

    @property
    def ft_steps(self) -> float:
        return self.forward_equiv / 3.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)})

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Cost":
        return cls(**{f.name: float(values.get(f.name, 0.0)) for f in dataclasses.fields(cls)})


@dataclass
class StrategyOutput:
    #: what to back-propagate when `updates_generator`; else the detached plain
    #: diffusion loss, for logging only
    loss: torch.Tensor
    updates_generator: bool
    logs: dict[str, float] = field(default_factory=dict)
    #: what this call spent (filled in by `LossStrategy.__call__`)
    cost: Cost = field(default_factory=Cost)


class CountingAdapter:
    """A `ModelAdapter` that passes every call through to `model` and counts the
    rows that go through `denoise` (with a graph or without) and `decode`, while
    the strategy call it was made for is open.

    Backward passes made inside the call (AT's ascent, which differentiates
    w.r.t. the denoiser's input) are counted by a hook on the input. After the
    call is closed nothing more is counted: the loop's backward is accounted for
    by the strategy (2 per graph forward, when the call updates the generator),
    and forwards that gradient checkpointing recomputes during it by
    `recomputes_graph` (1 per graph forward), both known when the call returns."""

    def __init__(self, model: ModelAdapter, batch_rows: int, recomputes_graph: bool = False):
        self.model = model
        self.scheduler_config = model.scheduler_config
        self.batch_rows = max(1, int(batch_rows))
        self.recomputes_graph = recomputes_graph
        self.open = True
        self.rows = {"nograd": 0, "graph": 0, "backward": 0, "decoder": 0, "discriminator": 0}

    def denoise(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        out = self.model.denoise(sample, timestep, cond)
        if self.open:
            rows = int(sample.shape[0])
            self.rows["graph" if torch.is_grad_enabled() and out.requires_grad else "nograd"] += rows
            if torch.is_grad_enabled() and sample.requires_grad:
                sample.register_hook(self._backward_hook(rows))
        return out

    def _backward_hook(self, rows: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if self.open:  # a backward through the denoiser to its input, inside the call
                self.rows["backward"] += rows

        return hook

    def uncond(self, cond: Cond) -> Cond:
        return self.model.uncond(cond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.counted_decode(self.model.decode, latents)

    def counted_decode(self, decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor) -> torch.Tensor:
        """`decode(latents)`, counted as a decoder pass (for a decoder the strategy owns)."""
        if self.open:
            self.rows["decoder"] += int(latents.shape[0])
        return decode(latents)

    def count_discriminator(self, rows: int) -> None:
        """The strategy ran its discriminator on `rows` images (not a denoiser call)."""
        if self.open:
            self.rows["discriminator"] += int(rows)

    def close(self, updates_generator: bool) -> Cost:
        """Stop counting; what the call spent, with the backward the loop will run."""
        self.open = False
        b, rows = float(self.batch_rows), self.rows
        graph = rows["graph"] / b
        back_propagated = graph if updates_generator else 0.0
        return Cost(
            forwards=(rows["nograd"] + rows["graph"]) / b,
            graph_forwards=graph,
            backward=2.0 * (rows["backward"] / b + back_propagated),
            recompute=back_propagated if self.recomputes_graph else 0.0,
            decoder=rows["decoder"] / b,
            discriminator=rows["discriminator"] / b,
        )


#: name -> class; filled by `@register_strategy`, read by `build_strategy` and the settings' check
STRATEGIES: dict[str, type["LossStrategy"]] = {}


def register_strategy(cls: type["LossStrategy"]) -> type["LossStrategy"]:
    """Class decorator: make a strategy buildable by its `name` (`AdtSettings.strategy`)."""
    if not cls.name or cls.name in STRATEGIES:
        raise ValueError(f"strategy name {cls.name!r} is empty or already registered")
    STRATEGIES[cls.name] = cls
    return cls


class LossStrategy(ABC):
    #: the name users type (`strategy = "..."`), and a one-line description
    name: str = ""
    description: str = ""
    #: the settings it was built from (None when constructed directly)
    settings: Optional["AdtSettings"] = None
    #: whether `__call__` counts the graph forwards as recomputed in backward
    #: (the strategy checkpoints its own denoiser calls)
    recomputes_graph: bool = False

    def __init__(self, seed: int, micro_batches: int = 1):
        if int(micro_batches) < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        #: calls that make up one optimizer step (the loop's gradient accumulation)
        self.micro_batches = int(micro_batches)
        self.step = 0  # calls made so far
        self.cost_total = Cost()
        # Each process draws its own start steps, noise and augmentations (the
        # discriminator's weights stay identical through its gradient all-reduce).
        self.generator = torch.Generator().manual_seed(seed + rank())

    @classmethod
    @abstractmethod
    def from_settings(
        cls,
        settings: "AdtSettings",
        scheduler_config: Mapping[str, Any],
        *,
        micro_batches: int = 1,
        device: Any = None,
        backbone: Optional[torch.nn.Module] = None,
        backbone_loader: Optional[Callable[[], torch.nn.Module]] = None,
        family: Optional["ModelFamily"] = None,
    ) -> "LossStrategy":
        """The strategy for `settings` (only strategies with a discriminator use the backbone;
        `family`: the model's facts for the rollout and the timestep draws)."""

    @abstractmethod
    def run(self, model: CountingAdapter, batch: TrainBatch) -> StrategyOutput:
        """One call's work. `self.step` is the index of this call; `__call__`
        advances it afterwards."""

    def __call__(self, model: ModelAdapter, batch: TrainBatch) -> StrategyOutput:
        counter = CountingAdapter(model, batch.x0.shape[0], self.recomputes_graph)
        out = self.run(counter, batch)
        out.cost = counter.close(out.updates_generator)
        self.cost_total = self.cost_total + out.cost
        self.step += 1
        out.logs.update(
            {
                "cost/forward_equiv": out.cost.forward_equiv,
                "cost/ft_steps": out.cost.ft_steps,
                "cost/total_forward_equiv": self.cost_total.forward_equiv,
                "cost/total_ft_steps": self.cost_total.ft_steps,
            }
        )
        return out

    # --- what the loop asks ----------------------------------------------------------

    def next_call_updates_generator(self) -> bool:
        """Whether the next call will return `updates_generator=True`."""
        return True

    def close_window(self) -> None:
        """The loop stepped its optimizer after the latest call, before `micro_batches`
        calls were made (the last, partial window of an epoch): the next call starts
        a new window."""
        n = self.micro_batches
        self.step = -(-self.step // n) * n

    def generator_lr_factor(self, step: Optional[int] = None) -> float:
        """Multiplier for the generator's learning rate at the optimizer step that
        closes the window of call `step` (default: the next call). Loops apply it."""
        return 1.0

    def latest_generator_lr_factor(self) -> float:
        """`generator_lr_factor` of the latest call (for a loop that steps after it)."""
        return self.generator_lr_factor(max(0, self.step - 1))

    @property
    def discriminator(self) -> Optional["Discriminator"]:
        """The discriminator the strategy trains, or None."""
        return None

    @property
    def has_discriminator(self) -> bool:
        return self.discriminator is not None

    # --- helpers for subclasses ------------------------------------------------------

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        # Drawn on the CPU from the strategy's own generator, so runs are
        # reproducible across devices and resumable.
        return torch.randn(x.shape, generator=self.generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)

    # --- saving ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rng": self.generator.get_state(), "cost": self.cost_total.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["rng"])
        self.cost_total = Cost.from_dict(state.get("cost", {}))  # states saved before costs were counted: 0
