"""adt_plugin.distributed: no-ops in one process, the right collectives in two (gloo)."""

import json
import sys

import pytest
import torch

from adt_plugin import distributed


def test_one_process_needs_no_process_group():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.average_gradients([p])
    distributed.broadcast_from_rank0([p.data])
    distributed.check_in_sync([p.data])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert distributed.all_true(True) is True and distributed.all_true(False) is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_distributed()) == (0, 1, False)


WORKER = r"""
import json, sys, torch, torch.distributed as dist
from adt_plugin import distributed
rank, init = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
distributed.BUCKET_BYTES = 16  # several buckets, and a dtype change inside the list
out = {}
a = torch.full((3,), float(rank + 1))
b = torch.full((2, 2), 10.0 * (rank + 1), dtype=torch.float64)
c = torch.full((5,), 100.0 * (rank + 1))
distributed.average_([a, b, c])
out["average"] = [a.tolist(), b.flatten().tolist(), c.tolist()]
p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
p.grad = torch.full((2,), 4.0 * rank)
if rank == 0:
    q.grad = torch.full((2,), 6.0)  # rank 1 has none: it joins the sum with zeros
distributed.average_gradients([p, q])
out["grads"] = [p.grad.tolist(), q.grad.tolist()]
bn = torch.nn.BatchNorm1d(2)
bn.running_mean.fill_(float(rank))
distributed.average_batch_norm_stats(bn)
out["bn"] = bn.running_mean.tolist()
w = torch.full((2,), float(rank))
distributed.broadcast_from_rank0([w])
out["broadcast"] = w.tolist()
out["all_true"] = [distributed.all_true(True), distributed.all_true(rank == 0)]
distributed.check_in_sync([w])
try:
    distributed.check_in_sync([torch.full((1,), float(rank))])
    out["diverged"] = None
except RuntimeError as err:
    out["diverged"] = str(err)
print(json.dumps(out))
dist.destroy_process_group()
"""


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="no gloo")
def test_two_processes_average_broadcast_and_agree(tmp_path):
    import subprocess

    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(r), init], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    for out in results:
        assert out["average"] == [[1.5] * 3, [15.0] * 4, [150.0] * 5]
        assert out["grads"] == [[2.0, 2.0], [3.0, 3.0]]
        assert out["bn"] == [0.5, 0.5]
        assert out["broadcast"] == [0.0, 0.0]
        assert out["all_true"] == [True, False]
        assert "processes diverged" in out["diverged"]


NONFINITE_WORKER = r"""
import datetime, json, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from tiny import DDPM_CONFIG, tiny_dinov2
from adt_plugin import AdtSettings, build_strategy
rank, init = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=20))
settings = AdtSettings(taps=(1, 3), head_channels=8, d_lr=1e-3, d_warmup_steps=0, seed=0)
strategy = build_strategy(settings, DDPM_CONFIG, backbone=tiny_dinov2())
images = torch.rand(2, 3, 16, 16)
real, target, fake, _ = strategy._features(type("M", (), {"count_discriminator": lambda self, n: None})(),
                                             images, images.flip(0), {"labels": torch.arange(2)}, None, False)
if rank == 1:  # this process's discriminator loss is not finite, the other's is
    fake = [torch.full_like(f, float("nan")) for f in fake]
before = [p.detach().clone() for p in strategy.disc.trainable_parameters()]
logs = strategy._discriminator_step(real, target, fake)
moved = any(not torch.equal(a, p) for a, p in zip(before, strategy.disc.trainable_parameters()))
dist.barrier()  # a process left waiting in the step's all-reduce never gets here
print(json.dumps({"skipped": strategy.skipped_d_steps, "moved": moved}))
dist.destroy_process_group()
"""


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()), reason="no gloo")
def test_a_non_finite_discriminator_loss_on_one_process_skips_the_step_on_every_process(tmp_path):
    """One process's NaN discriminator loss must not leave the others waiting in the
    gradient all-reduce: every process skips that step, and the weights stay identical."""
    import subprocess
    from pathlib import Path

    init = f"file://{tmp_path / 'rendezvous'}"
    here = str(Path(__file__).parent)
    procs = [
        subprocess.Popen([sys.executable, "-c", NONFINITE_WORKER, str(r), init, here],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=240)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert results == [{"skipped": 1, "moved": False}] * 2
