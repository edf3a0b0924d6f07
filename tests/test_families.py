"""Model families: the rollout against each family's own diffusers pipeline (FLUX.1-dev,
schnell, Z-Image-Turbo, Z-Image with CFG) at two resolutions, gradient equalisation per
guidance mode, the registry's detection, and the facts the core reads."""

import json

import numpy as np
import pytest
import torch
from tiny import tiny_dinov2
from tiny_flow_pipelines import make_flux_pipeline, make_zimage_pipeline
from tiny_pipelines import make_pipeline, one_thread  # noqa: F401 - one torch thread for this module

from adt_plugin import AdtSettings, TrainBatch, build_strategy, selfcheck
from adt_plugin.adapter import GUIDANCE_KEY
from adt_plugin.decode import LatentDecoder
from adt_plugin.families import (
    FAMILIES,
    FamilyAdapter,
    FamilyError,
    family_for,
    family_for_scheduler,
    get_family,
    interchangeable,
)
from adt_plugin.families.flux import image_ids, pack_latents, unpack_latents
from adt_plugin.noise import NoiseSchedule
from adt_plugin.rollout import Rollout
from adt_plugin.samplers import SAMPLERS, build_scheduler, is_flow_config

FLOW = "FlowMatchEulerDiscreteScheduler"


def rollout_config(sampler="flow_euler", steps=4, guidance=0.0, **kw):
    return AdtSettings(sampler=sampler, num_inference_steps=steps, guidance_scale=guidance, **kw).rollout_config()


def scheduler_config(pipe):
    return {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}


@pytest.fixture(scope="module")
def pipes():
    return {"flux_dev": make_flux_pipeline("dev"), "flux_schnell": make_flux_pipeline("schnell"), "zimage": make_zimage_pipeline()}


def adapter_for(pipe, family):
    return FamilyAdapter(family, pipe.transformer, scheduler_config(pipe), family.empty_text(pipe, "cpu"), LatentDecoder(pipe.vae))


# --- the rollout is the family's own sampler ---------------------------------------------

# (family, pipeline, guidance value as the pipeline takes it, steps)
PIPELINE_CASES = [
    ("flux_dev", "flux_dev", 3.5, 4),  # embedded guidance, shift by token count
    ("flux_schnell", "flux_schnell", 0.0, 4),  # no guidance
    ("zimage_turbo", "zimage", 0.0, 9),  # no guidance, static shift 3
    ("zimage", "zimage", 2.0, 5),  # CFG written cond + w (cond - uncond)
]


def _pipeline_latents(name, pipe, family, captions, noise, guidance, steps):
    """The diffusers pipeline's own sampling loop from `noise` (its latents), returned as [B, C, H, W]."""
    h, w = noise.shape[-2:]
    scale = pipe.vae_scale_factor
    if name.startswith("flux"):
        cond = family.encode_text(pipe, captions, "cpu")
        out = pipe(
            prompt_embeds=cond["encoder_hidden_states"],
            pooled_prompt_embeds=cond["pooled_projections"],
            latents=pack_latents(noise),
            height=h * scale,
            width=w * scale,
            num_inference_steps=steps,
            guidance_scale=guidance,
            max_sequence_length=family.max_sequence_length,
            output_type="latent",
        ).images
        return unpack_latents(out, h, w)
    embeds, _ = pipe.encode_prompt(list(captions), device="cpu", do_classifier_free_guidance=False)
    negative, _ = pipe.encode_prompt([""] * len(captions), device="cpu", do_classifier_free_guidance=False)
    return pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        latents=noise,
        height=h * scale,
        width=w * scale,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="latent",
    ).images


@pytest.mark.parametrize("size", [8, 16])
@pytest.mark.parametrize("name,pipe_name,guidance,steps", PIPELINE_CASES, ids=[c[0] for c in PIPELINE_CASES])
def test_full_rollout_equals_the_diffusers_pipeline(pipes, name, pipe_name, guidance, steps, size):
    """From pure noise over the whole schedule, the rollout (off mode) is the pipeline's
    own loop, bit for bit up to float rounding, at two resolutions."""
    pipe, family = pipes[pipe_name], get_family(name)
    captions = ["a cat", "dog"]
    noise = torch.randn(2, 16, size, size, generator=torch.Generator().manual_seed(size))
    expected = _pipeline_latents(pipe_name, pipe, family, captions, noise, guidance, steps)

    rollout = Rollout(scheduler_config(pipe), rollout_config(steps=steps, guidance=guidance), family=family)
    plan = rollout.plan(torch.Generator(), num_steps=steps)
    x_start = rollout.start(torch.zeros_like(noise), noise, plan)  # sigma = 1: the noise itself
    torch.testing.assert_close(x_start, noise)
    result = rollout.run(adapter_for(pipe, family), x_start, family.encode_text(pipe, captions, "cpu"), plan, grad_mode="off")
    torch.testing.assert_close(result.sample, expected, rtol=1e-5, atol=1e-5)


def test_flux_dev_timesteps_depend_on_the_latent_size_and_are_cached_per_size(pipes):
    config = scheduler_config(pipes["flux_dev"])
    rollout = Rollout(config, rollout_config(guidance=3.5), family=get_family("flux_dev"))
    small, large = rollout.scheduler_for((2, 16, 8, 8)), rollout.scheduler_for((16, 16))
    assert small is rollout.scheduler_for((8, 8)) and large is not small
    assert float(small.timesteps[1]) < float(large.timesteps[1])  # more tokens, larger shift: more time at high noise
    schnell = Rollout(scheduler_config(pipes["flux_schnell"]), rollout_config(guidance=0), family=get_family("flux_schnell"))
    assert schnell.scheduler_for((8, 8)) is schnell.scheduler_for((16, 16))  # static shift: one schedule


# --- gradient equalisation per guidance mode ----------------------------------------------


@pytest.mark.parametrize("case", selfcheck.FAMILY_CASES, ids=lambda c: f"{c[0]}-{c[3][0]}")
def test_selfcheck_guidance_modes_and_shifted_schedule(case):
    results = selfcheck.check_family(*case)
    failed = [f"{r.name}: {r.detail}" for r in results if not r.ok]
    assert len(results) == 5 and not failed, failed


@pytest.mark.parametrize("name,pipe_name,guidance", [("flux_dev", "flux_dev", 3.5), ("zimage", "zimage", 2.0), ("zimage_turbo", "zimage", 0.0)])
def test_eq11_gradient_equalisation_on_the_real_transformers(pipes, name, pipe_name, guidance):
    """dL/dx_ti = dL/dx0 at every step and the parameter gradient = sum_i b_i dL/dx0 . d eps_i / d theta,
    through the packed FLUX call with its guidance input and through Z-Image's list call with CFG."""
    pipe, family = pipes[pipe_name], get_family(name)
    rollout = Rollout(scheduler_config(pipe), rollout_config(steps=5, guidance=guidance, k_graph_steps=2), family=family)
    model = adapter_for(pipe, family)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    cond = family.encode_text(pipe, ["a cat", "dog"], "cpu")
    params = [p for p in pipe.transformer.parameters()]
    results = selfcheck._check_rollout(name, model, params, rollout, x0, noise, cond, 4, 2, 1e-4)
    failed = [f"{r.name}: {r.detail}" for r in results if not r.ok]
    assert not failed, failed


def test_selfcheck_fails_when_the_schedule_ignores_the_latent_size(monkeypatch):
    from adt_plugin.families.flux import FluxFamily

    # a rollout that prepares one schedule (at the family's usual 128x128) for every size
    monkeypatch.setattr(FluxFamily, "depends_on_size", lambda self, config: False)
    results = {r.name.rsplit(" ", 1)[-1]: r for r in selfcheck.check_family("flux_dev", selfcheck.FLUX_DEV, 3.5, (16, 16))}
    assert not results["schedule"].ok and not results["values"].ok


def test_selfcheck_fails_when_the_guidance_value_is_not_embedded(monkeypatch):
    monkeypatch.setattr(Rollout, "guided_inputs", lambda self, model, cond, like: (cond, None, None))
    results = {r.name.rsplit(" ", 1)[-1]: r for r in selfcheck.check_family("flux_dev", selfcheck.FLUX_DEV, 5.0, (8, 8))}
    assert not results["values"].ok  # (at 3.5, the training value the denoiser falls back on, it would pass)


def test_guidance_distilled_families_refuse_a_guidance_value():
    flux = {"_class_name": FLOW, "shift": 1.0}
    with pytest.raises(ValueError, match="FLUX.1-schnell is guidance-distilled.*set guidance_scale = 0"):
        Rollout(flux, rollout_config(guidance=3.5), family=get_family("flux_schnell"))
    Rollout(flux, rollout_config(guidance=1.0), family=get_family("flux_schnell"))
    with pytest.raises(ValueError, match="Z-Image-Turbo"):  # its pipeline guides from 1 up: cond + 1 (cond - uncond)
        Rollout(flux, rollout_config(steps=9, guidance=1.0), family=get_family("zimage_turbo"))
    with pytest.raises(ValueError, match="FLUX.1-dev is a flow model"):
        Rollout(selfcheck.DDPM_EPS, rollout_config("ddim", guidance=3.5), family=get_family("flux_dev"))


def test_embedded_guidance_goes_into_the_denoiser_and_training_calls_use_the_training_value(pipes):
    pipe, family = pipes["flux_dev"], get_family("flux_dev")
    model = adapter_for(pipe, family)
    cond = family.encode_text(pipe, ["a cat"], "cpu")
    x, t = torch.randn(1, 16, 8, 8), torch.tensor([500.0])
    with torch.no_grad():
        plain = model.denoise(x, t, cond)
        at_train = model.denoise(x, t, {**cond, GUIDANCE_KEY: torch.tensor([family.guidance.train_value])})
        at_other = model.denoise(x, t, {**cond, GUIDANCE_KEY: torch.tensor([1.0])})
    assert family.guidance.train_value == 3.5
    torch.testing.assert_close(plain, at_train)
    assert not torch.allclose(plain, at_other)


# --- training timesteps and the strategies ------------------------------------------------


def test_flow_training_shift_follows_the_latent_size_like_sd_scripts_flux_shift(pipes):
    config = scheduler_config(pipes["flux_dev"])
    schedule = NoiseSchedule(config, get_family("flux_dev"))
    for size in ((8, 8), (16, 16)):
        t = schedule.sample_timesteps(64, torch.Generator().manual_seed(0), latent_size=size)
        u = torch.rand(64, generator=torch.Generator().manual_seed(0))
        seq = (size[0] // 2) * (size[1] // 2)
        mu = 0.5 + (seq - 16) * (1.15 - 0.5) / (256 - 16)  # sd-scripts' get_lin_function with the tiny anchors
        expected = np.exp(mu) / (np.exp(mu) + (1 / u - 1))  # sd-scripts' time_shift(mu, 1, u)
        torch.testing.assert_close(t / 1000, expected.float(), rtol=1e-5, atol=1e-6)
    # without a family (or a static shift) the draws are what they always were
    plain = NoiseSchedule({"_class_name": FLOW, "shift": 3.0})
    u = torch.rand(8, generator=torch.Generator().manual_seed(1))
    t = plain.sample_timesteps(8, torch.Generator().manual_seed(1), latent_size=(16, 16))
    torch.testing.assert_close(t / 1000, 3 * u / (1 + 2 * u))


@pytest.mark.parametrize("name,pipe_name,guidance", [("flux_dev", "flux_dev", 3.5), ("zimage_turbo", "zimage", 0.0)])
def test_adt_and_ft_strategies_train_the_flow_families(pipes, name, pipe_name, guidance):
    pipe, family = pipes[pipe_name], get_family(name)
    model = adapter_for(pipe, family)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text = family.encode_text(pipe, ["a cat", "dog"], "cpu")
    for size in (8, 16):
        batch = TrainBatch(torch.randn(2, 16, size, size, generator=gen), text)
        settings = AdtSettings(
            sampler="flow_euler", num_inference_steps=4, guidance_scale=guidance, g_every=1, taps=(1, 3), head_channels=8,
            d_warmup_steps=1, g_warmup_steps=1,
        )
        for strategy in (build_strategy(settings, model.scheduler_config, backbone=tiny_dinov2(), family=family),
                         build_strategy(settings.replace(strategy="ft"), model.scheduler_config, family=family)):
            pipe.transformer.zero_grad(set_to_none=True)
            out = strategy(model, batch)
            assert out.updates_generator and torch.isfinite(out.loss)
            out.loss.backward()
            grads = [p.grad for p in pipe.transformer.parameters() if p.grad is not None]
            assert grads and sum(float(g.abs().sum()) for g in grads) > 0


# --- the registry ----------------------------------------------------------------------------


def test_detection_from_pipelines_and_folders(pipes, tmp_path):
    assert family_for(pipes["flux_dev"]).name == "flux_dev"
    assert family_for(pipes["flux_schnell"]).name == "flux_schnell"
    assert family_for(pipes["zimage"]).name == "zimage"  # Turbo has the same weights: named, not detected
    pipes["flux_schnell"].save_pretrained(str(tmp_path / "schnell"))
    assert family_for(tmp_path / "schnell").name == "flux_schnell"
    for name in ("sd1", "sd2", "sdxl", "sd3"):
        folder = make_pipeline(name, tmp_path / name, layers_per_block=1)
        assert family_for(folder).name == name
        assert family_for(str(folder)).name == name


def test_detection_from_state_dicts_and_configs(pipes, tmp_path):
    from safetensors.torch import save_file

    assert family_for(pipes["flux_dev"].transformer.state_dict()).name == "flux_dev"
    assert family_for(pipes["flux_schnell"].transformer.state_dict()).name == "flux_schnell"
    assert family_for(pipes["zimage"].transformer.state_dict()).name == "zimage"
    # the original (BFL) layout, bare and as ComfyUI saves it
    bfl = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(1), "single_blocks.0.linear1.weight": torch.zeros(1)}
    assert family_for(bfl).name == "flux_schnell"
    comfy = {"model.diffusion_model." + k: v for k, v in {**bfl, "guidance_in.in_layer.weight": torch.zeros(1)}.items()}
    save_file(comfy, str(tmp_path / "flux1-dev.safetensors"))
    assert family_for(tmp_path / "flux1-dev.safetensors").name == "flux_dev"
    assert family_for({"_class_name": "FluxTransformer2DModel", "guidance_embeds": True}).name == "flux_dev"
    assert family_for({"_class_name": "StableDiffusionXLPipeline"}).name == "sdxl"
    with pytest.raises(FamilyError, match="could be flux_dev, flux_schnell"):
        family_for({"_class_name": "FluxPipeline"})
    with pytest.raises(FamilyError, match="not a family ADT knows"):
        family_for({"_class_name": "KandinskyPipeline"})
    with pytest.raises(FamilyError, match="no known denoiser keys"):
        family_for({"text_model.embeddings.weight": torch.zeros(1)})
    with pytest.raises(FamilyError, match="scheduler config does not name a family"):
        family_for({"shift": 3.0})


def test_names_errors_and_variants():
    assert get_family("flux_dev") is FAMILIES["flux_dev"]
    with pytest.raises(FamilyError, match="did you mean 'flux_dev'"):
        get_family("flux-dev")
    assert interchangeable("zimage", "zimage_turbo") and interchangeable("sd1", "sd2")
    assert not interchangeable("flux_dev", "flux_schnell") and not interchangeable("sd1", "sdxl")


# --- the facts -------------------------------------------------------------------------------


def test_flux_packing_and_ids_are_the_pipelines():
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 8, 12)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 8, 12))
    torch.testing.assert_close(unpack_latents(packed, 8, 12), x)
    torch.testing.assert_close(image_ids(8, 12, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_states_its_facts_and_its_preset_runs(name):
    family = FAMILIES[name]
    assert family.label and family.pipeline_class and family.denoiser_class and family.lora.targets
    assert family.lora.original or family.lora.file_format == "diffusers"  # a kohya file needs original names
    assert set(family.text_keys) <= set(family.cond_keys)
    flow = family.prediction == "flow"
    config = {"_class_name": FLOW, "shift": 3.0} if flow else dict(selfcheck.DDPM_EPS)
    preset = dict(family.preset)
    if preset:
        assert SAMPLERS[preset["sampler"]].flow == flow
        Rollout(config, rollout_config(preset["sampler"], preset["num_inference_steps"], preset["guidance_scale"]), family=family)
    assert family.vae.latent_channels == (16 if flow else 4)


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "sd3"])
def test_the_existing_families_sample_as_before(tmp_path, name):
    """The SD families' timesteps are the scheduler's own, as without a family."""
    folder = make_pipeline(name, tmp_path / name, layers_per_block=1)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    sampler = "flow_euler" if is_flow_config(config) else "ddim"
    plain = build_scheduler(config, sampler, 10)
    with_family = build_scheduler(config, sampler, 10, family=get_family(name), latent_size=(8, 8))
    assert torch.equal(plain.timesteps, with_family.timesteps)
    assert family_for_scheduler(config).guidance.mode == "cfg"


def test_uncond_replaces_the_text_keys_and_keeps_the_rest():
    family = get_family("zimage")
    cond = {"encoder_hidden_states": torch.randn(3, 5, 4), "encoder_attention_mask": torch.ones(3, 5, dtype=torch.long)}
    empty = {"encoder_hidden_states": torch.zeros(1, 5, 4), "encoder_attention_mask": torch.tensor([[1, 1, 0, 0, 0]])}
    out = family.uncond(cond, empty)
    assert out["encoder_hidden_states"].shape == (3, 5, 4) and not out["encoder_hidden_states"].any()
    assert out["encoder_attention_mask"].sum().item() == 6
    sdxl = get_family("sdxl")
    cond = {"encoder_hidden_states": torch.randn(2, 3, 4), "text_embeds": torch.randn(2, 4), "time_ids": torch.randn(2, 6)}
    out = sdxl.uncond(cond, {"encoder_hidden_states": torch.zeros(1, 3, 4), "text_embeds": torch.zeros(1, 4)})
    assert out["time_ids"] is cond["time_ids"] and not out["text_embeds"].any()


def test_detection_of_the_sd_families_from_weights(tmp_path):
    """Diffusers state dicts and original-layout single files (what civitai / A1111 files are)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    from tiny_pipelines import write_sd1_single_file

    from adt_plugin.train.keymap import to_original_state_dict

    folders = {name: make_pipeline(name, tmp_path / name, layers_per_block=1) for name in ("sd1", "sd2", "sdxl", "sd3")}
    for name in ("sd1", "sd2", "sdxl"):
        unet = UNet2DConditionModel.from_pretrained(folders[name] / "unet")
        assert family_for(unet.state_dict()).name == name
        original = {"model.diffusion_model." + k: v for k, v in to_original_state_dict(name, unet.state_dict(), unet.config).items()}
        assert family_for(original).name == name
    sd3 = SD3Transformer2DModel.from_pretrained(folders["sd3"] / "transformer")
    assert family_for(sd3.state_dict()).name == "sd3"
    assert family_for({"model.diffusion_model." + k: v for k, v in to_original_state_dict("sd3", sd3.state_dict(), sd3.config).items()}).name == "sd3"
    assert family_for(write_sd1_single_file(folders["sd1"], tmp_path / "sd1.safetensors")).name == "sd1"
