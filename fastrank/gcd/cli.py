"""`fastrank gcd ...` subcommands. fastrank/cli.py calls `add_gcd_args(subparsers)`.

    fastrank gcd coupling --checkpoint runs/gcd/model --episodes runs/gcd/eval/eval_0150.jsonl --out runs/gcd/coupling
    fastrank gcd coupling --checkpoint tiny --episodes eps.jsonl --out /tmp/c --param-filter 'mlp'
    fastrank gcd train --config recipes/gcd_tiny.yaml updates=1          # same as recipes/gcd_qwen.py
"""
from __future__ import annotations

import argparse
import json


def _cmd_coupling(args: argparse.Namespace) -> int:
    from fastrank.gcd.coupling import coupling_report
    from fastrank.gcd.modeling import load_checkpoint
    from fastrank.gcd.policy import Policy
    from fastrank.gcd.rollout import load_episodes

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, meta = load_checkpoint(args.checkpoint, device=device, trainable=True)
    policy = Policy(model, tok, temperature=args.temperature)
    episodes = [e for path in args.episodes for e in load_episodes(path)]
    res = coupling_report(policy, episodes, args.out, param_filter=args.param_filter,
                          max_per_population=args.max_per_population, batch_size=args.batch_size, seed=args.seed,
                          id_levels=tuple(args.id_levels.split(",")), ood_levels=tuple(args.ood_levels.split(",")),
                          title=args.title or str(args.checkpoint))
    print(json.dumps({"table1": res["table1"], "populations": res["populations"], "n_params": res["n_params"]}))
    print(f"wrote {args.out}/coupling.md, coupling.png, coupling.json")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from fastrank.config import check_paths, display_path
    from fastrank.gcd.config import load_config

    cfg = load_config(args.config, args.overrides)
    check_paths(cfg, display_path(args.config))
    from fastrank.gcd.trainer import run  # after the config is checked: a typo fails before torch loads

    run(cfg)
    return 0


def add_gcd_args(subparsers) -> argparse.ArgumentParser:
    """Add `gcd` (with `coupling` and `train`) to a parent parser's subparsers; returns the `gcd` parser."""
    gcd = subparsers.add_parser("gcd", help="GRPO / GCD for LLM agents and the gradient-coupling diagnostic")
    sub = gcd.add_subparsers(dest="gcd_command", required=True)

    co = sub.add_parser("coupling", help="cosine similarity between population mean gradients (paper Table 1)")
    co.add_argument("--checkpoint", required=True,
                    help="a folder written by the GCD trainer (model/ or checkpoint-N/), an HF causal-LM folder or "
                         "hub id, or a preset (tiny, smollm2)")
    co.add_argument("--episodes", required=True, nargs="+",
                    help="episode JSONL files (the trainer's eval/*.jsonl or episodes/*.jsonl)")
    co.add_argument("--out", required=True, help="output folder for coupling.{md,png,json}")
    co.add_argument("--param-filter", default=None, help="regex on parameter names (default: trainable params)")
    co.add_argument("--max-per-population", type=int, default=64, help="samples drawn per population")
    co.add_argument("--batch-size", type=int, default=4, help="sequences per backward pass")
    co.add_argument("--id-levels", default="L0,L1", help="task levels of the in-domain populations")
    co.add_argument("--ood-levels", default="L2", help="task levels of the out-of-domain population")
    co.add_argument("--temperature", type=float, default=1.0, help="policy temperature the log-probs are taken at")
    co.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    co.add_argument("--seed", type=int, default=0, help="seeds the choice of samples per population")
    co.add_argument("--title", default=None, help="report title (default: the checkpoint)")
    co.set_defaults(func=_cmd_coupling)

    from fastrank.config import config_help
    from fastrank.gcd.config import GCDConfig

    tr = sub.add_parser("train", help="run a GCD recipe config (like recipes/gcd_qwen.py)",
                        epilog=config_help(GCDConfig))
    tr.add_argument("--config", required=True, help="a GCD YAML config (recipes/gcd*.yaml)")
    tr.add_argument("overrides", nargs="*", help="key=value config overrides (the keys below)")
    tr.set_defaults(func=_cmd_train)
    return gcd


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (python -m fastrank.gcd.cli coupling ...) until fastrank/cli.py wires add_gcd_args."""
    p = argparse.ArgumentParser(prog="fastrank")
    add_gcd_args(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["gcd", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
