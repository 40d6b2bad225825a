"""Textbook PCGrad / CAGrad with host syncs, and a float64 CAGrad solve: what `project_gradients` is tested against.

Kept apart from the device path so that nothing in training imports it by accident (every dot product here
is a `.item()`).
"""
from __future__ import annotations

import torch

from fastrank.ops.project_gradients import _check, draw_pcgrad_orders

__all__ = ["cagrad_objective", "project_gradients_reference"]


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
