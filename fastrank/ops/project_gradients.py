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
import triton
import triton.language as tl

from fastrank.ops._backend import cuda_ext, resolve_backend

__all__ = ["project_gradients", "project_gradients_reference", "gram_matrix", "task_weights", "TaskGradBuffer",
           "grads_to_params", "all_reduce_task_grads", "draw_pcgrad_orders", "cagrad_objective"]

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


def cagrad_objective(w: torch.Tensor, gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """g_w.g0 + alpha ||g0|| ||g_w|| for simplex weights w, from the Gram matrix (computed in float64)."""
    G, w = gram.double(), w.double()
    return w @ G.mean(1) + alpha * G.mean().clamp_min(0).sqrt() * (w @ G @ w).clamp_min(0).sqrt()


def _cagrad_simplex_reference(G: torch.Tensor, alpha: float, gap_tol: float = 1e-10, max_iter: int = 5_000):
    """Float64 projected gradient with Armijo backtracking (host syncs), stopped on the Frank-Wolfe gap."""
    G = G.double().cpu()
    T, s = G.shape[0], float(G.diagonal().mean().clamp_min(1e-300))
    G = G / s
    b, c = G.mean(1), alpha * float(G.mean().clamp_min(0).sqrt())

    def value(w):
        return float(b @ w + c * (w @ G @ w).clamp_min(0).sqrt())

    def proj(v):  # textbook sort-based projection onto the simplex
        u = v.sort(descending=True).values
        css = u.cumsum(0) - 1
        k = int((u - css / torch.arange(1, T + 1, dtype=v.dtype) > 0).nonzero().max())
        return (v - css[k] / (k + 1)).clamp_min(0)

    w, step = torch.full((T,), 1.0 / T, dtype=torch.float64), 1.0
    for _ in range(max_iter):
        r = float((w @ G @ w).clamp_min(0).sqrt())
        grad = b + (c * (G @ w) / r if r > 1e-150 else 0.0)
        if float(grad @ w - grad.min()) <= gap_tol:  # f(w) - min f <= this gap (convexity)
            break
        f, step = value(w), step * 2
        while step > 1e-20:
            wn = proj(w - step * grad)
            if value(wn) <= f + 1e-4 * float(grad @ (wn - w)):
                break
            step /= 2
        else:  # no decrease measurable in float64 any more (the gap is linear, f quadratic near w*)
            break
        w = wn
    return w


def project_gradients_reference(grads: torch.Tensor, method: str = "pcgrad", *,
                                generator: torch.Generator | None = None, alpha: float = 0.5,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Textbook versions on the vectors with host syncs (``.item()`` per dot product), computed in ``dtype``.

    Same ``generator`` seed => same PCGrad orders as ``project_gradients``. CAGrad: float64 simplex solve (Armijo
    projected gradient to a 1e-10 duality gap or until float64 sees no decrease), then d on the vectors.
    """
    _check(grads, method)
    g, T = grads.to(dtype), grads.shape[0]
    if method == "sum":
        return g.sum(0).to(grads.dtype)
    if method == "mean":
        return g.mean(0).to(grads.dtype)
    if method == "pcgrad":
        orders = draw_pcgrad_orders(T, generator)
        out = torch.zeros_like(g[0])
        for i in range(T):
            gi = g[i].clone()
            for j in orders[i]:
                dot = torch.dot(gi, g[j]).item()
                if dot < 0:
                    gi -= dot / torch.dot(g[j], g[j]).item() * g[j]
            out += gi
        return out.to(grads.dtype)
    G = (g @ g.T).double()
    w = _cagrad_simplex_reference(G, alpha).to(dtype).to(g.device)
    g0, gw = g.mean(0), w @ g
    gw_norm = gw.norm().item()
    d = g0 + (alpha * g0.norm().item() / gw_norm * gw if gw_norm > 0 else 0.0)
    return d.to(grads.dtype)


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
