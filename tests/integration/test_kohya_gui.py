"""The kohya_ss GUI with the ADT presets: its own preset and command code, driven headless.

Skipped unless pointed at a kohya_ss checkout and its Python (gradio, its sd-scripts'
requirements and adt-plugin installed):

    ADT_KOHYA_GUI=/path/to/kohya_ss  ADT_KOHYA_GUI_PYTHON=/path/to/its/venv/bin/python

The checkout is copied to a temporary folder and install.py places the presets there.
The GUI's LoRA tab is built without a browser and the callables its widgets are bound
to (kohya_gui/lora_gui.py @ 45088f04: `last_built_gui_entries`) apply presets and print
the training command, as a user's clicks would; the printed commands then run on tiny
random models. A few minutes on a CPU.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
from test_real_trainers import REPO, build, run

GUI = os.environ.get("ADT_KOHYA_GUI")
pytestmark = pytest.mark.skipif(not GUI, reason="set ADT_KOHYA_GUI to a kohya_ss checkout")

# Runs in the GUI's Python with the GUI copy as the current folder. argv[1]: a JSON list of
# steps {"preset", "fields" (what the user then types), "adt" (values edited inside
# "Additional parameters"), "append" (options the user adds there)}; prints one JSON line.
DRIVER = r'''
import contextlib, io, json, os, sys
from unittest.mock import patch
sys.path.insert(0, os.getcwd())
import gradio as gr
from kohya_gui import lora_gui
from kohya_gui.class_gui_config import KohyaSSGUIConfig

with gr.Blocks():
    lora_gui.lora_tab(headless=True, config=KohyaSSGUIConfig())
registry = dict(lora_gui.last_built_field_registry)
entries = lora_gui.last_built_gui_entries
comps = entries["components"]
# what the browser sends for an untouched field: "" for an empty text box
state = {c: ("" if c.value is None and isinstance(c, (gr.Textbox, gr.Dropdown)) else c.value) for c in registry.values()}

def apply_preset(name):
    data = dict(state)
    data.update({comps["dummy_db_false"]: False, comps["dummy_db_true"]: True, comps["config_file_name"]: "",
                 comps["training_preset"]: name})
    result = entries["apply_preset"](data)
    for c, v in result.items():
        if c in state:  # through the browser (JSON in JavaScript) 64.0 comes back as 64
            state[c] = int(v) if isinstance(v, float) and v.is_integer() else v

def set_option(text, key, value):
    """`--adt_<key> <value>` in place of the one there (a value may be several words: taps)."""
    tokens, out, i = text.split(), [], 0
    while i < len(tokens):
        if tokens[i] == "--adt_" + key:
            out += [tokens[i], str(value)]
            i += 1
            while i < len(tokens) and not tokens[i].startswith("--"):
                i += 1
        else:
            out.append(tokens[i])
            i += 1
    return " ".join(out)

def print_command():
    data = dict(state)
    data.update({comps["dummy_headless"]: True, comps["dummy_db_true"]: True})
    out = io.StringIO()
    with patch.object(lora_gui, "get_executable_path", return_value="accelerate"), contextlib.redirect_stdout(out):
        entries["print_command"](data)
    return next(line for line in out.getvalue().splitlines() if line.startswith("accelerate launch"))

report = []
for step in json.loads(sys.argv[1]):
    apply_preset(step["preset"])
    seen = {name: state[registry[name]] for name in ("extra_accelerate_launch_args", "additional_parameters")}
    for name, value in step["fields"].items():
        state[registry[name]] = value
    extra = state[registry["additional_parameters"]]
    for key, value in step.get("adt", {}).items():
        extra = set_option(extra, key, value)
    state[registry["additional_parameters"]] = " ".join((extra + " " + step.get("append", "")).split())
    report.append(dict(seen, command=print_command()))
print("REPORT " + json.dumps(report))
'''

ADT_PRESET = "user_presets/ADT - SD15 LoRA (DDIM 50)"
STOCK_PRESET = "sd15 - EDG_LoraOptiSettings"  # sets "Additional parameters", not the launch arguments


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("kohya_gui")
    python = os.environ.get("ADT_KOHYA_GUI_PYTHON", sys.executable)
    checkout = root / "kohya_ss"
    shutil.copytree(GUI, checkout, ignore=shutil.ignore_patterns("venv", ".venv", ".git", "outputs"), symlinks=True)
    rc, out = run([sys.executable, REPO / "install.py", "--kohya-gui", checkout, "--no-pip"])  # python has adt-plugin
    assert rc == 0, out
    build(python, f"t.tiny_sd15_diffusers(Path({str(root / 'sd15')!r}), Path({str(root / 'tok' / 'openai_clip-vit-large-patch14')!r}))\n"
                  f"t.tiny_dinov2_folder(Path({str(root / 'dinov2')!r}))\n"
                  f"t.tiny_image_folder(Path({str(root / 'data')!r}))")
    return root, python, checkout


def user_fields(root: Path, out: Path) -> dict:
    """What a user types after picking a preset (model, data, output), plus what a CPU needs."""
    return {"pretrained_model_name_or_path": str(root / "sd15"), "train_data_dir": str(root / "data"),
            "output_dir": str(out), "output_name": "tiny", "max_resolution": "64,64", "train_batch_size": 1,
            "max_train_steps": 2, "epoch": 1, "mixed_precision": "no", "save_precision": "float",
            "optimizer": "AdamW", "xformers": "sdpa", "mem_eff_attn": False, "network_dim": 4, "network_alpha": 4,
            "save_every_n_steps": 0, "max_data_loader_n_workers": 0, "gradient_checkpointing": False,
            "enable_bucket": False, "min_bucket_reso": 32, "max_bucket_reso": 128}


def launch(python: str, command: str, cwd: Path):
    """The GUI's printed `accelerate launch ...`, with the tool's own accelerate."""
    argv = shlex.split(command)
    assert argv[:2] == ["accelerate", "launch"], command
    return run([python, "-m", "accelerate.commands.launch", *argv[2:]], cwd=cwd, HF_HUB_OFFLINE="1")


def test_a_stock_preset_after_an_adt_preset_trains_plain_sd_scripts(world, tmp_path):
    root, python, checkout = world
    tokenizer = f"--tokenizer_cache_dir {root / 'tok'}"
    steps = [
        {"preset": ADT_PRESET, "fields": user_fields(root, tmp_path / "adt"), "append": tokenizer,
         "adt": {"backbone_path": root / "dinov2", "taps": "1 3", "num_inference_steps": 3, "head_channels": 8,
                 "g_every": 2, "k_graph_steps": 1}},
        {"preset": STOCK_PRESET, "fields": user_fields(root, tmp_path / "plain"), "append": tokenizer},
    ]
    rc, out = run([python, "-c", DRIVER, json.dumps(steps, default=str)], cwd=checkout)
    assert rc == 0, out[-3000:]
    adt, plain = json.loads(out.split("REPORT ", 1)[1].splitlines()[0])

    assert adt["extra_accelerate_launch_args"] == "-m adt_plugin.kohya.launch"
    assert "--adt_strategy adt" in adt["additional_parameters"] and "--adt_backbone_path" in adt["command"]
    # issue 11.9: the stock preset clears "Additional parameters" and keeps the launch arguments
    assert plain["extra_accelerate_launch_args"] == "-m adt_plugin.kohya.launch" and plain["additional_parameters"] == ""
    assert "-m adt_plugin.kohya.launch" in plain["command"] and "--adt_" not in plain["command"]

    rc, log = launch(python, adt["command"], checkout)
    assert rc == 0, log[-3000:]
    assert "ADT: strategy adt, SD 1.x / 2.x" in log and (tmp_path / "adt" / "tiny.adt_disc.safetensors").exists()

    rc, log = launch(python, plain["command"], checkout)
    assert rc == 0, log[-3000:]
    assert "ADT is off" in log and "ADT: strategy" not in log
    assert (tmp_path / "plain" / "tiny.safetensors").exists()
    assert not list((tmp_path / "plain").glob("*adt_disc*"))
