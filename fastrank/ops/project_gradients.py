r"""Gradient surgery across tasks (environments, paper §5.6): PCGrad and CAGrad on a (T, P) gradient buffer.

    project_gradients(grads, method="pcgrad"|"cagrad"|"sum"|"mean", *, generator=None, alpha=0.5,
                      backend="auto") -> (P,) tensor, dtype of ``grads`` (all arithmetic in fp32)

``grads[i]``: flattened gradient of task i; 1 <= T <= 16; fp32/bf16/fp16; unit stride along P, any row stride.
Every method returns ``w @ grads`` for weights w (T,) that depend on grads only through G = grads @ grads.T:
  1. ``gram_matrix``: one pass. Triton: each program streams a column range of *all* T rows and accumulates the
     T x T partial products in fp32; torch sums the partials. (torch backend: one BLAS matmul, fp32.)
  2. ``task_weights``: the T x T problem, on the device, no host sync: one single-program Triton launch.
  3. ``w @ grads``: one more pass (Triton kernel; torch backend: torch.mv, or fp32 chunks for bf16/fp16).
Traffic: 2 reads of T*P + 1 write of P. "sum" / "mean" skip 1-2 (one pass).
``backend="cuda"`` (the optional extension ``fastrank._cuda``, kernels/project_gradients.cu) runs passes 1 and 3 as
native CUDA kernels and step 2 with the torch solve; compiled, never run on a GPU yet, so ``auto`` does not pick it.

PCGrad -- Yu et al. 2020, Algorithm 1 as published: for each task i and each j != i in random order (a fresh
permutation per i: ``torch.randperm(T - 1, generator)`` for i = 0..T-1; a CPU generator, None = global RNG):
if g_i'.g_j < 0, g_i' -= (g_i'.g_j / ||g_j||^2) g_j, with g_i' the *current projected* g_i and g_j the
*original* g_j. Returns sum_i g_i' (sum convention: no conflict => == "sum"). A zero g_j has dot 0: skipped.
Not the released code: the official TF code also visits j == i and discards its ``tf.random.shuffle`` result
(fixed order); the common PyTorch port shuffles all T tasks including i and averages (mean convention).
Device form, exact: g_i' = sum_k C[i,k] g_k, C = I; g_i'.g_j = (C G)[i,j]; a projection is C[i,j] -=
min((CG)[i,j], 0) / G[j,j]; w = C.sum(0). All rows advance together, T-1 steps. The orders are host randomness
sent as a small index tensor (pinned, non_blocking on CUDA): no device->host sync.

CAGrad -- Liu et al. 2021, the paper's definition: g0 = mean_i g_i, phi = alpha^2 ||g0||^2, g_w = sum_i w_i g_i,
w* = argmin_{w in simplex} g_w.g0 + sqrt(phi) ||g_w||,  d = g0 + sqrt(phi) / ||g_w*|| g_w*  (mean convention:
alpha=0 => == "mean"). The official code's default ``rescale=1`` also divides d by 1 + alpha^2: not done here.
It solves for w with scipy SLSQP on the host (a sync); here, on the device, CAGRAD_ITERS = 128 steps of
projected gradient descent preconditioned by the gradient norms (u_i = w_i ||g_i|| / max_j ||g_j||, norms floored
at NORM_FLOOR = 1e-4 of the max: scale differences between tasks do not slow it down), exact sort-free O(T^2)
projection onto the weighted simplex, adaptive step (x1.25 after an accepted step, x0.5 and the step rejected if
the objective does not decrease: branch-free ``where``), ||g_w||^2 smoothed by 1e-12 max_i ||g_i||^2 (also in
1/||g_w||, so g_w = 0, i.e. 0 in the hull of the g_i, gives d = g0, not NaN). Fixed work, no tolerance stop.
Measured on random, conflicting, rank-deficient and badly scaled problems, T = 2..8: objective within ~1e-6 of
the optimum, relative to mean_i ||g_i||^2 (vs float64 Armijo solves stopped on a Frank-Wolfe duality gap, exact
KKT enumeration of supports, brute force at T=2).

Also here, for the code that imports them from this module: the (T, P) buffer, ``grads_to_params`` and the
DDP all-reduce (`fastrank.ops.task_grad_buffer`, which says how per-task gradients are collected and synced).
The textbook references the tests compare against are in `fastrank.ops.project_gradients_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastrank.ops._backend import cuda_ext, resolve_backend
from fastrank.ops.task_grad_buffer import TaskGradBuffer, all_reduce_task_grads, grads_to_params  # noqa: F401

__all__ = ["project_gradients", "gram_matrix", "task_weights", "TaskGradBuffer", "grads_to_params",
           "all_reduce_task_grads", "draw_pcgrad_orders"]

METHODS = ("pcgrad", "cagrad", "sum", "mean")
MAX_TASKS = 16
CAGRAD_ITERS = 128  # projected-gradient steps of the CAGrad simplex solve
GROW = 1.25  # step-size factor after an accepted step (x0.5 after a rejected one)
NORM_FLOOR = 1e-4  # preconditioner: gradient norms floored at this fraction of the largest
_EPS = 1e-12  # ||g_w||^2 smoothing, relative to max_i ||g_i||^2
_CHUNK = 1 << 22  # torch backend, non-fp32 input: columns upcast per chunk


@triton.jit
def _gram_kernel(g_ptr, part_ptr, T, P, stride_t, iters, BT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = tl.arange(0, BT)
    row_off = rows.to(tl.int64)[:, None] * stride_t
    start = pid.to(tl.int64) * iters * BLOCK
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    for it in range(iters):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        m = (rows[:, None] < T) & (offs[None, :] < P)
        x = tl.load(g_ptr + row_off + offs[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * x[None, :, :], axis=2)
    tm = (rows[:, None] < T) & (rows[None, :] < T)
    tl.store(part_ptr + pid * T * T + rows[:, None] * T + rows[None, :], acc, mask=tm)


@triton.jit
def _combine_kernel(g_ptr, w_ptr, out_ptr, T, P, stride_t, BT: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.arange(0, BT)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + rows, mask=rows < T, other=0.0)
    m = (rows[:, None] < T) & (offs[None, :] < P)
    x = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_t + offs[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, tl.sum(x * w[:, None], axis=0).to(out_ptr.dtype.element_ty), mask=offs < P)


@triton.jit
def _simplex_projection(v, a, aa, valid):
    # onto {u >= 0, a.u = 1}: u = max(v - tau a, 0), tau = max_k (sum_{S_k} a v - 1) / sum_{S_k} a^2 over the sets
    # S_k = {j: v_j/a_j >= v_k/a_k} (the sorted-prefix formula, without a sort); aa = a^2 (0 on padding)
    q = v / a
    ge = ((q[None, :] >= q[:, None]) & valid[None, :]).to(tl.float32)
    tau = (tl.sum(ge * (aa * q)[None, :], axis=1) - 1.0) / tl.maximum(tl.sum(ge * aa[None, :], axis=1), 1e-30)
    tau = tl.max(tl.where(valid, tau, -1e30), axis=0)
    return tl.where(valid, tl.maximum(v - tau * a, 0.0), 0.0)


@triton.jit
def _norm_terms(u, G, eps):
    Gu = tl.sum(G * u[None, :], axis=1)
    return Gu, tl.sqrt(tl.maximum(tl.sum(u * Gu), 0.0) + eps)


@triton.jit
def _solve_kernel(gram_ptr, order_ptr, w_ptr, T, alpha, iters, eps, METHOD: tl.constexpr, BT: tl.constexpr,
                  GROW: tl.constexpr, NORM_FLOOR: tl.constexpr):
    r = tl.arange(0, BT)
    valid = r < T
    G = tl.load(gram_ptr + r[:, None] * T + r[None, :], mask=valid[:, None] & valid[None, :], other=0.0)
    eye = r[:, None] == r[None, :]
    if METHOD == 0:  # PCGrad in the Gram basis
        C = (eye & valid[:, None]).to(tl.float32)
        for s in range(T - 1):
            j = tl.load(order_ptr + r * (T - 1) + s, mask=valid, other=-1)
            oh = (r[None, :] == j[:, None]).to(tl.float32)  # oh[i, m] = [m == j_i]
            Gj = tl.sum(oh[:, None, :] * G[None, :, :], axis=2)  # Gj[i, k] = G[k, j_i]
            dot = tl.sum(C * Gj, axis=1)  # g_i' . g_{j_i}
            gjj = tl.sum(oh * Gj, axis=1)  # ||g_{j_i}||^2
            coef = tl.where(gjj > 0, tl.minimum(dot, 0.0) / tl.where(gjj > 0, gjj, 1.0), 0.0)
            C -= coef[:, None] * oh
        w = tl.sum(C, axis=0)
    else:  # CAGrad: preconditioned projected gradient descent, adaptive step (see _solve_torch)
        Tf = T * 1.0
        n = tl.sqrt(tl.maximum(tl.sum(tl.where(eye, G, 0.0), axis=1), 0.0))
        m = tl.maximum(tl.max(n, axis=0), 1e-30)
        nu = tl.where(valid, tl.maximum(n, NORM_FLOOR * m) / m, 1.0)
        g0n = tl.sqrt(tl.maximum(tl.sum(tl.sum(G, axis=1)) / (Tf * Tf), 0.0))
        beta = tl.sum(G, axis=1) / (Tf * m * nu) / tl.maximum(g0n, 1e-30)
        G = G / (m * nu[:, None]) / (m * nu[None, :])
        a = 1.0 / nu
        aa = tl.where(valid, a * a, 0.0)
        u = tl.where(valid, nu / Tf, 0.0)
        Gu, nrm = _norm_terms(u, G, eps)  # G u and ||g_w|| (smoothed), carried with u
        f = tl.sum(beta * u) + alpha * nrm
        eta = f * 0.0 + 1.0
        for _ in range(iters):
            un = _simplex_projection(u - eta * (beta + alpha / nrm * Gu), a, aa, valid)
            Gun, nrmn = _norm_terms(un, G, eps)
            fn = tl.sum(beta * un) + alpha * nrmn
            ok = fn <= f
            u, Gu, nrm, f = tl.where(ok, un, u), tl.where(ok, Gun, Gu), tl.where(ok, nrmn, nrm), tl.where(ok, fn, f)
            eta = tl.where(ok, tl.minimum(eta * GROW, 1e6), eta * 0.5)
        w = tl.where(valid, 1.0 / Tf, 0.0) + alpha * g0n / m / nrm * u * a
    tl.store(w_ptr + r, w, mask=valid)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check(grads: torch.Tensor, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if grads.dim() != 2 or not 1 <= grads.shape[0] <= MAX_TASKS:
        raise ValueError(f"grads must be (T, P) with 1 <= T <= {MAX_TASKS}, got {tuple(grads.shape)}")
    if grads.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"grads must be float32, bfloat16 or float16, got {grads.dtype}")


def _unit_stride(grads: torch.Tensor) -> torch.Tensor:
    return grads if grads.stride(1) == 1 or grads.shape[1] <= 1 else grads.contiguous()


def gram_matrix(grads: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """(T, T) fp32 ``grads @ grads.T`` accumulated in fp32, in one pass over ``grads``."""
    _check(grads, "sum")
    grads = _unit_stride(grads)
    (T, P), dev = grads.shape, grads.device
    impl = resolve_backend(backend, dev)
    if impl == "cuda":
        return cuda_ext().gram_matrix(grads)
    if impl == "torch":
        if grads.dtype == torch.float32:
            return grads @ grads.T
        G = torch.zeros(T, T, dtype=torch.float32, device=dev)
        for c in range(0, P, _CHUNK):
            x = grads[:, c:c + _CHUNK].float()
            G.addmm_(x, x.T)
        return G
    BT = _pow2(T)
    if dev.type == "cuda":
        block, nprog = max(16, 4096 // (BT * BT)), 8 * torch.cuda.get_device_properties(dev).multi_processor_count
    else:  # interpreter: ~1 ms per program instance, numpy ops on big tiles are cheap
        block, nprog = 4096, 8
    iters = max(1, triton.cdiv(P, block * nprog))
    grid = max(1, triton.cdiv(P, block * iters))
    parts = torch.empty(grid, T, T, dtype=torch.float32, device=dev)
    _gram_kernel[(grid,)](grads, parts, T, P, grads.stride(0), iters, BT=BT, BLOCK=block)
    return parts.sum(0)


def draw_pcgrad_orders(num_tasks: int, generator: torch.Generator | None = None) -> list[list[int]]:
    """orders[i] = the other tasks j != i in the random order PCGrad projects g_i onto them (host RNG)."""
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("PCGrad orders are drawn on the host: pass a CPU torch.Generator")
    orders = []
    for i in range(num_tasks):
        others = [k for k in range(num_tasks) if k != i]
        orders.append([others[p] for p in torch.randperm(num_tasks - 1, generator=generator).tolist()])
    return orders


def _orders_tensor(orders: list[list[int]], device: torch.device) -> torch.Tensor:
    idx = torch.tensor([o or [0] for o in orders], dtype=torch.int32)  # T=1: a dummy column, never read
    if device.type == "cuda":  # pinned + non_blocking: a stream-ordered copy, no host sync
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


def _simplex_projection_torch(v: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    q = v / a
    ge = (q[None, :] >= q[:, None]).to(v.dtype)
    tau = ((ge * (a * v)[None, :]).sum(1) - 1) / (ge * (a * a)[None, :]).sum(1)
    return (v - tau.max() * a).clamp_min(0)


def _solve_torch(G: torch.Tensor, method: str, idx, alpha: float, iters: int) -> torch.Tensor:
    T, dev = G.shape[0], G.device
    ar = torch.arange(T, device=dev)
    if method == "pcgrad":
        C = torch.eye(T, dtype=G.dtype, device=dev)
        for s in range(T - 1):
            j = idx[:, s].long()
            Gj = G[:, j].T  # Gj[i, k] = G[k, j_i]
            dot, gjj = (C * Gj).sum(1), Gj[ar, j]
            C[ar, j] -= torch.where(gjj > 0, dot.clamp(max=0) / torch.where(gjj > 0, gjj, 1.0), 0.0)
        return C.sum(0)
    # Variables u_i = w_i nu_i, nu_i = max(||g_i||, NORM_FLOOR m) / m, m = max_j ||g_j||: g_w = m sum_i u_i h_i with
    # h_i = g_i / (m nu_i) of norm ~1, which makes the problem as well conditioned as the gradients' directions;
    # the simplex becomes {u >= 0, sum u_i / nu_i = 1}. Objective divided by m ||g0||: beta.u + alpha ||sum u h||.
    n = G.diagonal().clamp_min(0).sqrt()
    m = n.max().clamp_min(1e-30)
    nu = torch.maximum(n, NORM_FLOOR * m) / m
    g0n = G.mean().clamp_min(0).sqrt()
    beta = G.mean(1) / (m * nu) / g0n.clamp_min(1e-30)
    G = G / (m * nu[:, None]) / (m * nu[None, :])

    def norm_terms(u):  # G u and the smoothed ||sum u h||
        Gu = G @ u
        return Gu, ((u @ Gu).clamp_min(0) + _EPS).sqrt()

    a, u = 1 / nu, nu / T
    Gu, nrm = norm_terms(u)
    f, eta = beta @ u + alpha * nrm, torch.ones((), device=dev)
    for _ in range(iters):
        un = _simplex_projection_torch(u - eta * (beta + alpha / nrm * Gu), a)
        Gun, nrmn = norm_terms(un)
        fn = beta @ un + alpha * nrmn
        ok = fn <= f
        u, Gu, nrm = torch.where(ok, un, u), torch.where(ok, Gun, Gu), torch.where(ok, nrmn, nrm)
        f = torch.where(ok, fn, f)
        eta = torch.where(ok, (eta * GROW).clamp_max(1e6), eta * 0.5)
    return 1.0 / T + alpha * g0n / m / nrm * u * a


def task_weights(gram: torch.Tensor, method: str = "pcgrad", *, generator: torch.Generator | None = None,
                 alpha: float = 0.5, backend: str = "auto", iters: int = CAGRAD_ITERS) -> torch.Tensor:
    """(T,) fp32 weights w with ``project_gradients(grads, method) == w @ grads``, from the Gram matrix only.

    CAGrad: w = 1/T + sqrt(phi)/||g_w|| * w_simplex, so w_simplex = (w - 1/T) / (w.sum() - 1).
    """
    T, dev = gram.shape[0], gram.device
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("sum", "mean"):
        return torch.full((T,), 1.0 if method == "sum" else 1.0 / T, dtype=torch.float32, device=dev)
    gram = gram.float().contiguous()
    idx = None
    if method == "pcgrad":
        idx = _orders_tensor(draw_pcgrad_orders(T, generator), dev)
    if resolve_backend(backend, dev) in ("torch", "cuda"):  # the extension has no solve kernel: torch's runs
        return _solve_torch(gram, method, idx, float(alpha), iters)
    w = torch.empty(T, dtype=torch.float32, device=dev)
    _solve_kernel[(1,)](gram, idx if idx is not None else gram, w, T, float(alpha), iters, _EPS,
                        METHOD=0 if method == "pcgrad" else 1, BT=_pow2(T), GROW=GROW, NORM_FLOOR=NORM_FLOOR)
    return w


def _combine(grads: torch.Tensor, w: torch.Tensor, backend: str) -> torch.Tensor:
    (T, P), dev = grads.shape, grads.device
    if backend == "cuda":
        return cuda_ext().combine(grads, w.float().contiguous())
    if backend == "torch":
        if grads.dtype == torch.float32:
            return w @ grads
        out = torch.empty(P, dtype=grads.dtype, device=dev)
        for c in range(0, P, _CHUNK):
            out[c:c + _CHUNK] = w @ grads[:, c:c + _CHUNK].float()
        return out
    out = torch.empty(P, dtype=grads.dtype, device=dev)
    BT = _pow2(T)
    block = max(256, 4096 // BT) if dev.type == "cuda" else 1 << 14
    _combine_kernel[(max(1, triton.cdiv(P, block)),)](grads, w, out, T, P, grads.stride(0), BT=BT, BLOCK=block)
    return out


def project_gradients(grads: torch.Tensor, method: str = "pcgrad", *, generator: torch.Generator | None = None,
                      alpha: float = 0.5, backend: str = "auto") -> torch.Tensor:
    """Combine T per-task gradients (T, P) into one (P,) update; see the module docstring."""
    _check(grads, method)
    backend = resolve_backend(backend, grads.device)
    grads = _unit_stride(grads)
    if method in ("sum", "mean"):
        w = task_weights(grads.new_zeros(grads.shape[0], grads.shape[0]), method)
    else:
        w = task_weights(gram_matrix(grads, backend=backend), method, generator=generator, alpha=alpha,
                         backend=backend)
    return _combine(grads, w, backend)
