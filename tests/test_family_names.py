"""No code outside the family modules tests a model family's name.

What a family is (its guidance, sampler, conditioning, VAE, LoRA layout, ...) lives
in `adt_plugin/families/`; everything else asks the family object. This test reads
the package's source (outside `families/` and the trainer plugins `kohya/` and
`onetrainer/` with their GUI presets' generator, which move onto the family modules
in the next phase) and the
ComfyUI nodes, and fails on any comparison with a family name (`family == "sd3"`,
`name in ("sd1", "sd2")`), any subscript by one (`FAMILIES["sdxl"]`) and any dict
keyed by them (`{"sd3": ...}`).
"""

import ast
from pathlib import Path

from adt_plugin.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
# the trainer plugins and the generator of their GUI presets (per tool and family fields)
# move onto the family modules in phase 2b
LEFT_TO_PHASE_2B = ("adt_plugin/families/", "adt_plugin/kohya/", "adt_plugin/onetrainer/", "adt_plugin/presets/generate.py")
NAMES = set(FAMILIES)


def _names_in(node) -> list[str]:
    """Family names among the string constants anywhere in `node` (`"sd3"`, `("sd1", "sd2")`,
    `"sdxl" if xl else "sd1"`)."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in NAMES]


def family_name_tests(source: str) -> list[tuple[int, str]]:
    """(line, what) for every comparison with, subscript by or dict keyed by a family name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                found += [(node.lineno, f"compares with {name!r}") for name in _names_in(operand)]
        elif isinstance(node, ast.Subscript):
            found += [(node.lineno, f"indexes by {name!r}") for name in _names_in(node.slice)]
        elif isinstance(node, ast.Dict):
            found += [(node.lineno, f"a dict keyed by {name!r}") for key in node.keys if key is not None for name in _names_in(key)]
        elif isinstance(node, ast.MatchValue):
            found += [(node.lineno, f"matches {name!r}") for name in _names_in(node.value)]
    return found


def test_the_check_finds_each_kind_of_family_name_test():
    source = (
        'a = family == "sd3"\nb = name in ("sd1", "x")\nc = FAMILIES["sdxl"]\nd = {"flux_dev": 1}\ne = name == "sd15"\n'
        'f = FAMILIES["sdxl" if xl else "sd1"]\n'
    )
    assert [line for line, _ in family_name_tests(source)] == [1, 2, 3, 4, 6, 6]


def test_no_code_outside_the_family_modules_tests_a_family_name():
    files = [p for p in (ROOT / "adt_plugin").rglob("*.py") if not str(p.relative_to(ROOT)).startswith(LEFT_TO_PHASE_2B)]
    files += sorted((ROOT / "comfyui_nodes").rglob("*.py"))
    assert len(files) > 40
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {what}"
        for path in files
        for line, what in family_name_tests(path.read_text(encoding="utf-8"))
    ]
    assert not offenders, "family facts belong in adt_plugin/families/:\n" + "\n".join(offenders)
