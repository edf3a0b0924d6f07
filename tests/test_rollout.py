"""The rollout: values, the backward-path constraint, graph budget, private scheduler state."""

import copy

import pytest
import torch
from tiny import DDPM_CONFIG, FLOW_CONFIG, TinyAdapter, TinyDenoiser

from adt_plugin import selfcheck
from adt_plugin import AdtSettings
from adt_plugin.rollout import Rollout
from adt_plugin.samplers import build_scheduler


def rollout_config(**kw):
    """The rollout's part of AdtSettings (the defaults live there only)."""
    return AdtSettings(**kw).rollout_config()


@pytest.mark.parametrize("sampler,config", selfcheck.CASES, ids=lambda v: v if isinstance(v, str) else v.get("prediction_type", "flow"))
def test_adt_mode_values_and_gradients_match_reference(sampler, config):
    """Forward = plain sampling loop; dL/dx_ti = dL/dx0 for all i; param grad =
    sum over graph steps of b_t dL/dx0 . d eps/d theta; 1 + min(K, s-1) graph calls."""
    results = selfcheck.check_sampler(sampler, config)
    assert len(results) == 4
    failed = [f"{r.name}: {r.detail}" for r in results if not r.ok]
    assert not failed, failed


def test_selfcheck_detects_leaking_multistep_history(monkeypatch):
    """Without detaching DPM-Solver's history the parameter gradient is wrong, and the check says so."""
    import adt_plugin.rollout as rollout_module

    monkeypatch.setattr(rollout_module, "detach_history", lambda scheduler: None)
    results = {r.name.split()[-2] + " " + r.name.split()[-1]: r for r in selfcheck.check_sampler("dpmsolver++", selfcheck.DDPM_EPS)}
    assert not results["param grad"].ok


def _rollout_with_trace(mode, config=DDPM_CONFIG, sampler="ddim", steps=10, s=7, k=2):
    torch.manual_seed(0)
    model = TinyAdapter(TinyDenoiser(), config)
    cfg = rollout_config(sampler=sampler, num_inference_steps=steps, guidance_scale=2.0, k_graph_steps=k, grad_mode=mode)
    rollout = Rollout(config, cfg)
    plan = rollout.plan(torch.Generator().manual_seed(3), num_steps=s)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_start = rollout.start(x0, noise, plan).requires_grad_(True)
    result = rollout.run(model, x_start, {"labels": torch.tensor([0, 2])}, plan, record=True)
    return rollout, result, model


def test_drtune_gradient_scales_as_one_over_alpha_on_ddim():
    """Appendix A.1: with DRTune's path, dL/dx_ti = dL/dx0 * prod a_t = dL/dx0 * alpha_final / alpha_ti."""
    config = {**DDPM_CONFIG, "set_alpha_to_one": True}  # alpha_final = 1: the product is exactly 1/alpha_ti
    rollout, result, _ = _rollout_with_trace("drtune", config, s=10)
    w = torch.randn_like(result.sample)
    grads = torch.autograd.grad((w * result.sample).sum(), [r.sample for r in result.trace])
    ac = rollout.template.alphas_cumprod
    scales = []
    for record, g in zip(result.trace, grads):
        expected = w / ac[int(record.timestep)].sqrt()
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
        scales.append(float(1 / ac[int(record.timestep)].sqrt()))
    assert scales[0] > 8 * scales[-1]  # 1/alpha at t=901 is ~8.5: it explodes toward early steps


def test_adt_gradient_is_equal_at_every_step_where_drtune_is_not():
    _, adt, _ = _rollout_with_trace("adt")
    _, dr, _ = _rollout_with_trace("drtune")
    for result, equal in ((adt, True), (dr, False)):
        w = torch.ones_like(result.sample)
        grads = torch.autograd.grad((w * result.sample).sum(), [r.sample for r in result.trace])
        assert all(torch.allclose(g, w) for g in grads) == equal


@pytest.mark.parametrize("s,k", [(1, 3), (2, 3), (7, 3), (7, 0), (10, 9)])
def test_graph_calls_are_one_plus_min_k_s_minus_1(s, k):
    _, result, model = _rollout_with_trace("adt", s=s, k=k)
    assert result.graph_calls == model.graph_calls == 1 + min(k, s - 1)
    assert model.calls == s  # one batched (cond + uncond) forward per step
    assert 0 in result.plan.graph_positions


def test_off_mode_builds_no_graph_at_all():
    _, result, model = _rollout_with_trace("off")
    assert model.graph_calls == 0
    assert result.sample.grad_fn is None and not result.sample.requires_grad
    assert result.first_prediction.grad_fn is None


def test_rollout_leaves_template_and_trainer_scheduler_untouched():
    trainer_scheduler = build_scheduler(DDPM_CONFIG, "dpmsolver++", 10)
    before = copy.deepcopy(vars(trainer_scheduler))
    rollout = Rollout(DDPM_CONFIG, rollout_config(sampler="dpmsolver++", num_inference_steps=10))
    template_state = copy.deepcopy(vars(rollout.template))
    model = TinyAdapter(TinyDenoiser())
    plan = rollout.plan(torch.Generator().manual_seed(0), num_steps=5)
    x = rollout.start(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), plan)
    rollout.run(model, x, {"labels": torch.tensor([1])}, plan)
    for state, sched in ((before, trainer_scheduler), (template_state, rollout.template)):
        assert sched.step_index is None and sched.begin_index is None
        assert all(m is None for m in sched.model_outputs)
        assert torch.equal(state["timesteps"], sched.timesteps)


def test_guidance_batches_cond_and_uncond_in_one_forward_and_can_be_off():
    seen = []

    class Recording(TinyAdapter):
        def denoise(self, sample, timestep, cond):
            seen.append((sample.shape[0], cond["labels"].tolist()))
            return super().denoise(sample, timestep, cond)

    model = Recording(TinyDenoiser())
    for scale, expected_batch in ((5.0, 4), (1.0, 2), (0.0, 2)):
        seen.clear()
        rollout = Rollout(DDPM_CONFIG, rollout_config(num_inference_steps=4, guidance_scale=scale))
        plan = rollout.plan(torch.Generator(), num_steps=3)
        x = rollout.start(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), plan)
        rollout.run(model, x, {"labels": torch.tensor([0, 1])}, plan, grad_mode="off")
        assert [b for b, _ in seen] == [expected_batch] * 3
        if expected_batch == 4:
            assert seen[0][1] == [3, 3, 0, 1]  # unconditional half first, then conditional


def test_guided_output_follows_cfg_formula():
    torch.manual_seed(0)
    net = TinyDenoiser()
    model = TinyAdapter(net)
    rollout = Rollout(DDPM_CONFIG, rollout_config(num_inference_steps=5, guidance_scale=4.0))
    plan = rollout.plan(torch.Generator(), num_steps=1)
    x = rollout.start(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), plan)
    result = rollout.run(model, x, {"labels": torch.tensor([0, 1])}, plan, record=True)
    t = result.trace[0].timestep.expand(2)
    cond, uncond = net(x, t, torch.tensor([0, 1])), net(x, t, torch.tensor([3, 3]))
    torch.testing.assert_close(result.trace[0].model_output, uncond + 4.0 * (cond - uncond))
    torch.testing.assert_close(result.first_prediction, cond)


def test_plan_draws_start_uniformly_over_the_schedule():
    rollout = Rollout(DDPM_CONFIG, rollout_config(num_inference_steps=5, k_graph_steps=2))
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(6, dtype=torch.long)
    for _ in range(2000):
        plan = rollout.plan(gen)
        counts[plan.num_steps] += 1
        assert plan.begin_index == 5 - plan.num_steps
        assert len(plan.graph_positions) == 1 + min(2, plan.num_steps - 1)
        assert max(plan.graph_positions) < plan.num_steps
    assert counts[0] == 0 and counts[1:].min() > 330  # ~400 each
    with pytest.raises(ValueError, match="1..5 steps"):
        rollout.plan(gen, num_steps=6)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = TinyDenoiser()
        model = TinyAdapter(net)
        rollout = Rollout(DDPM_CONFIG, rollout_config(num_inference_steps=6, gradient_checkpointing=ckpt))
        plan = rollout.plan(torch.Generator().manual_seed(1), num_steps=5)
        torch.manual_seed(1)
        x = rollout.start(torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), plan)
        result = rollout.run(model, x, {"labels": torch.tensor([0, 1])}, plan)
        result.sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_flow_sampler_start_and_target():
    rollout = Rollout(FLOW_CONFIG, rollout_config(sampler="flow_euler", num_inference_steps=8))
    plan = rollout.plan(torch.Generator(), num_steps=3)
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    s = float(rollout.template.sigmas[plan.begin_index])
    torch.testing.assert_close(rollout.start(x0, noise, plan), (1 - s) * x0 + s * noise)
    torch.testing.assert_close(rollout.target(x0, noise, plan), noise - x0)


def test_sampler_that_does_not_fit_the_model_is_a_clear_error():
    with pytest.raises(ValueError, match="does not fit this model.*flow_euler"):
        Rollout(FLOW_CONFIG, rollout_config(sampler="ddim"))
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        Rollout(DDPM_CONFIG, rollout_config(sampler="heun"))
    with pytest.raises(ValueError, match="grad_mode"):
        rollout_config(grad_mode="full")


def test_clip_sample_in_model_config_is_turned_off():
    scheduler = build_scheduler({**DDPM_CONFIG, "clip_sample": True}, "ddim", 10)
    assert scheduler.config.clip_sample is False
