"""Several processes (`accelerate launch`, torchrun): the few collective operations we need.

The denoiser is not wrapped in DDP (ADT calls it several times, some without a
graph, before one backward, and skips backward on discriminator-only
iterations), so gradients are averaged explicitly after backward. Everything here
is a thin layer over `torch.distributed` and a no-op in a single process, so
callers never branch on the world size.

(Moved here from `adt train`'s loop; the strategy contract's branch gathers the
strategies' helpers in this module too, with the same signatures.)
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

#: gradients are all-reduced in flat buckets of about this many bytes (DDP's default is 25 MiB)
BUCKET_BYTES = 32 * 2**20


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_from_rank0(tensors: Iterable[torch.Tensor]) -> None:
    """Every process takes rank 0's values, in place."""
    if is_distributed():
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average `.grad` over processes (what DDP does after backward). A parameter
    without a gradient on this process joins the sum with zeros, so that every
    process takes part in the same collectives."""
    if not is_distributed():
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    params = list(params)
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    bucket, size = [], 0
    for i, grad in enumerate(grads):
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
        if size >= BUCKET_BYTES or i == len(grads) - 1:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat.div_(world)
            for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(synced)
            bucket, size = [], 0


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


__all__ = ["BUCKET_BYTES", "all_true", "average_gradients", "broadcast_from_rank0", "check_in_sync", "is_distributed"]
