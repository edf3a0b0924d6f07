"""`adt train`, `adt eval` and `adt bench` on tiny FLUX.1 (dev, schnell) and Z-Image-Turbo pipelines.

LoRA files in sd-scripts' FLUX layout (what ComfyUI and sd-scripts load), loaded
back by adt eval's loader and, for the layers its converter reads at any width, by
diffusers' own `load_lora_weights`; the fused layers' names and sizes checked
against diffusers' FLUX converters at FLUX.1's real widths (synthetic tensors on a
meta-device model: no weights of that size are made).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_flow_pipelines import make_flux_pipeline, make_zimage_pipeline
from tiny_pipelines import make_image_folder, one_thread, save_tiny_dinov2  # noqa: F401 (one_thread: an autouse fixture)

from adt_plugin.checkpoint import disc_path_for
from adt_plugin.families import get_family
from adt_plugin.train.config import ConfigError, LoraConfig, load_run_config
from adt_plugin.train.loop import train

GUIDANCE = {"flux_dev": 3.5, "flux_schnell": 0.0, "zimage_turbo": 0.0}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-assets")
    models = {
        "flux_dev": root / "flux-dev",
        "flux_schnell": root / "flux-schnell",
        "zimage_turbo": root / "zimage",
    }
    make_flux_pipeline("dev", models["flux_dev"])
    make_flux_pipeline("schnell", models["flux_schnell"], seed=1)
    make_zimage_pipeline(models["zimage_turbo"])
    data = make_image_folder(root / "data", count=3, size=(32, 32))
    make_image_folder(data, count=2, size=(48, 32), seed=1)  # a second bucket: another latent size
    return {"models": models, "data": data, "dinov2": save_tiny_dinov2(root / "dinov2")}


def config_for(assets, out, family, strategy="adt", method="lora", overrides=()):
    named = 'family = "zimage_turbo"' if family == "zimage_turbo" else ""  # Turbo has Z-Image's weights
    text = f"""
[model]
path = "{assets["models"][family]}"
{named}
[data]
folder = "{assets["data"]}"
resolution = 32
bucket_step = 16
[train]
output_dir = "{out}"
output_name = "tiny"
max_steps = 4
batch_size = 2
learning_rate = 2e-2  # a few steps must move the LoRA visibly
method = "{method}"
[lora]
rank = 4
alpha = 2.0
[adt]
strategy = "{strategy}"
sampler = "flow_euler"
num_inference_steps = 4
guidance_scale = {GUIDANCE[family]}
backbone_path = "{assets["dinov2"]}"
taps = [1, 3]
head_channels = 8
g_every = 2
d_lr = 1e-3
g_warmup_steps = 0
d_warmup_steps = 0
"""
    path = Path(out).parent / f"{Path(out).name}.toml"
    path.write_text(text)
    return load_run_config(path, overrides=list(overrides))


def load_pipe(assets, family):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(assets["models"][family]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_inputs(pipe, family_name, seed=0):
    """Latents, a timestep and the family's conditioning for one call of the denoiser."""
    family = get_family(family_name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cond = family.encode_text(pipe, ["pic 1"], "cpu")
    return torch.randn(1, 16, 8, 8, generator=gen), torch.tensor([600.0]), cond


def trained_denoiser(assets, family_name, state_folder, lora: LoraConfig):
    """A fresh copy of the base denoiser with the LoRA weights of a saved state (float32)."""
    from adt_plugin.train.lora import add_lora, load_peft_state

    family = get_family(family_name)
    denoiser = getattr(load_pipe(assets, family_name), family.denoiser_attr)
    add_lora(denoiser, family, lora)
    load_peft_state(denoiser, load_file(state_folder / "trainable.safetensors"))
    return denoiser.eval()


@pytest.mark.parametrize("family", ["flux_dev", "flux_schnell", "zimage_turbo"])
def test_a_lora_trains_end_to_end_and_its_file_gives_the_trained_output(assets, tmp_path, family):
    from adt_plugin.eval.lora_file import load_lora

    out = tmp_path / "out"
    config = config_for(assets, out, family, overrides=["sample.every_n_steps=2", 'sample.prompts=["pic 0"]'])
    messages = []
    result = train(config, echo=messages.append)
    assert result.status == "done" and result.step == 4
    assert any(m.startswith(f"{family if family != 'zimage_turbo' else 'zimage_turbo'} (flow), lora: ") for m in messages)
    assert disc_path_for(out / "tiny.safetensors").is_file()
    assert sorted(p.name for p in (out / "samples").iterdir()) == [f"tiny-step0000000{i}.png" for i in (0, 2, 4)]

    lora = load_file(out / "tiny.safetensors")
    with safe_open(str(out / "tiny.safetensors"), "pt") as handle:
        meta = handle.metadata()
    fam = get_family(family)
    if fam.lora.file_format == "kohya":  # FLUX: sd-scripts' networks/lora_flux.py layout
        assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
        assert meta["modelspec.architecture"] == f"{fam.architecture}/lora"
        assert lora["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 12  # q, k, v fused: 3 x rank 4
        assert lora["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 16 + 64, 16)  # q, k, v, MLP in
        assert float(lora["lora_unet_single_blocks_0_linear1.alpha"]) == 4 * 2.0  # alpha / rank unchanged
        assert "lora_unet_double_blocks_0_img_mod_lin.lora_down.weight" in lora  # modulations: sd-scripts' default
        assert not any(k.startswith("lora_unet_final_layer") for k in lora)  # the final layer: not trained
    else:  # Z-Image: diffusers' layout, what ZImagePipeline loads
        assert all(k.startswith("transformer.") for k in lora) and not any(k.endswith(".alpha") for k in lora)
    assert any(k.endswith(("lora_up.weight", "lora_B.weight")) and v.abs().sum() > 0 for k, v in lora.items())

    # adt eval's loader (FLUX: sd-scripts' layout converted at any width) reproduces the trained denoiser
    trained = trained_denoiser(assets, family, out / "tiny-step00000004-state", config.lora)
    pipe = load_pipe(assets, family)
    x, t, cond = denoiser_inputs(pipe, family)
    denoiser = getattr(pipe, fam.denoiser_attr)
    with torch.no_grad():
        before = fam.denoise(denoiser, x, t, cond)
        want = fam.denoise(trained, x, t, cond)
        load_lora(pipe, fam, out / "tiny.safetensors", "adt")
        got = fam.denoise(denoiser, x, t, cond)
    assert (want - before).abs().max() > 1e-3  # the LoRA changes the output ...
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)  # ... and the file (fp16) gives the trained one


def test_diffusers_own_loader_reads_the_flux_lora_and_changes_the_output(assets, tmp_path):
    """diffusers' load_lora_weights converts sd-scripts' FLUX layout itself; its converter
    takes the single blocks' fused linear1 at FLUX.1's real widths only, so this tiny
    model trains the double blocks (the real-width check of linear1 is the next test)."""
    out = tmp_path / "out"
    double = [f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]
    config = config_for(assets, out, "flux_dev", overrides=[f"lora.target_modules={json.dumps(double)}", "train.max_steps=2"])
    train(config, echo=lambda m: None)
    lora = load_file(out / "tiny.safetensors")
    assert all(k.startswith("lora_unet_double_blocks_") for k in lora)
    fam = get_family("flux_dev")
    trained = trained_denoiser(assets, "flux_dev", out / "tiny-step00000002-state", config.lora)
    pipe = load_pipe(assets, "flux_dev")
    x, t, cond = denoiser_inputs(pipe, "flux_dev")
    with torch.no_grad():
        before = fam.denoise(pipe.transformer, x, t, cond)
        want = fam.denoise(trained, x, t, cond)
        pipe.load_lora_weights(str(out / "tiny.safetensors"))
        got = fam.denoise(pipe.transformer, x, t, cond)
    assert (got - before).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)


def _flux_at_real_width():
    """FLUX.1's transformer (24 heads x 128: width 3072, MLP 12288) with one double and
    one single block, on the meta device: shapes, no memory."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)


def test_flux_original_names_match_diffusers_single_file_converter_at_real_width():
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from adt_plugin.train.keymap import to_original_state_dict

    model = _flux_at_real_width()
    gen = torch.Generator().manual_seed(0)
    # rows as the real ones (what fusing and splitting act on), two columns of values
    state = {k: torch.randn(v.shape[0], *([2] if v.ndim > 1 else []), generator=gen) for k, v in model.state_dict().items()}
    original = to_original_state_dict("flux_dev", state, model.config)
    assert original["single_blocks.0.linear1.weight"].shape[0] == 3 * 3072 + 12288
    assert "double_blocks.0.img_attn.norm.query_norm.scale" in original and "final_layer.adaLN_modulation.1.weight" in original
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert back.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(back[key], state[key], msg=key)


def test_flux_kohya_lora_matches_diffusers_kohya_converter_at_real_width():
    """The fused layers of a FLUX LoRA file (rank 3r qkv, rank 4r linear1 of unequal parts)
    split back by diffusers' own sd-scripts converter give each layer's update."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from adt_plugin.train.keymap import kohya_to_diffusers_lora
    from adt_plugin.train.lora import add_lora, peft_state, to_kohya

    family = get_family("flux_dev")
    model = _flux_at_real_width()
    add_lora(model, family, LoraConfig(rank=2, alpha=1.0))
    gen = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():  # real (CPU) LoRA factors on the meta base
        if name.endswith((".lora_A.default", ".lora_B.default")):
            module.weight = torch.nn.Parameter(torch.randn(module.weight.shape, generator=gen) * 0.1)
    kohya = to_kohya(family, model, alpha=1.0, dtype=torch.float32)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 8)
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    ours, unmatched = kohya_to_diffusers_lora(kohya, model, {}, family)
    assert unmatched == []
    state = peft_state(model)
    scale = 1.0 / 2
    for module in {k.rsplit(".lora_A.", 1)[0] for k in state if ".lora_A." in k}:
        want = scale * state[f"{module}.lora_B.weight"] @ state[f"{module}.lora_A.weight"]
        for converted in (theirs, ours):
            key = f"transformer.{module}"
            update = converted[f"{key}.lora_B.weight"] @ converted[f"{key}.lora_A.weight"]
            torch.testing.assert_close(update, want, msg=module)


def test_full_finetunes_save_in_each_familys_layout(assets, tmp_path):
    from diffusers import FluxTransformer2DModel, ZImageTransformer2DModel

    from adt_plugin.train.keymap import to_original_state_dict

    # FLUX.1-dev: one file in BFL's layout, what ComfyUI's Load Diffusion Model reads
    out = tmp_path / "flux"
    train(config_for(assets, out, "flux_dev", "ft", "full", ["train.max_steps=2", "save.precision='fp32'"]), echo=lambda m: None)
    saved = load_file(out / "tiny.safetensors")
    trained = load_file(out / "tiny-step00000002-state" / "trainable.safetensors")
    config = FluxTransformer2DModel.load_config(str(assets["models"]["flux_dev"] / "transformer"))
    want = {"model.diffusion_model." + k: v for k, v in to_original_state_dict("flux_dev", trained, config).items()}
    assert saved.keys() == want.keys() and "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in saved
    assert all(torch.equal(saved[k], want[k]) for k in saved)
    base = load_file(assets["models"]["flux_dev"] / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(trained[k], base[k]) for k in base)

    # Z-Image: no original layout is mapped: a single file is refused before loading, a folder works
    with pytest.raises(ConfigError, match="no single-file .* layout is known for Z-Image-Turbo; set save.format = 'diffusers'"):
        train(config_for(assets, tmp_path / "z1", "zimage_turbo", "ft", "full"), echo=lambda m: None)
    out = tmp_path / "z2"
    train(config_for(assets, out, "zimage_turbo", "ft", "full", ["train.max_steps=2", "save.format='diffusers'"]), echo=lambda m: None)
    reloaded = ZImageTransformer2DModel.from_pretrained(str(out / "tiny" / "transformer"))
    assert any(not torch.equal(p, q) for p, q in zip(reloaded.state_dict().values(), load_pipe(assets, "zimage_turbo").transformer.state_dict().values()))


def test_a_resumed_flux_run_equals_an_uninterrupted_one(assets, tmp_path):
    over = ["train.max_steps=4", "save.every_n_steps=2"]
    train(config_for(assets, tmp_path / "straight", "flux_dev", overrides=over), echo=lambda m: None)
    state = tmp_path / "straight" / "tiny-step00000002-state"
    result = train(config_for(assets, tmp_path / "resumed", "flux_dev", overrides=over), resume=state, echo=lambda m: None)
    assert result.status == "done" and result.step == 4
    for name in ("tiny.safetensors", "tiny.adt_disc.safetensors", "tiny-step00000004-state/trainable.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_flux_settings_that_do_not_fit_stop_before_the_model_loads(assets, tmp_path, monkeypatch):
    from adt_plugin.train import setup

    monkeypatch.setattr(setup, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r"guidance_scale: FLUX.1-schnell is guidance-distilled.*set guidance_scale = 0"):
        train(config_for(assets, tmp_path / "a", "flux_schnell", overrides=["adt.guidance_scale=3.5"]), echo=lambda m: None)
    with pytest.raises(ConfigError, match="sampler = 'ddim' does not fit a flux_dev model; use one of flow_euler"):
        train(config_for(assets, tmp_path / "b", "flux_dev", overrides=["adt.sampler='ddim'"]), echo=lambda m: None)
    single = tmp_path / "flux1-dev.safetensors"
    from safetensors.torch import save_file

    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1), "guidance_in.in_layer.weight": torch.zeros(1)}, str(single))
    with pytest.raises(ConfigError, match="single-file FLUX.1-dev checkpoint; adt train loads FLUX.1-dev from a diffusers folder"):
        train(config_for(assets, tmp_path / "c", "flux_dev", overrides=[f"model.path='{single}'"]), echo=lambda m: None)


def test_adt_eval_generates_with_a_flux_lora(assets, tmp_path):
    """adt eval's generation on FLUX.1-dev: packed initial noise, embedded guidance, the
    LoRA in sd-scripts' layout applied (the images change), defaults from the family."""
    import argparse

    import numpy as np
    from PIL import Image

    from adt_plugin.eval.command import sampling_defaults
    from adt_plugin.eval.generate import ModelSpec, SamplingSettings, generate_model, plan_jobs

    out = tmp_path / "train"
    train(config_for(assets, out, "flux_dev", overrides=["train.max_steps=2"]), echo=lambda m: None)
    specs = [ModelSpec("base", str(assets["models"]["flux_dev"])), ModelSpec("adt", str(assets["models"]["flux_dev"]), str(out / "tiny.safetensors"))]
    args = argparse.Namespace(sampler=None, steps=None, cfg=None, negative="", config_dir="")
    sampling_defaults(args, specs)
    assert (args.sampler, args.steps, args.cfg) == ("flow_euler", 28, 3.5)  # FLUX.1-dev's deployed sampler
    settings = SamplingSettings("flow_euler", 3, 3.5, 32, 32, "", (0,))
    images = {}
    for spec in specs:
        jobs = plan_jobs(tmp_path / "eval", spec, ["pic 1"], settings)
        assert generate_model(spec, jobs, settings, "cpu", torch.float32) == 1
        images[spec.name] = np.asarray(Image.open(jobs[0].path), dtype=np.float32)
    assert images["base"].shape == (32, 32, 3)
    assert np.abs(images["base"] - images["adt"]).max() > 0
    with pytest.raises(ValueError, match="does not guide against a negative prompt"):
        sampling_defaults(argparse.Namespace(sampler=None, steps=None, cfg=None, negative="blurry", config_dir=""), specs)


def test_bench_runs_on_a_tiny_flux(capsys):
    from adt_plugin.cli import main

    args = ["bench", "--model", "tiny-flux", "--threads", "1", "--steps", "4", "--cycles", "1", "--ft_steps", "1", "--g_every", "2", "--batch", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "tiny-flux (64 px, batch 2, full)" in out and "flow_euler 4 steps, guidance 3.5 (embedded)" in out
    assert "tensors saved for backward in denoiser + decoder: 0 (goal 0)" in out


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one process-wide state whose mixed precision cannot change: the
    bf16 run below gets its own, and the tests after it get theirs back."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_memory_options_fp8_base_and_gradient_checkpointing_train_a_flux_lora(assets, tmp_path, monkeypatch, fresh_accelerate):
    """The frozen transformer stored in float8 (cast per layer to bf16 for its forward),
    block checkpointing of the transformer and the VAE decode: the run trains the LoRA
    (float32) and saves it; a full fine-tune with an fp8 base is refused before loading."""
    from adt_plugin.train import setup

    out = tmp_path / "fp8"
    over = ["model.base_dtype='fp8'", "train.mixed_precision='bf16'", "train.gradient_checkpointing=true", "train.max_steps=2"]
    loaded = []
    real_load_model = setup.load_model

    def spy(*args, **kwargs):
        model = real_load_model(*args, **kwargs)
        loaded.append(model)
        return model

    monkeypatch.setattr("adt_plugin.train.loop.load_model", spy)
    result = train(config_for(assets, out, "flux_dev", overrides=over), echo=lambda m: None)
    assert result.status == "done"
    denoiser = loaded[0].denoiser
    dtypes = {p.dtype for n, p in denoiser.named_parameters() if "lora_" not in n}
    assert torch.float8_e4m3fn in dtypes and all(p.dtype == torch.float32 for p in loaded[0].params)
    assert denoiser.is_gradient_checkpointing
    lora = load_file(out / "tiny.safetensors")
    assert any(k.endswith(".lora_up.weight") and v.abs().sum() > 0 for k, v in lora.items())
    with pytest.raises(ConfigError, match="base_dtype = 'fp8' stores the frozen weights of a LoRA run"):
        train(config_for(assets, tmp_path / "full", "flux_dev", "ft", "full", ["model.base_dtype='fp8'"]), echo=lambda m: None)


FLOW_PRESETS = {"flux-dev-flow28": "flux_dev", "flux-schnell-flow4": "flux_schnell", "zimage-turbo-flow9": "zimage_turbo"}


@pytest.mark.parametrize("stem", sorted(FLOW_PRESETS))
def test_the_later_families_presets_run_their_deployed_sampler(stem):
    """Each family file states the family module's deployed sampler (one source each, checked
    to agree); the four presets per family (full / LoRA, ADT / FT) load, and what they ask
    for fits the family before any model loads."""
    from adt_plugin.presets import family_adt_defaults
    from adt_plugin.train.setup import check_model_fits, check_sampler_fits

    family = get_family(FLOW_PRESETS[stem])
    stated = family_adt_defaults(family.name)
    assert {k: stated[k] for k in ("sampler", "num_inference_steps", "guidance_scale")} == dict(family.preset)
    for suffix in ("adt", "ft", "lora-adt", "lora-ft"):
        config = load_run_config(None, f"{stem}-{suffix}", ["model.path=m", "data.folder=d"])
        assert config.model.family == family.name and config.adt.strategy == suffix.split("-")[-1]
        check_sampler_fits(config, family)
        check_model_fits(config, family)
        a = config.adt
        assert a.lambda_diff == 1.0  # the paper's training settings, with the compute study's cycle and lambda
        assert (a.k_graph_steps, a.g_every, a.adt_every, a.rollout_share) == (0, 1, 4, 0.25)
        if suffix.startswith("lora"):
            assert config.train.method == "lora" and config.data.cache_latents and config.data.cache_text
            assert config.train.gradient_checkpointing
            assert config.model.base_dtype == ("fp8" if family.lora.original == "flux" else "auto")
        else:
            assert config.train.method == "full" and config.train.learning_rate == a.d_lr
