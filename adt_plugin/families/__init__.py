"""Model families: one module each, and the registry that finds a model's family.

    get_family("flux_dev")           by name (the names users write in configs)
    family_for(source)               detected from a diffusers pipeline, a pipeline
                                     folder, a single-file checkpoint, a denoiser or
                                     pipeline config, or a state dict
    family_for_scheduler(config)     the facts the core assumes when a trainer gives it
                                     only a scheduler config (CFG, the scheduler's own
                                     spacing; a resolution-dependent shift only where
                                     the config asks for one)

Adding a family is a module with a `ModelFamily` subclass (its facts), a line in
`_MODULES` below, its presets and its tests. Detection tries the families in the
order listed: the narrower rules first (SD2 before SD1, FLUX.1-dev before schnell).
A family that cannot be told from its weights (`variant_of`: Z-Image-Turbo of
Z-Image) is never detected, only named.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from . import flux, sd, sd3, sdxl, zimage
from .adapter import FamilyAdapter
from .base import GUIDANCE_MODES, Guidance, LoraNames, ModelFamily, VaeSpec, guidance_cond

_MODULES = (sd, sdxl, sd3, flux, zimage)

FAMILIES: dict[str, ModelFamily] = {family.name: family for module in _MODULES for family in module.FAMILIES}

#: the family of a bare scheduler config (see `family_for_scheduler`)
GENERIC = ModelFamily()


class FamilyError(ValueError):
    """The model's family cannot be found or named; says what was seen and what to do."""


def get_family(name: str) -> ModelFamily:
    if isinstance(name, ModelFamily):
        return name
    if name in FAMILIES:
        return FAMILIES[name]
    close = difflib.get_close_matches(str(name), list(FAMILIES), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise FamilyError(f"unknown model family {name!r}{hint} (known: {', '.join(FAMILIES)})")


def family_for_scheduler(scheduler_config: Mapping[str, Any]) -> ModelFamily:
    """The facts the core assumes from a scheduler config alone: how the core has always
    sampled (the scheduler's own spacing, batched CFG); a config that asks for dynamic
    shifting gets its mu from the latent size, as diffusers' pipelines compute it."""
    return GENERIC


def interchangeable(found: str, wanted: str) -> bool:
    """Whether a model detected as `found` may be run as `wanted` (the same weights
    layout: SD1/SD2, Z-Image/Z-Image-Turbo)."""
    if found == wanted:
        return True
    a, b = get_family(found), get_family(wanted)
    return (a.variant_of or a.name) == (b.variant_of or b.name)


def family_for(source: Any) -> ModelFamily:
    """The family of `source`: a diffusers pipeline object, a path (a diffusers pipeline
    folder or a .safetensors file), a config dict (model_index.json or a denoiser's
    config.json) or a state dict (key -> tensor)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.path.expanduser(str(source)))
        if path.is_dir():
            return _from_folder(path)
        if path.is_file():
            keys, shapes = _checkpoint_keys(path)
            return _from_keys(keys, shapes, str(path))
        raise FamilyError(f"{path} does not exist (a diffusers pipeline folder or a .safetensors file)")
    if hasattr(source, "components") and hasattr(source, "config"):  # a DiffusionPipeline
        return _from_pipeline(source)
    if isinstance(source, Mapping):
        if source and all(hasattr(v, "shape") for v in source.values()):
            return _from_keys(list(source), {k: tuple(v.shape) for k, v in source.items()}, "the state dict")
        class_name = str(source.get("_class_name", ""))
        if class_name.endswith("Pipeline"):
            return _pick(_by_pipeline(class_name), {}, None, f"a {class_name} (model_index.json alone)")
        if class_name:
            candidates = [f for f in FAMILIES.values() if f.denoiser_class == class_name]
            return _pick(candidates, source, None, f"a {class_name} config")
        raise FamilyError(
            "family_for: this dict is neither a config with _class_name nor a state dict; a scheduler config does "
            "not name a family (family_for_scheduler gives the facts the core assumes from it)"
        )
    raise FamilyError(f"family_for: cannot read a model family from a {type(source).__name__}")


def _by_pipeline(class_name: str) -> list[ModelFamily]:
    candidates = [f for f in FAMILIES.values() if f.pipeline_class == class_name]
    if not candidates:
        known = sorted({f.pipeline_class for f in FAMILIES.values()})
        raise FamilyError(f"a {class_name or 'unknown'} pipeline is not a family ADT knows; known: {', '.join(known)}")
    return candidates


def _pick(
    candidates: Sequence[ModelFamily], denoiser_config: Mapping[str, Any], text_config: Optional[Mapping[str, Any]], what: str
) -> ModelFamily:
    if not candidates:
        raise FamilyError(f"{what} is not a model family ADT knows (known: {', '.join(FAMILIES)})")
    found = [f for f in candidates if f.matches_config(denoiser_config, text_config)]
    if not found:
        names = ", ".join(f.name for f in candidates)
        raise FamilyError(f"{what} could be {names}; its denoiser's config does not say which: give the pipeline folder or name the family")
    return found[0]


def _json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _from_folder(folder: Path) -> ModelFamily:
    index = _json(folder / "model_index.json")
    if index is None:
        raise FamilyError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    candidates = _by_pipeline(str(index.get("_class_name", "")))
    attr = candidates[0].denoiser_attr
    denoiser_config = _json(folder / attr / "config.json") or {}
    text_config = _json(folder / "text_encoder" / "config.json")
    return _pick(candidates, denoiser_config, text_config, f"{folder}")


def _from_pipeline(pipe: Any) -> ModelFamily:
    candidates = _by_pipeline(type(pipe).__name__)
    denoiser = getattr(pipe, candidates[0].denoiser_attr, None)
    text_encoder = getattr(pipe, "text_encoder", None)
    denoiser_config = dict(denoiser.config) if denoiser is not None else {}
    text_config = text_encoder.config.to_dict() if text_encoder is not None and hasattr(text_encoder.config, "to_dict") else None
    return _pick(candidates, denoiser_config, text_config, f"this {type(pipe).__name__}")


def _checkpoint_keys(path: Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys if k.endswith(("attn2.to_k.weight", "proj_in.weight"))}
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise FamilyError(f"{path} cannot be read as a safetensors checkpoint ({err})") from err
    return keys, shapes


def _from_keys(keys: Sequence[str], shapes: Mapping[str, Sequence[int]], what: str) -> ModelFamily:
    for family in FAMILIES.values():
        if family.matches_keys(keys, shapes):
            return family
    raise FamilyError(f"{what}: no known denoiser keys (known families: {', '.join(FAMILIES)})")


__all__ = [
    "FAMILIES",
    "FamilyAdapter",
    "GENERIC",
    "GUIDANCE_MODES",
    "FamilyError",
    "Guidance",
    "LoraNames",
    "ModelFamily",
    "VaeSpec",
    "family_for",
    "family_for_scheduler",
    "get_family",
    "guidance_cond",
    "interchangeable",
]
