"""adt_plugin.kohya against a faithful stand-in of sd-scripts' NetworkTrainer
(tests/standins/sd_scripts.py mirrors train_network.py @ 48d368fa)."""

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from standins import sd_scripts
from tiny import DDPM_CONFIG, tiny_dinov2

from adt_plugin import AdtSettings, SettingsError
from adt_plugin.checkpoint import CheckpointMismatch
from adt_plugin.kohya import launch
from adt_plugin.kohya.args import add_adt_arguments, settings_from_args
from adt_plugin.families import get_family
from adt_plugin.kohya.families import SCRIPTS, KohyaContext, KohyaModel, model_for_script
from adt_plugin.kohya.trainer import STATE_FILE, check_args, make_trainer_class

SD = KohyaModel(get_family("sd1"))
SDXL = KohyaModel(get_family("sdxl"))
SD3 = KohyaModel(get_family("sd3"))


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    from integration.tiny_models import tiny_dinov2_folder

    return tiny_dinov2_folder(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(autouse=True)
def small_backbone(request, monkeypatch):
    """The trainer loads DINOv2 from --adt_backbone_path (exercised by the tests that
    ask for `real_backbone`); elsewhere a 16-pixel one keeps the suite fast."""
    if "real_backbone" in request.fixturenames:
        return
    from adt_plugin.kohya import trainer as kohya_trainer

    real = kohya_trainer.build_strategy
    monkeypatch.setattr(kohya_trainer, "build_strategy",
                        lambda settings, config, **kw: real(settings, config, backbone=tiny_dinov2(settings.taps), **kw))


def models(seed=0):
    from integration.tiny_models import tiny_vae

    torch.manual_seed(seed)
    return sd_scripts.TinyTextEncoder(), tiny_vae(seed, width=8), sd_scripts.TinyUNet()


def batches(n, seed=7):
    gen = torch.Generator().manual_seed(seed)
    tok = sd_scripts.TokenizeStrategy()
    return [
        {"latents": torch.randn(1, 4, 4, 4, generator=gen), "input_ids_list": tok.tokenize(f"a cat {i}"),
         "loss_weights": torch.ones(1)}
        for i in range(n)
    ]


def adt_args(dinov2, tmp_path, **kw):
    adt = dict(adt_backbone_path=str(dinov2), adt_taps=[1, 3], adt_head_channels=8, adt_num_inference_steps=3,
               adt_g_every=2, adt_adt_every=1, adt_k_graph_steps=1, adt_guidance_scale=2.0, adt_d_lr=1e-3, adt_g_warmup_steps=0,
               adt_d_warmup_steps=0)
    adt.update({k: v for k, v in kw.items() if k.startswith("adt_")})
    rest = {k: v for k, v in kw.items() if not k.startswith("adt_")}
    rest.setdefault("batches", batches(rest.get("max_train_steps", 4)))
    return sd_scripts.default_args(output_dir=str(tmp_path), models=models(), **rest, **adt)


def run(args, base=sd_scripts.NetworkTrainer):
    trainer = make_trainer_class(base, SD)()
    trainer.train(args)
    return trainer


def lora(path):
    return {k: v for k, v in load_file(str(path)).items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def real_backbone():
    """Marks a test that loads DINOv2 from its folder like a user's run."""


# -- the loop: generator steps only every g_every-th iteration -----------------------------
def test_discriminator_only_iterations_leave_the_lora_bit_identical(dinov2, tmp_path, real_backbone):
    trainer = run(adt_args(dinov2, tmp_path, save_every_n_steps=1))
    steps = [lora(tmp_path / f"lora-step{i:08d}.safetensors") for i in range(1, 5)]
    assert torch.count_nonzero(steps[0]["unet_loras.0.lora_up.weight"]) == 0  # iteration 1: D only, still the init
    assert not same(steps[0], steps[1])  # iteration 2 updates the generator
    assert same(steps[1], steps[2])  # iteration 3: D only (AdamW has momentum and weight decay by now)
    assert not same(steps[2], steps[3])
    assert trainer.adt.gate.taken == 2 and trainer.adt.gate.skipped == 2
    # sd-scripts' loss curve keeps showing the diffusion loss; ADT's scalars reach its trackers
    logs = trainer.tracker_logs
    assert [round(v, 5) for v in trainer.losses] == [round(entry["loss/diff"], 5) for entry in logs]
    assert {"loss/D", "D/real", "D/fake", "lr/D"} <= logs[0].keys() and "loss/G" in logs[1]
    assert logs[-1]["adt/generator_steps"] == 2.0
    assert {"cost/forward_equiv", "cost/ft_steps", "cost/total_forward_equiv", "cost/total_ft_steps"} <= logs[0].keys()


def test_ft_strategy_updates_every_iteration_and_writes_no_discriminator(dinov2, tmp_path):
    trainer = run(adt_args(dinov2, tmp_path, adt_strategy="ft", save_every_n_steps=1, max_train_steps=2))
    assert not same(lora(tmp_path / "lora-step00000001.safetensors"), lora(tmp_path / "lora-step00000002.safetensors"))
    assert trainer.adt.gate.skipped == 0
    assert not list(tmp_path.glob("*.adt_disc.safetensors"))


def test_gradient_accumulation_keeps_windows_whole(dinov2, tmp_path):
    # 2 micro-batches per step, g_every 2: micro-batches 0,1 D-only, 2,3 generator, ...
    trainer = run(adt_args(dinov2, tmp_path, gradient_accumulation_steps=2, max_train_steps=2, batches=batches(4)))
    assert trainer.adt.gate.skipped == 1 and trainer.adt.gate.taken == 1
    assert trainer.adt.runner.strategy.step == 4


# -- files: beside every LoRA, pruned with it, in every state, restored on resume ---------------
def test_discriminator_beside_every_lora_and_pruned_with_it(dinov2, tmp_path):
    run(adt_args(dinov2, tmp_path, save_every_n_steps=1, save_last_n_steps=1, max_train_steps=4))
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert names == [
        "lora-step00000003.adt_disc.safetensors", "lora-step00000003.safetensors",
        "lora-step00000004.adt_disc.safetensors", "lora-step00000004.safetensors",
        "lora.adt_disc.safetensors", "lora.safetensors",
    ]


def test_resume_is_exact(dinov2, tmp_path):
    data = batches(4)
    full = run(adt_args(dinov2, tmp_path / "full", save_every_n_steps=2, save_state=True, batches=data))
    state = tmp_path / "full" / "lora-step00000002-state"
    assert (state / STATE_FILE).exists()
    resumed = run(adt_args(dinov2, tmp_path / "resumed", resume=str(state), batches=data[2:], max_train_steps=2))
    assert resumed.adt.runner.strategy.step == 4
    assert same(lora(tmp_path / "full" / "lora.safetensors"), lora(tmp_path / "resumed" / "lora.safetensors"))
    assert same(lora(tmp_path / "full" / "lora.adt_disc.safetensors"), lora(tmp_path / "resumed" / "lora.adt_disc.safetensors"))
    assert full.losses[2:] == resumed.losses
    # the generator-step count goes on from the state (iteration 3 is D-only, 4 a generator step)
    assert [log["adt/generator_steps"] for log in resumed.tracker_logs] == [1.0, 2.0]
    assert [log["adt/generator_steps"] for log in full.tracker_logs] == [0.0, 1.0, 1.0, 2.0]


def test_resuming_a_state_without_adt_starts_a_fresh_discriminator(dinov2, tmp_path, caplog):
    plain = sd_scripts.default_args(output_dir=str(tmp_path / "plain"), models=models(), batches=batches(2),
                                    max_train_steps=2, save_every_n_steps=2, save_state=True)
    sd_scripts.NetworkTrainer().train(plain)
    state = tmp_path / "plain" / "lora-step00000002-state"
    with caplog.at_level(logging.WARNING, logger="adt_plugin.kohya"):
        trainer = run(adt_args(dinov2, tmp_path / "adt", resume=str(state), max_train_steps=2))
    assert any("fresh discriminator" in r.message for r in caplog.records)
    assert trainer.adt.runner.strategy.step == 2


def test_resuming_with_another_discriminator_layout_fails_clearly(dinov2, tmp_path):
    run(adt_args(dinov2, tmp_path / "a", max_train_steps=2, save_every_n_steps=2, save_state=True))
    state = tmp_path / "a" / "lora-step00000002-state"
    with pytest.raises(CheckpointMismatch, match="cannot resume ADT from .*channels"):
        run(adt_args(dinov2, tmp_path / "b", resume=str(state), adt_head_channels=16, max_train_steps=2))


def test_network_weights_bring_their_discriminator(dinov2, tmp_path, capsys):
    run(adt_args(dinov2, tmp_path / "a", max_train_steps=2))
    weights = tmp_path / "a" / "lora.safetensors"
    trainer = run(adt_args(dinov2, tmp_path / "b", network_weights=str(weights), max_train_steps=2))
    assert "discriminator restored from" in capsys.readouterr().out
    assert trainer.adt.runner.strategy.step == 4


def test_empty_prompt_is_reencoded_only_when_the_text_encoder_trains(dinov2, tmp_path, monkeypatch):
    calls = []
    original = sd_scripts.TextEncodingStrategy.encode_tokens
    monkeypatch.setattr(sd_scripts.TextEncodingStrategy, "encode_tokens",
                        lambda self, ts, models, tokens: calls.append(tokens[0].shape[0]) or original(self, ts, models, tokens))
    run(adt_args(dinov2, tmp_path / "frozen", network_train_unet_only=True, max_train_steps=2))
    frozen = len(calls)
    calls.clear()
    run(adt_args(dinov2, tmp_path / "trained", network_train_unet_only=False, max_train_steps=2))
    assert frozen == 1 + 2  # the empty prompt once, then the batches' captions
    assert len(calls) == 1 + 2 * 2  # the empty prompt again for every rollout


# -- the --adt_* options ----------------------------------------------------------------------
def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int)
    add_adt_arguments(p)
    return p


def test_every_settings_field_is_an_option_and_parses():
    p = parser()
    flags = {a.dest for a in p._actions}
    assert {f"adt_{f.name}" for f in dataclasses.fields(AdtSettings)} <= flags
    args = p.parse_args(["--adt_taps", "1", "2", "--adt_gradient_checkpointing", "--adt_lambda_diff", "0.25",
                         "--adt_sampler", "dpmsolver++", "--adt_g_every", "3"])
    s = settings_from_args(args)
    assert s.taps == (1, 2) and s.gradient_checkpointing is True and s.lambda_diff == 0.25
    assert s.sampler == "dpmsolver++" and s.g_every == 3 and s.seed == 0
    assert settings_from_args(p.parse_args(["--adt_gradient_checkpointing", "false"])).gradient_checkpointing is False


def test_family_defaults_yield_to_given_values():
    p = parser()
    assert settings_from_args(p.parse_args([]), SD3.defaults).sampler == "flow_euler"
    given = settings_from_args(p.parse_args(["--adt_num_inference_steps", "10"]), SD3.defaults)
    assert given.num_inference_steps == 10 and given.sampler == "flow_euler"
    assert settings_from_args(p.parse_args([]), SDXL.defaults).guidance_scale == 5.0


def test_toml_keys_are_checked():
    # sd-scripts' read_config_from_file puts every TOML key on the namespace, unchecked
    args = parser().parse_args([], namespace=argparse.Namespace(adt_lamda_diff=0.3))
    with pytest.raises(SettingsError, match="did you mean 'adt_lambda_diff'"):
        settings_from_args(args)
    args = parser().parse_args([], namespace=argparse.Namespace(adt_g_every="5"))
    with pytest.raises(SettingsError, match="'g_every' must be an integer"):
        settings_from_args(args)
    args = parser().parse_args([], namespace=argparse.Namespace(adt_taps=[2, 5], adt_tau=0.9))
    assert settings_from_args(args).taps == (2, 5)


def test_check_args_refuses_and_warns(caplog):
    s = AdtSettings()
    with pytest.raises(ValueError, match="deepspeed"):
        check_args(sd_scripts.default_args(deepspeed=True), s)
    with pytest.raises(ValueError, match="blocks_to_swap"):
        check_args(sd_scripts.default_args(blocks_to_swap=4), s)
    with caplog.at_level(logging.WARNING, logger="adt_plugin.kohya"):
        check_args(sd_scripts.default_args(min_snr_gamma=5.0, loss_type="huber"), s)
    assert "min_snr_gamma=5.0" in caplog.text and "loss_type=huber" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adt_plugin.kohya"):  # the ft baseline ignores them too: say so
        check_args(sd_scripts.default_args(min_snr_gamma=5.0, noise_offset=0.05), AdtSettings(strategy="ft"))
    assert "strategy ft" in caplog.text and "min_snr_gamma=5.0, noise_offset=0.05" in caplog.text


def test_start_line_says_what_the_strategy_does():
    from adt_plugin.bridge import start_line

    adt = start_line(AdtSettings(g_every=5, adt_every=1), "SDXL")
    assert adt.startswith("ADT: strategy adt, SDXL: rollout ddim x 50 steps") and "every 5 iteration(s)" in adt
    assert "FT steps between" not in adt
    mix = start_line(AdtSettings(), "SDXL")  # the defaults: the mix, a quarter of the batch, the buffer
    assert "on 0.25 of the batch" in mix and "(between rollouts on the latest 1)" in mix
    assert mix.endswith("generator update every 1 iteration(s); an ADT step every 4 generator update(s), plain FT steps between")
    ft = start_line(AdtSettings(strategy="ft"), "SDXL")
    assert ft == "ADT: strategy ft, SDXL: plain diffusion loss at uniform timesteps, a generator update every iteration"
    assert "gamma 0.1" in start_line(AdtSettings(strategy="ip"), "SD3")


# -- launching (kohya_ss GUI command lines) -------------------------------------------------
GUI_TAIL = ["--mixed_precision", "fp16", "--num_processes", "1", "--num_machines", "1",
            "--num_cpu_threads_per_process", "2"]


def fake_sd_scripts(root: Path) -> Path:
    (root / "library").mkdir(parents=True)
    (root / "library" / "train_util.py").write_text("")
    for script in SCRIPTS:
        (root / script).write_text("")
    return root


def test_gui_launch_options_after_our_module_are_applied(tmp_path, monkeypatch):
    root = fake_sd_scripts(tmp_path / "sd-scripts")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    argv = GUI_TAIL + [str(root / "sdxl_train_network.py"), "--config_file", "c.toml", "--adt_g_every", "5"]
    options, rest = launch.split_accelerate_options(argv)
    assert options["--mixed_precision"] == "fp16" and rest[0].endswith("sdxl_train_network.py")
    launch.apply_accelerate_options(options)
    import os

    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "fp16"
    script, found, script_args = launch.resolve(rest, None)
    assert script == "sdxl_train_network.py" and found == root.resolve()
    assert script_args == ["--config_file", "c.toml", "--adt_g_every", "5"]


def test_launch_refusals(tmp_path):
    with pytest.raises(SystemExit, match="multi-GPU"):
        launch.apply_accelerate_options(launch.split_accelerate_options(["--multi_gpu", "--num_processes", "2"])[0])
    with pytest.raises(SystemExit, match="not an sd-scripts checkout"):
        launch.resolve([str(tmp_path / "train_network.py")], None)
    with pytest.raises(SystemExit, match="not an sd-scripts LoRA training script"):
        launch.resolve([str(tmp_path / "lumina_train_network.py")], None)
    root = fake_sd_scripts(tmp_path / "sd-scripts")
    with pytest.raises(SystemExit, match="this entry point runs sd3_train_network.py, not sdxl_train_network.py"):
        launch.resolve([str(root / "sdxl_train_network.py")], "sd3_train_network.py")
    script, found, rest = launch.resolve(["--sd_scripts", str(root), "--resolution", "512"], "sd3_train_network.py")
    assert script == "sd3_train_network.py" and rest == ["--resolution", "512"]
    assert model_for_script("x/sd3_train_network.py").family is get_family("sd3")


# -- family specifics -------------------------------------------------------------------------
def test_rollout_scheduler_follows_the_run():
    trainer = sd_scripts.NetworkTrainer()
    eps = SD.scheduler_config(trainer, sd_scripts.default_args())
    assert eps["prediction_type"] == "epsilon" and eps["beta_schedule"] == "scaled_linear" and eps["steps_offset"] == 1
    v = SD.scheduler_config(trainer, sd_scripts.default_args(v_parameterization=True, zero_terminal_snr=True))
    assert v["prediction_type"] == "v_prediction" and v["rescale_betas_zero_snr"] is True
    assert {k: eps[k] for k in ("beta_start", "beta_end", "num_train_timesteps")} == {
        k: DDPM_CONFIG[k] for k in ("beta_start", "beta_end", "num_train_timesteps")}
    assert "FlowMatch" in SD3.scheduler_config(None, None)["_class_name"]


class _Accel:
    device = torch.device("cpu")

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()


def test_sdxl_size_conditioning_reaches_call_unet():
    seen = {}

    class SdxlStandIn:  # SdxlNetworkTrainer.call_unet(args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype, indices=None)
        def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype, indices=None):
            seen.update(batch=batch, text=len(text_conds))
            return noisy_latents * 2

    family = SDXL
    ctx = KohyaContext(SdxlStandIn(), sd_scripts.default_args(), _Accel(), None, torch.float32)
    sizes = {k: torch.tensor([[64, 64]]) for k in family.batch_keys}
    cond = family.pack_cond(ctx, [torch.ones(1, 3, 8), torch.ones(1, 3, 4), torch.ones(1, 4)], sizes)
    out = family.denoise(ctx, torch.ones(1, 4, 8, 8), torch.tensor([10]), cond)
    assert torch.equal(out, torch.full((1, 4, 8, 8), 2.0)) and seen["text"] == 3
    assert set(seen["batch"]) == set(family.batch_keys)


def test_sd3_conditioning_is_concatenated_as_sd_scripts_does():
    class Sd3Strategy:  # library/strategy_sd3.py Sd3TextEncodingStrategy.concat_encodings
        def concat_encodings(self, lg_out, t5_out, lg_pooled):
            lg_out = torch.nn.functional.pad(lg_out, (0, 4096 - lg_out.shape[-1]))
            return torch.cat([lg_out, t5_out], dim=-2), lg_pooled

    calls = {}

    def mmdit(x, t, context=None, y=None):  # sd3_models.MMDiT.forward(x, t, y=None, context=None)
        calls.update(t=t, context=context.shape, y=y.shape)
        return x

    family = SD3
    ctx = KohyaContext(None, sd_scripts.default_args(), _Accel(), mmdit, torch.float32, text_encoding_strategy=Sd3Strategy())
    cond = family.pack_cond(ctx, [torch.ones(1, 77, 2048), torch.ones(1, 5, 4096), torch.ones(1, 2048), None, None, None], {})
    family.denoise(ctx, torch.ones(1, 16, 4, 4), torch.tensor([500.0]), cond)
    assert calls["context"] == (1, 82, 4096) and calls["y"] == (1, 2048) and calls["t"].dtype == torch.float32


# -- the launcher end to end, on a stand-in sd-scripts tree -------------------------------------
FAKE_TRAIN_UTIL = '''
# library/train_util.py @ 48d368fa: read_config_from_file flattens the TOML's sections and
# parses sys.argv again on top of it (command-line values win).
import argparse, os, toml

def verify_command_line_training_args(args):
    pass

def read_config_from_file(args, parser):
    if not args.config_file:
        return args
    config = toml.load(args.config_file)
    flat = {}
    for name, section in config.items():
        flat.update(section if isinstance(section, dict) else {name: section})
    args = parser.parse_args(namespace=argparse.Namespace(**flat))
    args.config_file = os.path.splitext(args.config_file)[0]
    return args
'''

FAKE_TRAIN_NETWORK = '''
import argparse
SEEN = {}

def setup_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config_file")
    parser.add_argument("--output_dir")
    parser.add_argument("--learning_rate", type=float)
    return parser

class NetworkTrainer:
    def train(self, args):
        SEEN["args"] = args
'''


def test_launcher_runs_sd_scripts_parser_config_file_and_trainer(dinov2, tmp_path, monkeypatch):
    root = tmp_path / "sd-scripts"
    (root / "library").mkdir(parents=True)
    (root / "library" / "__init__.py").write_text("")
    (root / "library" / "train_util.py").write_text(FAKE_TRAIN_UTIL)
    (root / "train_network.py").write_text(FAKE_TRAIN_NETWORK)
    config = tmp_path / "lora.toml"
    config.write_text('[training]\nlearning_rate = 0.001\n[adt]\nadt_g_every = 3\nadt_lambda_diff = 0.25\n')
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    for name in ("train_network", "library", "library.train_util"):
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    # what the kohya_ss GUI hands over after `-m adt_plugin.kohya.launch`
    argv = GUI_TAIL + [str(root / "train_network.py"), "--config_file", str(config), "--output_dir", "out", "--adt_g_every", "4",
                       "--adt_backbone_path", str(dinov2), "--adt_taps", "1", "3"]
    monkeypatch.setattr("sys.argv", ["adt_plugin.kohya.launch", *argv])
    assert launch.main() == 0
    import train_network

    args = train_network.SEEN["args"]
    assert args.learning_rate == 0.001 and args.output_dir == "out"
    assert args.adt_g_every == 4 and args.adt_lambda_diff == 0.25  # the command line wins over the TOML


@pytest.mark.parametrize("extra, toml_text, message", [
    (["--adt_g_evry", "3"], None, "command line: unknown option --adt_g_evry; did you mean --adt_g_every?"),
    (["--adt_lamda_diff=0.3"], None, "did you mean --adt_lambda_diff?"),
    (["--adt_g_every", "five"], None, "command line: argument --adt_g_every: invalid int value: 'five'"),
    ([], "[adt]\nadt_lamda_diff = 0.3\n", "lora.toml / command line: unknown ADT option 'adt_lamda_diff'; did you mean 'adt_lambda_diff'?"),
    ([], "[adt]\nadt_g_every = \"5\"\n", "lora.toml / command line: key 'g_every' must be an integer"),
    ([], "adt_g_every = 0\n", "lora.toml / command line: g_every must be >= 1, got 0"),
    (["--adt_num_inference_steps", "0"], "[adt]\nadt_g_every = 3\n", "num_inference_steps must be >= 1"),
])
def test_launcher_checks_adt_options_before_sd_scripts_is_imported(tmp_path, monkeypatch, extra, toml_text, message):
    root = tmp_path / "sd-scripts"
    (root / "library").mkdir(parents=True)
    (root / "library" / "train_util.py").write_text("")
    (root / "train_network.py").write_text("raise RuntimeError('sd-scripts was imported')\n")
    argv = [str(root / "train_network.py"), "--output_dir", "out"] + extra
    if toml_text is not None:
        (tmp_path / "lora.toml").write_text(toml_text)
        argv += ["--config_file", str(tmp_path / "lora")]  # sd-scripts adds .toml
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    monkeypatch.delitem(__import__("sys").modules, "train_network", raising=False)
    with pytest.raises(SystemExit) as stop:
        launch.main(argv)
    assert message in str(stop.value) and str(stop.value).startswith("adt_plugin.kohya: ")


def test_command_line_wins_over_the_toml_and_family_defaults_fill_in(tmp_path):
    from adt_plugin.kohya.args import read_adt_options

    (tmp_path / "c.toml").write_text("[adt]\nadt_g_every = 3\nadt_taps = [1, 3]\n")
    settings = read_adt_options(["--config_file", str(tmp_path / "c.toml"), "--adt_g_every", "4", "--resolution", "512"],
                                SD3.defaults)
    assert (settings.g_every, settings.taps, settings.sampler) == (4, (1, 3), "flow_euler")


# -- a stale `-m adt_plugin.kohya.launch` (kohya_ss GUI: a stock preset after an ADT preset) --------
FAKE_PLAIN_SCRIPT = '''
import json, sys
if __name__ == "__main__":
    with open(sys.argv[sys.argv.index("--output_dir") + 1], "w") as f:
        json.dump({"argv": sys.argv, "path0": sys.path[0]}, f)
'''


def test_without_adt_options_the_launcher_runs_the_script_unchanged(tmp_path, monkeypatch, capsys):
    root = tmp_path / "sd-scripts"
    root.mkdir()
    (root / "train_network.py").write_text(FAKE_PLAIN_SCRIPT)
    (root / "flux_train_network.py").write_text(FAKE_PLAIN_SCRIPT)  # not a family ADT trains: still runs
    config = tmp_path / "config_lora.toml"
    config.write_text('[training]\nlearning_rate = 0.001\nadditional_network_arguments = "x"\n')
    monkeypatch.setattr("sys.path", list(sys.path))
    for script in ("train_network.py", "flux_train_network.py"):
        seen = tmp_path / f"{script}.json"
        # what the GUI launches after a stock preset cleared "Additional parameters"
        argv = GUI_TAIL + [str(root / script), "--config_file", str(config), "--output_dir", str(seen)]
        monkeypatch.setattr("sys.argv", ["adt_plugin.kohya.launch", *argv])
        assert launch.main() == 0
        ran = json.loads(seen.read_text())
        assert ran["argv"] == [str(root / script), "--config_file", str(config), "--output_dir", str(seen)]
        assert ran["path0"] == str(root)
        assert "ADT is off" in capsys.readouterr().out


def test_adt_is_on_with_an_option_or_a_config_key_only():
    assert launch.adt_requested(["--config_file", "missing.toml", "--adt_strategy", "ft"])
    assert launch.adt_requested(["--help"])
    assert not launch.adt_requested(["--config_file", "missing.toml", "--learning_rate", "1e-4"])


def test_an_adt_key_in_the_config_file_turns_adt_on(tmp_path):
    config = tmp_path / "lora.toml"
    config.write_text("[training]\nlearning_rate = 0.001\n")
    assert not launch.adt_requested(["--config_file", str(config)])
    config.write_text("[training]\nlearning_rate = 0.001\n[adt]\nadt_g_every = 3\n")
    assert launch.adt_requested(["--config_file", str(config)])
    assert launch.adt_requested([f"--config_file={tmp_path / 'lora'}"])  # sd-scripts adds .toml


def test_help_lists_the_adt_options_without_looking_for_a_backbone(tmp_path, monkeypatch, capsys):
    root = tmp_path / "sd-scripts"
    (root / "library").mkdir(parents=True)
    (root / "library" / "__init__.py").write_text("")
    (root / "library" / "train_util.py").write_text(FAKE_TRAIN_UTIL)
    (root / "train_network.py").write_text(FAKE_TRAIN_NETWORK)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    for name in ("train_network", "library", "library.train_util"):
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # the default backbone is nowhere
    with pytest.raises(SystemExit) as stop:
        launch.main([str(root / "train_network.py"), "--help"])
    assert stop.value.code == 0 and "--adt_g_every" in capsys.readouterr().out


# -- FLUX.1 in flux_train_network.py (stand-in: tests/standins/sd_scripts.py FluxNetworkTrainer) -----------
FLUX_DEV = KohyaModel(get_family("flux_dev"))
FLUX_SCHNELL = KohyaModel(get_family("flux_schnell"))


def flux_models(guidance_embed=True, seed=0):
    torch.manual_seed(seed)
    return sd_scripts.TinyTextEncoder(), sd_scripts.TinyTextEncoder(), sd_scripts.TinyAE(), sd_scripts.TinyFlux(guidance_embed)


def flux_batches(n, seed=7):
    gen = torch.Generator().manual_seed(seed)
    tok = sd_scripts.FluxTokenizeStrategy()
    return [{"latents": torch.randn(1, 16, 8, 8, generator=gen), "input_ids_list": tok.tokenize(f"a cat {i}"),
             "loss_weights": torch.ones(1)} for i in range(n)]


def flux_run(dinov2, tmp_path, model=FLUX_DEV, guidance_embed=True, **kw):
    adt = dict(adt_backbone_path=str(dinov2), adt_taps=[1, 3], adt_head_channels=8, adt_num_inference_steps=3,
               adt_g_every=2, adt_adt_every=1, adt_k_graph_steps=1, adt_d_lr=1e-3, adt_g_warmup_steps=0, adt_d_warmup_steps=0)
    adt.update({k: v for k, v in kw.items() if k.startswith("adt_")})
    rest = {k: v for k, v in kw.items() if not k.startswith("adt_")}
    rest.setdefault("batches", flux_batches(rest.get("max_train_steps", 2)))
    rest.setdefault("max_train_steps", 2)
    args = sd_scripts.flux_default_args(output_dir=str(tmp_path), models=flux_models(guidance_embed), **rest, **adt)
    trainer = make_trainer_class(sd_scripts.FluxNetworkTrainer, model)()
    trainer.train(args)
    return trainer, args.models[3]


def test_flux_dev_rollout_guides_by_embedding_and_the_diffusion_term_uses_the_trainers_guidance(dinov2, tmp_path):
    trainer, flux = flux_run(dinov2, tmp_path, guidance_scale=1.0, save_every_n_steps=1)
    assert trainer.adt.settings.guidance_scale == 3.5 and trainer.adt.settings.num_inference_steps == 3  # the family's default
    assert not trainer.adt.uses_cfg and trainer.adt.empty_prompt is None  # embedded guidance: no empty prompt, one pass
    rollout = [c for c in flux.calls if c["guidance"] is not None and bool((c["guidance"] == 3.5).all())]
    training = [c for c in flux.calls if c["guidance"] is not None and bool((c["guidance"] == 1.0).all())]
    assert len(rollout) + len(training) == len(flux.calls)
    assert len(training) == 1  # the generator iteration's diffusion term, with sd-scripts' --guidance_scale
    # the rollout's timesteps are FLUX.1-dev's schedule for this size (8x8 latents: 16 tokens, mu from the released config)
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV.family.scheduler_config)
    FLUX_DEV.family.set_timesteps(scheduler, 3, (8, 8))
    expected = {round(float(s), 5) for s in scheduler.timesteps / 1000}
    assert {round(float(c["timesteps"][0]), 5) for c in rollout} <= expected and all(c["tokens"] == 16 for c in flux.calls)
    step1, step2 = (lora(tmp_path / f"lora-step0000000{i}.safetensors") for i in (1, 2))
    assert torch.count_nonzero(step1["unet_loras.0.lora_up.weight"]) == 0 and not same(step1, step2)
    assert (tmp_path / "lora.adt_disc.safetensors").exists()


def test_flux_schnell_runs_one_pass_without_guidance(dinov2, tmp_path):
    trainer, flux = flux_run(dinov2, tmp_path, model=FLUX_SCHNELL, guidance_embed=False)
    settings = trainer.adt.settings
    assert (settings.num_inference_steps, settings.guidance_scale) == (3, 0.0)
    assert trainer.adt.empty_prompt is None and trainer.adt.runner.strategy.step == 2
    assert trainer.adt.logs()["loss/G"] == trainer.adt.logs()["loss/G"]


def test_flux_trainer_timestep_sampling_is_what_the_diffusion_term_draws():
    """sd-scripts' get_noisy_model_input_and_timesteps, per --timestep_sampling, against the family
    ModelFamily.with_training gives the core (same generator draws)."""
    latent = (64, 64)
    for sampling, extra in (("uniform", {}), ("sigmoid", {"sigmoid_scale": 1.5}), ("shift", {"discrete_flow_shift": 3.1582}),
                            ("flux_shift", {}), ("sigma", {"weighting_scheme": "logit_normal", "logit_mean": 0.5})):
        args = sd_scripts.flux_default_args(timestep_sampling=sampling, **extra)
        family = FLUX_DEV.training(args)
        drawn = family.train_sigmas(FLUX_DEV.family.scheduler_config, 5, torch.Generator().manual_seed(3), latent)
        gen = torch.Generator().manual_seed(3)
        if sampling == "uniform":
            expected = torch.rand(5, generator=gen)
        else:
            mean = args.logit_mean if sampling == "sigma" else 0.0
            std = args.logit_std if sampling == "sigma" else args.sigmoid_scale
            u = torch.sigmoid(mean + std * torch.randn(5, generator=gen))
            if sampling == "sigmoid":
                expected = u
            else:
                import math

                mu = (64 // 2) * (64 // 2) * (1.15 - 0.5) / (4096 - 256) + 0.5 - 256 * (1.15 - 0.5) / (4096 - 256)
                shift = math.exp(mu) if sampling == "flux_shift" else args.discrete_flow_shift
                expected = shift * u / (1 + (shift - 1) * u)
        assert torch.allclose(drawn, expected, atol=1e-6), sampling
        assert family.guidance.train_value == 3.5 and FLUX_DEV.family.guidance.train_value == 3.5


@pytest.mark.parametrize("args, message", [
    (dict(blocks_to_swap=8), "--blocks_to_swap 8 is not supported with --adt_strategy adt"),
    (dict(split_mode=True), "--split_mode (it sets --blocks_to_swap 18)"),
    (dict(model_type="chroma"), "--model_type chroma is not supported"),
])
def test_flux_options_adt_cannot_run_with_are_refused(args, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_args(sd_scripts.flux_default_args(**args), AdtSettings(), FLUX_DEV)
    check_args(sd_scripts.flux_default_args(fp8_base=True, gradient_checkpointing=True), AdtSettings(), FLUX_DEV)
    if "model_type" not in args:  # the plain-diffusion baseline: one forward per backward, block swap works
        check_args(sd_scripts.flux_default_args(**args), AdtSettings(strategy="ft"), FLUX_DEV)


def test_flux_options_adt_does_not_follow_are_named(caplog):
    with caplog.at_level(logging.WARNING, logger="adt_plugin.kohya"):
        check_args(sd_scripts.flux_default_args(), AdtSettings(), FLUX_DEV)  # sd-scripts' defaults: sigma_scaled
    assert "model_prediction_type=sigma_scaled (ADT's terms use the velocity, as raw)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="adt_plugin.kohya"):
        check_args(sd_scripts.flux_default_args(model_prediction_type="raw", timestep_sampling="shift"), AdtSettings(), FLUX_DEV)
    assert not caplog.text


def flux_checkpoint(path, guidance: bool):
    from safetensors.torch import save_file

    keys = {"double_blocks.0.img_attn.proj.bias": torch.zeros(2), "single_blocks.0.modulation.lin.bias": torch.zeros(2)}
    if guidance:
        keys["guidance_in.in_layer.bias"] = torch.zeros(2)
    save_file(keys, str(path))
    return path


def test_launcher_reads_dev_or_schnell_from_the_checkpoint_before_sd_scripts_is_imported(tmp_path, monkeypatch, dinov2):
    root = tmp_path / "sd-scripts"
    (root / "library").mkdir(parents=True)
    (root / "library" / "train_util.py").write_text("")
    (root / "flux_train_network.py").write_text("raise RuntimeError('sd-scripts was imported')\n")
    dev, schnell = flux_checkpoint(tmp_path / "dev.safetensors", True), flux_checkpoint(tmp_path / "schnell.safetensors", False)
    base = [str(root / "flux_train_network.py"), "--adt_backbone_path", str(dinov2), "--adt_taps", "1", "3"]
    model, settings = launch.check_before_loading("flux_train_network.py", [*base[1:], "--pretrained_model_name_or_path", str(dev)])
    assert model.family is get_family("flux_dev") and (settings.num_inference_steps, settings.guidance_scale) == (28, 3.5)
    (tmp_path / "c.toml").write_text(f'[model]\npretrained_model_name_or_path = "{schnell}"\n')
    model, settings = launch.check_before_loading("flux_train_network.py", [*base[1:], "--config_file", str(tmp_path / "c.toml")])
    assert model.family is get_family("flux_schnell") and (settings.num_inference_steps, settings.guidance_scale) == (4, 0.0)
    monkeypatch.setattr("sys.path", list(sys.path))
    for extra, message in (
        (["--pretrained_model_name_or_path", str(schnell), "--adt_guidance_scale", "3.5"],
         "--adt_guidance_scale: FLUX.1-schnell is guidance-distilled"),
        (["--pretrained_model_name_or_path", str(dev), "--adt_sampler", "ddim"], "--adt_sampler 'ddim' does not fit FLUX.1-dev"),
        (["--pretrained_model_name_or_path", str(tmp_path / "missing.safetensors")], "--pretrained_model_name_or_path:"),
        ([], "flux_train_network.py trains FLUX.1-dev or FLUX.1-schnell: give --pretrained_model_name_or_path"),
        (["--pretrained_model_name_or_path", str(dev), "--blocks_to_swap", "10"], "--blocks_to_swap 10 is not supported"),
        (["--pretrained_model_name_or_path", str(dev), "--model_type", "chroma"], "--model_type chroma is not supported"),
    ):
        with pytest.raises(SystemExit) as stop:
            launch.main([*base, *extra])
        assert message in str(stop.value) and str(stop.value).startswith("adt_plugin.kohya: "), (message, str(stop.value))
