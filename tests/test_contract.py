"""The strategy contract (strategies/base.py): registry, windows, what is declared,
compute accounting, the balance's bound, the shown loss, and the multi-process helpers."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from tiny import DDPM_CONFIG, TinyAdapter, TinyDenoiser, tiny_dinov2

from adt_plugin import AdtSettings, SettingsError, TrainBatch, build_strategy
from adt_plugin.bridge import StrategyRunner, loop_loss
from adt_plugin.checkpoint import load_discriminator, save_discriminator
from adt_plugin.discriminator import DiscriminatorConfig
from adt_plugin.rollout import RolloutConfig
from adt_plugin.strategies import STRATEGIES, Cost, LossStrategy, StrategyOutput, register_strategy
from adt_plugin.strategies.adt import MAX_ADV_WEIGHT

PACKAGE = Path(__file__).resolve().parents[1] / "adt_plugin"


def adt_settings(**kw):
    # the paper's compute settings (the modes under test are set by each test)
    base = dict(g_every=5, k_graph_steps=3, adt_every=1, rollout_buffer=0, rollout_share=1.0, adv_ratio=0.3, num_inference_steps=6, guidance_scale=2.0, taps=(1, 3), head_channels=8, d_lr=1e-3,
                d_warmup_steps=0, g_warmup_steps=0, seed=0)
    base.update(kw)
    return AdtSettings(**base)


def make_adt(micro_batches=1, **kw):
    torch.manual_seed(0)
    return build_strategy(adt_settings(**kw), DDPM_CONFIG, backbone=tiny_dinov2(), micro_batches=micro_batches)


def batch(n=4, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return TrainBatch(x0=torch.randn(n, 4, 8, 8, generator=gen), cond={"labels": torch.arange(n) % 3})


class RowCounter:
    """An adapter outside the strategy's own counting: every denoiser row, and when it ran."""

    def __init__(self, net):
        self.inner = TinyAdapter(net)
        self.scheduler_config = DDPM_CONFIG
        self.rows = {"nograd": 0, "graph": 0}
        self.in_backward = 0  # rows of calls made while autograd runs a backward (recomputation)
        self.phase = "call"

    def denoise(self, sample, timestep, cond):
        if self.phase == "backward":  # counted before the call: checkpoint's recomputation stops it early
            self.in_backward += sample.shape[0]
            return self.inner.denoise(sample, timestep, cond)
        out = self.inner.denoise(sample, timestep, cond)
        self.rows["graph" if out.requires_grad else "nograd"] += sample.shape[0]
        return out

    def uncond(self, cond):
        return self.inner.uncond(cond)

    def decode(self, latents):
        return self.inner.decode(latents)


# --- registry and settings ------------------------------------------------------------------


def test_a_strategy_is_a_class_and_one_registration():
    @register_strategy
    class Half(LossStrategy):
        name = "half_test"
        description = "half the ft loss (test only)"

        @classmethod
        def from_settings(cls, settings, scheduler_config, *, micro_batches=1, **_):
            return cls(settings.seed, micro_batches)

        def run(self, model, batch):
            t = torch.full((batch.x0.shape[0],), 10)
            loss = 0.5 * model.denoise(batch.x0, t, batch.cond).pow(2).mean()
            return StrategyOutput(loss, True, {"loss/diff": float(loss.detach())})

    try:
        strategy = build_strategy(AdtSettings(strategy="half_test"), DDPM_CONFIG, micro_batches=3)
        assert isinstance(strategy, Half) and strategy.micro_batches == 3 and not strategy.has_discriminator
        out = strategy(TinyAdapter(TinyDenoiser()), batch())
        assert out.cost.forwards == 1 and out.cost.forward_equiv == 3 and strategy.step == 1
    finally:
        del STRATEGIES["half_test"]
    with pytest.raises(SettingsError, match="strategy must be one of ft, adt, ip, at"):
        AdtSettings(strategy="half_test")
    with pytest.raises(ValueError, match="already registered"):
        register_strategy(type("Again", (Half,), {"name": "ft"}))


def test_inner_configs_have_no_defaults_of_their_own():
    for cls in (RolloutConfig, DiscriminatorConfig):
        defaulted = [f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING]
        assert defaulted == [], (cls.__name__, defaulted)
    s = AdtSettings()
    assert s.rollout_config().num_inference_steps == s.num_inference_steps
    assert s.discriminator_config().channels == s.head_channels
    # each rule is checked once, where the field lives, and reported as a settings error
    with pytest.raises(SettingsError, match="k_graph_steps must be >= 0"):
        AdtSettings(k_graph_steps=-1)
    with pytest.raises(SettingsError, match="num_inference_steps must be >= 1"):
        AdtSettings(num_inference_steps=0)
    with pytest.raises(SettingsError, match="head_channels must be >= 1"):
        AdtSettings(head_channels=0)


def _top_level_imports(path: Path) -> set[str]:
    """Modules a file imports when it is imported (TYPE_CHECKING blocks and function bodies aside)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_strategies_do_not_import_the_settings_that_import_them():
    for path in (PACKAGE / "strategies").glob("*.py"):
        assert not any(name.endswith("settings") for name in _top_level_imports(path)), path.name


def test_front_ends_use_the_contract_not_the_strategys_insides():
    """No `hasattr(strategy, ...)`, no reading its discriminator or settings by their
    private names, no setting its window or call count from outside."""
    patterns = [
        r"hasattr\([^)]*strateg",
        r"hasattr\([^)]*\"disc\"",
        r"strategy\.disc\b",
        r"strategy\.micro_batches\s*=[^=]",
        r"strategy\.step\s*=[^=]",
        r"strategy\.is_generator_step",
    ]
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "strategies":
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(PACKAGE)}: {p}" for p in patterns if re.search(p, text)]
    assert offenders == []


# --- windows, generator decisions, the learning-rate factor ----------------------------------


def test_micro_batches_are_a_constructor_argument_and_the_runner_leaves_them_alone():
    strategy = make_adt(micro_batches=2, g_every=2, g_warmup_steps=4)
    runner = StrategyRunner(strategy)
    assert runner.micro_batches == strategy.micro_batches == 2
    net = TinyDenoiser()
    predicted, actual = [], []
    for closes in (False, True, False, True, True, False, True):
        predicted.append(strategy.next_call_updates_generator())
        runner(TinyAdapter(net), *(lambda b: (b.x0, b.cond))(batch(2)), closes_window=closes)
        actual.append(runner.updates_generator)
    assert predicted == actual == [False, False, True, True, False, True, True]
    assert strategy.micro_batches == 2 and strategy.step == 8
    # the factor of the latest call's window: window 3 (calls 6, 7) -> (3 + 1) / 4
    assert strategy.latest_generator_lr_factor() == strategy.generator_lr_factor(7) == 1.0
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        make_adt(micro_batches=0)


def test_close_window_rounds_up_to_the_next_window():
    strategy = make_adt(micro_batches=3)
    strategy.step = 4
    strategy.close_window()
    assert strategy.step == 6
    strategy.close_window()  # a full window: nothing to round
    assert strategy.step == 6


def test_what_each_strategy_declares():
    for name in ("ft", "ip", "at"):
        s = build_strategy(AdtSettings(strategy=name), DDPM_CONFIG)
        assert not s.has_discriminator and s.discriminator is None and s.settings.strategy == name
        assert s.next_call_updates_generator()
    adt = make_adt()
    assert adt.has_discriminator and adt.discriminator is not None and adt.settings.taps == (1, 3)


# --- compute accounting ------------------------------------------------------------------------


def test_ft_costs_one_ft_step_and_at_counts_its_ascent_backwards():
    net = TinyDenoiser()
    ft = build_strategy(AdtSettings(strategy="ft"), DDPM_CONFIG)
    out = ft(TinyAdapter(net), batch())
    assert out.cost == Cost(forwards=1, graph_forwards=1, backward=2)
    assert (out.cost.forward_equiv, out.cost.ft_steps) == (3, 1)
    assert out.logs["cost/forward_equiv"] == 3 and out.logs["cost/ft_steps"] == 1
    # AT, 3 replays: 3 graph forwards (backward by the loop: 3 x 2) and 2 ascent steps,
    # each a backward through the denoiser to its input inside the call (2 x 2)
    at = build_strategy(AdtSettings(strategy="at", at_steps=3), DDPM_CONFIG)
    out = at(TinyAdapter(net), batch())
    assert out.cost == Cost(forwards=3, graph_forwards=3, backward=10)
    assert out.logs["cost/total_forward_equiv"] == 13


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_known_rollout_counts_the_forwards_it_made(checkpointing):
    strategy = make_adt(g_every=2, k_graph_steps=2, gradient_checkpointing=checkpointing)
    model = RowCounter(TinyDenoiser())
    total = Cost()
    for call in range(4):  # D-only, generator, D-only, generator
        out = strategy(model, batch(4))
        s = int(out.logs["adt/rollout_steps"])
        cfg = 2  # guidance 2: cond + uncond in one forward on 2B rows
        if out.updates_generator:
            graph = cfg * (1 + min(2, s - 1)) + 1  # first step and K graph steps, the uniform diffusion term
            expected = Cost(forwards=cfg * s + 1, graph_forwards=graph, backward=2 * graph,
                            recompute=graph if checkpointing else 0, decoder=2, discriminator=3)
        else:
            expected = Cost(forwards=cfg * s, decoder=2, discriminator=3)
        assert out.cost == expected, (call, s)
        # the independent count agrees, and backward recomputes exactly what was declared
        assert model.rows["nograd"] + model.rows["graph"] == out.cost.forwards * 4
        assert model.rows["graph"] == out.cost.graph_forwards * 4
        if out.updates_generator:
            model.phase = "backward"
            out.loss.backward()
            model.phase = "call"
            assert model.in_backward == out.cost.recompute * 4
        model.rows = {"nograd": 0, "graph": 0}
        model.in_backward = 0
        total = total + out.cost
        assert out.logs["cost/total_forward_equiv"] == pytest.approx(total.forward_equiv)
        assert out.logs["cost/total_ft_steps"] == pytest.approx(total.forward_equiv / 3)
    assert strategy.cost_total == total


def test_the_cost_total_resumes_exactly_from_a_state_and_from_a_discriminator_file(tmp_path):
    def calls(strategy, n):
        torch.manual_seed(1)
        model = TinyAdapter(TinyDenoiser())
        return [strategy(model, batch(3)).logs for _ in range(n)]

    whole = make_adt(g_every=2)
    calls(whole, 5)
    first = make_adt(g_every=2)
    calls(first, 3)
    state = first.state_dict()
    path = save_discriminator(tmp_path / "d.adt_disc.safetensors", first)
    for restore in ("state", "file"):
        resumed = make_adt(g_every=2, seed=5)
        if restore == "state":
            resumed.load_state_dict(state)
        else:
            load_discriminator(path, resumed)
        assert resumed.cost_total == first.cost_total
        torch.manual_seed(1)
        model = TinyAdapter(TinyDenoiser())
        for _ in range(2):
            resumed(model, batch(3))
        assert resumed.cost_total == whole.cost_total


# --- the balance's bound, and the loss a foreign loop shows -------------------------------------


def test_a_discriminator_without_signal_gets_a_bounded_weight():
    """Near-constant projected logits: the adversarial gradient at the first output is
    some 1e-9 of the diffusion gradient, and w = ratio * |g_diff| / |g_adv| would be ~1e8."""
    strategy = make_adt(g_every=1, discriminator="projected", d_lr=1e-12)
    with torch.no_grad():
        for logit in strategy.discriminator.logits:
            logit.weight.mul_(1e-9)
    model = TinyAdapter(TinyDenoiser())
    for _ in range(3):
        out = strategy(model, batch())
        assert out.logs["adt/balance_unbounded"] > 1e4  # what the balance alone would have asked for
        assert out.logs["adt/balance"] == MAX_ADV_WEIGHT == 1.0
        assert out.logs["loss/G"] == pytest.approx(out.logs["loss/G_adv"] + strategy.settings.lambda_diff * out.logs["loss/diff_uniform"], rel=1e-5)
        assert abs(out.logs["loss/G"]) < 10


def test_a_balanced_weight_below_the_bound_is_unchanged():
    strategy = make_adt(g_every=1, num_inference_steps=4)
    model = TinyAdapter(TinyDenoiser())
    seen = [strategy(model, batch()).logs for _ in range(6)]
    below = [logs for logs in seen if logs["adt/balance_unbounded"] < MAX_ADV_WEIGHT]
    assert below and all(logs["adt/balance"] == logs["adt/balance_unbounded"] for logs in below)


def test_the_loop_loss_shows_the_diffusion_loss_exactly_beside_a_huge_generator_loss():
    w = torch.tensor(1.0, requires_grad=True)
    huge = -2.97e7 * w  # loss/G of the sd-scripts run
    shown = 0.1234567
    value = loop_loss(StrategyOutput(huge, True, {"loss/diff": shown}))
    assert value.item() == torch.tensor(shown, dtype=torch.float32).item()  # exact, not 0.0 or 2.0
    value.backward()
    assert w.grad.item() == -2.97e7
