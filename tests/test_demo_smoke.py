"""`adt demo` end to end on a tiny budget: every output exists and is well-formed.
(The FD comparison itself is a benchmark: `adt demo`, benchmarks/demo_study.py.)"""

import json
import math
from dataclasses import replace

import pytest

pytest.importorskip("sklearn")

import torch
from PIL import Image

from adt_plugin.cli import main
from adt_plugin.demo.cli import execute
from adt_plugin.demo.experiment import DEMO_ADT, DemoConfig
from adt_plugin.demo.metrics import SamplerSetting
from adt_plugin.demo.pretrain import PretrainConfig

TINY = DemoConfig(
    seeds=(0, 1),
    iters=2,
    batch=8,
    train_setting=SamplerSetting("ddim", 2, 2.0),
    other_settings=(SamplerSetting("ddim", 3, 1.0),),
    curve_points=1,
    eval_images=40,
    adt={**DEMO_ADT, "at_steps": 2},
    pretrain=PretrainConfig(unet_widths=(8, 16), base_iters=3, base_batch=16, featnet_iters=2, classifier_iters=2),
)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(threads)


def test_demo_writes_every_output(tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    execute(TINY, out, cache_dir=tmp_path / "cache", progress=False)
    printed = capsys.readouterr().out
    assert "the setting trained for" in printed and "equal compute: ADT - FT" in printed

    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    arms = ("base", "ft", "adt", "ip", "at", "ft+eps", "ft@C", "ip@C", "at@C", "ft@C+eps")
    assert TINY.arms == arms
    assert sorted((r["arm"], r["seed"]) for r in runs) == sorted((a, seed) for a in arms for seed in (0, 1))
    by = {(r["arm"], r["seed"]): r for r in runs}
    for r in runs:
        assert set(r["metrics"]) == {"ddim-2-cfg2", "ddim-3-cfg1"}
        values = [v for m in r["metrics"].values() for v in m.values()] + [r["diff_loss"]]
        assert all(math.isfinite(v) for v in values)
        if r["strategy"] != "base":
            assert r["settings"]["strategy"] == r["strategy"] and r["cost"]["forward_equiv"] > 0
        if r["arm"] in ("ft", "adt", "ip", "at"):
            assert [p["iter"] for p in r["curve"]] == [2] and r["iterations"] == 2
    assert r["settings"]["guidance_scale"] == 2.0 and r["settings"]["num_inference_steps"] == 2
    for seed in (0, 1):
        # equal compute: each runs until it has spent what ADT spent, and not a step more
        spent = by["adt", seed]["cost"]["forward_equiv"]
        for name, per_step in (("ft", 3.0), ("ip", 3.0), ("at", 2 + 2 * 2 + 2 * 1)):
            run = by[name + "@C", seed]
            assert run["budget_forward_equiv"] == spent
            assert spent <= run["cost"]["forward_equiv"] < spent + per_step
            assert run["iterations"] == math.ceil(spent / per_step) and run["curve"][-1]["forward_equiv"] == run["cost"]["forward_equiv"]
        # epsilon scaling: the same weights, sampled with a factor picked on the fine-tuning images
        eps = by["ft@C+eps", seed]["eps_scaling"]
        assert set(eps["factors"]) == {"ddim-2-cfg2", "ddim-3-cfg1"} and set(eps["factors"].values()) <= {1.0, *TINY.eps_factors}
        assert by["ft@C+eps", seed]["diff_loss"] == by["ft@C", seed]["diff_loss"]
    paired = results["summary"]["paired"]
    assert list(paired) == ["adt-ft@C", "adt-ft@C+eps", "adt-ft"]
    assert set(paired["adt-ft@C"]["ddim-2-cfg2"]["fd_pixel"]["per_seed"]) == {"0", "1"}
    assert results["summary"]["cost"]["ft@C"]["forward_equiv"]["mean"] >= results["summary"]["cost"]["adt"]["forward_equiv"]["mean"]
    assert results["splits"] == {"base": 898, "target_train": 540, "target_test": 359}

    table = (out / "table.md").read_text()
    assert table.startswith("# adt demo results") and "| adt |" in table and "| ft@C |" in table
    assert table.index("equal compute") < table.index("equal iterations")  # the headline first
    grid = Image.open(out / "samples.png")
    assert grid.format == "PNG" and grid.width > 11 * 128 and grid.height > 10 * 32  # 10 arms + held-out, 10 digits
    assert Image.open(out / "curves.png").format == "PNG"

    # the second run reuses the cached networks
    execute(replace(TINY, strategies=("base",)), tmp_path / "again", cache_dir=tmp_path / "cache", progress=False)
    assert json.loads((tmp_path / "again" / "results.json").read_text())["pretrain_cached"] == {
        "base": True, "featnet": True, "classifier": True
    }


def test_demo_command_line_rejects_bad_settings_before_training(capsys):
    with pytest.raises(SystemExit, match="unknown key 'lamda_diff'; did you mean 'lambda_diff'"):
        main(["demo", "--set", "lamda_diff=1", "--out", "unused"])
    with pytest.raises(SystemExit, match="--train-setting expects SAMPLER,STEPS,CFG"):
        main(["demo", "--train-setting", "ddim4", "--out", "unused"])
    with pytest.raises(SystemExit, match="unknown strategies"):
        main(["demo", "--strategies", "gan", "--out", "unused"])


def test_worker_processes_give_the_same_results_as_one_process(tmp_path, one_thread):
    from adt_plugin.demo.data import make_splits
    from adt_plugin.demo.experiment import run_demo
    from adt_plugin.demo.pretrain import ModelCache, pretrain

    cfg = replace(TINY, strategies=("base", "ft", "adt"), eps_factors=(1.0, 1.01))
    splits = make_splits()
    pre = pretrain(splits, cfg.pretrain, ModelCache(tmp_path / "cache"), progress=False)
    one, one_samples = run_demo(cfg, splits, pre, workers=1)
    two, two_samples = run_demo(cfg, splits, pre, workers=2)
    assert [(r["arm"], r["seed"]) for r in two] == [(r["arm"], r["seed"]) for r in one]
    assert {r["arm"] for r in one} == {"base", "ft", "adt", "ft+eps", "ft@C", "ft@C+eps"}
    for a, b in zip(one, two):
        assert a["metrics"] == b["metrics"] and a["curve"] == b["curve"] and a["diff_loss"] == b["diff_loss"]
        assert a.get("cost") == b.get("cost") and a.get("eps_scaling") == b.get("eps_scaling")
    for seed in cfg.seeds:
        for name in cfg.arms:
            for key, images in one_samples[seed][name].items():
                assert torch.equal(images, two_samples[seed][name][key])
