"""One source for the paper's per-family settings: the TOML presets and their family files.

The kohya_ss GUI and OneTrainer presets are generated from them (regenerating gives no
diff), and every front end turns its preset into the same AdtSettings `adt train` gets.
"""

import argparse
import json
import shlex

import pytest

from adt_plugin.kohya.args import add_adt_arguments, settings_from_args
from adt_plugin.families import get_family
from adt_plugin.kohya.families import KohyaModel
from adt_plugin.onetrainer.families import family_of
from adt_plugin.presets import defaults_for, family_adt_defaults, folder, generate
from adt_plugin.settings import AdtSettings
from adt_plugin.train.config import load_run_config
from adt_plugin.train.presets import preset_layers



def preset_config(name: str):
    return load_run_config(None, name, ["model.path=m", "data.folder=d"])


def test_regenerating_the_gui_presets_gives_no_diff(capsys):
    assert generate.main(["--check"]) == 0, capsys.readouterr().err


def test_check_names_a_generated_file_that_differs(tmp_path, capsys):
    assert generate.main(["--out", str(tmp_path)]) == 0
    target = tmp_path / generate.TARGETS[0].path
    target.write_text(target.read_text().replace("--adt_adt_every 4", "--adt_adt_every 3"))
    assert generate.main(["--check", "--out", str(tmp_path)]) == 1
    assert generate.TARGETS[0].path in capsys.readouterr().err
    assert generate.main(["--out", str(tmp_path)]) == 0 and generate.main(["--check", "--out", str(tmp_path)]) == 0


def test_every_generated_file_is_a_target_and_every_target_is_there():
    shipped = {p.relative_to(folder()).as_posix() for p in folder().rglob("*.json")}
    assert shipped == {t.path for t in generate.TARGETS}


@pytest.mark.parametrize("target", [t for t in generate.TARGETS if t.tool == "kohya_gui"], ids=lambda t: t.preset)
def test_kohya_gui_preset_gives_the_toml_presets_settings(target):
    """The GUI's "Additional parameters" parsed by the plugin's own --adt_* parser, on top of the
    plugin's family defaults, equal `adt train`'s settings for the TOML preset."""
    data = json.loads((folder() / target.path).read_text())
    config = preset_config(target.preset)
    parser = argparse.ArgumentParser()
    add_adt_arguments(parser)
    # as kohya_gui/common_gui.py run_cmd_advanced_training: quotes removed, split on whitespace
    args = parser.parse_args(data["additional_parameters"].replace('"', "").split())
    family = get_family(config.model.family)
    assert settings_from_args(args, KohyaModel(family).defaults) == config.adt
    assert data["extra_accelerate_launch_args"] == "-m adt_plugin.kohya.launch"
    script = family.kohya_script  # the GUI's model checkboxes pick the script the family trains with
    assert (data["sdxl"], data["sd3_checkbox"], data.get("flux1_checkbox", False)) == (
        script == "sdxl_train_network.py", script == "sd3_train_network.py", script == "flux_train_network.py")
    if script == "flux_train_network.py":  # sd-scripts' recommended FLUX.1 options, memory options that ADT runs with
        assert data["LoRA_type"] == "Flux1" and data["blocks_to_swap"] == 0 and data["split_mode"] is False
        assert (data["timestep_sampling"], data["discrete_flow_shift"], data["model_prediction_type"]) == ("shift", 3.1582, "raw")
        assert data["fp8_base"] == (config.model.base_dtype == "fp8") and data["gradient_checkpointing"] is True
    assert data["unet_lr"] == data["learning_rate"] == config.train.learning_rate and data["text_encoder_lr"] == 0
    assert (data["network_dim"], data["network_alpha"]) == (config.lora.rank, config.lora.alpha)
    assert data["train_batch_size"] == config.train.batch_size
    assert data["max_resolution"] == f"{config.data.resolution},{config.data.resolution}"
    # the host's own loss options would be dropped by ADT's loss: the presets keep them neutral
    assert (data["min_snr_gamma"], data["noise_offset"], data["ip_noise_gamma"], data["loss_type"]) == (0, 0, 0, "l2")
    assert shlex.split(data["additional_parameters"]) == data["additional_parameters"].split()


@pytest.mark.parametrize("target", [t for t in generate.TARGETS if t.tool == "onetrainer"], ids=lambda t: t.preset)
def test_onetrainer_preset_gives_the_toml_presets_settings(target):
    data = json.loads((folder() / target.path).read_text())
    config = preset_config(target.preset)
    section = dict(data["adt"])
    assert section.pop("enabled") is True
    assert AdtSettings.from_mapping(section) == config.adt
    assert (data["batch_size"], data["learning_rate"], data["resolution"]) == (
        config.train.batch_size, config.train.learning_rate, str(config.data.resolution))
    assert (data["lora_rank"], data["lora_alpha"]) == (config.lora.rank, config.lora.alpha)
    family = get_family(config.model.family)
    assert data["model_type"] in family.onetrainer_model_types and data["base_model_name"] == family.released_repo
    # the preset states its family's values (FLUX_DEV_1 is dev's and schnell's model type: a config that
    # does not state them gets dev's, see test_onetrainer)
    assert all(section[k] == v for k, v in defaults_for(family).items())
    assert family in family_of(data["model_type"]).families
    if config.model.base_dtype == "fp8":
        assert data["transformer"]["weight_dtype"] == "FLOAT_8"


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux_dev", "flux_schnell"])
def test_the_sd_scripts_plugins_family_defaults_are_the_family_files(family):
    """A kohya run without --adt_* values gets the family's sampler, CFG and D lr: the values of
    the presets that extend families/<family>.toml (and the family module's deployed sampler)."""
    plugin = KohyaModel(get_family(family))
    assert dict(plugin.defaults) == family_adt_defaults(family)
    assert {k: plugin.defaults[k] for k in plugin.family.preset} == dict(plugin.family.preset)
    stem = {"sd1": "sd15", "flux_dev": "flux-dev", "flux_schnell": "flux-schnell"}.get(family, family)
    for name in ("ddim50", "flow28", "flow4"):
        preset = f"{stem}-{name}-adt"
        try:
            config = preset_config(preset)
        except Exception:  # noqa: BLE001 - not every family has every sampler's preset
            continue
        for key, value in plugin.defaults.items():
            assert getattr(config.adt, key) == value, (preset, key)


def test_family_files_hold_only_what_differs_between_families():
    per_family = {f: family_adt_defaults(f) for f in ("sd1", "sdxl", "sd3")}
    assert set.intersection(*(set(v) for v in per_family.values())) == set(per_family["sd1"])
    assert {f: (v["guidance_scale"], v["d_lr"]) for f, v in per_family.items()} == {
        "sd1": (7.0, 5e-6), "sdxl": (5.0, 1e-6), "sd3": (7.0, 1e-6)}  # the paper, Sec. 5
    assert [name for name, _ in preset_layers("sdxl-dpmpp30-lora-ft")] == [
        "families/paper", "families/sdxl", "sdxl-dpmpp30-adt", "sdxl-dpmpp30-lora-adt", "sdxl-dpmpp30-lora-ft"]
    with pytest.raises(KeyError, match="known: flux_dev, flux_schnell, sd1, sd3, sdxl, zimage_turbo"):
        family_adt_defaults("flux")


def test_a_preset_folder_of_ones_own_still_extends_the_bundled_family_files(tmp_path, monkeypatch):
    (tmp_path / "mine.toml").write_text('description = "x"\nextends = "families/sdxl"\n[train]\nmax_steps = 7\n')
    monkeypatch.setenv("ADT_PRESETS_DIR", str(tmp_path))
    config = preset_config("mine")
    assert (config.train.max_steps, config.adt.guidance_scale, config.model.family) == (7, 5.0, "sdxl")
