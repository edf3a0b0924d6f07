"""Where each metric's weights come from, and loading them from local files only.

Nothing is downloaded at run time. Each metric names the file (or folder) it
needs and where to get it once; `find_weights` looks for those names in a
folder (`adt eval --metrics-dir`, ComfyUI's `models/adt_metrics`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch


class WeightsNotFound(FileNotFoundError):
    """A metric's weights are missing or are not the file the metric expects."""


@dataclass(frozen=True)
class WeightsSpec:
    key: str
    what: str
    names: tuple[str, ...]  # accepted file / folder names, preferred first
    folder: bool  # a Hugging Face model folder (config.json + weights) rather than one file
    get: str  # how a user gets it (one command or URL)


WEIGHTS: dict[str, WeightsSpec] = {
    "inception": WeightsSpec(
        "inception",
        "FID Inception weights",
        ("pt_inception-2015-12-05-6726825d.pth",),
        False,
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    ),
    "dinov2": WeightsSpec(
        "dinov2",
        "DINOv2 for FD-DINOv2",
        ("dinov2-large", "dinov2-giant", "dinov2-base", "dinov2-small"),
        True,
        "huggingface-cli download facebook/dinov2-large --local-dir dinov2-large",
    ),
    "clip": WeightsSpec(
        "clip",
        "CLIP ViT-L/14 (CLIP score and the aesthetic predictor)",
        ("clip-vit-large-patch14",),
        True,
        "huggingface-cli download openai/clip-vit-large-patch14 --local-dir clip-vit-large-patch14",
    ),
    "aesthetic": WeightsSpec(
        "aesthetic",
        "LAION aesthetic predictor v2 head",
        ("sac+logos+ava1-l14-linearMSE.pth",),
        False,
        "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
        " (or huggingface-cli download camenduru/improved-aesthetic-predictor sac+logos+ava1-l14-linearMSE.pth --local-dir .)",
    ),
    "hps": WeightsSpec(
        "hps",
        "HPSv2 weights",
        ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt"),
        False,
        "huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir .",
    ),
}


def find_weights(key: str, folders: Iterable[str | os.PathLike]) -> Optional[Path]:
    """The first accepted name of `key` present in `folders`, or None."""
    spec = WEIGHTS[key]
    for folder in folders:
        for name in spec.names:
            candidate = Path(os.path.expanduser(str(folder))) / name
            if (candidate / "config.json").is_file() if spec.folder else candidate.is_file():
                return candidate
    return None


def missing_message(key: str, looked_in: Iterable[str | os.PathLike] = ()) -> str:
    spec = WEIGHTS[key]
    where = ", ".join(str(f) for f in looked_in)
    place = f" in {where}" if where else ""
    kind = "folder" if spec.folder else "file"
    return f"{spec.what}: no {kind} named {' or '.join(spec.names)}{place}. Get it with: {spec.get}"


def load_state_dict_file(path: Path, what: str, get: str) -> dict[str, torch.Tensor]:
    """A tensor dict from a .safetensors file or a torch file holding only tensors
    (loaded with weights_only=True: no code in a pickle runs)."""
    if not path.is_file():
        raise WeightsNotFound(f"{what}: no file at {path}; {get}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise WeightsNotFound(f"{what}: could not read {path} ({err.__class__.__name__}: {err}); {get}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsNotFound(f"{what}: {path} does not hold a dict of tensors; {get}")
    return state
