"""Discriminator checkpoints: round trip, mismatch errors, atomic writes."""

import pytest
import torch
from tiny import DDPM_CONFIG, TinyAdapter, TinyDenoiser, tiny_dinov2

from adt_plugin import AdtSettings, TrainBatch, build_strategy
from adt_plugin import fileio
from adt_plugin.checkpoint import CheckpointMismatch, disc_path_for, load_discriminator, save_discriminator


def make(taps=(1, 3), seed=0, backbone=None):
    s = AdtSettings(num_inference_steps=5, guidance_scale=2.0, taps=taps, head_channels=8, d_lr=1e-3, g_every=2, seed=seed)
    torch.manual_seed(0)
    return build_strategy(s, DDPM_CONFIG, backbone=backbone or tiny_dinov2(taps=taps))


def run(strategy, n):
    torch.manual_seed(1)
    model = TinyAdapter(TinyDenoiser())
    b = TrainBatch(torch.randn(2, 4, 8, 8), {"labels": torch.tensor([0, 1])})
    return [strategy(model, b).logs for _ in range(n)]


def test_disc_path_sits_beside_the_model():
    assert str(disc_path_for("out/my_lora.safetensors")) == "out/my_lora.adt_disc.safetensors"
    assert str(disc_path_for("out/model")) == "out/model.adt_disc.safetensors"


def test_round_trip_is_bit_equal_and_continues_identically(tmp_path):
    a = make()
    run(a, 3)
    path = save_discriminator(tmp_path / "lora.adt_disc.safetensors", a)
    b = make(seed=99)
    load_discriminator(path, b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["step"] == sb["step"] == 3
    assert torch.equal(sa["rng"], sb["rng"])
    for key, value in sa["discriminator"].items():
        assert torch.equal(value, sb["discriminator"][key]), key
    for index, state in sa["d_optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["d_optimizer"]["state"][index][name]))
    assert sa["d_optimizer"]["param_groups"] == sb["d_optimizer"]["param_groups"]
    assert sa["d_scheduler"] == sb["d_scheduler"]
    assert run(a, 2) == run(b, 2)  # same draws, same updates afterwards


def test_loading_a_checkpoint_for_other_taps_or_backbone_says_what_differs(tmp_path):
    path = save_discriminator(tmp_path / "d.adt_disc.safetensors", make(taps=(1, 3)))
    with pytest.raises(CheckpointMismatch, match=r"taps: checkpoint \[1, 3\], this run \[0, 2\]"):
        load_discriminator(path, make(taps=(0, 2)))
    other = tiny_dinov2(taps=(1, 3))
    other.identity = "dinov2:384x12"
    with pytest.raises(CheckpointMismatch, match=r"backbone: checkpoint 'tiny-dinov2', this run 'dinov2:384x12'"):
        load_discriminator(path, make(backbone=other))
    (tmp_path / "not_disc.safetensors").write_bytes(b"")
    with pytest.raises(Exception):
        load_discriminator(tmp_path / "not_disc.safetensors", make())
    with pytest.raises(FileNotFoundError, match="no discriminator checkpoint"):
        load_discriminator(tmp_path / "missing.safetensors", make())


def test_failed_write_leaves_the_previous_file_and_no_partial_file(tmp_path, monkeypatch):
    strategy = make()
    path = tmp_path / "lora.adt_disc.safetensors"
    save_discriminator(path, strategy)
    good = path.read_bytes()
    run(strategy, 2)

    real_open = open

    class HalfWriter:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio, "open", lambda p, mode="r": HalfWriter(real_open(p, mode)), raising=False)
    with pytest.raises(OSError, match="No space left"):
        save_discriminator(path, strategy)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    load_discriminator(path, make())  # still a valid checkpoint


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    """mkstemp makes 0600 files; a LoRA or discriminator file must be readable like any other."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        fileio.atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644
    finally:
        os.umask(old)
