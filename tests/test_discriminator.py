"""Discriminator: Eq. 6 score, EMA twins, augmentation, hinge losses, both variants."""

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_dinov2

from adt_plugin import AdtSettings
from adt_plugin.augment import color, cutout, diff_augment, parse_policy, translation
from adt_plugin.discriminator import ProjectedDiscriminator, SiameseDiscriminator
from adt_plugin.losses import hinge_d_loss, hinge_g_loss


def disc_config(kind="siamese", channels=64, **kw):
    """The discriminator's part of AdtSettings (the defaults live there only)."""
    return AdtSettings(discriminator=kind, head_channels=channels, **kw).discriminator_config()


def make_disc(**kw):
    cfg = disc_config(taps=(1, 3), channels=8, **kw)
    return SiameseDiscriminator(tiny_dinov2(), cfg)


def test_backbone_taps_give_patch_tokens():
    backbone = tiny_dinov2(taps=(0, 3))
    feats = backbone(torch.randn(2, 3, 16, 16))
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16), (2, 32, 16)]  # CLS dropped, 4x4 patches
    assert not any(p.requires_grad for p in backbone.parameters())
    with pytest.raises(ValueError, match=r"taps \[7\] are outside this model's 4 blocks"):
        tiny_dinov2(taps=(1, 7))


def test_score_is_cosine_of_predictor_head_vs_twin_eq6():
    torch.manual_seed(0)
    disc = make_disc(augment="")
    f_gen = [torch.randn(3, 32, 16) for _ in range(2)]
    f_ref = [torch.randn(3, 32, 16) for _ in range(2)]
    scores = disc.scores(f_gen, disc.reference(f_ref))
    for i in range(2):
        z_i = disc.predictors[i](disc.heads[i](f_gen[i])).flatten(1)
        z_r = disc.twins[i](f_ref[i]).flatten(1)
        by_hand = (z_i * z_r).sum(1) / (z_i.norm(dim=1) * z_r.norm(dim=1))
        torch.testing.assert_close(scores[i], by_hand)
        assert scores[i].shape == (3,) and scores[i].abs().max() <= 1 + 1e-6


def test_mean_pooling_scores_token_averages():
    torch.manual_seed(0)
    disc = make_disc(augment="", pool="mean")
    f = [torch.randn(2, 32, 16) for _ in range(2)]
    s = disc.scores(f, disc.reference(f))
    z = disc.predictors[0](disc.heads[0](f[0])).mean(2)
    zr = disc.twins[0](f[0]).mean(2)
    torch.testing.assert_close(s[0], F.cosine_similarity(z, zr, dim=1))


def test_twins_get_no_gradient_and_follow_ema_exactly():
    torch.manual_seed(0)
    disc = make_disc(tau=0.9)
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    ref = disc.reference(disc.features(real, gen))
    loss = hinge_d_loss(disc.scores(disc.features(real, gen), ref), disc.scores(disc.features(fake, gen), ref))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in disc.twins.parameters())
    assert all(p.grad is not None for p in disc.heads.parameters())
    torch.optim.SGD(disc.trainable_parameters(), lr=0.5).step()
    before = {k: v.clone() for k, v in disc.twins.state_dict().items()}
    heads = disc.heads.state_dict()
    disc.update_twins()
    for key, value in disc.twins.state_dict().items():
        if value.is_floating_point():
            expected = 0.9 * before[key].double() + 0.1 * heads[key].double()
            torch.testing.assert_close(value.double(), expected, rtol=0, atol=4e-7)  # float32 rounding only
        else:
            assert torch.equal(value, heads[key])
    assert any(not torch.equal(before[k], v) for k, v in disc.twins.state_dict().items())


def test_hinge_losses_match_hand_values():
    real = [torch.tensor([0.5, -0.2])]
    fake = [torch.tensor([0.3, -1.5])]
    # D: mean(relu(1-0.5), relu(1+0.2)) + mean(relu(1+0.3), relu(1-1.5)) = 0.85 + 0.65
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(1.5))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor(0.6))
    # taps are summed
    torch.testing.assert_close(hinge_d_loss(real * 2, fake * 2), torch.tensor(3.0))


def test_gradient_reaches_pixels_through_augmentation_resize_and_backbone():
    torch.manual_seed(0)
    disc = make_disc()
    pixels = (torch.rand(2, 3, 24, 24) * 2 - 1).requires_grad_(True)  # resized to 16 inside
    ref = disc.reference(disc.features(torch.rand(2, 3, 24, 24), torch.Generator().manual_seed(1)))
    hinge_g_loss(disc.scores(disc.features(pixels, torch.Generator().manual_seed(2)), ref)).backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


@pytest.mark.parametrize("op", [color, translation, cutout])
def test_each_augmentation_is_differentiable_and_seeded(op):
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    a = op(x, torch.Generator().manual_seed(5))
    b = op(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, op(x, torch.Generator().manual_seed(6)))
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_translation_shifts_and_pads_with_zeros():
    x = torch.arange(1, 65, dtype=torch.float).view(1, 1, 8, 8)
    out = translation(x, torch.Generator().manual_seed(0), ratio=0.25)
    # find the integer shift that reproduces the output
    matches = []
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            ref = torch.zeros_like(x)
            src = x[0, 0]
            for r in range(8):
                for c in range(8):
                    rr, cc = r + dy, c + dx
                    if 0 <= rr < 8 and 0 <= cc < 8:
                        ref[0, 0, r, c] = src[rr, cc]
            matches.append(torch.equal(ref, out))
    assert sum(matches) == 1


def test_cutout_zeroes_a_half_size_square():
    out = cutout(torch.ones(3, 1, 16, 16), torch.Generator().manual_seed(0))
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert ((zeros > 0) & (zeros <= 64)).all()


def test_policy_validation():
    assert parse_policy("color, cutout") == ("color", "cutout")
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_policy("color,blur")
    assert torch.equal(diff_augment(torch.ones(1, 3, 4, 4), (), torch.Generator()), torch.ones(1, 3, 4, 4))


def test_projected_variant_scores_per_token_and_needs_no_reference():
    torch.manual_seed(0)
    disc = ProjectedDiscriminator(tiny_dinov2(), disc_config(kind="projected", taps=(1, 3), channels=8))
    feats = disc.features(torch.rand(2, 3, 16, 16), torch.Generator())
    scores = disc.scores(feats)
    assert disc.needs_reference is False and [tuple(s.shape) for s in scores] == [(2, 16), (2, 16)]
    assert not hasattr(disc, "twins")


def test_frozen_context_builds_no_discriminator_gradient():
    torch.manual_seed(0)
    disc = make_disc(augment="")
    pixels = torch.rand(1, 3, 16, 16, requires_grad=True)
    feats = disc.features(pixels, torch.Generator())
    with disc.frozen():
        loss = hinge_g_loss(disc.scores(feats, disc.reference(feats)))
    loss.backward()
    assert all(p.grad is None for p in disc.trainable_parameters())
    assert all(p.requires_grad for p in disc.trainable_parameters())
    assert pixels.grad is not None
