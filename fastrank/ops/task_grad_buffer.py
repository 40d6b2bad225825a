"""Where per-task gradients live and how they travel: the (T, P) buffer, writing the result back, DDP.

Views. ``TaskGradBuffer(params, T)`` owns one zeroed (T, P) buffer. ``with buf.task(i): loss_i.backward()`` sets
each ``p.grad`` to a *view* of its slice of row i, so autograd accumulates in place (no copy; rows accumulate
until ``buf.zero_()``), and restores the previous ``p.grad`` on exit. ``grads_to_params(out, params)`` sets
``p.grad`` to *views* of ``out`` (an in-place optimizer or ``zero_grad(set_to_none=False)`` then writes into
``out``); ``copy=True`` copies into the existing ``p.grad`` instead. A dtype mismatch always copies.

Multi-GPU / DDP. Projection is nonlinear: project(mean over ranks) != mean over ranks of project(.), and the Gram
matrix of averaged gradients is not the average of per-rank Gram matrices. So: per-task backwards WITHOUT DDP's
gradient sync (``model.no_sync()`` / ``accelerator.no_sync(model)``, or no DDP wrapper), then ONE
``all_reduce_task_grads(buf)`` of the whole (T, P) buffer (SUM, then / world size: T times DDP's usual bytes),
then ``project_gradients`` on every rank with an identically seeded generator: identical orders and results, no
further communication. Tested: 2 gloo processes == 1 process on the concatenated data.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["TaskGradBuffer", "all_reduce_task_grads", "grads_to_params"]


class TaskGradBuffer:
    """One (T, P) buffer for T per-task gradients of ``params``; ``with buf.task(i): loss_i.backward()``."""

    def __init__(self, params, num_tasks: int, *, dtype: torch.dtype | None = None):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no parameter requires grad")
        dtype = dtype or self.params[0].dtype
        if any(p.dtype != dtype or p.device != self.params[0].device for p in self.params):
            raise ValueError("all params must share the buffer's dtype and device (p.grad must match p)")
        self.buffer = torch.zeros(num_tasks, sum(p.numel() for p in self.params), dtype=dtype,
                                  device=self.params[0].device)
        self._views = [_split(self.buffer[i], self.params) for i in range(num_tasks)]

    def __getitem__(self, i):
        return self.buffer[i]

    def zero_(self) -> "TaskGradBuffer":
        self.buffer.zero_()
        return self

    @contextlib.contextmanager
    def task(self, i: int):
        """p.grad = view of row i for the block (autograd accumulates in place); previous p.grad restored after."""
        saved = [p.grad for p in self.params]
        for p, v in zip(self.params, self._views[i]):
            p.grad = v
        try:
            yield self.buffer[i]
        finally:
            for p, s in zip(self.params, saved):
                p.grad = s


def _split(flat: torch.Tensor, params) -> list[torch.Tensor]:
    n = sum(p.numel() for p in params)
    if flat.dim() != 1 or flat.numel() != n:
        raise ValueError(f"expected a flat gradient of {n} elements (the params), got {tuple(flat.shape)}")
    out, off = [], 0
    for p in params:
        out.append(flat[off:off + p.numel()].view_as(p))
        off += p.numel()
    return out


def grads_to_params(combined: torch.Tensor, params, *, copy: bool = False) -> None:
    """Write the (P,) combined gradient into ``p.grad`` (views of ``combined``; ``copy=True``: ``copy_``)."""
    params = [p for p in params if p.requires_grad]
    for p, v in zip(params, _split(combined, params)):
        if copy and p.grad is not None:
            p.grad.copy_(v)
        else:
            p.grad = v.to(p.dtype).clone() if copy or v.dtype != p.dtype else v


def all_reduce_task_grads(buf) -> torch.Tensor:
    """Average the (T, P) per-task gradients over ranks in place (SUM + divide); no-op without a process group."""
    t = buf.buffer if isinstance(buf, TaskGradBuffer) else buf
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
            t.div_(world)
    return t
