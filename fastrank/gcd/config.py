"""GCDConfig: one dataclass for the GRPO / GCD / GCD_sugg recipes, from YAML plus `key=value` overrides.

    accelerate launch recipes/gcd_qwen.py --config recipes/gcd.yaml updates=10 group_size=4

Defaults are the paper's (appendix A.1, §4, §5) where it states them: group size 8 for both the agent and
the judge, 16 tasks per update, lr 1e-6, 30 interaction steps, 150 updates ("150 epochs" with one batch per
epoch), 30 judged samples per update, suggestions refreshed every 10 updates. What it does not state is marked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fastrank.config import load_config as _load
from fastrank.config import recipe_config as _recipe
from fastrank.config import to_dict

METHODS = ("grpo", "gcd", "gcd_sugg")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class GCDConfig:
    method: str = "gcd"  # grpo | gcd (+ generative judging) | gcd_sugg (+ suggestions in the prompt)
    # ---- environment and tasks
    env: str = "alfworld"  # alfworld | scienceworld
    games: str | None = None  # ALFWorld release tarball or unpacked dir; None: <shared data>/alfworld/json_2.1.1_games.tar.xz
    eval_split: str = "valid_seen"  # ALFWorld split for L1 / L2
    fill_missing: bool = False  # ScienceWorld: the 6 tasks ETO's indices lack (3 are L2), from the simulator
    max_admissible: int = 50  # ScienceWorld: bounded admissible list shown in the prompt
    sw_step_limit: int = 100  # ScienceWorld: the simulator's own step limit
    n_train_tasks: int | None = None  # RL pool size (None: all in-domain train tasks)
    n_eval_tasks: int = 20  # evaluation tasks per level
    num_envs: int = 8  # episodes run side by side (per process)
    env_workers: bool = False  # one worker process per env (else all in this process)
    # ---- model
    model: str = "tiny"  # hub id / folder / "smollm2" / "tiny"
    gguf_file: str | None = None  # a GGUF file inside the model folder (dequantized on load)
    dtype: str = "auto"  # model weights dtype: auto | float32 | bfloat16 | float16
    load_in_4bit: bool = False  # load the policy in 4 bit (bitsandbytes; CUDA)
    load_in_8bit: bool = False  # load the policy in 8 bit (bitsandbytes; CUDA)
    lora_r: int = 16  # LoRA rank; 0: full fine-tuning (not stated in the paper)
    lora_alpha: int = 32  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_target: list[str] | str = "all-linear"  # modules that get LoRA adapters (peft target_modules)
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, slower)
    attn_implementation: str | None = None  # transformers attention (sdpa, eager, flash_attention_2); None: its default
    # ---- rollout
    group_size: int = 8  # rollouts per task: the GRPO group
    tasks_per_update: int = 16  # tasks sampled per update
    max_steps: int = 30  # agent turns per episode (valid or not)
    history_length: int = 2  # past turns in the prompt (not stated; verl-agent's ALFWorld default)
    max_new_tokens: int = 512  # token limit of one agent response (not stated)
    temperature: float = 1.0  # sampling temperature of rollouts
    top_p: float = 1.0  # nucleus sampling of rollouts
    require_think: bool = True  # a response without <think> is malformed
    inadmissible: str = "env"  # env: send an inadmissible action to the env | feedback: do not, say so
    invalid_penalty: float = 0.0  # paper: reward 1 / 0
    gen_batch_size: int = 16  # prompts generated together
    score_batch_size: int = 8  # sequences per forward when scoring log-probs
    # ---- optimisation
    updates: int = 150  # policy updates (one batch of tasks each)
    lr: float = 1.0e-6  # learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    optimizer: str = "adamw"  # adamw | adamw8bit
    clip_eps: float = 0.2  # PPO ratio clip (low side; both sides without clip_eps_high)
    clip_eps_high: float | None = None  # PPO ratio clip on the high side; None: clip_eps
    kl_coef: float = 0.0  # the paper does not use / mention a KL term
    ppo_epochs: int = 1  # passes over each update's samples
    micro_batch_size: int = 4  # sequences per forward/backward in the update
    # packed: a micro-batch's sequences concatenated into rows (one row under flash attention), logits only at
    # response tokens; padded: one left-padded row each. Same log-probs (tests/test_gcd_packing.py); the layout
    # of pi_old too. See fastrank/gcd/policy.py for when each is faster.
    update_packing: str = "packed"  # packed | padded: the update's micro-batch layout (see above)
    grad_clip: float = 1.0  # max gradient norm per update
    adv_eps: float = 1.0e-6  # added to the group std before dividing the advantages
    scale_adv: bool = True  # divide by the group std (GRPO); False: Dr. GRPO
    mixed_precision: str = "auto"  # auto: bf16 on a capable GPU else no | no | bf16 | fp16
    # ---- GCD (generative judging)
    judge_samples: int = 30  # steps judged per update
    judge_group: int = 8  # judgments sampled per judged step: the GCD group
    gcd_coef: float = 1.0  # L = L_GRPO + gcd_coef * L_GCD (paper: 1)
    judge_max_new_tokens: int = 512  # token limit of one judgment
    balance_labels: bool = True  # not stated: equal good / bad among judged samples when possible
    # External labeler for steps the repeat / success rules leave open (paper: DeepSeek-V3, 5 samples, used when
    # >= 4 agree). none: rules only | policy: the policy model itself | a hub id / folder of any HF causal LM (also
    # "smollm2", "tiny"), loaded frozen. It sees the critic prompt and votes with parsed verdicts.
    labeler: str = "none"  # none | policy | a model (hub id / folder / smollm2 / tiny), see above
    labeler_samples: int = 5  # verdicts sampled per open step
    labeler_min_agree: int = 4  # a strict majority of labeler_samples
    labeler_max_new_tokens: int = 512  # token limit of one labeler verdict
    labeler_temperature: float = 1.0  # 0: greedy (then labeler_samples must be 1)
    labeler_max_per_update: int | None = 32  # open steps sent per update (and per evaluation); None: all
    labeler_gguf_file: str | None = None  # separate labeler model only, as gguf_file / dtype / load_in_* above
    labeler_dtype: str = "auto"  # separate labeler: weights dtype
    labeler_load_in_4bit: bool = False  # separate labeler: load in 4 bit
    labeler_load_in_8bit: bool = False  # separate labeler: load in 8 bit
    # ---- GCD_sugg
    sugg_refresh_every: int = 10  # updates between refreshes of the suggestions
    sugg_max_advice: int = 60  # advice sentences kept in the bank
    sugg_max_rules: int = 3  # suggestions shown in the prompt
    sugg_advice_from: str = "correct_bad"  # correct_bad (what to avoid) | correct | all: judgments advice is taken from
    sugg_max_new_tokens: int = 256  # token limit of the suggestion summary
    # ---- evaluation and bookkeeping
    eval_every: int = 0  # 0: only before training and at the end
    eval_before: bool = True  # evaluate once before the first update
    eval_greedy: bool = True  # greedy decoding in evaluation
    eval_judge_samples: int = 30  # per level; judge accuracy (Table 4), 0 to skip
    coupling: bool = False  # run the gradient-coupling diagnostic on every evaluation's episodes
    coupling_max_per_population: int = 32  # episodes per population in the coupling diagnostic
    seed: int = 42  # seeds task sampling, generation and initialisation
    output_dir: str = "runs/gcd"  # where report.md, results.json, model/ and episodes go
    save_every: int = 0  # checkpoint every N updates (0: only at the end)
    save_episodes: bool = True  # write every rollout to output_dir/episodes/
    resume: bool = False  # continue from the last checkpoint in output_dir
    log_every: int = 1  # updates between log lines

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.env not in ("alfworld", "scienceworld"):
            raise ValueError(f"env must be alfworld or scienceworld, got {self.env!r}")
        if self.inadmissible not in ("env", "feedback"):
            raise ValueError(f"inadmissible must be env or feedback, got {self.inadmissible!r}")
        if self.update_packing not in ("packed", "padded"):
            raise ValueError(f"update_packing must be packed or padded, got {self.update_packing!r}")
        self._check_labeler()

    def _check_labeler(self) -> None:
        if self.labeler is None:  # YAML `labeler: null`
            self.labeler = "none"
        name = self.labeler
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"labeler must be none, policy, or a model (hub id / folder), got {name!r}")
        if name == "none":
            return
        separate = name != "policy"
        if separate and not (Path(name).is_dir() or name in ("tiny", "smollm2") or _HUB_ID.fullmatch(name)):
            raise ValueError(f"labeler {name!r}: not none / policy / tiny / smollm2, no such folder, and not a hub id "
                             "(org/name)")
        if not separate and (self.labeler_gguf_file or self.labeler_load_in_4bit or self.labeler_load_in_8bit
                             or self.labeler_dtype != "auto"):
            raise ValueError("labeler_gguf_file / labeler_dtype / labeler_load_in_* are for a separate labeler model, "
                             "not labeler: policy (it is the policy model as loaded)")
        if self.labeler_load_in_4bit and self.labeler_load_in_8bit:
            raise ValueError("labeler_load_in_4bit and labeler_load_in_8bit are exclusive")
        n, k = self.labeler_samples, self.labeler_min_agree
        if not 1 <= k <= n or 2 * k <= n:
            raise ValueError(f"labeler_min_agree must be a strict majority of labeler_samples (at most all of them), "
                             f"got {k} of {n}")
        if self.labeler_temperature < 0:
            raise ValueError(f"labeler_temperature must be >= 0, got {self.labeler_temperature}")
        if self.labeler_temperature == 0 and self.labeler_samples > 1:
            raise ValueError("labeler_temperature 0 is greedy: every sample would be the same; set labeler_samples 1 "
                             "(and labeler_min_agree 1) or a temperature > 0")
        if self.labeler_max_new_tokens < 1:
            raise ValueError(f"labeler_max_new_tokens must be >= 1, got {self.labeler_max_new_tokens}")
        if self.labeler_max_per_update is not None and self.labeler_max_per_update < 1:
            raise ValueError(f"labeler_max_per_update must be >= 1 or null (no cap), got {self.labeler_max_per_update}")
        if not self.judging and self.eval_judge_samples <= 0:
            raise ValueError(f"labels are only used for judging: method {self.method} with eval_judge_samples 0 never "
                             "uses the labeler; set labeler: none")

    @property
    def judging(self) -> bool:
        return self.method in ("gcd", "gcd_sugg")

    @property
    def suggestions(self) -> bool:
        return self.method == "gcd_sugg"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> GCDConfig:
    """GCDConfig from YAML (unknown keys are an error naming the file) plus key=value overrides."""
    return _load(path, overrides, GCDConfig)


def recipe_config(recipe_file: str, argv: list[str] | None = None, default: str = "gcd.yaml") -> GCDConfig:
    """For recipes/gcd_qwen.py: `--config FILE` (default: `default` beside the script), then key=value args."""
    return _recipe(recipe_file, argv, default=default, cls=GCDConfig)


__all__ = ["METHODS", "GCDConfig", "load_config", "recipe_config", "to_dict"]
