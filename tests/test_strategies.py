"""Loss strategies: ft targets, adt iterations (D-only vs generator), warm-ups, settings."""

import pytest
import torch
from tiny import DDPM_CONFIG, FLOW_CONFIG, GraphAuditAdapter, TinyDenoiser, tiny_dinov2

from adt_plugin import AdtSettings, SettingsError, TrainBatch, build_strategy
from adt_plugin.noise import NoiseSchedule
from adt_plugin.strategies.adt import AdtStrategy


def settings(**kw):
    # the paper's compute settings (the modes under test are set by each test)
    base = dict(g_every=5, k_graph_steps=3, adt_every=1, rollout_buffer=0, rollout_share=1.0, adv_ratio=0.3, lambda_diff=0.5, num_inference_steps=6, guidance_scale=2.0, taps=(1, 3), head_channels=8, d_lr=1e-3,
                d_warmup_steps=4, g_warmup_steps=2, seed=0)
    base.update(kw)
    return AdtSettings(**base)


def make_adt(config=DDPM_CONFIG, **kw):
    torch.manual_seed(0)
    model = GraphAuditAdapter(TinyDenoiser(), config)
    strategy = build_strategy(settings(**kw), config, backbone=tiny_dinov2())
    return model, strategy


def batch(n=2):
    gen = torch.Generator().manual_seed(7)
    return TrainBatch(x0=torch.randn(n, 4, 8, 8, generator=gen), cond={"labels": torch.arange(n) % 3})


@pytest.mark.parametrize("config,kind", [(DDPM_CONFIG, "epsilon"), ({**DDPM_CONFIG, "prediction_type": "v_prediction"}, "v"), (FLOW_CONFIG, "flow")])
def test_ft_is_mse_to_the_models_own_target(config, kind):
    torch.manual_seed(0)
    net = TinyDenoiser()
    model = GraphAuditAdapter(net, config)
    strategy = build_strategy(AdtSettings(strategy="ft", seed=3), config)
    b = batch()
    out = strategy(model, b)
    # redo the draws by hand with the same seed
    gen = torch.Generator().manual_seed(3)
    sched = NoiseSchedule(config)
    t = sched.sample_timesteps(2, gen)
    noise = torch.randn(b.x0.shape, generator=gen)
    alpha, sigma = sched.alpha_sigma(t)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    x_t = a * b.x0 + s * noise
    target = {"epsilon": noise, "v": a * noise - s * b.x0, "flow": noise - b.x0}[kind]
    if kind == "flow":
        torch.testing.assert_close(x_t, (1 - s) * b.x0 + s * noise)
    expected = torch.nn.functional.mse_loss(net(x_t, t, b.cond["labels"]), target)
    torch.testing.assert_close(out.loss, expected)
    assert out.updates_generator and out.loss.grad_fn is not None


def test_discriminator_only_iteration_builds_no_denoiser_or_decoder_graph():
    model, strategy = make_adt(g_every=5)
    heads_before = [p.clone() for p in strategy.disc.trainable_parameters()]
    twins_before = [p.clone() for p in strategy.disc.twins.parameters()]
    out = strategy(model, batch())
    assert not out.updates_generator
    assert out.loss.grad_fn is None and not out.loss.requires_grad
    assert model.graph_calls == 0 and model.saved == 0  # nothing saved for backward in denoiser/decoder
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, strategy.disc.trainable_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(twins_before, strategy.disc.twins.parameters()))
    assert {"loss/D", "D/real", "D/fake", "loss/diff", "lr/D"} <= out.logs.keys()
    assert "loss/G_adv" not in out.logs


def test_generator_iteration_returns_adversarial_plus_lambda_diffusion_loss():
    # the paper's formulation, literally
    model, strategy = make_adt(g_every=1, lambda_diff=0.5, k_graph_steps=2, adv_balance="none", reference="self", diff_timestep="start")
    out = strategy(model, batch())
    assert out.updates_generator and out.loss.grad_fn is not None
    assert out.logs["loss/G"] == pytest.approx(out.logs["loss/G_adv"] + 0.5 * out.logs["loss/diff"], rel=1e-5)
    steps = int(out.logs["adt/rollout_steps"])
    assert model.graph_calls == 1 + min(2, steps - 1)
    out.loss.backward()
    assert all(p.grad is not None for p in model.net.parameters())
    assert all(p.grad is None for p in strategy.disc.trainable_parameters())  # D was updated by its own step


def test_generator_loss_every_h_th_iteration():
    model, strategy = make_adt(g_every=3)
    flags = [strategy(model, batch()).updates_generator for _ in range(7)]
    assert flags == [False, False, True, False, False, True, False]


def test_discriminator_and_generator_warmups_are_linear():
    model, strategy = make_adt(g_every=1, d_warmup_steps=4, g_warmup_steps=2)
    lrs, g = [], []
    for _ in range(5):
        g.append(strategy.generator_lr_factor())
        lrs.append(strategy(model, batch()).logs["lr/D"])
    assert lrs == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3])
    assert g == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])


def test_same_seed_same_run():
    logs = []
    for _ in range(2):
        model, strategy = make_adt(g_every=2)
        logs.append([strategy(model, batch()).logs for _ in range(3)])
    assert logs[0] == logs[1]


def test_flow_model_and_projected_discriminator_run():
    model, strategy = make_adt(FLOW_CONFIG, sampler="flow_euler", discriminator="projected", g_every=1)
    out = strategy(model, batch())
    assert out.updates_generator and torch.isfinite(out.loss)
    out.loss.backward()


def test_build_strategy_loads_the_backbone_only_for_adt():
    calls = []

    def loader():
        calls.append(1)
        return tiny_dinov2()

    build_strategy(AdtSettings(strategy="ft"), DDPM_CONFIG, backbone_loader=loader)
    assert calls == []
    s = build_strategy(settings(), DDPM_CONFIG, backbone_loader=loader)
    assert calls == [1] and isinstance(s, AdtStrategy)


def test_missing_dinov2_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"DINOv2 backbone '.*nowhere': no such folder .*hf download facebook/dinov2-small"):
        build_strategy(AdtSettings(backbone_path=str(tmp_path / "nowhere")), DDPM_CONFIG)


def test_settings_reject_unknown_keys_and_wrong_types_naming_the_closest_key():
    with pytest.raises(SettingsError, match=r"run.toml \[adt\]: unknown key 'lamda_diff'; did you mean 'lambda_diff'\?"):
        AdtSettings.from_mapping({"lamda_diff": 1.0}, source="run.toml [adt]")
    with pytest.raises(SettingsError, match="key 'g_every' must be an integer, got '5'"):
        AdtSettings.from_mapping({"g_every": "5"})
    with pytest.raises(SettingsError, match="strategy must be one of"):
        AdtSettings(strategy="gan")
    with pytest.raises(SettingsError, match="does not fit|unknown sampler"):
        AdtSettings(sampler="heun")
    s = AdtSettings.from_mapping({"taps": [1, 2], "lambda_diff": 2})
    assert s.taps == (1, 2) and s.lambda_diff == 2.0
    assert AdtSettings.from_mapping(s.to_dict()) == s


def test_decoder_path_decodes_with_a_tiny_autoencoder_instead_of_the_models_vae(tmp_path):
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4,
    ).save_pretrained(tmp_path / "taesd")
    model = GraphAuditAdapter(TinyDenoiser(), DDPM_CONFIG)
    decoded = []
    model.decode = lambda latents: decoded.append(latents) or latents[:, :3]
    strategy = build_strategy(settings(g_every=1, decoder_path=str(tmp_path / "taesd")), DDPM_CONFIG, backbone=tiny_dinov2())
    out = strategy(model, batch())
    assert decoded == [] and strategy.decoder is not None  # the model's own decode was never called
    out.loss.backward()
    assert all(p.grad is not None for p in model.net.parameters())  # the gradient went through the tiny decoder
    with pytest.raises(FileNotFoundError, match=r"decoder_path.*no such folder.*hf download madebyollin/taesd"):
        build_strategy(settings(decoder_path=str(tmp_path / "nope")), DDPM_CONFIG, backbone=tiny_dinov2())


def test_reference_indices_self_same_cond_any():
    from adt_plugin.strategies.adt import reference_indices

    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    cond = {"labels": labels, "unused": None}
    assert reference_indices(cond, "self", gen).tolist() == list(range(6))
    for _ in range(20):
        same = reference_indices(cond, "same_cond", gen)
        assert same[3] == 3  # the only 2: no other image with its conditioning
        others = [i for i in range(6) if i != 3]
        assert all(same[i] != i and labels[same[i]] == labels[i] for i in others)
        anyone = reference_indices(cond, "any", gen)
        assert all(anyone[i] != i for i in range(6))
    # every allowed partner is drawn, not always the same one
    picks = {int(reference_indices(cond, "same_cond", gen)[0]) for _ in range(40)}
    assert picks == {2, 5}
    # multi-key conditioning: rows must match in every key
    emb = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]])
    two = {"encoder_hidden_states": emb, "labels": torch.tensor([5, 6, 5])}
    assert reference_indices(two, "same_cond", gen).tolist() == [0, 1, 2]


def test_balance_adversarial_keeps_value_and_gradient_and_sets_the_ratio():
    from adt_plugin.strategies.adt import balance_adversarial

    torch.manual_seed(0)
    theta = torch.randn(5, requires_grad=True)
    x_in = torch.randn(3, 5)

    def graph():
        first = x_in * theta  # the shared denoiser output
        sample = 0.7 * first + first.detach() ** 2  # the rollout's result
        g_adv = -torch.tanh(sample @ torch.arange(5.0)).mean()  # stands in for D and decoder
        diff = 0.5 * (first - 1).pow(2).mean()
        return first, sample, g_adv, diff

    first, sample, g_adv, diff = graph()
    stand_in, w = balance_adversarial(g_adv, sample, first, diff, ratio=0.3)
    _, _, g_ref, diff_ref = graph()
    torch.testing.assert_close(stand_in.detach(), g_ref.detach())
    (grad_stand_in,) = torch.autograd.grad(stand_in, theta, retain_graph=True)
    (grad_ref,) = torch.autograd.grad(g_ref, theta, retain_graph=True)
    torch.testing.assert_close(grad_stand_in, grad_ref)
    f2, s2, g2, d2 = graph()
    (a,) = torch.autograd.grad(g2, f2, retain_graph=True)
    (b,) = torch.autograd.grad(d2, f2)
    assert w == pytest.approx(0.3 * float(b.norm()) / float(a.norm()), rel=1e-5)


def test_grad_balance_and_adversarial_warmup_in_the_strategy():
    model, strategy = make_adt(g_every=1, adv_balance="grad", adv_ratio=0.5, adv_warmup_steps=2, reference="same_cond", diff_timestep="start")
    weights = []
    for _ in range(3):
        out = strategy(model, batch(4))
        assert out.updates_generator and "adt/balance" in out.logs
        assert out.logs["adt/balance"] > 0
        weights.append(out.logs["adt/adv_weight"] / out.logs["adt/balance"])
        assert out.logs["loss/G"] == pytest.approx(
            out.logs["adt/adv_weight"] * out.logs["loss/G_adv"] + 0.5 * out.logs["loss/diff"], rel=1e-5
        )
        model.net.zero_grad()
        out.loss.backward()
        assert all(p.grad is not None for p in model.net.parameters())
    assert weights == pytest.approx([0.5, 1.0, 1.0])


def test_defaults_balance_the_gradients_and_the_paper_mode_is_a_setting():
    s = AdtSettings()
    assert (s.adv_balance, s.adv_ratio, s.reference, s.adv_warmup_steps, s.diff_timestep) == ("grad", 1.0, "same_cond", 0, "uniform")
    # the compute study's (docs/demo.md, "What ADT costs")
    assert (s.g_every, s.k_graph_steps, s.adt_every, s.rollout_buffer, s.rollout_share) == (1, 0, 4, 1, 0.25)
    paper = AdtSettings(adv_balance="none", reference="self", diff_timestep="start", g_every=5, k_graph_steps=3,
                        adt_every=1, rollout_buffer=0, rollout_share=1.0)
    assert (paper.d_lr, paper.tau) == (5e-6, 0.99) and AdtSettings(lambda_diff=0.5).lambda_diff == 0.5
    assert s.lambda_diff == 1.0  # the compute study's; the paper's 0.5 is a setting
    with pytest.raises(SettingsError, match="adv_balance must be"):
        AdtSettings(adv_balance="auto")
    with pytest.raises(SettingsError, match="reference must be one of"):
        AdtSettings(reference="other")


def test_diffusion_term_at_a_uniform_timestep_takes_one_more_forward_on_generator_steps_only():
    calls = {}
    for mode in ("start", "uniform"):
        model, strategy = make_adt(g_every=2, diff_timestep=mode)
        counts = []
        real_denoise = model.denoise

        def counting(*args, _counts=counts, **kwargs):
            _counts[-1] += 1
            return real_denoise(*args, **kwargs)

        model.denoise = counting
        outs = []
        for _ in range(2):  # a discriminator-only step, then a generator step
            counts.append(0)
            outs.append(strategy(model, batch(4)))
        calls[mode] = counts
        g = outs[1]
        assert g.updates_generator and not outs[0].updates_generator
        assert ("loss/diff_uniform" in g.logs) == (mode == "uniform")
        diff = g.logs.get("loss/diff_uniform", g.logs["loss/diff"])
        assert g.logs["loss/G"] == pytest.approx(g.logs["adt/adv_weight"] * g.logs["loss/G_adv"] + 0.5 * diff, rel=1e-5)
        g.loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.parameters())
    # the same rollout (same draws up to it); the uniform term adds exactly one call on the G step
    assert calls["uniform"][0] == calls["start"][0]
    assert calls["uniform"][1] == calls["start"][1] + 1
    with pytest.raises(SettingsError, match="diff_timestep must be 'start' or 'uniform'"):
        AdtSettings(diff_timestep="random")


def test_uniform_diffusion_term_checkpointed_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model, strategy = make_adt(g_every=1, diff_timestep="uniform", gradient_checkpointing=ckpt)
        out = strategy(model, batch(4))
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
