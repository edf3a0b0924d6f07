"""Where a model the user names comes from: a local folder, or a Hugging Face Hub id.

Every loader that takes a model name (the DINOv2 backbone, a TAESD decoder, the
metric networks of `adt eval` and of the ComfyUI nodes) resolves it here, so all of
them behave like transformers' `from_pretrained`: a folder is used as it is; a hub
id such as "facebook/dinov2-small" is read from the Hugging Face cache, or is
downloaded into that cache once when online; `HF_HUB_OFFLINE=1` (or
`TRANSFORMERS_OFFLINE=1`) keeps everything local.

    locate(name, what)    -> ModelSource: folder | cache | download      (no network, no weights read)
    fetch(source, echo)   -> the same model, downloaded into the cache now (the early checks use it,
                             so the later load is instant and a failure comes before any heavy work)
    source.load_name, source.pretrained_kwargs()   what to hand to from_pretrained
    hub_status()          -> whether the Hub answers (a HEAD request; nothing is downloaded)

A name that is neither, or a hub id that is not cached while offline, raises
`ModelNotFound`: one line that says what was looked for, where, and the command that
fetches it. huggingface_hub does the real work (cache layout, downloads, offline
mode); this module only decides which of its calls to make and words the errors.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

FOLDER, CACHE, DOWNLOAD = "folder", "cache", "download"

# A model folder is complete when it has config.json and one of these (what
# transformers' and diffusers' from_pretrained read; sharded models have an index).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)
# What an early fetch downloads: configs, tokenizer files and safetensors weights (not
# the same weights again as .bin / TF / Flax / ONNX). Repos without safetensors get
# their .bin weights in a second pass.
FETCH_PATTERNS = ("*.json", "*.txt", "*.safetensors")


class ModelNotFound(FileNotFoundError):
    """A named model is neither a usable local folder nor available from the Hub."""


def offline() -> bool:
    """Downloads are off: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE in the environment, or
    huggingface_hub's constant (which OneTrainer sets from its own offline option)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    return any(os.environ.get(v, "").upper() in constants.ENV_VARS_TRUE_VALUES for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> str:
    """The Hugging Face cache in use now (HF_HUB_CACHE / HF_HOME, or a tool's override)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def fetch_command(repo_id: str, filename: str = "") -> str:
    """The command that fetches a repository (or one file of it) into a local folder."""
    if filename:
        return f"hf download {repo_id} {filename} --local-dir ."
    return f"hf download {repo_id} --local-dir ./{repo_id.split('/')[-1]}"


def is_hub_id(name: str) -> bool:
    """"org/name" or "name" as the Hub spells repository ids, and not written like a path."""
    if not name or name.startswith((".", "/", "~")) or "\\" in name or os.path.isabs(name) or name.count("/") > 1:
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except Exception:  # noqa: BLE001 - HFValidationError, or no hub library: not an id
        return False
    return True


def _expand(name: str) -> Path:
    return Path(os.path.expanduser(name))


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES)


def cached_file(repo_id: str, filename: str) -> Optional[Path]:
    """A file of a hub repository in the Hugging Face cache, or None."""
    return _cached(repo_id, filename)


def _cached(repo_id: str, filename: str) -> Optional[Path]:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir())
    return Path(hit) if isinstance(hit, str) else None


@dataclass(frozen=True)
class ModelSource:
    """A resolved model name. `path` is the folder to read (a local folder or the
    cached snapshot); None while it still has to be downloaded."""

    name: str  # as the user gave it
    kind: str  # folder | cache | download
    path: Optional[Path]
    what: str = "model"
    setting: str = ""  # the setting that named it, for messages (e.g. "backbone_path")

    @property
    def load_name(self) -> str:
        """What from_pretrained gets: the folder, or the hub id (transformers then reads
        the cache, or downloads, exactly as for a user's own from_pretrained call)."""
        return str(self.path) if self.kind == FOLDER else self.name

    def pretrained_kwargs(self) -> dict:
        """from_pretrained's keywords: a folder is read locally; a hub id goes through
        the current cache and, when downloads are off, stays local."""
        if self.kind == FOLDER:
            return {"local_files_only": True}
        kwargs: dict = {"cache_dir": cache_dir()}
        if offline():
            kwargs["local_files_only"] = True
        return kwargs

    def describe(self) -> str:
        if self.kind == FOLDER:
            return f"local folder {self.path}"
        if self.kind == CACHE:
            return f"{self.name} in the Hugging Face cache ({self.path})"
        return f"{self.name}: not cached yet, will download from {endpoint()} into {cache_dir()} on first use"

    def config(self) -> dict:
        """config.json (no weights are read)."""
        if self.path is None:
            raise ModelNotFound(f"{self.what} {self.name!r} is not downloaded yet; nothing to read")
        path = self.path / "config.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelNotFound(f"{self.what} {self.name!r}: cannot read {path} ({err.__class__.__name__}: {err})") from None


def _setting_hint(setting: str) -> str:
    return f" and set {setting} to that folder" if setting else ""


def locate(name: str, what: str = "model", setting: str = "", weights: bool = True, example: str = "") -> ModelSource:
    """Where `name` would be loaded from, looking only at the disk (no network).

    A path that exists must be a model folder (config.json, and weights unless
    `weights=False`). A hub id is `cache` when its config and weights are in the
    Hugging Face cache, else `download` (online) or ModelNotFound (offline). `example`
    is a hub id the messages suggest (the usual model for this setting)."""
    name = str(name).strip()
    suggest = f"; get one with `{fetch_command(example)}`{_setting_hint(setting)}, or give the hub id {example}" if example else ""
    local = _expand(name)
    if local.exists():
        if not local.is_dir():
            raise ModelNotFound(f"{what} {name!r} is a file; give the model's folder (config.json + weights) or a hub id{suggest}")
        if not (local / "config.json").is_file():
            raise ModelNotFound(f"{what} folder {local} has no config.json: it is not a transformers/diffusers model folder{suggest}")
        if weights and not _has_weights(local):
            raise ModelNotFound(f"{what} folder {local} has a config.json but no weights ({', '.join(WEIGHT_FILES[:3])}, ...){suggest}")
        return ModelSource(name, FOLDER, local.resolve(), what, setting)
    if not is_hub_id(name):
        raise ModelNotFound(f"{what} {name!r}: no such folder ({local.absolute()}), and not a Hugging Face hub id{suggest}")
    config = _cached(name, "config.json")
    if config is not None and (not weights or _has_weights(config.parent)):
        return ModelSource(name, CACHE, config.parent, what, setting)
    if offline():
        state = "only partly in" if config is not None else "not a local folder and not in"
        raise ModelNotFound(
            f"{what} {name!r}: {state} the Hugging Face cache ({cache_dir()}), and downloads are off "
            f"(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE). On a machine with internet run "
            f"`{fetch_command(name)}`{_setting_hint(setting)} (or run once online to fill the cache)"
        )
    return ModelSource(name, DOWNLOAD, None, what, setting)


def fetch(source: ModelSource, echo: Callable[[str], None] = print, patterns: Sequence[str] = FETCH_PATTERNS) -> ModelSource:
    """Download a `download` source into the Hugging Face cache now; others are returned as they are."""
    if source.kind != DOWNLOAD:
        return source
    from huggingface_hub import snapshot_download

    echo(f"downloading {source.what} {source.name} from {endpoint()} into {cache_dir()} (once; later runs read the cache)")
    start = time.perf_counter()
    try:
        folder = Path(snapshot_download(source.name, allow_patterns=list(patterns), cache_dir=cache_dir()))
        if not _has_weights(folder):
            folder = Path(snapshot_download(source.name, allow_patterns=["*.bin"], cache_dir=cache_dir()))
    except Exception as err:  # noqa: BLE001 - every hub or network failure gets the same one-line advice
        raise ModelNotFound(download_failed_message(source, err)) from None
    if not (folder / "config.json").is_file() or not _has_weights(folder):
        raise ModelNotFound(f"{source.what} {source.name!r}: the Hub repository has no config.json and model weights")
    echo(f"downloaded {source.name} in {time.perf_counter() - start:.0f} s: {folder}")
    return ModelSource(source.name, CACHE, folder, source.what, source.setting)


def download_failed_message(source: ModelSource, err: BaseException) -> str:
    """One line for a failed download, by what huggingface_hub raised."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(err, GatedRepoError):  # before its base class, RepositoryNotFoundError
        reason = "it is gated: accept its terms on the Hub and log in (`hf auth login`)"
    elif isinstance(err, (RepositoryNotFoundError, RevisionNotFoundError)):
        reason = f"there is no such model on {endpoint()} (check the spelling; a local folder must exist)"
    else:
        reason = f"the download failed ({type(err).__name__}: {_first_line(err)})"
    return (
        f"{source.what} {source.name!r}: not a local folder, not in the Hugging Face cache ({cache_dir()}), and "
        f"{reason}. Fetch it with `{fetch_command(source.name)}`{_setting_hint(source.setting)}"
    )


def not_loadable_message(source: ModelSource, err: BaseException) -> str:
    """One line for a from_pretrained failure after locate() said the model was there."""
    hint = f"; fetch it again with `{fetch_command(source.name)}`" if source.kind != FOLDER else ""
    return f"{source.what} {source.name!r} ({source.describe()}) could not be loaded: {type(err).__name__}: {_first_line(err)}{hint}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


def display_name(path: str | os.PathLike) -> str:
    """How to name a model in a report: "org/name" for a Hugging Face cache snapshot
    (.../models--org--name/snapshots/<commit>), else the folder's or file's name."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--") :].replace("--", "/")
    return Path(path).name or str(path)


# ---- one file of a repository (plain weight files such as HPSv2's) ------------------------------


def split_hub_file(name: str) -> Optional[tuple[str, str]]:
    """'org/repo/path/file.pt' -> ('org/repo', 'path/file.pt'), as the Hub's hf:// paths
    name a file; None when `name` does not have that form."""
    name = name.removeprefix("hf://")
    parts = name.split("/")
    if len(parts) < 3 or name.startswith((".", "/", "~")) or "\\" in name or not all(parts):
        return None
    repo_id = "/".join(parts[:2])
    return (repo_id, "/".join(parts[2:])) if is_hub_id(repo_id) else None


def locate_file(name: str, what: str = "file", echo: Callable[[str], None] = print) -> Path:
    """A local file, or one file of a Hub repository ('org/repo/file'), from the cache
    or downloaded into it once (offline: from the cache only)."""
    local = _expand(name)
    if local.is_file():
        return local
    split = split_hub_file(name)
    if split is None:
        raise ModelNotFound(f"{what}: no file at {local.absolute()}")
    repo_id, filename = split
    cached = _cached(repo_id, filename)
    if cached is not None:
        return cached
    if offline():
        raise ModelNotFound(
            f"{what} {name!r}: no such local file and not in the Hugging Face cache ({cache_dir()}), and downloads "
            f"are off (HF_HUB_OFFLINE). On a machine with internet run `{fetch_command(repo_id, filename)}`"
        )
    from huggingface_hub import hf_hub_download

    echo(f"downloading {what} {name} from {endpoint()} into {cache_dir()} (once)")
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir()))
    except Exception as err:  # noqa: BLE001
        raise ModelNotFound(
            f"{what} {name!r}: downloading {filename} from {repo_id} failed ({type(err).__name__}); fetch it with "
            f"`{fetch_command(repo_id, filename)}` and give the local file"
        ) from None


# ---- is the Hub there? (adt doctor) -----------------------------------------------------------


def hub_status(repo_id: str = "facebook/dinov2-small", timeout: float = 3.0) -> tuple[str, str]:
    """('offline' | 'reachable' | 'unreachable', detail): a HEAD request for the repo's
    config.json with a short timeout; nothing is downloaded."""
    if offline():
        return "offline", "downloads are off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE): only local folders and the cache are used"
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, "config.json")
    start = time.perf_counter()
    try:
        get_hf_file_metadata(url, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - offline, DNS, proxy, timeout, HTTP errors
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

        if isinstance(err, (RepositoryNotFoundError, EntryNotFoundError)):  # it answered, with a "no"
            return "reachable", f"{endpoint()} answers ({type(err).__name__} for {repo_id})"
        return "unreachable", f"{endpoint()} did not answer within {timeout:g} s ({type(err).__name__}: {_first_line(err)[:160]})"
    return "reachable", f"{endpoint()} answers ({(time.perf_counter() - start) * 1000:.0f} ms)"


__all__ = [
    "CACHE",
    "DOWNLOAD",
    "FOLDER",
    "ModelNotFound",
    "ModelSource",
    "cache_dir",
    "cached_file",
    "display_name",
    "fetch",
    "fetch_command",
    "hub_status",
    "is_hub_id",
    "locate",
    "locate_file",
    "offline",
    "split_hub_file",
]
