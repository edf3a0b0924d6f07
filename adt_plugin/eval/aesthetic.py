"""LAION aesthetic predictor v2 ("improved aesthetic predictor"): a linear MLP
head on L2-normalised CLIP ViT-L/14 image embeddings, trained on SAC + LOGOS +
AVA ratings (1-10). The published head has no non-linearities; its dropouts
are inactive at inference. Parameter names follow the published file
(`layers.0 ... layers.7`) so it loads as it is.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .weights import WEIGHTS, WeightsNotFound, load_state_dict_file, weights_file


class AestheticHead(nn.Module):
    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.embed_dim = embed_dim
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, normalized_embeddings: torch.Tensor) -> torch.Tensor:
        """[B, D] L2-normalised CLIP image embeddings -> [B] scores."""
        if normalized_embeddings.shape[-1] != self.embed_dim:
            raise ValueError(
                f"the aesthetic head takes {self.embed_dim}-d CLIP embeddings (ViT-L/14), got "
                f"{normalized_embeddings.shape[-1]}-d: use the clip-vit-large-patch14 model with it"
            )
        return self.layers(normalized_embeddings.float()).squeeze(-1)


def load_aesthetic_head(path: str | os.PathLike) -> AestheticHead:
    spec = WEIGHTS["aesthetic"]
    path = weights_file(path, "aesthetic")
    state = load_state_dict_file(path, what=spec.what, get=f"get it with: {spec.get}")
    first = state.get("layers.0.weight")
    if first is None or first.ndim != 2:
        raise WeightsNotFound(f"{path} is not the aesthetic predictor head (no layers.0.weight); get it with: {spec.get}")
    head = AestheticHead(embed_dim=first.shape[1])
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise WeightsNotFound(f"{path} does not fit the aesthetic predictor head: {err}; get it with: {spec.get}") from err
    return head
