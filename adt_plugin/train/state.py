"""Where a run is, and the resumable state that records it.

    outputs/
      NAME-step00001000.safetensors              LoRA (kohya keys) or full model
      NAME-step00001000.adt_disc.safetensors     its discriminator (strategies that have one)
      NAME-step00001000-state/                   everything `--resume` needs
      NAME.safetensors, NAME.adt_disc...         the final save

A state folder holds the trainable weights in float32, the generator's
optimizer, the fp16 grad scaler, every process's strategy state (its call count,
random generator, discriminator and the discriminator's optimizer) and random
states, and `trainer.json`: the `Progress` (step, data position, counters), the
model family, the discriminator's fingerprint and the config. Every file is
written atomically and the folder appears under its final name only when
complete, so a crash mid-save leaves the previous state intact. The .pt files are
read with `torch.load(weights_only=True)`: tensors and plain data only.

Resuming is checked twice: `check_resume` before anything loads (trainer.json
against the config and the model's family: what would not fit, or would silently
make another run), and `restore` once the model and the strategy are built (the
discriminator's fingerprint, which needs the backbone; then the tensors).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from ..checkpoint import SUFFIX as DISC_SUFFIX
from ..checkpoint import disc_path_for, discriminator_fingerprint, fingerprint_differences
from ..fileio import atomic_path, atomic_save_safetensors, atomic_write_bytes

STATE_FORMAT = "adt_train_state/1"


class ResumeError(ValueError):
    """A state folder that cannot resume this run."""


# --- names, keep-last-N, leftovers -------------------------------------------------


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
                    if target.exists():
                        _remove(target)
                        removed.append(target)
        return removed

    def clean_unfinished(self) -> list[str]:
        """What a killed save of this run's name left behind: temporary files and
        folders (`.NAME...tmp`, in the output folder and samples/) are removed; a
        folder that was being replaced (`NAME...-state.old`) is put back when its
        replacement never arrived, else removed. Returns a line per action."""
        ours = re.escape(self.name) + r"(-step\d{8})?"
        temporary = re.compile(rf"^\.+{ours}(-state|\.).*\.tmp$")
        replaced = re.compile(rf"^{ours}(-state)?\.old$")
        removed, lines = [], []
        for folder in (self.dir, self.dir / "samples"):
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if temporary.match(path.name):
                    _remove(path)
                    removed.append(path.name)
                elif folder == self.dir and replaced.match(path.name):
                    final = path.with_name(path.name[: -len(".old")])
                    if final.exists():
                        _remove(path)
                        removed.append(path.name)
                    else:
                        os.replace(path, final)
                        lines.append(f"put back {final} (a save was killed while replacing it)")
        if removed:
            lines.insert(
                0, f"removed {len(removed)} unfinished file(s) of a killed save in {self.dir}: {', '.join(removed)}"
            )
        return lines


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


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


# --- where the run is --------------------------------------------------------------


@dataclass
class Progress:
    """The loop's counters; all but `nonfinite_run` are saved in trainer.json."""

    step: int = 0  # iterations done
    position: tuple[int, int] = (0, 0)  # (epoch, batch index) of the next batch
    generator_steps: int = 0  # generator updates taken (ADT: every g_every-th iteration, when finite)
    nonfinite_total: int = 0  # iterations with a non-finite loss, gradient or logged value
    nonfinite_run: int = 0  # ... of them in a row, up to now

    def to_json(self) -> dict[str, int]:
        return {
            "step": self.step,
            "epoch": self.position[0],
            "batch_index": self.position[1],
            "generator_steps": self.generator_steps,
            "nonfinite_total": self.nonfinite_total,
        }

    @classmethod
    def from_json(cls, info: Mapping[str, Any]) -> "Progress":
        return cls(
            step=int(info["step"]),
            position=(int(info["epoch"]), int(info["batch_index"])),
            generator_steps=int(info.get("generator_steps", 0)),
            nonfinite_total=int(info.get("nonfinite_total", 0)),
        )


# --- resumable state ---------------------------------------------------------------


def save_state(
    folder: Path,
    *,
    rank: int,
    barrier: Callable[[], None],
    trainer: Mapping[str, Any],
    trainable: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
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
            f"{folder} has no state for process {rank}: resume with the number of processes it was saved "
            f"with ({info.get('world_size')})"
        )
    state = {
        "trainer": info,
        "trainable": load_file(str(folder / "trainable.safetensors")),
        "optimizer": torch.load(folder / "optimizer.pt", weights_only=True),
        "strategy": torch.load(strategy_file, weights_only=True),
        "rng": torch.load(folder / f"rng-rank{rank}.pt", weights_only=True),
    }
    if (folder / "scaler.pt").is_file():
        state["scaler"] = torch.load(folder / "scaler.pt", weights_only=True)
    return state


# --- resuming ----------------------------------------------------------------------

# Settings a resumed run must share with the run that saved the state: else the
# continuation would not be the run it claims to continue, or the saved tensors
# would not fit. Everything else may change on resume and applies from the
# resumed step on (the learning rate and the optimizer's settings included).
RESUME_MUST_MATCH = (
    ("train", "method"),
    ("train", "batch_size"),
    ("train", "seed"),
    ("adt", "strategy"),
    ("adt", "seed"),
)
LORA_MUST_MATCH = (("lora", "rank"), ("lora", "alpha"), ("lora", "target_modules"))
# What the discriminator's fingerprint is made of, as settings (the backbone's own
# identity is compared once it is loaded), and its optimizer's settings, which its
# saved state brings back (so a change would be ignored).
DISCRIMINATOR_MUST_MATCH = (
    ("adt", "discriminator"),
    ("adt", "taps"),
    ("adt", "head_channels"),
    ("adt", "pool"),
    ("adt", "d_lr"),
    ("adt", "d_weight_decay"),
)


def check_resume(folder: Path, saved: Mapping[str, Any], config, family: str) -> None:
    """Before anything loads: the state's trainer.json against this run's config and model family."""
    before = saved.get("config", {})
    now = config.to_dict()
    keys = list(RESUME_MUST_MATCH)
    if now["train"]["method"] == "lora":
        keys += LORA_MUST_MATCH
    if saved.get("discriminator"):
        keys += DISCRIMINATOR_MUST_MATCH
    differs = [
        f"[{section}] {key}: saved {before.get(section, {}).get(key)!r}, now {now[section][key]!r}"
        for section, key in keys
        if before.get(section, {}).get(key) != now[section][key]
    ]
    if saved.get("family") != family:
        where = f"[model] path {config.model.path}"
        differs.insert(0, f"model family: saved {saved.get('family')!r}, now {family!r} ({where})")
    if differs:
        note = (
            " (the discriminator's optimizer resumes with its saved rate and weight decay)"
            if any(k in d for d in differs for k in ("] d_lr:", "] d_weight_decay:"))
            else ""
        )
        raise ResumeError(
            f"{folder} was saved by a different run; " + "; ".join(differs) + note
            + ". Resume with the saved values, or start a new run (without --resume)."
        )


def check_resume_processes(folder: Path, saved: Mapping[str, Any], world: int) -> None:
    if saved.get("world_size") != world:
        raise ResumeError(
            f"{folder} was saved by a different run; processes: saved {saved.get('world_size')}, now {world}. "
            f"Resume with the number of processes it was saved with."
        )


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, train, saved_train: Mapping[str, Any]) -> list[str]:
    """A loaded optimizer state brings back the saved run's settings: put this
    run's in their place, and say which changed. (The learning rate is set before
    every step from the schedule; it is only reported here.)"""
    lines = []
    saved_lr = saved_train.get("learning_rate")
    if saved_lr is not None and float(saved_lr) != train.learning_rate:
        lines.append(
            f"train.learning_rate: the state was saved with {saved_lr:g}; continuing with {train.learning_rate:g} "
            f"(the schedule {train.lr_scheduler!r} goes on from the resumed step)"
        )
    wanted = {
        "betas": (train.adam_beta1, train.adam_beta2),
        "eps": train.adam_epsilon,
        "weight_decay": train.weight_decay,
    }
    names = {"betas": "adam_beta1/adam_beta2", "eps": "adam_epsilon", "weight_decay": "weight_decay"}
    for key, value in wanted.items():
        changed = False
        for group in optimizer.param_groups:
            if key in group:
                before = tuple(group[key]) if isinstance(group[key], (list, tuple)) else group[key]
                if before != value:
                    changed, old = True, before
                group[key] = value
        if changed:
            lines.append(f"train.{names[key]}: the state was saved with {old}; continuing with {value}")
    return lines


def restore(folder: Path, saved: Mapping[str, Any], config, model, data, strategy, optim, rank: int, say) -> Progress:
    """Load the state into the set-up's model, optimizer and strategy; the progress to continue from."""
    folder = Path(folder)
    disc = strategy.discriminator
    if disc is not None and saved.get("discriminator"):
        differs = fingerprint_differences(saved["discriminator"], discriminator_fingerprint(disc))
        if differs:
            raise ResumeError(
                f"{folder} was saved with another discriminator; differs in {'; '.join(differs)}. Resume with the "
                f"settings it was trained with ([adt] backbone_path, taps, head_channels), or start a new run."
            )
    state = load_state(folder, rank)
    try:
        if config.train.method == "lora":
            from .lora import load_peft_state

            load_peft_state(model.denoiser, state["trainable"])
        else:
            model.denoiser.load_state_dict(state["trainable"], strict=True)
    except (RuntimeError, ValueError) as err:
        raise ResumeError(f"{folder}: the saved weights do not fit this model ({_first_line(err)})") from None
    optim.optimizer.load_state_dict(state["optimizer"])
    for line in apply_optimizer_settings(optim.optimizer, config.train, saved.get("config", {}).get("train", {})):
        say(line)
    if "scaler" in state and optim.scaler is not None:
        optim.scaler.load_state_dict(state["scaler"])
    try:
        strategy.load_state_dict(state["strategy"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ResumeError(f"{folder}: the saved strategy state does not fit this run ({_first_line(err)})") from None
    set_rng_state(state["rng"])
    progress = Progress.from_json(saved)
    if saved.get("data_entries") != len(data.dataset) or saved.get("batches_per_epoch") != data.order.batches_per_epoch:
        say(
            "warning: the data changed since the state was saved; the batch order from here on differs "
            "from the uninterrupted run's"
        )
    say(f"resumed from {folder} at step {progress.step}")
    return progress


def _first_line(err: BaseException) -> str:
    """The head of a load error (torch's size-mismatch errors say what in their second line)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines[:2])[:400] if lines else type(err).__name__


__all__ = [
    "DISC_SUFFIX",
    "Outputs",
    "Progress",
    "ResumeError",
    "check_resume",
    "check_resume_processes",
    "load_state",
    "read_trainer_json",
    "replace_dir",
    "restore",
    "save_state",
]
