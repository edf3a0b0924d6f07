"""Tiny, seeded models built from configs for the tests (no downloads)."""

from __future__ import annotations

import torch
from torch import nn

from adt_plugin.selfcheck import DDPM_EPS as DDPM_CONFIG  # SD1.5's scheduler config
from adt_plugin.selfcheck import FLOW as FLOW_CONFIG  # SD3's


class TinyDenoiser(nn.Module):
    """A conditional conv denoiser: enough structure for gradients to mean something."""

    def __init__(self, channels: int = 4, num_classes: int = 3, width: int = 16):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.emb = nn.Embedding(num_classes + 1, width)  # last index = unconditional
        self.time = nn.Linear(1, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)
        self.num_classes = num_classes

    def forward(self, x, t, labels):
        h = self.inp(x) + self.emb(labels)[:, :, None, None] + self.time(t.float()[:, None] / 1000)[:, :, None, None]
        return self.out(torch.tanh(h))


class TinyAdapter:
    """ModelAdapter over TinyDenoiser; counts denoiser calls that carry a graph."""

    def __init__(self, net: TinyDenoiser, scheduler_config=DDPM_CONFIG):
        self.net = net
        self.scheduler_config = scheduler_config
        self.calls = 0
        self.graph_calls = 0

    def denoise(self, sample, timestep, cond):
        self.calls += 1
        out = self.net(sample, timestep, cond["labels"])
        self.graph_calls += int(out.requires_grad)
        return out

    def uncond(self, cond):
        return {"labels": torch.full_like(cond["labels"], self.net.num_classes)}

    def decode(self, latents):
        return latents[:, :3]


def tiny_dinov2(taps=(1, 3), input_size: int = 16, seed: int = 0):
    """A random 4-block DINOv2 through transformers, tapped like the real one."""
    from transformers import Dinov2Config, Dinov2Model

    from adt_plugin.backbones import Dinov2Backbone

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=input_size
    )
    return Dinov2Backbone(Dinov2Model(config), taps=taps, input_size=input_size, identity="tiny-dinov2")


class SavedTensorCounter:
    """Counts tensors saved for backward (i.e. graph allocated) inside a block."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        def pack(t):
            self.count += 1
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


class GraphAuditAdapter(TinyAdapter):
    """TinyAdapter that counts graph allocations inside denoiser and decoder calls."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved = 0

    def denoise(self, sample, timestep, cond):
        with SavedTensorCounter() as counter:
            out = super().denoise(sample, timestep, cond)
        self.saved += counter.count
        return out

    def decode(self, latents):
        with SavedTensorCounter() as counter:
            out = torch.tanh(latents[:, :3] * 1.5)
        self.saved += counter.count
        return out
