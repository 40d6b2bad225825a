"""Results → report.md with a net-gain bar chart and the loss curve (PNG, matplotlib Agg)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and servers have no display
import matplotlib.pyplot as plt  # noqa: E402

from fastrank.lexical_floor import FLOOR_NOTE, mean_floor  # noqa: E402


def net_gain_bars(runs: dict[str, dict], path: Path, title: str = "net gain (clean eval split)") -> None:
    """runs: {run name: net_gain_report}; one bar group per environment, one bar per run."""
    envs = sorted({e for rep in runs.values() for e in rep}, key=lambda e: (e == "combined", e))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(envs) * max(1, len(runs)) / 2, 3.2))
    width = 0.8 / max(1, len(runs))
    for k, (name, rep) in enumerate(runs.items()):
        xs = [i + k * width for i in range(len(envs))]
        vals = [rep.get(e, {}).get("net_gain", float("nan")) for e in envs]
        bars = ax.bar(xs, vals, width, label=name)
        ax.bar_label(bars, labels=[f"{v:+.3f}" for v in vals], fontsize=7)
    ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(envs))], envs)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("net gain")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loss_curve(history: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(history["steps"], history["loss"], label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    ax2.plot(history["steps"], history["top1"], color="tab:orange", alpha=0.6, label="train top-1")
    ax2.set_ylabel("train top-1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def eval_table(rep: dict, floor: dict | None = None) -> list[str]:
    """Per environment: the model's top-1 and net gain, and (when given) the zero-training lexical
    floor's net gain on the same sets (`fastrank.lexical_floor`), so a reader sees what training added."""
    if floor is None:
        lines = ["| environment | states | original top-1 | reranked top-1 | net gain |", "|---|---|---|---|---|"]
    else:
        lines = ["| environment | states | original top-1 | reranked top-1 | net gain | lexical floor | "
                 "model − floor |", "|---|---|---|---|---|---|---|"]
    for env, r in rep.items():
        row = (f"| {env} | {r['states']} | {r['original_top1']:.3f} | {r['reranked_top1']:.3f} | "
               f"**{r['net_gain']:+.3f}** |")
        if floor is not None:
            f = floor.get(env)
            row += (f" {f['net_gain']:+.3f} | {r['net_gain'] - f['net_gain']:+.3f} |" if f and f["states"] == r["states"]
                    else " — | — |")
        lines.append(row)
    return lines


def _floors(config: dict) -> tuple[dict, str | None]:
    """The lexical floor on the run's evaluation sets, or ({}, why not) when they cannot be reloaded."""
    from fastrank.lexical_floor import floor_for_run

    try:
        return floor_for_run(config), None
    except (FileNotFoundError, ValueError) as exc:
        return {}, f"lexical floor not computed: {exc}"


def write_report(results: dict, out: Path) -> Path:
    out = Path(out)
    cfg = results["config"]
    lines = [f"# fastrank run: {out.name}", "",
             f"model `{cfg['model']}`, envs {cfg['envs']}, negatives `{cfg['negatives']}`, upsample {cfg['upsample']}, "
             f"{results['train_sets']} training sets, {results['steps']} steps in {results['train_seconds']} s, "
             f"seed {cfg['seed']}.", ""]
    floors, why = _floors(cfg) if results["eval"] else ({}, None)
    for mode, rep in results["eval"].items():
        lines += [f"## Clean eval split, `{mode}` negatives", ""] + eval_table(rep, floors.get(mode)) + [""]
    if floors:
        lines += [FLOOR_NOTE, ""]
    elif why:
        lines += [why, ""]
    if results["eval"]:
        net_gain_bars({m: r for m, r in results["eval"].items()}, out / "net_gain.png")
        lines += ["![net gain](net_gain.png)", ""]
    if results["history"]["steps"]:
        loss_curve(results["history"], out / "loss.png")
        lines += ["![loss](loss.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_seed_report(agg: dict, runs: dict, out: Path) -> Path:
    """Mean ± std over seeds, per evaluation mode and environment."""
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"aggregate": agg, "seeds": list(runs)}, indent=1))
    lines = [f"# fastrank multi-seed run: {out.name}", "", f"seeds {list(runs)}", ""]
    floor = mean_floor([r["config"] for r in runs.values() if isinstance(r, dict) and "config" in r])
    for mode, by_env in agg.items():
        lines += [f"## `{mode}` negatives", "", "| environment | net gain mean ± std | per seed | lexical floor (mean) |",
                  "|---|---|---|---|"]
        for env, a in by_env.items():
            per = " / ".join(f"{v:+.3f}" for v in a["values"])
            fl = f"{floor[mode][env]:+.3f}" if env in floor.get(mode, {}) else "—"
            lines.append(f"| {env} | **{a['net_gain_mean']:+.3f} ± {a['net_gain_std']:.3f}** | {per} | {fl} |")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
