"""The training loop of `adt train`: `train()`, read top to bottom.

    checked = check_run(config, resume)         config, folders, images, family, the state; nothing loaded
    model, data, strategy, optim = set-up       setup.py: bundles that do not change afterwards
    progress = restore(...) if resuming         state.py
    while progress.step < max_steps:
        batch = this process's slice of the next global batch
        lr_G = schedule(step) * strategy.generator_lr_factor(step)      (ADT's G warm-up)
        out = strategy(model.adapter, TrainBatch(x0, cond))             (ADT: D steps inside)
        if out.updates_generator and finite: backward, average over processes, clip, step
        log out.logs and the loop's scalars; count non-finite iterations; sample; save
    final sample grid and save                  saving.py: checked finite, model + discriminator as a pair

An iteration is non-finite when its loss, the generator's gradient norm or any
value the strategy logged (the discriminator's loss included) is NaN or inf; the
generator is then not updated. Stops: `train.max_nonfinite_steps` non-finite
iterations in a row, or a save that would hold non-finite values (exit 3, naming
the last good save); Ctrl-C or SIGTERM (the step finishes, model and state are
saved, exit 130); any other error (model and state are saved first, in a single
process, then `RunAborted` says what happened and what was saved).

Several processes (`accelerate launch`): each takes its slice of every global
batch; the denoiser is not wrapped in DDP, because ADT calls it several times
(some without a graph) before one backward, and skips backward altogether on
discriminator-only iterations; the generator's gradients are averaged explicitly
after backward instead (the core does the same for the discriminator's).
"""

from __future__ import annotations

import collections
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..distributed import all_true, average_gradients
from ..fileio import atomic_write_bytes
from ..strategies import TrainBatch, build_strategy, preflight
from .config import RunConfig
from .data import collate
from .monitor import Monitor
from .sampling import pil_bytes, sample_grid
from .saving import NonFiniteSave, Saved, save
from .setup import check_run, load_data, load_model, make_optimisation, start_processes
from .state import Outputs, Progress, check_resume_processes, restore


@dataclass
class RunResult:
    status: str  # done | interrupted | nonfinite
    step: int
    saved: list[Path] = field(default_factory=list)
    state: Optional[Path] = None
    skipped_steps: int = 0


class RunAborted(RuntimeError):
    """An unexpected error stopped the run; the message says where and what was saved first."""


def train(config: RunConfig, resume: Optional[Path] = None, echo: Callable[[str], None] = print) -> RunResult:
    resume = Path(resume) if resume else None

    # --- before anything loads: packages, folders, images, the model's family, the state to resume
    checked = check_run(config, resume)

    # --- set-up
    procs = start_processes(config)
    say = echo if procs.main else (lambda message: None)
    for line in checked.report.lines():
        say(line)
    if checked.saved is not None:
        check_resume_processes(resume, checked.saved, procs.world)
    outputs = Outputs(config.output_dir, config.train.output_name, config.save.keep_last)
    if procs.main:
        for line in outputs.clean_unfinished():
            say(line)
    # The same seed in every process and for every strategy: identical LoRA initialisation,
    # so FT and ADT runs of one config start from the same weights.
    from accelerate.utils import set_seed

    set_seed(config.train.seed)
    # The backbone (downloaded now if it is a hub id not yet cached) before the model:
    # a missing one then costs seconds, not a model load. One process downloads.
    with procs.accelerator.main_process_first():
        for line in preflight(config.adt, echo=say, prefix="[adt] "):
            say(line)
    model = load_model(config, checked.family, procs, say)
    data = load_data(config, checked.report, model, procs, say)
    # The strategy offsets its seed by the process rank itself: each process draws its
    # own noise, start steps and augmentations.
    strategy = build_strategy(config.adt, model.scheduler_config, device=procs.device, family=model.family)
    optim = make_optimisation(config, model, procs)
    progress = Progress()
    if resume is not None:
        progress = restore(resume, checked.saved, config, model, data, strategy, optim, procs.rank, say)

    saved_models: list[Path] = []
    last_state: Optional[Path] = None

    def save_now(step: Optional[int], with_state: bool) -> Saved:
        nonlocal last_state
        saved = save(
            step,
            with_state,
            config=config,
            model=model,
            data=data,
            strategy=strategy,
            optim=optim,
            progress=progress,
            procs=procs,
            outputs=outputs,
        )
        saved_models.append(saved.model)
        last_state = saved.state or last_state
        return saved

    def ended(status: str) -> RunResult:
        return RunResult(status, progress.step, saved_models, last_state, progress.nonfinite_total)

    # --- the loop
    total = config.train.max_steps
    first_step = progress.step
    monitor = Monitor(config.log_dir, total, progress.step, procs.main, config.log.tensorboard, echo)
    try:
        with StopSignals() as stop:
            if config.sample.every_n_steps and progress.step == 0:
                draw_samples(config, model, data, procs, monitor, progress.step)
            batches = batch_stream(data, progress.position, config.train.batch_size, procs.rank, config.data.workers)
            while progress.step < total:
                started = time.perf_counter()
                position, batch = next(batches)
                logs, finite, updated = train_step(config, model, strategy, optim, procs, batch, progress.step)
                progress.step += 1
                progress.position = position
                progress.generator_steps += int(updated)
                if finite:
                    progress.nonfinite_run = 0
                else:
                    progress.nonfinite_run += 1
                    progress.nonfinite_total += 1
                    monitor.write(
                        f"step {progress.step}: non-finite loss, gradient or logged value, generator update skipped "
                        f"({progress.nonfinite_run} in a row, {progress.nonfinite_total} in all)"
                    )
                logs["time/step_s"] = time.perf_counter() - started
                logs["memory/peak_gb"] = peak_memory_gb(procs.device)
                logs["train/nonfinite_steps"] = progress.nonfinite_total
                logs["adt/generator_steps"] = progress.generator_steps
                if progress.step % config.log.every_n_steps == 0:
                    monitor.scalars(progress.step, logs)
                monitor.advance(logs)

                if progress.nonfinite_run >= config.train.max_nonfinite_steps:
                    monitor.write(
                        f"stopping: {progress.nonfinite_run} non-finite steps in a row (train.max_nonfinite_steps = "
                        f"{config.train.max_nonfinite_steps}); {last_good_save(outputs)}. Lower the learning rates "
                        f"(train.learning_rate, adt.d_lr) or check the data."
                    )
                    return ended("nonfinite")
                sample_every = config.sample.every_n_steps
                if sample_every and progress.step % sample_every == 0 and progress.step < total:
                    draw_samples(config, model, data, procs, monitor, progress.step)
                every = config.save.every_n_steps
                if every and progress.step % every == 0 and progress.step < total:
                    if progress.nonfinite_run:
                        monitor.write(
                            f"step {progress.step}: save skipped while steps are not finite (keeping the last good one)"
                        )
                    else:
                        saved = save_now(progress.step, config.save.state)
                        if procs.main:
                            for removed in outputs.prune():
                                monitor.write(f"keep_last = {config.save.keep_last}: removed {removed.name}")
                        monitor.write(
                            f"step {progress.step}: saved {saved.model.name}"
                            + (f" and {saved.state.name}" if saved.state else "")
                        )
                if not all_true(stop.reason is None, procs.device):
                    saved = save_now(progress.step, True)
                    monitor.write(
                        f"{stop.reason or 'stop'} at step {progress.step}: saved {saved.model.name} and the "
                        f"resumable state {saved.state}; continue with --resume {saved.state}"
                    )
                    return ended("interrupted")

            if config.sample.every_n_steps or config.sample.prompts:
                draw_samples(config, model, data, procs, monitor, progress.step)
            saved = save_now(None, config.save.state)
            skipped = len(checked.report.skipped)
            monitor.write(
                f"done: {progress.step} steps; saved {saved.model}"
                + (f" and {saved.state}" if saved.state else "")
                + (f"; {skipped} images were skipped (listed at the start)" if skipped else "")
            )
            return ended("done")
    except NonFiniteSave as err:
        monitor.write(
            f"stopping at step {progress.step}: not saved: {err}; {last_good_save(outputs)}. Lower the learning "
            f"rates (train.learning_rate, adt.d_lr) or check the data."
        )
        return ended("nonfinite")
    except Exception as err:  # noqa: BLE001 - save what was trained, then say what happened
        what = f"{type(err).__name__}: {err}"
        if procs.world > 1:
            kept = "no emergency save with several processes (the others may be waiting in a collective operation)"
        elif progress.step == first_step:
            kept = "nothing was trained since the start, so nothing was saved"
        else:
            try:
                saved = save_now(progress.step, True)
                kept = (
                    f"saved {saved.model} and the resumable state {saved.state} (as of step {progress.step}); "
                    f"continue with --resume {saved.state} once the cause is fixed"
                )
            except Exception as save_err:  # noqa: BLE001
                failed = f"{type(save_err).__name__}: {save_err}"
                kept = f"the emergency save failed too ({failed}); {last_good_save(outputs)}"
        raise RunAborted(f"error at step {progress.step}: {what}; {kept}") from err
    finally:
        monitor.close()


# --- one iteration -----------------------------------------------------------------


def train_step(config, model, strategy, optim, procs, batch: dict, step: int) -> tuple[dict[str, float], bool, bool]:
    """One iteration at `step`: (logs, finite on every process, whether the generator was updated)."""
    lr = optim.lr_at(step) * strategy.generator_lr_factor(step)
    for group in optim.optimizer.param_groups:
        group["lr"] = lr
    out = strategy(model.adapter, train_batch(batch, model, procs.device))
    logs = dict(out.logs)
    logs["lr/G"] = lr
    finite = bool(torch.isfinite(out.loss.detach()).all()) and all(math.isfinite(v) for v in out.logs.values())
    finite = all_true(finite, procs.device)
    updated = False
    if out.updates_generator and finite:
        procs.accelerator.backward(out.loss)
        average_gradients(model.params)
        norm = float(procs.accelerator.clip_grad_norm_(model.params, config.train.max_grad_norm or float("inf")))
        logs["grad_norm/G"] = norm
        if math.isfinite(norm) or optim.scaler is not None:  # fp16: the scaler skips inf steps itself
            optim.optimizer.step()
            updated = not getattr(optim.optimizer, "step_was_skipped", False)
        else:
            finite = False
    optim.optimizer.zero_grad(set_to_none=True)
    return logs, finite, updated


def train_batch(batch: dict, model, device: torch.device) -> TrainBatch:
    """Latents and conditioning of a collated batch (from the caches, or encoded now)."""
    if "latents" in batch:
        x0 = batch["latents"].to(device, torch.float32)
    else:
        x0 = model.family.encode_latents(model.pipe.vae, batch["pixels"].to(device))
    if "text" in batch:
        cond = {k: v.to(device, model.weight_dtype) for k, v in batch["text"].items()}
    else:
        with torch.no_grad():
            cond = model.family.encode_text(model.pipe, batch["caption"], device)
    cond.update({k: v.to(device) for k, v in model.family.size_cond(batch["size_cond"]).items()})
    return TrainBatch(x0=x0, cond=cond)


def batch_stream(
    data, position: tuple[int, int], batch_size: int, rank: int, workers: int
) -> Iterator[tuple[tuple[int, int], dict]]:
    """(position after this batch, batch) for this process, from `position`, forever."""
    positions: collections.deque = collections.deque()

    def this_process_slices():
        for epoch, index, batch in data.order.iterate(*position):
            positions.append((epoch, index + 1) if index + 1 < data.order.batches_per_epoch else (epoch + 1, 0))
            yield [(entry, epoch) for entry in batch[rank * batch_size : (rank + 1) * batch_size]]

    loader = torch.utils.data.DataLoader(
        data.dataset, batch_sampler=this_process_slices(), num_workers=workers, collate_fn=collate
    )
    for batch in loader:
        yield positions.popleft(), batch


# --- around the iterations ---------------------------------------------------------


def draw_samples(config, model, data, procs, monitor: Monitor, step: int) -> Optional[Path]:
    """The sample grid at `step` (main process): a PNG in samples/ and an image in TensorBoard."""
    if not (procs.main and data.samples):
        return None
    model.denoiser.eval()
    image = sample_grid(
        model.scheduler_config,
        model.family,
        config.adt.rollout_config(),
        data.samples.adapter,
        data.samples.conds,
        data.samples.latent_shape,
        config.sample.seed,
        procs.device,
    )
    model.denoiser.train()
    path = config.output_dir / "samples" / f"{config.train.output_name}-step{step:08d}.png"
    atomic_write_bytes(path, pil_bytes(image))
    monitor.image(step, "samples", image)
    return path


def last_good_save(outputs: Outputs) -> str:
    steps = outputs.saved_steps()
    return f"the last good save is step {steps[-1]} in {outputs.dir}" if steps else "nothing was saved yet"


class StopSignals:
    """Ctrl-C or SIGTERM sets `reason`: the loop finishes the step, saves and stops.
    A second Ctrl-C stops at once. Previous handlers come back on exit."""

    def __init__(self):
        self.reason: Optional[str] = None
        self.previous: dict = {}

    def _handle(self, signum, frame):
        if self.reason:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
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


__all__ = ["RunAborted", "RunResult", "batch_stream", "train", "train_step"]
