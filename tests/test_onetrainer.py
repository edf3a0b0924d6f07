"""adt_plugin.onetrainer against faithful stand-ins of OneTrainer's objects
(tests/standins/onetrainer.py mirrors OneTrainer master @ 23df3832)."""

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from standins import onetrainer as ot
from tiny import tiny_dinov2

from adt_plugin import AdtSettings, SettingsError
from adt_plugin.onetrainer import internals
from adt_plugin.onetrainer import setup as ot_setup
from adt_plugin.onetrainer.config import (
    apply_family_defaults,
    add_section, check_train_config_data, loading_from, make_section_class, settings_from_section,
)
from adt_plugin.onetrainer.families import FAMILIES, SEP, CapturedCall, capture_denoiser_call
from adt_plugin.onetrainer.internals import replace_registered
from adt_plugin.onetrainer.plugin import wrapper_for

REPO = Path(__file__).resolve().parents[1]
SD = FAMILIES["StableDiffusion"]


@pytest.fixture(autouse=True)
def small_backbone(monkeypatch):
    real = ot_setup.build_strategy
    monkeypatch.setattr(ot_setup, "build_strategy",
                        lambda settings, config, **kw: real(settings, config, backbone=tiny_dinov2(settings.taps), **kw))


def config_class():
    # a class of its own per test, so the patch does not leak; its default_values builds its own instances, as upstream
    cls = type("TrainConfig", (ot.TrainConfig,), {"default_values": staticmethod(lambda: cls(ot.train_config_fields()))})
    internals.patch_train_config(cls, make_section_class(ot.BaseConfig), add_section, check_train_config_data,
                                 apply_family_defaults)
    return cls


def config(tmp_path=None, **adt):
    cfg = config_class().default_values()
    values = dict(enabled=True, taps=[1, 3], head_channels=8, num_inference_steps=3, g_every=2, adt_every=1, k_graph_steps=1,
                  guidance_scale=2.0, d_lr=1e-3, g_warmup_steps=0, d_warmup_steps=0)
    values.update(adt)
    cfg.adt.from_dict(values)
    cfg.learning_rate = 1e-2
    if tmp_path is not None:
        cfg.workspace_dir = str(tmp_path / "workspace")
    return cfg


def wrapped_setup():
    return ot_setup.wrap_setup_class(ot.StableDiffusionLoRASetup, SD)(torch.device("cpu"), torch.device("cpu"))


def prepared(cfg, seed=0):
    model = ot.StableDiffusionModel(seed)
    setup = wrapped_setup()
    setup.setup_train_device(model, cfg)
    setup.setup_model(model, cfg)
    return setup, model


def batches(n, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [{"latent_image": torch.randn(1, 4, 4, 4, generator=gen), "tokens": torch.tensor([[i + 1, 2, 3, 4]]),
             "concept_type": ["STANDARD"]} for i in range(n)]


# -- the config section ---------------------------------------------------------------------
def test_adt_section_has_every_setting_and_survives_save_and_load():
    cls = config_class()
    cfg = cls.default_values()
    cfg.adt.from_dict({"enabled": True, "taps": [1, 3]})
    section_class = cls._adt_section_class
    internals.patch_train_config(cls, make_section_class(ot.BaseConfig), add_section, check_train_config_data)
    assert cls._adt_section_class is section_class  # patching twice changes nothing
    assert {f.name for f in dataclasses.fields(AdtSettings)} | {"enabled"} == set(cfg.adt.types)
    saved = cfg.to_dict()
    assert saved["adt"]["taps"] == [1, 3] and saved["adt"]["enabled"] is True
    again = cls.default_values().from_dict(json.loads(json.dumps(saved)))
    assert again.adt.to_dict() == cfg.adt.to_dict()
    assert settings_from_section(again.adt).taps == (1, 3)


@pytest.mark.parametrize("section, message", [
    ({"enabled": True, "g_evry": 3}, "unknown key 'g_evry'; did you mean 'g_every'?"),
    ({"g_every": "five"}, "key 'g_every' must be an integer, got 'five'"),
    ({"enabled": "yes"}, "key 'enabled' must be true or false, got 'yes'"),
    ({"taps": [2, "x"]}, "key 'taps' must be a list of integers"),
    ({"lambda_diff": None}, "key 'lambda_diff' must be a number, got None"),
])
def test_bad_keys_and_types_in_the_section_are_errors_before_anything_is_set(section, message, tmp_path):
    cfg = config()
    before = cfg.adt.to_dict()
    with pytest.raises(SettingsError, match="OneTrainer config: \\[adt\\]: " + message.replace("[", "\\[").replace("?", "\\?")):
        cfg.from_dict({"learning_rate": 0.5, "adt": section})  # OneTrainer's from_dict would print and go on
    assert cfg.adt.to_dict() == before and cfg.learning_rate == 1e-2  # nothing was applied
    with pytest.raises(SettingsError, match="OneTrainer config: \\[adt\\]: "):
        cfg.adt.from_dict(section)  # --config-value adt.<key>=... reaches the section directly


def test_errors_name_the_file_the_section_came_from(tmp_path, monkeypatch):
    preset, config_file = tmp_path / "#preset.json", tmp_path / "mine.json"
    preset.write_text(json.dumps({"adt": {"enabled": True}}))
    config_file.write_text(json.dumps({"adt": {"g_evry": 3}}))
    # scripts/train.py --preset-path P --config-path C reads both through TrainConfig.from_dict
    monkeypatch.setattr("sys.argv", ["scripts/train.py", "--preset-path", str(preset), "--config-path", str(config_file)])
    cfg = config()
    cfg.from_dict(json.loads(preset.read_text()))
    with pytest.raises(SettingsError, match=f"^config {config_file}: \\[adt\\]: unknown key 'g_evry'; did you mean 'g_every'"):
        cfg.from_dict(json.loads(config_file.read_text()))
    with loading_from("training_presets/#x.json"), pytest.raises(SettingsError, match="^training_presets/#x.json: "):
        cfg.from_dict({"adt": {"lamda_diff": 0.3}})  # the GUI names the file it is loading


def test_strings_that_are_numbers_are_accepted_like_onetrainer_does():
    cfg = config()
    cfg.adt.from_dict({"g_every": "3", "lambda_diff": "0.25", "taps": "2,5"})  # what --config-value hands over
    assert (cfg.adt.g_every, cfg.adt.lambda_diff, cfg.adt.taps) == (3, 0.25, [2, 5])


def test_values_and_unsupported_models_are_checked_before_the_model_loads(caplog):
    cfg = config(g_every=0)
    with pytest.raises(SettingsError, match="g_every must be >= 1"):
        ot_setup.check_before_loading(cfg)
    cfg = config()
    cfg.model_type = ot.ModelType.CHROMA_1
    with pytest.raises(SettingsError, match="ADT does not train CHROMA_1 LORA in OneTrainer"):
        ot_setup.check_before_loading(cfg)
    cfg.adt.enabled = False
    assert ot_setup.check_before_loading(cfg) is None  # ADT off: nothing to check
    cfg = config(strategy="ft")
    cfg.mae_strength, cfg.loss_weight_fn, cfg.offset_noise_weight = 0.5, ot.LossWeight.MIN_SNR_GAMMA, 0.1
    with caplog.at_level(logging.WARNING, logger="adt_plugin.onetrainer"):
        assert ot_setup.check_before_loading(cfg).strategy == "ft"
    assert "mae_strength=0.5, loss_weight_fn=MIN_SNR_GAMMA, offset_noise_weight=0.1" in caplog.text


def test_the_check_runs_before_a_training_run_loads_its_model():
    trainer_class = type("GenericTrainer", (ot.GenericTrainer,), {})  # a class of its own: the patch does not leak
    internals.check_at_start(trainer_class, ot_setup.check_before_loading)
    internals.check_at_start(trainer_class, ot_setup.check_before_loading)  # idempotent
    ot.StableDiffusionLoRAModelLoader.loads = []
    with pytest.raises(SettingsError, match="num_inference_steps must be >= 1"):
        trainer_class(config(num_inference_steps=0)).start()
    assert ot.StableDiffusionLoRAModelLoader.loads == []  # the model was never loaded


@pytest.mark.parametrize("path", sorted((REPO / "adt_plugin" / "presets" / "onetrainer").rglob("#*.json")), ids=lambda p: p.name)
def test_presets_load_into_a_valid_adt_section(path):
    cfg = config()
    cfg.adt.enabled = False
    cfg.from_dict(json.loads(path.read_text()))
    assert cfg.adt.enabled is True
    settings = settings_from_section(cfg.adt)
    assert settings.strategy == "adt" and settings.taps == (2, 5, 8, 11)
    # each preset states its family's deployed sampler (the family module's preset)
    from adt_plugin.families import FAMILIES as MODEL_FAMILIES

    family = next(f for f in MODEL_FAMILIES.values() if f.released_repo == cfg.base_model_name)
    assert cfg.model_type.name in family.onetrainer_model_types
    assert {k: getattr(settings, k) for k in family.preset} == dict(family.preset)


# -- the loop -------------------------------------------------------------------------------
@pytest.mark.parametrize("with_scaler", [False, True], ids=["fp32", "grad_scaler"])
def test_discriminator_only_iterations_do_not_move_the_weights(with_scaler):
    cfg = config()
    setup, model = prepared(cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if with_scaler else None
    losses, weights, board = ot.train(setup, model, cfg, batches(4), scaler=scaler)
    assert torch.count_nonzero(weights[0]) == 0  # iteration 1: D only, the LoRA is still its init
    assert not torch.equal(weights[0], weights[1])
    assert torch.equal(weights[1], weights[2])  # iteration 3: D only, AdamW with momentum and weight decay
    assert not torch.equal(weights[2], weights[3])
    assert setup.adt_gate.taken == 2 and setup.adt_gate.skipped == 2
    assert [round(v, 5) for v in losses] == [round(v, 5) for _, v in board.scalars["loss/diff"]]
    assert {"loss/D", "D/real", "D/fake", "lr/D", "loss/G", "adt/generator_steps", "lr/group0"} <= board.scalars.keys()
    assert {"cost/forward_equiv", "cost/total_ft_steps"} <= board.scalars.keys()  # the strategy's compute accounting


def test_disabled_adt_leaves_onetrainer_alone():
    cfg = config(enabled=False)
    setup, model = prepared(cfg)
    assert setup.adt_runner is None and "step" not in vars(model.optimizer)
    data = setup.predict(model, batches(1)[0], cfg, model.train_progress)
    assert "adt_loss" not in data and setup.calculate_loss(model, batches(1)[0], data, cfg).requires_grad


def test_rollout_calls_the_denoiser_exactly_as_predict_does():
    cfg = config()
    setup, model = prepared(cfg)
    batch = batches(1)[0]
    call = capture_denoiser_call(model.unet, lambda: ot.StableDiffusionLoRASetup.predict(setup, model, batch, cfg, model.train_progress))
    assert call.sample_key == "sample" and set(call.cond) == {"encoder_hidden_states"}
    assert torch.equal(call.cond["encoder_hidden_states"], model.encode_text(None, tokens=batch["tokens"]))
    x, t = torch.randn(1, 4, 4, 4), torch.tensor([500])
    expected = model.unet(x, t, call.cond["encoder_hidden_states"]).sample
    assert torch.equal(model.unet(**call.kwargs(x, t, call.cond)).sample, expected)


def test_captured_calls_of_sdxl_and_sd3_signatures():
    class SdxlUNet(torch.nn.Module):  # diffusers UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states, ..., added_cond_kwargs=None, ...)
        def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True):
            return sample

    class Sd3Transformer(torch.nn.Module):  # SD3Transformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ..., return_dict)
        def forward(self, hidden_states, encoder_hidden_states=None, pooled_projections=None, timestep=None, return_dict=True):
            return hidden_states

    x = torch.zeros(2, 4, 4, 4)
    sdxl = CapturedCall(SdxlUNet(), (), dict(sample=x, timestep=torch.tensor([1, 2]), encoder_hidden_states=torch.ones(2, 3, 8),
                                             added_cond_kwargs={"text_embeds": torch.ones(2, 5), "time_ids": torch.ones(2, 6)}))
    assert set(sdxl.cond) == {"encoder_hidden_states", f"added_cond_kwargs{SEP}text_embeds", f"added_cond_kwargs{SEP}time_ids"}
    kwargs = sdxl.kwargs(x, torch.tensor([3, 3]), sdxl.cond)
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    sd3 = CapturedCall(Sd3Transformer(), (), dict(hidden_states=x, timestep=torch.tensor([1.0, 2.0]), encoder_hidden_states=torch.ones(2, 9, 8),
                                                  pooled_projections=torch.ones(2, 16), return_dict=True))
    assert sd3.sample_key == "hidden_states" and set(sd3.cond) == {"encoder_hidden_states", "pooled_projections"}
    assert sd3.constants == {"return_dict": True}


def test_empty_prompt_once_and_vae_kept_on_the_training_device():
    cfg = config()
    setup, model = prepared(cfg)
    assert model.encoded == [""]
    assert ("text_encoder",) in model.materialized and model.materialized[-1] == ("vae",)
    setup.setup_train_device(model, cfg)  # next epoch: no second encoding, the VAE again
    assert model.encoded == [""] and model.materialized[-1] == ("vae",)


def test_refusals():
    with pytest.raises(SettingsError, match="Masked Training"):
        cfg = config()
        cfg.masked_training = True
        prepared(cfg)
    with pytest.raises(SettingsError, match="Fused Back Pass"):
        cfg = config()
        cfg.optimizer.fused_back_pass = True
        prepared(cfg)
    cfg = config()
    setup, model = prepared(cfg)
    batch = dict(batches(1)[0], concept_type=["PRIOR_PREDICTION"])
    with pytest.raises(ValueError, match="prior-prediction"):
        setup.predict(model, batch, cfg, model.train_progress)


# -- saving and restoring -------------------------------------------------------------------
def saver():
    return ot_setup.wrap_saver_class(ot.StableDiffusionLoRAModelSaver)()


def test_discriminator_in_backups_and_beside_saves_and_restored(tmp_path, caplog):
    cfg = config(tmp_path)
    setup, model = prepared(cfg)
    ot.train(setup, model, cfg, batches(2))
    backup = Path(cfg.workspace_dir) / "backup" / "2026-01-01_00-00-00-backup-2-0-1"
    saver().save(model, cfg.model_type, ot.ModelFormat.INTERNAL, str(backup), None)
    saver().save(model, cfg.model_type, ot.ModelFormat.KOHYA_LORA, str(tmp_path / "lora.safetensors"), None)
    assert (backup / ot_setup.BACKUP_FILE).exists() and (tmp_path / "lora.adt_disc.safetensors").exists()

    cfg.continue_last_backup = True
    resumed, _ = prepared(cfg, seed=1)
    assert resumed.adt_runner.strategy.step == 2
    assert resumed.adt_runner.generator_steps == 1  # the count goes on where the backup left it
    saved = load_file(str(backup / ot_setup.BACKUP_FILE))
    state = resumed.adt_runner.strategy.disc.state_for_checkpoint()
    assert all(torch.equal(saved[f"disc.{k}"], v) for k, v in state.items())

    fresh = config(tmp_path)
    fresh.lora_model_name = str(tmp_path / "lora.safetensors")
    beside, _ = prepared(fresh, seed=1)
    assert beside.adt_runner.strategy.step == 2

    (backup / ot_setup.BACKUP_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="adt_plugin.onetrainer"):
        started, _ = prepared(cfg, seed=1)
    assert "fresh discriminator" in caplog.text and started.adt_runner.strategy.step == 0


# -- registration ---------------------------------------------------------------------------
def test_only_our_model_types_and_methods_are_wrapped_once():
    factory = ot.make_factory()

    class Other:
        pass

    for model_type in (ot.ModelType.STABLE_DIFFUSION_15, ot.ModelType.STABLE_DIFFUSION_15_INPAINTING):
        factory.register(ot.BaseModelSetup, ot.StableDiffusionLoRASetup, model_type, ot.TrainingMethod.LORA)
    factory.register(ot.BaseModelSetup, Other, ot.ModelType.CHROMA_1, ot.TrainingMethod.LORA)
    factory.register(ot.BaseModelSetup, Other, ot.ModelType.STABLE_DIFFUSION_15, ot.TrainingMethod.EMBEDDING)
    changed = replace_registered(factory, ot.BaseModelSetup, wrapper_for(ot_setup.wrap_setup_class))
    assert len(changed) == 1  # SD1.5 LoRA; not inpainting, not Chroma, not embeddings
    wrapped = factory.get(ot.BaseModelSetup, ot.ModelType.STABLE_DIFFUSION_15, ot.TrainingMethod.LORA)
    assert issubclass(wrapped, ot.StableDiffusionLoRASetup) and wrapped is not ot.StableDiffusionLoRASetup
    assert replace_registered(factory, ot.BaseModelSetup, wrapper_for(ot_setup.wrap_setup_class)) == []  # idempotent
    assert factory.get(ot.BaseModelSetup, ot.ModelType.CHROMA_1, ot.TrainingMethod.LORA) is Other


# -- the family's defaults when ADT is turned on for a model type --------------------------------------
def test_keys_no_preset_or_config_stated_take_the_model_familys_values():
    cls = config_class()
    cfg = cls.default_values()
    cfg.from_dict({"model_type": "FLUX_DEV_1", "adt": {"enabled": True, "num_inference_steps": 12}})
    # FLUX.1-dev's preset values (families/flux_dev.toml) for what the config did not say; its own value kept
    assert (cfg.adt.sampler, cfg.adt.guidance_scale, cfg.adt.d_lr, cfg.adt.num_inference_steps) == ("flow_euler", 3.5, 1e-6, 12)
    cfg.adt.from_dict({"guidance_scale": 2.0})  # what --config-value adt.guidance_scale=2.0 does
    cfg.from_dict({"model_type": "Z_IMAGE"})  # another model type: its unstated keys follow it
    assert (cfg.adt.sampler, cfg.adt.num_inference_steps, cfg.adt.guidance_scale) == ("flow_euler", 12, 2.0)
    cfg.from_dict({"model_type": "STABLE_DIFFUSION_15"})
    assert (cfg.adt.sampler, cfg.adt.d_lr) == ("ddim", 5e-6)
    fresh = cls.default_values()
    fresh.model_type = ot.ModelType.Z_IMAGE  # set without from_dict (the GUI's model type box): filled at start
    fresh.adt.enabled = True
    assert apply_family_defaults(fresh) == {"sampler": "flow_euler", "num_inference_steps": 9, "guidance_scale": 0.0, "d_lr": 1e-6}
