"""Few-shot transfer (paper §5.3, Appendix A): pretrain on ALFWorld, fine-tune on growing shares of a
target environment's training episodes, report target net gain and % of the full-data figure.

    accelerate launch recipes/fewshot.py                       # fewshot.yaml: target webshop
    accelerate launch recipes/fewshot.py --config my_fewshot.yaml
    accelerate launch recipes/fewshot.py target=scienceworld finetune.lr=3e-5 pretrain.max_train_sets=null
    accelerate launch recipes/fewshot.py target=scienceworld pretrained=runs/fewshot/pretrain/model \
        output_dir=runs/fewshot_sw                             # reuse an ALFWorld model, skip pretraining
"""
import dataclasses
import difflib
import json
from pathlib import Path

import yaml

from fastrank.config import ConfigError, config_help, display_path, load_config
from fastrank.entry import run_entry

# The top-level keys of fewshot.yaml and what they mean (the blocks hold TrainConfig keys).
SPEC_KEYS = {
    "target": "the environment fine-tuned on: webshop | scienceworld",
    "fractions": "shares of the target's training episodes, one fine-tuning run each (1.0 last gives the % column)",
    "output_dir": "where pretrain/, frac_<f>/, report.md and results.json go",
    "pretrained": "an ALFWorld model to fine-tune; null: pretrain one first (the pretrain block)",
    "pretrain": "TrainConfig keys of the ALFWorld pretraining run (pretrain.<key>=value)",
    "finetune": "TrainConfig keys of every fine-tuning run (finetune.<key>=value)",
}


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


def block_config(spec: dict, block: str, source: str | None = None):
    """The TrainConfig of the pretrain / finetune block (validated and typed like any recipe config)."""
    return load_config(overrides=[f"{k}={json.dumps(v)}" for k, v in spec[block].items()],
                       source=f"{source or 'fewshot'}: {block}")


def check_spec(spec, path: Path) -> None:
    """A ConfigError for a top-level key that is not one of SPEC_KEYS, or a required one left out."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(spec).__name__}")
    for key in spec:
        if key not in SPEC_KEYS:
            close = difflib.get_close_matches(key, list(SPEC_KEYS), n=2, cutoff=0.6)
            raise ConfigError(f"{path}: unknown key {key!r}; " +
                              (f"did you mean {' or '.join(map(repr, close))}?" if close else "--help lists the keys"))
    missing = [k for k in ("target", "fractions", "output_dir", "finetune") if k not in spec]
    if missing or (spec.get("pretrained") is None and "pretrain" not in spec):
        raise ConfigError(f"{path}: missing key(s) {missing or ['pretrain (or pretrained)']}")
    from fastrank.data.record import ENVS

    if spec["target"] not in ENVS:
        raise ConfigError(f"{path}: target must be one of {list(ENVS)}, got {spec['target']!r}")


def main(path: Path, overrides: list[str] = ()) -> None:
    try:
        spec = apply_overrides(yaml.safe_load(path.read_text()) or {}, list(overrides))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    check_spec(spec, path)
    for block in ("pretrain", "finetune"):  # fail on a bad key before hours of pretraining, not after
        if block in spec:
            block_config(spec, block, str(path))
    from fastrank.lexical_floor import FLOOR_NOTE, floor_for_run
    from fastrank.train import train  # here, not at the top: --help and config errors need no torch

    out = Path(spec["output_dir"])
    target, fractions = spec["target"], spec["fractions"]
    pretrained = spec.get("pretrained")  # an ALFWorld model already trained (e.g. another target's run): reuse it
    if pretrained is None:
        train(dataclasses.replace(block_config(spec, "pretrain", str(path)), output_dir=str(out / "pretrain")))
        pretrained = out / "pretrain" / "model"
    rows = []
    for frac in fractions:
        ft = block_config(spec, "finetune", str(path))
        ft = dataclasses.replace(ft, envs=[target], eval_envs=[target], train_fraction={target: frac},
                                 init_from=str(pretrained), epochs=ft.epochs if frac > 0 else 0,
                                 output_dir=str(out / f"frac_{frac:g}"))
        res = train(ft)
        rows.append((frac, res["train_sets"], res["eval"]["sampled"][target]["net_gain"]))
    full = rows[-1][2] if fractions[-1] == 1 else None
    floor = floor_for_run(res["config"])["sampled"][target]["net_gain"]  # every fraction has the same eval sets
    lines = [f"# Few-shot: ALFWorld-pretrained → {target}", "",
             "| fine-tuning data | training sets | net gain | % of full | model − lexical floor |",
             "|---|---|---|---|---|",
             f"| lexical floor (no training) | 0 | {floor:+.3f} | "
             f"{f'{100 * floor / full:.0f}%' if full else '—'} | — |"]
    for frac, n, ng in rows:
        pct = f"{100 * ng / full:.0f}%" if full else "—"
        lines.append(f"| {100 * frac:.1f}% | {n} | {ng:+.3f} | {pct} | {ng - floor:+.3f} |")
    lines += ["", FLOOR_NOTE]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows))
    print(f"report: {out / 'report.md'}")


def cli(argv: list[str]) -> None:
    if "--config" in argv[-1:]:
        raise ConfigError("--config needs a file")
    config = Path(argv[argv.index("--config") + 1]) if "--config" in argv else Path(__file__).with_suffix(".yaml")
    if "--help" in argv or "-h" in argv:
        width = max(map(len, SPEC_KEYS))
        print(f"usage: fewshot.py [--config FILE] [--debug] [key=value | pretrain.key=value | finetune.key=value ...]"
              f"\n\n{__doc__.strip()}\n\nkeys of {config.name}:\n"
              + "\n".join(f"  {k:<{width}}  {m}" for k, m in SPEC_KEYS.items())
              + "\n\nin the pretrain and finetune blocks, " + config_help())
        return
    main(Path(display_path(config)),
         [a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")])


if __name__ == "__main__":
    run_entry(cli)
