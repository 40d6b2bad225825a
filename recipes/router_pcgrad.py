"""Environment-aware LoRA routing + PCGrad (paper §5.6) vs the plain three-environment joint baseline.

For every seed in the config (paper: 42, 123, 456, 789) it trains the routed model and the plain joint3 model on
the same data (same config minus routing/projection), then writes output_dir/comparison.md: net gain mean ± std
per environment for both arms, per-seed values, and the seeds whose training loss diverged.

    accelerate launch recipes/router_pcgrad.py                                   # router_pcgrad.yaml, CPU-sized
    accelerate launch recipes/router_pcgrad.py --config recipes/router_cagrad.yaml   # CAGrad, alpha 0.5
    accelerate launch recipes/router_pcgrad.py seeds=[123] router_warmup_steps=0     # key=value overrides
    accelerate launch recipes/router_pcgrad.py --no-baseline                     # routed runs only
"""
from fastrank.config import recipe_config
from fastrank.entry import run_entry

FLAGS = {"--no-baseline": "train the routed runs only, not the plain joint baseline"}


def main(argv: list[str]) -> None:
    baseline = "--no-baseline" not in argv
    cfg = recipe_config(__file__, [a for a in argv if a != "--no-baseline"], flags=FLAGS)
    from fastrank.routing import run_comparison  # imported after the config: --help and config errors need no torch

    run_comparison(cfg, baseline=baseline)


if __name__ == "__main__":
    run_entry(main)
