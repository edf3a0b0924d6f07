"""A faithful minimal stand-in for kohya-ss/sd-scripts' LoRA trainer.

Mirrors train_network.py @ 48d368fa557731ad0488c07304dfeba8c07910eb (sd-scripts main,
2026-02-16): the `NetworkTrainer` methods adt_plugin.kohya overrides or calls, with
their exact signatures; `process_batch` with the same data flow (latents from
batch["latents"] or the VAE, `shift_scale_latents`, text conditioning through the
tokenize / text-encoding strategies, `get_noise_pred_and_target`, per-sample MSE
times batch["loss_weights"], `post_process_loss`, mean); and a `train()` that calls
the hooks in the same order and runs the same optimizer loop on a real accelerate
`Accelerator`: `with accelerator.accumulate(network)`: process_batch ->
accelerator.backward -> (sync) all-reduce + clip_grad_norm_ -> optimizer.step ->
lr_scheduler.step -> optimizer.zero_grad(set_to_none=True); then global_step,
save_model (`network.save_weights(file, dtype, metadata)`), save_state with the
registered hooks (`train_util.save_and_remove_state_stepwise`), remove_model, and
`--resume` through `accelerator.load_state`. LoRA modules replace the wrapped
module's forward as networks/lora.py's LoRAModule.apply_to does.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace
from typing import Any, List

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from torch import nn


# -- models -------------------------------------------------------------------------
class TinyUNet(nn.Module):
    """Called like sd-scripts' original_unet: unet(noisy_latents, timesteps, encoder_hidden_states).sample"""

    def __init__(self, channels: int = 4, width: int = 16, context: int = 8):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.ctx = nn.Linear(context, width)
        self.time = nn.Linear(1, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states):
        t = timestep.float().reshape(-1)
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        h = self.inp(sample) + self.ctx(encoder_hidden_states.mean(1))[:, :, None, None] + self.time(t[:, None] / 1000)[:, :, None, None]
        return SimpleNamespace(sample=self.out(torch.tanh(h)))


class TinyTextEncoder(nn.Module):
    """text_encoder(tokens)[0] -> [B, T, C], as transformers' CLIPTextModel."""

    def __init__(self, vocab: int = 16, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, width)
        self.device = torch.device("cpu")

    def forward(self, tokens):
        return (self.proj(self.embed(tokens)),)


class TokenizeStrategy:
    """library/strategy_sd.py SdTokenizeStrategy.tokenize(text) -> [LongTensor[B, n, 77]] (n = 1, length 6 here)."""

    def tokenize(self, text):
        texts = [text] if isinstance(text, str) else text
        ids = [[len(t) % 7 + 1] + [min(ord(c) % 16, 15) for c in t[:4]] + [0] * (5 - min(len(t), 4)) for t in texts]
        return [torch.tensor(ids)[:, None, :]]


class TextEncodingStrategy:
    """library/strategy_sd.py SdTextEncodingStrategy.encode_tokens(tokenize_strategy, models, tokens) -> [hidden]"""

    def encode_tokens(self, tokenize_strategy, models: List[Any], tokens: List[torch.Tensor]) -> List[torch.Tensor]:
        text_encoder = models[0]
        ids = tokens[0]
        return [text_encoder(ids.reshape(ids.shape[0], -1))[0]]


class LoRAModule(nn.Module):
    def __init__(self, name: str, org_module: nn.Linear, dim: int = 2):
        super().__init__()
        self.lora_name = name
        self.lora_down = nn.Linear(org_module.in_features, dim, bias=False)
        self.lora_up = nn.Linear(dim, org_module.out_features, bias=False)
        nn.init.zeros_(self.lora_up.weight)
        self.org_module = [org_module]

    def apply_to(self):
        self.org_forward = self.org_module[0].forward
        self.org_module[0].forward = self.forward

    def forward(self, x):
        return self.org_forward(x) + self.lora_up(self.lora_down(x))


class LoRANetwork(nn.Module):
    """networks/lora.py LoRANetwork: apply_to, prepare_optimizer_params, get_trainable_params,
    save_weights(file, dtype, metadata), load_weights, on_epoch_start, prepare_grad_etc."""

    def __init__(self, text_encoder: nn.Module, unet: nn.Module):
        super().__init__()
        self.unet_loras = nn.ModuleList([LoRAModule("lora_unet_ctx", unet.ctx), LoRAModule("lora_unet_time", unet.time)])
        self.text_encoder_loras = nn.ModuleList([LoRAModule("lora_te_proj", text_encoder.proj)])

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
        for lora in [*self.unet_loras, *self.text_encoder_loras]:
            lora.apply_to()

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        return [{"params": list(self.parameters()), "lr": default_lr}]

    def get_trainable_params(self):
        return self.parameters()

    def on_epoch_start(self, text_encoder, unet):
        self.train()

    def prepare_grad_etc(self, text_encoder, unet):
        self.requires_grad_(True)

    def save_weights(self, file, dtype, metadata):
        from safetensors.torch import save_file

        state = {k: v.detach().clone().to("cpu").to(dtype or v.dtype) for k, v in self.state_dict().items()}
        save_file(state, file, metadata)

    def load_weights(self, file):
        from safetensors.torch import load_file

        return self.load_state_dict(load_file(file))


# -- the trainer ----------------------------------------------------------------------
class NetworkTrainer:
    def __init__(self):
        self.vae_scale_factor = 0.18215
        self.is_sdxl = False

    def generate_step_logs(self, args, current_loss, avr_loss, lr_scheduler, lr_descriptions, optimizer=None,
                           keys_scaled=None, mean_norm=None, maximum_norm=None, mean_grad_norm=None, mean_combined_norm=None):
        logs = {"loss/current": current_loss, "loss/average": avr_loss}
        for i, lr in enumerate(lr_scheduler.get_last_lr()):
            logs[f"lr/group{i}"] = lr
        return logs

    def assert_extra_args(self, args, train_dataset_group, val_dataset_group):
        pass

    def get_tokenize_strategy(self, args):
        return TokenizeStrategy()

    def get_text_encoding_strategy(self, args):
        return TextEncodingStrategy()

    def get_models_for_text_encoding(self, args, accelerator, text_encoders):
        return text_encoders

    def is_train_text_encoder(self, args):
        return not args.network_train_unet_only

    def cache_text_encoder_outputs_if_needed(self, args, accelerator, unet, vae, text_encoders, dataset, weight_dtype):
        for t_enc in text_encoders:
            t_enc.to(accelerator.device, dtype=weight_dtype)

    def call_unet(self, args, accelerator, unet, noisy_latents, timesteps, text_conds, batch, weight_dtype, **kwargs):
        return unet(noisy_latents, timesteps, text_conds[0]).sample

    def post_process_network(self, args, accelerator, network, text_encoders, unet):
        pass

    def get_noise_scheduler(self, args, device):
        return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False)

    def encode_images_to_latents(self, args, vae, images):
        return vae.encode(images).latent_dist.sample()

    def shift_scale_latents(self, args, latents):
        return latents * self.vae_scale_factor

    def get_noise_pred_and_target(self, args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, unet,
                                  network, weight_dtype, train_unet, is_train=True):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), device=latents.device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(is_train), accelerator.autocast():
            noise_pred = self.call_unet(args, accelerator, unet, noisy_latents.requires_grad_(train_unet), timesteps,
                                        text_encoder_conds, batch, weight_dtype)
        return noise_pred, noise, timesteps, None

    def post_process_loss(self, loss, args, timesteps, noise_scheduler):
        return loss

    def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype, accelerator,
                      args, text_encoding_strategy, tokenize_strategy, is_train=True, train_text_encoder=True, train_unet=True):
        with torch.no_grad():
            if "latents" in batch and batch["latents"] is not None:
                latents = batch["latents"].to(accelerator.device)
            else:
                latents = self.encode_images_to_latents(args, vae, batch["images"].to(accelerator.device, dtype=vae_dtype))
            latents = self.shift_scale_latents(args, latents)
        with torch.set_grad_enabled(is_train and train_text_encoder), accelerator.autocast():
            input_ids = [ids.to(accelerator.device) for ids in batch["input_ids_list"]]
            text_encoder_conds = text_encoding_strategy.encode_tokens(
                tokenize_strategy, self.get_models_for_text_encoding(args, accelerator, text_encoders), input_ids
            )
        noise_pred, target, timesteps, weighting = self.get_noise_pred_and_target(
            args, accelerator, noise_scheduler, latents, batch, text_encoder_conds, unet, network, weight_dtype, train_unet,
            is_train=is_train,
        )
        loss = torch.nn.functional.mse_loss(noise_pred.float(), target.float(), reduction="none")
        loss = loss.mean(dim=list(range(1, loss.ndim)))
        loss = loss * batch["loss_weights"]
        loss = self.post_process_loss(loss, args, timesteps, noise_scheduler)
        return loss.mean()

    def load_target_model(self, args, weight_dtype, accelerator):
        """Test hook: args.models = (text_encoder, vae, unet) built by the test."""
        text_encoder, vae, unet = args.models
        return "sd_v1", text_encoder, vae, unet

    def train(self, args):
        accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision)
        weight_dtype = torch.float32
        tokenize_strategy = self.get_tokenize_strategy(args)
        self.assert_extra_args(args, None, None)
        _, text_encoder, vae, unet = self.load_target_model(args, weight_dtype, accelerator)
        text_encoders = [text_encoder]
        if args.cache_latents:
            vae.to("cpu")
        text_encoding_strategy = self.get_text_encoding_strategy(args)
        self.cache_text_encoder_outputs_if_needed(args, accelerator, unet, vae, text_encoders, None, weight_dtype)

        network = LoRANetwork(text_encoder, unet)
        self.post_process_network(args, accelerator, network, text_encoders, unet)
        train_text_encoder = self.is_train_text_encoder(args)
        network.apply_to(text_encoder, unet, train_text_encoder, True)
        if args.network_weights is not None:
            network.load_weights(args.network_weights)

        optimizer = torch.optim.AdamW(network.prepare_optimizer_params(None, None, args.learning_rate), weight_decay=0.1)
        dataloader = torch.utils.data.DataLoader(args.batches, batch_size=None, shuffle=False)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        unet.requires_grad_(False)
        text_encoder.requires_grad_(False)
        network, optimizer, dataloader, lr_scheduler = accelerator.prepare(network, optimizer, dataloader, lr_scheduler)
        accelerator.unwrap_model(network).prepare_grad_etc(text_encoder, unet)

        state = SimpleNamespace(step=0)

        def save_model_hook(models, weights, output_dir):
            remove = [i for i, m in enumerate(models) if not isinstance(m, type(accelerator.unwrap_model(network)))]
            for i in reversed(remove):
                if len(weights) > i:
                    weights.pop(i)
            with open(os.path.join(output_dir, "train_state.json"), "w", encoding="utf-8") as f:
                json.dump({"current_epoch": 1, "current_step": state.step + 1}, f)

        def load_model_hook(models, input_dir):
            remove = [i for i, m in enumerate(models) if not isinstance(m, type(accelerator.unwrap_model(network)))]
            for i in reversed(remove):
                models.pop(i)

        accelerator.register_save_state_pre_hook(save_model_hook)
        accelerator.register_load_state_pre_hook(load_model_hook)
        if args.resume:
            accelerator.load_state(args.resume)

        noise_scheduler = self.get_noise_scheduler(args, accelerator.device)
        self.tracker_logs = []

        def save_model(ckpt_name, unwrapped_nw, steps):
            os.makedirs(args.output_dir, exist_ok=True)
            unwrapped_nw.save_weights(os.path.join(args.output_dir, ckpt_name), None, {"ss_steps": str(steps)})

        def remove_model(old_ckpt_name):
            old = os.path.join(args.output_dir, old_ckpt_name)
            if os.path.exists(old):
                os.remove(old)

        global_step = 0
        self.losses = []
        for batch in dataloader:
            state.step = global_step
            with accelerator.accumulate(network):
                loss = self.process_batch(batch, text_encoders, unet, network, vae, noise_scheduler, weight_dtype, weight_dtype,
                                          accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=True,
                                          train_text_encoder=train_text_encoder, train_unet=True)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if args.max_grad_norm != 0.0:
                        accelerator.clip_grad_norm_(accelerator.unwrap_model(network).get_trainable_params(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            self.losses.append(loss.detach().item())
            if accelerator.sync_gradients:
                global_step += 1
                if args.save_every_n_steps and global_step % args.save_every_n_steps == 0:
                    save_model(f"{args.output_name}-step{global_step:08d}.safetensors", accelerator.unwrap_model(network), global_step)
                    if args.save_state:
                        state_dir = os.path.join(args.output_dir, f"{args.output_name}-step{global_step:08d}-state")
                        accelerator.save_state(state_dir)
                    if args.save_last_n_steps:
                        remove_no = global_step - args.save_last_n_steps - 1
                        remove_no -= remove_no % args.save_every_n_steps
                        if remove_no >= 0:
                            remove_model(f"{args.output_name}-step{remove_no:08d}.safetensors")
                            shutil.rmtree(os.path.join(args.output_dir, f"{args.output_name}-step{remove_no:08d}-state"), ignore_errors=True)
            self.tracker_logs.append(self.generate_step_logs(args, loss.item(), loss.item(), lr_scheduler, None, optimizer))
            if global_step >= args.max_train_steps:
                break
        save_model(f"{args.output_name}.safetensors", accelerator.unwrap_model(network), global_step)
        self.network = accelerator.unwrap_model(network)
        self.accelerator = accelerator


def default_args(**overrides) -> SimpleNamespace:
    """The sd-scripts options the stand-in reads, with sd-scripts' defaults."""
    args = dict(
        output_dir=None, output_name="lora", max_train_steps=4, save_every_n_steps=None, save_last_n_steps=None,
        save_state=False, resume=None, gradient_accumulation_steps=1, max_grad_norm=1.0, mixed_precision="no",
        network_weights=None, learning_rate=1e-2, network_train_unet_only=False, cache_latents=False,
        gradient_checkpointing=False, v_parameterization=False, zero_terminal_snr=False, deepspeed=False,
        loss_type="l2", min_snr_gamma=None, masked_loss=False, noise_offset=None,
    )
    args.update(overrides)
    return SimpleNamespace(**args)

