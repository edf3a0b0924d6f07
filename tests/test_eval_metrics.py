"""Metric math and loaders (adt_plugin.eval) on CPU with tiny random networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adt_plugin.eval.aesthetic import AestheticHead, load_aesthetic_head
from adt_plugin.eval.clip import embedding_of, load_clip
from adt_plugin.eval.features import InceptionFeatures, load_dinov2_features
from adt_plugin.eval.frechet import GaussianStats, frechet_distance, frechet_distance_of, kernel_inception_distance
from adt_plugin.eval.inception import FidInceptionV3, load_fid_inception
from adt_plugin.eval.scores import ScoreTable, win_rate
from adt_plugin.eval.weights import WeightsNotFound, find_weights
from tiny_eval import tiny_clip_folder, tiny_dinov2_folder


def test_frechet_distance_matches_scipy_sqrtm():
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 6, generator=g, dtype=torch.float64)
    b = torch.randn(50, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.5
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance_of(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance_of(b, a) == pytest.approx(expected, rel=1e-8)
    assert abs(frechet_distance_of(a, a)) < 1e-9


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    mean = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    var_a = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)
    var_b = torch.tensor([4.0, 1.0, 9.0], dtype=torch.float64)
    a = GaussianStats(torch.zeros(3, dtype=torch.float64), torch.diag(var_a), 100)
    b = GaussianStats(mean, torch.diag(var_b), 100)
    expected = float((mean**2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_is_finite_for_fewer_images_than_dimensions():
    g = torch.Generator().manual_seed(1)
    value = frechet_distance_of(torch.randn(5, 32, generator=g), torch.randn(7, 32, generator=g))
    assert math.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance_of(torch.randn(1, 4), torch.randn(3, 4))


def _naive_unbiased_mmd(x, y):
    d = x.shape[1]
    k = lambda u, v: (float(u @ v) / d + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randn(9, 4, generator=g, dtype=torch.float64) + 0.7
    one = kernel_inception_distance(x, y, subsets=1, subset_size=9)  # one subset = a permutation of all rows
    assert one.mean == pytest.approx(_naive_unbiased_mmd(x, y), rel=1e-9) and one.std == 0.0
    far = kernel_inception_distance(x, y + 3, subsets=20, subset_size=5)
    near = kernel_inception_distance(x, x.flip(0), subsets=20, subset_size=5)
    assert far.mean > near.mean and far.subset_size == 5
    assert kernel_inception_distance(x, y, subsets=5, subset_size=5, seed=3) == kernel_inception_distance(x, y, subsets=5, subset_size=5, seed=3)


def test_fid_inception_has_the_pytorch_fid_layout_and_loads_its_file(tmp_path):
    torch.manual_seed(0)
    net = FidInceptionV3()
    state = net.state_dict()
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state["fc.weight"].shape == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k in state)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    loaded = InceptionFeatures(load_fid_inception(path))
    assert all(torch.equal(v, loaded.net.state_dict()[k]) for k, v in state.items() if "num_batches" not in k)
    features = loaded([torch.rand(3, 40, 30)])  # any size: each image is resized to 299
    assert features.shape == (1, 2048) and torch.isfinite(features).all()
    assert "299" in loaded.description and "bilinear" in loaded.description


def test_fid_inception_loader_names_the_file_and_where_to_get_it(tmp_path):
    with pytest.raises(WeightsNotFound, match=r"pt_inception-2015-12-05-6726825d\.pth.*github\.com/mseitzer/pytorch-fid"):
        load_fid_inception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(WeightsNotFound, match="is not the FID Inception weights file"):
        load_fid_inception(wrong)


def test_dinov2_features_are_the_cls_token_of_a_local_folder(tmp_path):
    folder = tiny_dinov2_folder(tmp_path / "dinov2-small")
    assert load_dinov2_features(folder).input_size == 224  # FD-DINOv2's resolution
    features = load_dinov2_features(folder, input_size=28)
    images = torch.rand(3, 3, 20, 20)
    out = features(images)
    assert out.shape == (3, 32)
    from adt_plugin.backbones import IMAGENET_MEAN, IMAGENET_STD
    from adt_plugin.eval.images import normalize, resize

    pixels = normalize(resize(images, 28), IMAGENET_MEAN, IMAGENET_STD)
    cls = features.model(pixel_values=pixels).last_hidden_state[:, 0]  # transformers applies the final norm
    assert torch.allclose(out, cls, atol=1e-5) and not torch.allclose(out[0], out[1])
    with pytest.raises(WeightsNotFound, match="nowhere.*dinov2-large.*hf download facebook/dinov2-large"):
        load_dinov2_features(tmp_path / "nowhere")


def test_clip_score_is_100_times_the_clamped_cosine(tmp_path):
    clip = load_clip(tiny_clip_folder(tmp_path / "clip-vit-large-patch14"))
    images = torch.rand(2, 3, 24, 32)
    emb = clip.image_embeddings(images)
    assert emb.shape == (2, 8) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    prompts = ["a cat", "a dog 7"]
    scores = clip.clip_scores(emb, prompts)
    text = clip.text_embeddings(prompts)
    expected = 100 * torch.clamp((emb * text).sum(-1), min=0)
    assert torch.allclose(scores, expected) and ((scores >= 0) & (scores <= 100)).all()
    assert "16" in clip.description and "centre crop" in clip.description


def test_embedding_of_takes_tensors_and_transformers_5_output_objects():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    t = torch.randn(2, 4)
    assert embedding_of(t) is t  # transformers 4.5x
    assert embedding_of(BaseModelOutputWithPooling(last_hidden_state=torch.zeros(2, 3, 4), pooler_output=t)) is t  # 5.x
    with pytest.raises(TypeError):
        embedding_of(object())


def test_clip_loader_says_what_folder_it_needs(tmp_path):
    with pytest.raises(WeightsNotFound, match="clip-vit-large-patch14"):
        load_clip(tmp_path / "missing")


def test_aesthetic_head_loads_the_published_layout(tmp_path):
    torch.manual_seed(0)
    head = AestheticHead(embed_dim=8)
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), path)
    loaded = load_aesthetic_head(path)
    x = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    manual = x
    for i in (0, 2, 4, 6, 7):  # linear layers only: the published head has no activations
        manual = manual @ head.state_dict()[f"layers.{i}.weight"].T + head.state_dict()[f"layers.{i}.bias"]
    assert torch.allclose(loaded(x), manual.squeeze(-1), atol=1e-6)
    with pytest.raises(ValueError, match="768|8-d"):
        loaded(torch.randn(1, 5))
    save_file({"layers.0.weight": torch.zeros(4, 8)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsNotFound, match="does not fit"):
        load_aesthetic_head(tmp_path / "bad.safetensors")
    with pytest.raises(WeightsNotFound, match=r"improved-aesthetic-predictor"):
        load_aesthetic_head(tmp_path / "missing.pth")


def test_hps_without_open_clip_is_a_clear_message(tmp_path):
    from adt_plugin.eval import hps

    try:
        import open_clip  # noqa: F401
    except Exception:  # noqa: BLE001
        pass
    else:
        pytest.skip("open_clip is importable here")
    with pytest.raises(hps.HpsUnavailable, match=r"adt-plugin\[metrics\]"):
        hps.load_hps(tmp_path / "HPS_v2.1_compressed.pt")


def test_find_weights_uses_the_standard_names(tmp_path):
    assert find_weights("aesthetic", [tmp_path]) is None
    (tmp_path / "sac+logos+ava1-l14-linearMSE.pth").write_bytes(b"x")
    assert find_weights("aesthetic", [tmp_path / "nope", tmp_path]) == tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    (tmp_path / "dinov2-small").mkdir()
    assert find_weights("dinov2", [tmp_path]) is None  # a folder counts only with its config.json
    (tmp_path / "dinov2-small" / "config.json").write_text("{}")
    assert find_weights("dinov2", [tmp_path]).name == "dinov2-small"


def test_win_rate_counts_ties_half_per_prompt():
    a = {(0, 0): 1.0, (0, 1): 3.0, (1, 0): 2.0, (2, 0): 5.0, (3, 0): 9.0}
    b = {(0, 0): 2.0, (0, 1): 2.0, (1, 0): 1.0, (2, 0): 6.0}  # prompt 3 only in a: not counted
    w = win_rate(a, b)  # prompt 0: mean 2 vs 2 -> tie; 1: win; 2: loss
    assert (w.wins, w.ties, w.losses, w.prompts) == (1, 1, 1, 3) and w.rate == pytest.approx(0.5)
    lower = win_rate(a, b, higher_is_better=False)
    assert (lower.wins, lower.ties, lower.losses) == (1, 1, 1)
    assert math.isnan(win_rate({}, b).rate)


def test_score_table_summaries_merge_and_json_round_trip():
    t = ScoreTable()
    for seed, value in ((0, 1.0), (1, 3.0)):
        t.add("clip", "base", 0, seed, value)
    t.add("clip", "adt", 0, 0, 4.0)
    s = t.summary("clip", "base")
    assert (s.mean, s.count) == (2.0, 2) and s.std == pytest.approx(math.sqrt(2))
    other = ScoreTable()
    other.add("aesthetic", "adt", 0, 0, 6.0)
    merged = t.merged(other)
    assert merged.metrics() == ["clip", "aesthetic"] and t.metrics() == ["clip"]
    assert ScoreTable.from_json(merged.to_json()).values == merged.values
    assert t.win_rate("clip", "adt", "base").rate == 1.0


def test_discriminator_score_loads_a_checkpoint_and_scores_without_augmentation(tmp_path):
    from tiny import DDPM_CONFIG, tiny_dinov2

    from adt_plugin import AdtSettings, build_strategy
    from adt_plugin.checkpoint import CheckpointMismatch, save_discriminator
    from adt_plugin.eval.disc_score import load_discriminator_scorer

    settings = AdtSettings(num_inference_steps=5, guidance_scale=2.0, taps=(1, 3), head_channels=8, d_lr=1e-3, g_every=2)
    torch.manual_seed(0)
    strategy = build_strategy(settings, DDPM_CONFIG, backbone=tiny_dinov2(taps=(1, 3)))
    path = save_discriminator(tmp_path / "lora.adt_disc.safetensors", strategy)

    torch.manual_seed(1)  # the scorer's fresh heads start from other random weights than the saved ones
    scorer = load_discriminator_scorer(path, backbone=tiny_dinov2(taps=(1, 3)))
    assert scorer.disc.policy == () and scorer.step == 0 and "step 0" in scorer.description
    trained = strategy.disc.state_for_checkpoint()
    assert all(torch.equal(v, scorer.disc.state_for_checkpoint()[k]) for k, v in trained.items())
    images = torch.rand(3, 3, 20, 20)
    scores = scorer.scores(images)
    assert scores.shape == (3,) and ((scores >= -1) & (scores <= 1)).all()
    assert torch.equal(scores, scorer.scores(images))  # deterministic
    disc = strategy.disc.eval()
    disc.policy = ()
    from adt_plugin.eval.images import resize

    features = disc.features(resize(images, 16) * 2 - 1, torch.Generator())
    manual = torch.stack(disc.scores(features, disc.reference(features))).mean(0)
    assert torch.allclose(scores, manual, atol=1e-6)
    one = images[:1]
    assert torch.allclose(scorer.scores(one, references=one), scorer.scores(one), atol=1e-6)
    against_two = scorer.scores(one, references=images[1:])
    assert against_two.shape == (1,)

    other = tiny_dinov2(taps=(1, 3))
    other.identity = "dinov2:384x12"
    with pytest.raises(CheckpointMismatch, match="backbone"):
        load_discriminator_scorer(path, backbone=other)


def test_evaluate_scores_what_it_can_and_says_what_it_skipped(tmp_path):
    from PIL import Image

    from adt_plugin.eval.suite import MetricWeights, evaluate

    class StandInHps:  # the HPSv2 scorer's interface (open_clip is not installed in the test environment)
        description = "stand-in HPS"

        def scores(self, images, prompts):
            return torch.tensor([float(len(p)) + image.mean() for image, p in zip(images, prompts)])

    generated = {}
    for model, shade in (("base", 40), ("adt", 200)):
        generated[model] = []
        for p in range(2):
            path = tmp_path / model / f"{p}.png"
            path.parent.mkdir(exist_ok=True)
            Image.new("RGB", (8, 8), (shade,) * 3).save(path)
            generated[model].append((p, 0, path))
    ticks = []
    result = evaluate(
        generated, ["a cat", "a dog"], MetricWeights(), reference_dir=None,
        progress=lambda label, total: (lambda n: ticks.append((label, n))), overrides={"hps": StandInHps},
    )
    assert result.table.metrics() == ["hps"] and result.table.win_rate("hps", "adt", "base").rate == 1.0
    assert result.descriptions["hps"] == "stand-in HPS" and ("HPSv2", 2) in ticks
    assert "no --ref folder" in result.skipped["fid"] and "clip-vit-large-patch14" in result.skipped["clip"]
    assert "sac+logos" in result.skipped["aesthetic"] or "clip-vit-large-patch14" in result.skipped["aesthetic"]
