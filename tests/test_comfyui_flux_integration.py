"""The compare node on a tiny FLUX.1 inside a real ComfyUI (run when COMFYUI_PATH points at a checkout).

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy-venv/bin/python python -m pytest -q tests/test_comfyui_flux_integration.py

The files are loaded as FLUX.1 is in ComfyUI, each by its own loader: UNETLoader for
the transformer (BFL's layout, detected by ComfyUI as FLUX.1-dev, and as schnell
without guidance_in), CLIPLoader for the text encoder, VAELoader for the 16-channel
VAE, and a LoRA in sd-scripts' `lora_flux` layout as `adt train` writes it. ComfyUI's
own Flux model, flow sampling, FluxGuidance and LoRA mapping run; only the text
encoder is not FLUX's (T5-XXL is always built at full size: see
tiny_comfy.build_flux_files). All files are made here with random weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from test_comfyui_integration import _image, _run_prompt, _sha256, comfyui_server

pytestmark = pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI integration test")

DEV, SCHNELL = "adt_tiny_flux_dev.safetensors", "adt_tiny_flux_schnell.safetensors"
CLIP_L, VAE = "adt_tiny_clip_l.safetensors", "adt_tiny_flux_vae.safetensors"
LORA = "adt_tiny_flux_lora.safetensors"  # what adt train writes for FLUX (sd-scripts' lora_flux layout)
REPO = Path(__file__).resolve().parents[1]


def _build_base_directory(base: Path) -> None:
    from safetensors.torch import save_file
    from tiny_comfy import build_flux_files

    from adt_plugin.families import FAMILIES
    from adt_plugin.train.config import LoraConfig
    from adt_plugin.train.keymap import KOHYA, lora_format
    from adt_plugin.train.lora import add_lora, to_kohya

    models = base / "models"
    folders = {name: models / name for name in ("diffusion_models", "text_encoders", "vae", "loras")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    dev, schnell, clip_l, vae, transformer = build_flux_files(seed=0)
    save_file(dev, str(folders["diffusion_models"] / DEV))
    save_file(schnell, str(folders["diffusion_models"] / SCHNELL))
    save_file(clip_l, str(folders["text_encoders"] / CLIP_L))
    save_file(vae, str(folders["vae"] / VAE))
    del dev, schnell, clip_l, vae
    config = LoraConfig(rank=4, alpha=4.0)
    add_lora(transformer, FAMILIES["flux_dev"], config)
    generator = torch.Generator().manual_seed(2)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.2
    assert lora_format(FAMILIES["flux_dev"]) is KOHYA  # the layout adt train writes for FLUX
    save_file(to_kohya(FAMILIES["flux_dev"], transformer, config.alpha, torch.float16), str(folders["loras"] / LORA))
    (base / "custom_nodes").mkdir()
    os.symlink(REPO / "comfyui_nodes", base / "custom_nodes" / "adt_plugin_nodes")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One ComfyUI (the V3 entrypoint: the V1 fallback is checked on SD1 in test_comfyui_integration)."""
    base = tmp_path_factory.mktemp("comfy_flux_base")
    _build_base_directory(base)
    with comfyui_server(base, "v3") as running:
        yield running


def _flux_prompt(unet: str, cfg: float, **inputs) -> dict:
    """FLUX.1's loaders, the comparison (64 px, 2 steps, one row: "a cat", seed 7) with a
    SaveImage on each column (31-33), a PreviewAny on the provenance (35), and the same
    image made by plain ComfyUI nodes (40-47): CLIPTextEncode, FluxGuidance for dev,
    KSampler cfg 1, VAEDecode."""
    prompt = json.loads((REPO / "tests" / "comfyui" / "adt_compare_abc_api.json").read_text())
    compare = prompt["2"]
    compare["inputs"].update(
        model=["1", 0], clip=["3", 0], vae=["4", 0], prompts="a cat", negative="", seed=7, seeds_per_prompt=1, steps=2,
        cfg=cfg, sampler_name="euler", scheduler="simple", width=64, height=64,
        lora_a="(base: no LoRA)", label_a="base", lora_b=LORA, strength_b=1.0, label_b="LoRA",
        lora_c=LORA, strength_c=0.0, label_c="LoRA at 0",
    )
    compare["inputs"].update(inputs)
    out = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_L, "type": "sd3"}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "2": compare,
        **{str(31 + i): {"class_type": "SaveImage", "inputs": {"images": ["2", 1 + i], "filename_prefix": f"flux_{s}"}}
           for i, s in enumerate("abc")},
        "35": {"class_type": "PreviewAny", "inputs": {"source": ["2", 5]}},
        "40": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "a cat"}},
        "41": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": ""}},
        "42": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }

    def plain(first: int, guidance):
        positive = ["40", 0]
        if guidance is not None:
            out[str(first + 3)] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["40", 0], "guidance": guidance}}
            positive = [str(first + 3), 0]
        out[str(first)] = {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": positive, "negative": ["41", 0], "latent_image": ["42", 0], "denoise": 1.0}}
        out[str(first + 1)] = {"class_type": "VAEDecode", "inputs": {"samples": [str(first), 0], "vae": ["4", 0]}}
        out[str(first + 2)] = {"class_type": "SaveImage", "inputs": {"images": [str(first + 1), 0], "filename_prefix": f"plain_{first}"}}

    return out, plain


def _check_columns(server, outputs: dict, unet: str) -> np.ndarray:
    """Column B (the LoRA) differs from A, C (the LoRA at strength 0) equals A; every key
    of the LoRA loaded; the provenance names the UNETLoader's file. Returns column A."""
    url, base = server["url"], server["base"]
    a, b, c = (_image(url, outputs[str(31 + i)]["images"][0]) for i in range(3))
    assert a.shape == (64, 64, 3) and a.std() > 0
    assert np.abs(b - a).mean() > 4  # the LoRA changes the image ...
    assert np.array_equal(c, a)  # ... and at strength 0 it changes nothing
    provenance = json.loads(outputs["35"]["text"][0])
    loader = provenance["variants"][0]["model"]["loaded_by"][0]
    assert loader["class_type"] == "UNETLoader" and loader["unet_name"] == unet
    assert loader["unet_name_sha256"] == _sha256(base / "models" / "diffusion_models" / unet)
    for variant in provenance["variants"][1:]:
        assert variant["lora"]["keys"] == variant["lora"]["keys_loaded"] > 0
        assert variant["lora"]["sha256"] == _sha256(base / "models" / "loras" / LORA)
    assert "lora key not loaded" not in server["log"].read_text()
    return a


def test_flux_dev_compare_is_ksampler_with_flux_guidance(server):
    """FLUX.1-dev: column A is exactly FluxGuidance(cfg) + KSampler cfg 1 with the row's seed;
    the guidance value reaches the model (another value gives another image)."""
    prompt, plain = _flux_prompt(DEV, cfg=2.0)
    plain(50, 2.0)
    plain(60, 3.5)  # ComfyUI's Flux default guidance when none is set
    outputs = _run_prompt(server["url"], prompt)
    a = _check_columns(server, outputs, DEV)
    with_cfg, with_default = (_image(server["url"], outputs[str(n + 2)]["images"][0]) for n in (50, 60))
    assert np.array_equal(a, with_cfg)
    assert not np.array_equal(with_cfg, with_default)


def test_flux_schnell_compare_is_ksampler_without_guidance(server):
    """FLUX.1-schnell (no guidance_in): column A is exactly KSampler cfg 1 with the row's
    seed; a guiding cfg is refused before sampling, naming the family."""
    prompt, plain = _flux_prompt(SCHNELL, cfg=1.0)
    plain(50, None)
    outputs = _run_prompt(server["url"], prompt)
    a = _check_columns(server, outputs, SCHNELL)
    assert "model_type FLOW" in server["log"].read_text()  # ComfyUI took it for schnell (dev: model_type FLUX)
    assert np.array_equal(a, _image(server["url"], outputs["52"]["images"][0]))

    refused, _ = _flux_prompt(SCHNELL, cfg=3.5)
    message = _run_prompt(server["url"], refused, fails=True)
    assert "FLUX.1-schnell is guidance-distilled" in message and "set cfg to 1" in message, message
