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
    assert "the setting trained for" in printed and "ADT - FT" in printed

    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert sorted((r["strategy"], r["seed"]) for r in runs) == sorted(
        (s, seed) for s in ("base", "ft", "adt", "ip", "at") for seed in (0, 1)
    )
    for r in runs:
        assert set(r["metrics"]) == {"ddim-2-cfg2", "ddim-3-cfg1"}
        values = [v for m in r["metrics"].values() for v in m.values()] + [r["diff_loss"]]
        assert all(math.isfinite(v) for v in values)
        if r["strategy"] != "base":
            assert [p["iter"] for p in r["curve"]] == [2] and r["settings"]["strategy"] == r["strategy"]
    assert r["settings"]["guidance_scale"] == 2.0 and r["settings"]["num_inference_steps"] == 2
    paired = results["summary"]["paired"]["ddim-2-cfg2"]["fd_pixel"]
    assert set(paired["per_seed"]) == {"0", "1"} and paired["n"] == 2
    assert results["splits"] == {"base": 898, "target_train": 540, "target_test": 359}

    table = (out / "table.md").read_text()
    assert table.startswith("# adt demo results") and "| adt |" in table and "ADT - FT" in table
    grid = Image.open(out / "samples.png")
    assert grid.format == "PNG" and grid.width > 6 * 128 and grid.height > 10 * 32  # 5 strategies + held-out, 10 digits
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

    cfg = replace(TINY, strategies=("base", "ft", "adt"))
    splits = make_splits()
    pre = pretrain(splits, cfg.pretrain, ModelCache(tmp_path / "cache"), progress=False)
    one, one_samples = run_demo(cfg, splits, pre, workers=1)
    two, two_samples = run_demo(cfg, splits, pre, workers=2)
    assert [(r["strategy"], r["seed"]) for r in two] == [(r["strategy"], r["seed"]) for r in one]
    for a, b in zip(one, two):
        assert a["metrics"] == b["metrics"] and a["curve"] == b["curve"] and a["diff_loss"] == b["diff_loss"]
    for seed in cfg.seeds:
        for name in cfg.strategies:
            for key, images in one_samples[seed][name].items():
                assert torch.equal(images, two_samples[seed][name][key])
