"""A history-aware reranker agent for ALFWorld: behaviour cloning, then DAgger rounds (fastrank/dagger.py).

    accelerate launch recipes/agent_alfworld.py                          # agent_alfworld.yaml: CPU-sized
    accelerate launch recipes/agent_alfworld.py episodes=[400,200,200,200] betas=[1,0.5,0.25,0] \\
        epochs_per_round=2 max_train_sets=null model=deberta-v3-base layout=pairs           # bigger, on a GPU
"""
from fastrank.agent_config import AgentConfig
from fastrank.config import recipe_config
from fastrank.entry import run_entry


def main(argv: list[str]) -> None:
    cfg = recipe_config(__file__, argv, cls=AgentConfig)
    from fastrank.dagger import run_dagger  # after the config: --help and config errors need no torch

    run_dagger(cfg)


if __name__ == "__main__":
    run_entry(main)
