"""A faithful minimal stand-in for the OneTrainer pieces adt_plugin.onetrainer touches.

Mirrors Nerogar/OneTrainer master @ 23df3832e8f213d64c337e39f9365ba46e99fed0:
  modules/util/factory.py            module-level `__registry` {base: [(args, kwargs, cls)]}, register, get
  modules/util/config/BaseConfig.py  (name, default, type, nullable) fields; to_dict / from_dict (per-key
                                     try/except, unknown keys ignored, nested configs updated in place)
  modules/util/config/TrainConfig.py default_values() staticmethod; get_last_backup_path()
  modules/modelSetup/BaseStableDiffusionSetup.py  predict(): encode_text, latent_image * scaling_factor,
                                     noise + timestep, `model.unet(latent_input, timestep, text_encoder_output).sample`
                                     inside `model.autocast_context`; calculate_loss -> mean
  modules/modelSetup/BaseModelSetup.py report_to_tensorboard(model, config, scheduler, tensorboard)
  modules/model/StableDiffusionModel.py encode_text(train_device, batch_size=1, rand=None, text=None, tokens=None,
                                     text_encoder_layer_skip=0, ...); materialize(*parts); model_type.text_encoder_parts()
  modules/trainer/GenericTrainer.py  train(): predict -> calculate_loss -> loss / accumulation -> scaler.scale(loss)
                                     .backward() | loss.backward(); on update steps ((global_step + 1) % N == 0):
                                     scaler.unscale_ + clip + scaler.step + scaler.update | clip + optimizer.step;
                                     lr_scheduler.step(); zero_grad(set_to_none=True); report_to_tensorboard;
                                     after_optimizer_step; train_progress.next_step(batch_size)
  modules/modelSaver/GenericLoRAModelSaver.py save(model, model_type, output_model_format, output_model_destination, dtype)
  modules/trainer/BaseTrainer.py     __init__(config, callbacks, commands) keeps `config`; create_model_loader(self),
                                     create_model_setup(self) (through modules/util/create.py)
  modules/trainer/GenericTrainer.py  start(): create_model_loader -> create_model_setup -> (configure_hub) ->
                                     model_loader.load(model_type, model_names, weight_dtypes, quantization) ->
                                     setup_optimizations / setup_train_device / setup_model
"""

from __future__ import annotations

import contextlib
import os
import types
from enum import Enum
from random import Random
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn


# -- modules/util/factory.py ----------------------------------------------------------
def make_factory() -> types.ModuleType:
    factory = types.ModuleType("modules.util.factory")
    registry: dict = {}
    factory.__dict__["__registry"] = registry

    def get(base_cls, *args, **kwargs):
        for entry in registry.get(base_cls, []):
            if entry[0] == args and entry[1] == kwargs:
                return entry[2]
        return None

    def register(base_cls, cls, *args, **kwargs):
        if get(base_cls, *args, **kwargs) is not None:
            raise RuntimeError("already registered")
        registry.setdefault(base_cls, []).append((args, kwargs, cls))
        return cls

    factory.get, factory.register = get, register
    return factory


class ModelType(Enum):
    STABLE_DIFFUSION_15 = "STABLE_DIFFUSION_15"
    STABLE_DIFFUSION_15_INPAINTING = "STABLE_DIFFUSION_15_INPAINTING"
    FLUX_DEV_1 = "FLUX_DEV_1"

    def __str__(self):
        return self.value

    def text_encoder_parts(self):
        return ("text_encoder",)


class TrainingMethod(Enum):
    FINE_TUNE = "FINE_TUNE"
    LORA = "LORA"
    EMBEDDING = "EMBEDDING"

    def __str__(self):
        return self.value


class LossWeight(Enum):  # modules/util/enum/LossWeight.py
    CONSTANT = "CONSTANT"
    P2 = "P2"
    MIN_SNR_GAMMA = "MIN_SNR_GAMMA"
    DEBIASED_ESTIMATION = "DEBIASED_ESTIMATION"
    SIGMA = "SIGMA"

    def __str__(self):
        return self.value


class ModelFormat(Enum):
    KOHYA_LORA = "KOHYA_LORA"
    INTERNAL = "INTERNAL"

    def __str__(self):
        return self.value


# -- modules/util/config/BaseConfig.py (the parts used) ----------------------------------
class BaseConfig:
    def __init__(self, data, config_version=None, config_migrations=None):
        self.types, self.nullables, self.default_values = {}, {}, {}
        for name, value, var_type, nullable in data:
            setattr(self, name, value)
            self.types[name] = var_type
            self.nullables[name] = nullable
            self.default_values[name] = value

    def to_dict(self) -> dict:
        out = {}
        for name, var_type in self.types.items():
            value = getattr(self, name)
            if isinstance(var_type, type) and issubclass(var_type, BaseConfig):
                out[name] = value.to_dict()
            elif isinstance(var_type, type) and issubclass(var_type, Enum):
                out[name] = None if value is None else str(value)
            else:
                out[name] = value
        return out

    def from_dict(self, data: dict, migrate: bool = True) -> "BaseConfig":
        for name, var_type in self.types.items():
            try:
                if isinstance(var_type, type) and issubclass(var_type, BaseConfig):
                    getattr(self, name).from_dict(data[name], migrate=migrate)
                elif isinstance(var_type, type) and issubclass(var_type, Enum):
                    setattr(self, name, var_type[data[name]] if isinstance(data[name], str) else data[name])
                elif var_type is float:
                    setattr(self, name, float(data[name]))
                elif var_type is int:
                    setattr(self, name, int(data[name]))
                elif var_type is str:
                    setattr(self, name, str(data[name]))
                else:
                    setattr(self, name, data[name])
            except Exception:  # noqa: PERF203 - as upstream: a missing / bad key keeps the default
                if name in data:
                    print(f"Could not set {name} as {data[name]}")
        return self


class PartConfig(BaseConfig):
    @staticmethod
    def default_values():
        return PartConfig([("train", True, bool, False), ("weight_dtype", "FLOAT_32", str, False)])


class OptimizerConfig(BaseConfig):
    @staticmethod
    def default_values():
        return OptimizerConfig([("fused_back_pass", False, bool, False)])


class TransformerPart(BaseConfig):
    @staticmethod
    def default_values():
        return TransformerPart([("attention_mask", False, bool, False)])


class TrainConfig(BaseConfig):
    @staticmethod
    def default_values() -> "TrainConfig":
        return TrainConfig(train_config_fields())

    def get_last_backup_path(self):
        backups = os.path.join(self.workspace_dir, "backup")
        if os.path.exists(backups):
            found = sorted((p for p in os.listdir(backups) if os.path.isdir(os.path.join(backups, p))), reverse=True)
            if found:
                return os.path.join(backups, found[0])
        return None


def train_config_fields() -> list:
    return [
            ("training_method", TrainingMethod.LORA, TrainingMethod, False),
            ("model_type", ModelType.STABLE_DIFFUSION_15, ModelType, False),
            ("workspace_dir", "workspace/run", str, False),
            ("continue_last_backup", False, bool, False),
            ("learning_rate", 3e-6, float, False),
            ("gradient_accumulation_steps", 1, int, False),
            ("batch_size", 1, int, False),
            ("masked_training", False, bool, False),
            ("rescale_noise_scheduler_to_zero_terminal_snr", False, bool, False),
            ("mae_strength", 0.0, float, False),
            ("loss_weight_fn", LossWeight.CONSTANT, LossWeight, False),
            ("offset_noise_weight", 0.0, float, False),
            ("lora_model_name", "", str, False),
            ("text_encoder_layer_skip", 0, int, False),
            ("text_encoder", PartConfig.default_values(), PartConfig, False),
            ("transformer", TransformerPart.default_values(), TransformerPart, False),
            ("optimizer", OptimizerConfig.default_values(), OptimizerConfig, False),
    ]


# -- the model (modules/model/StableDiffusionModel.py) ----------------------------------
class TrainProgress:
    def __init__(self):
        self.global_step = 0

    def next_step(self, batch_size):
        self.global_step += 1


class TinyTextEncoder(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.embed = nn.Embedding(32, width)

    def forward(self, tokens):
        return self.embed(tokens)


class StableDiffusionModel:
    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.model_type = ModelType.STABLE_DIFFUSION_15
        self.text_encoder = TinyTextEncoder()
        self.unet = UNet2DConditionModel(
            sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
        )
        self.vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=8,
        )
        self.noise_scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        self.train_progress = TrainProgress()
        self.autocast_context = contextlib.nullcontext()
        self.train_dtype = types.SimpleNamespace(torch_dtype=lambda: torch.float32)
        self.optimizer = None
        self.materialized: list[tuple[str, ...]] = []
        self.encoded: list[str] = []

    @property
    def train_device(self):
        return torch.device("cpu")

    def materialize(self, *parts):
        self.materialized.append(parts)

    def materialize_only(self, *parts):
        self.materialized.append(("only",) + parts)

    def encode_text(self, train_device, batch_size=1, rand=None, text=None, tokens=None, text_encoder_layer_skip=0,
                    text_encoder_dropout_probability=None, text_encoder_output=None):
        if tokens is None:
            self.encoded.append(text)
            tokens = torch.tensor([[len(text) % 31 + 1] + [ord(c) % 31 for c in text[:3]] + [0] * (3 - min(3, len(text)))])
        return self.text_encoder(tokens)


# -- modules/modelSetup/BaseModelSetup.py + BaseStableDiffusionSetup.py + StableDiffusionLoRASetup.py ---------
class BaseModelSetup:
    def __init__(self, train_device, temp_device, debug_mode=False):
        self.train_device, self.temp_device, self.debug_mode = train_device, temp_device, debug_mode

    def report_to_tensorboard(self, model, config, scheduler, tensorboard):
        for i, lr in enumerate(scheduler.get_last_lr()):
            tensorboard.add_scalar(f"lr/group{i}", lr, model.train_progress.global_step)

    def after_optimizer_step(self, model, config, train_progress):
        pass


class StableDiffusionLoRASetup(BaseModelSetup):
    def setup_model(self, model, config):
        # a "LoRA": a trainable residual on the cross-attention key projection
        attn = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
        model.lora = nn.Linear(attn.in_features, attn.out_features, bias=False)
        nn.init.zeros_(model.lora.weight)
        original = attn.forward
        attn.forward = lambda x: original(x) + model.lora(x)
        model.unet.requires_grad_(False)
        model.text_encoder.requires_grad_(False)
        model.optimizer = torch.optim.AdamW(model.lora.parameters(), lr=config.learning_rate, weight_decay=0.1)

    def setup_train_device(self, model, config):
        model.materialize_only("unet")

    def predict(self, model, batch, config, train_progress, *, deterministic=False):
        with model.autocast_context:
            generator = torch.Generator().manual_seed(0 if deterministic else train_progress.global_step)
            rand = Random(0)
            vae_scaling_factor = model.vae.config["scaling_factor"]
            text_encoder_output = model.encode_text(train_device=self.train_device, batch_size=batch["latent_image"].shape[0],
                                                    rand=rand, tokens=batch["tokens"],
                                                    text_encoder_layer_skip=config.text_encoder_layer_skip)
            scaled_latent_image = batch["latent_image"] * vae_scaling_factor
            timestep = torch.randint(0, 1000, (scaled_latent_image.shape[0],), generator=generator)
            latent_noise = torch.randn(scaled_latent_image.shape, generator=generator)
            noisy = model.noise_scheduler.add_noise(scaled_latent_image, latent_noise, timestep)
            predicted = model.unet(noisy.to(dtype=model.train_dtype.torch_dtype()), timestep,
                                   text_encoder_output.to(dtype=model.train_dtype.torch_dtype())).sample
            return {"loss_type": "target", "timestep": timestep, "predicted": predicted, "target": latent_noise}

    def calculate_loss(self, model, batch, data, config):
        return torch.nn.functional.mse_loss(data["predicted"], data["target"])


# -- modules/modelSaver: a LoRA saver ---------------------------------------------------
class StableDiffusionLoRAModelSaver:
    def save(self, model, model_type, output_model_format, output_model_destination, dtype):
        from safetensors.torch import save_file

        if output_model_format == ModelFormat.INTERNAL:
            os.makedirs(output_model_destination, exist_ok=True)
            output_model_destination = os.path.join(output_model_destination, "lora", "lora.safetensors")
            os.makedirs(os.path.dirname(output_model_destination), exist_ok=True)
        save_file({"w": model.lora.weight.detach().clone()}, output_model_destination)


# -- modules/trainer/GenericTrainer.py: the optimizer loop ---------------------------------
class SummaryWriter:
    def __init__(self):
        self.scalars: dict[str, list[tuple[int, float]]] = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, float(value)))


def train(setup, model, config, batches, scaler=None, clip_grad_norm=1.0):
    """The part of GenericTrainer.train() between predict and the next batch."""
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(model.optimizer, lambda step: 1.0)
    tensorboard = SummaryWriter()
    parameters = [p for g in model.optimizer.param_groups for p in g["params"]]
    losses, weights = [], []
    train_progress = model.train_progress
    for batch in batches:
        model_output_data = setup.predict(model, batch, config, train_progress)
        loss = setup.calculate_loss(model, batch, model_output_data, config)
        loss = loss / config.gradient_accumulation_steps
        if scaler:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        losses.append(loss.item())
        if (train_progress.global_step + 1) % config.gradient_accumulation_steps == 0:
            if scaler:
                scaler.unscale_(model.optimizer)
                nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
                scaler.step(model.optimizer)
                scaler.update()
            else:
                nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
                model.optimizer.step()
            lr_scheduler.step()
            model.optimizer.zero_grad(set_to_none=True)
            setup.report_to_tensorboard(model, config, lr_scheduler, tensorboard)
            setup.after_optimizer_step(model, config, train_progress)
            weights.append(model.lora.weight.detach().clone())
        train_progress.next_step(config.batch_size)
    return losses, weights, tensorboard


# -- modules/modelLoader + modules/trainer/BaseTrainer.py + GenericTrainer.start() (up to the model setup) ------
class StableDiffusionLoRAModelLoader:
    loads: list = []  # every load() of any instance: a test reads whether the model was loaded at all

    def load(self, model_type, model_names, weight_dtypes, quantization):
        StableDiffusionLoRAModelLoader.loads.append(model_names)
        return StableDiffusionModel()


class BaseTrainer:
    def __init__(self, config, callbacks=None, commands=None):
        self.config = config
        self.callbacks, self.commands = callbacks, commands

    def create_model_loader(self):
        return StableDiffusionLoRAModelLoader()

    def create_model_setup(self):
        return StableDiffusionLoRASetup(torch.device("cpu"), torch.device("cpu"))


class GenericTrainer(BaseTrainer):
    def start(self):
        self.model_loader = self.create_model_loader()
        self.model_setup = self.create_model_setup()
        self.model = self.model_loader.load(self.config.model_type, "base-model", None, None)
        self.model_setup.setup_train_device(self.model, self.config)
        self.model_setup.setup_model(self.model, self.config)
