"""Multi-seed routed-vs-plain comparison (paper seeds 42, 123, 456, 789), mean ± std per env."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from fastrank.lexical_floor import FLOOR_NOTE, mean_floor


# ------------------------------------------------------------------------------------ multi-seed comparison
def run_comparison(cfg, *, baseline: bool = True) -> dict:
    """Routed runs vs the plain joint baseline (same config minus routing/projection), same seeds and data.

    ``cfg.seeds`` (or [cfg.seed]); runs go to output_dir/{baseline,routed}/seed_N; a finished run
    (results.json present) is reused. Writes output_dir/comparison.md + comparison.json: mean ± std of net gain
    per eval mode and env for both arms, per-seed values, and which seeds diverged (also mean ± std without them).
    """
    from fastrank.metrics import aggregate_seeds
    from fastrank.train import train

    seeds = list(cfg.seeds or [cfg.seed])
    out = Path(cfg.output_dir)
    arms = {"routed": dataclasses.replace(cfg, seeds=None)}
    if baseline:
        arms["baseline"] = dataclasses.replace(cfg, seeds=None, routing=False, grad_projection="none",
                                               router_warmup_steps=0)
    runs: dict[str, dict[int, dict]] = {a: {} for a in arms}
    for seed in seeds:
        for arm, acfg in arms.items():
            run_dir = out / arm / f"seed_{seed}"
            done = run_dir / "results.json"
            if done.exists():
                print(f"reusing {done}")
                runs[arm][seed] = json.loads(done.read_text())
            else:
                runs[arm][seed] = train(dataclasses.replace(acfg, seed=seed, output_dir=str(run_dir)))
    main = int(os.environ.get("RANK", "0")) == 0
    summary: dict = {"seeds": seeds, "config": dataclasses.asdict(cfg), "arms": {}}
    modes = list(next(iter(runs["routed"].values()))["eval"])
    for arm, by_seed in runs.items():
        diverged = [s for s, r in by_seed.items() if r.get("diverged")]
        ok = [s for s in seeds if s not in diverged]
        summary["arms"][arm] = {
            "diverged_seeds": diverged,
            "aggregate": {m: aggregate_seeds([by_seed[s]["eval"][m] for s in seeds]) for m in modes},
            "aggregate_non_diverged": ({m: aggregate_seeds([by_seed[s]["eval"][m] for s in ok]) for m in modes}
                                       if ok and diverged else None),
            "train_seconds": [by_seed[s].get("train_seconds") for s in seeds],
        }
    summary["lexical_floor"] = {m: f for m, f in mean_floor([runs["routed"][s]["config"] for s in seeds]).items()
                                if m in modes}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.json").write_text(json.dumps(summary, indent=1))
        (out / "comparison.md").write_text(_comparison_md(summary, cfg))
        print(f"report: {out / 'comparison.md'}")
    return summary


def _comparison_md(summary: dict, cfg) -> str:
    seeds = summary["seeds"]
    arms = summary["arms"]
    what = (f"routing={cfg.routing} (r={cfg.lora_r}, alpha={cfg.lora_alpha}, warm-up {cfg.router_warmup_steps} "
            f"steps), grad_projection={cfg.grad_projection}" +
            (f" (alpha={cfg.cagrad_alpha})" if cfg.grad_projection == "cagrad" else ""))
    lines = [f"# Routed vs plain joint training: {Path(cfg.output_dir).name}", "",
             f"model `{cfg.model}`, envs {cfg.envs}, seeds {seeds}; routed arm: {what}. The baseline is the same "
             f"config without routing or projection (same data and seeds).", ""]
    for arm, a in arms.items():
        if a["diverged_seeds"]:
            lines += [f"**{arm}: seeds {a['diverged_seeds']} DIVERGED** (rising training loss; see "
                      f"{arm}/seed_N/DIVERGED.txt). They are included in mean ± std below and listed separately.", ""]
    for mode in arms["routed"]["aggregate"]:
        lines += [f"## `{mode}` negatives: net gain", "",
                  "| environment | " + " | ".join(f"{arm} mean ± std" for arm in arms) +
                  (" | Δ (routed − baseline) |" if "baseline" in arms else " |") + " lexical floor |" +
                  " per seed (" + " / ".join(str(s) for s in seeds) + ") |",
                  "|---|" + "---|" * len(arms) + ("---|" if "baseline" in arms else "") + "---|---|"]
        floor = summary.get("lexical_floor", {}).get(mode, {})
        envs = arms["routed"]["aggregate"][mode]
        for env in envs:
            cells, per = [], []
            for arm, a in arms.items():
                g = a["aggregate"][mode][env]
                cells.append(f"{g['net_gain_mean']:+.3f} ± {g['net_gain_std']:.3f}")
                marks = ["*" if s in a["diverged_seeds"] else "" for s in seeds]
                per.append(f"{arm}: " + " / ".join(f"{v:+.3f}{m}" for v, m in zip(g["values"], marks)))
            delta = ""
            if "baseline" in arms:
                d = envs[env]["net_gain_mean"] - arms["baseline"]["aggregate"][mode][env]["net_gain_mean"]
                delta = f" {d:+.3f} |"
            fl = f" {floor[env]:+.3f} |" if env in floor else " — |"
            lines.append(f"| {env} | " + " | ".join(cells) + f" |{delta}{fl} " + "; ".join(per) + " |")
        lines.append("")
        for arm, a in arms.items():
            if a["aggregate_non_diverged"]:
                g = a["aggregate_non_diverged"][mode]["combined"]
                lines.append(f"{arm} without diverged seeds: combined {g['net_gain_mean']:+.3f} ± "
                             f"{g['net_gain_std']:.3f} over {g['runs']} seed(s).")
        lines.append("")
    lines += [FLOOR_NOTE + " Mean over the seeds.",
              "`*` = run flagged diverged. Train seconds per seed: " +
              "; ".join(f"{arm} {a['train_seconds']}" for arm, a in arms.items()), ""]
    return "\n".join(lines)

