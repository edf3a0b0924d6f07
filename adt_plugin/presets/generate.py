"""Write the kohya_ss GUI and OneTrainer presets from the TOML presets.

    python -m adt_plugin.presets.generate          # rewrite kohya_gui/*.json, onetrainer/*/*.json
    python -m adt_plugin.presets.generate --check  # exit 1 and name the files that differ

The TOML presets (and the family files they extend) are the one place the paper's
settings are written down; each GUI preset below is one of them, merged and validated
by `adt train`'s own config code, then spelled in that tool's field names. What the
TOML does not say (the tool's model type, weight dtypes, base model name, and the
host's own loss options, which ADT replaces and so are set to their neutral values)
is written here, per tool and family. Needs neither tool installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import folder


@dataclass(frozen=True)
class Target:
    tool: str  # kohya_gui | onetrainer
    preset: str  # the TOML preset it is generated from
    path: str  # relative to adt_plugin/presets/


TARGETS = (
    Target("kohya_gui", "sd15-ddim50-lora-adt", "kohya_gui/ADT - SD15 LoRA (DDIM 50).json"),
    Target("kohya_gui", "sdxl-ddim50-lora-adt", "kohya_gui/ADT - SDXL LoRA (DDIM 50).json"),
    Target("kohya_gui", "sd3-flow28-lora-adt", "kohya_gui/ADT - SD3 LoRA (flow Euler 28).json"),
    Target("onetrainer", "sd15-ddim50-lora-adt", "onetrainer/SD1.5/#sd 1.5 LoRA ADT.json"),
    Target("onetrainer", "sdxl-ddim50-lora-adt", "onetrainer/SDXL/#sdxl 1.0 LoRA ADT.json"),
    Target("onetrainer", "sd3-flow28-lora-adt", "onetrainer/SD3/#sd 3 LoRA ADT.json"),
)


def merged_preset(name: str) -> tuple[dict[str, Any], Any]:
    """(the [adt] keys the preset and what it extends state, the validated RunConfig)."""
    from ..train.config import build_run_config, merge
    from ..train.presets import preset_layers

    raw: dict[str, Any] = {}
    for _, layer in preset_layers(name):
        raw = merge(raw, layer)
    return dict(raw.get("adt", {})), build_run_config(raw, (f"preset {name}",))


def adt_values(stated: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """The stated [adt] keys with their validated values, in AdtSettings' field order."""
    full = config.adt.to_dict()
    return {key: full[key] for key in full if key in stated}


# -- kohya_ss GUI (kohya_gui/lora_gui.py @ 45088f04: the JSON keys are its parameter names) -------
KOHYA_FAMILY = {
    "sd1": {"sdxl": False, "sd3_checkbox": False, "v2": False},
    "sdxl": {"sdxl": True, "sd3_checkbox": False, "v2": False, "sdxl_no_half_vae": True},
    "sd3": {"sdxl": False, "sd3_checkbox": True, "v2": False},
}
# Other model families' checkboxes, off; the host's loss options, neutral (ADT's loss replaces them).
KOHYA_FIXED = {
    "LoRA_type": "Standard",
    "anima_checkbox": False,
    "flux1_checkbox": False,
    "hunyuan_image_checkbox": False,
    "lumina_checkbox": False,
    "epoch": 1000,  # max_train_steps below ends the run
    "ip_noise_gamma": 0,
    "loss_type": "l2",
    "min_snr_gamma": 0,
    "noise_offset": 0,
    "lr_warmup": 0,
    "save_state": True,
    "text_encoder_lr": 0,
}
KOHYA_OPTIMIZER = {"adamw": "AdamW", "adamw8bit": "AdamW8bit"}
KOHYA_PRECISION = {"no": "no", "fp16": "fp16", "bf16": "bf16"}


def kohya_option(key: str, value: Any) -> str:
    """`--adt_key value` as the GUI splits "Additional parameters" (on whitespace, quotes removed)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = " ".join(str(v) for v in value)
    else:
        text = str(value)
    if not text or '"' in text or (not isinstance(value, (list, tuple)) and any(c.isspace() for c in text)):
        raise ValueError(f"[adt] {key} = {value!r} cannot be written in the kohya GUI's Additional parameters")
    return f"--adt_{key} {text}"


def kohya_gui(preset: str) -> dict[str, Any]:
    stated, config = merged_preset(preset)
    train, data, lora, save = config.train, config.data, config.lora, config.save
    if train.method != "lora":
        raise ValueError(f"preset {preset}: the kohya GUI presets are LoRA presets (train.method = 'lora')")
    out: dict[str, Any] = dict(KOHYA_FIXED)
    out.update(KOHYA_FAMILY[config.model.family])
    out.update(
        {
            "additional_parameters": " ".join(kohya_option(k, v) for k, v in adt_values(stated, config).items()),
            # ADT runs only where "Additional parameters" holds --adt_* options: with this left
            # behind by a stock preset the launcher runs sd-scripts unchanged
            "extra_accelerate_launch_args": "-m adt_plugin.kohya.launch",
            "cache_latents": data.cache_latents,
            "cache_latents_to_disk": data.cache_latents,
            "enable_bucket": data.buckets,
            "gradient_checkpointing": train.gradient_checkpointing,
            "learning_rate": train.learning_rate,
            "unet_lr": train.learning_rate,
            "lr_scheduler": train.lr_scheduler,
            "lr_warmup_steps": train.lr_warmup_steps,
            "max_resolution": f"{data.resolution},{data.resolution}",
            "max_train_steps": train.max_steps,
            "mixed_precision": KOHYA_PRECISION[train.mixed_precision],
            "save_precision": {"no": "float"}.get(train.mixed_precision, train.mixed_precision),
            "network_dim": lora.rank,
            "network_alpha": lora.alpha,
            "optimizer": KOHYA_OPTIMIZER[train.optimizer],
            "optimizer_args": f"weight_decay={train.weight_decay}",
            "max_grad_norm": train.max_grad_norm,
            "save_every_n_steps": save.every_n_steps,
            "train_batch_size": train.batch_size,
        }
    )
    return dict(sorted(out.items()))


# -- OneTrainer (modules/util/config/TrainConfig.py @ 23df3832: field names and enums) --------------
ONETRAINER_FAMILY: dict[str, dict[str, Any]] = {
    "sd1": {
        "model_type": "STABLE_DIFFUSION_15",
        "base_model_name": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "output_model_format": "KOHYA_LORA",
        "layer_filter": "attentions",
        "layer_filter_preset": "attn-mlp",
        "text_encoder": {"weight_dtype": "FLOAT_16", "train": False},
        "unet": {"weight_dtype": "FLOAT_16"},
        "vae": {"weight_dtype": "FLOAT_32"},
    },
    "sdxl": {
        "model_type": "STABLE_DIFFUSION_XL_10_BASE",
        "base_model_name": "stabilityai/stable-diffusion-xl-base-1.0",
        "output_model_format": "KOHYA_LORA",
        "layer_filter": "attentions",
        "layer_filter_preset": "attn-mlp",
        "text_encoder": {"weight_dtype": "BFLOAT_16", "train": False},
        "text_encoder_2": {"weight_dtype": "BFLOAT_16", "train": False},
        "train_dtype": "BFLOAT_16",
        "unet": {"weight_dtype": "BFLOAT_16"},
        "vae": {"weight_dtype": "FLOAT_32"},
    },
    "sd3": {
        "model_type": "STABLE_DIFFUSION_3",
        "base_model_name": "stabilityai/stable-diffusion-3-medium-diffusers",
        "output_model_format": "DIFFUSERS_LORA",
        "layer_filter": "",
        "layer_filter_preset": "full",
        "text_encoder": {"weight_dtype": "BFLOAT_16", "train": False},
        "text_encoder_2": {"weight_dtype": "BFLOAT_16", "train": False},
        "text_encoder_3": {"weight_dtype": "BFLOAT_16", "train": False},
        "train_dtype": "BFLOAT_16",
        "transformer": {"train": True, "weight_dtype": "BFLOAT_16"},
        "vae": {"weight_dtype": "FLOAT_32"},
    },
}


def onetrainer(preset: str) -> dict[str, Any]:
    stated, config = merged_preset(preset)
    train, data, lora = config.train, config.data, config.lora
    if train.method != "lora":
        raise ValueError(f"preset {preset}: the OneTrainer presets are LoRA presets (train.method = 'lora')")
    out: dict[str, Any] = dict(ONETRAINER_FAMILY[config.model.family])
    out.update(
        {
            "adt": {"enabled": True, **adt_values(stated, config)},
            "batch_size": train.batch_size,
            "latent_caching": data.cache_latents,
            "learning_rate": train.learning_rate,
            "learning_rate_warmup_steps": float(train.lr_warmup_steps),
            "lora_rank": lora.rank,
            "lora_alpha": lora.alpha,
            "output_model_destination": "models/lora-adt.safetensors",
            "resolution": str(data.resolution),
            "training_method": "LORA",
        }
    )
    return dict(sorted(out.items()))


BUILDERS = {"kohya_gui": kohya_gui, "onetrainer": onetrainer}


def render(target: Target) -> str:
    return json.dumps(BUILDERS[target.tool](target.preset), indent=4) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adt_plugin.presets.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file differs")
    parser.add_argument("--out", type=Path, help="write under this folder instead of adt_plugin/presets/")
    args = parser.parse_args(argv)
    root = args.out or folder()
    stale = []
    for target in TARGETS:
        path = root / target.path
        text = render(target)
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(target.path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path} (from {target.preset})")
    if args.check and stale:
        print("out of date (run python -m adt_plugin.presets.generate): " + ", ".join(stale), file=sys.stderr)
        return 1
    if not stale:
        print(f"{len(TARGETS)} presets up to date in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
