"""The nodes inside a real ComfyUI (run when COMFYUI_PATH points at a checkout).

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/comfy-venv/bin/python python -m pytest -q tests/test_comfyui_integration.py

Starts `main.py --cpu --listen 127.0.0.1 --port N` with a fresh base directory that
holds only this pack (linked), a tiny SD1.x checkpoint, a kohya LoRA with its ADT
discriminator and tiny metric weights; posts the example workflow (converted from
the UI file with the server's own widget order) and checks what comes back.
The pack's requirements (comfyui_nodes/requirements.txt) must be installed in
ComfyUI's Python.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

COMFYUI = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI integration test")
REPO = Path(__file__).resolve().parents[1]
CKPT, LORA = "adt_tiny_sd15.safetensors", "adt_tiny_lora.safetensors"
DISC = "adt_tiny_lora.adt_disc.safetensors"
WRONG_SHAPES = "adt_tiny_lora_wrong_shapes.safetensors"  # LORA's names with another model's widths
RETRAINED = "adt_tiny_lora_retrained.safetensors"  # rewritten under its name between two runs
CKPT_SD3 = "adt_tiny_sd3.safetensors"
LORA_SD3 = "adt_tiny_sd3_lora.safetensors"  # what adt train writes for SD3 (diffusers' layout)
LORA_SD3_KOHYA = "adt_tiny_sd3_lora_sd_scripts.safetensors"  # the same LoRA in sd-scripts' layout (fused qkv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str):
    with urllib.request.urlopen(base + path, timeout=30) as response:
        return response.read()


def _post(base: str, path: str, data: dict):
    request = urllib.request.Request(base + path, json.dumps(data).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _build_base_directory(base: Path) -> None:
    from safetensors.torch import save_file
    from tiny import DDPM_CONFIG
    from tiny_comfy import build_checkpoint
    from tiny_eval import kohya_lora_for, tiny_clip_folder, tiny_dinov2_folder

    from adt_plugin import AdtSettings, build_strategy
    from adt_plugin.backbones import load_dinov2
    from adt_plugin.checkpoint import save_discriminator
    from adt_plugin.eval.aesthetic import AestheticHead

    models = base / "models"
    for sub in ("checkpoints", "loras", "adt_metrics"):
        (models / sub).mkdir(parents=True)
    checkpoint, unet, text = build_checkpoint(seed=0)
    save_file(checkpoint, str(models / "checkpoints" / CKPT))
    lora = kohya_lora_for(unet, text, rank=4, scale=0.3)
    save_file(lora, str(models / "loras" / LORA))
    save_file(kohya_lora_for(unet, text, rank=4, scale=0.3, seed=1), str(models / "loras" / RETRAINED))
    wider = {k: torch.zeros(4, 2 * v.shape[1]) if k.endswith("lora_down.weight") and k.startswith("lora_unet_") else v for k, v in lora.items()}
    save_file(wider, str(models / "loras" / WRONG_SHAPES))
    _build_sd3_files(models)
    metrics = models / "adt_metrics"
    tiny_clip_folder(metrics / "clip-vit-large-patch14")
    torch.save(AestheticHead(embed_dim=8).state_dict(), metrics / "sac+logos+ava1-l14-linearMSE.pth")
    dinov2 = tiny_dinov2_folder(metrics / "dinov2-small")
    settings = AdtSettings(taps=(0, 1), head_channels=8, backbone_path=str(dinov2))
    strategy = build_strategy(settings, DDPM_CONFIG, backbone=load_dinov2(str(dinov2), taps=(0, 1)))
    save_discriminator(models / "loras" / DISC, strategy)
    (base / "custom_nodes").mkdir()
    os.symlink(REPO / "comfyui_nodes", base / "custom_nodes" / "adt_plugin_nodes")


def _build_sd3_files(models: Path) -> None:
    """A tiny SD3 checkpoint and one LoRA on it, in adt train's layout and in sd-scripts'."""
    from safetensors.torch import save_file
    from tiny_comfy import build_sd3_checkpoint

    from adt_plugin.train.config import LoraConfig
    from adt_plugin.train.keymap import KOHYA
    from adt_plugin.train.lora import add_lora, to_kohya
    from adt_plugin.families import FAMILIES

    checkpoint, transformer = build_sd3_checkpoint(seed=0)
    save_file(checkpoint, str(models / "checkpoints" / CKPT_SD3))
    config = LoraConfig(rank=4, alpha=4.0)
    add_lora(transformer, FAMILIES["sd3"], config)
    generator = torch.Generator().manual_seed(2)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.3
    save_file(to_kohya(FAMILIES["sd3"], transformer, config.alpha, torch.float32), str(models / "loras" / LORA_SD3))
    kohya = to_kohya(FAMILIES["sd3"], transformer, config.alpha, torch.float32, fmt=KOHYA)
    save_file(kohya, str(models / "loras" / LORA_SD3_KOHYA))


@pytest.fixture(scope="module", params=["v3", "v1"])
def server(request, tmp_path_factory):
    """The pack loaded through ComfyUI's V3 entrypoint, then through the V1 fallback."""
    base = tmp_path_factory.mktemp("comfy_base")
    _build_base_directory(base)
    with comfyui_server(base, request.param) as running:
        yield running


@contextmanager
def comfyui_server(base: Path, api: str):
    """`main.py --cpu` on `base` (its models and custom_nodes), until the ADT nodes are
    served; stopped (its whole process group) on leaving."""
    port = _free_port()
    log_path = base / "server.log"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base)]
    with open(log_path, "w") as log:
        # this checkout's adt_plugin, not one installed in ComfyUI's Python from elsewhere
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "ADT_COMFYUI_NODE_API": api, "PYTHONPATH": pythonpath}
        process = subprocess.Popen(command, cwd=COMFYUI, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                json.loads(_get(url, "/object_info/ADTCompareABC"))["ADTCompareABC"]
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline:
                    pytest.fail(f"ComfyUI did not serve the ADT nodes in time:\n{log_path.read_text()[-4000:]}")
                time.sleep(2)
        yield {"url": url, "base": base, "log": log_path, "api": api}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _run_prompt(url: str, prompt: dict, timeout: float = 900, fails: bool = False):
    """The outputs of a finished prompt; with `fails`, the error message it must end with."""
    status, reply = _post(url, "/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert status == 200, reply
    prompt_id = reply["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = json.loads(_get(url, f"/history/{prompt_id}"))
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            entry = history[prompt_id]
            if fails:
                assert entry["status"]["status_str"] == "error", "the workflow should have failed"
                errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
                return errors[0]["exception_message"]
            if entry["status"]["status_str"] != "success":
                pytest.fail(f"the workflow failed: {json.dumps(entry['status']['messages'])[-4000:]}")
            return entry["outputs"]
        time.sleep(2)
    pytest.fail("the workflow did not finish in time")


def _compare_prompt(ckpt: str, **inputs) -> dict:
    """The example's checkpoint loader and comparison node (64 px, 2 steps, one row), a
    SaveImage on the grid and on each column that is not skipped (nodes 30-33), a
    PreviewAny on the provenance (35)."""
    prompt = json.loads((REPO / "tests" / "comfyui" / "adt_compare_abc_api.json").read_text())
    compare = prompt["2"]
    compare["inputs"].update(
        prompts="a cat", negative="", seed=7, seeds_per_prompt=1, steps=2, cfg=3.0, sampler_name="euler", scheduler="normal",
        width=64, height=64, lora_a="(base: no LoRA)", label_a="base", lora_b="(skip this column)", lora_c="(skip this column)",
    )
    compare["inputs"].update(inputs)
    out = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}, "2": compare}
    for i, name in enumerate(["grid", "a", "b", "c"]):
        if i == 0 or compare["inputs"][f"lora_{name}"] != "(skip this column)":
            out[str(30 + i)] = {"class_type": "SaveImage", "inputs": {"images": ["2", i], "filename_prefix": f"cmp_{name}"}}
    out["35"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 5]}}
    return out


def _image(url: str, entry: dict) -> np.ndarray:
    query = urllib.parse.urlencode({"filename": entry["filename"], "subfolder": entry["subfolder"], "type": entry["type"]})
    return np.asarray(Image.open(io.BytesIO(_get(url, f"/view?{query}"))).convert("RGB")).astype(int)


def _options(entry) -> list:
    """A combo's choices: V1 lists them in place of the type, V3 as ("COMBO", {"options": ...})."""
    return entry[1]["options"] if entry[0] == "COMBO" else entry[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nodes_register_with_the_server_widget_order_and_example(server):
    from comfy_workflows import object_info_widgets, spec_widgets, ui_to_api

    info = json.loads(_get(server["url"], "/object_info"))
    ours = ["ADTCompareABC", "ADTClipScore", "ADTAestheticScore", "ADTHPSv2Score", "ADTDiscriminatorScore"]
    assert all(name in info for name in ours)
    combo = info["ADTClipScore"]["input"]["required"]["clip_model"]
    assert (combo[0] == "COMBO") == (server["api"] == "v3")  # V3 schema, or the V1 fallback's plain list
    widgets = object_info_widgets(info)
    assert all(widgets(name) == spec_widgets(name) for name in ours)
    assert _options(info["ADTCompareABC"]["input"]["required"]["lora_b"])[:3] == ["(base: no LoRA)", "(skip this column)", LORA]
    assert _options(info["ADTDiscriminatorScore"]["input"]["required"]["discriminator"]) == [DISC]
    templates = json.loads(_get(server["url"], "/workflow_templates"))
    assert "adt_abc_compare_metrics" in templates.get("adt_plugin_nodes", [])
    ui = json.loads(_get(server["url"], "/api/workflow_templates/adt_plugin_nodes/adt_abc_compare_metrics.json"))
    api = json.loads((REPO / "tests" / "comfyui" / "adt_compare_abc_api.json").read_text())
    assert ui_to_api(ui, widgets) == api


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs chromium for ComfyUI's frontend")
def test_the_frontend_turns_the_example_into_the_api_twin(server):
    """ComfyUI's own frontend (headless Chromium) loads the UI-format example and
    makes exactly the API-format twin (plus PreviewAny's display-only `preview`)."""
    if server["api"] != "v3":
        pytest.skip("one frontend check is enough")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    example = REPO / "comfyui_nodes" / "example_workflows" / "adt_abc_compare_metrics.json"
    script = REPO / "tests" / "comfyui" / "frontend_prompt.py"
    done = subprocess.run([python, str(script), server["url"], str(example)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    made = json.loads(done.stdout)
    for node in made.values():
        if node["class_type"] == "PreviewAny":
            assert node["inputs"].pop("preview") == ""
    api = json.loads((REPO / "tests" / "comfyui" / "adt_compare_abc_api.json").read_text())
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in made.items()} == api


def test_example_workflow_runs_on_a_tiny_checkpoint(server):
    from comfyui_nodes.nodes import missing_choice

    url, base = server["url"], server["base"]
    prompt = json.loads((REPO / "tests" / "comfyui" / "adt_compare_abc_api.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = CKPT
    prompt["2"]["inputs"].update(
        prompts="a cat\na dog", seed=42, seeds_per_prompt=1, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
        width=64, height=64, lora_b=LORA, lora_c=LORA, strength_c=0.0, label_c="zero",
    )
    prompt["5"]["inputs"]["hps_weights"] = missing_choice("hps")  # no open_clip / HPS weights here: a note, not an error
    prompt["6"]["inputs"]["discriminator"] = DISC
    # plain ComfyUI sampling of the first row, to compare with column A; and each column saved
    prompt.update({
        "20": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "21": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry, low quality"}},
        "22": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "23": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 42, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "positive": ["20", 0], "negative": ["21", 0],
                                                    "latent_image": ["22", 0], "denoise": 1.0}},
        "24": {"class_type": "VAEDecode", "inputs": {"samples": ["23", 0], "vae": ["1", 2]}},
        "25": {"class_type": "SaveImage", "inputs": {"images": ["24", 0], "filename_prefix": "plain"}},
        **{str(26 + i): {"class_type": "SaveImage", "inputs": {"images": ["2", 1 + i], "filename_prefix": f"column_{s}"}}
           for i, s in enumerate("abc")},
    })
    outputs = _run_prompt(url, prompt)

    plain = _image(url, outputs["25"]["images"][0])
    a, b, c = ([_image(url, e) for e in outputs[str(26 + i)]["images"]] for i in range(3))
    assert len(a) == len(b) == len(c) == 2 and plain.shape == (64, 64, 3)
    assert np.array_equal(a[0], plain)  # column A is exactly KSampler with the row's seed
    assert all(np.array_equal(x, y) for x, y in zip(a, c))  # same noise; LoRA at strength 0 changes nothing
    assert not any(np.array_equal(x, y) for x, y in zip(a, b))  # the LoRA changes every image
    assert a[0].std() > 0 and not np.array_equal(a[0], a[1])

    grid = _image(url, outputs["8"]["images"][0])  # the plain grid (PreviewImage)
    scored = _image(url, outputs["7"]["images"][0])  # the grid with every score drawn on it
    zoom = 3  # 64 px cells are shown at 192 px (whole pixels), so their labels fit
    cell_px = 64 * zoom
    assert grid.shape[1] == scored.shape[1] == cell_px + 3 * (cell_px + 4) + 4
    top = grid.shape[0] - 2 * (cell_px + 4)  # title and headers above the two rows
    cell = grid[top:top + cell_px, cell_px + 4:2 * cell_px + 4]
    assert np.abs(cell[::zoom, ::zoom] - a[0]).max() <= 1  # the grid shows column A's first image (rounding only)
    assert grid.shape != scored.shape or not np.array_equal(grid, scored)  # means in the headers, scores on the cells

    table = outputs["9"]["text"][0]
    for expected in ("CLIP score", "Aesthetic", "ADT D score", "- B over A:", "- C over B:", "won,", "HPSv2 skipped", "| a dog | 42 | C |"):
        assert expected in table, (expected, table)
    provenance = json.loads(outputs["10"]["text"][0])
    ckpt = provenance["variants"][0]["model"]["loaded_by"][0]
    assert ckpt["class_type"] == "CheckpointLoaderSimple" and ckpt["ckpt_name"] == CKPT
    assert ckpt["ckpt_name_sha256"] == _sha256(base / "models" / "checkpoints" / CKPT)
    assert provenance["variants"][1]["lora"]["sha256"] == _sha256(base / "models" / "loras" / LORA)
    assert provenance["variants"][1]["lora"]["keys"] == provenance["variants"][1]["lora"]["keys_loaded"] > 0
    assert provenance["seeds"] == [42] and provenance["versions"]["comfyui"]
    assert "lora key not loaded" not in server["log"].read_text()


def test_a_lora_that_does_not_fit_stops_the_comparison_naming_it(server):
    """It used to leave its column equal to the base, with status success."""
    base = server["base"]
    for lora, why in ((LORA_SD3, "ComfyUI loaded 0 of its"), (WRONG_SHAPES, "its update has another shape than")):
        message = _run_prompt(server["url"], _compare_prompt(CKPT, lora_b=lora, label_b="other"), fails=True)
        assert f"column B: LoRA '{lora}' ({base / 'models' / 'loras' / lora}) does not fit this model: {why}" in message, message
        assert "the checkpoint it was trained for" in message


def test_a_skipped_column_feeds_preview_image(server):
    """A skipped column's IMAGE went into PreviewImage as an empty batch (IndexError)."""
    prompt = _compare_prompt(CKPT, lora_b=LORA, label_b="FT")
    prompt["36"] = {"class_type": "PreviewImage", "inputs": {"images": ["2", 3]}}  # column C is skipped
    outputs = _run_prompt(server["url"], prompt)
    skipped = [_image(server["url"], e) for e in outputs["36"]["images"]]
    assert len(skipped) == 1 and skipped[0].shape == (64, 64, 3) and skipped[0].std() > 0  # grey, with its label


def test_requeueing_after_the_lora_was_retrained_runs_again(server):
    """A LoRA rewritten under its name was served from ComfyUI's cache with the old sha256."""
    url, path = server["url"], server["base"] / "models" / "loras" / RETRAINED
    prompt = _compare_prompt(CKPT, lora_b=RETRAINED, label_b="FT")
    first = _run_prompt(url, prompt)
    provenance = json.loads(first["35"]["text"][0])
    assert provenance["variants"][1]["lora"]["sha256"] == _sha256(path)
    before = _image(url, first["32"]["images"][0])

    from safetensors.torch import load_file, save_file

    retrained = {k: v * 2 if k.endswith("lora_up.weight") else v for k, v in load_file(str(path)).items()}
    save_file(retrained, str(path))
    again = _run_prompt(url, prompt)
    assert json.loads(again["35"]["text"][0])["variants"][1]["lora"]["sha256"] == _sha256(path)
    assert not np.array_equal(_image(url, again["32"]["images"][0]), before)


def test_an_sd3_lora_loads_in_comfyui_in_both_layouts(server):
    """adt train's SD3 layout (diffusers' keys) and sd-scripts' (fused qkv): every key
    loads, both change the image the same way."""
    prompt = _compare_prompt(CKPT_SD3, lora_b=LORA_SD3, label_b="adt train", lora_c=LORA_SD3_KOHYA, label_c="sd-scripts")
    outputs = _run_prompt(server["url"], prompt)
    a, b, c = (_image(server["url"], outputs[str(31 + i)]["images"][0]) for i in range(3))
    assert a.shape == (64, 64, 3) and np.abs(b - a).max() > 8  # the LoRA changes the image ...
    assert np.abs(c - b).max() <= 2  # ... the same in either layout (fp16 rounding only)
    provenance = json.loads(outputs["35"]["text"][0])
    for variant in provenance["variants"][1:]:
        assert variant["lora"]["keys"] == variant["lora"]["keys_loaded"] > 0


def test_paths_outside_the_model_folders_are_refused_before_running(server):
    prompt = json.loads((REPO / "tests" / "comfyui" / "adt_compare_abc_api.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = CKPT
    prompt["2"]["inputs"]["lora_c"] = LORA
    for bad in ("../../../etc/passwd", str(server["base"] / "models" / "loras" / LORA)):
        prompt["2"]["inputs"]["lora_b"] = bad
        status, reply = _post(server["url"], "/prompt", {"prompt": prompt})
        assert status == 400
        # only the comparison is refused: the example's metric weights that are not here (HPSv2,
        # my_lora_adt.adt_disc.safetensors) do not block a run, they become notes
        assert set(reply["node_errors"]) == {"2"}
        details = json.dumps(reply["node_errors"]["2"])
        assert f"lora_b: LoRA '{bad}' is not a name inside ComfyUI" in details


def test_a_cut_off_lora_is_refused_before_running_naming_the_file(server):
    """ComfyUI's own error for a broken safetensors file named no file."""
    path = server["base"] / "models" / "loras" / "adt_tiny_lora_cut.safetensors"
    path.write_bytes((server["base"] / "models" / "loras" / LORA).read_bytes()[:64])
    status, reply = _post(server["url"], "/prompt", {"prompt": _compare_prompt(CKPT, lora_b=path.name)})
    assert status == 400 and set(reply["node_errors"]) == {"2"}
    details = json.dumps(reply["node_errors"]["2"])
    assert f"lora_b: LoRA '{path.name}' ({path}) cannot be read" in details and "save or download it again" in details
