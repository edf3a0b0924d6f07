"""The compare node on FLUX.1 (stand-ins of ComfyUI's modules): the node's cfg applied as
ComfyUI's FLUX workflows apply it (FLUX.1-dev: FluxGuidance on the positive conditioning
with KSampler cfg 1; schnell: cfg 1, a guiding cfg refused), SD models unchanged."""

import sys
import types

import pytest
import torch

from comfyui_nodes import core


def comfy_model(keys):
    """A ComfyUI MODEL stand-in: its BaseModel's state dict (keys as ComfyUI names them)."""
    state = {k: torch.zeros(1) for k in keys}
    return types.SimpleNamespace(model=types.SimpleNamespace(state_dict=lambda: state))


FLUX_DEV = comfy_model(["diffusion_model.double_blocks.0.img_attn.qkv.weight", "diffusion_model.guidance_in.in_layer.weight"])
FLUX_SCHNELL = comfy_model(["diffusion_model.double_blocks.0.img_attn.qkv.weight"])
SD1 = comfy_model(["diffusion_model.input_blocks.1.1.proj_in.weight"])


@pytest.fixture
def standins(monkeypatch):
    """nodes.common_ksampler, node_helpers.conditioning_set_values (as comfy_extras/nodes_flux.py's
    FluxGuidance calls it) and comfy.model_management, recording the calls (ComfyUI a125cd84)."""
    calls = []
    nodes_mod = types.ModuleType("nodes")

    def common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent):
        calls.append({"cfg": cfg, "positive": positive, "negative": negative})
        return ({"samples": torch.zeros(1, 16, 4, 4)},)

    nodes_mod.common_ksampler = common_ksampler
    helpers = types.ModuleType("node_helpers")
    helpers.conditioning_set_values = lambda cond, values: [[t, {**d, **values}] for t, d in cond]
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = lambda: None
    mm.intermediate_device = lambda: torch.device("cpu")
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    for name, module in {"nodes": nodes_mod, "node_helpers": helpers, "comfy": comfy, "comfy.model_management": mm}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


class Clip:
    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens):
        return [[torch.zeros(1, 2, 4), {"pooled_output": torch.zeros(1, 4), "text": tokens}]]


class Vae:
    def decode(self, latents):
        return torch.zeros(latents.shape[0], 32, 32, 3)


def sample(model, cfg):
    from comfyui_nodes import nodes

    sampling = core.Sampling("euler", "simple", 4, cfg, 32, 32, "")
    rows = core.PromptSet.parse("a cat", 0, 1).rows()
    return nodes.sample_column(model, Clip(), Vae(), rows, ["a cat"], sampling, types.SimpleNamespace(update=lambda n: None))


def test_flux_dev_gets_the_cfg_as_flux_guidance_with_ksampler_cfg_1(standins):
    sample(FLUX_DEV, 3.5)
    (call,) = standins
    assert call["cfg"] == 1.0 and call["positive"][0][1]["guidance"] == 3.5 and "guidance" not in call["negative"][0][1]
    assert core.Guidance.for_family(__import__("comfyui_nodes.nodes").nodes.model_family(FLUX_DEV), 3.5).note.startswith("FLUX.1-dev: cfg 3.5 applied as FluxGuidance")


def test_flux_schnell_samples_without_guidance_and_refuses_a_guiding_cfg(standins):
    sample(FLUX_SCHNELL, 1.0)
    assert standins[0]["cfg"] == 1.0 and "guidance" not in standins[0]["positive"][0][1]
    with pytest.raises(ValueError, match="FLUX.1-schnell is guidance-distilled.*set cfg to 1"):
        sample(FLUX_SCHNELL, 3.5)


def test_sd_models_keep_the_ksampler_cfg(standins):
    sample(SD1, 7.0)
    sample(comfy_model(["diffusion_model.something_else.weight"]), 5.0)  # a model ADT has no family for
    assert [c["cfg"] for c in standins] == [7.0, 5.0] and all("guidance" not in c["positive"][0][1] for c in standins)
