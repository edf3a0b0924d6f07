#!/usr/bin/env python3
"""Install adt-plugin into the trainers and tools you already use.

    python install.py --kohya-gui ~/kohya_ss --onetrainer ~/OneTrainer
    python install.py --onetrainer ~/OneTrainer --uninstall

For each tool it checks that the folder really is that tool, installs this
checkout of the package into the tool's own Python environment (its venv /
.venv / conda_env folder, or --python), and places what the tool needs:

  --kohya PATH       sd-scripts: the package (then `accelerate launch -m adt_plugin.kohya.launch ...`)
  --kohya-gui PATH   kohya_ss GUI: the package + ADT presets in presets/lora/user_presets/
  --onetrainer PATH  OneTrainer: the package + modules/modelSetup/adt_plugin_shim.py
                     + "#... ADT" presets in training_presets/
  --comfyui PATH     ComfyUI: the package + custom_nodes/adt_plugin_nodes (a link to comfyui_nodes/)

Running it twice changes nothing; after a `git pull` (or any edit) it reinstalls
the package, because it compares the files installed in the tool's Python with
this checkout's (an editable install of this checkout is always current). What
it adds is listed in the tool folder's .adt_plugin_install.json, including the
packages pip added to the tool's environment for adt-plugin; --uninstall removes
exactly that (files you have edited since are kept, with a note; packages the
tool had before are never removed). It never downloads model weights. Standard
library only: run it with any Python 3.9+.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
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
    after_uninstall: str = ""  # what the user still has to change by hand


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
            after_uninstall="drop `-m adt_plugin.kohya.launch` from your accelerate launch commands",
        ),
        Tool(
            "kohya_gui", "--kohya-gui", "kohya_ss GUI",
            ("kohya_gui.py", "kohya_gui/lora_gui.py", "presets/lora"), ("venv", ".venv"),
            files=lambda root: _presets(PRESETS / "kohya_gui", root / "presets" / "lora" / "user_presets"),
            usage="LoRA tab -> Parameters -> Presets: user_presets/ADT - ... (restart the GUI to see them)",
            after_uninstall="a GUI config that still has `-m adt_plugin.kohya.launch` in Accelerate launch -> "
                            "Extra accelerate launch arguments no longer starts: clear that field",
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


def pip_command(python: Path | str, source: Path | str = REPO) -> list[str]:
    return [str(python), "-m", "pip", "install", str(source)]


# -- what is installed in a tool's Python ---------------------------------------------------------
# Run by the tool's own Python with -I (isolated: neither the current folder nor PYTHON*
# variables on sys.path) from an empty folder, so that a checkout's adt_plugin.egg-info or
# adt_plugin/ next to it cannot pass for an installed package.
QUERY = r"""
import importlib.metadata as md, json, re, sys

def canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()

try:  # pip's own copy, where the tool has no packaging
    from packaging.requirements import Requirement
except Exception:
    try:
        from pip._vendor.packaging.requirements import Requirement
    except Exception:
        Requirement = None

def needed(requirement):  # to run here: not under an extra, a marker that holds for this Python
    if Requirement is None:
        return not re.search(r";.*\bextra\b", requirement)
    try:
        marker = Requirement(requirement).marker
        return marker is None or marker.evaluate({"extra": ""})
    except Exception:
        return True

dists, requires = {}, {}
for dist in md.distributions():
    name = dist.metadata["Name"]
    if not name or canon(name) in dists:
        continue
    dists[canon(name)] = dist.version
    needs = [r for r in (dist.requires or []) if needed(r)]
    requires[canon(name)] = sorted({canon(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in needs})
adt = None
try:
    dist = md.distribution("adt-plugin")
except md.PackageNotFoundError:
    dist = None
if dist is not None:
    direct = dist.read_text("direct_url.json")
    adt = {
        "version": dist.version,
        "direct_url": json.loads(direct) if direct else None,
        "location": str(dist.locate_file("adt_plugin")),
        "files": {str(f): f.hash.value for f in (dist.files or []) if str(f).startswith("adt_plugin/") and f.hash},
    }
print(json.dumps({"python": sys.version.split()[0], "prefix": sys.prefix, "dists": dists, "requires": requires, "adt": adt}))
"""


def query_environment(python: Path | str) -> dict:
    """What the tool's Python has installed: {dists, requires, adt} (adt: None when absent)."""
    with tempfile.TemporaryDirectory(prefix="adt-install-") as empty:
        out = subprocess.run([str(python), "-I", "-c", QUERY], capture_output=True, text=True, cwd=empty)
    if out.returncode != 0:
        raise RuntimeError(f"{python} does not run ({out.stderr.strip().splitlines()[-1:] or 'no output'})")
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"{python} did not answer what it has installed (got {out.stdout.strip()[:200]!r})") from None


def record_hash(data: bytes) -> str:
    """A file's hash as a wheel's RECORD (and importlib.metadata) writes it."""
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def checkout_files() -> dict[str, str]:
    """What a wheel of this checkout installs under adt_plugin/ (the package's modules and its
    presets, see pyproject.toml), with RECORD hashes."""
    files = {}
    for path in sorted((REPO / "adt_plugin").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".toml", ".json"):
            files[path.relative_to(REPO).as_posix()] = record_hash(path.read_bytes())
    return files


def _file_url_path(url: str) -> Optional[Path]:
    from urllib.parse import unquote, urlparse

    parsed = urlparse(url)
    return Path(unquote(parsed.path)).resolve() if parsed.scheme == "file" else None


def compare_with_checkout(adt: Optional[dict]) -> tuple[str, str]:
    """("missing" | "current" | "stale", what was found), for the tool's adt-plugin."""
    if adt is None:
        return "missing", "not installed"
    direct = adt.get("direct_url") or {}
    if direct.get("dir_info", {}).get("editable"):
        target = _file_url_path(direct.get("url", ""))
        if target == REPO:
            return "current", f"{PACKAGE} {adt['version']} (an editable install of this checkout)"
        return "stale", f"{PACKAGE} {adt['version']} (an editable install of {target or direct.get('url')})"
    location = Path(adt.get("location", "")).resolve()
    if location == REPO / "adt_plugin":  # an old-style `setup.py develop` / path install of this checkout
        return "current", f"{PACKAGE} {adt['version']} (this checkout, on the tool's path)"
    have, want = adt.get("files", {}), checkout_files()
    if have == want:
        return "current", f"{PACKAGE} {adt['version']} (the same files as this checkout)"
    differ = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    shown = ", ".join(d[len("adt_plugin/"):] for d in differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
    return "stale", f"{PACKAGE} {adt['version']} ({len(differ)} file(s) differ from this checkout: {shown})"


def stage_source(dest: Path) -> Path:
    """A copy of what pip builds (pyproject.toml, README.md, adt_plugin/), so that the build
    writes nothing (build/, *.egg-info) into the checkout and installs exactly these files."""
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "adt_plugin", dest / "adt_plugin", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def removable(added: list[str], env: dict, removing: set[str]) -> tuple[list[str], list[str]]:
    """(the packages install.py added that nothing staying installed needs, those still needed);
    `removing`: what goes anyway (adt-plugin, unless it was there before install.py)."""
    installed = set(env["dists"])
    remove = {name for name in added if name in installed}
    changed = True
    while changed:  # a package stays when anything that stays requires it
        changed = False
        for name in sorted(remove):
            gone = remove | removing
            if any(name in reqs for d, reqs in env["requires"].items() if d not in gone):
                remove.discard(name)
                changed = True
    kept = sorted(n for n in added if n in installed and n not in remove)
    return sorted(remove), kept


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
        before = query_environment(python)
    except RuntimeError as err:
        report.say(f"  package    {err}; install it yourself: {' '.join(pip_command(python))}")
        report.failed = True
        return
    env_folder = python.parent.parent if python.parent.name in ("bin", "Scripts") else python.parent
    if not args.python and Path(before.get("prefix", env_folder)).resolve() != env_folder.resolve():
        report.say(f"  package    {python} is not an environment of its own: it runs the Python in {before['prefix']}. "
                   f"Not installing there; give the tool's interpreter with --python if that is really it")
        report.failed = True
        return
    status, found = compare_with_checkout(before["adt"])
    if status == "current" and not args.reinstall:
        report.say(f"  unchanged  {found} in {python}")
        return
    report.say(f"  package    {found} in {python}: installing this checkout")
    with tempfile.TemporaryDirectory(prefix="adt-plugin-src-") as staged:
        command = pip_command(python, stage_source(Path(staged)))
        result = subprocess.run(command)
    if result.returncode != 0:
        report.say(f"  FAILED     {' '.join(pip_command(python))} (exit {result.returncode})")
        report.failed = True
        return
    after = query_environment(python)
    status, found = compare_with_checkout(after["adt"])
    if status != "current":
        report.say(f"  FAILED     pip finished, but {python} has {found}")
        report.failed = True
        return
    added = sorted(n for n in after["dists"] if n not in before["dists"] and n != PACKAGE)
    changed = {n: [before["dists"][n], v] for n, v in after["dists"].items()
               if n in before["dists"] and before["dists"][n] != v and n != PACKAGE}
    pip = manifest.get("pip") or {"python": str(python), "previous": (before["adt"] or {}).get("version"),
                                   "added": [], "changed": {}}
    pip["added"] = sorted(set(pip.get("added", [])) | set(added))
    pip["changed"] = {**changed, **pip.get("changed", {})}  # the first install.py run knows the tool's own version
    manifest["pip"] = pip
    report.say(f"  installed  {found} into {python}", changed=True)
    if added:
        report.say(f"  added      {len(added)} package(s) the tool did not have: {', '.join(added)} "
                   "(--uninstall removes them)")
    for name, (old, new) in sorted(changed.items()):
        report.say(f"  WARNING    pip changed the tool's {name} {old} -> {new}; --uninstall does not undo this: "
                   f"{python} -m pip install {name}=={old}")


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
        _uninstall_packages(pip, report)
    if tool.after_uninstall:
        report.say(f"  note       {tool.after_uninstall}")
    if report.failed:  # keep the record of what is left, for the next --uninstall
        write_atomic(root / MANIFEST, (json.dumps({**manifest, "files": {}, "links": {}, "dirs": []}, indent=2,
                                                  sort_keys=True) + "\n").encode())
    else:
        (root / MANIFEST).unlink()
    return report


def _uninstall_packages(pip: dict, report: Report) -> None:
    python = pip["python"]
    try:
        env = query_environment(python)
    except RuntimeError as err:
        report.say(f"  FAILED     {err}; remove {PACKAGE} yourself: <python> -m pip uninstall {PACKAGE}")
        report.failed = True
        return
    names = []
    if pip.get("previous"):
        report.say(f"  package    left in place ({PACKAGE} {pip['previous']} was there before install.py)")
    elif PACKAGE in env["dists"]:
        names.append(PACKAGE)
    remove, kept = removable(pip.get("added", []), env, set(names))
    names += remove
    for name in kept:
        report.say(f"  kept       {name} (install.py added it, but a package that stays installed needs it)")
    for name, (old, new) in sorted(pip.get("changed", {}).items()):
        report.say(f"  note       pip changed {name} {old} -> {new} when install.py ran; left as it is now")
    if not names:
        return
    result = subprocess.run([python, "-m", "pip", "uninstall", "-y", *names])
    if result.returncode == 0:
        report.say(f"  removed    {', '.join(names)} from {python}", changed=True)
    else:
        report.say(f"  FAILED     {python} -m pip uninstall -y {' '.join(names)} (exit {result.returncode})")
        report.failed = True


# -- command line -----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="install.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for tool in TOOLS.values():
        p.add_argument(tool.flag, metavar="PATH", dest=tool.key, help=f"the {tool.label} folder")
    p.add_argument("--uninstall", action="store_true", help="remove what install.py added to the given tools")
    p.add_argument("--python", help="the tool's Python interpreter (when it is not in venv/ or .venv/)")
    p.add_argument("--no-pip", action="store_true", help="do not install the package; print the pip command instead")
    p.add_argument("--reinstall", action="store_true", help="reinstall the package even if the tool already has this checkout's files")
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
