"""Models named by folder or Hugging Face hub id (adt_plugin.hub), and the early
check every front end makes before the diffusion model loads.

Nothing here reaches the network: the session is offline with an empty cache
(conftest.py); the "online" tests switch offline mode off, refuse every socket,
and replace the hub client's download functions at their boundary."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from adt_plugin import AdtSettings, SettingsError, hub
from adt_plugin.backbones import load_dinov2
from adt_plugin.decode import load_tiny_decoder
from adt_plugin.strategies import preflight

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SMALL = "facebook/dinov2-small"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of this test."""
    folder = tmp_path / "hf-cache"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    return folder


@pytest.fixture
def online(monkeypatch):
    """Downloads allowed as far as our code can tell; any real connection fails the test."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def cache_entry(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` in the cache layout huggingface_hub writes."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def tiny_dinov2_config(layers: int = 4):
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                        patch_size=4, image_size=16)


def save_tiny_dinov2(folder: Path) -> Path:
    from transformers import Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(tiny_dinov2_config()).save_pretrained(str(folder))
    return folder


def config_only_folder(folder: Path, layers: int = 4) -> Path:
    """config.json and a weights file that is not weights: whatever reads it fails."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2", "num_hidden_layers": layers, "hidden_size": 32}))
    (folder / "model.safetensors").write_bytes(b"not weights")
    return folder


# -- where a name comes from ----------------------------------------------------------------------
def test_a_folder_is_used_as_it_is_and_a_broken_one_is_named(tmp_path):
    folder = config_only_folder(tmp_path / "dinov2")
    source = hub.locate(str(folder), what="DINOv2 backbone")
    assert source.kind == hub.FOLDER and source.load_name == str(folder) and source.pretrained_kwargs() == {"local_files_only": True}
    assert source.describe() == f"local folder {folder}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(hub.ModelNotFound, match="folder .*empty has no config.json"):
        hub.locate(str(tmp_path / "empty"))
    (folder / "model.safetensors").unlink()
    with pytest.raises(hub.ModelNotFound, match="has a config.json but no weights"):
        hub.locate(str(folder))
    with pytest.raises(hub.ModelNotFound, match=r"'./nowhere': no such folder .*nowhere\), and not a Hugging Face hub id"):
        hub.locate("./nowhere")
    (tmp_path / "file.safetensors").write_bytes(b"")
    with pytest.raises(hub.ModelNotFound, match="is a file; give the model's folder"):
        hub.locate(str(tmp_path / "file.safetensors"))


def test_a_hub_id_offline_comes_from_the_cache_or_says_how_to_fetch_it(cache):
    with pytest.raises(hub.ModelNotFound) as missing:
        hub.locate(SMALL, what="DINOv2 backbone", setting="--adt_backbone_path")
    message = str(missing.value)
    assert "\n" not in message
    assert f"DINOv2 backbone '{SMALL}': not a local folder and not in the Hugging Face cache ({cache})" in message
    assert "downloads are off (HF_HUB_OFFLINE" in message
    assert "`hf download facebook/dinov2-small --local-dir ./dinov2-small` and set --adt_backbone_path to that folder" in message

    snapshot = config_only_folder(cache_entry(cache, SMALL))
    source = hub.locate(SMALL)
    assert source.kind == hub.CACHE and source.path == snapshot and source.load_name == SMALL
    assert source.pretrained_kwargs() == {"cache_dir": str(cache), "local_files_only": True}
    assert hub.display_name(snapshot) == SMALL


def test_a_partly_cached_model_is_not_taken_for_a_cached_one(cache):
    snapshot = cache_entry(cache, SMALL)
    (snapshot / "config.json").write_text("{}")
    with pytest.raises(hub.ModelNotFound, match="only partly in the Hugging Face cache"):
        hub.locate(SMALL)


def test_offline_mode_is_read_from_either_variable_and_the_constant(online, monkeypatch):
    assert not hub.offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub.offline()
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert hub.offline()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what OneTrainer's offline_mode sets
    assert hub.offline()


def test_hub_ids_and_paths_are_told_apart():
    assert hub.is_hub_id(SMALL) and hub.is_hub_id("gpt2")
    for path in ("./dinov2", "/models/dinov2", "~/dinov2", "a/b/c", "C:\\models\\dinov2", "", "bad id/with space"):
        assert not hub.is_hub_id(path), path
    assert hub.split_hub_file("xswu/HPSv2/HPS_v2.1_compressed.pt") == ("xswu/HPSv2", "HPS_v2.1_compressed.pt")
    assert hub.split_hub_file("hf://xswu/HPSv2/sub/w.pt") == ("xswu/HPSv2", "sub/w.pt")
    assert hub.split_hub_file("./a/b/c.pt") is None and hub.split_hub_file("xswu/HPSv2") is None


# -- the loaders hand hub ids to from_pretrained as transformers users do -------------------------
def recording(monkeypatch, cls, result):
    calls = []

    def from_pretrained(name, *args, **kwargs):
        calls.append((name, kwargs))
        return result(**kwargs)

    monkeypatch.setattr(cls, "from_pretrained", from_pretrained)
    return calls


def test_dinov2_hub_id_reaches_from_pretrained_online_without_local_files_only(online, cache, monkeypatch):
    from transformers import AutoConfig, Dinov2Model

    config_calls = recording(monkeypatch, AutoConfig, lambda **kw: tiny_dinov2_config())
    model_calls = recording(monkeypatch, Dinov2Model, lambda **kw: Dinov2Model(kw["config"]))
    backbone = load_dinov2(SMALL, taps=(1, 3), input_size=16)
    assert [c[0] for c in config_calls + model_calls] == [SMALL, SMALL]
    for _, kwargs in config_calls + model_calls:
        assert not kwargs.get("local_files_only") and kwargs["cache_dir"] == str(cache)
    assert backbone.identity == "dinov2:32x4"


def test_dinov2_hub_id_with_hf_hub_offline_reaches_from_pretrained_with_local_files_only(online, cache, monkeypatch):
    from transformers import AutoConfig, Dinov2Model

    config_only_folder(cache_entry(cache, SMALL))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config_calls = recording(monkeypatch, AutoConfig, lambda **kw: tiny_dinov2_config())
    model_calls = recording(monkeypatch, Dinov2Model, lambda **kw: Dinov2Model(kw["config"]))
    load_dinov2(SMALL, taps=(1, 3), input_size=16)
    assert [c[0] for c in config_calls + model_calls] == [SMALL, SMALL]
    assert all(kwargs["local_files_only"] is True for _, kwargs in config_calls + model_calls)


def test_taesd_hub_id_reaches_from_pretrained_the_same_way(online, cache, monkeypatch):
    from diffusers import AutoencoderTiny

    def tiny(**kwargs):
        return AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                               num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)

    calls = recording(monkeypatch, AutoencoderTiny, tiny)
    load_tiny_decoder("madebyollin/taesd")
    assert calls[-1][0] == "madebyollin/taesd" and not calls[-1][1].get("local_files_only")
    cache_entry(cache, "madebyollin/taesd")
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (cache_entry(cache, "madebyollin/taesd") / name).write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_tiny_decoder("madebyollin/taesd")
    assert calls[-1][0] == "madebyollin/taesd" and calls[-1][1]["local_files_only"] is True


def test_a_cached_dinov2_really_loads_offline_through_transformers(cache):
    save_tiny_dinov2(cache_entry(cache, "someone/tiny-dinov2"))
    backbone = load_dinov2("someone/tiny-dinov2", taps=(1, 3), input_size=16)
    features = backbone(torch.rand(1, 3, 16, 16))
    assert [f.shape for f in features] == [torch.Size([1, 32, 16])] * 2


# -- the early download ----------------------------------------------------------------------------
def test_fetch_downloads_into_the_cache_once_and_says_so(online, cache, monkeypatch):
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, cache_dir=None, **kwargs):
        calls.append((repo_id, tuple(allow_patterns), cache_dir))
        return str(config_only_folder(cache_entry(Path(cache_dir), repo_id)))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    source = hub.locate(SMALL, what="DINOv2 backbone")
    assert source.kind == hub.DOWNLOAD and "will download" in source.describe()
    said = []
    fetched = hub.fetch(source, echo=said.append)
    assert calls == [(SMALL, hub.FETCH_PATTERNS, str(cache))]
    assert said[0].startswith(f"downloading DINOv2 backbone {SMALL} from https://") and str(cache) in said[0]
    assert fetched.kind == hub.CACHE and (fetched.path / "config.json").is_file()
    assert hub.locate(SMALL).kind == hub.CACHE  # the next run reads the cache
    assert hub.fetch(hub.locate(SMALL), echo=said.append).kind == hub.CACHE and len(calls) == 1


def test_a_failed_download_is_one_line_with_the_fetch_command(online, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_there(*args, **kwargs):
        err = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(err, "404 Client Error\nmore lines")
        raise err

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_there)
    source = hub.locate("facebook/dinov2-smal", what="DINOv2 backbone", setting="backbone_path")
    with pytest.raises(hub.ModelNotFound, match="there is no such model on https://.*hf download facebook/dinov2-smal"):
        hub.fetch(source, echo=lambda line: None)

    def no_connection(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_connection)
    with pytest.raises(hub.ModelNotFound) as err:
        hub.fetch(hub.locate(SMALL, what="DINOv2 backbone"), echo=lambda line: None)
    assert "\n" not in str(err.value)
    assert "the download failed (ConnectionError: Failed to resolve 'huggingface.co')" in str(err.value)
    assert f"`hf download {SMALL} --local-dir ./dinov2-small`" in str(err.value)


def test_one_file_of_a_repository(cache):
    with pytest.raises(hub.ModelNotFound, match=r"hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir \."):
        hub.locate_file("xswu/HPSv2/HPS_v2.1_compressed.pt", what="HPSv2 weights")
    weights = cache_entry(cache, "xswu/HPSv2") / "HPS_v2.1_compressed.pt"
    weights.write_bytes(b"x")
    assert hub.locate_file("xswu/HPSv2/HPS_v2.1_compressed.pt") == weights


# -- preflight: the backbone and its taps from config.json alone -----------------------------------
def test_preflight_checks_taps_against_the_config_without_reading_weights(tmp_path):
    folder = config_only_folder(tmp_path / "dinov2")  # its "weights" would fail to load
    lines = preflight(AdtSettings(backbone_path=str(folder), taps=(1, 3)))
    assert lines == [f"backbone: local folder {folder}"]
    with pytest.raises(SettingsError, match=r"taps \[5, 8, 11\] are outside .*dinov2's 4 blocks \(0..3\); change \[adt\] taps"):
        preflight(AdtSettings(backbone_path=str(folder)), prefix="[adt] ")
    with pytest.raises(hub.ModelNotFound, match="decoder_path.*no such folder.*madebyollin/taesd"):
        preflight(AdtSettings(backbone_path=str(folder), taps=(1, 3), decoder_path=str(tmp_path / "taesd")))
    assert preflight(AdtSettings(strategy="ft", backbone_path=str(tmp_path / "nowhere"))) == []  # FT needs no backbone


def test_preflight_downloads_a_hub_backbone_before_checking_taps(online, cache, monkeypatch):
    def snapshot_download(repo_id, allow_patterns=None, cache_dir=None, **kwargs):
        return str(config_only_folder(cache_entry(Path(cache_dir), repo_id), layers=12))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    said = []
    lines = preflight(AdtSettings(), echo=said.append)
    assert said[0].startswith(f"downloading DINOv2 backbone {SMALL}")
    assert lines == [f"backbone: {SMALL} in the Hugging Face cache ({cache_entry(cache, SMALL)})"]


# -- adt doctor ------------------------------------------------------------------------------------
def test_hub_status_is_a_short_head_request(online, monkeypatch):
    seen = {}

    def metadata(url, timeout=None, **kwargs):
        seen.update(url=url, timeout=timeout)

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    state, detail = hub.hub_status()
    assert state == "reachable" and seen["url"].endswith("facebook/dinov2-small/resolve/main/config.json")
    assert seen["timeout"] == 3.0

    def down(url, timeout=None, **kwargs):
        raise ConnectionError("timed out")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", down)
    state, detail = hub.hub_status()
    assert state == "unreachable" and "ConnectionError: timed out" in detail


def test_doctor_says_where_the_backbone_would_come_from(online, cache, monkeypatch):
    from adt_plugin import doctor

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, timeout=None, **kw: None)
    rows = doctor.backbone_checks(SMALL)
    assert rows[0][:2] == ("ok", "Hugging Face Hub") and rows[0][2].startswith("reachable: ")
    assert rows[1] == ("ok", "DINOv2 backbone", f"{SMALL}: not cached yet, will download from {hub.endpoint()} into {cache} on first use")

    def down(url, timeout=None, **kwargs):
        raise ConnectionError("no route")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", down)
    rows = doctor.backbone_checks(SMALL)
    assert rows[0][0] == "warn" and rows[0][2].startswith("unreachable")
    assert rows[1][0] == "warn" and rows[1][2].endswith("but the Hub is unreachable")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = doctor.backbone_checks(SMALL)
    assert rows[0] == ("ok", "Hugging Face Hub", "offline: " + hub.hub_status()[1])
    assert rows[1][0] == "warn" and "hf download facebook/dinov2-small" in rows[1][2]
    config_only_folder(cache_entry(cache, SMALL))
    assert doctor.backbone_checks(SMALL)[1] == ("ok", "DINOv2 backbone", f"{SMALL} in the Hugging Face cache ({cache_entry(cache, SMALL)})")


# -- every front end stops before the diffusion model loads ----------------------------------------
def adt_train_config(tmp_path, adt: str) -> Path:
    from tiny_pipelines import make_image_folder

    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    make_image_folder(tmp_path / "data", count=1, size=(32, 32))
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent(f"""
        [model]
        path = "{model}"
        [data]
        folder = "{tmp_path / 'data'}"
        resolution = 32
        min_image_size = 16
        [train]
        output_dir = "{tmp_path / 'out'}"
        [adt]
        """) + adt)
    return path


def test_adt_train_check_reports_a_missing_backbone_in_one_line(tmp_path, capsys):
    from adt_plugin.cli import main

    path = adt_train_config(tmp_path, "")  # the presets' backbone_path: facebook/dinov2-small
    assert main(["train", "--config", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"adt train: error: DINOv2 backbone '{SMALL}': not a local folder and not in the Hugging Face cache")
    assert "set [adt] backbone_path to that folder" in err

    folder = config_only_folder(tmp_path / "dinov2")
    path = adt_train_config(tmp_path, f'backbone_path = "{folder}"\n')
    assert main(["train", "--config", str(path), "--check"]) == 2
    assert "taps [5, 8, 11] are outside" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--check", "adt.taps=[1, 3]"]) == 0
    assert f"backbone: local folder {folder}" in capsys.readouterr().out


def test_adt_train_stops_before_loading_the_model(tmp_path, monkeypatch, capsys):
    from adt_plugin.cli import main
    from adt_plugin.train import loop

    loads = []
    monkeypatch.setattr(loop, "load_model", lambda *args, **kwargs: loads.append(args))
    path = adt_train_config(tmp_path, "")
    assert main(["train", "--config", str(path)]) == 2
    assert loads == []  # no diffusion model was loaded
    assert "DINOv2 backbone 'facebook/dinov2-small'" in capsys.readouterr().err


FAKE_TRAIN_UTIL = '''
import argparse

def verify_command_line_training_args(args):
    pass

def read_config_from_file(args, parser):
    return args
'''

FAKE_TRAIN_NETWORK = '''
import argparse
LOADED = []

def setup_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config_file")
    parser.add_argument("--pretrained_model_name_or_path")
    return parser

class NetworkTrainer:
    def load_target_model(self, args, weight_dtype, accelerator):
        LOADED.append(args.pretrained_model_name_or_path)

    def train(self, args):
        self.load_target_model(args, None, None)
'''


def test_sd_scripts_launcher_stops_before_sd_scripts_loads_the_model(tmp_path, monkeypatch, capsys):
    from adt_plugin.kohya import launch

    root = tmp_path / "sd-scripts"
    (root / "library").mkdir(parents=True)
    (root / "library" / "__init__.py").write_text("")
    (root / "library" / "train_util.py").write_text(FAKE_TRAIN_UTIL)
    (root / "train_network.py").write_text(FAKE_TRAIN_NETWORK)
    monkeypatch.setattr("sys.path", list(sys.path))
    for name in ("train_network", "library", "library.train_util"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    argv = [str(root / "train_network.py"), "--pretrained_model_name_or_path", "sd15.safetensors",
            "--adt_backbone_path", SMALL]
    with pytest.raises(SystemExit) as stop:
        launch.main(argv)
    message = str(stop.value.code)
    assert message.startswith(f"adt_plugin.kohya: DINOv2 backbone '{SMALL}': not a local folder and not in the Hugging Face cache")
    assert "\n" not in message and "set --adt_backbone_path to that folder" in message
    assert "train_network" not in sys.modules  # sd-scripts was not even imported

    folder = config_only_folder(tmp_path / "dinov2")
    with pytest.raises(SystemExit, match=r"taps \[5, 8, 11\] are outside .*; change --adt_taps"):
        launch.main([*argv[:-1], str(folder)])
    assert "train_network" not in sys.modules
    assert launch.main([*argv[:-1], str(folder), "--adt_taps", "1", "3"]) == 0
    import train_network

    assert train_network.LOADED == ["sd15.safetensors"]
    assert f"ADT: backbone: local folder {folder}" in capsys.readouterr().out


def test_onetrainer_stops_before_its_model_loader_runs(tmp_path, monkeypatch):
    from standins import onetrainer as ot

    from adt_plugin.onetrainer import internals
    from adt_plugin.onetrainer.config import add_section, check_train_config_data, make_section_class
    from adt_plugin.onetrainer.setup import check_before_loading

    trainer_class = type("GenericTrainer", (ot.GenericTrainer,), {})  # a class of its own: the patch does not leak
    internals.check_at_start(trainer_class, check_before_loading)
    internals.check_at_start(trainer_class, check_before_loading)  # idempotent
    config_class = type("TrainConfig", (ot.TrainConfig,), {"default_values": staticmethod(lambda: config_class(ot.train_config_fields()))})
    internals.patch_train_config(config_class, make_section_class(ot.BaseConfig), add_section, check_train_config_data)
    config = config_class.default_values()
    config.adt.from_dict({"enabled": True})
    monkeypatch.setattr(ot.StableDiffusionLoRAModelLoader, "loads", [])
    with pytest.raises(hub.ModelNotFound, match=f"DINOv2 backbone '{SMALL}'.*set adt.backbone_path to that folder"):
        trainer_class(config).start()
    assert ot.StableDiffusionLoRAModelLoader.loads == []  # the model was never loaded

    folder = config_only_folder(tmp_path / "dinov2")
    config.adt.from_dict({"backbone_path": str(folder)})
    with pytest.raises(SettingsError, match=r"taps \[5, 8, 11\] are outside .*; change adt.taps"):
        trainer_class(config).start()
    assert ot.StableDiffusionLoRAModelLoader.loads == []

    config.adt.from_dict({"enabled": False})  # without ADT nothing is checked
    trainer_class(config).start()
    assert ot.StableDiffusionLoRAModelLoader.loads == ["base-model"]


def test_onetrainer_offline_mode_keeps_the_backbone_local(online, monkeypatch):
    from standins import onetrainer as ot

    from adt_plugin.onetrainer import internals
    from adt_plugin.onetrainer.config import add_section, check_train_config_data, make_section_class
    from adt_plugin.onetrainer.setup import check_before_loading

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored after the test
    config_class = type("TrainConfig", (ot.TrainConfig,), {"default_values": staticmethod(lambda: config_class(ot.train_config_fields()))})
    internals.patch_train_config(config_class, make_section_class(ot.BaseConfig), add_section, check_train_config_data)
    config = config_class.default_values()
    config.adt.from_dict({"enabled": True})
    config.offline_mode = True  # OneTrainer's own option: applied before the check, as configure_hub will
    with pytest.raises(hub.ModelNotFound, match="downloads are off"):
        check_before_loading(config)


def test_adt_eval_stops_before_generating_when_a_named_metric_model_is_missing(tmp_path, monkeypatch, capsys):
    from adt_plugin.cli import main
    from adt_plugin.eval import generate

    generated = []
    monkeypatch.setattr(generate, "generate_model", lambda *args, **kwargs: generated.append(args))
    (tmp_path / "prompts.txt").write_text("a cat\n")
    common = ["eval", "--prompts", str(tmp_path / "prompts.txt"), "--models", f"base={tmp_path / 'sd'}", "--out", str(tmp_path / "out")]
    assert main([*common, "--dinov2", "facebook/dinov2-large"]) == 2
    out = capsys.readouterr().out
    assert "adt eval: DINOv2 for FD-DINOv2 'facebook/dinov2-large': not a local folder and not in the Hugging Face cache" in out
    assert "hf download facebook/dinov2-large --local-dir ./dinov2-large" in out
    assert main([*common, "--hps", "xswu/HPSv2/HPS_v2.1_compressed.pt"]) == 2
    assert "hf download xswu/HPSv2 HPS_v2.1_compressed.pt" in capsys.readouterr().out
    assert generated == []
