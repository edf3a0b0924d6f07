"""Original (LDM / MMDiT) names and kohya-format LoRA files, checked against independent loaders:
diffusers' single-file converters and kohya LoRA loader, and a stand-in of ComfyUI's LoRA patching."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_pipelines import make_pipeline, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from adt_plugin.train.config import LoraConfig
from adt_plugin.train.keymap import to_original_state_dict
from adt_plugin.train.lora import LoraSetupError, add_lora, lora_metadata, save_lora
from adt_plugin.families import FAMILIES


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {family: make_pipeline(family, root / family) for family in ("sd1", "sd2", "sdxl", "sd3")}


def load_pipe(family, folder):
    from diffusers import DiffusionPipeline

    extra = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}  # the tiny SD3 has no T5
    return DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **extra)


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


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sd3"])
def test_lora_file_loads_in_diffusers_and_gives_the_trained_output(family, pipelines, tmp_path):
    """`pipe.load_lora_weights(file)` as a diffusers user calls it. SD3: diffusers reads only
    its own layout (from sd-scripts' names it silently loads nothing), so SD3 files use it."""
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
        "sd3": "transformer.transformer_blocks.0.attn.to_q",
    }[family]  # sd-scripts' names for the first attention block; diffusers' for SD3
    if family == "sd3":
        assert prefix + ".lora_A.weight" in keys and prefix + ".lora_B.weight" in keys
        assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    else:
        assert any(k.startswith(prefix) and k.endswith(".lora_down.weight") for k in keys)
        assert all(
            k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys
        )

    x, t, cond = inputs(family, denoiser)
    with torch.no_grad():
        want = fam.denoise(denoiser, x, t, cond)
        pipe = load_pipe(family, pipelines[family])
        model = getattr(pipe, fam.denoiser_attr)
        base = fam.denoise(model, x, t, cond)
        pipe.load_lora_weights(str(path))
        got = fam.denoise(model, x, t, cond)
    assert (base - want).abs().max() > 1e-2  # the LoRA changes the output ...
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # ... and diffusers' loader reproduces it


def test_sd_scripts_sd3_lora_converts_to_the_diffusers_layout(pipelines):
    """sd-scripts' SD3 layout (lora_unet_ + MMDiT names, q/k/v fused, alpha x 3), converted by
    keymap.kohya_to_diffusers_lora, loads in diffusers and gives the trained output."""
    from adt_plugin.train.keymap import KOHYA, kohya_to_diffusers_lora
    from adt_plugin.train.lora import to_kohya

    fam = FAMILIES["sd3"]
    targets = (*fam.lora.targets, "norm1.linear", "norm1_context.linear")  # the last block's context norm is swapped
    denoiser, config = trained_lora("sd3", pipelines["sd3"], targets)
    kohya = to_kohya(fam, denoiser, config.alpha, torch.float32, fmt=KOHYA)
    assert kohya["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"].shape[0] == 12
    kohya["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 4)
    kohya["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(4, 4)
    pipe = load_pipe("sd3", pipelines["sd3"])
    encoders = {("lora_te1_", "text_encoder."): pipe.text_encoder, ("lora_te2_", "text_encoder_2."): pipe.text_encoder_2}
    converted, unmatched = kohya_to_diffusers_lora(kohya, pipe.transformer, encoders)
    assert unmatched == ["lora_unet_not_a_layer"]
    assert converted["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].shape[0] == 12
    x, t, cond = inputs("sd3", denoiser)
    with torch.no_grad():
        want = fam.denoise(denoiser, x, t, cond)
        pipe.load_lora_weights(converted)
        got = fam.denoise(pipe.transformer, x, t, cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


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


def apply_diffusers_sd3_comfyui_style(original: dict, lora: dict, config) -> dict:
    """Minimal stand-in of ComfyUI's SD3 diffusers-layout LoRA patching (comfy/lora.py
    model_lora_keys_unet "transformer." keys from comfy/utils.py mmdit_to_diffusers at
    a125cd84): `transformer.<diffusers name>` -> its original weight, q / k / v as row slices
    of the fused qkv, AdaLayerNormContinuous halves swapped; W += up @ down (no alpha: scale 1)."""
    from adt_plugin.train.keymap import original_name, swap_halves

    patched = dict(original)
    for name in {k.rsplit(".lora_", 1)[0] for k in lora}:
        assert name.startswith("transformer."), f"ComfyUI would not load {name}"
        target = original_name("sd3", name.removeprefix("transformer.") + ".weight", config)
        assert target.name in patched, f"ComfyUI would not load {name}"
        up, down = lora[f"{name}.lora_B.weight"].float(), lora[f"{name}.lora_A.weight"].float()
        assert f"{name}.alpha" not in lora
        diff = up @ down
        weight = patched[target.name].clone()
        rows = weight.shape[0] // target.parts
        weight[target.part * rows : (target.part + 1) * rows] += swap_halves(diff) if target.swap else diff
        patched[target.name] = weight
    return patched


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_lora_file_patched_like_comfyui_gives_the_trained_output(family, pipelines, tmp_path):
    fam = FAMILIES[family]
    targets = (*fam.lora.targets, "norm1.linear", "norm1_context.linear") if family == "sd3" else ()
    denoiser, config = trained_lora(family, pipelines[family], targets)
    path = save_lora(
        tmp_path / "lora.safetensors", fam, denoiser, config, lora_metadata(fam, config, "epsilon"), torch.float32
    )
    lora = load_file(path)
    if family == "sd3":  # the last block's context norm: halves stored in the other order in the original
        assert "transformer.transformer_blocks.1.norm1_context.linear.lora_B.weight" in lora
    x, t, cond = inputs(family, denoiser)
    with torch.no_grad():
        want = fam.denoise(denoiser, x, t, cond)
    base = denoiser_of(family, pipelines[family])
    original = to_original_state_dict(family, base.state_dict(), base.config)
    if family == "sd3":
        patched = apply_diffusers_sd3_comfyui_style(original, lora, base.config)
    else:
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
