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
        "--adt_every",  # every generator step an ADT step, fresh rollouts: the paper's cycle
        "1",
        "--rollout_buffer",
        "0",
        "--rollout_share",
        "1",
        "--batch",
        "2",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "the SD1.5 (512 px) and SDXL (1024 px) numbers need a GPU and were not measured" in out
    for label in ("FT step", "ADT iteration (H-cycle average)", "denoiser forwards per iteration", "overhead ratio",
                  "one generator update", "one ADT update"):
        assert re.search(rf"{re.escape(label)}\s+[0-9.]+", out), label
    assert "tensors saved for backward in denoiser + decoder: 0 (goal 0)" in out
    if sys.platform.startswith("linux"):
        assert re.search(r"peak memory ADT / FT\s+[0-9.]+", out)
    forwards = float(re.search(r"denoiser forwards per iteration\s+([0-9.]+)", out).group(1))
    assert 1.0 <= forwards <= 4.0  # a rollout runs 1..4 steps of a 4-step schedule


def test_bench_rejects_unknown_models():
    with pytest.raises(SystemExit):
        main(["bench", "--model", "sd9"])


def test_bench_counts_what_one_generator_update_costs_with_the_cheaper_modes(capsys):
    """A discriminator step on the buffered rollout between generator steps costs no denoiser
    call: with H = 2 one generator update costs one rollout, not two (compute is counted by
    the strategy, so these figures are exact, not timed)."""
    common = ["bench", "--threads", "1", "--steps", "4", "--cycles", "2", "--ft_steps", "1", "--batch", "2",
              "--guidance", "1", "--k", "3", "--g_every", "2"]

    def figures(*extra):
        assert main([*common, *extra]) == 0
        out = capsys.readouterr().out
        assert "tensors saved for backward in denoiser + decoder: 0 (goal 0)" in out
        update = float(re.search(r"one generator update\s+([0-9.]+)", out).group(1))
        adt = float(re.search(r"one ADT update\s+([0-9.]+)", out).group(1))
        return update, adt

    fresh, _ = figures("--rollout_buffer", "0", "--adt_every", "1")
    buffered, _ = figures("--rollout_buffer", "1", "--adt_every", "1")
    # no guidance, a 4-step schedule: a rollout of s in 1..4 steps is s forwards; a generator call
    # adds K' + 1 <= s graph backwards (2 each) and the uniform diffusion term (3): at most 15 / 3.
    # Fresh: a D-only rollout (>= 1) besides; buffered: the D-only call costs nothing.
    assert fresh >= (1 + 1 + 2 + 3) / 3 and buffered <= 15 / 3
    mixed, adt = figures("--rollout_buffer", "1", "--adt_every", "2")
    # one ADT update carries one FT step (3) and D-only calls (0) besides its own call
    assert adt == pytest.approx(2 * mixed, abs=0.11) and (1 + 2 + 3 + 3) / 3 <= adt <= (15 + 3) / 3
