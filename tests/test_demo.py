"""The demo's pieces: splits, the shift, metrics, the cache, the adapter and feature net."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from adt_plugin import AdtSettings, ModelAdapter
from adt_plugin.demo.data import italic, load_digit_images, make_splits, stratified_split
from adt_plugin.demo.metrics import frechet_distance
from adt_plugin.demo.models import NULL_LABEL, DigitFeatureNet, DigitsAdapter, build_unet
from adt_plugin.demo.pretrain import ModelCache, drop_labels
from adt_plugin.demo.report import summarize
from adt_plugin.discriminator import SiameseDiscriminator


def disc_config(kind="siamese", channels=64, **kw):
    """The discriminator's part of AdtSettings (the defaults live there only)."""
    return AdtSettings(discriminator=kind, head_channels=channels, **kw).discriminator_config()


def test_digits_load_in_range():
    x, y = load_digit_images()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0


def test_stratified_split_keeps_class_shares_and_is_seeded():
    labels = torch.arange(100) % 4
    a, b = stratified_split(labels, 0.3, torch.Generator().manual_seed(1))
    assert len(set(a.tolist()) & set(b.tolist())) == 0 and len(a) + len(b) == 100
    assert torch.bincount(labels[a]).tolist() == [8, 8, 8, 8]  # round(0.3 * 25) per class
    a2, _ = stratified_split(labels, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(a, a2)
    with pytest.raises(ValueError, match="fraction must be in"):
        stratified_split(labels, 1.0, torch.Generator())


def test_splits_are_disjoint_stratified_and_only_the_target_is_shifted():
    s = make_splits()
    idx = s.indices
    parts = [set(idx[k].tolist()) for k in ("base", "target_train", "target_test")]
    assert sum(map(len, parts)) == 1797 and len(parts[0] | parts[1] | parts[2]) == 1797
    assert s.sizes() == {"base": 898, "target_train": 540, "target_test": 359}
    for y in (s.base_y, s.train_y, s.test_y):  # every class present in every split, in proportion
        counts = torch.bincount(y, minlength=10).float()
        assert counts.min() / counts.max() > 0.9
    x, _ = load_digit_images()
    assert torch.equal(s.base_x, x[idx["base"]])
    assert torch.allclose(s.test_x, italic(x[idx["target_test"]]))
    assert not torch.allclose(s.test_x, x[idx["target_test"]], atol=0.1)


def test_italic_slants_right_and_thins_the_ink():
    img = -torch.ones(1, 1, 8, 8)
    img[0, 0, :, 3] = 1.0  # a vertical stroke
    out = italic(img)
    cols = torch.arange(8.0)
    ink = (out[0, 0] + 1) / 2

    def centre(row):
        return float((ink[row] * cols).sum() / ink[row].sum())

    assert centre(0) > centre(7) + 1.0  # top leans right: "/"
    assert out.min() >= -1 and out.max() <= 1
    identity = italic(img, shear=0.0, ink_gamma=1.0)
    torch.testing.assert_close(identity, img, atol=1e-6, rtol=0)
    half = torch.zeros(1, 1, 8, 8)  # ink 0.5 -> 0.5 ** 1.5
    torch.testing.assert_close(italic(half, shear=0.0), torch.full_like(half, 0.5**1.5 * 2 - 1), atol=1e-6, rtol=0)


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    shift = np.arange(5.0)
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-8)
    b = rng.normal(size=(300, 5)) * 2.0
    from scipy import linalg

    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, b[:, :3])


def test_drop_labels_uses_the_null_label_at_the_given_rate():
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = drop_labels(labels, 0.1, torch.Generator().manual_seed(0))
    share = float((dropped == NULL_LABEL).float().mean())
    assert 0.09 < share < 0.11 and set(dropped.tolist()) == {0, NULL_LABEL}


def test_adapter_is_a_model_adapter_and_the_feature_net_plugs_into_the_discriminator():
    torch.manual_seed(0)
    adapter = DigitsAdapter(build_unet())
    assert isinstance(adapter, ModelAdapter)
    labels = torch.tensor([3, 7])
    assert adapter.uncond({"labels": labels})["labels"].tolist() == [NULL_LABEL, NULL_LABEL]
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    assert adapter.denoise(x, torch.tensor([10, 500]), {"labels": labels}).shape == (2, 1, 8, 8)
    net = DigitFeatureNet().freeze()
    feats = net(torch.zeros(2, 1, 8, 8))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 64), (2, 64, 16)] and net.feature_channels == [32, 64]
    disc = SiameseDiscriminator(net, disc_config(taps=(0, 1), channels=8))
    gen = torch.Generator().manual_seed(0)
    scores = disc.scores(disc.features(adapter.decode(x), gen), disc.reference(disc.features(x.detach(), gen)))
    sum(s.mean() for s in scores).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradients reach the pixels through the backbone
    assert all(p.grad is None for p in net.parameters())


def test_cache_reuses_and_invalidates_on_a_settings_change(tmp_path):
    cache = ModelCache(tmp_path)
    builds = []

    def build():
        builds.append(1)
        return {"w": torch.ones(2) * len(builds)}

    first, hit = cache.get_or_build("base", {"iters": 10}, build)
    again, hit2 = cache.get_or_build("base", {"iters": 10}, build)
    assert (hit, hit2) == (False, True) and torch.equal(first["w"], again["w"]) and len(builds) == 1
    other, hit3 = cache.get_or_build("base", {"iters": 11}, build)
    assert not hit3 and len(builds) == 2 and cache.path("base", {"iters": 10}) != cache.path("base", {"iters": 11})
    cache.path("base", {"iters": 10}).write_bytes(b"not a safetensors file")
    _, hit4 = cache.get_or_build("base", {"iters": 10}, build)
    assert not hit4 and len(builds) == 3  # a damaged file is rebuilt, not trusted
    off = ModelCache(tmp_path / "off", enabled=False)
    off.get_or_build("base", {"iters": 10}, build)
    assert not (tmp_path / "off").exists()


def test_summary_statistics_and_paired_differences():
    def rec(arm, seed, fd, spent=3.0):
        return {"strategy": arm.split("@")[0], "arm": arm, "seed": seed, "diff_loss": fd / 10, "train_seconds": 1.0,
                "iterations": 2, "cost": {"forward_equiv": spent, "ft_steps": spent / 3},
                "metrics": {"k": {"fd_pixel": fd, "fd_feature": 2 * fd, "accuracy": 0.5}}}

    records = [rec("ft", 0, 3.0), rec("ft", 1, 5.0), rec("adt", 0, 2.0, 9.0), rec("adt", 1, 6.0, 9.0),
               rec("ft@C", 0, 1.0, 9.0), rec("ft@C", 1, 7.0, 9.0)]
    s = summarize(records, ["k"], ["ft", "adt", "ft@C", "ip"])  # ip: not run, left out
    ft = s["settings"]["k"]["ft"]["fd_pixel"]
    assert ft["mean"] == 4.0 and ft["std"] == pytest.approx(2**0.5) and ft["values"] == [3.0, 5.0]
    assert list(s["paired"]) == ["adt-ft@C", "adt-ft"] and "ip" not in s["settings"]["k"]
    paired = s["paired"]["adt-ft"]["k"]["fd_pixel"]
    assert paired["per_seed"] == {"0": -1.0, "1": 1.0} and paired["adt_better_seeds"] == 1
    assert s["paired"]["adt-ft@C"]["k"]["fd_pixel"]["per_seed"] == {"0": 1.0, "1": -1.0}
    assert s["paired"]["adt-ft"]["heldout"]["diff_loss"]["per_seed"]["0"] == pytest.approx(-0.1)
    assert s["cost"]["ft@C"]["forward_equiv"]["mean"] == 9.0 and s["cost"]["ft"]["ft_steps"]["mean"] == 1.0
    json.dumps(s)  # serialisable as is


def test_the_learning_rate_follows_the_share_of_the_budget_spent():
    from adt_plugin.demo.experiment import DemoConfig, lr_factor

    cfg = DemoConfig()
    assert lr_factor(cfg, 0.0) == 1.0 and lr_factor(cfg, 0.5) == pytest.approx(0.5) and lr_factor(cfg, 1.2) == 0.0


def test_epsilon_scaling_divides_the_guided_prediction():
    from adt_plugin.adapter import guided_denoise
    from adt_plugin.demo.experiment import EpsScaled
    from adt_plugin.demo.models import DigitsAdapter, build_unet

    torch.manual_seed(0)
    model = DigitsAdapter(build_unet((8, 16)))
    x, t, cond = torch.randn(3, 1, 8, 8), torch.full((3,), 500), {"labels": torch.tensor([1, 2, 10])}
    with torch.no_grad():
        plain, _ = guided_denoise(model, x, t, cond, model.uncond(cond), 2.0)
        scaled, _ = guided_denoise(EpsScaled(model, 1.02), x, t, cond, model.uncond(cond), 2.0)
    torch.testing.assert_close(scaled, plain / 1.02)
