"""A normal `pip install .` (a wheel, not editable) works like the editable install.

The wheel is built from a copy of the checkout without build isolation and installed
with --no-deps --no-index into a fresh venv that sees this test environment's packages
(torch, diffusers, ...) through a .pth file but not its adt-plugin: nothing is
downloaded. Then `adt` runs from another folder, far from the checkout.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _setuptools_builds_this() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


pytestmark = pytest.mark.skipif(
    not _setuptools_builds_this(), reason="needs setuptools>=77 in the test environment (pip install -e '.[test]')"
)


def run(cmd, **kwargs):
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "adt_plugin", src / "adt_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheels")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out, src])
    (found,) = out.glob("adt_plugin-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    root = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", root])
    python = root / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    # this environment's packages, without running its .pth files (the editable adt-plugin's among them)
    (site / "test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel])
    return root


def test_the_wheel_carries_the_presets_and_adt_reads_them_from_another_folder(venv, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ADT_PRESETS_DIR")}
    env["HF_HUB_OFFLINE"] = "1"
    listed = run([venv / "bin" / "adt", "presets"], cwd=elsewhere, env=env).splitlines()
    assert len(listed) == 32 and any(line.startswith("sd15-ddim50-lora-adt ") for line in listed)

    # a preset resolved by name in a run config, through its extends chain down to families/paper
    (elsewhere / "data").mkdir()
    (elsewhere / "run.toml").write_text('preset = "sd15-ddim50-lora-adt"\n[model]\npath = "m"\n[data]\nfolder = "data"\n')
    probe = """
import contextlib, io, json
import adt_plugin, adt_plugin.presets as presets
from adt_plugin.cli import main
from adt_plugin.train.config import load_run_config
shown = io.StringIO()
with contextlib.redirect_stdout(shown):
    main(["presets", "--show", "sdxl-dpmpp30-lora-ft"])
c = load_run_config("run.toml")
print(json.dumps({"package": adt_plugin.__file__, "presets": str(presets.folder()),
                  "sdxl": presets.family_adt_defaults("sdxl"), "shown": shown.getvalue(),
                  "run": [c.adt.d_lr, c.lora.rank, list(c.sources)]}))
"""
    seen = json.loads(run([venv / "bin" / "python", "-c", probe], cwd=elsewhere, env=env).splitlines()[-1])
    assert seen["package"].startswith(str(venv)) and seen["presets"].startswith(str(venv))  # not the checkout
    assert seen["sdxl"] == {"sampler": "ddim", "num_inference_steps": 50, "guidance_scale": 5.0, "d_lr": 1e-6}
    shown = seen["shown"]
    assert 'sampler = "dpmsolver++"' in shown and 'strategy = "ft"' in shown and "guidance_scale = 5.0" in shown
    assert seen["run"] == [5e-6, 32, ["preset families/paper", "preset families/sd1", "preset sd15-ddim50-adt",
                                      "preset sd15-ddim50-lora-adt", "run.toml"]]


def test_install_py_compares_exactly_the_files_the_wheel_installs(wheel):
    """install.py decides "current" / "stale" from the tool's installed files; its idea of what a
    wheel of this checkout installs must be what the wheel really holds."""
    spec = importlib.util.spec_from_file_location("adt_install_for_packaging", REPO / "install.py")
    installer = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = installer
    spec.loader.exec_module(installer)
    with zipfile.ZipFile(wheel) as archive:
        record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        rows = [line.split(",") for line in archive.read(record).decode().splitlines()]
    in_wheel = {path: digest.split("=", 1)[1] for path, digest, _ in rows if path.startswith("adt_plugin/")}
    assert in_wheel == installer.checkout_files()
