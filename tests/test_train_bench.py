"""`adt bench` runs end to end on the CPU and prints every number it promises (values are not timed here)."""

import re
import sys

import pytest

from adt_plugin.cli import main


def test_bench_prints_ratios_and_finds_no_graph_on_discriminator_only_iterations(capsys):
    args = [
        "bench",
        "--threads",
        "1",
        "--steps",
        "4",
        "--cycles",
        "1",
        "--ft_steps",
        "1",
        "--g_every",
        "2",
        "--batch",
        "2",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "the SD1.5 (512 px) and SDXL (1024 px) numbers need a GPU and were not measured" in out
    for label in ("FT step", "ADT iteration (H-cycle average)", "denoiser forwards per iteration", "overhead ratio"):
        assert re.search(rf"{re.escape(label)}\s+[0-9.]+", out), label
    assert "tensors saved for backward in denoiser + decoder: 0 (goal 0)" in out
    if sys.platform.startswith("linux"):
        assert re.search(r"peak memory ADT / FT\s+[0-9.]+", out)
    forwards = float(re.search(r"denoiser forwards per iteration\s+([0-9.]+)", out).group(1))
    assert 1.0 <= forwards <= 4.0  # a rollout runs 1..4 steps of a 4-step schedule


def test_bench_rejects_unknown_models():
    with pytest.raises(SystemExit):
        main(["bench", "--model", "sd9"])
