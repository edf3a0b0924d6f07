"""docs/settings.md's table states every AdtSettings field with the default the code has."""

import dataclasses
import re
from pathlib import Path

from adt_plugin.settings import AdtSettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
ROW = re.compile(r"^\| ((?:`[a-z_0-9]+`(?:, )?)+) \| ([^|]+) \|")


def split_top_level(text: str) -> list[str]:
    """'[2, 5], 64' -> ['[2, 5]', '64']"""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return parts + [current.strip()]


def value_of(text: str):
    text = text.strip().strip("`")
    if text == "empty":
        return ""
    if text in ("true", "false"):
        return text == "true"
    if text.startswith("["):
        return tuple(int(v) for v in text.strip("[]").split(","))
    try:
        return float(text)
    except ValueError:
        return text


def documented_defaults() -> dict:
    found = {}
    for line in DOC.read_text().splitlines():
        match = ROW.match(line)
        if not match:
            continue
        names = re.findall(r"`([a-z_0-9]+)`", match.group(1))
        values = split_top_level(match.group(2)) if len(names) > 1 else [match.group(2)]
        assert len(values) == len(names), line
        found.update({name: value_of(v) for name, v in zip(names, values)})
    return found


def test_every_setting_is_documented_with_its_default():
    documented = documented_defaults()
    for field in dataclasses.fields(AdtSettings):
        assert field.name in documented, f"docs/settings.md does not list {field.name}"
        code = field.default
        doc = documented[field.name]
        if isinstance(code, bool) or isinstance(code, str) or isinstance(code, tuple):
            assert doc == code, f"docs/settings.md: {field.name} = {doc!r}, the code's default is {code!r}"
        else:
            assert float(doc) == float(code), f"docs/settings.md: {field.name} = {doc!r}, the code's default is {code!r}"
