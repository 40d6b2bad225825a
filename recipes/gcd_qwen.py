"""GRPO / GCD / GCD_sugg for a multi-turn LLM agent in ALFWorld or ScienceWorld (Liu et al., "Gradient
Coupling: The Hidden Barrier to Generalization in Agentic RL"): Qwen2.5-3B-Instruct + LoRA, as in the paper.

    accelerate launch recipes/gcd_qwen.py                                  # gcd.yaml: GRPO + L_GCD
    accelerate launch recipes/gcd_qwen.py --config recipes/gcd_grpo.yaml   # the GRPO baseline
    accelerate launch recipes/gcd_qwen.py --config recipes/gcd_sugg.yaml   # GCD_sugg
    accelerate launch recipes/gcd_qwen.py --config recipes/gcd.yaml env=scienceworld output_dir=runs/gcd_sw
    python recipes/gcd_qwen.py --config recipes/gcd_tiny.yaml              # CPU smoke run, tiny random model
    python recipes/gcd_qwen.py --config recipes/gcd_smollm2.yaml           # CPU demo, real SmolLM2-135M
    # + an external labeler for steps the rules leave open (5 sampled verdicts, >= 4 agreeing; frozen, 4-bit):
    accelerate launch recipes/gcd_qwen.py labeler=Qwen/Qwen2.5-7B-Instruct labeler_load_in_4bit=true
    accelerate launch recipes/gcd_qwen.py labeler=policy labeler_max_per_update=16   # the policy model votes

Writes <output_dir>/report.md (success on L0/L1/L2, judge accuracy, repeated/looped actions, response
length), results.json, the LoRA adapters in model/, every rollout in episodes/ and every evaluation's
episodes in eval/ (the input of `fastrank gcd coupling`).
"""
from fastrank.entry import run_entry
from fastrank.gcd.config import recipe_config


def main(argv: list[str]) -> None:
    cfg = recipe_config(__file__, argv, default="gcd.yaml")
    from fastrank.gcd.trainer import run  # imported after the config: --help and config errors need no torch

    run(cfg)


if __name__ == "__main__":
    run_entry(main)
