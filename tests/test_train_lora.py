"""Original (LDM / MMDiT) names and kohya-format LoRA files, checked against independent loaders:
diffusers' single-file converters and kohya LoRA loader, and a stand-in of ComfyUI's LoRA patching."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_pipelines import make_pipeline, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from adt_plugin.train.config import LoraConfig
from adt_plugin.train.keymap import to_original_state_dict
from adt_plugin.train.lora import LoraSetupError, add_lora, lora_metadata, save_lora
from adt_plugin.train.models import FAMILIES


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {family: make_pipeline(family, root / family) for family in ("sd1", "sd2", "sdxl", "sd3")}


def denoiser_of(family, folder):
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    return (SD3Transformer2DModel if family == "sd3" else UNet2DConditionModel).from_pretrained(
        folder / FAMILIES[family].denoiser_attr
    )


def inputs(family, denoiser):
    gen = torch.Generator().manual_seed(0)
    cond = {
        "encoder_hidden_states": torch.randn(1, 16, denoiser.config.get("cross_attention_dim") or 64, generator=gen)
    }
    if family == "sdxl":
        cond.update(text_embeds=torch.randn(1, 32, generator=gen), time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
    if family == "sd3":
        cond["pooled_projections"] = torch.randn(1, 64, generator=gen)
    return torch.randn(1, 4, 16, 16, generator=gen), torch.tensor([500.0]), cond


def trained_lora(family, folder, targets=()):
    denoiser = denoiser_of(family, folder)
    config = LoraConfig(rank=4, alpha=2.0, target_modules=tuple(targets))
    add_lora(denoiser, FAMILIES[family], config)
    gen = torch.Generator().manual_seed(1)
    for name, p in denoiser.named_parameters():  # as if trained: both factors non-zero
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.2
    return denoiser, config


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sd3"])
def test_original_names_match_diffusers_single_file_converter(family, pipelines, tmp_path):
    denoiser = denoiser_of(family, pipelines[family])
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in denoiser.state_dict().items()}
    original = to_original_state_dict(family, state, denoiser.config)
    save_file(
        {"model.diffusion_model." + k: v.contiguous() for k, v in original.items()}, tmp_path / "orig.safetensors"
    )
    back = type(denoiser).from_single_file(
        str(tmp_path / "orig.safetensors"),
        config=str(pipelines[family]),
        subfolder=FAMILIES[family].denoiser_attr,
        local_files_only=True,
    )
    loaded = back.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_kohya_lora_loads_in_diffusers_and_gives_the_trained_output(family, pipelines, tmp_path):
    from diffusers import DiffusionPipeline

    fam = FAMILIES[family]
    denoiser, config = trained_lora(family, pipelines[family])
    path = save_lora(
        tmp_path / "lora.safetensors", fam, denoiser, config, lora_metadata(fam, config, "epsilon"), torch.float32
    )
    keys = load_file(path).keys()
    prefix = {
        "sd1": "lora_unet_down_blocks_0_attentions_0_",
        "sd2": "lora_unet_down_blocks_0_attentions_0_",
        "sdxl": "lora_unet_input_blocks_4_1_",
    }[family]  # sd-scripts' names for the first attention block
    assert any(k.startswith(prefix) and k.endswith(".lora_down.weight") for k in keys)
    assert all(
        k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys
    )

    x, t, cond = inputs(family, denoiser)
    with torch.no_grad():
        want = fam.denoise(denoiser, x, t, cond)
        pipe = DiffusionPipeline.from_pretrained(str(pipelines[family]), local_files_only=True)
        base = fam.denoise(pipe.unet, x, t, cond)
        pipe.load_lora_weights(str(path))
        got = fam.denoise(pipe.unet, x, t, cond)
    assert (base - want).abs().max() > 1e-2  # the LoRA changes the output ...
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # ... and diffusers' kohya loader reproduces it


def apply_kohya_comfyui_style(original: dict, lora: dict) -> dict:
    """Minimal stand-in of ComfyUI's LoRA patching (comfy/lora.py model_lora_keys_unet + load_lora and
    comfy/weight_adapter/lora.py at 41444b5236c6): `lora_unet_` + the original name with dots as
    underscores; W += alpha / rank * up @ down, rank = lora_down's first dimension."""
    key_map = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in original if k.endswith(".weight")}
    patched = dict(original)
    names = {k.split(".")[0] for k in lora}
    for name in names:
        assert name in key_map, f"ComfyUI would not load {name}"
        weight = patched[key_map[name]]
        up, down = lora[f"{name}.lora_up.weight"].float(), lora[f"{name}.lora_down.weight"].float()
        scale = lora[f"{name}.alpha"].item() / down.shape[0]
        patched[key_map[name]] = weight + scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    return patched


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_kohya_lora_patched_like_comfyui_gives_the_trained_output(family, pipelines, tmp_path):
    fam = FAMILIES[family]
    targets = (*fam.lora_targets, "norm1.linear", "norm1_context.linear") if family == "sd3" else ()
    denoiser, config = trained_lora(family, pipelines[family], targets)
    path = save_lora(
        tmp_path / "lora.safetensors", fam, denoiser, config, lora_metadata(fam, config, "epsilon"), torch.float32
    )
    lora = load_file(path)
    if family == "sd3":  # q, k, v fused as sd-scripts writes them: rank 3r, alpha x 3
        assert lora["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape[0] == 12
        assert lora["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"].item() == 6.0
        assert "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1.lora_up.weight" in lora
    x, t, cond = inputs(family, denoiser)
    with torch.no_grad():
        want = fam.denoise(denoiser, x, t, cond)
    base = denoiser_of(family, pipelines[family])
    original = to_original_state_dict(family, base.state_dict(), base.config)
    patched = apply_kohya_comfyui_style(original, lora)
    save_file(
        {"model.diffusion_model." + k: v.contiguous() for k, v in patched.items()}, tmp_path / "patched.safetensors"
    )
    merged = type(base).from_single_file(
        str(tmp_path / "patched.safetensors"),
        config=str(pipelines[family]),
        subfolder=fam.denoiser_attr,
        local_files_only=True,
    )
    with torch.no_grad():
        got = fam.denoise(merged, x, t, cond)
        before = fam.denoise(base, x, t, cond)
    assert (before - want).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_lora_targets_that_match_nothing_are_a_clear_error(pipelines):
    denoiser = denoiser_of("sd1", pipelines["sd1"])
    with pytest.raises(LoraSetupError, match=r"target_modules \['to_qq'\] match no layer of this sd1 denoiser"):
        add_lora(denoiser, FAMILIES["sd1"], LoraConfig(target_modules=("to_q", "to_qq")))


def test_lora_metadata_is_what_kohya_tools_read():
    fam = FAMILIES["sd2"]
    meta = lora_metadata(fam, LoraConfig(rank=8, alpha=4.0), "v_prediction", {"adt_strategy": "adt"})
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "8"
    assert meta["ss_base_model_version"] == "sd_v2_v"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and meta["adt_strategy"] == "adt"
