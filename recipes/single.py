"""Single-environment training (paper Table 2/4 rows "X only"), evaluated on all three environments.

    accelerate launch recipes/single.py envs=[alfworld] output_dir=runs/alfworld_only
"""
from fastrank.config import recipe_config
from fastrank.entry import run_entry


def main(argv: list[str]) -> None:
    cfg = recipe_config(__file__, argv)
    from fastrank.train import run_recipe  # imported after the config: --help and config errors need no torch

    run_recipe(cfg)


if __name__ == "__main__":
    run_entry(main)
