"""`adt eval` end to end on a tiny random Stable Diffusion pipeline and a kohya LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from adt_plugin.cli import main
from adt_plugin.eval.aesthetic import AestheticHead
from adt_plugin.eval.command import parse_seeds, read_prompts
from adt_plugin.eval.generate import ModelSpec, initial_noise, parse_models, read_record
from tiny_eval import kohya_lora_for, tiny_clip_folder, tiny_dinov2_folder, tiny_sd_folder


def test_parse_models():
    specs = parse_models("base=./sd15, ft=./sd15+./ft.safetensors ,adt=./sd15+./adt@v2.safetensors@0.8")
    assert specs == [
        ModelSpec("base", "./sd15"),
        ModelSpec("ft", "./sd15", "./ft.safetensors", 1.0),
        ModelSpec("adt", "./sd15", "./adt@v2.safetensors", 0.8),
    ]
    assert parse_models("base,ft=+ft.safetensors@0.5", base_model="/m") == [ModelSpec("base", "/m"), ModelSpec("ft", "/m", "ft.safetensors", 0.5)]
    for bad, message in [
        ("base", "NAME=MODEL"),
        ("a b=x", "may only use"),
        ("a=x,a=y", "unique"),
        ("ft=x+", "nothing after"),
        ("ft=+l.safetensors", "names no model"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_models(bad)


def test_parse_seeds_and_prompts(tmp_path):
    assert parse_seeds("0, 2,5-7") == (0, 2, 5, 6, 7)
    for bad in ("x", "1,1", ""):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    text = tmp_path / "p.txt"
    text.write_text("# my prompts\na cat\n\n  a dog  \n")
    assert read_prompts(text) == ["a cat", "a dog"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["a cat", {"prompt": "a dog"}]))
    assert read_prompts(js) == ["a cat", "a dog"]
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")


def test_initial_noise_depends_only_on_the_seed():
    a = initial_noise([3, 7], (4, 8, 8))
    assert torch.equal(a[1], initial_noise([7], (4, 8, 8))[0]) and not torch.equal(a[0], a[1])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from diffusers import UNet2DConditionModel
    from sklearn.datasets import load_digits
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("eval")
    sd = tiny_sd_folder(root / "sd")
    unet = UNet2DConditionModel.from_pretrained(str(sd / "unet"))
    text = CLIPTextModel.from_pretrained(str(sd / "text_encoder"))
    save_file(kohya_lora_for(unet, text), str(root / "ft.safetensors"))
    metrics = root / "metrics"
    tiny_clip_folder(metrics / "clip-vit-large-patch14")
    tiny_dinov2_folder(metrics / "dinov2-small")
    torch.manual_seed(0)
    torch.save(AestheticHead(embed_dim=8).state_dict(), metrics / "sac+logos+ava1-l14-linearMSE.pth")
    ref = root / "ref"
    ref.mkdir()
    for i, digit in enumerate(load_digits().images[:12]):
        gray = (digit / 16 * 255).astype(np.uint8)
        Image.fromarray(gray).convert("RGB").resize((16, 16), Image.NEAREST).save(ref / f"{i}.png")
    (root / "prompts.txt").write_text("a cat\na dog\n")
    return root


def _run(ws, out, *extra):
    return main([
        "eval", "--prompts", str(ws / "prompts.txt"), "--out", str(out), "--ref", str(ws / "ref"),
        "--models", f"base={ws / 'sd'},ft={ws / 'sd'}+{ws / 'ft.safetensors'},zero={ws / 'sd'}+{ws / 'ft.safetensors'}@0",
        "--seeds", "0-1", "--steps", "3", "--cfg", "3", "--metrics-dir", str(ws / "metrics"), "--kid-subsets", "5",
        "--dinov2", str(ws / "metrics" / "dinov2-small"), *extra,
    ])


def test_adt_eval_generates_evaluates_and_resumes(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(workspace, out) == 0
    printed = capsys.readouterr().out
    images = {m: sorted((out / "images" / m).glob("*.png")) for m in ("base", "ft", "zero")}
    assert all(len(v) == 4 for v in images.values())  # 2 prompts x 2 seeds
    for b, f, z in zip(images["base"], images["ft"], images["zero"]):
        base, ft, zero = (np.asarray(Image.open(p)) for p in (b, f, z))
        assert np.array_equal(base, zero)  # same seed, same noise, LoRA at 0: identical
        assert not np.array_equal(base, ft)  # the LoRA changes the image
    assert read_record(images["ft"][0])["seed"] == 0 and read_record(images["ft"][0])["prompt"] == "a cat"

    report = (out / "report.md").read_text()
    assert "| model | FD-DINOv2 ↓ | KID-DINOv2 x1e3 ↓ | Aesthetic ↑ | CLIP score ↑ |" in report
    assert "| ft over base |" in report and "| zero over base | 50.0% (0/2/0) |" in report
    assert "pt_inception-2015-12-05-6726825d.pth" in report and "## Skipped" in report  # no Inception weights
    data = json.loads((out / "report.json").read_text())
    assert data["set_metrics"]["fd_dinov2"]["zero"] == pytest.approx(data["set_metrics"]["fd_dinov2"]["base"])
    assert set(data["table"]) == {"fd_dinov2", "kid_dinov2", "aesthetic", "clip"}
    assert "DINOv2 (dinov2-small)" in data["descriptions"]["fd_dinov2"]
    grid = Image.open(out / "grid.png")
    assert grid.width > 3 * 16 and Image.open(out / "chart.png").height > 0
    assert "base: 4 generated, 0 reused" in printed and "wrote" in printed

    cached = sorted((out / "cache").glob("ref-features-*.safetensors"))
    assert len(cached) == 1  # DINOv2 features of the reference folder
    cache_stamp = cached[0].stat().st_mtime_ns

    # resume: nothing regenerated, files untouched
    stamp = {p: p.stat().st_mtime_ns for v in images.values() for p in v}
    assert _run(workspace, out, "--skip-generation") == 0
    assert _run(workspace, out) == 0
    assert "ft: 0 generated, 4 reused" in capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())
    assert sorted((out / "cache").glob("ref-features-*.safetensors")) == cached
    assert cached[0].stat().st_mtime_ns == cache_stamp  # read back, not recomputed
    # other settings: the records no longer match, so the images are made again
    assert _run(workspace, out, "--skip-generation", "--steps", "2") == 2
    assert "were made with other settings" in capsys.readouterr().out


def test_adt_eval_reports_a_bad_argument_without_a_traceback(workspace, tmp_path, capsys):
    assert main(["eval", "--prompts", str(tmp_path / "nope.txt"), "--models", "a=x", "--out", str(tmp_path)]) == 2
    assert "prompt file" in capsys.readouterr().out
    prompts = str(workspace / "prompts.txt")
    assert main(["eval", "--prompts", prompts, "--models", f"a={workspace / 'sd'}", "--out", str(tmp_path), "--ref", str(tmp_path / "none")]) == 2
    assert "image folder" in capsys.readouterr().out and not (tmp_path / "images").exists()
    assert main(["eval", "--prompts", prompts, "--models", f"a={tmp_path}", "--out", str(tmp_path / "o")]) == 2
    assert "is not a diffusers pipeline folder (no model_index.json)" in capsys.readouterr().out


def test_adt_eval_reads_a_single_file_checkpoint_like_its_folder(workspace, tmp_path, capsys):
    """Single files go through the trainer's offline loader; --config-dir gives the configs."""
    from tiny_pipelines import write_sd1_single_file

    single = write_sd1_single_file(workspace / "sd", tmp_path / "base.safetensors")
    common = ["eval", "--prompts", str(workspace / "prompts.txt"), "--seeds", "0", "--steps", "2", "--cfg", "3"]
    assert main([*common, "--models", f"file={single}", "--config-dir", str(workspace / "sd"), "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--models", f"folder={workspace / 'sd'}", "--out", str(tmp_path / "b")]) == 0
    from_file = sorted((tmp_path / "a" / "images" / "file").glob("*.png"))
    from_folder = sorted((tmp_path / "b" / "images" / "folder").glob("*.png"))
    assert len(from_file) == len(from_folder) == 2
    for a, b in zip(from_file, from_folder):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.fixture(scope="module")
def sd3_workspace(tmp_path_factory):
    """A tiny SD3 pipeline and one trained-looking LoRA in both SD3 layouts: diffusers'
    (what `adt train` writes) and sd-scripts' (q, k, v fused; diffusers cannot read it)."""
    from diffusers import SD3Transformer2DModel
    from tiny_pipelines import make_pipeline

    from adt_plugin.train.config import LoraConfig
    from adt_plugin.train.keymap import KOHYA
    from adt_plugin.train.lora import add_lora, to_kohya
    from adt_plugin.families import FAMILIES

    root = tmp_path_factory.mktemp("eval_sd3")
    folder = make_pipeline("sd3", root / "sd3")
    transformer = SD3Transformer2DModel.from_pretrained(str(folder / "transformer"))
    config = LoraConfig(rank=4, alpha=2.0)
    add_lora(transformer, FAMILIES["sd3"], config)
    generator = torch.Generator().manual_seed(1)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.3
    save_file(to_kohya(FAMILIES["sd3"], transformer, config.alpha, torch.float32), str(root / "adt.safetensors"))
    save_file(to_kohya(FAMILIES["sd3"], transformer, config.alpha, torch.float32, fmt=KOHYA), str(root / "sd_scripts.safetensors"))
    (root / "prompts.txt").write_text("a cat\n")
    return root


def _eval_sd3(ws, out, models):
    return main([
        "eval", "--prompts", str(ws / "prompts.txt"), "--out", str(out), "--models", models, "--base-model", str(ws / "sd3"),
        "--seeds", "0", "--steps", "2", "--cfg", "1", "--sampler", "flow_euler",
    ])


def test_adt_eval_applies_an_sd3_lora_in_either_layout(sd3_workspace, tmp_path, capsys):
    """Before: diffusers loaded nothing from the SD3 file and eval exited 2 ("Adapter name(s)
    {'adt_eval'} not in the list of present adapters")."""
    ws = sd3_workspace
    models = f"base,adt=+{ws / 'adt.safetensors'},kohya=+{ws / 'sd_scripts.safetensors'},zero=+{ws / 'adt.safetensors'}@0"
    assert _eval_sd3(ws, tmp_path / "out", models) == 0, capsys.readouterr().out
    image = {m: np.asarray(Image.open(tmp_path / "out" / "images" / m / "p00000_s0.png")).astype(int) for m in ("base", "adt", "kohya", "zero")}
    assert np.array_equal(image["base"], image["zero"])
    assert np.abs(image["adt"] - image["base"]).max() > 8  # the LoRA changes the image ...
    assert np.abs(image["kohya"] - image["adt"]).max() <= 1  # ... the same in sd-scripts' layout (float rounding only)


def test_adt_eval_refuses_a_lora_that_does_not_fit_or_cannot_be_read(sd3_workspace, workspace, tmp_path, capsys):
    ws = sd3_workspace
    assert _eval_sd3(ws, tmp_path / "a", f"sd1lora=+{workspace / 'ft.safetensors'}") == 2  # an SD1 LoRA on SD3
    printed = capsys.readouterr().out
    assert f"model 'sd1lora': LoRA file {workspace / 'ft.safetensors'}" in printed and "use it with the model it was trained for" in printed
    assert not list((tmp_path / "a").glob("images/*/*.png"))

    lora = load_file_dict(ws / "adt.safetensors")
    lora["transformer.transformer_blocks.9.attn.to_q.lora_A.weight"] = torch.zeros(4, 16)  # a block this model lacks
    lora["transformer.transformer_blocks.9.attn.to_q.lora_B.weight"] = torch.zeros(16, 4)
    save_file(lora, str(tmp_path / "extra.safetensors"))
    assert _eval_sd3(ws, tmp_path / "b", f"extra=+{tmp_path / 'extra.safetensors'}") == 2
    printed = capsys.readouterr().out
    assert f"LoRA file {tmp_path / 'extra.safetensors'}" in printed and "of its" in printed

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((ws / "adt.safetensors").read_bytes()[:100])
    assert _eval_sd3(ws, tmp_path / "c", f"base,bad=+{corrupt}") == 2  # refused before any model loads
    printed = capsys.readouterr().out
    assert f"model 'bad': LoRA file {corrupt} cannot be read" in printed and "save or download it again" in printed
    assert not (tmp_path / "c" / "images").exists()


def load_file_dict(path):
    from safetensors.torch import load_file

    return dict(load_file(str(path)))
