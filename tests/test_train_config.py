"""`adt train` configuration: layers, validation messages, presets."""

import textwrap

import pytest

from adt_plugin.cli import main
from adt_plugin.train import presets
from adt_plugin.train.config import ConfigError, load_run_config, parse_override


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


BASE = """
[model]
path = "model"
[data]
folder = "data"
"""


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    path = write(tmp_path, BASE + "[train]\nlearnig_rate = 1e-4\n")
    with pytest.raises(
        ConfigError, match=r"run.toml \[train\]: unknown key 'learnig_rate'; did you mean 'learning_rate'\?"
    ):
        load_run_config(path)


def test_unknown_adt_key_and_unknown_section_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"\[adt\]: unknown key 'lamda_diff'; did you mean 'lambda_diff'"):
        load_run_config(write(tmp_path, BASE + "[adt]\nlamda_diff = 0.5\n"))
    with pytest.raises(ConfigError, match=r"unknown section or key 'trian'; did you mean \[train\]\?"):
        load_run_config(write(tmp_path, BASE + "[trian]\nmax_steps = 3\n"))


def test_wrong_types_are_errors_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"\[train\]: key 'max_steps' must be an integer, got '100'"):
        load_run_config(write(tmp_path, BASE + '[train]\nmax_steps = "100"\n'))
    with pytest.raises(ConfigError, match=r"\[sample\]: key 'prompts' must be a list of strings, got \[1, 2\]"):
        load_run_config(write(tmp_path, BASE + "[sample]\nprompts = [1, 2]\n"))
    with pytest.raises(ConfigError, match=r"\[train\] method must be one of lora, full; got 'dora'"):
        load_run_config(write(tmp_path, BASE + '[train]\nmethod = "dora"\n'))


def test_bad_toml_and_missing_required_keys(tmp_path):
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_run_config(write(tmp_path, "[model\npath = 1"))
    with pytest.raises(ConfigError, match=r"\[data\] folder is required"):
        load_run_config(write(tmp_path, '[model]\npath = "m"\n'))
    with pytest.raises(ConfigError, match="give a config file"):
        load_run_config(None)


def test_layers_preset_then_file_then_overrides(tmp_path):
    path = write(tmp_path, BASE + "[train]\nlearning_rate = 2e-6\n")
    config = load_run_config(
        path, "sd15-ddim50-ft", ["train.max_steps=7", "adt.guidance_scale=3", ("adt", "strategy", "adt")]
    )
    assert config.adt.strategy == "adt"  # the flag-style override beats the ft preset
    assert config.train.learning_rate == 2e-6  # file beats preset
    assert config.train.max_steps == 7 and config.adt.guidance_scale == 3.0
    assert config.adt.num_inference_steps == 50 and config.train.batch_size == 8  # from the preset chain
    assert config.sources[:4] == (
        "preset families/paper", "preset families/sd1", "preset sd15-ddim50-adt", "preset sd15-ddim50-ft")


def test_override_parsing():
    assert parse_override("train.learning_rate=1e-5") == ("train", "learning_rate", 1e-5)
    assert parse_override("model.path=/a/b c") == ("model", "path", "/a/b c")
    assert parse_override('sample.prompts=["x", "y"]') == ("sample", "prompts", ["x", "y"])
    with pytest.raises(ConfigError, match="name a section and a key"):
        parse_override("learning_rate=1")
    with pytest.raises(ConfigError, match=r"unknown section or key 'trainn'"):
        load_run_config(None, "sd15-ddim50-adt", ["trainn.max_steps=1", "model.path=m", "data.folder=d"])


def test_every_preset_is_a_valid_config_with_the_papers_settings():
    # the paper's families (the later families' presets: tests/test_train_flux.py)
    known = {n: p for n, p in presets.available().items() if n.split("-")[0] in ("sd15", "sdxl", "sd3")}
    assert len(known) == 20
    for name in known:
        config = load_run_config(None, name, ["model.path=m", "data.folder=d"])
        a = config.adt
        assert (a.lambda_diff, a.tau) == (1.0, 0.99), name
        # the compute study's cycle (docs/demo.md), not the paper's g_every 5 / K 3 / every step ADT
        cycle = (a.k_graph_steps, a.g_every, a.adt_every, a.rollout_buffer, a.rollout_share, a.adv_ratio)
        assert cycle == (0, 1, 4, 1, 0.25, 1.0), name
        assert (a.d_warmup_steps, a.g_warmup_steps) == (1000, 500), name
        assert a.strategy == ("ft" if name.endswith("-ft") else "adt"), name
        family = name.split("-")[0]
        assert a.d_lr == (5e-6 if family == "sd15" else 1e-6), name
        assert a.guidance_scale == {"sd15": 7.0, "sdxl": 5.0, "sd3": 7.0}[family], name
        sampler = name.split("-")[1]
        assert (a.sampler, a.num_inference_steps) == {
            "ddim50": ("ddim", 50),
            "dpmpp30": ("dpmsolver++", 30),
            "flow28": ("flow_euler", 28),
        }[sampler], name
        if "-lora-" in name:
            assert config.train.method == "lora" and config.data.cache_latents
        else:
            assert config.train.method == "full" and config.train.batch_size == 8
            assert config.train.learning_rate == a.d_lr  # the paper: the same rate for G and D


def test_ft_twins_differ_from_their_adt_preset_only_in_the_strategy():
    for name in presets.available():
        if name.endswith("-ft"):
            ft = load_run_config(None, name, ["model.path=m", "data.folder=d"]).to_dict()
            adt = load_run_config(None, name[: -len("-ft")] + "-adt", ["model.path=m", "data.folder=d"]).to_dict()
            assert ft["adt"].pop("strategy") == "ft" and adt["adt"].pop("strategy") == "adt"
            assert ft == adt, name


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ConfigError, match=r"unknown preset 'sd15-ddim-adt'; did you mean .*sd15-ddim50-adt"):
        load_run_config(None, "sd15-ddim-adt")


def test_adt_presets_lists_one_line_each(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 32
    assert any(line.startswith("sd15-ddim50-adt ") and "DDIM 50" in line for line in lines)
    assert any(line.startswith("sd3-flow28-lora-ft ") and "FT twin" in line for line in lines)


def test_adt_train_reports_config_errors_without_a_traceback(tmp_path, capsys):
    path = write(tmp_path, BASE + "[lora]\nrnak = 4\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "adt train: error:" in err and "unknown key 'rnak'; did you mean 'rank'?" in err
    assert "Traceback" not in err


def test_optional_packages_are_checked_before_anything_loads(tmp_path, capsys):
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed here")
    except Exception:  # noqa: BLE001
        pass
    (tmp_path / "data").mkdir()
    path = write(tmp_path, f'[model]\npath = "m"\n[data]\nfolder = "{tmp_path / "data"}"\n')
    assert main(["train", "--config", str(path), "train.optimizer=adamw8bit", "--check"]) == 2
    assert "needs bitsandbytes" in capsys.readouterr().err


def test_presets_show_prints_the_merged_preset_as_toml(capsys):
    import toml

    assert main(["presets", "--show", "sdxl-dpmpp30-lora-ft"]) == 0
    shown = toml.loads(capsys.readouterr().out)
    assert shown["adt"]["strategy"] == "ft" and shown["adt"]["sampler"] == "dpmsolver++"
    assert shown["train"]["method"] == "lora" and shown["data"]["resolution"] == 1024
