"""ADT inside sd-scripts' own LoRA trainers: a mixin over NetworkTrainer,
SdxlNetworkTrainer and Sd3NetworkTrainer.

sd-scripts has no loss hook; the mixin overrides the trainer methods that
`NetworkTrainer.train()` calls (mirrors sd-scripts main @ 48d368fa). Set-up, once:

  get_tokenize_strategy / get_text_encoding_strategy
                                       keep sd-scripts' strategies for the empty prompt (the
                                       first of them reads the `--adt_*` settings)
  assert_extra_args                    refuses what ADT cannot run with, names ignored options
  cache_text_encoder_outputs_if_needed encodes the empty prompt (unconditional branch of CFG)
  post_process_network                 builds the strategy; writes the discriminator beside every
                                       LoRA file (`network.save_weights`) and into every
                                       `--save_state` folder; restores it on `--resume`

Per iteration, one pass through sd-scripts' `process_batch`: our override hands the
batch on with an `AdtStep` in it; sd-scripts computes latents and text conditioning
as always and calls `get_noise_pred_and_target`, where the strategy runs on them
(its model calls are sd-scripts' own `call_unet`) and leaves its loss in the step;
sd-scripts' own loss on the cheap stand-in it gets back is discarded and
`process_batch` returns the strategy's. `generate_step_logs` adds ADT's scalars.
Everything ADT keeps between calls is one `AdtRun`.

sd-scripts' loop back-propagates and steps the optimizer on every iteration. On
discriminator-only iterations the returned loss reaches no LoRA weight, and the
optimizer's `step` is gated (`GeneratorStepGate`): no AdamW momentum or weight
decay moves the weights; with fp16 the GradScaler's per-step state is cleared
instead of stepped (its scale is kept). The LR scheduler, `global_step`, the
progress bar, saving and sampling run every iteration as before, so
`--max_train_steps` counts ADT iterations and the LoRA receives one optimizer
step every `--adt_g_every` of them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..bridge import FunctionAdapter, GeneratorStepGate, StrategyRunner, start_line
from ..checkpoint import CheckpointMismatch, disc_path_for
from ..settings import AdtSettings
from ..strategies import build_strategy
from .args import settings_from_args
from .families import Family, KohyaContext
from .internals import prepared_optimizer, skipped_step_cleanup

log = logging.getLogger("adt_plugin.kohya")

STATE_FILE = "adt_disc.safetensors"  # inside every --save_state folder
STEP_KEY = "adt_step"  # the batch key that carries an AdtStep through sd-scripts' process_batch

# sd-scripts options that shape sd-scripts' own diffusion loss; ADT's strategies do not use them
LOSS_OPTIONS = (
    ("min_snr_gamma", None),
    ("debiased_estimation_loss", False),
    ("scale_v_pred_loss_like_noise_pred", False),
    ("v_pred_like_loss", None),
    ("ip_noise_gamma", None),
    ("noise_offset", None),
    ("multires_noise_iterations", None),
    ("masked_loss", False),
)


@dataclass
class AdtStep:
    """One training batch on its way through sd-scripts' process_batch: the objects the
    step runs with, in; the strategy's loss, out."""

    ctx: KohyaContext
    loss: Optional[torch.Tensor] = None


@dataclass
class AdtRun:
    """What ADT keeps during one sd-scripts training run."""

    family: Family
    settings: AdtSettings
    tokenize_strategy: Any = None
    text_encoding_strategy: Any = None
    empty_prompt: Optional[list] = None  # text conditioning of "", base text encoders
    scheduler_config: dict = field(default_factory=dict)
    runner: Optional[StrategyRunner] = None
    gate: Optional[GeneratorStepGate] = None
    written: dict[Path, Path] = field(default_factory=dict)  # discriminator file -> the LoRA file beside it

    @property
    def uses_cfg(self) -> bool:
        return self.settings.guidance_scale > 1.0

    # -- checkpoints -------------------------------------------------------------------
    def save_beside(self, lora_file: str) -> None:
        path = disc_path_for(lora_file)
        self.runner.save(path, {"model_file": os.path.basename(lora_file)})
        self.written[path] = Path(lora_file)
        self.sweep()

    def sweep(self) -> None:
        """Remove the discriminator files whose LoRA file sd-scripts has pruned
        (--save_last_n_steps / --save_last_n_epochs)."""
        for path, model in list(self.written.items()):
            if not model.exists():
                path.unlink(missing_ok=True)
                del self.written[path]
                log.info("ADT: removed %s with its LoRA file", path)

    def save_state(self, output_dir: str) -> None:
        self.runner.save(Path(output_dir) / STATE_FILE)

    def load_state(self, input_dir: str) -> None:
        path = Path(input_dir) / STATE_FILE
        if not path.exists():
            log.warning(
                "ADT: %s has no %s (the state was saved without ADT); training goes on with a fresh discriminator",
                input_dir, STATE_FILE,
            )
            return
        try:
            self.runner.load(path)
        except CheckpointMismatch as err:
            raise CheckpointMismatch(f"cannot resume ADT from {input_dir}: {err}") from err
        log.info("ADT: discriminator restored from %s", path)

    # -- one step ----------------------------------------------------------------------
    def first_step(self, ctx: KohyaContext) -> None:
        """The optimizer exists now; the VAE may be parked on the CPU (cached latents)."""
        accelerator = ctx.accelerator
        optimizer = prepared_optimizer(accelerator)
        self.gate = GeneratorStepGate(
            optimizer, self.runner, on_skip=skipped_step_cleanup(optimizer), steps_now=lambda: accelerator.sync_gradients
        )
        vae = ctx.vae
        if vae is not None and next(vae.parameters()).device != accelerator.device:
            vae.to(accelerator.device, dtype=ctx.vae_dtype)
            accelerator.print("ADT: the VAE stays on the training device to decode rollouts (latents were cached)")

    def loss(self, ctx: KohyaContext, latents: torch.Tensor, text_conds: list, batch: Mapping[str, Any]) -> torch.Tensor:
        """The strategy on one batch, through sd-scripts' own model calls."""
        family = self.family
        adapter = FunctionAdapter(
            self.scheduler_config,
            lambda sample, t, c: family.denoise(ctx, sample, t, c),
            lambda c: self.uncond(ctx, c),
            lambda z: family.decode(ctx, z),
        )
        cond = family.pack_cond(ctx, list(text_conds), batch)
        return self.runner(adapter, latents.float(), cond, closes_window=ctx.accelerator.sync_gradients)

    def uncond(self, ctx: KohyaContext, cond: Mapping[str, Any]) -> dict:
        family = self.family
        if family.live_uncond and ctx.train_text_encoder and ctx.text_encoders:
            empty = family.encode_prompt(ctx, ctx.text_encoders, "")  # live (LoRA-trained) text encoders
        elif self.empty_prompt is not None:
            empty = self.empty_prompt
        else:
            raise RuntimeError("ADT: no empty-prompt conditioning for classifier-free guidance (text encoders unavailable)")
        packed = family.pack_cond(ctx, empty, {k: cond[k] for k in family.batch_keys})
        batch_size = next(v for v in cond.values() if v is not None).shape[0]
        out = dict(cond)
        for key, value in packed.items():
            if key in family.batch_keys or value is None:
                continue
            like = cond[key]
            out[key] = value.to(device=like.device, dtype=like.dtype).expand(batch_size, *value.shape[1:])
        return out

    def logs(self) -> dict[str, float]:
        return dict(self.runner.logs) if self.runner is not None else {}


class AdtTrainerMixin:
    """Put before an sd-scripts trainer class: `class T(AdtTrainerMixin, NetworkTrainer)`."""

    adt_family: Family

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.adt: Optional[AdtRun] = None  # made by the first set-up hook, see _adt_run

    # -- set-up --------------------------------------------------------------------------
    def _adt_run(self, args) -> AdtRun:
        """The run's state, made by whichever set-up hook sd-scripts calls first
        (get_tokenize_strategy, at 48d368fa)."""
        if self.adt is None:
            config_file = getattr(args, "config_file", None)
            source = f"{config_file}.toml / command line" if config_file else "command line"
            self.adt = AdtRun(self.adt_family, settings_from_args(args, self.adt_family.defaults, source=source))
        return self.adt

    def get_tokenize_strategy(self, args):
        strategy = super().get_tokenize_strategy(args)
        self._adt_run(args).tokenize_strategy = strategy
        return strategy

    def assert_extra_args(self, args, train_dataset_group, val_dataset_group):
        super().assert_extra_args(args, train_dataset_group, val_dataset_group)
        check_args(args, self._adt_run(args).settings)

    def get_text_encoding_strategy(self, args):
        strategy = super().get_text_encoding_strategy(args)
        self._adt_run(args).text_encoding_strategy = strategy
        return strategy

    def cache_text_encoder_outputs_if_needed(self, args, accelerator, unet, vae, text_encoders, dataset, weight_dtype):
        """...and the empty prompt, while the text encoders are still loaded."""
        super().cache_text_encoder_outputs_if_needed(args, accelerator, unet, vae, text_encoders, dataset, weight_dtype)
        adt = self.adt
        if adt is None or adt.empty_prompt is not None or not adt.uses_cfg:
            return
        ctx = KohyaContext(self, args, accelerator, unet, weight_dtype, tokenize_strategy=adt.tokenize_strategy,
                           text_encoding_strategy=adt.text_encoding_strategy)
        with torch.no_grad(), _on_device(text_encoders, accelerator.device):
            conds = self.adt_family.encode_prompt(ctx, text_encoders, "")
        adt.empty_prompt = [None if c is None else c.detach() for c in conds]

    def post_process_network(self, args, accelerator, network, text_encoders, unet):
        """The strategy, and its checkpoints beside sd-scripts' own."""
        super().post_process_network(args, accelerator, network, text_encoders, unet)
        adt = self._adt_run(args)
        adt.scheduler_config = self.adt_family.scheduler_config(self, args)
        strategy = build_strategy(adt.settings, adt.scheduler_config, device=accelerator.device,
                                  micro_batches=args.gradient_accumulation_steps)
        adt.runner = StrategyRunner(strategy)
        accelerator.print(start_line(adt.settings, self.adt_family.label))
        if not adt.runner.has_discriminator:
            return
        save_weights = network.save_weights

        def save_weights_and_discriminator(file, dtype, metadata):
            save_weights(file, dtype, metadata)
            adt.save_beside(file)

        network.save_weights = save_weights_and_discriminator
        accelerator.register_save_state_pre_hook(
            lambda models, weights, output_dir: adt.save_state(output_dir) if accelerator.is_main_process else None
        )
        accelerator.register_load_state_pre_hook(lambda models, input_dir: adt.load_state(input_dir))
        if args.network_weights and not args.resume:
            beside = disc_path_for(args.network_weights)
            if beside.exists():
                adt.runner.load(beside)
                accelerator.print(f"ADT: discriminator restored from {beside}")

    # -- the per-batch loss --------------------------------------------------------------
    def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                      accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=True,
                      train_text_encoder=True, train_unet=True, **kwargs):
        adt = self.adt
        if not is_train or adt is None or adt.runner is None:
            return super().process_batch(
                batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype, accelerator, args,
                text_encoding_strategy, tokenize_strategy, is_train=is_train, train_text_encoder=train_text_encoder,
                train_unet=train_unet, **kwargs,
            )
        step = AdtStep(KohyaContext(
            self, args, accelerator, unet, weight_dtype, vae, vae_dtype, list(text_encoders),
            tokenize_strategy, text_encoding_strategy, train_text_encoder,
        ))
        if adt.gate is None:
            adt.first_step(step.ctx)
        # sd-scripts computes latents and text conditioning and calls get_noise_pred_and_target
        # (below), which leaves the strategy's loss in the step; sd-scripts' own loss is discarded
        super().process_batch(
            {**batch, STEP_KEY: step}, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
            accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=is_train,
            train_text_encoder=train_text_encoder, train_unet=train_unet, **kwargs,
        )
        return step.loss

    def get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, unet,
                                  network, weight_dtype, train_unet, is_train=True, **kwargs):
        step: Optional[AdtStep] = batch.get(STEP_KEY)
        if step is None:  # validation, or ADT not set up
            return super().get_noise_pred_and_target(
                args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, unet, network, weight_dtype,
                train_unet, is_train=is_train, **kwargs,
            )
        step.loss = self.adt.loss(step.ctx, latents, text_encoder_conds, batch)
        # sd-scripts goes on to compute its own loss from what we return: give it something cheap
        zeros = torch.zeros_like(latents, dtype=torch.float32)
        timesteps = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
        return zeros, zeros, timesteps, None

    # -- logs and the end of training ------------------------------------------------------
    def generate_step_logs(self, *args, **kwargs):
        logs = super().generate_step_logs(*args, **kwargs)
        if self.adt is not None:
            logs.update(self.adt.logs())
        return logs

    def train(self, args):
        try:
            return super().train(args)
        finally:
            if self.adt is not None:
                if self.adt.gate is not None:
                    self.adt.gate.remove()
                self.adt.sweep()


def check_args(args, settings: AdtSettings) -> None:
    """Refuse what cannot work with the strategy; name each sd-scripts loss option it ignores."""
    if settings.strategy != "ft":
        if getattr(args, "deepspeed", False):
            raise ValueError("ADT: --deepspeed is not supported (DeepSpeed steps the optimizer inside backward, "
                             "so discriminator-only iterations could not be kept from moving the LoRA); remove --deepspeed")
        if (getattr(args, "blocks_to_swap", None) or 0) > 0:
            raise ValueError("ADT: --blocks_to_swap is not supported (the rollout calls the model several times "
                             "per backward); remove --blocks_to_swap or use --adt_gradient_checkpointing")
    ignored = [f"{name}={getattr(args, name)}" for name, off in LOSS_OPTIONS
               if getattr(args, name, off) not in (off, 0, 0.0, False, None)]
    if getattr(args, "loss_type", "l2") not in ("l2", None):
        ignored.append(f"loss_type={args.loss_type}")
    if ignored:
        log.warning("ADT: these sd-scripts options shape sd-scripts' own loss; ADT's strategy %s draws its own "
                    "timesteps and noise and ignores them: %s", settings.strategy, ", ".join(ignored))


class _on_device:
    """Move modules to `device` for a moment (keeping their dtype), then back."""

    def __init__(self, modules, device):
        self.modules = [m for m in modules if m is not None]
        self.device = device

    def __enter__(self):
        self.homes = [_device_of(m) for m in self.modules]
        for module in self.modules:
            module.to(self.device)

    def __exit__(self, *exc):
        for module, home in zip(self.modules, self.homes):
            if home is not None:
                module.to(home)


def _device_of(module) -> Optional[torch.device]:
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return None


def make_trainer_class(base: type, family: Family) -> type:
    return type(f"Adt{base.__name__}", (AdtTrainerMixin, base), {"adt_family": family})


__all__ = ["AdtRun", "AdtStep", "AdtTrainerMixin", "STATE_FILE", "check_args", "make_trainer_class"]
