"""`adt bench`: what an ADT iteration costs next to a plain fine-tuning step.

Random weights, the real model classes: the denoiser (a tiny UNet on the CPU, or
a tiny FLUX.1-dev transformer with `--model tiny-flux`; the full SD1.5 UNet at
512 px and the SDXL UNet at 1024 px on a GPU), a VAE decoder, a DINOv2
discriminator backbone. The model's family (families/) calls the denoiser, builds
the unconditional batch and says the default sampler, steps and guidance (its
presets'). Printed:

  FT step            forward + backward + AdamW step at batch B
  ADT iteration      averaged over an H-cycle (H - 1 discriminator-only iterations,
                     one generator iteration), rollouts with the configured sampler
  forwards / iter    rollout steps per ADT iteration: guided denoiser forwards (cond +
                     uncond), not counting what backward recomputes
  overhead ratio     ADT iteration time (H-cycle average) / (its forwards x one
                     no-grad forward + one FT backward), the issue's definition: 1.0
                     means an iteration costs its rollout's forwards plus one
                     fine-tuning backward. Also printed, stricter: the same for a whole
                     H-cycle with one FT backward per cycle.
  memory ADT / FT    peak memory of a generator iteration over an FT step (graph steps
                     gradient-checkpointed), after one warm-up iteration that creates
                     the optimizers' state; CUDA: allocated bytes; CPU (Linux): the peak
                     resident memory of a fresh process above what it held before the
                     measured step, with glibc returning every large block when freed
                     (a proxy: the CPU allocator keeps no counters)
  D-only graph       tensors saved for backward inside the denoiser and decoder on
                     discriminator-only iterations (must be 0)
  generator update   the compute of a cycle (counted by the strategy, `Cost`: denoiser
                     forward-equivalents, an FT step = 3) per generator update, in FT
                     steps, and its time in FT steps; the same per ADT update (the
                     update with the adversarial term, carrying the discriminator-only
                     calls and the FT steps of its cycle)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..families import FamilyAdapter, get_family
from ..selfcheck import DDPM_EPS
from ..settings import AdtSettings

DEFAULTS = AdtSettings()  # the core's defaults, which the bench measures unless told otherwise

HELP = "measure FT vs ADT iteration cost and memory on random weights (tiny on CPU, SD1.5 / SDXL on a GPU)"

# SD's noise schedule (the core's self-check uses the same): scaled-linear betas, epsilon
SD_SCHEDULER = DDPM_EPS


@dataclass(frozen=True)
class BenchModel:
    name: str
    resolution: int
    denoiser: dict  # the family's denoiser class's config
    vae: dict
    dinov2: dict
    family: str = "sd1"  # a families name
    #: per-sample shapes of the text conditioning (besides what family.size_cond adds)
    text: Optional[dict] = None
    scheduler: Optional[dict] = None  # default: SD's noise schedule
    gpu_method: str = "full"  # the default --method on a GPU (SDXL: lora)

    def text_shapes(self) -> dict:
        if self.text is not None:
            return self.text
        width = self.denoiser.get("cross_attention_dim", 768)
        return {"encoder_hidden_states": (77, width)}


TINY = BenchModel(
    "tiny",
    64,
    denoiser=dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=8,
        sample_size=16,
    ),
    vae=dict(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
    ),
    dinov2=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128, patch_size=28),
    text={"encoder_hidden_states": (16, 64)},
)
# FLUX.1-dev's layout (guidance embedding, 16-channel latents packed 2x2), tiny; its
# real scheduler config (the shift for a 16x16 latent is then the smallest one)
TINY_FLUX = BenchModel(
    "tiny-flux",
    64,
    denoiser=dict(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    vae=dict(
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ),
    dinov2=TINY.dinov2,
    family="flux_dev",
    text={"encoder_hidden_states": (16, 32), "pooled_projections": (32,)},
    scheduler=dict(get_family("flux_dev").scheduler_config),  # the released model's
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
)
DINOV2_S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=14)
SD15 = BenchModel("sd15", 512, denoiser=dict(cross_attention_dim=768, sample_size=64), vae=SD_VAE, dinov2=DINOV2_S)
SDXL = BenchModel(
    "sdxl",
    1024,
    denoiser=dict(
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        sample_size=128,
    ),
    vae=SD_VAE,
    dinov2=DINOV2_S,
    family="sdxl",
    text={"encoder_hidden_states": (77, 2048), "text_embeds": (1280,)},
    gpu_method="lora",
)
MODELS = {m.name: m for m in (TINY, TINY_FLUX, SD15, SDXL)}


def family_of(model: BenchModel):
    return get_family(model.family)


def scheduler_of(model: BenchModel) -> dict:
    return model.scheduler or SD_SCHEDULER


def clock(device) -> float:
    """Wall time on a GPU (after synchronising); on the CPU the process's CPU time,
    which other jobs on a shared machine do not inflate."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


class SavedCounter:
    """Counts tensors saved for backward inside a block (autograd graph being built).
    Only while `active`: a hook inside a checkpointed region would replace the
    checkpoint's own hook and keep the activations it is meant to drop."""

    def __init__(self):
        self.count = 0
        self.active = False

    @contextmanager
    def watch(self):
        if not self.active:
            yield
            return

        def pack(t):
            self.count += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield


class BenchAdapter(FamilyAdapter):
    """The family's model adapter over random weights (its denoiser call and its
    unconditional batch: the text keys zeroed); counts graph allocations when asked."""

    def __init__(self, model: BenchModel, denoiser, decoder, cond: dict, autocast_dtype, device):
        family = family_of(model)
        empty = {k: torch.zeros_like(cond[k][:1]) for k in family.text_keys}

        def autocast():
            if autocast_dtype:
                return torch.autocast(device.type, dtype=autocast_dtype)
            return torch.autocast(device.type, enabled=False)

        super().__init__(family, denoiser, scheduler_of(model), empty, decoder, autocast)
        self.saved = SavedCounter()

    def denoise(self, sample, timestep, cond):
        with self.saved.watch():
            return super().denoise(sample, timestep, cond)

    def decode(self, latents):
        with self.saved.watch(), self.autocast():
            return self.decoder(latents).float()


def build(
    model: BenchModel,
    device,
    batch: int,
    method: str,
    autocast_dtype,
    seed: int = 0,
    checkpointing: bool = True,
    tiny_decoder: bool = False,
):
    import diffusers
    from diffusers import AutoencoderKL
    from transformers import Dinov2Config, Dinov2Model

    from ..backbones import Dinov2Backbone
    from ..decode import LatentDecoder

    family = family_of(model)
    torch.manual_seed(seed)
    denoiser = getattr(diffusers, family.denoiser_class)(**model.denoiser).to(device)
    vae = AutoencoderKL(**model.vae).to(device)
    backbone = Dinov2Backbone(
        Dinov2Model(Dinov2Config(image_size=224, **model.dinov2)),
        taps=(2, 5, 8, 11) if model.dinov2["num_hidden_layers"] >= 12 else (1, 3),
        identity=f"random-{model.name}",
    )
    if method == "lora":
        from .config import LoraConfig
        from .lora import add_lora

        params = add_lora(denoiser, family, LoraConfig(rank=16, alpha=16))
    else:
        params = list(denoiser.parameters())
    factor = 2 ** (len(model.vae["block_out_channels"]) - 1)
    side = model.resolution // factor
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, model.vae.get("latent_channels", 4), side, side, generator=gen).to(device)
    cond = {k: torch.randn(batch, *shape, generator=gen).to(device) for k, shape in model.text_shapes().items()}
    size = torch.tensor([[model.resolution, model.resolution, 0, 0, model.resolution, model.resolution]] * batch)
    cond.update({k: v.to(device) for k, v in family.size_cond(size).items()})  # SDXL's time_ids
    if tiny_decoder:  # TAESD's architecture (diffusers' AutoencoderTiny defaults), as `decoder_path` would load
        from diffusers import AutoencoderTiny

        decoder = LatentDecoder(AutoencoderTiny().to(device))
    else:
        decoder = LatentDecoder(vae, gradient_checkpointing=checkpointing)  # the VAE's own, as adt train sets it
    adapter = BenchAdapter(model, denoiser, decoder, cond, autocast_dtype, device)
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    return adapter, backbone, optimizer, params, x0, cond


def strategies(args, model: BenchModel, backbone, device, g_every: Optional[int] = None, adt_every: Optional[int] = None):
    from ..settings import AdtSettings
    from ..strategies import build_strategy

    taps = backbone.taps
    adt = AdtSettings(
        sampler=args.sampler,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        k_graph_steps=args.k,
        g_every=g_every or args.g_every,
        adt_every=adt_every or args.adt_every,
        rollout_buffer=args.rollout_buffer,
        rollout_share=args.rollout_share,
        gradient_checkpointing=not args.no_checkpointing,
        taps=taps,
        g_warmup_steps=0,
        d_warmup_steps=0,
        seed=args.seed,
    )
    scheduler, family = scheduler_of(model), family_of(model)
    ft = build_strategy(adt.replace(strategy="ft"), scheduler, device=device, family=family)
    return ft, build_strategy(adt, scheduler, backbone=backbone, device=device, family=family)


def generator_update(strategy, adapter, batch, optimizer) -> Any:
    from ..strategies import TrainBatch

    out = strategy(adapter, TrainBatch(*batch))
    if out.updates_generator:
        out.loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


def warm_optimizer(optimizer, params) -> None:
    """Create AdamW's state now (zero gradients), so that no phase pays for it."""
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def setup(args, model: BenchModel, device, g_every: Optional[int] = None, adt_every: Optional[int] = None):
    """The measured pieces, built the same way for every phase: (adapter, optimizer
    with its state created, x0, cond, ft strategy, adt strategy); `g_every`
    overrides ADT's H."""
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    adapter, backbone, optimizer, params, x0, cond = build(
        model, device, args.batch, args.method, autocast_dtype, args.seed, not args.no_checkpointing,
        args.decoder == "tiny",
    )
    ft, adt = strategies(args, model, backbone, device, g_every, adt_every)
    warm_optimizer(optimizer, params)
    return adapter, optimizer, x0, cond, ft, adt


def time_phases(args, model: BenchModel, device) -> dict[str, float]:
    from ..adapter import guided_denoise
    from ..strategies import TrainBatch

    adapter, optimizer, x0, cond, ft, adt = setup(args, model, device)
    batch = (x0, cond)
    generator_update(ft, adapter, batch, optimizer)  # warm-up: kernels, allocator

    # FT: forward with a graph, backward, step
    fwd = bwd = step = 0.0
    for _ in range(args.ft_steps):
        t0 = clock(device)
        out = ft(adapter, TrainBatch(*batch))
        t1 = clock(device)
        out.loss.backward()
        t2 = clock(device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        fwd, bwd, step = fwd + t1 - t0, bwd + t2 - t1, step + clock(device) - t2
    n = args.ft_steps
    ft_step, ft_backward = (fwd + bwd + step) / n, (bwd + step) / n

    # one no-grad guided forward, as the rollout calls it (CFG: cond + uncond in one batch;
    # embedded guidance or none: one pass)
    t = torch.full((args.batch,), 500, device=device)
    guided_cond, uncond, scale = adt.rollout.guided_inputs(adapter, cond, x0)
    scale = 1.0 if scale is None else scale
    with torch.no_grad():
        guided_denoise(adapter, x0, t, guided_cond, uncond, scale)
        t0 = clock(device)
        for _ in range(args.ft_steps):
            guided_denoise(adapter, x0, t, guided_cond, uncond, scale)
    nograd = (clock(device) - t0) / args.ft_steps

    # ADT: whole cycles (H windows per generator step, adt_every generator steps per ADT step)
    calls = args.g_every * args.adt_every
    for _ in range(calls):  # warm-up cycle (fills the rollout buffer too)
        generator_update(adt, adapter, batch, optimizer)
    adapter.saved.count, steps, updates, adversarial, d_only = 0, 0.0, 0, 0, 0
    spent = adt.cost_total
    t0 = clock(device)
    for _ in range(args.cycles * calls):
        adapter.saved.active = not adt.next_call_updates_generator()  # count on discriminator-only iterations
        d_only += int(adapter.saved.active)
        out = generator_update(adt, adapter, batch, optimizer)
        steps += out.logs["adt/rollout_steps"]
        updates += int(out.updates_generator)
        adversarial += int(out.logs.get("adt/adversarial", 0.0) > 0)
    d_only_saved = adapter.saved.count
    cycles_time = clock(device) - t0
    compute = (adt.cost_total.forward_equiv - spent.forward_equiv) / args.cycles  # forward-equivalents per cycle
    iterations = args.cycles * calls
    forwards = steps / iterations  # guided forwards of the rollouts (backward's recomputations not counted)
    cycle = cycles_time / args.cycles
    ideal_iteration = forwards * nograd + ft_backward
    ideal_cycle = forwards * calls * nograd + ft_backward * updates / args.cycles
    per_update, per_adversarial = args.cycles / max(1, updates), args.cycles / max(1, adversarial)
    return {
        "ft_step_s": ft_step,
        "ft_backward_s": ft_backward,
        "nograd_forward_s": nograd,
        "adt_iteration_s": cycles_time / iterations,
        "forwards_per_iteration": forwards,
        "overhead_ratio": (cycles_time / iterations) / ideal_iteration,
        "overhead_ratio_per_cycle": cycle / ideal_cycle,
        "d_only_saved_tensors": d_only_saved,
        "d_only_iterations": d_only,
        # one generator update (FT steps of the mix included) and one ADT update (with the
        # discriminator-only calls and FT steps of its cycle), in FT steps: compute, then time
        "update_ft_steps": compute * per_update / 3.0,
        "update_time_ft_steps": cycle * per_update / ft_step,
        "adt_update_ft_steps": compute * per_adversarial / 3.0,
        "adt_update_time_ft_steps": cycle * per_adversarial / ft_step,
    }


def memory_phase(args, model: BenchModel, device, phase: str) -> float:
    """Peak memory (bytes) of one FT step or one ADT generator iteration, above the
    memory held before it (models, optimizer state, inputs)."""
    # H = 2: a warm-up iteration (discriminator-only: creates the D optimizer's state), then a
    # generator one with the adversarial term (measured); it computes the same whatever H is
    adapter, optimizer, x0, cond, ft, adt = setup(args, model, device, g_every=2, adt_every=1)
    strategy = ft if phase == "ft" else adt
    generator_update(strategy, adapter, (x0, cond), optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        generator_update(strategy, adapter, (x0, cond), optimizer)
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    before = reset_peak_rss()
    generator_update(strategy, adapter, (x0, cond), optimizer)
    return float(status_bytes("VmHWM") - before)


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Linux: restart the peak-RSS record (VmHWM) at the current RSS, and return that."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_bytes("VmRSS")


def memory_in_fresh_process(args, phase: str) -> Optional[float]:
    """CPU: each phase in its own process, so one phase's high-water mark is not the other's."""
    if not sys.platform.startswith("linux"):
        return None
    cmd = [sys.executable, "-m", "adt_plugin.cli", "bench", "--_memory_phase", phase, *args.forward_args]
    # glibc then maps every allocation above 64 KiB on its own and returns it when freed,
    # so the resident set follows the live tensors instead of the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["bytes"]
    raise RuntimeError(f"memory probe for {phase} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model", choices=["auto", *MODELS], default="auto", help="auto: sd15 and sdxl on a GPU, tiny on the CPU (tiny-flux: a tiny FLUX.1-dev)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--method", choices=["full", "lora"], default=None, help="default: full (sdxl on a GPU: lora)")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 (tiny: 4)")
    parser.add_argument(
        "--resolution", type=int, default=None, help="pixels (default: the model's: tiny 64, sd15 512, sdxl 1024)"
    )
    parser.add_argument("--sampler", default=None, help="default: the model family's preset (SD: ddim, FLUX: flow_euler)")
    parser.add_argument(
        "--steps", type=int, default=None, help="inference steps of the rollout's sampler (default: the family preset's: SD 50, FLUX.1-dev 28)"
    )
    parser.add_argument("--guidance", type=float, default=None, help="default: the family preset's (SD1.5 7, SDXL 5, FLUX.1-dev 3.5)")
    parser.add_argument("--k", type=int, default=3, help="K: graph steps besides the first")
    parser.add_argument("--g_every", type=int, default=DEFAULTS.g_every, help=f"H (default {DEFAULTS.g_every}, the core's)")
    parser.add_argument(
        "--adt_every", type=int, default=DEFAULTS.adt_every,
        help=f"an ADT step every n-th generator step, FT steps between (default {DEFAULTS.adt_every}, the core's)",
    )
    parser.add_argument(
        "--rollout_buffer", type=int, default=DEFAULTS.rollout_buffer,
        help=f"recent rollouts reused by discriminator steps (default {DEFAULTS.rollout_buffer}, the core's)",
    )
    parser.add_argument(
        "--rollout_share", type=float, default=DEFAULTS.rollout_share,
        help=f"share of the batch that rolls out (default {DEFAULTS.rollout_share:g}, the core's)",
    )
    parser.add_argument("--cycles", type=int, default=4, help="cycles (H x adt_every iterations each) to time")
    parser.add_argument("--ft_steps", type=int, default=10, help="FT steps and no-grad forwards to average")
    parser.add_argument("--no_checkpointing", action="store_true", help="keep the graph steps' activations")
    parser.add_argument(
        "--decoder",
        choices=["vae", "tiny"],
        default="vae",
        help="decode for the discriminator with the model's VAE (default) or a tiny autoencoder (TAESD's "
        "architecture, as AdtSettings.decoder_path would load)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument(
        "--_memory_phase", choices=["ft", "adt"], help=argparse.SUPPRESS
    )  # internal: one phase per process


def run(args) -> int:
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    names = (["sd15", "sdxl"] if device.type == "cuda" else ["tiny"]) if args.model == "auto" else [args.model]
    if args._memory_phase:
        model = _defaults(args, MODELS[names[0]], device)
        print(json.dumps({"bytes": memory_phase(args, model, device, args._memory_phase)}))
        return 0
    if device.type != "cuda" and args.model == "auto":
        print(
            "no CUDA device: measuring the tiny model on the CPU; the SD1.5 (512 px) and SDXL (1024 px) numbers "
            "need a GPU and were not measured"
        )
    asked = {k: getattr(args, k) for k in ("method", "batch", "resolution", "sampler", "steps", "guidance")}
    for name in names:
        for key, value in asked.items():  # each model gets its own defaults, not the previous model's
            setattr(args, key, value)
        model = _defaults(args, MODELS[name], device)
        args.forward_args = [
            "--model",
            name,
            "--device",
            device.type,
            "--method",
            args.method,
            "--batch",
            str(args.batch),
            "--resolution",
            str(args.resolution),
            "--sampler",
            args.sampler,
            "--steps",
            str(args.steps),
            "--guidance",
            str(args.guidance),
            "--k",
            str(args.k),
            "--g_every",
            str(args.g_every),
            "--adt_every",
            str(args.adt_every),
            "--rollout_buffer",
            str(args.rollout_buffer),
            "--rollout_share",
            str(args.rollout_share),
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
            "--decoder",
            args.decoder,
        ] + (["--no_checkpointing"] if args.no_checkpointing else [])
        r = time_phases(args, model, device)
        if device.type == "cuda":
            ft_mem, adt_mem = memory_phase(args, model, device, "ft"), memory_phase(args, model, device, "adt")
        else:
            ft_mem, adt_mem = memory_in_fresh_process(args, "ft"), memory_in_fresh_process(args, "adt")
        report(name, model, device, args, r, ft_mem, adt_mem)
        del args.forward_args
    return 0


def _defaults(args, model: BenchModel, device) -> BenchModel:
    if args.method is None:
        args.method = model.gpu_method if device.type == "cuda" else "full"
    if args.batch is None:
        args.batch = 4 if model.name == "tiny" else 2
    if args.resolution is None:
        args.resolution = model.resolution
    preset = family_of(model).preset  # the family's deployed sampler
    if args.sampler is None:
        args.sampler = preset.get("sampler", "ddim")
    if args.steps is None:
        args.steps = int(preset.get("num_inference_steps", 50))
    if args.guidance is None:
        args.guidance = float(preset.get("guidance_scale", 7.0))
    return dataclasses.replace(model, resolution=args.resolution)


def report(name, model, device, args, r, ft_mem, adt_mem) -> None:
    mib = 2**20
    ckpt = "off" if args.no_checkpointing else "on"
    print(
        f"\n{name} ({model.resolution} px, batch {args.batch}, {args.method}) on {device.type}; "
        f"{args.sampler} {args.steps} steps, guidance {args.guidance} ({family_of(model).guidance.mode}), K {args.k}, H {args.g_every}, "
        f"adt_every {args.adt_every}, rollout_buffer {args.rollout_buffer}, rollout_share {args.rollout_share:g}, "
        f"graph-step checkpointing {ckpt}, decoder {args.decoder}"
    )
    print(f"  FT step                          {r['ft_step_s'] * 1000:9.1f} ms")
    print(f"  ADT iteration (H-cycle average)  {r['adt_iteration_s'] * 1000:9.1f} ms")
    print(
        f"  one generator update             {r['update_ft_steps']:9.1f}   FT steps of compute (denoiser "
        f"forward-equivalents / 3; {r['update_time_ft_steps']:.1f} FT steps of time)"
    )
    print(
        f"  one ADT update                   {r['adt_update_ft_steps']:9.1f}   FT steps of compute, with the "
        f"discriminator-only and FT steps of its cycle ({r['adt_update_time_ft_steps']:.1f} of time)"
    )
    print(
        f"  denoiser forwards per iteration  {r['forwards_per_iteration']:9.2f}   (one no-grad forward: "
        f"{r['nograd_forward_s'] * 1000:.1f} ms; FT backward + step: {r['ft_backward_s'] * 1000:.1f} ms)"
    )
    print(
        f"  overhead ratio                   {r['overhead_ratio']:9.3f}   (goal <= 1.15; per H-cycle with one FT "
        f"backward per cycle: {r['overhead_ratio_per_cycle']:.3f})"
    )
    if ft_mem and adt_mem:
        kind = "allocated" if device.type == "cuda" else "peak RSS above baseline, fresh process"
        print(
            f"  peak memory ADT / FT             {adt_mem / ft_mem:9.3f}   ({adt_mem / mib:.1f} / {ft_mem / mib:.1f} MiB, {kind}; goal <= 1.5)"
        )
    if r["d_only_iterations"]:
        print(
            f"  D-only iterations: tensors saved for backward in denoiser + decoder: {r['d_only_saved_tensors']} (goal 0)"
        )
    else:
        print("  D-only iterations: none with H = 1 (--g_every 5 measures them)")
