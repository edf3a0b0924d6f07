"""ADT inside sd-scripts' own LoRA trainers: a mixin over NetworkTrainer,
SdxlNetworkTrainer and Sd3NetworkTrainer.

sd-scripts has no loss hook; the mixin overrides the trainer methods that
`NetworkTrainer.train()` calls (mirrors sd-scripts main @ 48d368fa):

  assert_extra_args                    reads the `--adt_*` settings, refuses what ADT cannot run with
  cache_text_encoder_outputs_if_needed encodes the empty prompt once (unconditional branch of CFG)
  post_process_network                 builds the strategy; writes the discriminator beside every
                                       LoRA file (`network.save_weights`) and into every
                                       `--save_state` folder; restores it on `--resume`
  process_batch / get_noise_pred_and_target
                                       sd-scripts computes latents and text conditioning as
                                       always; at the model call the ADT strategy runs instead,
                                       and process_batch returns its loss
  generate_step_logs                   adds ADT's scalars to sd-scripts' tracker logs

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
from pathlib import Path
from typing import Any, Optional

import torch

from ..bridge import FunctionAdapter, GeneratorStepGate, StrategyRunner
from ..checkpoint import CheckpointMismatch, disc_path_for
from ..settings import AdtSettings
from ..strategies import build_strategy
from .args import settings_from_args
from .families import Family, KohyaContext

log = logging.getLogger("adt_plugin.kohya")

STATE_FILE = "adt_disc.safetensors"  # inside every --save_state folder

# sd-scripts options that shape sd-scripts' own diffusion loss; ADT's loss does not use them
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


class AdtTrainerMixin:
    """Put before an sd-scripts trainer class: `class T(AdtTrainerMixin, NetworkTrainer)`."""

    adt_family: Family

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.adt_settings: Optional[AdtSettings] = None
        self.adt_runner: Optional[StrategyRunner] = None
        self.adt_gate: Optional[GeneratorStepGate] = None
        self._adt_empty_prompt: Optional[list] = None  # text conditioning of "", base text encoders
        self._adt_ctx: Optional[KohyaContext] = None
        self._adt_pending: Optional[torch.Tensor] = None
        self._adt_written: dict[Path, Path] = {}  # discriminator file -> the LoRA file it was written beside
        self._adt_scheduler_config: dict = {}
        self._adt_first_call = True
        self._adt_tokenize_strategy = None
        self._adt_text_encoding_strategy = None

    # -- settings and refusals -----------------------------------------------------
    def assert_extra_args(self, args, train_dataset_group, val_dataset_group):
        super().assert_extra_args(args, train_dataset_group, val_dataset_group)
        config_file = getattr(args, "config_file", None)
        source = f"{config_file}.toml / command line" if config_file else "command line"
        self.adt_settings = settings_from_args(args, self.adt_family.defaults, source=source)
        check_args(args, self.adt_settings)

    # -- the empty prompt, while the text encoders are still loaded -----------------
    def get_tokenize_strategy(self, args):
        self._adt_tokenize_strategy = super().get_tokenize_strategy(args)
        return self._adt_tokenize_strategy

    def get_text_encoding_strategy(self, args):
        self._adt_text_encoding_strategy = super().get_text_encoding_strategy(args)
        return self._adt_text_encoding_strategy

    def cache_text_encoder_outputs_if_needed(self, args, accelerator, unet, vae, text_encoders, dataset, weight_dtype):
        super().cache_text_encoder_outputs_if_needed(args, accelerator, unet, vae, text_encoders, dataset, weight_dtype)
        if self._adt_empty_prompt is None and self._adt_uses_cfg():
            ctx = KohyaContext(
                self, args, accelerator, unet, weight_dtype,
                tokenize_strategy=self._adt_tokenize_strategy,
                text_encoding_strategy=self._adt_text_encoding_strategy,
            )
            with torch.no_grad(), _on_device(text_encoders, accelerator.device):
                conds = self.adt_family.encode_prompt(ctx, text_encoders, "")
            self._adt_empty_prompt = [None if c is None else c.detach() for c in conds]

    def _adt_uses_cfg(self) -> bool:
        return self.adt_settings is not None and self.adt_settings.guidance_scale > 1.0

    # -- the strategy, checkpoints and resume ----------------------------------------
    def post_process_network(self, args, accelerator, network, text_encoders, unet):
        super().post_process_network(args, accelerator, network, text_encoders, unet)
        settings = self.adt_settings or settings_from_args(args, self.adt_family.defaults)
        self.adt_settings = settings
        self._adt_scheduler_config = self.adt_family.scheduler_config(self, args)
        strategy = build_strategy(settings, self._adt_scheduler_config, device=accelerator.device,
                                  micro_batches=args.gradient_accumulation_steps)
        self.adt_runner = StrategyRunner(strategy)
        accelerator.print(
            f"ADT: strategy {settings.strategy}, {self.adt_family.label}, sampler {settings.sampler} x "
            f"{settings.num_inference_steps} steps, CFG {settings.guidance_scale}, generator update every "
            f"{settings.g_every} iteration(s)"
        )
        if not self.adt_runner.has_discriminator:
            return
        self._adt_wrap_save_weights(network)
        accelerator.register_save_state_pre_hook(self._adt_save_state_hook(accelerator))
        accelerator.register_load_state_pre_hook(self._adt_load_state_hook())
        if args.network_weights and not args.resume:
            beside = disc_path_for(args.network_weights)
            if beside.exists():
                self.adt_runner.load(beside)
                accelerator.print(f"ADT: discriminator restored from {beside}")

    def _adt_wrap_save_weights(self, network) -> None:
        save_weights = network.save_weights
        runner = self.adt_runner

        def save_weights_and_discriminator(file, dtype, metadata):
            save_weights(file, dtype, metadata)
            path = disc_path_for(file)
            runner.save(path, {"model_file": os.path.basename(file)})
            self._adt_written[path] = Path(file)

        network.save_weights = save_weights_and_discriminator

    def _adt_save_state_hook(self, accelerator):
        def save_hook(models, weights, output_dir):
            if accelerator.is_main_process:
                self.adt_runner.save(Path(output_dir) / STATE_FILE)

        return save_hook

    def _adt_load_state_hook(self):
        def load_hook(models, input_dir):
            path = Path(input_dir) / STATE_FILE
            if not path.exists():
                log.warning(
                    "ADT: %s has no %s (the state was saved without ADT); training goes on with a fresh discriminator",
                    input_dir, STATE_FILE,
                )
                return
            try:
                self.adt_runner.load(path)
            except CheckpointMismatch as err:
                raise CheckpointMismatch(f"cannot resume ADT from {input_dir}: {err}") from err
            log.info("ADT: discriminator restored from %s", path)

        return load_hook

    def _adt_sweep(self) -> None:
        """Remove the discriminator files whose LoRA file sd-scripts has pruned
        (--save_last_n_steps / --save_last_n_epochs)."""
        for path, model in list(self._adt_written.items()):
            if not model.exists():
                path.unlink(missing_ok=True)
                del self._adt_written[path]
                log.info("ADT: removed %s with its LoRA file", path)

    # -- the per-batch loss --------------------------------------------------------------
    def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                      accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=True,
                      train_text_encoder=True, train_unet=True, **kwargs):
        active = is_train and self.adt_runner is not None
        if active:
            self._adt_sweep()
            self._adt_ctx = KohyaContext(
                self, args, accelerator, unet, weight_dtype, vae, vae_dtype, list(text_encoders),
                tokenize_strategy, text_encoding_strategy, train_text_encoder,
            )
        loss = super().process_batch(
            batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype, accelerator, args,
            text_encoding_strategy, tokenize_strategy, is_train=is_train, train_text_encoder=train_text_encoder,
            train_unet=train_unet, **kwargs,
        )
        if active and self._adt_pending is not None:
            loss, self._adt_pending = self._adt_pending, None
        return loss

    def get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, unet,
                                  network, weight_dtype, train_unet, is_train=True, **kwargs):
        ctx = self._adt_ctx
        if not is_train or self.adt_runner is None or ctx is None:
            return super().get_noise_pred_and_target(
                args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, unet, network, weight_dtype,
                train_unet, is_train=is_train, **kwargs,
            )
        self._adt_ctx = None
        if self._adt_first_call:
            self._adt_start(ctx)
        family = self.adt_family
        cond = family.pack_cond(ctx, list(text_encoder_conds), batch)
        adapter = FunctionAdapter(
            self._adt_scheduler_config,
            lambda sample, t, c: family.denoise(ctx, sample, t, c),
            lambda c: self._adt_uncond(ctx, c),
            lambda z: family.decode(ctx, z),
        )
        self._adt_pending = self.adt_runner(adapter, latents.float(), cond, closes_window=accelerator.sync_gradients)
        # sd-scripts goes on to compute its own loss from what we return: give it
        # something cheap; process_batch then returns ADT's loss instead.
        zeros = torch.zeros_like(latents, dtype=torch.float32)
        timesteps = torch.zeros(latents.shape[0], dtype=torch.long, device=latents.device)
        return zeros, zeros, timesteps, None

    def _adt_start(self, ctx: KohyaContext) -> None:
        """First training call: the optimizer exists, the VAE may be parked on the CPU."""
        self._adt_first_call = False
        accelerator = ctx.accelerator
        optimizer = prepared_optimizer(accelerator)
        self.adt_gate = GeneratorStepGate(
            optimizer, self.adt_runner, on_skip=accelerate_skip_hook(optimizer),
            steps_now=lambda: accelerator.sync_gradients,
        )
        vae = ctx.vae
        if vae is not None and next(vae.parameters()).device != accelerator.device:
            vae.to(accelerator.device, dtype=ctx.vae_dtype)
            accelerator.print("ADT: the VAE stays on the training device to decode rollouts (latents were cached)")

    def _adt_uncond(self, ctx: KohyaContext, cond):
        family = self.adt_family
        if family.live_uncond and ctx.train_text_encoder and ctx.text_encoders:
            empty = family.encode_prompt(ctx, ctx.text_encoders, "")  # live (LoRA-trained) text encoders
        elif self._adt_empty_prompt is not None:
            empty = self._adt_empty_prompt
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

    # -- logs and the end of training -------------------------------------------------
    def generate_step_logs(self, *args, **kwargs):
        logs = super().generate_step_logs(*args, **kwargs)
        if self.adt_runner is not None:
            logs.update(self.adt_runner.logs)
            if self.adt_gate is not None:
                logs["adt/generator_steps"] = float(self.adt_gate.taken)
        return logs

    def train(self, args):
        try:
            return super().train(args)
        finally:
            if self.adt_gate is not None:
                self.adt_gate.remove()
            self._adt_sweep()


def check_args(args, settings: AdtSettings) -> None:
    """Refuse what cannot work with ADT; say which sd-scripts loss options ADT ignores."""
    if settings.strategy == "ft":
        return
    if getattr(args, "deepspeed", False):
        raise ValueError("ADT: --deepspeed is not supported (DeepSpeed steps the optimizer inside backward, "
                         "so discriminator-only iterations could not be kept from moving the LoRA); remove --deepspeed")
    if (getattr(args, "blocks_to_swap", None) or 0) > 0:
        raise ValueError("ADT: --blocks_to_swap is not supported (the rollout calls the model several times "
                         "per backward); remove --blocks_to_swap or use --adt_gradient_checkpointing")
    ignored = [name for name, off in LOSS_OPTIONS if getattr(args, name, off) not in (off, 0, 0.0, False, None)]
    if getattr(args, "loss_type", "l2") not in ("l2", None):
        ignored.append(f"loss_type={args.loss_type}")
    if ignored:
        log.warning("ADT: these sd-scripts loss options do not apply to ADT's loss and are ignored: %s", ", ".join(ignored))


def prepared_optimizer(accelerator):
    """The optimizer sd-scripts passed to `accelerator.prepare` (there is exactly one)."""
    optimizers = list(getattr(accelerator, "_optimizers", None) or [])
    if len(optimizers) != 1:
        raise RuntimeError(
            f"ADT: expected the one optimizer sd-scripts prepares, found {len(optimizers)} "
            "(accelerate's Accelerator._optimizers); this accelerate version is not supported"
        )
    return optimizers[0]


def accelerate_skip_hook(accelerated_optimizer):
    """What a skipped step must still do on an accelerate `AcceleratedOptimizer`.

    With fp16, `clip_grad_norm_` has already called `scaler.unscale_` for this
    step; a later unscale_ would fail until `scaler.update()`. `update(new_scale=
    current scale)` clears that per-step state and keeps the scale (a plain
    `update()` asserts when no gradient was checked). `step_was_skipped` is
    cleared so the LR scheduler advances with every iteration."""

    def on_skip() -> None:
        scaler = getattr(accelerated_optimizer, "scaler", None)
        if scaler is not None and scaler.is_enabled() and getattr(scaler, "_scale", None) is not None:
            scaler.update(new_scale=scaler.get_scale())
        if hasattr(accelerated_optimizer, "_is_overflow"):
            accelerated_optimizer._is_overflow = False

    return on_skip


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


__all__ = ["AdtTrainerMixin", "STATE_FILE", "accelerate_skip_hook", "check_args", "make_trainer_class", "prepared_optimizer"]
