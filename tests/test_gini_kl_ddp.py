"""GiniKLLoss(sync_ddp=True) under DistributedDataParallel: two CPU processes (gloo) train as one on the global batch.

Each rank gets a different share of a batch (5 and 7 samples); the loss is the Gini/KL loss of two layers' outputs,
one caught by a forward hook. Every rank's loss must equal the single-process loss on the concatenated batch, and
every rank's parameter gradients after DDP's averaging must equal the single-process gradients.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdfast.nn.gini_kl import GiniKLLoss

WORLD_SIZE = 2
SPLITS = (0, 5, 12)  # rank r takes samples SPLITS[r]:SPLITS[r + 1]
CLASSES = 6


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
        self.block2 = torch.nn.Conv2d(8, 12, 3, padding=1, stride=2)

    def forward(self, x):
        return self.block2(self.block1(x))


def _setup():
    """The model (the same initialisation everywhere), the data, the two criteria and the hooked features."""
    torch.manual_seed(1234)
    net = _Net().double()
    images = torch.randn(SPLITS[-1], 3, 6, 6, dtype=torch.float64)
    labels = torch.tensor([0, 3, 3, 1, 0, 3, 5, 1, 0, 0, 3, 1])  # classes 2 and 4 absent; class 5 on rank 0 only
    features = {}
    net.block1.register_forward_hook(lambda module, args, output: features.update(block1=output))
    return net, images, labels, features


def _loss(model, criteria, images, labels, features):
    out = model(images)
    return criteria[0](features["block1"], labels) + criteria[1](out, labels)


def _worker(rank: int, init_file: str, out_dir: str, backend: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.set_num_threads(1)
    net, images, labels, features = _setup()
    model = torch.nn.parallel.DistributedDataParallel(net)
    criteria = [
        GiniKLLoss(CLASSES, sync_ddp=True, backend=backend),
        GiniKLLoss(CLASSES, 0.2, 0.9, "uniform", sync_ddp=True, backend=backend),
    ]
    lo, hi = SPLITS[rank], SPLITS[rank + 1]
    loss = _loss(model, criteria, images[lo:hi], labels[lo:hi], features)
    loss.backward()
    result = {"loss": loss.detach(), "terms": [(c.gini, c.kl) for c in criteria], "grads": [p.grad for p in net.parameters()]}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    # No teardown: destroying the gloo process group (here, through DDP's reducer) can deadlock on the GIL with its
    # worker threads in this torch. The results are on disk; leave at once. (An exception above propagates to
    # mp.spawn as usual.)
    os._exit(0)


def _run_workers(tmp_path, backend: str, limit_s: float = 120.0) -> None:
    """Both ranks, within limit_s: a hung collective fails the test instead of hanging the suite."""
    context = mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), backend), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=1.0):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} DDP ranks did not finish within {limit_s:.0f} s")


def test_ddp_loss_and_gradients_equal_the_global_batch(tmp_path):
    backend = "auto"  # cpp where the extension is built, else the reference
    _run_workers(tmp_path, backend)

    net, images, labels, features = _setup()
    criteria = [GiniKLLoss(CLASSES, backend=backend), GiniKLLoss(CLASSES, 0.2, 0.9, "uniform", backend=backend)]
    loss = _loss(net, criteria, images, labels, features)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    for rank in range(WORLD_SIZE):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-12, atol=1e-14, msg=f"rank {rank} loss")
        for (gini, kl), criterion in zip(result["terms"], criteria):
            torch.testing.assert_close((gini, kl), (criterion.gini, criterion.kl), rtol=1e-12, atol=1e-14)
        for got, want in zip(result["grads"], grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=f"rank {rank} gradients")


def test_sync_without_a_process_group_is_the_local_loss():
    a, labels = torch.randn(6, 5, 2, 2), torch.tensor([0, 1, 1, 2, 2, 2])
    assert not (dist.is_available() and dist.is_initialized())
    synced = GiniKLLoss(3, sync_ddp=True)(a, labels)
    torch.testing.assert_close(synced, GiniKLLoss(3)(a, labels))


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
