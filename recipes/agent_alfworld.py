"""A history-aware reranker agent for ALFWorld: behaviour cloning, then DAgger rounds (fastrank/dagger.py).

    accelerate launch recipes/agent_alfworld.py                          # agent_alfworld.yaml: CPU-sized
    accelerate launch recipes/agent_alfworld.py episodes=[400,200,200,200] betas=[1,0.5,0.25,0] \\
        model=deberta-v3-base layout=pairs                               # bigger, on a GPU
"""
from fastrank.agent_config import AgentConfig
from fastrank.config import recipe_config
from fastrank.dagger import run_dagger

if __name__ == "__main__":
    run_dagger(recipe_config(__file__, cls=AgentConfig))
