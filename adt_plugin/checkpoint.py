"""Discriminator checkpoints: `<name>.adt_disc.safetensors` beside a LoRA or full model.

One safetensors file holds everything the ADT strategy owns: the heads, twins and
predictors (`disc.*`), the discriminator optimizer's state (`optim.*`), the
strategy's random-generator state (`rng`), the buffered rollouts (`buffer.*`, with
`rollout_buffer`); the header's metadata holds the rest
as JSON (format, discriminator config, backbone identity and feature widths,
step, compute spent so far, optimizer param groups, warm-up scheduler). The
strategy is reached only through its contract (`strategies/base.py`):
`has_discriminator`, `discriminator`, `settings`, `state_dict`, `load_state_dict`. The frozen backbone is not
stored: it is loaded from its own path and checked against the recorded identity.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open

from .fileio import atomic_save_safetensors

FORMAT = "adt_disc/1"
SUFFIX = ".adt_disc.safetensors"


class CheckpointMismatch(ValueError):
    """The checkpoint was made for another discriminator."""


def disc_path_for(model_path: str | os.PathLike) -> Path:
    """`out/my_lora.safetensors` -> `out/my_lora.adt_disc.safetensors`; a folder
    `out/model` -> `out/model.adt_disc.safetensors`."""
    p = Path(model_path)
    stem = p.name[: -len(p.suffix)] if p.suffix in (".safetensors", ".ckpt", ".pt", ".bin") else p.name
    return p.with_name(stem + SUFFIX)


def _fingerprint(strategy) -> dict[str, Any]:
    if not strategy.has_discriminator:
        raise ValueError(f"strategy {strategy.name!r} has no discriminator to save or load")
    return discriminator_fingerprint(strategy.discriminator)


def discriminator_fingerprint(disc) -> dict[str, Any]:
    """What a checkpoint must match to load into `disc` (recorded in every file)."""
    cfg = disc.config
    return {
        "kind": cfg.kind,
        "backbone": disc.backbone_identity,
        "taps": list(cfg.taps),
        "feature_channels": list(disc.backbone.feature_channels),
        "channels": cfg.channels,
        "pool": cfg.pool,
    }


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between a recorded fingerprint and this run's, one `key: checkpoint X, this run Y` each."""
    return [f"{k}: checkpoint {saved.get(k)!r}, this run {current[k]!r}" for k in current if saved.get(k) != current[k]]


def save_discriminator(path: str | os.PathLike, strategy, extra_metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the ADT strategy's state atomically to `path`."""
    fingerprint = _fingerprint(strategy)
    state = strategy.state_dict()
    tensors: dict[str, torch.Tensor] = {f"disc.{k}": v for k, v in state["discriminator"].items()}
    optim = state["d_optimizer"]
    for index, param_state in optim["state"].items():
        for key, value in param_state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    tensors["rng"] = state["rng"]
    buffer = state.get("buffer", [])
    for i, entry in enumerate(buffer):  # recent rollouts (rollout_buffer): resume draws from the same ones
        tensors[f"buffer.{i}.real"] = entry["real"].detach().cpu().contiguous()
        tensors[f"buffer.{i}.fake"] = entry["fake"].detach().cpu().contiguous()
        if entry["ref"] is not None:
            tensors[f"buffer.{i}.ref"] = entry["ref"].cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "fingerprint": json.dumps(fingerprint),
        "discriminator_config": json.dumps(strategy.discriminator.config.to_dict()),
        "settings": json.dumps(strategy.settings.to_dict() if strategy.settings is not None else {}),
        "step": str(state["step"]),
        "cost": json.dumps(state["cost"]),
        "skipped_d_steps": str(state["skipped_d_steps"]),
        "optim_param_groups": json.dumps(optim["param_groups"]),
        "d_scheduler": json.dumps(state["d_scheduler"]),
        "buffer_diff": json.dumps([entry["diff"] for entry in buffer]),
    }
    for key, value in (extra_metadata or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value)
    path = Path(path)
    atomic_save_safetensors(tensors, path, metadata)
    return path


def read_discriminator_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no discriminator checkpoint at {path}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    if metadata.get("format") != FORMAT:
        raise CheckpointMismatch(f"{path} is not an ADT discriminator checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})")
    return tensors, metadata


def load_discriminator(path: str | os.PathLike, strategy) -> dict[str, str]:
    """Restore the ADT strategy's state from `path`; return the file's metadata.

    Fails before touching the strategy if the file was made for another backbone,
    layer set or head layout, with a message that lists what differs."""
    tensors, metadata = read_discriminator_file(path)
    differs = fingerprint_differences(json.loads(metadata["fingerprint"]), _fingerprint(strategy))
    if differs:
        raise CheckpointMismatch(
            f"discriminator checkpoint {path} was made for another discriminator; differs in "
            + "; ".join(differs)
            + ". Use the settings it was trained with, or start a fresh discriminator (remove or rename the file)."
        )
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim_state.setdefault(int(index), {})[name] = value
    state = {
        "step": int(metadata["step"]),
        "rng": tensors["rng"],
        "discriminator": {k[len("disc.") :]: v for k, v in tensors.items() if k.startswith("disc.")},
        "d_optimizer": {"state": optim_state, "param_groups": _param_groups(metadata["optim_param_groups"])},
        "d_scheduler": json.loads(metadata["d_scheduler"]),
        "skipped_d_steps": int(metadata.get("skipped_d_steps", 0)),
        "cost": json.loads(metadata.get("cost", "{}")),  # files written before costs were counted: 0
        "buffer": [  # files written before the buffer existed: none
            {"real": tensors[f"buffer.{i}.real"], "fake": tensors[f"buffer.{i}.fake"],
             "ref": tensors.get(f"buffer.{i}.ref"), "diff": diff}
            for i, diff in enumerate(json.loads(metadata.get("buffer_diff", "[]")))
        ],
    }
    strategy.load_state_dict(state)
    return metadata


def _param_groups(text: str) -> list[dict[str, Any]]:
    # JSON has no tuples: give back the tuples (betas) the optimizer was saved with.
    groups = json.loads(text)
    return [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()} for g in groups]
