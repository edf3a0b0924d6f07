"""The cheaper ADT modes (issue 10): discriminator steps on buffered rollouts, the FT/ADT
mix and FT phase, the rollout's share of the batch, inference-mode rollouts; what each
call costs, and that every mode resumes exactly."""

import pytest
import torch
from tiny import DDPM_CONFIG, GraphAuditAdapter, TinyAdapter, TinyDenoiser, tiny_dinov2

from adt_plugin import AdtSettings, SettingsError, TrainBatch, build_strategy
from adt_plugin.checkpoint import load_discriminator, save_discriminator
from adt_plugin.rollout import Rollout
from adt_plugin.strategies import Cost


def settings(**kw):
    # the paper's compute settings (the modes under test are set by each test)
    base = dict(g_every=5, k_graph_steps=3, adt_every=1, rollout_buffer=0, rollout_share=1.0, adv_ratio=0.3, num_inference_steps=6, guidance_scale=2.0, taps=(1, 3), head_channels=8, d_lr=1e-3,
                d_warmup_steps=0, g_warmup_steps=0, seed=0)
    base.update(kw)
    return AdtSettings(**base)


def make_adt(**kw):
    torch.manual_seed(0)
    return build_strategy(settings(**kw), DDPM_CONFIG, backbone=tiny_dinov2())


def batch(n=4, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return TrainBatch(x0=torch.randn(n, 4, 8, 8, generator=gen), cond={"labels": torch.arange(n) % 2})


class CallCounter(GraphAuditAdapter):
    """Counts denoiser and decoder calls too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.denoise_calls = 0
        self.decode_calls = 0

    def denoise(self, sample, timestep, cond):
        self.denoise_calls += 1
        return super().denoise(sample, timestep, cond)

    def decode(self, latents):
        self.decode_calls += 1
        return super().decode(latents)


def d_params(strategy):
    return [p.detach().clone() for p in strategy.disc.trainable_parameters()]


def test_settings_check_the_new_fields():
    for bad, message in (
        ({"adt_every": 0}, "adt_every must be >= 1"),
        ({"adt_start": -1}, "adt_start must be >= 0"),
        ({"rollout_buffer": -1}, "rollout_buffer must be >= 0"),
        ({"rollout_share": 0.0}, r"rollout_share must be in \(0, 1\]"),
        ({"rollout_share": 1.5}, r"rollout_share must be in \(0, 1\]"),
    ):
        with pytest.raises(SettingsError, match=message):
            AdtSettings(**bad)


def test_the_call_schedule_of_the_mix_the_ft_phase_and_h():
    kinds = lambda s, n=12: [s.call_kind(i) for i in range(n)]  # noqa: E731
    assert kinds(make_adt(g_every=1)) == ["adt"] * 12
    assert kinds(make_adt(g_every=1, adt_every=3)) == ["ft", "ft", "adt"] * 4
    assert kinds(make_adt(g_every=1, adt_start=4, adt_every=2)) == ["ft"] * 4 + ["ft", "adt"] * 4
    assert kinds(make_adt(g_every=3, adt_every=2), 12) == ["d_only", "d_only", "ft", "d_only", "d_only", "adt"] * 2
    # whole windows of micro-batches
    assert [make_adt(g_every=1, adt_every=2).call_kind(i) for i in range(4)] == ["ft", "adt", "ft", "adt"]
    s = build_strategy(settings(g_every=1, adt_every=2), DDPM_CONFIG, backbone=tiny_dinov2(), micro_batches=2)
    assert [s.call_kind(i) for i in range(8)] == ["ft", "ft", "adt", "adt"] * 2


def test_an_ft_call_of_the_mix_is_exactly_fts_step_and_costs_one_ft_step():
    net = TinyDenoiser()
    adt = make_adt(g_every=1, adt_every=2, seed=3, gradient_checkpointing=True)
    ft = build_strategy(AdtSettings(strategy="ft", seed=3), DDPM_CONFIG)
    model = CallCounter(net)
    b = batch()
    out_adt, out_ft = adt(model, b), ft(TinyAdapter(net), b)
    torch.testing.assert_close(out_adt.loss, out_ft.loss)  # the same draws, the same loss
    assert out_adt.updates_generator and out_adt.loss.grad_fn is not None
    assert out_adt.cost == out_ft.cost == Cost(forwards=1, graph_forwards=1, backward=2)  # not checkpointed
    assert model.denoise_calls == 1 and model.decode_calls == 0
    assert out_adt.logs["adt/adversarial"] == 0.0 and out_adt.logs["adt/rollout_steps"] == 0.0
    out = adt(model, b)  # the ADT call of the mix: a rollout with a graph
    assert out.logs["adt/adversarial"] == 1.0 and out.cost.graph_forwards > 1


def test_a_discriminator_step_without_a_rollout_calls_no_denoiser_and_allocates_no_graph():
    strategy = make_adt(g_every=3, rollout_buffer=2)
    model = CallCounter(TinyDenoiser())
    first = strategy(model, batch())  # D-only, empty buffer: a fresh (no-graph) rollout fills it
    assert not first.updates_generator and first.cost.forwards > 0 and len(strategy.buffer) == 1
    model.denoise_calls = model.decode_calls = model.saved = 0
    before = d_params(strategy)
    out = strategy(model, batch(seed=8))  # D-only with a buffered rollout
    assert not out.updates_generator and out.logs["adt/rollout_steps"] == 0.0
    assert model.denoise_calls == 0 and model.decode_calls == 0 and model.saved == 0
    assert out.cost == Cost(discriminator=3)  # in batches: real, its reference (same_cond), the sample
    assert out.loss.grad_fn is None and out.loss.item() == first.logs["loss/diff"]  # that rollout's, for logs
    assert any(not torch.equal(a, b) for a, b in zip(before, d_params(strategy)))  # it did take a step
    gen = strategy(model, batch(seed=9))  # generator call: a fresh rollout with a graph, buffered too
    assert gen.updates_generator and model.denoise_calls > 0 and len(strategy.buffer) == 2
    strategy(model, batch())
    strategy(model, batch())
    assert len(strategy.buffer) == 2  # the oldest is dropped


def test_ft_steps_of_the_mix_take_a_discriminator_step_on_the_buffer():
    strategy = make_adt(g_every=1, adt_start=1, adt_every=2, rollout_buffer=1)
    model = CallCounter(TinyDenoiser())
    before = d_params(strategy)
    out = strategy(model, batch())  # the FT phase, no rollout yet: no discriminator step
    assert out.updates_generator and "loss/D" not in out.logs and out.cost.discriminator == 0
    assert all(torch.equal(a, b) for a, b in zip(before, d_params(strategy)))
    strategy(model, batch())  # FT (first step of the mix)
    out = strategy(model, batch())  # ADT
    assert out.logs["adt/adversarial"] == 1.0 and len(strategy.buffer) == 1
    before = d_params(strategy)
    out = strategy(model, batch(seed=3))  # FT with a D step on the buffered rollout
    assert out.updates_generator and "loss/D" in out.logs
    assert out.cost == Cost(forwards=1, graph_forwards=1, backward=2, discriminator=3)
    assert any(not torch.equal(a, b) for a, b in zip(before, d_params(strategy)))


def test_a_share_of_the_batch_rolls_out_and_is_counted_per_training_batch():
    strategy = make_adt(g_every=2, rollout_share=0.5, diff_timestep="uniform")
    model = CallCounter(TinyDenoiser())
    out = strategy(model, batch(4))  # D-only: 2 of 4 rows roll out with guidance (2 x 2 rows per step)
    s = int(out.logs["adt/rollout_steps"])
    assert out.cost == Cost(forwards=s * 4 / 4, decoder=2 * 2 / 4, discriminator=2 * 3 / 4)
    out = strategy(model, batch(4))  # generator: graph steps on the 2 rows, the diffusion term on all 4
    s = int(out.logs["adt/rollout_steps"])
    graph = (1 + min(3, s - 1)) * 4 / 4 + 1
    assert out.cost.forwards == s * 4 / 4 + 1 and out.cost.graph_forwards == graph
    out.loss.backward()


def _run(strategy, n, seed=1):
    torch.manual_seed(seed)
    model = TinyAdapter(TinyDenoiser())
    outs = []
    for i in range(n):
        out = strategy(model, batch(4, seed=100 + i))
        outs.append((float(out.loss.detach()), out.updates_generator, out.logs.get("loss/D"), out.logs.get("adt/buffer_age")))
    return outs


@pytest.mark.parametrize("restore", ["state", "file"])
def test_the_buffer_and_the_mix_are_deterministic_and_resume_exactly(tmp_path, restore):
    kw = dict(g_every=2, adt_every=2, adt_start=1, rollout_buffer=3)
    whole = _run(make_adt(**kw), 10)
    assert whole == _run(make_adt(**kw), 10)  # deterministic
    first = make_adt(**kw)
    head = _run(first, 6)
    assert head == whole[:6] and len(first.buffer) == 2
    resumed = make_adt(**kw, seed=5)  # another seed: everything must come from the state
    if restore == "state":
        resumed.load_state_dict(first.state_dict())
    else:
        load_discriminator(save_discriminator(tmp_path / "d.adt_disc.safetensors", first), resumed)
    assert len(resumed.buffer) == 2 and resumed.cost_total == first.cost_total
    for a, b in zip(resumed.buffer, first.buffer):
        assert torch.equal(a["fake"], b["fake"]) and torch.equal(a["real"], b["real"]) and a["diff"] == b["diff"]
    # the same model weights as the uninterrupted run had after 6 calls (no optimizer here: unchanged)
    torch.manual_seed(1)
    model = TinyAdapter(TinyDenoiser())
    tail = []
    for i in range(6, 10):
        out = resumed(model, batch(4, seed=100 + i))
        tail.append((float(out.loss.detach()), out.updates_generator, out.logs.get("loss/D"), out.logs.get("adt/buffer_age")))
    assert tail == whole[6:]


def test_no_graph_rollout_steps_run_in_inference_mode_and_give_ordinary_tensors():
    seen = []

    class Watch(TinyAdapter):
        def denoise(self, sample, timestep, cond):
            seen.append(torch.is_inference_mode_enabled())
            return super().denoise(sample, timestep, cond)

    strategy = make_adt(g_every=1, k_graph_steps=0, sampler="dpmsolver++")
    model = Watch(TinyDenoiser())
    rollout = strategy.rollout
    plan = rollout.plan(torch.Generator(), num_steps=rollout.schedule_length)
    x = torch.randn(2, 4, 8, 8)
    result = rollout.run(model, x, {"labels": torch.tensor([0, 1])}, plan)
    # the first step keeps its graph; the others ran in inference mode, and a multistep
    # sampler's history built from them still composes with the graph
    assert seen == [False] + [True] * (rollout.schedule_length - 1)
    assert not result.sample.is_inference() and result.sample.requires_grad
    result.sample.sum().backward()
    assert isinstance(rollout, Rollout)


def test_adt_trains_progress_bar_shows_the_compute_spent(tmp_path):
    from adt_plugin.train.monitor import Monitor

    monitor = Monitor(tmp_path, total=3, initial=0, main=True, tensorboard=False, echo=lambda *_: None)
    monitor.bar.disable = False  # shown even without a terminal, for this test
    out = make_adt(g_every=1, adt_every=2)(TinyAdapter(TinyDenoiser()), batch())
    monitor.advance(out.logs)
    assert "ft_steps=1" in str(monitor.bar.postfix)  # an FT step of the mix: one FT step spent
    monitor.close()
