"""Few-shot transfer (paper §5.3, Appendix A): pretrain on ALFWorld, fine-tune on growing shares of a
target environment's training episodes, report target net gain and % of the full-data figure.

    accelerate launch recipes/fewshot.py                       # fewshot.yaml: target webshop
    accelerate launch recipes/fewshot.py --config my_fewshot.yaml
    accelerate launch recipes/fewshot.py target=scienceworld finetune.lr=3e-5 pretrain.max_train_sets=null
    accelerate launch recipes/fewshot.py target=scienceworld pretrained=runs/fewshot/pretrain/model \
        output_dir=runs/fewshot_sw                             # reuse an ALFWorld model, skip pretraining
"""
import dataclasses
import json
import sys
from pathlib import Path

import yaml

from fastrank.config import load_config
from fastrank.train import train


def apply_overrides(spec: dict, overrides: list[str]) -> dict:
    """`key=value` for the top-level keys, `pretrain.key=value` / `finetune.key=value` inside the two blocks."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"fewshot: expected key=value, got {item!r}")
        *block, name = key.split(".")
        if len(block) > 1 or (block and block[0] not in ("pretrain", "finetune")):
            raise SystemExit(f"fewshot: {key!r}: only pretrain.<key> and finetune.<key> are nested")
        target = spec.setdefault(block[0], {}) if block else spec
        target[name] = yaml.safe_load(value)
    return spec


def block_config(spec: dict, block: str):
    """The TrainConfig of the pretrain / finetune block (validated and typed like any recipe config)."""
    return load_config(overrides=[f"{k}={json.dumps(v)}" for k, v in spec[block].items()])


def main(path: Path, overrides: list[str] = ()) -> None:
    spec = apply_overrides(yaml.safe_load(path.read_text()), list(overrides))
    out = Path(spec["output_dir"])
    target, fractions = spec["target"], spec["fractions"]
    pretrained = spec.get("pretrained")  # an ALFWorld model already trained (e.g. another target's run): reuse it
    if pretrained is None:
        train(dataclasses.replace(block_config(spec, "pretrain"), output_dir=str(out / "pretrain")))
        pretrained = out / "pretrain" / "model"
    rows = []
    for frac in fractions:
        ft = block_config(spec, "finetune")
        ft = dataclasses.replace(ft, envs=[target], eval_envs=[target], train_fraction={target: frac},
                                 init_from=str(pretrained), epochs=ft.epochs if frac > 0 else 0,
                                 output_dir=str(out / f"frac_{frac:g}"))
        res = train(ft)
        rows.append((frac, res["train_sets"], res["eval"]["sampled"][target]["net_gain"]))
    full = rows[-1][2] if fractions[-1] == 1 else None
    lines = [f"# Few-shot: ALFWorld-pretrained → {target}", "",
             "| fine-tuning data | training sets | net gain | % of full |", "|---|---|---|---|"]
    for frac, n, ng in rows:
        pct = f"{100 * ng / full:.0f}%" if full else "—"
        lines.append(f"| {100 * frac:.1f}% | {n} | {ng:+.3f} | {pct} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows))
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    config = Path(argv[argv.index("--config") + 1]) if "--config" in argv else Path(__file__).with_suffix(".yaml")
    main(config, [a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")])
