"""HPSv2 (Human Preference Score v2, Wu et al. 2023): an open_clip ViT-H/14
fine-tuned on human preferences; the score of an image for its prompt is the
cosine of the two normalised embeddings (reported x 100, as the ADT paper does).

open_clip needs torchvision, so it is an optional extra (`pip install
"adt-plugin[metrics]"`), imported only here and only when HPSv2 is asked for.
The architecture is built without pretrained weights (nothing is downloaded) and
the HPSv2 checkpoint fills all of it.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .images import tensor_to_pil
from .weights import WEIGHTS, WeightsNotFound, load_state_dict_file, weights_file


class HpsUnavailable(RuntimeError):
    """open_clip is not importable in this environment."""


def import_open_clip():
    try:
        import open_clip  # noqa: PLC0415 - optional, needs torchvision
    except Exception as err:  # noqa: BLE001 - a broken torchvision raises all kinds of errors
        raise HpsUnavailable(
            f"HPSv2 needs open_clip_torch (and a working torchvision): pip install 'adt-plugin[metrics]' "
            f"({err.__class__.__name__}: {err})"
        ) from err
    return open_clip


class HpsScorer:
    def __init__(self, model, preprocess, tokenizer, name: str, arch: str = "ViT-H-14"):
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.description = f"HPSv2 ({name}, open_clip {arch}), 100 x cos(image, prompt); open_clip's preprocessing for {arch}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def scores(self, images: Sequence[torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(tensor_to_pil(image)) for image in images]).to(self.device)
        text = self.tokenizer(list(prompts)).to(self.device)
        image_features = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        text_features = torch.nn.functional.normalize(self.model.encode_text(text).float(), dim=-1)
        return 100 * (image_features * text_features).sum(-1).cpu()


def load_hps(path: str | os.PathLike, device=None, arch: str = "ViT-H-14") -> HpsScorer:
    spec = WEIGHTS["hps"]
    path = weights_file(path, "hps")
    open_clip = import_open_clip()
    state = load_state_dict_file(path, what=spec.what, get=f"get it with: {spec.get}")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device="cpu")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise WeightsNotFound(f"{path} does not fit open_clip {arch}: {err}; get HPSv2 with: {spec.get}") from err
    return HpsScorer(model.to(device), preprocess, open_clip.get_tokenizer(arch), name=path.name, arch=arch)
