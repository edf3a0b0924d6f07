"""`adt train` when things go wrong: resuming another run, non-finite values, failed
and killed saves, an error mid-run, folders it cannot write, a changed learning rate."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train_e2e import config_for, read_scalars
from tiny_pipelines import one_thread  # noqa: F401 (an autouse fixture)
from tiny_pipelines import make_image_folder, make_pipeline, save_tiny_dinov2

from adt_plugin.cli import main
from adt_plugin.strategies.adt import AdtStrategy
from adt_plugin.train.loop import train
from adt_plugin.train.monitor import Monitor


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    models = {f: make_pipeline(f, root / f"model-{f}", layers_per_block=1) for f in ("sd1", "sdxl")}
    data = make_image_folder(root / "data", count=3, size=(32, 32), repeats_dir="2_things")
    make_image_folder(data, count=2, size=(48, 32), seed=1)
    return {
        "models": models,
        "data": data,
        "dinov2": save_tiny_dinov2(root / "dinov2"),
        "dinov2-6": save_tiny_dinov2(root / "dinov2-6", layers=6),  # same widths, two more blocks
    }


@pytest.fixture(scope="module")
def adt_state(assets, tmp_path_factory):
    """The state after one ADT step: sd1, LoRA rank 4, taps [1, 3], head channels 8, d_lr 1e-3."""
    out = tmp_path_factory.mktemp("first") / "out"
    config, toml = config_for(assets, out, overrides=["train.max_steps=1"])
    train(config, echo=lambda m: None)
    return out / "tiny-step00000001-state", toml


def all_finite(folder: Path) -> bool:
    files = [p for p in folder.rglob("*.safetensors")]
    return bool(files) and all(bool(torch.isfinite(t.float()).all()) for f in files for t in load_file(f).values())


# --- resume ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, says",
    [
        ("adt.taps=[3, 1]", "[adt] taps: saved [1, 3], now [3, 1]"),  # same shapes: resumed silently before
        ("adt.taps=[1, 2, 3]", "[adt] taps: saved [1, 3], now [1, 2, 3]"),
        ("adt.head_channels=16", "[adt] head_channels: saved 8, now 16"),
        ("lora.rank=8", "[lora] rank: saved 4, now 8"),
        ("adt.d_lr=1e-5", "[adt] d_lr: saved 0.001, now 1e-05 (the discriminator's optimizer resumes with its saved"),
        ("model.path=SDXL", "model family: saved 'sd1', now 'sdxl'"),
    ],
)
def test_resume_of_another_discriminator_lora_or_family_is_refused_before_the_model_loads(
    assets, adt_state, capsys, override, says
):
    state, toml = adt_state
    override = override.replace("SDXL", str(assets["models"]["sdxl"]))
    assert main(["train", "--config", str(toml), override, "--resume", str(state)]) == 2
    captured = capsys.readouterr()
    assert says in captured.err and f"{state} was saved by a different run" in captured.err
    assert "loading" not in captured.out  # nothing was loaded


def test_resume_with_another_backbone_is_refused_naming_it(assets, adt_state, capsys):
    state, toml = adt_state
    deeper = assets["dinov2-6"]
    assert main(["train", "--config", str(toml), f"adt.backbone_path={deeper}", "--resume", str(state)]) == 2
    err = capsys.readouterr().err
    assert "saved with another discriminator" in err
    assert "backbone: checkpoint 'dinov2:32x4', this run 'dinov2:32x6'" in err


def test_a_changed_learning_rate_applies_on_resume_and_in_the_metadata(assets, tmp_path):
    first, _ = config_for(assets, tmp_path / "a", "sd1", "ft", ["train.max_steps=2", "save.every_n_steps=1"])
    train(first, echo=lambda m: None)
    assert read_scalars(tmp_path / "a")[-1]["lr/G"] == pytest.approx(1e-3)
    changed = ["train.max_steps=2", "train.learning_rate=1e-5", "train.adam_beta2=0.99"]
    resumed, _ = config_for(assets, tmp_path / "b", "sd1", "ft", changed)
    messages = []
    train(resumed, resume=tmp_path / "a" / "tiny-step00000001-state", echo=messages.append)
    assert [(row["step"], row["lr/G"]) for row in read_scalars(tmp_path / "b")] == [(2, pytest.approx(1e-5))]
    assert any("train.learning_rate: the state was saved with 0.001; continuing with 1e-05" in m for m in messages)
    betas = "train.adam_beta1/adam_beta2: the state was saved with (0.9, 0.999); continuing with (0.9, 0.99)"
    assert any(betas in m for m in messages)
    with safe_open(str(tmp_path / "b" / "tiny.safetensors"), "pt") as handle:
        assert float(handle.metadata()["ss_learning_rate"]) == 1e-5  # the metadata says what was used


# --- non-finite values -------------------------------------------------------------


def test_a_nan_discriminator_stops_the_run_and_nothing_non_finite_is_saved(assets, tmp_path):
    overrides = ["adt.d_lr=1e30", "train.max_nonfinite_steps=3", "train.max_steps=12", "adt.g_every=5"]
    config, _ = config_for(assets, tmp_path / "out", overrides=[*overrides, "save.every_n_steps=1"])
    messages = []
    result = train(config, echo=messages.append)
    assert result.status == "nonfinite" and result.step < 12  # D-only iterations count too
    assert any("3 non-finite steps in a row" in m for m in messages)
    assert all_finite(tmp_path / "out")  # every model, discriminator and state written


def _poison_after_last_call(monkeypatch, target: str, value: float, calls: int):
    """After the strategy's `calls`-th call, put `value` into one LoRA weight or discriminator weight."""
    original = AdtStrategy.__call__

    def call(self, model, batch):
        out = original(self, model, batch)
        if self.step == calls:
            module = model.denoiser if target == "model" else self.disc
            param = next(p for n, p in module.named_parameters() if p.requires_grad and n.endswith("weight"))
            param.data.view(-1)[0] = value
        return out

    monkeypatch.setattr(AdtStrategy, "__call__", call)


def test_a_model_that_overflows_in_the_saved_precision_is_not_saved(assets, tmp_path, monkeypatch):
    config, _ = config_for(assets, tmp_path / "out", overrides=["train.max_steps=2", "adt.g_every=1"])
    _poison_after_last_call(monkeypatch, "model", 1e30, calls=2)  # finite in float32, inf in fp16
    messages = []
    result = train(config, echo=messages.append)
    assert result.status == "nonfinite"
    assert not (tmp_path / "out" / "tiny.safetensors").exists()
    assert not (tmp_path / "out" / "tiny.adt_disc.safetensors").exists()  # nor half of the pair
    stop = next(m for m in messages if m.startswith("stopping"))
    assert "tiny.safetensors would hold non-finite values: lora_unet_" in stop
    assert "finite in float32 and overflow in fp16" in stop and "nothing was saved yet" in stop


def test_a_non_finite_discriminator_is_not_saved(assets, tmp_path, monkeypatch):
    config, _ = config_for(assets, tmp_path / "out", overrides=["train.max_steps=2", "save.every_n_steps=1"])
    _poison_after_last_call(monkeypatch, "discriminator", float("nan"), calls=2)
    messages = []
    result = train(config, echo=messages.append)
    assert result.status == "nonfinite" and not (tmp_path / "out" / "tiny.adt_disc.safetensors").exists()
    stop = next(m for m in messages if m.startswith("stopping"))
    assert "tiny.adt_disc.safetensors would hold non-finite values: discriminator." in stop
    assert "the last good save is step 1" in stop and all_finite(tmp_path / "out")


def test_scalars_jsonl_is_strict_json_with_null_for_non_finite_values(tmp_path):
    monitor = Monitor(tmp_path, 1, 0, True, False, echo=lambda m: None)
    monitor.scalars(1, {"loss/D": float("nan"), "grad_norm/G": float("inf"), "loss/diff": 0.5})
    monitor.close()

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    line = (tmp_path / "scalars.jsonl").read_text()
    assert json.loads(line, parse_constant=refuse) == {"step": 1, "loss/D": None, "grad_norm/G": None, "loss/diff": 0.5}


# --- saves that fail, saves that were killed, errors mid-run ------------------------


def test_a_failed_discriminator_save_keeps_the_previous_pair(assets, tmp_path, monkeypatch):
    import adt_plugin.checkpoint as checkpoint

    out = tmp_path / "out"
    config, _ = config_for(assets, out, overrides=["train.max_steps=1"])
    train(config, echo=lambda m: None)
    before = {p.name: p.read_bytes() for p in out.glob("tiny*.safetensors")}
    assert set(before) == {"tiny.safetensors", "tiny.adt_disc.safetensors"}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "atomic_save_safetensors", disk_full)  # the discriminator's writer
    again, _ = config_for(assets, out, overrides=["train.max_steps=2", "adt.seed=1"])
    with pytest.raises(Exception, match="No space left on device"):
        train(again, echo=lambda m: None)
    assert {p.name: p.read_bytes() for p in out.glob("tiny*.safetensors")} == before  # the old pair, untouched
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_model_saved_without_a_discriminator_takes_the_old_one_away(assets, tmp_path):
    out = tmp_path / "out"
    adt, _ = config_for(assets, out, overrides=["train.max_steps=1", "save.state=false"])
    train(adt, echo=lambda m: None)
    assert (out / "tiny.adt_disc.safetensors").is_file()
    ft, _ = config_for(assets, out, "sd1", "ft", ["train.max_steps=1", "save.state=false"])
    train(ft, echo=lambda m: None)  # same folder and name: the FT model replaces the ADT one
    assert (out / "tiny.safetensors").is_file() and not (out / "tiny.adt_disc.safetensors").exists()


def test_leftovers_of_a_killed_save_are_cleaned_at_the_start(assets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    ours = [
        ".tiny-step00000003.safetensors.k2j3h4.tmp",  # an atomic write's temporary file
        ".tiny-step00000003.adt_disc.safetensors.pending.tmp",  # half of a pair
    ]
    for name in ours:
        (out / name).write_bytes(b"half")
    (out / ".tiny-step00000003-state.tmp").mkdir()  # a state folder being written
    (out / ".tiny-step00000003-state.tmp" / "optimizer.pt").write_bytes(b"half")
    (out / "tiny-step00000002-state.old").mkdir()  # killed between the two renames of a replacement
    (out / "tiny-step00000002-state.old" / "trainer.json").write_text("{}")
    theirs = [".other-run.safetensors.abc.tmp", "notes.txt"]
    for name in theirs:
        (out / name).write_text("not ours")
    config, _ = config_for(assets, out, "sd1", "ft", ["train.max_steps=1", "save.state=false"])
    messages = []
    train(config, echo=messages.append)
    names = {p.name for p in out.iterdir()}
    assert not names & {*ours, ".tiny-step00000003-state.tmp", "tiny-step00000002-state.old"}
    assert set(theirs) <= names and (out / "tiny-step00000002-state" / "trainer.json").is_file()  # put back
    assert any(m.startswith(f"removed 3 unfinished file(s) of a killed save in {out}") for m in messages)
    assert any(m.startswith(f"put back {out / 'tiny-step00000002-state'}") for m in messages)


def test_an_error_mid_run_saves_the_model_and_state_then_says_what_happened(assets, tmp_path, monkeypatch, capsys):
    import adt_plugin.train.data as data_module

    data = Path(shutil.copytree(assets["data"], tmp_path / "data"))
    _, toml = config_for(assets, tmp_path / "out", "sd1", "ft", ["train.max_steps=6"])
    original, calls = data_module.prepare_image, []

    def prepare_image(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 5:  # the third batch: the user deleted the images meanwhile
            for image in data.rglob("*.png"):
                image.unlink()
        return original(path, *args, **kwargs)

    monkeypatch.setattr(data_module, "prepare_image", prepare_image)
    assert main(["train", "--config", str(toml), f"data.folder={data}"]) == 1
    err = capsys.readouterr().err
    state = tmp_path / "out" / "tiny-step00000002-state"
    assert "FileNotFoundError" in err and "Traceback" in err  # the cause, then one line that says it all
    last = err.strip().splitlines()[-1]
    assert last.startswith("adt train: error at step 2: FileNotFoundError:")
    assert f"saved {tmp_path / 'out' / 'tiny-step00000002.safetensors'} and the resumable state {state}" in last
    assert f"continue with --resume {state}" in last
    assert json.loads((state / "trainer.json").read_text())["step"] == 2


# --- the command line --------------------------------------------------------------


def test_check_stops_on_an_output_folder_that_cannot_be_written(assets, tmp_path, capsys):
    _, toml = config_for(assets, tmp_path / "out")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", "--config", str(toml), "--check", f"train.output_dir={blocker / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert f"[train] output_dir = '{blocker / 'out'}': {blocker} is a file, not a folder" in err
    assert main(["train", "--config", str(toml), "--check"]) == 0
    assert f"writing to {tmp_path / 'out'}" in capsys.readouterr().out


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a user that file permissions apply to")
def test_check_stops_on_a_read_only_output_folder(assets, tmp_path, capsys):
    _, toml = config_for(assets, tmp_path / "out")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["train", "--config", str(toml), "--check", f"train.output_dir={locked / 'out'}"]) == 2
    finally:
        locked.chmod(0o700)
    assert f"cannot create files in {locked}" in capsys.readouterr().err


def test_overrides_may_come_between_options(assets, tmp_path, capsys):
    _, toml = config_for(assets, tmp_path / "out")
    assert main(["train", "--config", str(toml), "train.max_steps=7", "--check", "adt.g_every=3"]) == 0
    assert "7 steps" in capsys.readouterr().out
