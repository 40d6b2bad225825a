"""results.json + report.md (+ curves.png) for a GRPO / GCD / GCD_sugg run.

Tables follow the paper: success on L0 / L1 / L2 and their mean (Table 2), judge accuracy per level
(Table 4), repeated / looped action rates (Figure 8), response length in tokens (Table 5).
"""
from __future__ import annotations

import json
from pathlib import Path

from fastrank.gcd.tasks import LEVELS


def _f(x, pct: bool = True) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}" if pct else f"{x:.1f}"


def eval_tables(evals: list[dict]) -> list[str]:
    lines = ["## Success rate (%) per level", "",
             "| eval | update | L0 | L1 | L2 | mean |", "|---|---|---|---|---|---|"]
    for e in evals:
        vals = [e["levels"].get(l, {}).get("success") for l in LEVELS]
        got = [v for v in vals if v is not None]
        mean = sum(got) / len(got) if got else None
        lines.append(f"| {e['tag']} | {e['update']} | " + " | ".join(_f(v) for v in vals) + f" | {_f(mean)} |")
    lines += ["", "## Judge accuracy (%) per level (greedy, balanced good/bad labels)", "",
              "| eval | L0 | L1 | L2 |", "|---|---|---|---|"]
    for e in evals:
        if "judge" in e:
            lines.append(f"| {e['tag']} | " + " | ".join(
                f"{_f(e['judge'].get(l, {}).get('accuracy'))} (n={e['judge'].get(l, {}).get('judgments', 0)})"
                for l in LEVELS) + " |")
    lines += ["", "## Flawed actions and responses", "",
              "| eval | level | episodes | steps | repeated % | looped % | format errors % | inadmissible % | "
              "response tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for e in evals:
        for l, m in e["levels"].items():
            if not m.get("episodes"):
                continue
            lines.append(f"| {e['tag']} | {l} | {m['episodes']} | {m['steps']:.1f} | {_f(m['repeated_rate'])} | "
                         f"{_f(m['looped_rate'])} | {_f(m['format_error_rate'])} | {_f(m['inadmissible_rate'])} | "
                         f"{m['response_tokens']:.1f} |")
    couplings = [e for e in evals if isinstance(e.get("coupling"), dict) and "pp" in e["coupling"]]
    if couplings:
        lines += ["", "## Gradient coupling (cosine, ID vs OOD; paper Table 1)", "",
                  "| eval | nn | np | pn | pp |", "|---|---|---|---|---|"]
        for e in couplings:
            c = e["coupling"]
            lines.append(f"| {e['tag']} | " + " | ".join("—" if c.get(k) is None else f"{c[k]:.3f}"
                                                       for k in ("nn", "np", "pn", "pp")) + " |")
    return lines


def labeler_lines(results: dict) -> list[str]:
    """Which external labeler was used and, summed over the updates, what it did with the open steps."""
    desc = results.get("labeler")
    if not desc:
        return []
    lines = [f"External labeler: {desc}."]
    keys = ("candidates", "sent", "labeled", "good", "abstained", "skipped_cap")
    tot = {k: sum(h.get(f"labeler/{k}", 0) for h in results["history"]) for k in keys}
    if any(f"labeler/{k}" in h for h in results["history"] for k in keys):
        lines.append(f"Training updates: {tot['candidates']} steps without a rule label, {tot['sent']} sent to the "
                     f"labeler, {tot['labeled']} labeled ({tot['good']} good), {tot['abstained']} abstained, "
                     f"{tot['skipped_cap']} left out by the per-update cap.")
    return lines + [""]


def curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [h["update"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    axes[0].plot(xs, [h.get("rollout/success", 0) for h in history], label="success")
    axes[0].plot(xs, [h.get("rollout/flawed_rate", 0) for h in history], label="repeated+looped")
    axes[0].plot(xs, [h.get("rollout/format_error_rate", 0) for h in history], label="format errors")
    axes[0].set_title("rollouts")
    axes[0].legend(fontsize=7)
    axes[1].plot(xs, [h.get("loss_agent", 0) for h in history], label="L_GRPO")
    axes[1].plot(xs, [h.get("loss_judge", 0) for h in history], label="L_GCD")
    axes[1].set_title("loss (token-mean)")
    axes[1].legend(fontsize=7)
    if any("judge/accuracy" in h for h in history):
        axes[2].plot(xs, [h.get("judge/accuracy", float("nan")) for h in history], label="judge accuracy")
    axes[2].plot(xs, [h.get("rollout/response_tokens", 0) / max(1, max(h2.get("rollout/response_tokens", 1)
                                                                       for h2 in history)) for h in history],
                 label="response length (rel.)")
    axes[2].set_title("judging / length")
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("update")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    cfg = results["config"]
    lines = [f"# GCD run: {out.name}", "",
             f"method `{cfg['method']}`, env `{cfg['env']}`, model `{cfg['model']}` (LoRA r={cfg['lora_r']}, "
             f"{results['trainable_params']:,} trainable params), {results['updates']} updates of "
             f"{cfg['tasks_per_update']} tasks x {cfg['group_size']} episodes, max {cfg['max_steps']} steps, "
             f"{results['train_seconds']} s, seed {cfg['seed']}.", ""]
    lines += labeler_lines(results) + eval_tables(results["evals"])
    if results.get("suggestions"):
        last = results["suggestions"][-1]
        lines += ["", f"## Suggestions (GCD_sugg, last refresh at update {last['update']})", ""]
        lines += [f"{i}. {r}" for i, r in enumerate(last["rules"], 1)]
    if results["history"]:
        curves(results["history"], out / "curves.png")
        lines += ["", "![training curves](curves.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


__all__ = ["eval_tables", "labeler_lines", "curves", "write_report"]
