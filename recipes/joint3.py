"""Three-environment joint training (paper §5.5): ALFWorld + WebShop + ScienceWorld, ALFWorld ×6.

    accelerate launch recipes/joint3.py                                  # joint3.yaml: MiniLM, CPU-sized
    accelerate launch recipes/joint3.py --config recipes/joint3_deberta_base.yaml   # the paper's setup
    accelerate launch recipes/joint3.py epochs=1 seed=123                # key=value overrides
"""
from fastrank.config import recipe_config
from fastrank.entry import run_entry


def main(argv: list[str]) -> None:
    cfg = recipe_config(__file__, argv)
    from fastrank.train import run_recipe  # imported after the config: --help and config errors need no torch

    run_recipe(cfg)


if __name__ == "__main__":
    run_entry(main)
