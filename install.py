#!/usr/bin/env python3
"""Install adt-plugin into the trainers and tools you already use.

    python install.py --kohya-gui ~/kohya_ss --onetrainer ~/OneTrainer
    python install.py --onetrainer ~/OneTrainer --uninstall

For each tool it checks that the folder really is that tool, installs this
package into the tool's own Python environment (its venv / .venv / conda_env
folder, or --python), and places what the tool needs:

  --kohya PATH       sd-scripts: the package (then `accelerate launch -m adt_plugin.kohya.launch ...`)
  --kohya-gui PATH   kohya_ss GUI: the package + ADT presets in presets/lora/user_presets/
  --onetrainer PATH  OneTrainer: the package + modules/modelSetup/adt_plugin_shim.py
                     + "#... ADT" presets in training_presets/
  --comfyui PATH     ComfyUI: the package + custom_nodes/adt_plugin_nodes (a link to comfyui_nodes/)

Running it twice changes nothing. What it adds is listed in the tool folder's
.adt_plugin_install.json; --uninstall removes exactly that (files you have edited
since are kept, with a note). It never downloads model weights. Standard
library only: run it with any Python 3.9+.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent
PRESETS = REPO / "adt_plugin" / "presets"  # package data: the same files the wheel ships
MANIFEST = ".adt_plugin_install.json"
PACKAGE = "adt-plugin"


def repo_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    return match.group(1) if match else "0"


# -- what each tool gets ----------------------------------------------------------------------
@dataclass
class Tool:
    key: str
    flag: str
    label: str
    markers: tuple[str, ...]  # paths that make a folder this tool
    envs: tuple[str, ...]  # candidate Python environments, relative to the tool folder
    files: Callable[[Path], list[tuple[Path, Path]]] = lambda root: []  # (source in this repo, destination)
    links: Callable[[Path], list[tuple[Path, Path]]] = lambda root: []  # (source folder, destination)
    usage: str = ""


def _presets(src: Path, dest: Path) -> list[tuple[Path, Path]]:
    return [(p, dest / p.relative_to(src)) for p in sorted(src.rglob("*.json"))]


TOOLS: dict[str, Tool] = {
    t.key: t
    for t in (
        Tool(
            "kohya", "--kohya", "kohya-ss sd-scripts",
            ("train_network.py", "library/train_util.py"), ("venv", ".venv"),
            usage="accelerate launch -m adt_plugin.kohya.launch {root}/train_network.py --config_file my.toml "
                  "--adt_backbone_path ./dinov2-small",
        ),
        Tool(
            "kohya_gui", "--kohya-gui", "kohya_ss GUI",
            ("kohya_gui.py", "kohya_gui/lora_gui.py", "presets/lora"), ("venv", ".venv"),
            files=lambda root: _presets(PRESETS / "kohya_gui", root / "presets" / "lora" / "user_presets"),
            usage="LoRA tab -> Parameters -> Presets: user_presets/ADT - ... (restart the GUI to see them)",
        ),
        Tool(
            "onetrainer", "--onetrainer", "OneTrainer",
            ("scripts/train.py", "modules/modelSetup", "modules/util/factory.py", "training_presets"),
            ("venv", ".venv", "conda_env"),
            files=lambda root: [(REPO / "adt_plugin" / "onetrainer" / "shim.py", root / "modules" / "modelSetup" / "adt_plugin_shim.py")]
            + _presets(PRESETS / "onetrainer", root / "training_presets"),
            usage="start OneTrainer and pick e.g. SD1.5 / #sd 1.5 LoRA ADT from the preset list",
        ),
        Tool(
            "comfyui", "--comfyui", "ComfyUI",
            ("main.py", "comfy", "custom_nodes", "folder_paths.py"), ("venv", ".venv", "../python_embeded"),
            links=lambda root: [(REPO / "comfyui_nodes", root / "custom_nodes" / "adt_plugin_nodes")],
            usage="restart ComfyUI; the ADT nodes are under the 'ADT' category",
        ),
    )
}


# -- small helpers ----------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_atomic(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def env_python(root: Path, tool: Tool, override: Optional[str]) -> Optional[Path]:
    if override:
        return Path(override)
    for env in tool.envs:
        for candidate in (root / env / "bin" / "python", root / env / "Scripts" / "python.exe", root / env / "python.exe"):
            if candidate.exists():
                return candidate
    return None


def pip_command(python: Path | str) -> list[str]:
    return [str(python), "-m", "pip", "install", str(REPO)]


def installed_version(python: Path) -> Optional[str]:
    code = f"import importlib.metadata as m\ntry: print(m.version({PACKAGE!r}))\nexcept m.PackageNotFoundError: print('')"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{python} does not run ({out.stderr.strip().splitlines()[-1:] or 'no output'})")
    return out.stdout.strip() or None


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    changed: bool = False
    failed: bool = False

    def say(self, text: str, changed: bool = False) -> None:
        self.lines.append(text)
        self.changed |= changed


# -- install / uninstall one tool ---------------------------------------------------------------
def check_tool(tool: Tool, root: Path) -> Optional[str]:
    if not root.is_dir():
        return f"{tool.flag} {root}: no such folder"
    missing = [m for m in tool.markers if not (root / m).exists()]
    if missing:
        return (f"{tool.flag} {root}: this is not a {tool.label} folder (missing {', '.join(missing)}); "
                f"point {tool.flag} at the folder that holds {tool.markers[0]}")
    return None


def load_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if path.exists():
        return json.loads(path.read_text())
    return {"tool": None, "files": {}, "links": {}, "dirs": [], "pip": None}


def install(tool: Tool, root: Path, args: argparse.Namespace) -> Report:
    report = Report()
    manifest = load_manifest(root)
    before = json.dumps(manifest, sort_keys=True)
    manifest["tool"] = tool.key

    for src, dest in tool.files(root):
        rel = str(dest.relative_to(root))
        data = src.read_bytes()
        if dest.exists():
            current = sha256(dest)
            if current == hashlib.sha256(data).hexdigest():
                manifest["files"].setdefault(rel, current)
                report.say(f"  unchanged  {rel}")
                continue
            if manifest["files"].get(rel) != current:
                report.say(f"  kept       {rel} (it is not ours or you edited it; remove it to get ours)")
                continue
        _note_new_dirs(root, dest.parent, manifest)
        write_atomic(dest, data)
        manifest["files"][rel] = hashlib.sha256(data).hexdigest()
        report.say(f"  placed     {rel}", changed=True)

    for src, dest in tool.links(root):
        rel = str(dest.relative_to(root))
        if not src.is_dir() or not any(src.iterdir()):
            report.say(f"  MISSING    {src.relative_to(REPO)}/ is not in this adt-plugin checkout yet (the ComfyUI "
                       f"nodes are written separately); update the checkout and run install.py again")
            report.failed = True
            continue
        if dest.is_symlink() and Path(os.path.realpath(dest)) == src.resolve():
            manifest["links"].setdefault(rel, "link")
            report.say(f"  unchanged  {rel} -> {src}")
            continue
        if dest.exists() or dest.is_symlink():
            if manifest["links"].get(rel) == "copy" and args.copy:
                report.say(f"  unchanged  {rel} (a copy; --uninstall and install again to refresh it)")
                continue
            report.say(f"  kept       {rel} (already there and not made by install.py; move it away to install)")
            report.failed = True
            continue
        _note_new_dirs(root, dest.parent, manifest)
        try:
            if args.copy:
                raise OSError("copy asked for")
            dest.symlink_to(src, target_is_directory=True)
            manifest["links"][rel] = "link"
            report.say(f"  linked     {rel} -> {src}", changed=True)
        except OSError:
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
            manifest["links"][rel] = "copy"
            report.say(f"  copied     {src} -> {rel}", changed=True)

    if not args.no_pip:
        _install_package(tool, root, args, manifest, report)
    else:
        python = env_python(root, tool, args.python) or "<python of this tool>"
        report.say(f"  package    skipped (--no-pip); to install it: {' '.join(pip_command(python))}")

    if json.dumps(manifest, sort_keys=True) != before:
        write_atomic(root / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    if tool.usage:
        report.say(f"  use it     {tool.usage.format(root=root)}")
    return report


def _note_new_dirs(root: Path, folder: Path, manifest: dict) -> None:
    """Record the folders install.py is about to create, so that --uninstall removes them too."""
    while not folder.exists() and folder != root:
        manifest.setdefault("dirs", []).append(str(folder.relative_to(root)))
        folder = folder.parent


def _install_package(tool: Tool, root: Path, args, manifest: dict, report: Report) -> None:
    python = env_python(root, tool, args.python)
    if python is None:
        report.say(f"  package    no Python environment found in {root} ({', '.join(tool.envs)}); install it "
                   f"yourself with that tool's Python: {' '.join(pip_command('<python>'))}")
        return
    try:
        have = installed_version(python)
    except RuntimeError as err:
        report.say(f"  package    {err}; install it yourself: {' '.join(pip_command(python))}")
        report.failed = True
        return
    want = repo_version()
    if have == want and not args.reinstall:
        report.say(f"  unchanged  {PACKAGE} {have} in {python}")
        return
    result = subprocess.run(pip_command(python))
    if result.returncode != 0:
        report.say(f"  FAILED     {' '.join(pip_command(python))} (exit {result.returncode})")
        report.failed = True
        return
    if manifest.get("pip") is None:
        manifest["pip"] = {"python": str(python), "previous": have}
    report.say(f"  installed  {PACKAGE} {want} into {python}", changed=True)


def uninstall(tool: Tool, root: Path, args: argparse.Namespace) -> Report:
    report = Report()
    if not (root / MANIFEST).exists():
        report.say(f"  nothing to remove (no {MANIFEST}: install.py did not install here)")
        return report
    manifest = load_manifest(root)
    for rel, digest in sorted(manifest["files"].items()):
        path = root / rel
        if not path.exists():
            continue
        if sha256(path) != digest:
            report.say(f"  kept       {rel} (edited since it was installed)")
            continue
        path.unlink()
        report.say(f"  removed    {rel}", changed=True)
    for rel, kind in sorted(manifest["links"].items()):
        path = root / rel
        if path.is_symlink():
            path.unlink()
        elif kind == "copy" and path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        report.say(f"  removed    {rel}", changed=True)
    for rel in sorted(manifest.get("dirs", []), key=len, reverse=True):
        path = root / rel
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
            report.say(f"  removed    {rel}/", changed=True)
    pip = manifest.get("pip")
    if pip and not args.no_pip:
        if pip.get("previous"):
            report.say(f"  package    left in place ({PACKAGE} {pip['previous']} was there before install.py)")
        else:
            result = subprocess.run([pip["python"], "-m", "pip", "uninstall", "-y", PACKAGE])
            report.say(f"  removed    {PACKAGE} from {pip['python']}" if result.returncode == 0
                       else f"  FAILED     pip uninstall {PACKAGE} (exit {result.returncode})", changed=result.returncode == 0)
            report.failed |= result.returncode != 0
    (root / MANIFEST).unlink()
    return report


# -- command line -----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="install.py", description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(f"  {t.flag:<14} {t.label}" for t in TOOLS.values()),
    )
    for tool in TOOLS.values():
        p.add_argument(tool.flag, metavar="PATH", dest=tool.key, help=f"the {tool.label} folder")
    p.add_argument("--uninstall", action="store_true", help="remove what install.py added to the given tools")
    p.add_argument("--python", help="the tool's Python interpreter (when it is not in venv/ or .venv/)")
    p.add_argument("--no-pip", action="store_true", help="do not install the package; print the pip command instead")
    p.add_argument("--reinstall", action="store_true", help="reinstall the package even if this version is there")
    p.add_argument("--copy", action="store_true", help="copy comfyui_nodes/ instead of linking it")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    chosen = [(TOOLS[key], Path(getattr(args, key)).expanduser().resolve()) for key in TOOLS if getattr(args, key)]
    if not chosen:
        p.print_help()
        print("\nNothing to do: name at least one tool folder, e.g. python install.py --onetrainer ~/OneTrainer")
        return 0
    problems = [msg for tool, root in chosen if (msg := check_tool(tool, root))]
    if problems:
        for msg in problems:
            print(f"install.py: {msg}", file=sys.stderr)
        return 2
    failed = False
    for tool, root in chosen:
        print(f"{'Uninstalling from' if args.uninstall else 'Installing into'} {tool.label}: {root}")
        report = (uninstall if args.uninstall else install)(tool, root, args)
        print("\n".join(report.lines))
        failed |= report.failed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
