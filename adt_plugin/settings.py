"""One flat, validated set of ADT settings.

TOML presets (`[adt]`), `adt train` overrides, sd-scripts' `--adt_*` flags and
OneTrainer's `adt` config section all map onto these fields, so a setting has one
name and one default everywhere. Defaults are the paper's (SD1.5 + DDIM 50), except
how the two generator terms are balanced and which real image a rollout is scored
against (adv_balance, adv_ratio, reference: what the digits study found; the paper's
formulation is adv_balance="none", reference="self"), and what a run spends its
compute on (g_every, k_graph_steps, adt_every, rollout_buffer, rollout_share, adv_ratio,
lambda_diff: what the compute study found, docs/demo.md "What ADT costs"; the paper:
g_every=5, k_graph_steps=3, adt_every=1, rollout_buffer=0, rollout_share=1,
lambda_diff=0.5).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from typing import Any, Mapping, get_type_hints

from .backbones import DEFAULT_DINOV2, DEFAULT_TAPS
from .discriminator import DiscriminatorConfig
from .rollout import RolloutConfig
from .strategies import STRATEGIES
from .strategies.adt import ADV_BALANCES, DIFF_TIMESTEPS, REFERENCES


class SettingsError(ValueError):
    """A bad key or value, with where it came from and what to do."""


@dataclass(frozen=True)
class AdtSettings:
    strategy: str = "adt"  # ft | adt | ip | at
    # rollout (the sampler the user will use at inference)
    sampler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 7.0
    grad_mode: str = "adt"  # adt (Eq. 11) | drtune (Eq. 4, ablation)
    k_graph_steps: int = 0
    gradient_checkpointing: bool = False
    # generator side
    g_every: int = 1  # H: the generator loss is returned every H-th iteration
    lambda_diff: float = 1.0  # the paper: 0.5; 1.0 gives ADT steps FT's diffusion weight (the compute study)
    g_warmup_steps: int = 500
    # Decode for the discriminator with a tiny autoencoder (a local AutoencoderTiny
    # folder: TAESD / TAESDXL / TAESD3) instead of the model's VAE. The generator's
    # backward through the full VAE decoder is the largest memory cost of an ADT
    # iteration; empty: the model's VAE, as in the paper.
    decoder_path: str = ""
    # balance of the two generator terms: grad = the adversarial gradient scaled to
    # adv_ratio x the diffusion gradient at the shared denoiser output (then lambda_diff
    # only scales the total); none = the paper's L_adv + lambda_diff * L_diff, literally.
    # (See docs/demo.md, "What the digits study found": taken literally, the adversarial gradient is
    # ~10x the diffusion gradient and wrecks the samples.)
    adv_balance: str = "grad"
    adv_ratio: float = 1.0
    adv_warmup_steps: int = 0  # linear ramp of the adversarial term's weight from 0
    # where the generator's diffusion term is taken: uniform = at a training timestep drawn
    # as FT draws it, from its own noise (one more denoiser forward + backward per generator
    # step; ADT is then FT's loss plus the adversarial term); start = at the rollout's start
    # step, from its first prediction (the paper; free, but a sampler of few steps starts at
    # few timesteps and the others drift: see docs/demo.md, "What the digits study found")
    diff_timestep: str = "uniform"
    # the real image a rollout is scored against (siamese discriminator):
    # same_cond = another image of the batch with the same conditioning (else itself),
    # self = the very image that was noised (the paper), any = any other image
    reference: str = "same_cond"
    # what an ADT run spends its compute on (docs/demo.md, "What ADT costs"; every call's cost is
    # logged as cost/...): adt_every = every n-th generator step is an ADT step (rollout,
    # discriminator, adversarial term); the others are plain FT steps (the diffusion loss at a
    # uniform timestep: 1 forward + 1 backward, no rollout). adt_start = generator steps before
    # this one are all FT steps (an FT phase, then ADT).
    adt_every: int = 4
    adt_start: int = 0
    # rollout_buffer = n > 0: the latest n rollouts (their decoded samples with the real images
    # they are scored against) are kept, and a discriminator step between rollouts takes one of
    # them (drawn at random) instead of a fresh rollout: a discriminator-only call (g_every > 1)
    # then makes no denoiser call at all, and an FT step of the mix (adt_every > 1) takes a
    # discriminator step as well. 0 = every discriminator step has a fresh rollout of its own
    # (the paper), FT steps take none. Saved with the strategy's state (resume is exact).
    rollout_buffer: int = 1
    # the share of the batch that rolls out (and that the discriminator sees), ceil(share x B) >= 1
    # rows; the diffusion term (diff_timestep = uniform) still uses the whole batch
    rollout_share: float = 0.25
    # discriminator
    discriminator: str = "siamese"  # siamese | projected (StyleGAN-T ablation)
    backbone_path: str = DEFAULT_DINOV2
    taps: tuple[int, ...] = DEFAULT_TAPS
    head_channels: int = 64
    tau: float = 0.99
    augment: str = "color,translation,cutout"
    pool: str = "flatten"
    d_lr: float = 5e-6
    d_weight_decay: float = 0.01
    d_warmup_steps: int = 1000
    # ip: extra input noise (DDPM-IP); at: adversarial input perturbation (per-element RMS norms)
    ip_gamma: float = 0.1
    at_steps: int = 3  # replays of the batch: delta = 0, then at_steps - 1 ascent steps
    at_epsilon: float = 0.1  # radius of the L2 ball, ||delta|| <= at_epsilon * sqrt(numel)
    at_step_size: float = 0.05  # each ascent step moves delta by at_step_size * sqrt(numel)
    # reproducibility of the strategy's own draws (start step, graph steps, noise, augmentation)
    seed: int = 0

    def __post_init__(self):
        # The rollout's and the discriminator's fields are checked by their own configs
        # (built below); the rest here, each once.
        if self.strategy not in STRATEGIES:
            raise SettingsError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        for name in ("g_every", "at_steps", "adt_every"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("g_warmup_steps", "d_warmup_steps", "adv_warmup_steps", "adt_start", "rollout_buffer"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lambda_diff < 0 or self.d_lr <= 0:
            raise SettingsError("lambda_diff must be >= 0 and d_lr > 0")
        for name, allowed in (("adv_balance", ADV_BALANCES), ("diff_timestep", DIFF_TIMESTEPS), ("reference", REFERENCES)):
            if getattr(self, name) not in allowed:
                raise SettingsError(f"{name} must be {_one_of(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 < self.rollout_share <= 1.0:
            raise SettingsError(f"rollout_share must be in (0, 1], got {self.rollout_share}")
        for name in ("adv_ratio", "ip_gamma", "at_epsilon", "at_step_size"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must be >= 0, got {getattr(self, name)}")
        object.__setattr__(self, "taps", tuple(int(t) for t in self.taps))
        try:
            self.rollout_config()
            self.discriminator_config()
        except ValueError as err:
            raise SettingsError(str(err)) from err

    def rollout_config(self) -> RolloutConfig:
        return RolloutConfig(
            sampler=self.sampler,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            grad_mode=self.grad_mode,
            k_graph_steps=self.k_graph_steps,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    def discriminator_config(self) -> DiscriminatorConfig:
        return DiscriminatorConfig(
            kind=self.discriminator,
            backbone_path=self.backbone_path,
            taps=self.taps,
            channels=self.head_channels,
            tau=self.tau,
            augment=self.augment,
            pool=self.pool,
        )

    def replace(self, **changes: Any) -> "AdtSettings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "settings") -> "AdtSettings":
        """Build from a TOML section / dict; unknown keys and wrong types are errors
        that name the key, where it came from, and the closest valid key."""
        coerced = coerce_fields(cls, values, source)
        try:
            return cls(**coerced)
        except SettingsError as err:  # a value out of range: say where it came from
            raise SettingsError(f"{source}: {err}") from None


def _one_of(allowed: tuple[str, ...]) -> str:
    return f"{allowed[0]!r} or {allowed[1]!r}" if len(allowed) == 2 else f"one of {', '.join(allowed)}"


def coerce_fields(cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check `values` against the dataclass `cls`: known keys, right types."""
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(known)}"
            raise SettingsError(f"{source}: unknown key {key!r}{hint}")
        out[key] = _coerce(value, hints[key], f"{source}: key {key!r}")
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = getattr(hint, "__origin__", None)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise SettingsError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SettingsError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise SettingsError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise SettingsError(f"{where} must be a string, got {value!r}")
    if origin is tuple:
        # tuple[X, ...]: a list whose items are each an X (int, float or str)
        item = hint.__args__[0]
        noun = {int: "integers", float: "numbers", str: "strings"}.get(item, str(item))
        if isinstance(value, (list, tuple)):
            try:
                return tuple(_coerce(v, item, where) for v in value)
            except SettingsError:
                pass
        raise SettingsError(f"{where} must be a list of {noun}, got {value!r}")
    return value


__all__ = ["AdtSettings", "SettingsError", "coerce_fields"]
