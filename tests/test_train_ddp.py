"""kdfast.train.fit under torchrun-style DDP: two CPU processes (gloo) train as one process on the global batch.

The ranks join through torchrun's environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), each
reads its half of every global batch; the logged losses (averaged over the ranks) and the final weights must equal
those of a single process on the whole batches, and the checkpoint holds every rank's RNG state.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from kdfast.train import TrainConfig, checkpoint, data, fit

WORLD_SIZE, STEPS = 2, 6


class _Task(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 4))
        # A parameter no loss reaches, as the initial slots of an implicitly differentiated slot attention (the
        # slotmatch models): DDP must not stop at it.
        self.unreached = nn.Parameter(torch.zeros(3))

    def forward(self, batch):
        return {"loss": F.cross_entropy(self.net(batch["x"]), batch["y"])}


def _setup():
    torch.manual_seed(7)
    task = _Task().double()
    g = torch.Generator().manual_seed(3)
    dataset = data.TensorDataset(x=torch.randn(30, 5, generator=g, dtype=torch.float64), y=torch.randint(0, 4, (30,), generator=g))
    config = TrainConfig(steps=STEPS, lr=5e-2, warmup_steps=2, grad_clip=1.0, device="cpu", log_every=2, progress=False)
    return task, data.Batches(dataset, batch_size=6, seed=0), config


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    task, batches, config = _setup()
    result = fit(task, batches, config, os.path.join(out_dir, "run"))
    torch.save({"losses": result.losses, "world": result.world, "state": task.state_dict()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()
    # No teardown: destroying the gloo process group can deadlock on the GIL with its worker threads in this
    # torch (see test_gini_kl_ddp.py). The results are on disk; leave at once.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_train_like_one_process_on_the_global_batch(tmp_path):
    context = mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1.0):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} DDP ranks did not finish within 120 s")

    task, batches, config = _setup()
    single = fit(task, batches, config, None)
    for rank in range(WORLD_SIZE):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["world"] == WORLD_SIZE
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single.losses), rtol=1e-12, atol=1e-14)
        for name, value in task.state_dict().items():
            torch.testing.assert_close(got["state"][name], value, rtol=1e-10, atol=1e-13, msg=name)
    saved = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert saved["step"] == STEPS and saved["world"] == WORLD_SIZE
    assert isinstance(saved["rng"], list) and len(saved["rng"]) == WORLD_SIZE
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == STEPS  # the main rank logs
