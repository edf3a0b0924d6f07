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
    save_file(kohya_lora_for(unet, text, rank=4, scale=0.3), str(models / "loras" / LORA))
    metrics = models / "adt_metrics"
    tiny_clip_folder(metrics / "clip-vit-large-patch14")
    torch.save(AestheticHead(embed_dim=8).state_dict(), metrics / "sac+logos+ava1-l14-linearMSE.pth")
    dinov2 = tiny_dinov2_folder(metrics / "dinov2-small")
    settings = AdtSettings(taps=(0, 1), head_channels=8, backbone_path=str(dinov2))
    strategy = build_strategy(settings, DDPM_CONFIG, backbone=load_dinov2(str(dinov2), taps=(0, 1)))
    save_discriminator(models / "loras" / DISC, strategy)
    (base / "custom_nodes").mkdir()
    os.symlink(REPO / "comfyui_nodes", base / "custom_nodes" / "adt_compare")


@pytest.fixture(scope="module", params=["v3", "v1"])
def server(request, tmp_path_factory):
    """The pack loaded through ComfyUI's V3 entrypoint, then through the V1 fallback."""
    base = tmp_path_factory.mktemp("comfy_base")
    _build_base_directory(base)
    port = _free_port()
    log_path = base / "server.log"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    command = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base)]
    with open(log_path, "w") as log:
        env = {**os.environ, "ADT_COMFYUI_NODE_API": request.param}
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
        yield {"url": url, "base": base, "log": log_path, "api": request.param}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _run_prompt(url: str, prompt: dict, timeout: float = 900) -> dict:
    status, reply = _post(url, "/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
    assert status == 200, reply
    prompt_id = reply["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = json.loads(_get(url, f"/history/{prompt_id}"))
        if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
            entry = history[prompt_id]
            if entry["status"]["status_str"] != "success":
                pytest.fail(f"the workflow failed: {json.dumps(entry['status']['messages'])[-4000:]}")
            return entry["outputs"]
        time.sleep(2)
    pytest.fail("the workflow did not finish in time")


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
    assert "adt_abc_compare_metrics" in templates.get("adt_compare", [])
    ui = json.loads(_get(server["url"], "/api/workflow_templates/adt_compare/adt_abc_compare_metrics.json"))
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
    assert grid.shape == scored.shape and grid.shape[1] == 120 + 3 * (64 + 4) + 4
    top = grid.shape[0] - 2 * (64 + 4)  # title and headers above the two rows
    cell = grid[top:top + 64, 124:188]
    assert np.abs(cell - a[0]).max() <= 1  # the grid shows column A's first image (rounding only)
    assert not np.array_equal(grid, scored)

    table = outputs["9"]["text"][0]
    for expected in ("CLIP score", "Aesthetic", "ADT D score", "B over A", "HPSv2 skipped", "| a dog | 42 | C |"):
        assert expected in table, (expected, table)
    provenance = json.loads(outputs["10"]["text"][0])
    ckpt = provenance["variants"][0]["model"]["loaded_by"][0]
    assert ckpt["class_type"] == "CheckpointLoaderSimple" and ckpt["ckpt_name"] == CKPT
    assert ckpt["ckpt_name_sha256"] == _sha256(base / "models" / "checkpoints" / CKPT)
    assert provenance["variants"][1]["lora"]["sha256"] == _sha256(base / "models" / "loras" / LORA)
    assert provenance["seeds"] == [42] and provenance["versions"]["comfyui"]
    assert "lora key not loaded" not in server["log"].read_text()


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
