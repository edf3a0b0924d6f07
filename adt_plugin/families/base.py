"""What a model family is: the facts the core and the front ends read about a model.

One family module per model family (`sd.py`, `sdxl.py`, `sd3.py`, `flux.py`,
`zimage.py`) states, as data and a few small functions:

    prediction    what the denoiser is trained to output (epsilon / v_prediction /
                  flow velocity); the model's own scheduler config says which, the
                  family says what it expects (`prediction`)
    sampling      how its pipeline sets the inference timesteps for an image of a
                  given latent size: the scheduler's own spacing, or FLUX-style
                  sigmas linspace(1, 1/n, n) with a shift mu read from the image's
                  token count (`set_timesteps`), and the training-time shift
                  (`train_shift`)
    guidance      `GUIDANCE_MODES`: "cfg" (conditional and unconditional passes,
                  batched), "embedded" (the guidance value is an input of the
                  denoiser, one pass: FLUX.1-dev) or "none" (guidance-distilled to
                  one plain pass: FLUX.1-schnell, Z-Image-Turbo)
    conditioning  the keys of the conditioning dict, which of them the empty prompt
                  replaces for CFG, how captions become conditioning (the diffusers
                  pipeline's own `encode_prompt`), the unconditional batch (`uncond`)
    denoiser call sample [B, C, H, W] in, the same shape out, in the core's
                  convention (flow: velocity = noise - x0); packing into tokens,
                  position ids and timestep scaling happen inside `denoise`
    vae           latent channels, scaling and shift factors, whether it needs
                  float32 under fp16 (`VaeSpec`)
    lora          the modules a LoRA trains (peft suffixes) and the key layouts the
                  tools' users load (`LoraNames`)
    presets       the deployed sampler's settings (`preset`)

The core (rollout, noise, samplers) reads these facts only through a family
object. `ModelFamily` itself is the family the core assumes when it is given
nothing but a scheduler config (`family_for_scheduler`): CFG, the scheduler's
own spacing, a resolution-dependent shift only where the config asks for one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from ..adapter import GUIDANCE_KEY, Cond

GUIDANCE_MODES = ("cfg", "embedded", "none")
PREDICTIONS = ("epsilon", "v_prediction", "flow")


@dataclass(frozen=True)
class Guidance:
    """How the family's pipeline guides, and what the user's `guidance_scale` means for it.

    cfg        out = out_u + w (out_c - out_u), with w = value + `cfg_offset` (Z-Image's
               pipeline writes out_c + value (out_c - out_u): offset 1); no
               unconditional pass while w <= 1
    embedded   the value goes into the denoiser (`cond[GUIDANCE_KEY]`); one pass.
               `train_value` is what a training-time call without one uses
    none       one conditional pass; a value that would guide in the pipeline's own
               convention is an error (it would be ignored, and the rollout would not
               be the sampler the user runs)
    """

    mode: str = "cfg"
    cfg_offset: float = 0.0
    train_value: float = 1.0

    def __post_init__(self):
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance mode must be one of {GUIDANCE_MODES}, got {self.mode!r}")

    def cfg_scale(self, value: float) -> Optional[float]:
        """The scale w of out_u + w (out_c - out_u), or None: no unconditional pass."""
        if self.mode != "cfg":
            return None
        w = float(value) + self.cfg_offset
        return w if w > 1.0 else None

    def check(self, value: float, family: str) -> None:
        """Refuse a guidance value the family's sampler would not use."""
        if self.mode == "none" and float(value) + self.cfg_offset > 1.0:
            raise ValueError(
                f"{family} is guidance-distilled: its sampler runs one pass without guidance, so "
                f"guidance_scale = {value} would be ignored; set guidance_scale = 0"
            )


@dataclass(frozen=True)
class VaeSpec:
    """The VAE's facts where no VAE config is at hand (the trainers' own VAE classes)."""

    latent_channels: int = 4
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    #: decode and encode in float32 when training in fp16 (SDXL's VAE overflows in fp16)
    fp32_under_fp16: bool = False
    #: pixels per latent (each side)
    downscale: int = 8


@dataclass(frozen=True)
class LoraNames:
    """What a LoRA trains and how the tools name its keys.

    targets        peft module-name suffixes in the diffusers denoiser
    exclude        a regular expression of full module names the suffixes must not
                   take (FLUX: the final layer's `proj_out`, which sd-scripts leaves out)
    original       the weight layout kohya / ComfyUI files use for the denoiser
                   ("ldm_unet", "mmdit", "flux"; "": none known, so full fine-tunes are
                   saved as diffusers folders only); `train/keymap.py` maps names
    kohya_names    how sd-scripts names LoRA layers: "original" (lora_unet_ + the
                   original name, fused layers as one) or "diffusers" (lora_unet_ + the
                   diffusers module name: sd-scripts trains SD1/SD2 on diffusers' UNet)
    file_format    the layout `adt train` writes: "kohya" (lora_down / lora_up / alpha
                   with kohya names) or "diffusers" (transformer.<module>.lora_A / lora_B,
                   alpha / rank folded into B): the one the family's users can load
    diffusers_reads_kohya   whether diffusers' load_lora_weights reads this family's
                   kohya files at any model size (SD3: no converter; FLUX: its converter
                   assumes FLUX.1's real widths); if not, `adt eval` converts them itself
    text_encoders  sd-scripts' text-encoder LoRA prefixes -> the pipeline's attribute
    network_module sd-scripts' `ss_network_module` for the family's LoRA files
    """

    targets: tuple[str, ...] = ()
    original: str = ""
    kohya_prefix: str = "lora_unet"
    comfy_prefix: str = "model.diffusion_model."
    exclude: str = ""
    kohya_names: str = "original"
    file_format: str = "kohya"
    diffusers_reads_kohya: bool = True
    text_encoders: tuple[tuple[str, str], ...] = ()
    network_module: str = "networks.lora"


# What sd-scripts trains by default on the SD UNet: every linear (and 1x1 conv) layer
# of the attention blocks. peft matches these as module-name suffixes.
UNET_LORA_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


class ModelFamily:
    name = "generic"
    label = "any diffusers scheduler config"
    #: the diffusers pipeline and denoiser classes of this family
    pipeline_class = ""
    denoiser_class = ""
    denoiser_attr = "unet"
    #: what the denoiser outputs; "" (the generic family): whatever the scheduler config says
    prediction = ""
    guidance = Guidance("cfg")
    #: sigmas passed to set_timesteps: "scheduler" (its own spacing: SD, SDXL, SD3) or
    #: "linspace" (linspace(1, 1/n, n) as FLUX's and Z-Image's pipelines pass them)
    sigmas = "scheduler"
    #: latent pixels per token side: image_seq_len = (h // patch) (w // patch)
    patch = 2
    #: latent sizes must be multiples of this (transformers that patchify the latents: 2)
    latent_multiple = 1
    #: a latent size (h, w) the family is commonly run at (schedule length, reports)
    default_latent_size = (64, 64)
    cond_keys: tuple[str, ...] = ("encoder_hidden_states",)
    #: the keys the empty prompt replaces in an unconditional batch
    text_keys: tuple[str, ...] = ("encoder_hidden_states",)
    vae = VaeSpec()
    lora = LoraNames(UNET_LORA_TARGETS, "ldm_unet")
    #: the deployed sampler (AdtSettings fields) and the paper's settings where known
    preset: Mapping[str, Any] = {}
    #: sd-scripts' ss_base_model_version and modelspec.architecture of saved files
    base_model_version = ""
    architecture = ""
    #: the family whose weights these are when two differ only in use (sd2 of sd1's
    #: layout, Z-Image-Turbo of Z-Image): detection cannot tell them apart
    variant_of = ""
    #: modelspec.implementation of saved files
    implementation = "diffusers"
    #: the diffusers pipeline components a model folder may leave out (loaded as None)
    optional_components: tuple[str, ...] = ()
    #: the hub repository whose diffusers configs and tokenizers a single-file
    #: checkpoint needs; "": single files are not loaded (a diffusers folder only)
    config_repo = ""
    #: for the front ends: the sd-scripts script and OneTrainer model types
    kohya_script = ""
    onetrainer_model_types: tuple[str, ...] = ()

    @property
    def flow(self) -> bool:
        """A flow-matching (velocity) model: it needs a flow sampler."""
        return self.prediction == "flow"

    def model_spec(self, prediction_type: str) -> dict[str, str]:
        """What saved files say the model is (sd-scripts' ss_* keys, the model spec)."""
        return {
            "ss_base_model_version": self.base_model_version,
            "ss_v2": "False",
            "modelspec.architecture": self.architecture,
            "modelspec.implementation": self.implementation,
        }

    # -- detection ------------------------------------------------------------------
    def matches_config(self, denoiser_config: Mapping[str, Any], text_config: Optional[Mapping[str, Any]]) -> bool:
        """Among families sharing a pipeline / denoiser class, whether these configs are this one's."""
        return True

    def matches_keys(self, keys: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> bool:
        """Whether a state dict with these keys (any prefix) holds this family's denoiser."""
        return False

    # -- sampling -------------------------------------------------------------------
    def mu(self, scheduler_config: Mapping[str, Any], latent_size: tuple[int, int]) -> float:
        """The resolution-dependent shift's exponent, as diffusers' pipelines compute it
        (`calculate_shift`): linear in the image's token count between two anchors."""
        h, w = latent_size
        seq_len = (h // self.patch) * (w // self.patch)
        base_len = scheduler_config.get("base_image_seq_len", 256)
        max_len = scheduler_config.get("max_image_seq_len", 4096)
        base_shift = scheduler_config.get("base_shift", 0.5)
        max_shift = scheduler_config.get("max_shift", 1.15)
        m = (max_shift - base_shift) / (max_len - base_len)
        return seq_len * m + base_shift - m * base_len

    def inference_sigmas(self, num_inference_steps: int) -> Optional[Sequence[float]]:
        """The sigmas the pipeline passes to set_timesteps (None: the scheduler's own spacing).
        FLUX's pipeline: numpy's linspace(1, 1/n, n), written the same way so that the
        float32 values the scheduler keeps are the same bits."""
        if self.sigmas == "linspace":
            import numpy as np

            return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return None

    def set_timesteps(self, scheduler, num_inference_steps: int, latent_size: tuple[int, int], device: Any = None) -> None:
        """Set `scheduler`'s timesteps as this family's pipeline does for a latent of `latent_size`."""
        kwargs: dict[str, Any] = {}
        if getattr(scheduler.config, "use_dynamic_shifting", False):
            kwargs["mu"] = self.mu(scheduler.config, latent_size)
        sigmas = self.inference_sigmas(num_inference_steps)
        if sigmas is not None:
            scheduler.set_timesteps(sigmas=sigmas, device=device, **kwargs)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)

    def depends_on_size(self, scheduler_config: Mapping[str, Any]) -> bool:
        """Whether the inference timesteps change with the latent size."""
        return bool(scheduler_config.get("use_dynamic_shifting", False))

    def train_shift(self, scheduler_config: Mapping[str, Any], latent_size: Optional[tuple[int, int]]) -> float:
        """The shift s -> shift s / (1 + (shift - 1) s) of flow training timesteps: exp(mu)
        for this size where the schedule is resolution-dependent (sd-scripts'
        `flux_shift`, OneTrainer's dynamic timestep shifting), else the config's shift."""
        if scheduler_config.get("use_dynamic_shifting", False) and latent_size is not None:
            import math

            return math.exp(self.mu(scheduler_config, latent_size))
        return float(scheduler_config.get("shift", 1.0))

    # -- conditioning ---------------------------------------------------------------
    def encode_text(self, pipe, captions: list[str], device) -> dict[str, torch.Tensor]:
        embeds, _ = pipe.encode_prompt(captions, device, 1, False)
        return {"encoder_hidden_states": embeds}

    def empty_text(self, pipe, device) -> dict[str, torch.Tensor]:
        """The text conditioning the pipeline guides against (the empty prompt), batch 1."""
        return self.encode_text(pipe, [""], device)

    def size_cond(self, size_cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample conditioning that is not text (SDXL's size embedding)."""
        return {}

    def uncond(self, cond: Cond, empty_text: Mapping[str, torch.Tensor]) -> dict[str, Optional[torch.Tensor]]:
        """The unconditional batch for `cond`: its text keys replaced by the empty prompt's
        (batch 1, expanded), every other key (size conditioning) kept."""
        batch = next(v for v in cond.values() if v is not None).shape[0]
        out = dict(cond)
        for key, value in empty_text.items():
            like = cond[key]
            out[key] = value.to(like.device, like.dtype).expand(batch, *value.shape[1:])
        return out

    # -- the denoiser ---------------------------------------------------------------
    def denoise(self, denoiser, sample: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        return denoiser(sample, timestep, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]

    # -- the VAE --------------------------------------------------------------------
    def encode_latents(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> the latents the denoiser is trained on (the posterior's
        mode, shifted and scaled as the VAE's config says). The mode, not a sample:
        cached and uncached runs then see the same latents."""
        dtype = next(vae.parameters()).dtype
        with torch.no_grad():
            mode = vae.encode(pixels.to(vae.device, dtype)).latent_dist.mode()
        config = vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        return (mode.float() - shift) * float(config.scaling_factor)

    def vae_dtype(self, train_dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if (self.vae.fp32_under_fp16 and train_dtype == torch.float16) else train_dtype

    # -- the family's diffusers pipeline (adt eval) -----------------------------------
    def pipeline_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """Initial noise [B, C, h, w] as the pipeline's `latents` argument takes it."""
        return noise

    def pipeline_guidance(self, value: float, negative_prompt: str, batch: int) -> dict[str, Any]:
        """The pipeline call's guidance arguments for the user's guidance value."""
        self.guidance.check(value, self.label)
        if self.guidance.mode == "cfg":
            guided = self.guidance.cfg_scale(value) is not None
            return {"guidance_scale": value, "negative_prompt": [negative_prompt] * batch if guided else None}
        if negative_prompt:
            raise ValueError(
                f"{self.label} does not guide against a negative prompt ({self.guidance.mode} guidance); "
                f"leave the negative prompt empty"
            )
        return {"guidance_scale": value}

    def __repr__(self) -> str:
        return f"<model family {self.name}: {self.label}>"


def guidance_cond(cond: Cond, value: float, like: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
    """`cond` with the embedded guidance value for each sample (shape [B], float32)."""
    return {**cond, GUIDANCE_KEY: torch.full((like.shape[0],), float(value), device=like.device, dtype=torch.float32)}


def embedded_guidance(family: ModelFamily, cond: Cond, batch: int, device) -> Optional[torch.Tensor]:
    """The guidance input of an embedded-guidance denoiser: the value in `cond`, else the
    family's training value (a training-time call: the FT loss, the diffusion term)."""
    value = cond.get(GUIDANCE_KEY)
    if value is None:
        value = torch.full((batch,), family.guidance.train_value, device=device, dtype=torch.float32)
    return value


__all__ = [
    "GUIDANCE_MODES",
    "Guidance",
    "LoraNames",
    "ModelFamily",
    "PREDICTIONS",
    "UNET_LORA_TARGETS",
    "VaeSpec",
    "embedded_guidance",
    "guidance_cond",
]
