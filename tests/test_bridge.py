"""The part every trainer plugin shares: loss for a foreign loop, runner windows, the optimizer gate."""

import pytest
import torch
from tiny import DDPM_CONFIG, TinyAdapter, TinyDenoiser, tiny_dinov2

from adt_plugin import AdtSettings, build_strategy
from adt_plugin.bridge import FunctionAdapter, GeneratorStepGate, StrategyRunner, loop_loss
from adt_plugin.strategies import StrategyOutput


def runner(micro_batches=1, **kw):
    settings = dict(num_inference_steps=4, guidance_scale=2.0, taps=(1, 3), head_channels=8, g_every=2,
                    k_graph_steps=1, g_warmup_steps=4, seed=0)
    settings.update(kw)
    torch.manual_seed(0)
    strategy = build_strategy(AdtSettings(**settings), DDPM_CONFIG, backbone=tiny_dinov2(), micro_batches=micro_batches)
    return StrategyRunner(strategy)


def adapter(net):
    tiny = TinyAdapter(net)
    return FunctionAdapter(DDPM_CONFIG, tiny.denoise, tiny.uncond, tiny.decode)


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=gen), {"labels": torch.tensor([0, 1])}


def test_loop_loss_shows_the_diffusion_loss_and_carries_the_generator_gradient():
    w = torch.tensor(2.0, requires_grad=True)
    g_loss = 3.0 * w
    out = loop_loss(StrategyOutput(g_loss, True, {"loss/diff": 0.25}))
    assert out.item() == pytest.approx(0.25)
    out.backward()
    assert w.grad.item() == pytest.approx(3.0)

    d_only = loop_loss(StrategyOutput(torch.tensor(0.5), False, {"loss/diff": 0.5}))
    assert d_only.item() == 0.5 and d_only.requires_grad and d_only.grad_fn is None  # a leaf: backward reaches nothing

    p = torch.nn.Parameter(torch.randn(3))
    zeroed = loop_loss(StrategyOutput(torch.tensor(0.5), False, {"loss/diff": 0.5}), zero_grad_params=[p])
    zeroed.backward()
    assert zeroed.item() == 0.5 and torch.equal(p.grad, torch.zeros(3))


def test_runner_decides_by_whole_accumulation_windows_and_rounds_up_partial_ones():
    r = runner(micro_batches=2)
    net = TinyDenoiser()
    decisions = []
    # windows of 2 micro-batches; the loop closes the third window after one micro-batch (end of an epoch)
    for closes in (False, True, False, True, True, False, True):
        x0, cond = data(len(decisions))
        r(adapter(net), x0, cond, closes_window=closes)
        decisions.append(r.updates_generator)
    assert decisions == [False, False, True, True, False, True, True]
    assert r.strategy.step == 8


def gated_adamw():
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.5)
    p.grad = torch.full((4,), 0.3)
    opt.step()  # momentum and second moment are non-zero from here on
    return p, opt


def test_gate_keeps_discriminator_only_windows_from_moving_adamw_weights():
    p, opt = gated_adamw()
    ungated = p.detach().clone()
    p.grad = torch.zeros(4)
    opt.step()
    assert not torch.equal(p.detach(), ungated)  # momentum + decoupled weight decay move it with zero gradients

    p, opt = gated_adamw()
    r = runner()
    r.updates_generator = False
    before = p.detach().clone()
    skips = []
    gate = GeneratorStepGate(opt, r, on_skip=lambda: skips.append(1))
    p.grad = torch.zeros(4)
    opt.step()
    assert torch.equal(p.detach(), before) and skips == [1] and gate.skipped == 1


def test_gate_applies_the_generator_warmup_then_restores_the_lr():
    p, opt = gated_adamw()
    twin, twin_opt = gated_adamw()
    r = runner(g_warmup_steps=4)
    r.strategy.step = 1  # the call that closed window 0 was call 0: factor (0 + 1) / 4
    r.updates_generator = True
    gate = GeneratorStepGate(opt, r)
    p.grad = twin.grad = torch.full((4,), -0.2)
    opt.step()
    twin_opt.param_groups[0]["lr"] = 0.1 * 0.25
    twin_opt.step()
    assert torch.allclose(p.detach(), twin.detach()) and opt.param_groups[0]["lr"] == 0.1
    gate.remove()
    assert "step" not in vars(opt)


def test_accelerate_skip_hook_clears_the_grad_scaler_and_lets_the_scheduler_advance():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    from adt_plugin.kohya.internals import skipped_step_cleanup

    Accelerator(cpu=True)
    p = torch.nn.Parameter(torch.ones(4))
    inner = torch.optim.AdamW([p], lr=0.1)
    opt = AcceleratedOptimizer(inner, device_placement=False, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    sched = AcceleratedScheduler(torch.optim.lr_scheduler.LambdaLR(inner, lambda s: 1.0 / (1 + s)), opt)
    r = runner()
    GeneratorStepGate(opt, r, on_skip=skipped_step_cleanup(opt))

    def iteration(updates_generator):
        r.updates_generator = updates_generator
        loss = (p * 2).sum() if updates_generator else torch.tensor(1.0, requires_grad=True)
        opt.scaler.scale(loss).backward()
        opt.scaler.unscale_(inner)  # what accelerator.clip_grad_norm_ does before clipping
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    iteration(False)  # no gradient at all on a discriminator-only iteration
    assert torch.equal(p.detach(), torch.ones(4)) and opt.scaler.get_scale() == 1024.0
    iteration(True)  # without the hook: "unscale_() has already been called on this optimizer"
    assert not torch.equal(p.detach(), torch.ones(4))
    assert sched.scheduler.last_epoch == 2  # the LR schedule advanced on both iterations
