"""Two-environment joint training (paper §5.1–5.2): ALFWorld + WebShop.

    accelerate launch recipes/joint2.py                                   # rebalanced, ALFWorld ×6
    accelerate launch recipes/joint2.py --config recipes/joint2_equal.yaml   # equal weight
"""
from fastrank.config import recipe_config
from fastrank.entry import run_entry


def main(argv: list[str]) -> None:
    cfg = recipe_config(__file__, argv)
    from fastrank.train import run_recipe  # imported after the config: --help and config errors need no torch

    run_recipe(cfg)


if __name__ == "__main__":
    run_entry(main)
