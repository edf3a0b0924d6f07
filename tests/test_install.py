"""install.py: refusal, idempotence, exact uninstall, the pip step (with a fake tool Python)."""

import importlib.util
import json
import os
import stat
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


def fake_python(env: Path, log: Path) -> Path:
    """A stand-in interpreter: answers the version query, records pip calls."""
    python = env / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"""#!/bin/sh
if [ "$1" = "-c" ]; then [ -f "{log}.installed" ] && echo {installer.repo_version()} || echo ""; exit 0; fi
echo "$@" >> "{log}"
[ "$3" = "install" ] && touch "{log}.installed"
[ "$3" = "uninstall" ] && rm -f "{log}.installed"
exit 0
""")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python


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


def test_package_goes_into_the_tools_own_environment(tmp_path, capsys):
    root = fake_tool(tmp_path / "sd-scripts", "kohya")
    log = tmp_path / "pip.log"
    fake_python(root / "venv", log)
    assert installer.main(["--kohya", str(root)]) == 0
    assert log.read_text().split() == ["-m", "pip", "install", str(REPO)]
    assert installer.main(["--kohya", str(root)]) == 0  # already there: no second pip run
    assert len(log.read_text().splitlines()) == 1 and "unchanged  adt-plugin" in capsys.readouterr().out
    assert installer.main(["--kohya", str(root), "--uninstall"]) == 0
    assert log.read_text().splitlines()[-1].split() == ["-m", "pip", "uninstall", "-y", "adt-plugin"]


def test_no_environment_found_prints_the_pip_command(tmp_path, capsys):
    root = fake_tool(tmp_path / "sd-scripts", "kohya")
    assert installer.main(["--kohya", str(root)]) == 0
    assert f"-m pip install {REPO}" in capsys.readouterr().out


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
