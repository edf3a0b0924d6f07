"""What a save writes, and what it checks before writing.

    saved = save(step, with_state, ...)      step None: the final name (NAME.safetensors)

1. Nothing non-finite is written as a good save. The model's tensors are checked
   as they will be stored (cast to `save.precision`: an fp32 1e30 is inf in
   fp16), then the discriminator's and the resumable state's (the strategy's
   state, the optimizer's moments, the float32 weights). One non-finite value
   and nothing is written: `NonFiniteSave` names the file and the tensors.
2. Every process holds the same weights (several processes).
3. The model and its discriminator are a pair: each is written under a temporary
   name (`.NAME....pending.tmp`), then both are renamed. A failure before the
   renames leaves the previous pair as it was. A model saved without a
   discriminator (an FT run) removes a stale discriminator of the same name.
4. The resumable state (state.py), on every process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch

from .. import __version__
from ..checkpoint import disc_path_for, discriminator_fingerprint, save_discriminator
from ..distributed import all_true, check_in_sync
from .export import save_diffusers_folder, save_single_file
from .loading import resolve_dtype
from .lora import lora_metadata, peft_state, to_kohya
from .state import Outputs, Progress, replace_dir, save_state


class NonFiniteSave(RuntimeError):
    """A save refused: what it would have written holds NaN or inf."""


@dataclass(frozen=True)
class Saved:
    model: Path
    discriminator: Optional[Path]
    state: Optional[Path]


# --- finite checks -----------------------------------------------------------------


def named_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with a dotted name."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from named_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from named_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def nonfinite(tensors: Iterable[tuple[str, torch.Tensor]], dtype: Optional[torch.dtype] = None) -> list[str]:
    """`name (n of m values)` for each floating tensor with NaN or inf, after a cast to `dtype` if given
    (one tensor at a time: no second copy of a whole model)."""
    bad = []
    for name, tensor in tensors:
        if not tensor.is_floating_point():
            continue
        values = tensor.detach() if dtype is None else tensor.detach().to(dtype)
        count = int((~torch.isfinite(values)).sum())
        if count:
            bad.append(f"{name} ({count} of {values.numel()} values)")
    return bad


def _describe(bad: list[str], limit: int = 3) -> str:
    more = f" and {len(bad) - limit} more tensor(s)" if len(bad) > limit else ""
    return ", ".join(bad[:limit]) + more


# --- the save ----------------------------------------------------------------------


def save(
    step: Optional[int],
    with_state: bool,
    *,
    config,
    model,
    data,
    strategy,
    optim,
    progress: Progress,
    procs,
    outputs: Outputs,
) -> Saved:
    """The model (and its discriminator) for `step` (None: the final name), and a
    resumable state if `with_state`. Called on every process."""
    dtype = resolve_dtype(config.save.precision)
    is_folder = config.train.method == "full" and config.save.format == "diffusers"
    path = outputs.model_path(step, folder=is_folder)
    disc = strategy.discriminator
    disc_path = disc_path_for(path)
    state_path = outputs.state_path(progress.step) if with_state else None
    trainable = peft_state(model.denoiser) if config.train.method == "lora" else model.denoiser.state_dict()

    # 1. what would be written, checked; every process checks its own part, all decide together
    problems: list[str] = []
    lora_tensors = None
    if procs.main:
        if config.train.method == "lora":
            lora_tensors = to_kohya(model.family, model.denoiser, config.lora.alpha, dtype)
            bad = nonfinite(lora_tensors.items())
        else:
            bad = nonfinite(model.denoiser.state_dict().items(), dtype)
        if bad:
            overflow = not nonfinite(trainable.items())
            hint = (
                f" (they are finite in float32 and overflow in {config.save.precision}: set save.precision = "
                f"'fp32' or 'bf16', or lower the learning rate)"
                if overflow
                else ""
            )
            problems.append(f"{path.name} would hold non-finite values: {_describe(bad)}{hint}")
    strategy_state = strategy.state_dict() if (disc is not None or with_state) else {}
    bad = nonfinite(named_tensors(strategy_state))
    if bad:
        where = disc_path.name if disc is not None else f"{state_path.name} (the strategy's state)"
        problems.append(f"{where} would hold non-finite values: {_describe(bad)}")
    if with_state and procs.main:  # the weights and the optimizer are the same everywhere; the main process writes them
        moments = named_tensors(optim.optimizer.state_dict()["state"], "optimizer")
        bad = nonfinite(trainable.items()) + nonfinite(moments)
        if bad:
            problems.append(f"{state_path.name} would hold non-finite values: {_describe(bad)}")
    if not all_true(not problems, procs.device):
        raise NonFiniteSave("; ".join(problems) or "another process found non-finite values to save")

    # 2. every process holds the same weights
    tensors = list(model.params) + (list(disc.state_for_checkpoint().values()) if disc is not None else [])
    check_in_sync(tensors, procs.device)

    # 3. model and discriminator, as a pair
    if procs.main:
        record = {
            "adt_plugin_version": __version__,
            "adt_strategy": strategy.name or config.adt.strategy,
            "adt_step": str(progress.step),
            "adt_config": json.dumps(config.to_dict()),
        }
        pending = [(path, path.with_name(f".{path.name}.pending.tmp"))]
        if disc is not None:
            pending.append((disc_path, disc_path.with_name(f".{disc_path.name}.pending.tmp")))
        try:
            _write_model(pending[0][1], config, model, data, record, lora_tensors, dtype)
            if disc is not None:
                save_discriminator(pending[1][1], strategy, {"model_file": path.name, **record})
        except BaseException:
            for _, tmp in pending:
                if tmp.exists():
                    _remove(tmp)
            raise
        for final, tmp in pending:
            if tmp.is_dir():
                replace_dir(tmp, final)
            else:
                os.replace(tmp, final)
        if disc is None and disc_path.exists():  # the discriminator of the model just replaced
            disc_path.unlink()

    # 4. the resumable state
    if with_state:
        trainer = {
            **progress.to_json(),
            "world_size": procs.world,
            "data_entries": len(data.dataset),
            "batches_per_epoch": data.order.batches_per_epoch,
            "family": model.family.name,
            "discriminator": discriminator_fingerprint(disc) if disc is not None else None,
            "adt_plugin_version": __version__,
            "config": config.to_dict(),
        }
        save_state(
            state_path,
            rank=procs.rank,
            barrier=procs.barrier,
            trainer=trainer,
            trainable=trainable,
            optimizer=optim.optimizer,
            scaler=optim.scaler,
            strategy=strategy,
        )
    procs.barrier()
    return Saved(path, disc_path if disc is not None else None, state_path)


def _write_model(path: Path, config, model, data, record: Mapping[str, str], lora_tensors, dtype) -> None:
    from ..fileio import atomic_save_safetensors

    train = config.train
    if train.method == "lora":
        meta = lora_metadata(
            model.family,
            config.lora,
            model.prediction_type,
            {
                **record,
                "ss_steps": record["adt_step"],
                "ss_learning_rate": str(train.learning_rate),
                "ss_resolution": f"({config.data.resolution}, {config.data.resolution})",
                "ss_output_name": train.output_name,
                "ss_num_train_images": str(len(data.dataset.items)),
                "ss_seed": str(train.seed),
                "ss_mixed_precision": train.mixed_precision,
            },
        )
        atomic_save_safetensors(lora_tensors, path, meta)
    elif config.save.format == "diffusers":
        save_diffusers_folder(path, model.pipe, model.family.denoiser_attr, dtype)
    else:
        source = Path(config.model.path).expanduser()
        save_single_file(path, model.family, model.denoiser, dtype, source if source.is_file() else None, record)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


__all__ = ["NonFiniteSave", "Saved", "named_tensors", "nonfinite", "save"]
