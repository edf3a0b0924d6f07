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
import time
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


def digests(python: str, path: Path) -> dict:
    """{key: [number of non-zero values, sha1 of the bytes]} of a safetensors file (for big ones)."""
    rc, out = run([python, "-c", "import hashlib, json, sys\nfrom safetensors.torch import load_file\n"
                   "print(json.dumps({k: [int(v.count_nonzero()), hashlib.sha1(v.float().numpy().tobytes()).hexdigest()] "
                   "for k, v in load_file(sys.argv[1]).items()}))", path])
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
                    "--adt_g_every", "2", "--adt_adt_every", "1", "--adt_k_graph_steps", "1", "--adt_head_channels", "8"]
        return run(cmd, **env)

    def test_train_save_prune_state_and_resume(self, world, tmp_path):
        root, python = world
        out = tmp_path / "out"
        rc, log = self.train(world, out, "--max_train_steps", "4", "--save_every_n_steps", "1", "--save_last_n_steps", "2",
                             "--save_state", "--logging_dir", tmp_path / "logs")
        assert rc == 0, log[-3000:]
        assert "ADT: strategy adt, Stable Diffusion 1.x" in log
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
        assert {"loss/D", "D/real", "D/fake", "loss/G", "loss/current", "cost/forward_equiv", "cost/total_ft_steps"} <= tags.keys()
        # sd-scripts' own loss curve shows ADT's diffusion term (float32 rounding apart)
        assert [s for s, _ in tags["loss/current"]] == [s for s, _ in tags["loss/diff"]]
        assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(tags["loss/current"], tags["loss/diff"]))

        assert [v for _, v in tags["adt/generator_steps"]] == [0.0, 1.0, 1.0, 2.0]

        rc, log = self.train(world, tmp_path / "resumed", "--max_train_steps", "4", "--resume", out / "tiny-step00000003-state",
                             "--skip_until_initial_step", "--logging_dir", tmp_path / "resumed_logs")
        assert rc == 0, log[-3000:]
        assert "ADT: discriminator restored from" in log
        assert (tmp_path / "resumed" / "tiny.adt_disc.safetensors").exists()
        # iteration 4 is a generator step: the count goes on from the state's 1, not from 0
        assert [v for _, v in scalars(python, tmp_path / "resumed_logs")["adt/generator_steps"]] == [2.0]

    def test_resuming_a_plain_sd_scripts_state_starts_a_fresh_discriminator(self, world, tmp_path):
        rc, log = self.train(world, tmp_path / "plain", "--max_train_steps", "1", "--save_every_n_steps", "1", "--save_state",
                             adt=False)
        assert rc == 0, log[-3000:]
        rc, log = self.train(world, tmp_path / "adt", "--max_train_steps", "2", "--resume",
                             tmp_path / "plain" / "tiny-step00000001-state", "--skip_until_initial_step")
        assert rc == 0, log[-3000:]
        assert "fresh discriminator" in log

    @pytest.mark.skipif(os.environ.get("ADT_SD_SCRIPTS_SDXL") == "0", reason="ADT_SD_SCRIPTS_SDXL=0")
    def test_sdxl_trains_in_sd_scripts_own_sdxl_trainer(self, world, tmp_path):
        """sdxl_train_network.py itself. Its SDXL UNet has fixed sizes, so this one is a
        full-size random SDXL UNet (2.6B, bfloat16, ~5 GB on disk, ~15 GB of memory while
        sd-scripts converts it) with small text encoders of the widths it reads; 64 px,
        two ADT iterations (set ADT_SD_SCRIPTS_SDXL=0 to skip it)."""
        root, python = world
        build(python, f"sys.path.insert(0, {str(SD_SCRIPTS)!r})\nfrom library import sdxl_model_util\n"
                      f"t.sdxl_diffusers_for_sd_scripts(Path({str(tmp_path / 'sdxl')!r}), Path({str(tmp_path / 'tok')!r}), "
                      "sdxl_model_util.DIFFUSERS_SDXL_UNET_CONFIG)")
        out = tmp_path / "out"
        cmd = [python, "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "2", "--mixed_precision", "bf16",
               "-m", "adt_plugin.kohya.launch", Path(SD_SCRIPTS) / "sdxl_train_network.py",
               "--pretrained_model_name_or_path", tmp_path / "sdxl", "--tokenizer_cache_dir", tmp_path / "tok",
               "--train_data_dir", root / "data", "--caption_extension", ".txt", "--output_dir", out, "--output_name", "tiny",
               "--resolution", "64", "--network_module", "networks.lora", "--network_dim", "4", "--network_train_unet_only",
               "--learning_rate", "1e-3", "--optimizer_type", "AdamW", "--sdpa", "--seed", "1", "--cache_latents",
               "--no_half_vae", "--max_data_loader_n_workers", "0", "--max_train_steps", "2", "--save_every_n_steps", "1",
               "--logging_dir", tmp_path / "logs", "--adt_backbone_path", root / "dinov2", "--adt_taps", "1", "3",
               "--adt_num_inference_steps", "3", "--adt_g_every", "2", "--adt_adt_every", "1", "--adt_k_graph_steps", "1", "--adt_head_channels", "8"]
        try:
            rc, log = run(cmd)
            assert rc == 0, log[-3000:]
            assert "ADT: strategy adt, SDXL: rollout ddim x 3 steps" in log and ", CFG 5.0," in log  # SDXL's CFG default
            step1, step2 = (digests(python, out / f"tiny-step0000000{i}.safetensors") for i in (1, 2))
            assert all(nonzero == 0 for k, (nonzero, _) in step1.items() if "lora_up" in k)  # iteration 1: D only
            assert all(step1[k] != step2[k] for k in step1 if "lora_up" in k)  # iteration 2 moved every LoRA
            assert (out / "tiny.adt_disc.safetensors").exists()
            tags = scalars(python, tmp_path / "logs")
            assert [v for _, v in tags["adt/generator_steps"]] == [0.0, 1.0]
            assert [v == v for _, v in tags["loss/G"]] == [True]  # one generator step, finite
        finally:
            shutil.rmtree(tmp_path / "sdxl", ignore_errors=True)  # 5 GB

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

    @pytest.mark.parametrize("extra, toml_text, message", [
        (["--adt_g_evry", "3"], None, "command line: unknown option --adt_g_evry; did you mean --adt_g_every?"),
        (["--adt_g_every", "five"], None, "command line: argument --adt_g_every: invalid int value: 'five'"),
        ([], "[adt]\nadt_lamda_diff = 0.3\n", "{toml} / command line: unknown ADT option 'adt_lamda_diff'; did you mean 'adt_lambda_diff'?"),
        ([], "[adt]\nadt_at_steps = 0\n", "{toml} / command line: at_steps must be >= 1, got 0"),
    ], ids=["misspelt-flag", "bad-value", "misspelt-toml-key", "out-of-range"])
    def test_bad_adt_options_stop_before_sd_scripts_starts(self, world, tmp_path, extra, toml_text, message):
        if toml_text is not None:
            (tmp_path / "c.toml").write_text(toml_text)
            extra = extra + ["--config_file", tmp_path / "c.toml"]
        message = message.format(toml=tmp_path / "c.toml")
        started = time.monotonic()
        rc, log = self.train(world, tmp_path / "x", "--max_train_steps", "1", *extra)
        seconds = time.monotonic() - started
        assert rc != 0 and f"adt_plugin.kohya: {message}" in log, log[-3000:]
        # one line from the launcher, no traceback of ours (accelerate then reports the exit code with its own)
        assert 'adt_plugin/kohya/launch.py", line' not in log, log[-3000:]
        print(f"stopped after {seconds:.1f} s: {message}")

    def test_a_missing_backbone_stops_before_sd_scripts_loads_the_model(self, world, tmp_path):
        rc, log = self.train(world, tmp_path / "x", "--max_train_steps", "1", backbone="facebook/dinov2-small",
                             HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
        assert rc != 0
        assert "adt_plugin.kohya: DINOv2 backbone 'facebook/dinov2-small': not a local folder and not in the Hugging Face cache" in log
        assert "hf download facebook/dinov2-small --local-dir ./dinov2-small" in log
        assert "load Diffusers pretrained models" not in log, log[-3000:]


    @pytest.fixture(scope="class")
    def flux_world(self, world, tmp_path_factory):
        root, python = world
        folder = tmp_path_factory.mktemp("flux")
        for variant in ("dev", "schnell"):
            rc, out = run([python, HERE / "flux_sd_scripts.py", "build", SD_SCRIPTS, folder, variant])
            assert rc == 0, out[-3000:]
        return folder

    def flux_train(self, world, flux_world, out, variant, *extra, precision="no"):
        root, python = world
        f = flux_world
        cmd = [python, HERE / "flux_sd_scripts.py", "run", SD_SCRIPTS, f, "--",
               Path(SD_SCRIPTS) / "flux_train_network.py", "--pretrained_model_name_or_path", f / f"flux1-{variant}.safetensors",
               "--clip_l", f / "clip_l.safetensors", "--t5xxl", f / "t5xxl.safetensors", "--ae", f / "ae.safetensors",
               "--tokenizer_cache_dir", f / "tok", "--t5xxl_max_token_length", "16", "--train_data_dir", root / "data",
               "--output_dir", out, "--output_name", "tiny", "--resolution", "64", "--network_module", "networks.lora_flux",
               "--network_dim", "4", "--network_train_unet_only", "--learning_rate", "1e-3", "--optimizer_type", "AdamW",
               "--sdpa", "--seed", "1", "--cache_latents", "--cache_text_encoder_outputs", "--max_data_loader_n_workers", "0",
               "--save_every_n_steps", "1", "--mixed_precision", precision, "--guidance_scale", "1.0",
               "--timestep_sampling", "shift", "--discrete_flow_shift", "3.1582", "--model_prediction_type", "raw",
               "--adt_backbone_path", root / "dinov2", "--adt_taps", "1", "3", "--adt_num_inference_steps", "3",
               "--adt_g_every", "2", "--adt_adt_every", "1", "--adt_k_graph_steps", "1", "--adt_head_channels", "8", *extra]
        return run(cmd, HF_HUB_OFFLINE="1")

    def test_flux_dev_trains_in_sd_scripts_own_flux_trainer(self, world, flux_world, tmp_path):
        """flux_train_network.py itself (FluxNetworkTrainer, networks.lora_flux, caching, saving) on a tiny
        FLUX.1-dev; only the sizes sd-scripts hard-codes are made small (see flux_sd_scripts.py)."""
        root, python = world
        out = tmp_path / "out"
        rc, log = self.flux_train(world, flux_world, out, "dev", "--max_train_steps", "4", "--logging_dir", tmp_path / "logs")
        assert rc == 0, log[-3000:]
        assert f"adt_plugin from {REPO / 'adt_plugin'}" in log  # this checkout, not an installed copy
        assert ("ADT: strategy adt, FLUX.1-dev: rollout flow_euler x 3 steps (graph through 1) on 0.25 of the batch, embedded guidance 3.5,"
                in log), log[-3000:]
        steps = [digests(python, out / f"tiny-step0000000{i}.safetensors") for i in range(1, 5)]
        assert all(nonzero == 0 for k, (nonzero, _) in steps[0].items() if "lora_up" in k)  # iteration 1: D only
        assert all(steps[0][k] != steps[1][k] for k in steps[0] if "lora_up" in k)  # 2: every LoRA module moves
        assert steps[1] == steps[2] and steps[2] != steps[3]  # 3: D only; 4: generator
        assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv") for k in steps[0])  # sd-scripts' own layout
        assert (out / "tiny.adt_disc.safetensors").exists() and (out / "tiny-step00000004.adt_disc.safetensors").exists()
        tags = scalars(python, tmp_path / "logs")
        assert [v for _, v in tags["adt/generator_steps"]] == [0.0, 1.0, 1.0, 2.0]

    def test_flux_schnell_and_the_memory_options(self, world, flux_world, tmp_path):
        """schnell takes its family's defaults (no guidance); --fp8_base with bf16 and --gradient_checkpointing
        train; block swap and Chroma stop before sd-scripts loads anything."""
        root, python = world
        rc, log = self.flux_train(world, flux_world, tmp_path / "schnell", "schnell", "--max_train_steps", "2",
                                  "--adt_num_inference_steps", "4")
        assert rc == 0, log[-3000:]
        assert "ADT: strategy adt, FLUX.1-schnell: rollout flow_euler x 4 steps (graph through 1) on 0.25 of the batch, no guidance," in log
        rc, log = self.flux_train(world, flux_world, tmp_path / "fp8", "dev", "--max_train_steps", "2", "--fp8_base",
                                  "--gradient_checkpointing", precision="bf16")
        assert rc == 0, log[-3000:]
        assert "Cast FLUX model to fp8" in log
        step2 = digests(python, tmp_path / "fp8" / "tiny-step00000002.safetensors")
        assert all(nonzero > 0 for k, (nonzero, _) in step2.items() if "lora_up" in k)
        for extra, message in ((["--blocks_to_swap", "4"], "--blocks_to_swap 4 is not supported with --adt_strategy adt"),
                               (["--model_type", "chroma"], "--model_type chroma is not supported")):
            rc, log = self.flux_train(world, flux_world, tmp_path / "x", "dev", "--max_train_steps", "1", *extra)
            assert rc != 0 and f"adt_plugin.kohya: ADT: {message}" in log, log[-3000:]
            assert "Building Flux model" not in log


SD3_CHECK = """
import contextlib, json, sys
from argparse import Namespace
sys.path.insert(0, sys.argv[1])
import torch
from library import sd3_models, strategy_sd3
from adt_plugin import AdtSettings, build_strategy
from adt_plugin.bridge import FunctionAdapter, StrategyRunner
from adt_plugin.kohya.families import KohyaContext, model_for_script

torch.manual_seed(0)
family = model_for_script("sd3_train_network.py")
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
settings = AdtSettings(sampler="flow_euler", num_inference_steps=4, g_every=2, adt_every=1, k_graph_steps=1, taps=(1, 3),
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
                      f"t.tiny_sdxl_full_diffusers(Path({str(root / 'sdxl')!r}))\n"
                      f"t.tiny_sd3_full_diffusers(Path({str(root / 'sd3')!r}))\n"
                      f"t.tiny_dinov2_folder(Path({str(root / 'dinov2')!r}))\n"
                      f"t.tiny_image_folder(Path({str(root / 'data')!r}))")
        return root, python, checkout

    # the model parts each family's config names, all in float32 on the CPU
    PARTS = {
        "sd15": {"unet": {"weight_dtype": "FLOAT_32"}, "text_encoder": {"weight_dtype": "FLOAT_32", "train": False}},
        "sdxl": {"unet": {"weight_dtype": "FLOAT_32"}, "text_encoder": {"weight_dtype": "FLOAT_32", "train": False},
                 "text_encoder_2": {"weight_dtype": "FLOAT_32", "train": False}},
        "sd3": {"transformer": {"weight_dtype": "FLOAT_32", "train": True},
                "text_encoder": {"weight_dtype": "FLOAT_32", "train": False},
                "text_encoder_2": {"weight_dtype": "FLOAT_32", "train": False},
                "text_encoder_3": {"weight_dtype": "FLOAT_32", "train": False}},
    }
    PRESETS = {"sd15": "SD1.5/#sd 1.5 LoRA ADT.json", "sdxl": "SDXL/#sdxl 1.0 LoRA ADT.json", "sd3": "SD3/#sd 3 LoRA ADT.json"}

    def config(self, world, workspace: Path, model: str = "sd15", **changes) -> Path:
        root, _, _ = world
        config = {
            "__version": 11, "base_model_name": str(root / model), "train_device": "cpu", "temp_device": "cpu",
            "train_dtype": "FLOAT_32", "fallback_train_dtype": "FLOAT_32", "output_dtype": "FLOAT_32",
            **self.PARTS[model],
            "vae": {"weight_dtype": "FLOAT_32"}, "resolution": "64", "aspect_ratio_bucketing": False, "epochs": 1,
            "batch_size": 1, "learning_rate": 0.001, "workspace_dir": str(workspace), "cache_dir": str(workspace / "cache"),
            "tensorboard": False, "dataloader_threads": 1,
            "concepts": [{"name": "stripes", "path": str(root / "data" / "1_stripes"), "seed": 1,
                          "text": {"prompt_source": "sample"}, "image": {"enable_crop_jitter": False}}],
            "samples": [], "sample_after": 100, "sample_after_unit": "EPOCH",
            "backup_after": 2, "backup_after_unit": "STEP", "save_every": 2, "save_every_unit": "STEP",
            "output_model_destination": str(workspace / "out" / "lora.safetensors"),
            "adt": {"backbone_path": str(root / "dinov2"), "taps": [1, 3], "head_channels": 8, "num_inference_steps": 3,
                    "g_every": 2, "adt_every": 1, "k_graph_steps": 1, "guidance_scale": 2.0},
        }
        config.update(changes)
        path = workspace.with_suffix(".json")
        workspace.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
        return path

    def train(self, world, config: Path, *extra, model: str = "sd15", **env):
        _, python, checkout = world
        return run([python, "scripts/train.py", "--preset-path", f"training_presets/{self.PRESETS[model]}",
                    "--config-path", config, *extra], cwd=checkout, **env)

    @pytest.mark.parametrize("model, label, sampler", [("sdxl", "SDXL", "ddim"), ("sd3", "Stable Diffusion 3", "flow_euler")])
    def test_sdxl_and_sd3_presets_train_and_save(self, world, tmp_path, model, label, sampler):
        """The SDXL and SD3 ADT presets on tiny models of those architectures (SD3 with a
        one-layer T5): OneTrainer's own loaders, data pipeline, setups and savers."""
        _, python, _ = world
        workspace = tmp_path / "ws"
        rc, log = self.train(world, self.config(world, workspace, model=model), model=model)
        assert rc == 0, log[-3000:]
        assert f"ADT: strategy adt, {label}: rollout {sampler} x 3 steps" in log
        assert (workspace / "out" / "lora.safetensors").exists() and (workspace / "out" / "lora.adt_disc.safetensors").exists()
        assert all((b / "adt_disc.safetensors").exists() for b in (workspace / "backup").iterdir())
        tags = scalars(python, workspace / "tensorboard")
        assert [v for _, v in tags["adt/generator_steps"]] == [0.0, 1.0, 1.0, 2.0]
        assert all(v == v for _, v in tags["loss/G"])  # two generator steps, finite

    def test_flux_and_zimage_presets_train_and_save(self, world, tmp_path):
        """The FLUX.1-dev and Z-Image-Turbo ADT presets on tiny diffusers FLUX.1 and Z-Image folders:
        OneTrainer's FluxModel / ZImageModel loaders, data pipeline, BaseFluxSetup / BaseZImageSetup
        predict, LoRA setups and savers."""
        root, python, checkout = world
        build(python, "import types; sys.modules.setdefault('pytest', types.SimpleNamespace(fixture=lambda *a, **k: (lambda f: f)))\n"
                      f"sys.path.insert(0, {str(HERE.parent)!r})\n"  # tests/: the tiny pipelines (their pytest fixtures unused)
                      "import json, torch, tiny_flow_pipelines as tf\n"
                      "from transformers import CLIPTextConfig, CLIPTextModel\n"
                      f"flux = Path({str(tmp_path / 'flux')!r}); tf.make_flux_pipeline('dev', flux)\n"
                      # OneTrainer tokenizes CLIP-L to 77 tokens: a text encoder with 77 positions
                      "c = CLIPTextConfig.from_pretrained(flux / 'text_encoder'); c.max_position_embeddings = 77\n"
                      "torch.manual_seed(0); CLIPTextModel(c).save_pretrained(flux / 'text_encoder')\n"
                      "p = flux / 'tokenizer' / 'tokenizer_config.json'; d = json.loads(p.read_text()); d['model_max_length'] = 77\n"
                      "p.write_text(json.dumps(d))\n"
                      f"tf.make_zimage_pipeline(Path({str(tmp_path / 'zimage')!r}))")
        parts = {"text_encoder": {"weight_dtype": "FLOAT_32", "train": False}}
        for model, preset, label, extra in (
            ("flux", "Flux Dev.1/#flux dev LoRA ADT.json", "FLUX.1-dev",
             {"model_type": "FLUX_DEV_1", "text_encoder_2": {"weight_dtype": "FLOAT_32", "train": False},
              "text_encoder_2_sequence_length": 32, "transformer": {"weight_dtype": "FLOAT_32", "train": True, "guidance_scale": 1.0}}),
            ("zimage", "Z-Image/#z-image turbo LoRA ADT.json", "Z-Image",
             {"model_type": "Z_IMAGE", "transformer": {"weight_dtype": "FLOAT_32", "train": True}}),
        ):
            workspace = tmp_path / f"ws-{model}"
            config = self.config(world, workspace, **parts, **extra)
            data = json.loads(config.read_text())
            data.update(base_model_name=str(tmp_path / model))
            data["adt"].pop("guidance_scale")  # the preset's (FLUX.1-dev: 3.5 embedded; Z-Image-Turbo: 0)
            config.write_text(json.dumps(data))
            rc, log = run([python, "scripts/train.py", "--preset-path", f"training_presets/{preset}", "--config-path", config],
                          cwd=checkout)
            assert rc == 0, log[-3000:]
            assert f"ADT: strategy adt, {label}: rollout flow_euler x 3 steps" in log, log[-3000:]
            assert (workspace / "out" / "lora.safetensors").exists() and (workspace / "out" / "lora.adt_disc.safetensors").exists()
            tags = scalars(python, workspace / "tensorboard")
            assert [v for _, v in tags["adt/generator_steps"]] == [0.0, 1.0, 1.0, 2.0]

    def test_a_missing_backbone_stops_before_onetrainer_loads_the_model(self, world, tmp_path):
        root, _, _ = world
        workspace = tmp_path / "ws"
        adt = {"backbone_path": "facebook/dinov2-small", "taps": [1, 3], "head_channels": 8}
        rc, log = self.train(world, self.config(world, workspace, adt=adt), HF_HUB_OFFLINE="1",
                             HF_HUB_CACHE=str(tmp_path / "empty-cache"))
        assert rc != 0
        assert "DINOv2 backbone 'facebook/dinov2-small': not a local folder and not in the Hugging Face cache" in log
        assert "set adt.backbone_path to that folder" in log
        # one line, raised where the trainer creates its model loader: before OneTrainer made its cache folder
        assert "adt-plugin: DINOv2 backbone 'facebook/dinov2-small'" in log and "Traceback" not in log, log[-3000:]
        assert not (workspace / "cache").exists()

    def test_preset_trains_saves_backs_up_and_continues(self, world, tmp_path):
        _, python, checkout = world
        workspace = tmp_path / "ws"
        rc, log = self.train(world, self.config(world, workspace))
        assert rc == 0, log[-3000:]
        assert "ADT: strategy adt, Stable Diffusion 1.x" in log
        backups = sorted((workspace / "backup").iterdir())
        assert backups and all((b / "adt_disc.safetensors").exists() for b in backups)
        saves = sorted((workspace / "save").glob("*-save-*.safetensors"))
        assert [s.name for s in saves if s.name.endswith(".adt_disc.safetensors")]
        assert (workspace / "out" / "lora.adt_disc.safetensors").exists()
        saved_config = json.loads(sorted((workspace / "config").glob("*.json"))[-1].read_text())
        assert saved_config["adt"]["enabled"] is True and saved_config["adt"]["taps"] == [1, 3]
        tags = scalars(python, workspace / "tensorboard")
        assert {"loss/D", "D/real", "D/fake", "loss/G", "adt/generator_steps", "cost/forward_equiv", "cost/total_ft_steps"} <= tags.keys()
        assert [v for _, v in tags["adt/generator_steps"]] == [0.0, 1.0, 1.0, 2.0]

        rc, log = self.train(world, self.config(world, workspace, continue_last_backup=True, epochs=2))
        assert rc == 0, log[-3000:]
        assert "ADT: discriminator restored from" in log and str(workspace / "backup") in log
        runs = sorted(p for p in (workspace / "tensorboard").iterdir() if p.is_dir())
        continued = scalars(python, runs[-1])["adt/generator_steps"]
        # the second epoch's 4 iterations go on from the backup's 2 generator steps
        assert [v for _, v in continued] == [2.0, 3.0, 3.0, 4.0], continued

    @pytest.mark.parametrize("adt, values, message", [
        ({"g_evry": 3}, [], "[adt]: unknown key 'g_evry'; did you mean 'g_every'?"),
        ({"g_every": "five"}, [], "[adt]: key 'g_every' must be an integer, got 'five'"),
        ({}, ["adt.g_every=five"], "[adt]: key 'g_every' must be an integer, got 'five'"),
        ({"g_every": 0}, [], "OneTrainer config [adt]: g_every must be >= 1, got 0"),
    ], ids=["misspelt-key", "bad-type", "bad-config-value", "out-of-range"])
    def test_bad_adt_settings_stop_before_the_model_loads(self, world, tmp_path, adt, values, message):
        _, python, checkout = world
        config = self.config(world, tmp_path / "ws")
        data = json.loads(config.read_text())
        data["adt"].update(adt)
        config.write_text(json.dumps(data))
        extra = [arg for value in values for arg in ("--config-value", value)]
        started = time.monotonic()
        rc, log = self.train(world, config, *extra)
        seconds = time.monotonic() - started
        assert rc != 0 and message in log, log[-3000:]
        if message.startswith("[adt]"):  # read from a file or an override: named
            named = f"config {config}" if adt else f"--config-value {values[0]}"
            assert f"adt-plugin: {named}: {message}" in log, log[-3000:]
        assert "Traceback" not in log and "Could not set" not in log
        assert not (tmp_path / "ws" / "cache").exists()  # nothing was loaded or cached
        print(f"stopped after {seconds:.1f} s: {message}")

    def test_gui_tab_shows_and_edits_the_adt_section(self, world, tmp_path):
        _, python, checkout = world
        gui_python = os.environ.get("ADT_ONETRAINER_GUI_PYTHON", python)
        rc, _ = run([gui_python, "-c", "import PySide6"])
        if rc != 0:
            pytest.skip(f"{gui_python} has no PySide6 (OneTrainer's Qt GUI); set ADT_ONETRAINER_GUI_PYTHON")
        shot = tmp_path / "adt_tab.png"
        rc, out = run([gui_python, HERE / "onetrainer_gui_check.py", shot], cwd=checkout, QT_QPA_PLATFORM="offscreen")
        assert rc == 0, out[-3000:]
        seen = json.loads(next(line for line in out.splitlines() if line.startswith('{"tabs"')))
        assert seen["start"]["title"] == "ADT: off" and seen["start"]["switch"] is False
        # the ADT preset turns it on, and the tab shows the preset's values
        assert seen["adt_preset"]["title"] == "ADT: on" and seen["adt_preset"]["switch"] is True
        assert seen["adt_preset"]["g_every_text"] == "1" and "rollout ddim x 50" in seen["adt_preset"]["status"]
        # what is typed is what the config holds (and what a saved config keeps); a bad value stops "Start Training"
        assert seen["typed_3"]["g_every"] == 3 and "generator update every 3" in seen["typed_3"]["status"]
        assert seen["errors_at_0"] == ["adt.g_every: g_every must be >= 1, got 0"] and seen["errors_at_4"] == []
        assert seen["saved_section"]["g_every"] == 4 and seen["saved_section"]["enabled"] is True
        # a config with a misspelt adt key is not loaded, and the console says why
        assert seen["bad_config"]["g_every"] == 4 and seen["bad_config"]["learning_rate"] != 0.5
        assert "training_configs/adt-misspelt.json: [adt]: unknown key 'g_evry'; did you mean 'g_every'?" in out
        # a stock preset turns it off, visibly (tab title, status, console)
        assert seen["stock_preset"]["title"] == "ADT: off" and seen["stock_preset"]["enabled"] is False
        assert "ADT: off (OneTrainer trains with its own loss)" in out
        assert seen["switched_on"]["enabled"] is True and seen["switched_on"]["title"] == "ADT: on"
        assert shot.stat().st_size > 10_000

    def test_uninstall_leaves_onetrainer_as_it_was(self, world):
        _, python, checkout = world
        rc, out = run([sys.executable, REPO / "install.py", "--onetrainer", checkout, "--uninstall", "--no-pip"])
        assert rc == 0, out
        assert not (checkout / "modules" / "modelSetup" / "adt_plugin_shim.py").exists()
        assert not list((checkout / "training_presets").rglob("*ADT*"))
        rc, out = run([sys.executable, REPO / "install.py", "--onetrainer", checkout, "--no-pip"])  # back, for reruns
        assert rc == 0, out
