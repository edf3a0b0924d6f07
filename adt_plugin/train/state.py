"""Saved outputs (models beside their discriminators) and resumable training states.

    outputs/
      NAME-step00001000.safetensors              LoRA (kohya keys) or full model
      NAME-step00001000.adt_disc.safetensors     its discriminator (ADT runs)
      NAME-step00001000-state/                   everything `--resume` needs
      NAME.safetensors, NAME.adt_disc...         the final save

A state folder holds the trainable weights in float32, both optimizers (the
generator's here, the discriminator's inside the strategy state), the LR
scheduler, the fp16 grad scaler, every process's strategy state (its random
generator, discriminator, twins) and random states, and `trainer.json` (step,
data position, config). Every file is written atomically and the folder appears
under its final name only when complete, so a crash mid-save leaves the previous
state intact. Keep-last-N removes a step's model, discriminator and state together.
The .pt files are read with `torch.load(weights_only=True)`: tensors and plain data only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from ..checkpoint import SUFFIX as DISC_SUFFIX
from ..checkpoint import disc_path_for
from ..fileio import atomic_path, atomic_save_safetensors, atomic_write_bytes

STATE_FORMAT = "adt_train_state/1"


class ResumeError(ValueError):
    """A state folder that cannot resume this run."""


# --- names and keep-last-N ---------------------------------------------------------


class Outputs:
    def __init__(self, output_dir: Path, name: str, keep_last: int = 0):
        self.dir = output_dir
        self.name = name
        self.keep_last = keep_last

    def stem(self, step: Optional[int]) -> str:
        return self.name if step is None else f"{self.name}-step{step:08d}"

    def model_path(self, step: Optional[int], folder: bool = False) -> Path:
        return self.dir / (self.stem(step) if folder else self.stem(step) + ".safetensors")

    def state_path(self, step: int) -> Path:
        return self.dir / f"{self.stem(step)}-state"

    def saved_steps(self) -> list[int]:
        pattern = re.compile(rf"^{re.escape(self.name)}-step(\d{{8}})(\.safetensors|-state)?$")
        steps = (
            {int(m.group(1)) for p in self.dir.iterdir() if (m := pattern.match(p.name))}
            if self.dir.is_dir()
            else set()
        )
        return sorted(steps)

    def prune(self) -> list[Path]:
        """Remove all but the newest `keep_last` step saves: model, discriminator and state together."""
        if self.keep_last <= 0:
            return []
        removed = []
        for step in self.saved_steps()[: -self.keep_last]:
            for path in (self.model_path(step), self.model_path(step, folder=True), self.state_path(step)):
                for target in (path, disc_path_for(path)):
                    if target.is_dir():
                        shutil.rmtree(target)
                        removed.append(target)
                    elif target.exists():
                        target.unlink()
                        removed.append(target)
        return removed


def replace_dir(tmp: Path, final: Path) -> None:
    """Put a finished folder in place; an older one of the same name goes only after."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --- random states -----------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every global random state, in types `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- resumable state ---------------------------------------------------------------


def save_state(
    folder: Path,
    *,
    rank: int,
    barrier: Callable[[], None],
    trainer: Mapping[str, Any],
    trainable: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any,
    strategy: Any,
) -> Path:
    """Called on every process; returns when the folder is complete."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    torch_save(strategy.state_dict(), tmp / f"strategy-rank{rank}.pt")
    torch_save(rng_state(), tmp / f"rng-rank{rank}.pt")
    barrier()
    if rank == 0:
        atomic_save_safetensors({k: v.float() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch_save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if scaler is not None:
            torch_save(scaler.state_dict(), tmp / "scaler.pt")
        atomic_write_bytes(tmp / "trainer.json", json.dumps({"format": STATE_FORMAT, **trainer}, indent=2).encode())
        replace_dir(tmp, folder)
    barrier()
    return folder


def read_trainer_json(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "trainer.json"
    if not path.is_file():
        raise ResumeError(
            f"{folder} is not a training state folder (no trainer.json); pass a NAME-stepNNNNNNNN-state folder"
        )
    info = json.loads(path.read_text())
    if info.get("format") != STATE_FORMAT:
        raise ResumeError(f"{folder}: unknown state format {info.get('format')!r} (expected {STATE_FORMAT})")
    return info


def load_state(folder: Path, rank: int) -> dict[str, Any]:
    """Everything save_state wrote that this process needs."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = read_trainer_json(folder)
    strategy_file = folder / f"strategy-rank{rank}.pt"
    if not strategy_file.is_file():
        raise ResumeError(
            f"{folder} has no state for process {rank}: resume with the number of processes it was saved with ({info.get('world_size')})"
        )
    state = {
        "trainer": info,
        "trainable": load_file(str(folder / "trainable.safetensors")),
        "optimizer": torch.load(folder / "optimizer.pt", weights_only=True),
        "lr_scheduler": torch.load(folder / "lr_scheduler.pt", weights_only=True),
        "strategy": torch.load(strategy_file, weights_only=True),
        "rng": torch.load(folder / f"rng-rank{rank}.pt", weights_only=True),
    }
    if (folder / "scaler.pt").is_file():
        state["scaler"] = torch.load(folder / "scaler.pt", weights_only=True)
    return state


__all__ = ["DISC_SUFFIX", "Outputs", "ResumeError", "load_state", "read_trainer_json", "replace_dir", "save_state"]
