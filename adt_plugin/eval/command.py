"""`adt eval`: the same prompts, seeds and sampler for every model, then the metrics.

    adt eval --prompts prompts.txt --models base=./sd15,ft=./sd15+ft.safetensors,adt=./sd15+adt.safetensors \\
             --ref ./real_images --out ./eval_out --metrics-dir ./metrics

Writes eval_out/images/<model>/*.png (reused on the next run when their recorded
settings match), report.md, report.json, grid.png and chart.png.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HELP = "generate with each model on the same prompts/seeds, compute FID, KID, FD-DINOv2, CLIP, aesthetic, HPSv2; write a report"


def add_arguments(parser) -> None:
    g = parser.add_argument_group("what to compare")
    g.add_argument("--prompts", required=True, help="text file, one prompt per line (# comments), or a JSON list")
    g.add_argument(
        "--models",
        required=True,
        help="NAME=MODEL[+LORA[@SCALE]],... e.g. base=./sd15,ft=./sd15+ft.safetensors,adt=./sd15+adt.safetensors@0.8; "
        "MODEL is a diffusers folder or a single-file .safetensors checkpoint",
    )
    g.add_argument("--base-model", help="model used where an entry names no MODEL (ft=+ft.safetensors)")
    g.add_argument(
        "--config-dir",
        default="",
        help="for single-file checkpoints: a local diffusers folder of the same model (its configs and tokenizers; "
        "default: the model's repository in the local Hugging Face cache)",
    )
    g.add_argument("--ref", help="folder of real images for FID / KID / FD-DINOv2 (skipped without it)")
    g.add_argument("--out", required=True, help="output folder (re-running with the same folder resumes)")
    s = parser.add_argument_group("sampling (identical for every model)")
    s.add_argument("--seeds", default="0", help="seeds per prompt: '0,1,2' or '0-3' (default 0)")
    s.add_argument(
        "--sampler",
        help="ddim, dpmsolver++, dpmsolver++_karras, euler, flow_euler (default: the model family's deployed sampler: "
        "SD1.5 / SDXL ddim, SD3 / FLUX / Z-Image flow_euler)",
    )
    s.add_argument("--steps", type=int, help="sampler steps (default: the family's: SD 50, SD3 / FLUX.1-dev 28, schnell 4, Z-Image-Turbo 9)")
    s.add_argument(
        "--cfg",
        type=float,
        help="guidance: the CFG scale, FLUX.1-dev's embedded guidance, 0 for schnell / Z-Image-Turbo (default: the "
        "family's: SD1.5 7, SDXL 5, SD3 7, FLUX.1-dev 3.5, schnell / turbo 0)",
    )
    s.add_argument("--width", type=int, help="image width (default: the model's)")
    s.add_argument("--height", type=int, help="image height (default: the model's)")
    s.add_argument("--negative", default="", help="negative prompt (default empty)")
    s.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (default 4)")
    s.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    s.add_argument("--skip-generation", action="store_true", help="only evaluate images already in --out")
    m = parser.add_argument_group(
        "metric weights (local files, or hub ids downloaded once into the Hugging Face cache; "
        "a metric without weights is skipped with a note)"
    )
    m.add_argument(
        "--metrics-dir",
        action="append",
        default=None,
        help="folder with the standard file names (repeatable; default $ADT_METRICS_DIR): "
        "pt_inception-2015-12-05-6726825d.pth, dinov2-large/, clip-vit-large-patch14/, "
        "sac+logos+ava1-l14-linearMSE.pth, HPS_v2.1_compressed.pt",
    )
    m.add_argument("--inception", help="FID Inception weights file")
    m.add_argument("--dinov2", help="DINOv2 folder or hub id for FD-DINOv2, e.g. facebook/dinov2-large")
    m.add_argument("--clip", help="CLIP ViT-L/14 folder or hub id (CLIP score, aesthetic), e.g. openai/clip-vit-large-patch14")
    m.add_argument("--aesthetic", help="LAION aesthetic predictor v2 head file")
    m.add_argument(
        "--hps", help="HPSv2 checkpoint file or hub file, e.g. xswu/HPSv2/HPS_v2.1_compressed.pt (needs the [metrics] extra)"
    )
    m.add_argument("--metric-batch-size", type=int, default=16)
    m.add_argument("--kid-subsets", type=int, default=100)
    m.add_argument("--grid-rows", type=int, default=8, help="(prompt, seed) rows in grid.png (default 8)")


def read_prompts(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of prompts")
        prompts = [item["prompt"] if isinstance(item, dict) else item for item in data]
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: every entry must be a string or an object with a 'prompt' string")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def parse_seeds(text: str) -> tuple[int, ...]:
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            if dash and first:
                seeds.extend(range(int(first), int(last) + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise ValueError(f"--seeds: {part!r} is not a seed or a range like 0-3") from None
    if not seeds:
        raise ValueError("--seeds names no seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {seeds}")
    return tuple(seeds)


def _device_and_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "float16" if str(device).startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)


def run(args) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: say what, without a traceback
        print(f"adt eval: {err}")
        return 2


def sampling_defaults(args, specs) -> None:
    """--sampler / --steps / --cfg left out: the first model's family's deployed sampler;
    the guidance value and negative prompt checked against the family (configs only)."""
    from .generate import model_family

    families = {spec.model_path: model_family(spec, args.config_dir) for spec in specs}
    family = families[specs[0].model_path]
    preset = family.preset
    if args.sampler is None:
        args.sampler = preset.get("sampler") or ("flow_euler" if family.flow else "ddim")
    if args.steps is None:
        args.steps = int(preset.get("num_inference_steps", 28 if family.flow else 50))
    if args.cfg is None:
        args.cfg = float(preset.get("guidance_scale", 7.0))
    for found in families.values():
        found.pipeline_guidance(args.cfg, args.negative, 1)  # a value or negative prompt it would ignore: an error


def _run(args) -> int:
    from tqdm.auto import tqdm

    from .generate import SamplingSettings, generate_model, is_done, parse_models, plan_jobs
    from .images import list_images
    from .lora_file import LoraFileError, check_lora_file
    from .report import write_report
    from .suite import MetricWeights, evaluate
    from .weights import missing_message

    prompts = read_prompts(args.prompts)
    specs = parse_models(args.models, args.base_model)
    seeds = parse_seeds(args.seeds)
    if args.ref:
        list_images(args.ref)  # fail before hours of generation, not after
    for spec in specs:  # an unreadable LoRA file, too (its fit to the model is checked when it loads)
        if spec.lora_path:
            try:
                check_lora_file(spec.lora_path)
            except LoraFileError as err:
                raise LoraFileError(f"model {spec.name!r}: {err}") from err
    # the metric networks before hours of generation: a hub id is downloaded now, a missing one stops here
    folders = args.metrics_dir or ([os.environ["ADT_METRICS_DIR"]] if os.environ.get("ADT_METRICS_DIR") else [])
    explicit = {k: getattr(args, k) for k in ("inception", "dinov2", "clip", "aesthetic", "hps")}
    weights = MetricWeights.resolve(explicit, folders)
    for key, path in vars(weights).items():
        if path is None:
            print(f"adt eval: note: {missing_message(key, folders)} (its metrics will be skipped)")
    out = Path(args.out)
    device, dtype = _device_and_dtype(args.device, args.dtype)
    sampling_defaults(args, specs)  # the models' families (configs only), before any generation
    settings = SamplingSettings(args.sampler, args.steps, args.cfg, args.width, args.height, args.negative, seeds)
    jobs = {spec.name: plan_jobs(out, spec, prompts, settings) for spec in specs}
    for spec in specs:
        done = sum(is_done(j) for j in jobs[spec.name])
        if args.skip_generation:
            if done < len(jobs[spec.name]):
                print(f"adt eval: --skip-generation, but {len(jobs[spec.name]) - done} images of {spec.name!r} are missing or were made with other settings")
                return 2
            continue
        with tqdm(total=len(jobs[spec.name]), initial=done, desc=f"generate {spec.name}", unit="img") as bar:
            made = generate_model(
                spec, jobs[spec.name], settings, device, dtype, args.batch_size, progress=bar.update,
                config_dir=args.config_dir,
            )
        print(f"{spec.name}: {made} generated, {len(jobs[spec.name]) - made} reused")

    bars = []

    def progress(label, total):  # one stage at a time: close the previous bar first
        for bar in bars:
            bar.close()
        bars[:] = [tqdm(total=total, desc=label, unit="img")]
        return bars[0].update

    generated = {name: [(j.prompt_index, j.seed, j.path) for j in js] for name, js in jobs.items()}
    result = evaluate(
        generated, prompts, weights, args.ref, device=device, batch_size=args.metric_batch_size,
        cache_dir=out / "cache", kid_subsets=args.kid_subsets, progress=progress,
    )
    for bar in bars:
        bar.close()
    models = [s.name for s in specs]
    run_settings = {
        "sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "seeds": list(seeds),
        "prompts": len(prompts), "negative": args.negative, "size": _size_text(jobs),
    }
    written = write_report(out, result, models, {s.name: s.describe() for s in specs}, run_settings)
    written.append(write_grid(out, jobs, prompts, models, result, run_settings, args.grid_rows))
    print((out / "report.md").read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _size_text(jobs) -> str:
    from PIL import Image

    first = next(iter(jobs.values()))[0].path
    with Image.open(first) as image:
        return f"{image.width}x{image.height}"


def write_grid(out: Path, jobs, prompts, models, result, settings, max_rows: int) -> Path:
    """grid.png: the first `max_rows` (prompt, seed) rows, one column per model, per-image scores on each cell."""
    from PIL import Image

    from .grid import render_grid
    from .images import save_png
    from .report import PER_IMAGE
    from .scores import METRICS

    rows = [(j.prompt_index, j.seed) for j in jobs[models[0]]][: max(1, max_rows)]
    by_key = {name: {(j.prompt_index, j.seed): j.path for j in js} for name, js in jobs.items()}
    metrics = [m for m in PER_IMAGE if m in result.table.metrics()]
    cells, notes = [], []
    for key in rows:
        cells.append([Image.open(by_key[m][key]).convert("RGB") for m in models])
        notes.append([
            [f"{METRICS[x].tag} {METRICS[x].fmt.format(v)}" for x in metrics if (v := result.table.get(x, m).get(key)) is not None]
            for m in models
        ])
    title = f"{settings['sampler']} {settings['steps']} steps, CFG {settings['cfg']:g}, {settings['size']}"
    labels = [f"seed {s}\n{prompts[p]}" for p, s in rows]
    path = out / "grid.png"
    save_png(render_grid(cells, models, labels, title=title, notes=notes), path)
    return path
