"""CLIP embeddings through transformers (no torchvision, no open_clip).

CLIP score (Hessel et al. 2021, as torchmetrics reports it): 100 * max(cos(image,
text), 0) with the projected embeddings. The aesthetic predictor reads the same
image embeddings. Preprocessing is done in torch: short side to the model's
image size (bicubic, antialiased), centre crop, the processor's mean/std
(OpenAI's by default).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from .images import normalize, prepare_each, resize_center_crop
from .weights import WEIGHTS, WeightsNotFound

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def embedding_of(output) -> torch.Tensor:
    """`get_image_features` / `get_text_features` return a tensor in transformers
    4.x and an output object in 5.x (its `pooler_output` is then the projected
    embedding)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"cannot find an embedding in {type(output).__name__}")


class ClipEmbedder:
    def __init__(self, model, tokenizer, name: str = "clip", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self.mean, self.std = tuple(mean), tuple(std)
        self.description = (
            f"CLIP ({name}), projected embeddings; RGB [0,1] -> short side to {self.image_size} (bicubic, "
            f"antialiased, torch) -> centre crop -> CLIP mean/std; prompts truncated to {self.max_length} tokens"
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """L2-normalised [B, D] image embeddings (float32, CPU)."""
        batch = prepare_each(images, lambda x: resize_center_crop(x.float(), self.image_size))
        pixels = normalize(batch, self.mean, self.std).to(self.device)
        return F.normalize(embedding_of(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return F.normalize(embedding_of(self.model.get_text_features(**tokens)).float(), dim=-1).cpu()

    def clip_scores(self, image_embeddings: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per image: 100 * max(cos(image, its prompt), 0)."""
        text = self.text_embeddings(prompts)
        return 100 * (image_embeddings * text).sum(-1).clamp(min=0)


def load_clip(path: str | os.PathLike, device=None) -> ClipEmbedder:
    """A transformers CLIP model and tokenizer from a local folder or a hub id (read from
    the Hugging Face cache, or downloaded into it once when online)."""
    from transformers import AutoTokenizer, CLIPModel

    from .. import hub

    spec = WEIGHTS["clip"]
    try:
        source = hub.fetch(hub.locate(str(path), what=spec.what, example=spec.hub))
        model = CLIPModel.from_pretrained(source.load_name, **source.pretrained_kwargs())
        tokenizer = AutoTokenizer.from_pretrained(source.load_name, **source.pretrained_kwargs())
    except hub.ModelNotFound as err:
        raise WeightsNotFound(f"{err}. Get it with: {spec.get}") from None
    except (OSError, ValueError) as err:
        raise WeightsNotFound(f"{spec.what}: could not load {path} ({err}). Get it with: {spec.get}") from err
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    processor_config = source.path / "preprocessor_config.json"
    if processor_config.is_file():
        config = json.loads(processor_config.read_text())
        mean, std = config.get("image_mean", mean), config.get("image_std", std)
    return ClipEmbedder(model.to(device), tokenizer, name=hub.display_name(source.path), mean=mean, std=std)
