"""Several processes (`accelerate launch`, torchrun): the few collective operations we need.

The denoiser is not wrapped in DDP (ADT calls it several times, some without a
graph, before one backward, and skips backward on discriminator-only
iterations), so gradients are averaged explicitly after backward; the
discriminator lives inside the strategy and is averaged the same way. Everything
here is a thin layer over `torch.distributed` and a no-op in a single process, so
callers never branch on the world size.

Sums followed by a division rather than `ReduceOp.AVG`: gloo (the CPU backend)
has no AVG.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist

#: gradients are all-reduced in flat buckets of about this many bytes (DDP's default is 25 MiB)
BUCKET_BYTES = 32 * 2**20


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_from_rank0(tensors: Iterable[torch.Tensor]) -> None:
    """Every process takes rank 0's values, in place."""
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def average_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its mean over processes, in place, in flat buckets."""
    if not is_distributed() or not tensors:
        return
    world = dist.get_world_size()
    bucket: list[torch.Tensor] = []
    size = 0
    for i, tensor in enumerate(tensors):
        bucket.append(tensor)
        size += tensor.numel() * tensor.element_size()
        last = i == len(tensors) - 1
        if size >= BUCKET_BYTES or last or tensors[i + 1].dtype != tensor.dtype:  # one dtype per bucket
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
            for t, synced in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(synced.view_as(t))
            bucket, size = [], 0


def average_gradients(params: Iterable[torch.Tensor], zero_fill: bool = True) -> None:
    """Average `.grad` over processes (what DDP does after backward). With
    `zero_fill`, a parameter without a gradient on this process joins the sum with
    zeros, so that every process takes part in the same collectives; without it,
    parameters without a gradient are left out (every process must then have
    gradients for the same parameters)."""
    if not is_distributed():
        return
    params = list(params)
    if zero_fill:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    average_([p.grad for p in params if p.grad is not None])


def average_batch_norm_stats(module: torch.nn.Module, skip_prefix: str = "backbone.") -> None:
    """Average batch-norm running statistics over processes (each process's forward
    moved them with its own batch). Only those: other buffers are constants. Done
    through `.data`: a live autograd graph may hold these buffers (batch norm's
    backward takes them as inputs), and `.data` leaves autograd's version counter alone."""
    if not is_distributed():
        return
    stats = [
        buf.data
        for name, buf in module.named_buffers()
        if name.endswith(("running_mean", "running_var")) and not name.startswith(skip_prefix)
    ]
    average_(stats)


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every process iff `flag` is true on every process."""
    if not is_distributed():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.5)


def check_in_sync(tensors: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> None:
    """Raise if the processes hold different values (compared by a float64 checksum)."""
    if not is_distributed():
        return
    local = torch.tensor([float(sum(t.double().sum() for t in tensors))], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    values = [float(g) for g in gathered]
    if max(values) != min(values):
        raise RuntimeError(f"processes diverged: weight checksums {values}")


__all__ = [
    "BUCKET_BYTES",
    "all_true",
    "average_",
    "average_batch_norm_stats",
    "average_gradients",
    "broadcast_from_rank0",
    "check_in_sync",
    "is_distributed",
    "rank",
    "world_size",
]
