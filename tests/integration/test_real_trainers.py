"""The real sd-scripts and OneTrainer, a few steps on tiny random models.

Skipped unless pointed at checkouts (each runs in its own Python, which has
that tool's pinned requirements and adt-plugin installed):

    ADT_SD_SCRIPTS=/path/to/sd-scripts  ADT_SD_SCRIPTS_PYTHON=/path/to/its/venv/bin/python
    ADT_ONETRAINER=/path/to/OneTrainer  ADT_ONETRAINER_PYTHON=/path/to/its/venv/bin/python

The OneTrainer checkout is copied to a temporary folder and install.py places the
shim and presets there; the checkout itself is not touched. Several minutes on a CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SD_SCRIPTS = os.environ.get("ADT_SD_SCRIPTS")
ONETRAINER = os.environ.get("ADT_ONETRAINER")


def python_of(env: str) -> str:
    return os.environ.get(env, sys.executable)


def run(cmd, cwd=None, timeout=1500, **env):
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, **env})
    return result.returncode, result.stdout + result.stderr


def build(python: str, code: str) -> None:
    rc, out = run([python, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r})\nfrom pathlib import Path\n"
                   f"import tiny_models as t\n{code}"])
    assert rc == 0, out


def load(python: str, path: Path) -> dict:
    """Tensors of a safetensors file, as lists (read in the tool's Python)."""
    rc, out = run([python, "-c", "import json, sys\nfrom safetensors.torch import load_file\n"
                   "print(json.dumps({k: v.float().flatten().tolist() for k, v in load_file(sys.argv[1]).items()}))", path])
    assert rc == 0, out
    return json.loads(out.strip().splitlines()[-1])


def scalars(python: str, folder: Path) -> dict:
    rc, out = run([python, "-c", "import glob, json, sys\n"
                   "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n"
                   "tags = {}\n"
                   "for f in glob.glob(sys.argv[1] + '/**/events*', recursive=True):\n"
                   "    ea = EventAccumulator(f); ea.Reload()\n"
                   "    for t in ea.Tags()['scalars']: tags[t] = [(e.step, e.value) for e in ea.Scalars(t)]\n"
                   "print(json.dumps(tags))", folder])
    assert rc == 0, out
    return json.loads(out.strip().splitlines()[-1])


# -- kohya-ss sd-scripts --------------------------------------------------------------------
@pytest.mark.skipif(not SD_SCRIPTS, reason="set ADT_SD_SCRIPTS to an sd-scripts checkout")
class TestSdScripts:
    @pytest.fixture(scope="class")
    def world(self, tmp_path_factory):
        root = tmp_path_factory.mktemp("kohya")
        python = python_of("ADT_SD_SCRIPTS_PYTHON")
        build(python, f"t.tiny_sd15_diffusers(Path({str(root / 'sd15')!r}), Path({str(root / 'tok' / 'openai_clip-vit-large-patch14')!r}))\n"
                      f"t.tiny_dinov2_folder(Path({str(root / 'dinov2')!r}))\n"
                      f"t.tiny_image_folder(Path({str(root / 'data')!r}))")
        return root, python

    def train(self, world, out, *extra, script="train_network.py", adt=True, backbone=None, **env):
        root, python = world
        cmd = [python, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "2", "--mixed_precision", "no"]
        cmd += ["-m", "adt_plugin.kohya.launch"] if adt else []
        cmd += [Path(SD_SCRIPTS) / script, "--pretrained_model_name_or_path", root / "sd15",
                "--tokenizer_cache_dir", root / "tok", "--train_data_dir", root / "data", "--output_dir", out,
                "--output_name", "tiny", "--resolution", "64", "--network_module", "networks.lora", "--network_dim", "4",
                "--learning_rate", "1e-3", "--optimizer_type", "AdamW", "--sdpa", "--seed", "1", "--cache_latents",
                "--max_data_loader_n_workers", "0", *extra]
        if adt:
            cmd += ["--adt_backbone_path", backbone or root / "dinov2", "--adt_taps", "1", "3", "--adt_num_inference_steps", "3",
                    "--adt_g_every", "2", "--adt_k_graph_steps", "1", "--adt_head_channels", "8"]
        return run(cmd, **env)

    def test_train_save_prune_state_and_resume(self, world, tmp_path):
        root, python = world
        out = tmp_path / "out"
        rc, log = self.train(world, out, "--max_train_steps", "4", "--save_every_n_steps", "1", "--save_last_n_steps", "2",
                             "--save_state", "--logging_dir", tmp_path / "logs")
        assert rc == 0, log[-3000:]
        assert "ADT: strategy adt, SD 1.x / 2.x" in log
        names = sorted(p.name for p in out.glob("*.safetensors"))
        # --save_last_n_steps 2 keeps steps 2..4; the discriminator files went with the pruned LoRAs
        assert names == ["tiny-step00000002.adt_disc.safetensors", "tiny-step00000002.safetensors",
                         "tiny-step00000003.adt_disc.safetensors", "tiny-step00000003.safetensors",
                         "tiny-step00000004.adt_disc.safetensors", "tiny-step00000004.safetensors",
                         "tiny.adt_disc.safetensors", "tiny.safetensors"], names
        assert all((d / "adt_disc.safetensors").exists() for d in out.glob("*-state"))
        step2, step3, step4 = (load(python, out / f"tiny-step0000000{i}.safetensors") for i in (2, 3, 4))
        assert step2 == step3  # iteration 3 was discriminator-only: the LoRA did not move
        assert step3 != step4
        tags = scalars(python, tmp_path / "logs")
        assert {"loss/D", "D/real", "D/fake", "loss/G", "loss/current"} <= tags.keys()
        # sd-scripts' own loss curve shows ADT's diffusion term (float32 rounding apart)
        assert [s for s, _ in tags["loss/current"]] == [s for s, _ in tags["loss/diff"]]
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(tags["loss/current"], tags["loss/diff"]))

        rc, log = self.train(world, tmp_path / "resumed", "--max_train_steps", "4", "--resume", out / "tiny-step00000003-state",
                             "--skip_until_initial_step")
        assert rc == 0, log[-3000:]
        assert "ADT: discriminator restored from" in log
        assert (tmp_path / "resumed" / "tiny.adt_disc.safetensors").exists()

    def test_resuming_a_plain_sd_scripts_state_starts_a_fresh_discriminator(self, world, tmp_path):
        rc, log = self.train(world, tmp_path / "plain", "--max_train_steps", "1", "--save_every_n_steps", "1", "--save_state",
                             adt=False)
        assert rc == 0, log[-3000:]
        rc, log = self.train(world, tmp_path / "adt", "--max_train_steps", "2", "--resume",
                             tmp_path / "plain" / "tiny-step00000001-state", "--skip_until_initial_step")
        assert rc == 0, log[-3000:]
        assert "fresh discriminator" in log

    def test_sd3_family_with_sd_scripts_own_sd3_models(self, world, tmp_path):
        """SD3's thin part on sd-scripts' real MMDiT, SDVAE and text-encoding strategy (a
        real SD3 checkpoint is far too large here): a D-only call gives the MMDiT no
        gradient, a generator call gives every block one, and decode keeps the graph."""
        root, python = world
        script = tmp_path / "sd3_check.py"
        script.write_text(SD3_CHECK)
        rc, out = run([python, script, SD_SCRIPTS, root / "dinov2"])
        assert rc == 0, out[-3000:]
        result = json.loads(next(line for line in out.splitlines() if line.startswith('{"params"')))
        assert result["logs"]["loss/G"] == result["logs"]["loss/G"]  # not NaN
        assert result["d_only_grads"] == 0 and result["g_grads"] >= 0.8 * result["params"] > 0
        assert result["decoded"] == [1, 3, 64, 64] and result["decode_grad"] is True

    def test_a_missing_backbone_stops_before_sd_scripts_loads_the_model(self, world, tmp_path):
        rc, log = self.train(world, tmp_path / "x", "--max_train_steps", "1", backbone="facebook/dinov2-small",
                             HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
        assert rc != 0
        assert "adt_plugin.kohya: DINOv2 backbone 'facebook/dinov2-small': not a local folder and not in the Hugging Face cache" in log
        assert "hf download facebook/dinov2-small --local-dir ./dinov2-small" in log
        assert "load Diffusers pretrained models" not in log, log[-3000:]

    def test_unknown_adt_option_in_a_config_file_is_named(self, world, tmp_path):
        config = tmp_path / "c.toml"
        config.write_text("[adt]\nadt_lamda_diff = 0.3\n")
        rc, log = self.train(world, tmp_path / "x", "--max_train_steps", "1", "--config_file", config)
        assert rc != 0 and "did you mean 'adt_lambda_diff'" in log


SD3_CHECK = """
import contextlib, json, sys
from argparse import Namespace
sys.path.insert(0, sys.argv[1])
import torch
from library import sd3_models, strategy_sd3
from adt_plugin import AdtSettings, build_strategy
from adt_plugin.bridge import FunctionAdapter, StrategyRunner
from adt_plugin.kohya.families import FAMILIES, KohyaContext

torch.manual_seed(0)
family = FAMILIES["sd3"]
params = sd3_models.SD3Params(patch_size=2, depth=2, num_patches=64, pos_embed_max_size=8, adm_in_channels=2048, qk_norm=None,
                              x_block_self_attn_layers=[], context_embedder_in_features=4096, context_embedder_out_features=128,
                              model_type="medium")
mmdit = sd3_models.create_sd3_mmdit(params)
mmdit.initialize_weights()  # sd-scripts' own init (a checkpoint would otherwise fill pos_embed)
for weight in mmdit.parameters():  # its zero-initialised modulation / output layers: as if trained
    if not weight.detach().abs().sum():
        weight.data.normal_(0, 0.02)
vae = sd3_models.SDVAE().requires_grad_(False)

class Accelerator:
    device = torch.device("cpu")
    def autocast(self):
        return contextlib.nullcontext()

ctx = KohyaContext(None, Namespace(gradient_checkpointing=False), Accelerator(), mmdit, torch.float32, vae, torch.float32,
                   text_encoding_strategy=strategy_sd3.Sd3TextEncodingStrategy())
conds = [torch.randn(1, 77, 2048), torch.randn(1, 77, 4096), torch.randn(1, 2048), None, None, None]
cond = family.pack_cond(ctx, conds, {})
empty = family.pack_cond(ctx, [torch.zeros(1, 77, 2048), None, torch.zeros(1, 2048), None, None, None], {})
adapter = FunctionAdapter(family.scheduler_config(None, None), lambda x, t, c: family.denoise(ctx, x, t, c),
                          lambda c: empty, lambda z: family.decode(ctx, z))
settings = AdtSettings(sampler="flow_euler", num_inference_steps=4, g_every=2, k_graph_steps=1, taps=(1, 3),
                       head_channels=8, backbone_path=sys.argv[2], guidance_scale=3.0)
runner = StrategyRunner(build_strategy(settings, adapter.scheduler_config))
x0 = torch.randn(1, 16, 8, 8)
params_ = [p for p in mmdit.parameters() if p.requires_grad]
runner(adapter, x0, cond).backward()
d_only = sum(p.grad is not None for p in params_)
runner(adapter, x0, cond).backward()
g = sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params_)
z = x0.clone().requires_grad_(True)
image = family.decode(ctx, z)
print(json.dumps({"params": len(params_), "d_only_grads": d_only, "g_grads": g, "decoded": list(image.shape),
                  "decode_grad": image.requires_grad, "logs": runner.logs}))
"""


# -- OneTrainer -----------------------------------------------------------------------------
@pytest.mark.skipif(not ONETRAINER, reason="set ADT_ONETRAINER to a OneTrainer checkout")
class TestOneTrainer:
    @pytest.fixture(scope="class")
    def world(self, tmp_path_factory):
        root = tmp_path_factory.mktemp("onetrainer")
        python = python_of("ADT_ONETRAINER_PYTHON")
        checkout = root / "OneTrainer"
        shutil.copytree(ONETRAINER, checkout, ignore=shutil.ignore_patterns("venv", ".venv", "conda_env", "workspace*", ".git"),
                        symlinks=True)
        rc, out = run([sys.executable, REPO / "install.py", "--onetrainer", checkout, "--no-pip"])  # python has adt-plugin
        assert rc == 0, out
        build(python, f"t.tiny_sd15_full_diffusers(Path({str(root / 'sd15')!r}))\n"
                      f"t.tiny_dinov2_folder(Path({str(root / 'dinov2')!r}))\n"
                      f"t.tiny_image_folder(Path({str(root / 'data')!r}))")
        return root, python, checkout

    def config(self, world, workspace: Path, **changes) -> Path:
        root, _, _ = world
        config = {
            "__version": 11, "base_model_name": str(root / "sd15"), "train_device": "cpu", "temp_device": "cpu",
            "train_dtype": "FLOAT_32", "fallback_train_dtype": "FLOAT_32", "output_dtype": "FLOAT_32",
            "unet": {"weight_dtype": "FLOAT_32"}, "text_encoder": {"weight_dtype": "FLOAT_32", "train": False},
            "vae": {"weight_dtype": "FLOAT_32"}, "resolution": "64", "aspect_ratio_bucketing": False, "epochs": 1,
            "batch_size": 1, "learning_rate": 0.001, "workspace_dir": str(workspace), "cache_dir": str(workspace / "cache"),
            "tensorboard": False, "dataloader_threads": 1,
            "concepts": [{"name": "stripes", "path": str(root / "data" / "1_stripes"), "seed": 1,
                          "text": {"prompt_source": "sample"}, "image": {"enable_crop_jitter": False}}],
            "samples": [], "sample_after": 100, "sample_after_unit": "EPOCH",
            "backup_after": 2, "backup_after_unit": "STEP", "save_every": 2, "save_every_unit": "STEP",
            "output_model_destination": str(workspace / "out" / "lora.safetensors"),
            "adt": {"backbone_path": str(root / "dinov2"), "taps": [1, 3], "head_channels": 8, "num_inference_steps": 3,
                    "g_every": 2, "k_graph_steps": 1, "guidance_scale": 2.0},
        }
        config.update(changes)
        path = workspace.with_suffix(".json")
        workspace.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        return path

    def train(self, world, config: Path, **env):
        _, python, checkout = world
        return run([python, "scripts/train.py", "--preset-path", "training_presets/SD1.5/#sd 1.5 LoRA ADT.json",
                    "--config-path", config], cwd=checkout, **env)

    def test_a_missing_backbone_stops_before_onetrainer_loads_the_model(self, world, tmp_path):
        root, _, _ = world
        workspace = tmp_path / "ws"
        adt = {"backbone_path": "facebook/dinov2-small", "taps": [1, 3], "head_channels": 8}
        rc, log = self.train(world, self.config(world, workspace, adt=adt), HF_HUB_OFFLINE="1",
                             HF_HUB_CACHE=str(tmp_path / "empty-cache"))
        assert rc != 0
        assert "DINOv2 backbone 'facebook/dinov2-small': not a local folder and not in the Hugging Face cache" in log
        assert "set adt.backbone_path to that folder" in log
        # raised where the trainer creates its model loader, before the loader ran
        assert "create_model_loader" in log and "model_loader.load" not in log, log[-3000:]

    def test_preset_trains_saves_backs_up_and_continues(self, world, tmp_path):
        _, python, checkout = world
        workspace = tmp_path / "ws"
        rc, log = self.train(world, self.config(world, workspace))
        assert rc == 0, log[-3000:]
        assert "ADT: strategy adt, SD 1.x / 2.x" in log
        backups = sorted((workspace / "backup").iterdir())
        assert backups and all((b / "adt_disc.safetensors").exists() for b in backups)
        saves = sorted((workspace / "save").glob("*-save-*.safetensors"))
        assert [s.name for s in saves if s.name.endswith(".adt_disc.safetensors")]
        assert (workspace / "out" / "lora.adt_disc.safetensors").exists()
        saved_config = json.loads(sorted((workspace / "config").glob("*.json"))[-1].read_text())
        assert saved_config["adt"]["enabled"] is True and saved_config["adt"]["taps"] == [1, 3]
        tags = scalars(python, workspace / "tensorboard")
        assert {"loss/D", "D/real", "D/fake", "loss/G", "adt/generator_steps"} <= tags.keys()
        assert [v for _, v in tags["adt/generator_steps"]] == [0.0, 1.0, 1.0, 2.0]

        rc, log = self.train(world, self.config(world, workspace, continue_last_backup=True, epochs=2))
        assert rc == 0, log[-3000:]
        assert "ADT: discriminator restored from" in log and str(workspace / "backup") in log

    def test_uninstall_leaves_onetrainer_as_it_was(self, world):
        _, python, checkout = world
        rc, out = run([sys.executable, REPO / "install.py", "--onetrainer", checkout, "--uninstall", "--no-pip"])
        assert rc == 0, out
        assert not (checkout / "modules" / "modelSetup" / "adt_plugin_shim.py").exists()
        assert not list((checkout / "training_presets").rglob("*ADT*"))
        rc, out = run([sys.executable, REPO / "install.py", "--onetrainer", checkout, "--no-pip"])  # back, for reruns
        assert rc == 0, out
