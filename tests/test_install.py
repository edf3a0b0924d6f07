"""install.py: refusal, idempotence, exact uninstall, the pip step (with a fake tool Python,
and for real into a fresh venv: built locally, nothing downloaded)."""

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("adt_install", REPO / "install.py")
installer = importlib.util.module_from_spec(spec)
sys.modules["adt_install"] = installer
spec.loader.exec_module(installer)


def fake_tool(root: Path, key: str) -> Path:
    for marker in installer.TOOLS[key].markers:
        path = root / marker
        if marker.endswith(".py"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("# upstream file\n")
        else:
            path.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("upstream\n")
    return root


def snapshot(root: Path) -> dict:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_file():
            out[rel] = ("file", path.read_bytes(), path.stat().st_mtime_ns)
        else:
            out[rel] = ("dir",)
    return out


FAKE_PYTHON = r"""#!{python}
# A stand-in for a tool's interpreter: answers install.py's query from a JSON state
# file and plays pip (install: adt-plugin with the source's files, plus the packages
# it pulls in that the tool lacks; uninstall: removes names). Logs every call.
import base64, hashlib, json, os, pathlib, sys
state_path, log_path = {state!r}, {log!r}
state = json.load(open(state_path))
with open(log_path, "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\n")
if sys.argv[1:3] == ["-I", "-c"]:
    print(json.dumps(dict(state, python="3.10.0")))
elif sys.argv[1:4] == ["-m", "pip", "install"]:
    src = pathlib.Path(sys.argv[4])
    files = {{}}
    for path in sorted((src / "adt_plugin").rglob("*")):
        if path.is_file() and path.suffix in (".py", ".toml", ".json") and "__pycache__" not in path.parts:
            digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
            files[path.relative_to(src).as_posix()] = digest
    state["adt"] = {{"version": "0.1.0", "direct_url": {{"url": src.as_uri(), "dir_info": {{}}}},
                    "location": "/site-packages/adt_plugin", "files": files}}
    state["dists"]["adt-plugin"] = "0.1.0"
    state["requires"]["adt-plugin"] = ["diffusers", "peft", "toml", "torch"]
    for dep, version in (("peft", "0.13.0"), ("toml", "0.10.2"), ("diffusers", "0.32.1")):
        state["dists"][dep] = version  # new, or upgraded when the tool's is older
        state["requires"].setdefault(dep, [])
elif sys.argv[1:4] == ["-m", "pip", "uninstall"]:
    for name in sys.argv[5:]:
        state["dists"].pop(name, None)
        state["requires"].pop(name, None)
        if name == "adt-plugin":
            state["adt"] = None
json.dump(state, open(state_path, "w"))
"""


def fake_python(env: Path, log: Path, dists: dict = None) -> Path:
    """A tool environment with torch and diffusers 0.32.1 (or `dists`), without adt-plugin."""
    state = env / "state.json"
    dists = dists or {"torch": "2.4.0", "diffusers": "0.32.1"}
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"prefix": str(env), "dists": dists, "requires": {name: [] for name in dists}, "adt": None}))
    python = env / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON.format(python=sys.executable, state=str(state), log=str(log)))
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python


def calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def pip_calls(log: Path) -> list[list[str]]:
    return [c["argv"][2:] for c in calls(log) if c["argv"][:2] == ["-m", "pip"]]


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A copy of this checkout for install.py to install from and to be edited (as a git pull would)."""
    root = tmp_path / "adt-plugin"
    root.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "adt_plugin", root / "adt_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(installer, "REPO", root)
    monkeypatch.setattr(installer, "PRESETS", root / "adt_plugin" / "presets")
    return root


def test_without_arguments_it_says_what_it_can_do(capsys):
    assert installer.main([]) == 0
    out = capsys.readouterr().out
    for flag in ("--kohya", "--kohya-gui", "--onetrainer", "--comfyui", "--uninstall"):
        assert flag in out


def test_refuses_a_folder_that_is_not_the_tool(tmp_path, capsys):
    other = fake_tool(tmp_path / "kohya_ss", "kohya_gui")
    before = snapshot(tmp_path)
    assert installer.main(["--onetrainer", str(other), "--no-pip"]) == 2
    err = capsys.readouterr().err
    assert "not a OneTrainer folder" in err and "scripts/train.py" in err
    assert snapshot(tmp_path) == before
    assert installer.main(["--kohya", str(tmp_path / "nowhere")]) == 2


def test_onetrainer_install_is_idempotent_and_uninstall_is_exact(tmp_path, capsys):
    root = fake_tool(tmp_path / "OneTrainer", "onetrainer")
    pristine = snapshot(root)
    assert installer.main(["--onetrainer", str(root), "--no-pip"]) == 0
    shim = root / "modules" / "modelSetup" / "adt_plugin_shim.py"
    preset = root / "training_presets" / "SD1.5" / "#sd 1.5 LoRA ADT.json"
    assert shim.read_text() == (REPO / "adt_plugin" / "onetrainer" / "shim.py").read_text()
    assert json.loads(preset.read_text())["adt"]["enabled"] is True
    manifest = json.loads((root / installer.MANIFEST).read_text())
    assert set(manifest["files"]) >= {"modules/modelSetup/adt_plugin_shim.py", "training_presets/SD3/#sd 3 LoRA ADT.json"}
    installed = snapshot(root)

    assert installer.main(["--onetrainer", str(root), "--no-pip"]) == 0
    assert snapshot(root) == installed  # twice changes nothing, not even a timestamp
    assert "placed" not in capsys.readouterr().out.split("Installing into")[-1]

    assert installer.main(["--onetrainer", str(root), "--uninstall", "--no-pip"]) == 0
    assert snapshot(root) == pristine


def test_edited_and_foreign_files_are_kept(tmp_path, capsys):
    root = fake_tool(tmp_path / "kohya_ss", "kohya_gui")
    mine = root / "presets" / "lora" / "user_presets" / "ADT - SD15 LoRA (DDIM 50).json"
    mine.parent.mkdir(parents=True)
    mine.write_text("{}\n")  # the user's own file of the same name
    assert installer.main(["--kohya-gui", str(root), "--no-pip"]) == 0
    assert mine.read_text() == "{}\n" and "kept" in capsys.readouterr().out
    edited = root / "presets" / "lora" / "user_presets" / "ADT - SDXL LoRA (DDIM 50).json"
    edited.write_text(edited.read_text().replace("0.0001", "0.0002"))
    assert installer.main(["--kohya-gui", str(root), "--uninstall", "--no-pip"]) == 0
    assert edited.exists() and mine.exists()
    assert not (root / "presets" / "lora" / "user_presets" / "ADT - SD3 LoRA (flow Euler 28).json").exists()
    assert not (root / installer.MANIFEST).exists()


def test_package_goes_into_the_tools_own_environment(tmp_path, checkout, capsys):
    root = fake_tool(tmp_path / "sd-scripts", "kohya")
    log = tmp_path / "pip.log"
    fake_python(root / "venv", log)
    assert installer.main(["--kohya", str(root)]) == 0
    out = capsys.readouterr().out
    assert "not installed" in out and "installed  adt-plugin 0.1.0 (the same files as this checkout)" in out
    (install,) = pip_calls(log)
    assert install[0] == "install" and Path(install[1]).name.startswith("adt-plugin-src-")  # a staged copy
    assert not Path(install[1]).exists()  # removed again; nothing was built inside the checkout
    assert not list(checkout.glob("*.egg-info")) and not (checkout / "build").exists()
    queries = [c for c in calls(log) if c["argv"][:2] == ["-I", "-c"]]
    assert queries and all(not c["cwd"].startswith(str(checkout)) for c in queries)  # isolated, elsewhere
    assert "added      2 package(s) the tool did not have: peft, toml" in out

    assert installer.main(["--kohya", str(root)]) == 0  # the same files: no second pip run
    assert len(pip_calls(log)) == 1 and "unchanged  adt-plugin 0.1.0 (the same files" in capsys.readouterr().out

    noise = checkout / "adt_plugin" / "noise.py"  # `git pull`: new code, the same version number
    noise.write_text(noise.read_text() + "\n# changed upstream\n")
    assert installer.main(["--kohya", str(root)]) == 0
    out = capsys.readouterr().out
    assert "1 file(s) differ from this checkout: noise.py" in out and len(pip_calls(log)) == 2
    manifest = json.loads((root / installer.MANIFEST).read_text())
    assert manifest["pip"]["added"] == ["peft", "toml"] and manifest["pip"]["previous"] is None

    assert installer.main(["--kohya", str(root), "--uninstall"]) == 0
    assert pip_calls(log)[-1] == ["uninstall", "-y", "adt-plugin", "peft", "toml"]  # torch, diffusers: the tool's
    state = json.loads((root / "venv" / "state.json").read_text())
    assert state["dists"] == {"torch": "2.4.0", "diffusers": "0.32.1"}


def test_uninstall_keeps_what_the_tool_had_or_needs_now(tmp_path, checkout, capsys):
    root = fake_tool(tmp_path / "OneTrainer", "onetrainer")
    log = tmp_path / "pip.log"
    fake_python(root / "venv", log, dists={"torch": "2.4.0", "toml": "0.10.2", "diffusers": "0.30.0"})
    assert installer.main(["--onetrainer", str(root)]) == 0
    out = capsys.readouterr().out
    assert "added      1 package(s) the tool did not have: peft" in out
    assert "WARNING    pip changed the tool's diffusers 0.30.0 -> 0.32.1" in out
    state_path = root / "venv" / "state.json"
    state = json.loads(state_path.read_text())
    state["dists"]["tool-extension"] = "1.0"  # installed by the user later, needs peft
    state["requires"]["tool-extension"] = ["peft"]
    state_path.write_text(json.dumps(state))
    assert installer.main(["--onetrainer", str(root), "--uninstall"]) == 0
    out = capsys.readouterr().out
    assert pip_calls(log)[-1] == ["uninstall", "-y", "adt-plugin"]
    assert "kept       peft (install.py added it, but a package that stays installed needs it)" in out
    assert "pip changed diffusers 0.30.0 -> 0.32.1" in out


def test_a_package_that_was_there_before_is_updated_but_not_removed(tmp_path, checkout, capsys):
    root = fake_tool(tmp_path / "sd-scripts", "kohya")
    log = tmp_path / "pip.log"
    python = fake_python(root / "venv", log)
    state_path = root / "venv" / "state.json"
    state = json.loads(state_path.read_text())
    state["adt"] = {"version": "0.1.0", "direct_url": None, "location": "/x", "files": {"adt_plugin/__init__.py": "old"}}
    state["dists"]["adt-plugin"] = "0.1.0"
    state_path.write_text(json.dumps(state))
    assert installer.main(["--kohya", str(root)]) == 0
    assert "file(s) differ from this checkout" in capsys.readouterr().out and len(pip_calls(log)) == 1
    assert installer.main(["--kohya", str(root), "--uninstall"]) == 0
    out = capsys.readouterr().out
    assert "left in place (adt-plugin 0.1.0 was there before install.py)" in out
    assert "kept       peft (install.py added it, but a package that stays installed needs it)" in out  # adt-plugin does
    assert len(pip_calls(log)) == 1
    # an editable install of this checkout is current; one of another checkout is not
    assert installer.compare_with_checkout({"version": "0.1.0", "direct_url": {"url": checkout.as_uri(), "dir_info": {
        "editable": True}}})[0] == "current"
    assert installer.compare_with_checkout({"version": "0.1.0", "direct_url": {"url": "file:///elsewhere", "dir_info": {
        "editable": True}}}) == ("stale", "adt-plugin 0.1.0 (an editable install of /elsewhere)")
    assert python.exists()


REAL_TOOL_PYTHON = """#!/bin/sh
# The tool's venv, whose pip is this test environment's (run with --python), installing a
# wheel built here without build isolation: nothing is downloaded.
if [ "$1" = "-m" ] && [ "$2" = "pip" ] && [ "$3" = "install" ]; then
    rm -rf "{wheels}" && "{test_python}" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "{wheels}" "$4" \\
    && exec "{test_python}" -m pip --python "{real}" install -q --no-deps --no-index --force-reinstall "{wheels}"/adt_plugin-*.whl
fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then shift 2; exec "{test_python}" -m pip --python "{real}" "$@"; fi
exec "{real}" "$@"
"""


def test_a_fresh_venv_is_reported_missing_and_really_installed(tmp_path, checkout, monkeypatch, capsys):
    """issue 11.1: run where an earlier pip build left adt_plugin.egg-info (and next to the package),
    the tool's empty venv used to be reported as "unchanged adt-plugin 0.1.0"."""
    pytest.importorskip("setuptools", minversion="77")
    root = fake_tool(tmp_path / "sd-scripts", "kohya")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python, real = venv / "bin" / "python", venv / "bin" / "python-real"
    shutil.copy2(os.path.realpath(python), real)  # still this venv's interpreter (pyvenv.cfg is next to bin/)
    python.unlink()
    python.write_text(REAL_TOOL_PYTHON.format(wheels=tmp_path / "wheels", test_python=sys.executable, real=real))
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    egg = checkout / "adt_plugin.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 2.1\nName: adt-plugin\nVersion: 0.1.0\n")
    monkeypatch.chdir(checkout)
    probe = [str(real), "-c",  # (adt_plugin itself needs torch, which this venv lacks)
             "import importlib.metadata as m; print(m.distribution('adt-plugin').locate_file('adt_plugin/noise.py'))"]

    assert installer.main(["--kohya", str(root)]) == 0
    out = capsys.readouterr().out
    assert "not installed in" in out and "installed  adt-plugin 0.1.0 (the same files as this checkout)" in out
    installed = Path(subprocess.run(probe, capture_output=True, text=True, cwd=tmp_path, check=True).stdout.strip())
    assert installed.is_relative_to(venv) and installed.read_text() == (checkout / "adt_plugin" / "noise.py").read_text()

    assert installer.main(["--kohya", str(root)]) == 0
    assert "unchanged  adt-plugin 0.1.0 (the same files" in capsys.readouterr().out

    (checkout / "adt_plugin" / "noise.py").write_text(installed.read_text() + "\n# pulled\n")
    assert installer.main(["--kohya", str(root)]) == 0
    assert "1 file(s) differ from this checkout: noise.py" in capsys.readouterr().out
    assert installed.read_text().endswith("# pulled\n")

    assert installer.main(["--kohya", str(root), "--uninstall"]) == 0
    assert "removed    adt-plugin from" in capsys.readouterr().out
    gone = subprocess.run(probe, capture_output=True, text=True, cwd=tmp_path)
    assert gone.returncode != 0 and "PackageNotFoundError" in gone.stderr and not installed.exists()


def test_no_environment_found_prints_the_pip_command(tmp_path, capsys):
    root = fake_tool(tmp_path / "sd-scripts", "kohya")
    assert installer.main(["--kohya", str(root)]) == 0
    assert f"-m pip install {REPO}" in capsys.readouterr().out


def test_help_explains_every_list_it_prints(capsys):
    with pytest.raises(SystemExit):
        installer.main(["--help"])
    out = capsys.readouterr().out
    assert "places what the tool needs:" in out and "options:" in out
    assert out.index("--kohya-gui PATH   kohya_ss GUI:") < out.index("options:")
    assert out.rstrip().endswith("instead of linking it")  # nothing unexplained after the options


def test_comfyui_nodes_linked_or_missing_said_clearly(tmp_path, monkeypatch, capsys):
    root = fake_tool(tmp_path / "ComfyUI", "comfyui")
    fake_repo = tmp_path / "repo"
    (fake_repo / "comfyui_nodes").mkdir(parents=True)
    monkeypatch.setattr(installer, "REPO", fake_repo)
    assert installer.main(["--comfyui", str(root), "--no-pip"]) == 1
    assert "comfyui_nodes/ is not in this adt-plugin checkout yet" in capsys.readouterr().out
    (fake_repo / "comfyui_nodes" / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
    assert installer.main(["--comfyui", str(root), "--no-pip"]) == 0
    link = root / "custom_nodes" / "adt_plugin_nodes"
    assert link.is_symlink() and (link / "__init__.py").exists()
    assert installer.main(["--comfyui", str(root), "--no-pip"]) == 0
    assert installer.main(["--comfyui", str(root), "--uninstall", "--no-pip"]) == 0
    assert not link.exists() and not link.is_symlink()


@pytest.mark.parametrize("key", ["kohya_gui", "onetrainer"])
def test_every_preset_in_the_repo_is_installed(tmp_path, key):
    root = fake_tool(tmp_path / key, key)
    assert installer.main([installer.TOOLS[key].flag, str(root), "--no-pip"]) == 0
    sources = {p.name for p in (installer.PRESETS / ("kohya_gui" if key == "kohya_gui" else "onetrainer")).rglob("*.json")}
    placed = {p.name for p in root.rglob("*.json") if p.name != installer.MANIFEST}
    assert sources <= placed and len(sources) == 3


def test_an_interpreter_that_is_not_the_tools_own_environment_is_not_installed_into(tmp_path, checkout, capsys):
    """venv/bin/python that runs another environment (a bare link to the system Python: no
    pyvenv.cfg next to it) must not get pip installs meant for the tool."""
    root = fake_tool(tmp_path / "sd-scripts", "kohya")
    log = tmp_path / "pip.log"
    fake_python(root / "venv", log)
    state_path = root / "venv" / "state.json"
    state_path.write_text(json.dumps(dict(json.loads(state_path.read_text()), prefix="/usr")))
    assert installer.main(["--kohya", str(root)]) == 1
    assert "is not an environment of its own: it runs the Python in /usr" in capsys.readouterr().out
    assert pip_calls(log) == []
    assert installer.main(["--kohya", str(root), "--python", str(root / "venv" / "bin" / "python")]) == 0
    assert len(pip_calls(log)) == 1  # asked for explicitly
