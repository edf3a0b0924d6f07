"""Where each metric's weights come from.

Each metric names the file (or folder) it needs and where to get it once;
`find_weights` looks for those names in a folder (`adt eval --metrics-dir`,
ComfyUI's `models/adt_metrics`). The transformers models (DINOv2, CLIP) can also be
named by their Hugging Face hub id: read from the Hugging Face cache, or downloaded
into it once when online (`adt_plugin.hub`); one file of a hub repository is named
`org/repo/file` (HPSv2: `xswu/HPSv2/HPS_v2.1_compressed.pt`). Nothing is downloaded
unless a hub id is given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

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
    hub: str = ""  # its hub id ("org/repo", or "org/repo/file" for one file); used from the cache when present


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
        "hf download facebook/dinov2-large --local-dir dinov2-large",
        "facebook/dinov2-large",
    ),
    "clip": WeightsSpec(
        "clip",
        "CLIP ViT-L/14 (CLIP score and the aesthetic predictor)",
        ("clip-vit-large-patch14",),
        True,
        "hf download openai/clip-vit-large-patch14 --local-dir clip-vit-large-patch14",
        "openai/clip-vit-large-patch14",
    ),
    "aesthetic": WeightsSpec(
        "aesthetic",
        "LAION aesthetic predictor v2 head",
        ("sac+logos+ava1-l14-linearMSE.pth",),
        False,
        "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"
        " (or hf download camenduru/improved-aesthetic-predictor sac+logos+ava1-l14-linearMSE.pth --local-dir .)",
    ),
    "hps": WeightsSpec(
        "hps",
        "HPSv2 weights",
        ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt"),
        False,
        "hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir .",
        "xswu/HPSv2/HPS_v2.1_compressed.pt",
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
    hub_id = f", or give the hub id {spec.hub} (downloaded once into the Hugging Face cache)" if spec.hub else ""
    return f"{spec.what}: no {kind} named {' or '.join(spec.names)}{place}. Get it with: {spec.get}{hub_id}"


def resolve_weights(
    key: str, given: Optional[str], folders: Iterable[str | os.PathLike] = (), echo: Callable[[str], None] = print
) -> Optional[Path]:
    """The local path of a metric's weights, or None when there are none.

    `given` (a path, or a hub id) must resolve: a hub id is read from the Hugging Face
    cache or downloaded into it now (online), else WeightsNotFound says how to get it.
    Without it: the standard names in `folders`, then the metric's hub id if it is
    already in the cache (nothing is downloaded unasked)."""
    from .. import hub

    spec = WEIGHTS[key]
    if given:
        try:
            if spec.folder:
                source = hub.locate(given, what=spec.what, example=spec.hub)
                return hub.fetch(source, echo).path
            return hub.locate_file(given, what=spec.what, echo=echo)
        except hub.ModelNotFound as err:
            raise WeightsNotFound(f"{err}. Get it with: {spec.get}") from None
    found = find_weights(key, folders)
    if found is None and spec.hub:
        found = cached_hub_weights(key)
    return found


def cached_hub_weights(key: str) -> Optional[Path]:
    """The metric's hub model (or file) when it is in the Hugging Face cache; None otherwise."""
    from .. import hub

    spec = WEIGHTS[key]
    try:
        if spec.folder:
            source = hub.locate(spec.hub, what=spec.what)
            return source.path if source.kind == hub.CACHE else None
        repo_id, filename = hub.split_hub_file(spec.hub) or ("", "")
        return hub.cached_file(repo_id, filename) if repo_id else None
    except hub.ModelNotFound:
        return None


def weights_file(path: str | os.PathLike, key: str, echo: Callable[[str], None] = print) -> Path:
    """A local file, or one file of a hub repository ('org/repo/file': from the Hugging
    Face cache, or downloaded into it once when online)."""
    from .. import hub

    local = Path(os.path.expanduser(str(path)))
    if local.exists() or hub.split_hub_file(str(path)) is None:
        return local
    try:
        return hub.locate_file(str(path), what=WEIGHTS[key].what, echo=echo)
    except hub.ModelNotFound as err:
        raise WeightsNotFound(f"{err}. Get it with: {WEIGHTS[key].get}") from None


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
