"""sd-scripts' own FLUX.1 trainer (flux_train_network.py) through adt_plugin.kohya.launch, on tiny models.

    python flux_sd_scripts.py build SD_SCRIPTS FOLDER [dev|schnell]   # tiny BFL-layout files + tokenizers
    python flux_sd_scripts.py run SD_SCRIPTS FOLDER -- <launcher arguments>

Run in sd-scripts' Python. What is real: sd-scripts @ 48d368fa's FluxNetworkTrainer and
NetworkTrainer.train (argument parsing, --config_file, dataset and bucketing, latent and
text-encoder-output caching, networks.lora_flux, accelerate, optimizer, saving,
--save_state / --resume), its loaders (flux_utils.load_flow_model / load_ae read the
files below: BFL key layout, dev / schnell told apart by the checkpoint's keys), its
tokenize / text-encoding strategies, its Flux and AutoEncoder classes.

What is made small: sd-scripts hard-codes FLUX.1's sizes (flux_models.configs: width
3072, 16-channel 8x AE) and builds CLIP-L and T5-XXL at full size (4.7B) inside
flux_utils.load_clip_l / load_t5xxl. `run` replaces `flux_models.configs[...]`'s
params with a 64-wide Flux (one double, one single block; the depth is read from
the checkpoint anyway) and a 32-wide AE, and the two text-encoder loaders with ones
that build a 32-wide CLIP text model and a one-layer T5 encoder from configs, then
load the given files with sd-scripts' own load_safetensors, as the originals do.
"""

from __future__ import annotations

import json
import string
import sys
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TEXT_WIDTH = 32


def tiny_params(flux_models, guidance_embed: bool):
    return flux_models.FluxParams(
        in_channels=64, vec_in_dim=TEXT_WIDTH, context_in_dim=TEXT_WIDTH, hidden_size=64, mlp_ratio=2.0, num_heads=2,
        depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10_000, qkv_bias=True, guidance_embed=guidance_embed,
    )


def tiny_ae_params(flux_models):
    return flux_models.AutoEncoderParams(resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 1, 1, 1],
                                         num_res_blocks=1, z_channels=16, scale_factor=0.3611, shift_factor=0.1159)


def clip_config():
    from transformers import CLIPTextConfig

    vocab = json.loads((FOLDER / "tok" / "openai_clip-vit-large-patch14" / "vocab.json").read_text())
    return CLIPTextConfig(vocab_size=len(vocab), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
                          bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)


def t5_config():
    from transformers import T5Config

    return T5Config(vocab_size=T5_VOCAB, d_model=TEXT_WIDTH, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


T5_PIECES = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
T5_PIECES += [(c, -3.0) for c in string.ascii_lowercase] + [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
T5_VOCAB = len(T5_PIECES)
FOLDER = Path(".")


def t5_tokenizer_fast():
    """A T5TokenizerFast from a hand-written unigram vocabulary (transformers 4.x: no
    sentencepiece model needed through the `tokenizers` backend)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    backend = Tokenizer(Unigram(T5_PIECES, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def build(sd_scripts: str, folder: Path, variant: str) -> None:
    sys.path.insert(0, sd_scripts)
    sys.path.insert(0, str(HERE))
    from library import flux_models
    from safetensors.torch import save_file
    from tiny_models import tiny_clip_tokenizer
    from transformers import CLIPTextModel, T5EncoderModel

    global FOLDER
    FOLDER = folder
    folder.mkdir(parents=True, exist_ok=True)
    tiny_clip_tokenizer(folder / "tok" / "openai_clip-vit-large-patch14")
    t5_tokenizer_fast().save_pretrained(str(folder / "tok" / "google_t5-v1_1-xxl"))
    torch.manual_seed(0)
    flux = flux_models.Flux(tiny_params(flux_models, guidance_embed=variant == "dev"))
    save_file({k: v.contiguous() for k, v in flux.state_dict().items()}, str(folder / f"flux1-{variant}.safetensors"))
    ae = flux_models.AutoEncoder(tiny_ae_params(flux_models))
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(folder / "ae.safetensors"))
    save_file(CLIPTextModel(clip_config()).state_dict(), str(folder / "clip_l.safetensors"))
    t5 = T5EncoderModel(t5_config())
    save_file({k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(folder / "t5xxl.safetensors"))


def shrink_sd_scripts(folder: Path) -> None:
    """sd-scripts' FLUX.1 / AE sizes and its two text-encoder builders, tiny (see the module docstring)."""
    from library import flux_models, flux_utils
    from library.safetensors_utils import load_safetensors
    from transformers import CLIPTextModel, T5EncoderModel

    global FOLDER
    FOLDER = folder
    for name, spec in flux_models.configs.items():
        spec.params = replace(tiny_params(flux_models, spec.params.guidance_embed))
        spec.ae_params = tiny_ae_params(flux_models)

    def load_clip_l(ckpt_path, dtype, device, disable_mmap=False, state_dict=None):
        clip = CLIPTextModel(clip_config())
        clip.load_state_dict(state_dict or load_safetensors(ckpt_path, device=str(device), disable_mmap=disable_mmap, dtype=dtype))
        return clip.to(dtype) if dtype is not None else clip

    def load_t5xxl(ckpt_path, dtype, device, disable_mmap=False, state_dict=None):
        t5 = T5EncoderModel(t5_config())
        t5.load_state_dict(state_dict or load_safetensors(ckpt_path, device=str(device), disable_mmap=disable_mmap, dtype=dtype),
                           strict=False)  # the shared embedding is saved once, as encoder.embed_tokens in sd-scripts' files
        return t5.to(dtype) if dtype is not None else t5

    flux_utils.load_clip_l = load_clip_l
    flux_utils.load_t5xxl = load_t5xxl
    print(f"flux_sd_scripts: sd-scripts' FLUX.1 / AE / CLIP-L / T5-XXL sizes made tiny ({folder})", flush=True)


def run(sd_scripts: str, folder: Path, argv: list[str]) -> int:
    sys.path.insert(0, sd_scripts)
    shrink_sd_scripts(folder)
    import adt_plugin
    from adt_plugin.kohya import launch

    print(f"flux_sd_scripts: adt_plugin from {Path(adt_plugin.__file__).parent}", flush=True)
    return launch.main(argv)


if __name__ == "__main__":
    command, sd_scripts_root, where = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if command == "build":
        build(sd_scripts_root, where, sys.argv[4] if len(sys.argv) > 4 else "dev")
    else:
        sys.exit(run(sd_scripts_root, where, sys.argv[sys.argv.index("--") + 1 :]))
