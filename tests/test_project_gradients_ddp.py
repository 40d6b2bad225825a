"""Data-parallel gradient surgery: 2 CPU processes over gloo == 1 process on the concatenated data.

Protocol under test (module docstrings of fastrank.ops.project_gradients and .task_grad_buffer): per-task backward into a TaskGradBuffer
without gradient sync, ONE all-reduce (average) of the (T, P) buffer, then project_gradients on every rank with
an identically seeded generator. Projecting per rank and averaging the results is NOT equivalent (nonlinear).
"""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastrank.ops import TaskGradBuffer, project_gradients
from fastrank.ops.task_grad_buffer import all_reduce_task_grads

T, N, WORLD, SEED = 4, 32, 2, 1234
METHODS = ("pcgrad", "cagrad", "mean")


def _setup():
    """Model and per-task data, identical in every process. Task targets pull the model in conflicting ways."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, generator=g)
    data = []
    for i in range(T):
        x = torch.randn(N, 6, generator=g)
        y = (x @ w) * (1.0 if i % 2 else -0.5) + 0.3 * torch.randn(N, generator=g)
        data.append((x, y[:, None]))
    return model, data


def _task_grads(model, data, shard=None):
    buf = TaskGradBuffer(model.parameters(), T)
    for i, (x, y) in enumerate(data):
        if shard is not None:
            x, y = x[shard::WORLD], y[shard::WORLD]  # equal shards: mean of shard means == full mean
        with buf.task(i):
            torch.nn.functional.mse_loss(model(x), y).backward()
    return buf


def _project_all(buf):
    return {m: project_gradients(buf.buffer, m, generator=torch.Generator().manual_seed(SEED)) for m in METHODS}


def _worker(rank, init_method, out_dir):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        model, data = _setup()
        buf = _task_grads(model, data, shard=rank)
        local = _project_all(buf)  # the wrong protocol, for the negative control
        all_reduce_task_grads(buf)
        out = {"buffer": buf.buffer.clone(), "local": local, **_project_all(buf)}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_projection_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model, data = _setup()
    single = _task_grads(model, data)
    expected = _project_all(single)

    torch.testing.assert_close(ranks[0]["buffer"], single.buffer, rtol=1e-5, atol=1e-6)
    for m in METHODS:
        # every rank computes bit-identical results from the identical all-reduced buffer and seed
        assert torch.equal(ranks[0][m], ranks[1][m]), m
        torch.testing.assert_close(ranks[0][m], expected[m], rtol=1e-4, atol=1e-5)
    # negative control: projecting the per-rank gradients, then averaging, gives a different update
    for m in ("pcgrad", "cagrad"):
        wrong = (ranks[0]["local"][m] + ranks[1]["local"][m]) / WORLD
        assert float((wrong - expected[m]).abs().max()) > 1e-3 * float(expected[m].abs().max()), m
    # while for the linear "mean" both protocols agree
    torch.testing.assert_close((ranks[0]["local"]["mean"] + ranks[1]["local"]["mean"]) / WORLD, expected["mean"])
