"""`adt train` end to end on tiny SD1.x, SDXL and SD3 pipelines built at test time."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_pipelines import make_image_folder, make_pipeline, one_thread, save_tiny_dinov2, write_sd1_single_file  # noqa: F401 (one_thread: an autouse fixture)

from adt_plugin.checkpoint import disc_path_for, load_discriminator
from adt_plugin.cli import main
from adt_plugin.strategies import STRATEGIES, build_strategy
from adt_plugin.train import loop
from adt_plugin.train.config import load_run_config
from adt_plugin.train.loop import train

SAMPLERS = {"sd1": "ddim", "sd2": "euler", "sdxl": "dpmsolver++", "sd3": "flow_euler"}
PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon", "sd3": "flow"}  # the tiny sd2 predicts v


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    models = {f: make_pipeline(f, root / f"model-{f}", layers_per_block=1) for f in ("sd1", "sd2", "sdxl", "sd3")}
    data = make_image_folder(root / "data", count=3, size=(32, 32), repeats_dir="2_things")
    make_image_folder(data, count=2, size=(48, 32), seed=1)  # a second aspect ratio: a second bucket
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    (data / "corrupt.txt").write_text("broken")
    Image.new("RGB", (32, 32)).save(data / "uncaptioned.png")
    return {"models": models, "data": data, "dinov2": save_tiny_dinov2(root / "dinov2")}


def config_for(assets, out, family="sd1", strategy="adt", overrides=()):
    text = f"""
[model]
path = "{assets["models"][family]}"
[data]
folder = "{assets["data"]}"
resolution = 32
bucket_step = 8
[train]
output_dir = "{out}"
output_name = "tiny"
max_steps = 4
batch_size = 2
learning_rate = 1e-3
[lora]
rank = 4
alpha = 4.0
[adt]
strategy = "{strategy}"
sampler = "{SAMPLERS[family]}"
num_inference_steps = 4
guidance_scale = 2.0
backbone_path = "{assets["dinov2"]}"
taps = [1, 3]
head_channels = 8
g_every = 2
adt_every = 1  # every generator step an ADT step: these tests watch ADT's own iterations
d_lr = 1e-3
d_warmup_steps = 2
g_warmup_steps = 2
"""
    path = Path(out).parent / f"{Path(out).name}.toml"
    path.write_text(text)
    return load_run_config(path, overrides=list(overrides)), path


def read_scalars(out):
    return [json.loads(line) for line in (Path(out) / "logs" / "scalars.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sd3"])  # sd2: the tiny one predicts v
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_family_trains_a_lora_with_each_strategy(assets, tmp_path, family, strategy):
    out = tmp_path / "out"
    config, _ = config_for(assets, out, family, strategy)
    messages = []
    result = train(config, echo=messages.append)
    assert result.status == "done" and result.step == 4
    assert any("corrupt.png: cannot be read as an image" in m for m in messages)
    assert any("uncaptioned.png: no caption file (expected uncaptioned.txt)" in m for m in messages)
    assert any(m.endswith("; 2 skipped") for m in messages)
    assert "2 images were skipped" in messages[-1]  # and again at the end
    assert any(f" ({PREDICTION[family]}), lora: " in m for m in messages)  # the start line

    lora = load_file(out / "tiny.safetensors")
    with safe_open(str(out / "tiny.safetensors"), "pt") as handle:
        stored = handle.metadata()["modelspec.prediction_type"]
    assert stored == {"v_prediction": "v"}.get(PREDICTION[family], PREDICTION[family])
    prefix, up = ("transformer.", ".lora_B.weight") if family == "sd3" else ("lora_unet_", ".lora_up.weight")
    assert lora and all(k.startswith(prefix) for k in lora)  # SD3: diffusers' layout, the one diffusers reads
    assert any(k.endswith(up) and v.abs().sum() > 0 for k, v in lora.items())  # B moved off zero
    scalars = read_scalars(out)
    assert [s["step"] for s in scalars] == [1, 2, 3, 4]
    assert {"loss/diff", "lr/G", "time/step_s", "memory/peak_gb"} <= scalars[-1].keys()

    disc_file = disc_path_for(out / "tiny.safetensors")
    strategy_obj = build_strategy(
        config.adt, dict(json.loads((assets["models"][family] / "scheduler" / "scheduler_config.json").read_text()))
    )
    # the strategy's generator warm-up scales the learning rate (ADT: 1/2 at step 0 of a 2-step warm-up)
    assert scalars[0]["lr/G"] == pytest.approx(1e-3 * strategy_obj.generator_lr_factor(0))
    assert scalars[0]["lr/G"] == pytest.approx(5e-4 if strategy == "adt" else scalars[0]["lr/G"])
    if hasattr(strategy_obj, "disc"):
        assert disc_file.is_file()
        assert {"loss/D", "D/real", "D/fake", "lr/D", "grad_norm/D"} <= scalars[0].keys()
        assert "loss/G_adv" in scalars[1] and "grad_norm/G" in scalars[1] and "grad_norm/G" not in scalars[0]
        metadata = load_discriminator(disc_file, strategy_obj)  # reloads into a fresh strategy
        assert strategy_obj.step == 4 and metadata["model_file"] == "tiny.safetensors"
    else:
        assert not disc_file.exists()


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_trained_lora_loads_in_the_diffusers_pipeline_and_changes_its_output(assets, tmp_path, family):
    from diffusers import DiffusionPipeline

    out = tmp_path / "out"
    config, _ = config_for(assets, out, family, "adt", ["train.max_steps=2", "adt.g_every=1"])
    train(config, echo=lambda m: None)
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}  # the tiny SD3 has no T5
    pipe = DiffusionPipeline.from_pretrained(str(assets["models"][family]), local_files_only=True, **no_t5)

    def image():
        return pipe(
            "pic 1",
            num_inference_steps=2,
            guidance_scale=2.0,
            height=32,
            width=32,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    before = image()
    pipe.load_lora_weights(str(out / "tiny.safetensors"))
    assert (image() - before).abs().max() > 1e-4


def test_resumed_run_equals_an_uninterrupted_run(assets, tmp_path):
    # 8 entries per epoch at batch 2: the 6 steps cross an epoch; step 3's state is saved on the way
    straight, toml = config_for(assets, tmp_path / "straight", overrides=["train.max_steps=6", "save.every_n_steps=3"])
    train(straight, echo=lambda m: None)
    state = tmp_path / "straight" / "tiny-step00000003-state"
    assert json.loads((state / "trainer.json").read_text())["step"] == 3
    resumed, _ = config_for(assets, tmp_path / "resumed", overrides=["train.max_steps=6", "save.every_n_steps=3"])
    result = train(resumed, resume=state, echo=lambda m: None)
    assert result.status == "done" and result.step == 6
    a = load_file(tmp_path / "straight" / "tiny.safetensors")
    b = load_file(tmp_path / "resumed" / "tiny.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    da = load_file(disc_path_for(tmp_path / "straight" / "tiny.safetensors"))
    db = load_file(disc_path_for(tmp_path / "resumed" / "tiny.safetensors"))
    assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in da)  # heads, twins, D optimizer, RNG
    sa = load_file(tmp_path / "straight" / "tiny-step00000006-state" / "trainable.safetensors")
    sb = load_file(tmp_path / "resumed" / "tiny-step00000006-state" / "trainable.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the float32 weights, not only the fp16 file
    # the count of generator updates goes on from the state (g_every = 2: steps 2, 4, 6)
    generator_steps = [read_scalars(tmp_path / run)[-1]["adt/generator_steps"] for run in ("straight", "resumed")]
    assert generator_steps == [3, 3] and read_scalars(tmp_path / "resumed")[0]["adt/generator_steps"] == 2
    # and the check can fail: a run with another seed ends elsewhere
    other, _ = config_for(assets, tmp_path / "other", overrides=["train.max_steps=6", "adt.seed=1"])
    train(other, echo=lambda m: None)
    c = load_file(tmp_path / "other" / "tiny.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_resume_refuses_a_state_of_another_run(assets, tmp_path):
    config, _ = config_for(assets, tmp_path / "a", overrides=["train.max_steps=1"])
    train(config, echo=lambda m: None)
    _, toml = config_for(assets, tmp_path / "b")
    state = tmp_path / "a" / "tiny-step00000001-state"
    assert main(["train", "--config", str(toml), "train.batch_size=1", "--resume", str(state)]) == 2


def test_ctrl_c_saves_a_resumable_state_and_the_model(assets, tmp_path, monkeypatch):
    config, _ = config_for(assets, tmp_path / "out", overrides=["train.max_steps=5"])
    original = loop.train_step

    def train_step(config, model, strategy, optim, procs, batch, step):
        out = original(config, model, strategy, optim, procs, batch, step)
        if step == 1:  # during the second step, as a user's Ctrl-C would arrive
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(loop, "train_step", train_step)
    messages = []
    result = train(config, echo=messages.append)
    assert result.status == "interrupted" and result.step == 2
    assert result.state == tmp_path / "out" / "tiny-step00000002-state" and result.state.is_dir()
    assert (tmp_path / "out" / "tiny-step00000002.safetensors").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.setattr(loop, "train_step", original)
    resumed = train(config, resume=result.state, echo=lambda m: None)
    assert resumed.status == "done" and resumed.step == 5


def test_nonfinite_losses_skip_steps_then_stop_keeping_the_last_good_save(assets, tmp_path, monkeypatch):
    config, _ = config_for(
        assets,
        tmp_path / "out",
        "sd1",
        "ft",
        ["train.max_steps=10", "save.every_n_steps=2", "train.max_nonfinite_steps=3"],
    )
    original = loop.train_step

    def train_step(config, model, strategy, optim, procs, batch, step):
        if step == 2:  # the weights blow up after step 2's save
            for p in model.params:
                p.data.fill_(float("nan"))
        return original(config, model, strategy, optim, procs, batch, step)

    monkeypatch.setattr(loop, "train_step", train_step)
    messages = []
    result = train(config, echo=messages.append)
    assert result.status == "nonfinite" and result.step == 5 and result.skipped_steps == 3
    out = tmp_path / "out"
    assert (out / "tiny-step00000002.safetensors").is_file() and not (out / "tiny.safetensors").exists()
    assert not (out / "tiny-step00000004.safetensors").exists()  # no save of poisoned weights
    scalars = read_scalars(out)
    assert scalars[-1]["train/nonfinite_steps"] == 3


def test_keep_last_n_prunes_models_discriminators_and_states_together(assets, tmp_path):
    config, _ = config_for(assets, tmp_path / "out", overrides=["save.every_n_steps=1", "save.keep_last=2"])
    train(config, echo=lambda m: None)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [
        "logs",
        "tiny-step00000002-state",
        "tiny-step00000002.adt_disc.safetensors",
        "tiny-step00000002.safetensors",
        "tiny-step00000003-state",
        "tiny-step00000003.adt_disc.safetensors",
        "tiny-step00000003.safetensors",
        "tiny-step00000004-state",
        "tiny.adt_disc.safetensors",
        "tiny.safetensors",
    ]


def test_sample_grids_use_the_rollout_sampler_and_go_to_png_and_tensorboard(assets, tmp_path):
    config, _ = config_for(
        assets,
        tmp_path / "out",
        overrides=["sample.every_n_steps=2", 'sample.prompts=["pic 0", "pic 1", "pic 2"]', "save.state=false"],
    )
    train(config, echo=lambda m: None)
    samples = sorted((tmp_path / "out" / "samples").iterdir())
    assert [p.name for p in samples] == ["tiny-step00000000.png", "tiny-step00000002.png", "tiny-step00000004.png"]
    assert Image.open(samples[0]).size == (96, 32)  # three 32 px samples in a row
    assert Image.open(samples[0]).tobytes() != Image.open(samples[-1]).tobytes()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "out" / "logs").iterdir())


def test_full_finetune_from_a_single_file_saves_a_complete_single_file_and_a_diffusers_folder(assets, tmp_path):
    from diffusers import StableDiffusionPipeline

    single = write_sd1_single_file(assets["models"]["sd1"], tmp_path / "base.safetensors")
    common = [
        f'model.path="{single}"',
        "train.method=full",
        "train.max_steps=2",
        "save.precision=fp32",
        "train.learning_rate=1e-4",
    ]
    config, _ = config_for(
        assets, tmp_path / "out", "sd1", "ft", [*common, f'model.config_dir="{assets["models"]["sd1"]}"']
    )
    train(config, echo=lambda m: None)
    trained = load_file(tmp_path / "out" / "tiny-step00000002-state" / "trainable.safetensors")  # the float32 weights
    pipe = StableDiffusionPipeline.from_single_file(
        str(tmp_path / "out" / "tiny.safetensors"), config=str(assets["models"]["sd1"]), local_files_only=True
    )
    assert all(torch.equal(pipe.unet.state_dict()[k], trained[k]) for k in trained)
    base = StableDiffusionPipeline.from_pretrained(str(assets["models"]["sd1"]), local_files_only=True)
    assert any(not torch.equal(base.unet.state_dict()[k], trained[k]) for k in trained)
    assert all(torch.equal(pipe.vae.state_dict()[k], v) for k, v in base.vae.state_dict().items())  # copied through

    folder_cfg, _ = config_for(assets, tmp_path / "out2", "sd1", "ft", [*common[1:], "save.format=diffusers"])
    train(folder_cfg, echo=lambda m: None)
    loaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / "out2" / "tiny"), local_files_only=True)
    assert loaded.unet.dtype == torch.float32 and loaded.text_encoder is not None


def test_a_single_file_without_local_configs_is_a_clear_error(assets, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    single = write_sd1_single_file(assets["models"]["sd1"], tmp_path / "base.safetensors")
    _, toml = config_for(assets, tmp_path / "out", "sd1", "ft")
    assert main(["train", "--config", str(toml), f"model.path={single}"]) == 2
    err = capsys.readouterr().err
    assert "single-file sd1 checkpoint" in err and "stable-diffusion-v1-5/stable-diffusion-v1-5" in err
    assert "config_dir" in err and "nothing is downloaded" in err


def _gloo_available():
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


@pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is not available")
def test_two_processes_train_in_step_with_synchronised_discriminators(assets, tmp_path):
    _, toml = config_for(assets, tmp_path / "out", "sd1", "adt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # What users type on a GPU machine; without CUDA it starts two gloo (CPU) processes through torchrun.
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "adt_plugin.cli",
        "train",
        "--config",
        str(toml),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    state = tmp_path / "out" / "tiny-step00000004-state"
    assert json.loads((state / "trainer.json").read_text())["world_size"] == 2
    ranks = [torch.load(state / f"strategy-rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])  # each process drew its own noise and start steps ...
    disc0, disc1 = ranks[0]["discriminator"], ranks[1]["discriminator"]
    assert all(torch.equal(disc0[k], disc1[k]) for k in disc0)  # ... and the D gradients were averaged
    assert load_file(tmp_path / "out" / "tiny.safetensors")


def test_latent_and_text_caches_give_the_same_run_as_no_caches(assets, tmp_path):
    plain, _ = config_for(assets, tmp_path / "plain", overrides=["train.max_steps=3"])
    train(plain, echo=lambda m: None)
    caches = [
        "train.max_steps=3",
        "data.cache_latents=true",
        "data.cache_text=true",
        f'data.cache_dir="{tmp_path / "cache"}"',
    ]
    first, _ = config_for(assets, tmp_path / "cached", overrides=caches)
    messages = []
    train(first, echo=messages.append)
    assert any(m.startswith("caching latents of 5 images") for m in messages)
    assert any(m.startswith("caching text conditioning of 3 captions") for m in messages)
    again, _ = config_for(assets, tmp_path / "cached-again", overrides=caches)
    messages = []
    train(again, echo=messages.append)
    assert not any(m.startswith("caching") for m in messages)  # read back, not recomputed
    a = load_file(tmp_path / "plain" / "tiny.safetensors")
    b = load_file(tmp_path / "cached" / "tiny.safetensors")
    c = load_file(tmp_path / "cached-again" / "tiny.safetensors")
    assert all(torch.equal(b[k], c[k]) for k in b)
    # per-image (cache) and per-batch (no cache) encoding differ only in float rounding
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=2e-3)


def test_ft_and_adt_runs_of_one_config_start_from_the_same_weights_and_batches(assets, tmp_path):
    from accelerate.utils import set_seed

    from adt_plugin.train.lora import peft_state
    from adt_plugin.train.setup import check_run, load_data, load_model, start_processes

    firsts = []
    for strategy in ("ft", "adt"):
        config, _ = config_for(assets, tmp_path / strategy, "sd1", strategy)
        checked = check_run(config)
        procs = start_processes(config)
        set_seed(config.train.seed)  # as train() does
        model = load_model(config, checked.family, procs, lambda m: None)
        data = load_data(config, checked.report, model, procs, lambda m: None)
        build_strategy(config.adt, model.scheduler_config)
        torch.manual_seed(123)  # whatever happens to the global generator afterwards
        batches = loop.batch_stream(data, (0, 0), config.train.batch_size, procs.rank, config.data.workers)
        firsts.append((peft_state(model.denoiser), [next(batches)[1]["path"] for _ in range(5)]))
    (weights_ft, paths_ft), (weights_adt, paths_adt) = firsts
    assert all(torch.equal(weights_ft[k], weights_adt[k]) for k in weights_ft)
    assert paths_ft == paths_adt
