"""The training loop of `adt train`.

    data = scan the folder                      (bad files reported, empty -> error, no model yet)
    pipe = load the model; LoRA or full; strategy = build_strategy(settings)   (ft | adt | ...)
    for step in range(start, max_steps):
        x0, cond = latents and conditioning of the next batch
        lr_G = schedule(step) * strategy.generator_lr_factor(step)          (ADT's G warm-up)
        out = strategy(adapter, TrainBatch(x0, cond))                       (ADT: D steps inside)
        if out.updates_generator and finite: backward, average over processes, clip, step
        log, sample grid, save (model + discriminator + resumable state), keep-last-N

Several processes (`accelerate launch`): each takes its slice of every global
batch; the denoiser is not wrapped in DDP, because ADT calls it several times
(some without a graph) before one backward, and skips backward altogether on
discriminator-only iterations; the generator's gradients are averaged explicitly
after backward instead (the core does the same for the discriminator's).
"""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import __version__
from ..checkpoint import disc_path_for, save_discriminator
from ..decode import LatentDecoder
from ..fileio import atomic_write_bytes
from ..strategies import TrainBatch, build_strategy, preflight
from .config import ConfigError, RunConfig
from .data import (
    BatchOrder,
    TrainImages,
    cache_key,
    collate,
    file_fingerprint,
    make_buckets,
    prepare_image,
    scan_folder,
)
from .export import save_diffusers_folder, save_single_file
from .loading import detect_family, load_pipeline, resolve_dtype, set_attention
from .lora import add_lora, load_peft_state, lora_metadata, peft_state, save_lora
from .models import FAMILIES, DiffusersAdapter, encode_latents
from .monitor import Monitor
from .sampling import pil_bytes, sample_grid
from .state import Outputs, ResumeError, load_state, read_trainer_json, save_state, set_rng_state

# Settings a resumed run must share with the run that saved the state, or the
# continuation would not be the run it claims to continue.
RESUME_MUST_MATCH = (
    ("train", "method"),
    ("train", "batch_size"),
    ("train", "seed"),
    ("adt", "strategy"),
    ("adt", "seed"),
)


@dataclass
class RunResult:
    status: str  # done | interrupted | nonfinite
    step: int
    saved: list[Path] = field(default_factory=list)
    state: Optional[Path] = None
    skipped_steps: int = 0


def check_environment(config: RunConfig) -> None:
    """Optional packages the config asks for, before anything is loaded."""
    if config.train.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as err:  # noqa: BLE001
            raise ConfigError(
                f"[train] optimizer = 'adamw8bit' needs bitsandbytes, which does not import here ({err}); "
                f"`pip install bitsandbytes` (CUDA machines), or set optimizer = 'adamw'"
            ) from err
    if config.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("[train] mixed_precision = 'fp16' needs a CUDA device; use 'bf16' or 'no' on the CPU")


def check_sampler_fits(config: RunConfig, family: str) -> None:
    """SD3 is a flow-matching model, the others predict noise: the sampler must match
    (it is the rollout's and the sample grids'), checked before the model loads."""
    from ..samplers import SAMPLERS, resolve_sampler_name

    flow_sampler = SAMPLERS[resolve_sampler_name(config.adt.sampler)].flow
    if flow_sampler != (family == "sd3"):
        fitting = sorted(n for n, spec in SAMPLERS.items() if spec.flow == (family == "sd3"))
        raise ConfigError(
            f"[adt] sampler = {config.adt.sampler!r} does not fit a {family} model; use one of {', '.join(fitting)}"
        )


class Trainer:
    def __init__(self, config: RunConfig, resume: Optional[Path] = None, echo: Callable[[str], None] = print):
        self.config = config
        self.resume = Path(resume) if resume else None
        self._echo = echo
        self.stop_requested: Optional[str] = None

    # --- process helpers -----------------------------------------------------------

    def echo(self, message: str) -> None:
        if self.main:
            self._echo(message)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def all_true(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item() > 0.5)

    # --- setup ---------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate import Accelerator

        config = self.config
        check_environment(config)
        resume_info = read_trainer_json(self.resume) if self.resume else None
        data_cfg = config.data
        self.report = scan_folder(data_cfg.folder, data_cfg.caption_extension, data_cfg.min_size)  # before any model

        # Several processes without CUDA (torchrun / `accelerate launch --multi_gpu` on a CPU
        # machine): accelerate needs cpu=True to set them up as MULTI_CPU (gloo).
        cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = Accelerator(mixed_precision=config.train.mixed_precision, cpu=cpu_processes)
        self.main = self.accelerator.is_main_process
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device = self.accelerator.device
        for line in self.report.lines():
            self.echo(line)
        if resume_info:
            self._check_resume(resume_info)

        # The same seed in every process and for every strategy: identical LoRA initialisation,
        # so FT and ADT runs of one config start from the same weights.
        from accelerate.utils import set_seed

        set_seed(config.train.seed)
        # The backbone (downloaded now if it is a hub id not yet cached) before the model:
        # a missing one then costs seconds, not a model load. One process downloads.
        with self.accelerator.main_process_first():
            for line in preflight(config.adt, echo=self.echo, prefix="[adt] "):
                self.echo(line)
        self._setup_model()
        self._setup_data()
        self._setup_strategy()
        self._setup_optimizer()
        self.outputs = Outputs(config.output_dir, config.train.output_name, config.save.keep_last)
        self.step, self.position = 0, (0, 0)
        self.nonfinite_total = self.nonfinite_run = 0
        if self.resume:
            self._restore()

    def _check_resume(self, info: dict) -> None:
        saved = info.get("config", {})
        current = self.config.to_dict()
        differs = [
            f"[{s}] {k}: saved {saved.get(s, {}).get(k)!r}, now {current[s][k]!r}"
            for s, k in RESUME_MUST_MATCH
            if saved.get(s, {}).get(k) != current[s][k]
        ]
        if info.get("world_size") != self.world:
            differs.append(f"processes: saved {info.get('world_size')}, now {self.world}")
        if differs:
            raise ResumeError(f"{self.resume} was saved by a different run; " + "; ".join(differs))

    def _setup_model(self) -> None:
        config = self.config
        self.family_name = detect_family(config.model)
        self.family = FAMILIES[self.family_name]
        check_sampler_fits(config, self.family_name)
        mixed = config.train.mixed_precision
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
        if config.model.vae_dtype == "auto":
            fp32_vae = self.family_name == "sdxl" and mixed == "fp16"  # SDXL's VAE overflows in fp16
            vae_dtype = torch.float32 if fp32_vae else self.weight_dtype
        else:
            vae_dtype = resolve_dtype(config.model.vae_dtype)
        self.echo(f"loading {self.family_name} model from {config.model.path}")
        # A full fine-tune keeps float32 master weights: load them as stored, not through bf16.
        full = config.train.method == "full"
        pipe = load_pipeline(config.model, self.family_name, torch.float32 if full else self.weight_dtype)
        self.pipe = pipe
        self.denoiser = getattr(pipe, self.family.denoiser_attr)
        self.vae = pipe.vae.requires_grad_(False)
        if self.vae.dtype != vae_dtype:
            self.vae.to(dtype=vae_dtype)
        self.vae.to(self.device)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                encoder.to(self.device, self.weight_dtype).requires_grad_(False)
        self.attention = set_attention(pipe, self.denoiser, config.model.attention)
        self.scheduler_config = dict(pipe.scheduler.config)
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")

        if full:
            params = list(self.denoiser.to(torch.float32).requires_grad_(True).parameters())
        else:
            params = add_lora(self.denoiser, self.family, config.lora)
        for p in params:  # trainable weights in float32 whatever the base's dtype
            p.data = p.data.float()
        self.denoiser.to(self.device)
        if config.train.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.denoiser.train()
        self.params = params
        if self.world > 1:  # every process starts from rank 0's weights (DDP would do this)
            for p in params:
                torch.distributed.broadcast(p.data, src=0)
        self.decoder = LatentDecoder(self.vae, gradient_checkpointing=config.train.gradient_checkpointing)
        with torch.no_grad():
            self.empty_text = self.family.empty_text(pipe, self.device)
        self.adapter = DiffusersAdapter(
            self.family, self.denoiser, self.scheduler_config, self.empty_text, self.decoder, self.accelerator.autocast
        )
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.echo(
            f"{self.family_name} ({self.prediction_type}), {config.train.method}: "
            f"{sum(p.numel() for p in params):,} trainable parameters; attention {self.attention}; "
            f"mixed precision {mixed}; {self.world} process(es) on {self.device}"
        )

    def _setup_data(self) -> None:
        config, data_cfg = self.config, self.config.data
        buckets = (
            make_buckets(data_cfg.resolution, data_cfg.bucket_step, data_cfg.min_bucket_size, data_cfg.max_bucket_size)
            if data_cfg.buckets
            else [(data_cfg.resolution, data_cfg.resolution)]
        )
        self.dataset = TrainImages(
            self.report.items, buckets, config.train.seed, data_cfg.random_crop, data_cfg.flip, data_cfg.caption_dropout
        )
        self.order = BatchOrder(self.dataset.entry_buckets, config.train.batch_size * self.world, config.train.seed)
        self._setup_caches()
        # Sample prompts are encoded now: the text encoders may leave the device below.
        sample = config.sample
        self.sample_conds: list[dict] = []
        if sample.prompts:
            height = sample.height or data_cfg.resolution
            width = sample.width or data_cfg.resolution
            self.sample_shape = (
                self.denoiser.config.in_channels,
                height // self.latent_factor,
                width // self.latent_factor,
            )
            size = torch.tensor([[height, width, 0, 0, height, width]])
            with torch.no_grad():
                for prompt in sample.prompts:
                    cond = self.family.encode_text(self.pipe, [prompt], self.device)
                    cond.update({k: v.to(self.device) for k, v in self.family.size_cond(size).items()})
                    self.sample_conds.append(cond)
                negative = self.empty_text
                if sample.negative_prompt:
                    negative = self.family.encode_text(self.pipe, [sample.negative_prompt], self.device)
            self.sample_adapter = DiffusersAdapter(
                self.family, self.denoiser, self.scheduler_config, negative, self.decoder, self.accelerator.autocast
            )
        if data_cfg.cache_text:  # conditioning comes from the cache: the encoders can leave the device
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                if getattr(self.pipe, name, None) is not None:
                    getattr(self.pipe, name).to("cpu")
        if data_cfg.cache_latents:
            self.vae.encoder.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _setup_caches(self) -> None:
        """Latents (one per image and bucket) and text conditioning (one per caption) on disk.
        The main process fills what is missing; the others wait and read."""
        from safetensors.torch import load_file

        from ..fileio import atomic_save_safetensors

        data_cfg = self.config.data
        if not (data_cfg.cache_latents or data_cfg.cache_text):
            return
        cache = self.config.cache_dir
        model_id = file_fingerprint(Path(self.config.model.path).expanduser())
        self.dataset.load_tensors = load_file
        if data_cfg.cache_latents:
            vae_id = f"{model_id}|{self.config.model.vae_path}|{json.dumps(dict(self.vae.config), sort_keys=True, default=str)}|{self.vae.dtype}"
            files = [
                cache
                / "latents"
                / f"{cache_key(file_fingerprint(item.path), self.dataset.bucket_of(i), vae_id)}.safetensors"
                for i, item in enumerate(self.dataset.items)
            ]
            if self.main:
                missing = [i for i, f in enumerate(files) if not f.is_file()]
                if missing:
                    self.echo(f"caching latents of {len(missing)} images in {cache / 'latents'}")
                for i in missing:
                    item = self.dataset.items[i]
                    prepared = prepare_image(item.path, self.dataset.bucket_of(i))
                    latents = encode_latents(self.vae, prepared.pixels[None])[0].cpu()
                    size = torch.tensor([*prepared.original_size, *prepared.crop_top_left, *prepared.target_size])
                    atomic_save_safetensors({"latents": latents, "size_cond": size}, files[i])
            self.dataset.latent_files = files
        if data_cfg.cache_text:
            text_id = f"{model_id}|{self.family_name}|text"
            captions = sorted(
                {item.caption for item in self.dataset.items} | ({""} if data_cfg.caption_dropout else set())
            )
            files = {c: cache / "text" / f"{cache_key(c, text_id)}.safetensors" for c in captions}
            if self.main:
                missing = [c for c, f in files.items() if not f.is_file()]
                if missing:
                    self.echo(f"caching text conditioning of {len(missing)} captions in {cache / 'text'}")
                with torch.no_grad():
                    for caption in missing:
                        cond = self.family.encode_text(self.pipe, [caption], self.device)
                        atomic_save_safetensors({k: v[0].cpu() for k, v in cond.items()}, files[caption])
            self.dataset.text_files = files
        self.barrier()

    def _setup_strategy(self) -> None:
        # The strategy offsets its seed by the process rank itself: each process draws
        # its own noise, start steps and augmentations.
        self.strategy = build_strategy(self.config.adt, self.scheduler_config, device=self.device)

    def _setup_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        train = self.config.train
        kwargs = dict(
            lr=train.learning_rate,
            betas=(train.adam_beta1, train.adam_beta2),
            eps=train.adam_epsilon,
            weight_decay=train.weight_decay,
        )
        if train.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            optimizer = bnb.optim.AdamW8bit(self.params, **kwargs)
        else:
            optimizer = torch.optim.AdamW(self.params, **kwargs)
        # The LR schedule is stepped by us once per iteration (not prepared: accelerate
        # would step it once per process).
        self.lr_scheduler = get_scheduler(
            train.lr_scheduler, optimizer, num_warmup_steps=train.lr_warmup_steps, num_training_steps=train.max_steps
        )
        self.optimizer = self.accelerator.prepare(optimizer)  # fp16: the grad scaler steps through it

    def _restore(self) -> None:
        state = load_state(self.resume, self.rank)
        info = state["trainer"]
        if self.config.train.method == "lora":
            load_peft_state(self.denoiser, state["trainable"])
        else:
            self.denoiser.load_state_dict(state["trainable"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.strategy.load_state_dict(state["strategy"])
        set_rng_state(state["rng"])
        self.step = int(info["step"])
        self.position = (int(info["epoch"]), int(info["batch_index"]))
        self.nonfinite_total = int(info.get("nonfinite_total", 0))
        if (
            info.get("data_entries") != len(self.dataset)
            or info.get("batches_per_epoch") != self.order.batches_per_epoch
        ):
            self.echo(
                "warning: the data changed since the state was saved; the batch order from here on differs "
                "from the uninterrupted run's"
            )
        self.echo(f"resumed from {self.resume} at step {self.step}")

    # --- batches -------------------------------------------------------------------

    def batches(self):
        """(position after this batch, batch) for this process, from the current position, forever."""
        positions = collections.deque()
        bs, rank, order = self.config.train.batch_size, self.rank, self.order

        class Sampler:
            def __iter__(self_inner):
                for epoch, index, batch in order.iterate(*self.position):
                    nxt = (epoch, index + 1) if index + 1 < order.batches_per_epoch else (epoch + 1, 0)
                    positions.append(nxt)
                    yield [(entry, epoch) for entry in batch[rank * bs : (rank + 1) * bs]]

        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=Sampler(), num_workers=self.config.data.workers, collate_fn=collate
        )
        for batch in loader:
            yield positions.popleft(), batch

    def train_batch(self, batch: dict) -> TrainBatch:
        device = self.device
        if "latents" in batch:
            x0 = batch["latents"].to(device, torch.float32)
        else:
            x0 = encode_latents(self.vae, batch["pixels"].to(device))
        if "text" in batch:
            cond = {k: v.to(device, self.weight_dtype) for k, v in batch["text"].items()}
        else:
            with torch.no_grad():
                cond = self.family.encode_text(self.pipe, batch["caption"], device)
        cond.update({k: v.to(device) for k, v in self.family.size_cond(batch["size_cond"]).items()})
        return TrainBatch(x0=x0, cond=cond)

    # --- one iteration ---------------------------------------------------------------

    def iteration(self, batch: dict) -> tuple[dict[str, float], bool]:
        factor = self.strategy.generator_lr_factor(self.step)
        for group, scheduled in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            group["lr"] = scheduled * factor
        out = self.strategy(self.adapter, self.train_batch(batch))
        logs = dict(out.logs)
        logs["lr/G"] = self.optimizer.param_groups[0]["lr"]
        finite = self.all_true(bool(torch.isfinite(out.loss.detach()).all()))
        if out.updates_generator and finite:
            self.accelerator.backward(out.loss)
            self.average_gradients()
            max_norm = self.config.train.max_grad_norm or float("inf")
            norm = float(self.accelerator.clip_grad_norm_(self.params, max_norm))
            logs["grad_norm/G"] = norm
            if math.isfinite(norm) or self.accelerator.scaler is not None:  # fp16: the scaler skips inf steps
                self.optimizer.step()
            else:
                finite = False
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # discriminator-only iterations step the schedule without a G step
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            self.lr_scheduler.step()
        return logs, finite

    def average_gradients(self) -> None:
        if self.world == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in self.params:  # a parameter without a gradient on one process still joins the sum
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        bucket, size = [], 0
        for i, grad in enumerate(grads):
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
            if size >= 32 * 2**20 or i == len(grads) - 1:
                flat = _flatten_dense_tensors(bucket)
                torch.distributed.all_reduce(flat)
                flat.div_(self.world)
                for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    g.copy_(synced)
                bucket, size = [], 0

    def check_in_sync(self) -> None:
        """All processes must hold the same generator and discriminator weights."""
        if self.world == 1:
            return
        tensors = list(self.params)
        if hasattr(self.strategy, "disc"):
            tensors += list(self.strategy.disc.state_for_checkpoint().values())
        local = torch.tensor([float(sum(t.double().sum() for t in tensors))], dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(local) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, local)
        values = [float(g) for g in gathered]
        if max(values) != min(values):
            raise RuntimeError(f"processes diverged: weight checksums {values}")

    # --- saving --------------------------------------------------------------------

    def save(self, step: Optional[int], with_state: bool) -> tuple[Path, Optional[Path]]:
        """The model (and its discriminator) for `step` (None: the final name), and a state."""
        config = self.config
        self.check_in_sync()
        dtype = resolve_dtype(config.save.precision)
        is_folder = config.train.method == "full" and config.save.format == "diffusers"
        path = self.outputs.model_path(step, folder=is_folder)
        record = {
            "adt_plugin_version": __version__,
            "adt_strategy": self.strategy.name or config.adt.strategy,
            "adt_step": str(self.step),
            "adt_config": json.dumps(config.to_dict()),
        }
        if self.main:
            if config.train.method == "lora":
                meta = lora_metadata(
                    self.family,
                    config.lora,
                    self.prediction_type,
                    {
                        **record,
                        "ss_steps": str(self.step),
                        "ss_learning_rate": str(config.train.learning_rate),
                        "ss_resolution": f"({config.data.resolution}, {config.data.resolution})",
                        "ss_output_name": config.train.output_name,
                        "ss_num_train_images": str(len(self.dataset.items)),
                        "ss_seed": str(config.train.seed),
                        "ss_mixed_precision": config.train.mixed_precision,
                    },
                )
                save_lora(path, self.family, self.denoiser, config.lora, meta, dtype)
            elif is_folder:
                save_diffusers_folder(path, self.pipe, self.family.denoiser_attr, dtype)
            else:
                source = Path(config.model.path).expanduser()
                save_single_file(path, self.family, self.denoiser, dtype, source if source.is_file() else None, record)
            if hasattr(self.strategy, "disc"):
                save_discriminator(disc_path_for(path), self.strategy, {"model_file": path.name, **record})
        state_path = None
        if with_state:
            state_path = self.save_state(self.outputs.state_path(self.step))
        self.barrier()
        return path, state_path

    def save_state(self, folder: Path) -> Path:
        trainable = peft_state(self.denoiser) if self.config.train.method == "lora" else self.denoiser.state_dict()
        trainer = {
            "step": self.step,
            "epoch": self.position[0],
            "batch_index": self.position[1],
            "world_size": self.world,
            "nonfinite_total": self.nonfinite_total,
            "data_entries": len(self.dataset),
            "batches_per_epoch": self.order.batches_per_epoch,
            "family": self.family_name,
            "adt_plugin_version": __version__,
            "config": self.config.to_dict(),
        }
        return save_state(
            folder,
            rank=self.rank,
            barrier=self.barrier,
            trainer=trainer,
            trainable=trainable,
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            scaler=self.accelerator.scaler,
            strategy=self.strategy,
        )

    def sample(self, monitor: Monitor) -> Optional[Path]:
        if not (self.main and self.sample_conds):
            return None
        self.denoiser.eval()
        image = sample_grid(
            self.scheduler_config,
            self.config.adt.rollout_config(),
            self.sample_adapter,
            self.sample_conds,
            self.sample_shape,
            self.config.sample.seed,
            self.device,
        )
        self.denoiser.train()
        path = self.config.output_dir / "samples" / f"{self.config.train.output_name}-step{self.step:08d}.png"
        atomic_write_bytes(path, pil_bytes(image))
        monitor.image(self.step, "samples", image)
        return path

    # --- signals -------------------------------------------------------------------

    def _on_signal(self, signum, frame):
        if self.stop_requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.stop_requested = signal.Signals(signum).name

    def _install_signals(self) -> dict:
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return previous

    # --- the loop ------------------------------------------------------------------

    def run(self) -> RunResult:
        self.setup()
        config = self.config
        total = config.train.max_steps
        monitor = Monitor(config.log_dir, total, self.step, self.main, config.log.tensorboard, self._echo)
        previous = self._install_signals()
        result = RunResult("done", self.step)
        try:
            if config.sample.every_n_steps and self.step == 0:
                self.sample(monitor)
            batches = self.batches()
            while self.step < total:
                start = time.perf_counter()
                position, batch = next(batches)
                logs, finite = self.iteration(batch)
                self.step += 1
                self.position = position
                if finite:
                    self.nonfinite_run = 0
                else:
                    self.nonfinite_run += 1
                    self.nonfinite_total += 1
                    monitor.write(
                        f"step {self.step}: non-finite loss or gradient, generator update skipped "
                        f"({self.nonfinite_run} in a row, {self.nonfinite_total} in all)"
                    )
                logs["time/step_s"] = time.perf_counter() - start
                logs["memory/peak_gb"] = peak_memory_gb(self.device)
                logs["train/nonfinite_steps"] = self.nonfinite_total
                if self.step % config.log.every_n_steps == 0:
                    monitor.scalars(self.step, logs)
                monitor.advance(logs)
                if self.nonfinite_run >= config.train.max_nonfinite_steps:
                    last = self.outputs.saved_steps()
                    where = (
                        f"the last good save is step {last[-1]} in {self.outputs.dir}"
                        if last
                        else "nothing was saved yet"
                    )
                    monitor.write(
                        f"stopping: {self.nonfinite_run} non-finite steps in a row (train.max_nonfinite_steps = "
                        f"{config.train.max_nonfinite_steps}); {where}. Lower the learning rate or check the data."
                    )
                    result = RunResult("nonfinite", self.step, skipped_steps=self.nonfinite_total)
                    return result
                if config.sample.every_n_steps and self.step % config.sample.every_n_steps == 0 and self.step < total:
                    self.sample(monitor)
                every = config.save.every_n_steps
                if every and self.step % every == 0 and self.step < total and self.nonfinite_run:
                    monitor.write(
                        f"step {self.step}: save skipped while steps are not finite (keeping the last good one)"
                    )
                elif every and self.step % every == 0 and self.step < total:
                    path, state = self.save(self.step, config.save.state)
                    result.saved.append(path)
                    result.state = state
                    if self.main:
                        for removed in self.outputs.prune():
                            monitor.write(f"keep_last = {config.save.keep_last}: removed {removed.name}")
                    monitor.write(f"step {self.step}: saved {path.name}" + (f" and {state.name}" if state else ""))
                if not self.all_true(self.stop_requested is None):
                    path, state = self.save(self.step, True)
                    monitor.write(
                        f"{self.stop_requested or 'stop'} at step {self.step}: saved {path.name} and the "
                        f"resumable state {state}; continue with --resume {state}"
                    )
                    return RunResult("interrupted", self.step, result.saved + [path], state, self.nonfinite_total)
            if config.sample.every_n_steps or config.sample.prompts:
                self.sample(monitor)
            path, state = self.save(None, config.save.state)
            skipped = len(self.report.skipped)
            monitor.write(
                f"done: {self.step} steps; saved {path}"
                + (f" and {state}" if state else "")
                + (f"; {skipped} images were skipped (listed at the start)" if skipped else "")
            )
            result.saved.append(path)
            result.state = state or result.state
            result.step, result.skipped_steps = self.step, self.nonfinite_total
            return result
        finally:
            monitor.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated CUDA memory; on the CPU, the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak_kb * (1 if sys.platform == "darwin" else 1024) / 2**30
    except Exception:  # noqa: BLE001 - no resource module (Windows)
        return float("nan")


def train(config: RunConfig, resume: Optional[Path] = None, echo: Callable[[str], None] = print) -> RunResult:
    return Trainer(config, resume, echo).run()


__all__ = ["RunResult", "Trainer", "check_environment", "train"]
