"""Detect a diverging run from its logged loss history (issue #5: reported, not silently kept)."""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence


# ------------------------------------------------------------------------------------ divergence
def detect_divergence(steps: Sequence[int], losses: Sequence[float], steps_per_epoch: int, *, tol: float = 0.1
                      ) -> dict:
    """Is the training loss rising? ``{"diverged", "reasons", "epoch_loss"}`` from a logged loss history.

    Flags (any): a non-finite loss; an epoch whose mean loss exceeds the previous epoch's by more than ``tol``
    (relative; the paper's collapsed seed 123 went 0.927 -> 1.251 -> 1.196); or, within the last epoch's span
    of the history, the mean loss of its last quarter above the mean of its first quarter by more than ``tol``
    (quarters of at least 5 logged points; needs 20 points or more) -- this one also covers single-epoch runs.
    Both rises must also exceed noise: 2 standard errors of the difference of the two means, with the per-point
    noise estimated from successive differences of the logged losses (robust to the trend). The logged losses
    are single-batch losses, so with few points per epoch a 10 % rise is often just batch-to-batch variation.
    """
    steps, losses = list(steps), [float(x) for x in losses]
    reasons: list[str] = []
    bad = [s for s, x in zip(steps, losses) if not math.isfinite(x)]
    if bad:
        reasons.append(f"non-finite loss at step {bad[0]}")
    spe = max(1, int(steps_per_epoch))
    by_epoch: dict[int, list[float]] = {}
    for s, x in zip(steps, losses):
        if math.isfinite(x):
            by_epoch.setdefault((int(s) - 1) // spe, []).append(x)
    epochs = sorted(by_epoch)
    epoch_loss = [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]
    finite = [x for x in losses if math.isfinite(x)]
    diffs = [b - a for a, b in zip(finite, finite[1:])]
    sigma = math.sqrt(sum(d * d for d in diffs) / (2 * len(diffs))) if diffs else 0.0  # per-point noise

    def beyond_noise(rise: float, n_a: int, n_b: int) -> bool:
        return rise > 2.0 * sigma * math.sqrt(1 / n_a + 1 / n_b)

    for k in range(1, len(epochs)):
        if epoch_loss[k] > epoch_loss[k - 1] * (1 + tol) and beyond_noise(
                epoch_loss[k] - epoch_loss[k - 1], len(by_epoch[epochs[k - 1]]), len(by_epoch[epochs[k]])):
            reasons.append(f"epoch {epochs[k] + 1} mean loss {epoch_loss[k]:.4f} > epoch {epochs[k - 1] + 1} "
                           f"{epoch_loss[k - 1]:.4f} (+{epoch_loss[k] / epoch_loss[k - 1] - 1:.0%})")
    fin = [(s, x) for s, x in zip(steps, losses) if math.isfinite(x)]
    if fin:
        last_step = fin[-1][0]
        span = [x for s, x in fin if s > last_step - spe]
        # A rising trend inside the last epoch: mean of its last quarter vs its first quarter. Comparing with
        # the minimum of a noisy per-batch history flags healthy runs, so both windows are means, and a span
        # with too few logged points (< 20) is not judged.
        w = max(5, len(span) // 4)
        if len(span) >= 4 * w:
            first, last = sum(span[:w]) / w, sum(span[-w:]) / w
            if last > first * (1 + tol) and last - first > 1e-6 and beyond_noise(last - first, w, w):
                reasons.append(f"loss rose within the last epoch: mean {last:.4f} over its last {w} logged steps "
                               f"vs {first:.4f} over its first {w} (+{last / first - 1:.0%})")
    return {"diverged": bool(reasons), "reasons": reasons, "epoch_loss": [round(x, 5) for x in epoch_loss]}


def report_divergence(results: dict, steps_per_epoch: int, tol: float, out: Path | None, printer=print) -> dict:
    """Fill ``results["diverged"]`` / ``results["divergence"]`` and shout if the run diverged (never silent)."""
    hist = results.get("history") or {}
    div = detect_divergence(hist.get("steps", []), hist.get("loss", []), steps_per_epoch, tol=tol)
    results["diverged"] = div["diverged"]
    results["divergence"] = div
    if div["diverged"]:
        msg = (f"TRAINING DIVERGED ({out or 'run'}): " + "; ".join(div["reasons"]) +
               ". The model is saved but flagged diverged=True in results.json; do not report it as a normal run.")
        printer("!" * 100 + "\n" + msg + "\n" + "!" * 100)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "DIVERGED.txt").write_text(msg + "\n")
    return div

