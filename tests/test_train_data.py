"""Training data: the kohya folder layout, bad files, buckets, the resumable batch order."""

from itertools import islice

import numpy as np

import pytest
import torch
from PIL import Image
from tiny_pipelines import make_image_folder

from adt_plugin.cli import main
from adt_plugin.train.data import (
    BatchOrder,
    DataError,
    TrainImages,
    make_buckets,
    nearest_bucket,
    prepare_image,
    scan_folder,
)


def test_scan_reports_and_skips_bad_files_with_reasons(tmp_path):
    make_image_folder(tmp_path, count=2, size=(64, 64))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "broken.txt").write_text("a broken file")
    Image.new("RGB", (64, 64)).save(tmp_path / "nocaption.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "empty.jpg")
    (tmp_path / "empty.txt").write_text("  \n")
    Image.new("RGB", (20, 64)).save(tmp_path / "tiny.png")
    (tmp_path / "tiny.txt").write_text("too small")
    report = scan_folder(tmp_path, ".txt", min_image_size=32)
    assert [i.path.name for i in report.items] == ["img0.png", "img1.png"]
    reasons = {p.name: r for p, r in report.skipped}
    assert reasons["broken.png"].startswith("cannot be read as an image")
    assert reasons["nocaption.png"] == "no caption file (expected nocaption.txt)"
    assert reasons["empty.jpg"] == "caption file empty.txt is empty"
    assert reasons["tiny.png"] == "too small: 20x64, shorter side below 32 px"
    assert report.lines()[-1].endswith("; 4 skipped")


def test_repeat_folders_and_empty_data(tmp_path):
    make_image_folder(tmp_path, count=2, repeats_dir="3_style")
    make_image_folder(tmp_path, count=1, seed=1)
    report = scan_folder(tmp_path)
    assert sorted(i.repeats for i in report.items) == [1, 3, 3]
    assert "3 images (7 per epoch with repeats)" in report.lines()[-1]
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.new("RGB", (64, 64)).save(empty / "a.png")
    with pytest.raises(DataError, match=r"no usable training images in .*empty.*a.png: no caption file"):
        scan_folder(empty)
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "nowhere")


def test_empty_dataset_is_an_error_before_any_model_is_loaded(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\npath = "{tmp_path / "no-model"}"\n[data]\nfolder = "{tmp_path / "data"}"\n')
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no usable training images" in err and "no-model" not in err  # the model path was never looked at


def test_check_mode_validates_without_loading_weights(tmp_path, capsys):
    make_image_folder(tmp_path / "data", count=2)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')  # no weights at all
    backbone = tmp_path / "dinov2"  # the backbone is checked from its config.json alone
    backbone.mkdir()
    (backbone / "config.json").write_text('{"num_hidden_layers": 12, "hidden_size": 384}')
    (backbone / "model.safetensors").write_bytes(b"")
    config = tmp_path / "run.toml"
    config.write_text(f'[model]\npath = "{model}"\n[data]\nfolder = "{tmp_path / "data"}"\nresolution = 64\n'
                      f'[adt]\nbackbone_path = "{backbone}"\n')
    assert main(["train", "--config", str(config), "--check", "adt.sampler=flow_euler"]) == 0
    out = capsys.readouterr().out
    assert "config OK" in out and "(sd3)" in out
    assert main(["train", "--config", str(config), "--check"]) == 2  # DDIM does not fit SD3
    assert "[adt] sampler = 'ddim' does not fit a sd3 model; use one of flow_euler" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--check", "model.path=nowhere"]) == 2
    assert "model path nowhere does not exist" in capsys.readouterr().err


def test_buckets_cover_aspect_ratios_within_the_area():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert buckets[nearest_bucket(1000, 600, buckets)] == (640, 384)
    assert buckets[nearest_bucket(600, 600, buckets)] == (512, 512)


def test_prepare_image_covers_then_crops_the_bucket(tmp_path):
    Image.new("RGB", (100, 50), (255, 0, 0)).save(tmp_path / "wide.png")
    prepared = prepare_image(tmp_path / "wide.png", (64, 64))
    assert prepared.pixels.shape == (3, 64, 64)
    assert prepared.original_size == (50, 100) and prepared.target_size == (64, 64)
    assert prepared.crop_top_left == (0, 32)  # resized to 128x64, centre crop
    torch.testing.assert_close(prepared.pixels[0], torch.ones(64, 64))  # red -> +1


def test_batch_order_is_a_function_of_seed_and_epoch_and_every_batch_is_full():
    order = BatchOrder([0, 0, 0, 1, 1, 0, 1], global_batch=2, seed=3)
    assert order.batches_per_epoch == 4
    first = order.epoch(0)
    assert first == BatchOrder([0, 0, 0, 1, 1, 0, 1], 2, 3).epoch(0) and first != order.epoch(1)
    buckets = [0, 0, 0, 1, 1, 0, 1]
    assert all(len(b) == 2 and len({buckets[e] for e in b}) == 1 for b in first)
    run = list(islice(order.iterate(0, 0), 6))  # crosses into epoch 1
    resumed = list(islice(order.iterate(0, 3), 3))
    assert run[3:] == resumed and run[4][:2] == (1, 0)


def test_caption_dropout_and_random_crop_are_reproducible(tmp_path):
    make_image_folder(tmp_path, count=4, size=(80, 64))
    items = scan_folder(tmp_path).items
    data = TrainImages(items, [(64, 64)], seed=5, random_crop=True, flip=True, caption_dropout=0.5)
    a = [data[(i, 2)] for i in range(4)]
    b = [data[(i, 2)] for i in range(4)]
    assert [s["caption"] for s in a] == [s["caption"] for s in b]
    assert "" in [data.caption_for(i, e) for i in range(4) for e in range(4)]
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(a, b))


def test_16_bit_greyscale_pngs_keep_their_values(tmp_path):
    import numpy as np

    values = np.full((64, 64), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(values).save(tmp_path / "grey16.png")
    (tmp_path / "grey16.txt").write_text("grey")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")  # what PIL gives for it
    report = scan_folder(tmp_path)
    assert [i.path.name for i in report.items] == ["grey16.png"]
    pixels = prepare_image(tmp_path / "grey16.png", (64, 64)).pixels
    # 32768 / 257 = 127.5 -> 128 in 8 bits -> 128 / 127.5 - 1; PIL's plain RGB conversion gives white (+1)
    torch.testing.assert_close(pixels, torch.full((3, 64, 64), 128 / 127.5 - 1))


def test_exif_orientation_turns_the_image_upright(tmp_path):
    from PIL import ImageOps

    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 32, 32))  # left half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=100, subsampling=0)
    (tmp_path / "photo.txt").write_text("a photo")
    shown = ImageOps.exif_transpose(Image.open(tmp_path / "photo.jpg")).convert("RGB")
    assert shown.size == (32, 64)
    item = scan_folder(tmp_path, min_image_size=16).items[0]
    assert (item.width, item.height) == (32, 64)  # the bucket is chosen for the upright image
    prepared = prepare_image(tmp_path / "photo.jpg", (32, 64))
    assert prepared.original_size == (64, 32)
    expected = torch.from_numpy(np.asarray(shown, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    torch.testing.assert_close(prepared.pixels, expected)
