"""ip and at: how the input is perturbed and what the target is, for every prediction type."""

import math

import pytest
import torch
from tiny import DDPM_CONFIG, FLOW_CONFIG, TinyAdapter, TinyDenoiser

from adt_plugin import AdtSettings, TrainBatch, build_strategy
from adt_plugin.noise import NoiseSchedule
from adt_plugin.strategies.at import AtStrategy, ascend, project_to_ball
from adt_plugin.strategies.ip import IpStrategy

CONFIGS = [
    (DDPM_CONFIG, "epsilon"),
    ({**DDPM_CONFIG, "prediction_type": "v_prediction"}, "v"),
    (FLOW_CONFIG, "flow"),
]


class RecordingAdapter(TinyAdapter):
    """Keeps every input the denoiser saw."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inputs = []

    def denoise(self, sample, timestep, cond):
        self.inputs.append(sample.detach().clone())
        return super().denoise(sample, timestep, cond)


def batch(n=3):
    gen = torch.Generator().manual_seed(11)
    return TrainBatch(x0=torch.randn(n, 4, 8, 8, generator=gen), cond={"labels": torch.arange(n) % 3})


def target_for(kind, x0, noise, a, s):
    return {"epsilon": noise, "v": a * noise - s * x0, "flow": noise - x0}[kind]


def levels(config, t):
    alpha, sigma = NoiseSchedule(config).alpha_sigma(t)
    return alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)


@pytest.mark.parametrize("config,kind", CONFIGS)
def test_ip_input_has_extra_noise_and_target_keeps_the_original_noise(config, kind):
    torch.manual_seed(0)
    net = TinyDenoiser()
    model = RecordingAdapter(net, config)
    strategy = build_strategy(AdtSettings(strategy="ip", ip_gamma=0.3, seed=5), config)
    assert isinstance(strategy, IpStrategy)
    b = batch()
    out = strategy(model, b)
    gen = torch.Generator().manual_seed(5)
    t = NoiseSchedule(config).sample_timesteps(3, gen)
    noise = torch.randn(b.x0.shape, generator=gen)
    extra = torch.randn(b.x0.shape, generator=gen)
    a, s = levels(config, t)
    x_t = a * b.x0 + s * (noise + 0.3 * extra)
    torch.testing.assert_close(model.inputs[0], x_t)
    expected = torch.nn.functional.mse_loss(net(x_t, t, b.cond["labels"]), target_for(kind, b.x0, noise, a, s))
    torch.testing.assert_close(out.loss, expected)
    assert out.updates_generator and out.loss.grad_fn is not None


def test_ip_with_gamma_zero_is_ft():
    losses = []
    for name in ("ft", "ip"):
        torch.manual_seed(0)
        model = TinyAdapter(TinyDenoiser())
        strategy = build_strategy(AdtSettings(strategy=name, ip_gamma=0.0, seed=2), DDPM_CONFIG)
        losses.append(strategy(model, batch()).loss)
    # ip draws one more tensor after t and noise, so the first call matches exactly
    torch.testing.assert_close(losses[0], losses[1])


def test_ascent_stays_in_the_ball_and_increases_the_loss():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 5, 5, generator=gen)
    weight = torch.randn(50, 50, generator=gen).requires_grad_(True)  # stands in for the model's parameters

    def loss_fn(delta):
        return ((x + delta).flatten(1) @ weight).pow(2).mean()

    epsilon, step = 0.05, 0.02
    replays = ascend(loss_fn, x, steps=6, epsilon=epsilon, step_size=step)
    radius = epsilon * math.sqrt(50)
    norms = [d.flatten(1).norm(dim=1) for d, _ in replays]
    assert torch.count_nonzero(norms[0]) == 0  # the first replay is the clean loss
    assert all((n <= radius * (1 + 1e-5)).all() for n in norms)
    assert torch.allclose(norms[-1], torch.full((4,), radius), rtol=1e-5)  # 5 steps of 0.02 leave a 0.05 ball
    losses = [float(l.detach()) for _, l in replays]
    assert all(b > a for a, b in zip(losses, losses[1:]))
    assert all(l.grad_fn is not None for _, l in replays)


def test_project_to_ball_only_shrinks():
    d = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    torch.testing.assert_close(project_to_ball(d, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


@pytest.mark.parametrize("config,kind", CONFIGS)
def test_at_target_is_corrected_to_match_the_perturbed_input(config, kind):
    torch.manual_seed(0)
    net = TinyDenoiser()
    model = RecordingAdapter(net, config)
    strategy = build_strategy(
        AdtSettings(strategy="at", at_steps=3, at_epsilon=0.2, at_step_size=0.1, seed=4), config
    )
    assert isinstance(strategy, AtStrategy)
    b = batch()
    out = strategy(model, b)
    gen = torch.Generator().manual_seed(4)
    t = NoiseSchedule(config).sample_timesteps(3, gen)
    noise = torch.randn(b.x0.shape, generator=gen)
    a, s = levels(config, t)
    x_t = a * b.x0 + s * noise
    assert len(model.inputs) == 3
    torch.testing.assert_close(model.inputs[0], x_t)
    losses = []
    for seen in model.inputs:
        delta = seen - x_t
        assert float(delta.flatten(1).norm(dim=1).max()) <= 0.2 * math.sqrt(256) * (1 + 1e-4)
        # the perturbed input is exactly x0 noised with the corrected noise
        corrected = noise + delta / s
        torch.testing.assert_close(seen, a * b.x0 + s * corrected, rtol=1e-5, atol=1e-5)
        pred = net(seen, t, b.cond["labels"])
        losses.append(torch.nn.functional.mse_loss(pred, target_for(kind, b.x0, corrected, a, s)))
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)
    assert losses[1] > losses[0]  # the perturbation ascends the loss
    assert out.logs["at/delta_rms"] > 0
    out.loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_at_with_one_replay_is_ft():
    losses = []
    for name in ("ft", "at"):
        torch.manual_seed(0)
        model = TinyAdapter(TinyDenoiser())
        strategy = build_strategy(AdtSettings(strategy=name, at_steps=1, seed=9), DDPM_CONFIG)
        losses.append(strategy(model, batch()).loss)
    torch.testing.assert_close(losses[0], losses[1])


def test_ip_and_at_settings_are_validated():
    from adt_plugin import SettingsError

    with pytest.raises(SettingsError, match="at_steps must be >= 1"):
        AdtSettings(strategy="at", at_steps=0)
    with pytest.raises(SettingsError, match="ip_gamma must be >= 0"):
        AdtSettings(strategy="ip", ip_gamma=-0.1)
