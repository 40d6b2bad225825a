"""Configuration of the agent recipe (BC + DAgger in ALFWorld): `recipes/agent_alfworld.yaml`."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AgentConfig:
    # model: a history-aware reranker in the shared-prefix layout (state once, candidates after it)
    model: str = "minilm"  # preset (minilm, deberta-v3-base, ...), hub id or folder
    init_from: str | None = None  # a saved Reranker to start from instead of `model`
    feature_mode: str = "history"  # goal + observation + episode summary (fastrank.data.history)
    notes: int | None = None  # the history mode's notes version (fastrank.data.features.NOTES_VERSION); None: latest
    layout: str = "shared_prefix"  # shared_prefix (fast; BERT-family) | pairs (the paper's cross-encoder)
    max_length: int = 256  # state tokens (the history is cut first, oldest first)
    max_action_tokens: int = 32  # shared-prefix layout: tokens per candidate (action + its note), cut beyond
    attention_dropout: float | None = None  # null: the encoder's own (MiniLM 0.1); 0 trains faster on CPU
    # games
    games_dir: str | None = None  # ALFWorld json_2.1.1 tarball or unpacked dir; None: ../shared/data
    train_split: str = "train"  # ALFWorld split the rollout and eval games come from
    episodes: list[int] = field(default_factory=lambda: [160, 60, 60])  # train games played in each round
    betas: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.0])  # P(expert acts) per round; round 0 = BC
    max_steps: int = 50  # step limit per episode (ALFWorld's own evaluation limit)
    avoid_repeats: bool = True  # the policy takes its best action not yet taken from the same observation, in
    # rollouts and evaluations alike (agent-eval's ALFWorld default), so DAgger labels the states it really visits
    repeat_penalty: float = 0.0  # subtracted from an action's score per earlier time the episode took it (rollouts +
    # evals; fastrank.rollout); 0: off
    batch_size: int = 8  # games in lockstep, scored in one batch
    search_labels: str = "expert"  # DAgger rounds (beta < 1): "expert" labels every state; "inferable" skips the
    # expert's "go to X" while the agent holds no goal object: it goes straight to where the object is, which no
    # state the agent has seen predicts (fastrank.dagger.inferable)
    eval_games: int = 12  # fixed train games (not rolled out for data) played by the policy after each round
    # training
    max_negatives: int = 15  # admissible actions beside the expert's in a training set
    old_ratio: float = 1.0  # per round: sets from earlier rounds replayed per new set
    max_train_sets: int | None = None  # per round, a seeded sample of (new + replayed) sets; None: all
    loss: str = "listwise"  # listwise (softmax CE over the set: the agent takes the argmax) | pairwise (paper)
    temperature: float = 1.0  # listwise softmax temperature
    epochs_per_round: float | list[float] = 1.0  # passes over each round's training sets: one value, or one per round
    #                                               (round 0's BC plateaus early: [1, 2, 2] frees a round's time)
    final_fit_epochs: float = 0.0  # > 0: after the rounds, train a fresh model on every aggregated state (DAgger's
    #                                "train on D"); its model is the recipe's output
    output_round: str = "best"  # without a final fit: "best" = the round that won most fixed train games (then fewer
    #                             repeats, then the later round), "last" = the last round's model
    lr: float = 1.0e-4  # AdamW learning rate
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes), as in the trainer's build_optimizer
    weight_decay: float = 0.01  # AdamW weight decay (not on biases / norms)
    warmup_ratio: float = 0.05  # linear warm-up share of each fit, then linear decay
    grad_clip: float = 1.0  # max gradient norm (0: off)
    point_weight: float = 0.5  # weight of the pointwise BCE term beside the ranking loss
    max_tokens: int = 8192  # token budget of one batch (shared-prefix rows count each state once)
    cpu_threads: int | None = None  # torch threads on CPU; None: all cores
    # final evaluation on held-out games (not train): 0 skips it
    final_eval_split: str = "valid_seen"  # split played after training when final_eval_games != 0
    final_eval_games: int = 0  # 0: skip; -1: every game of the split
    # ScienceWorld recipe (recipes/agent_scienceworld.py) only
    sw_episodes_per_task: int = 3  # ETO train gold paths replayed per task (24 tasks) for behaviour cloning
    sw_staples: bool = False  # every training set also holds wait1 / wait / look around / inventory when not its label
    sw_view: str = "feedback"  # the observation the policy reads: feedback | room (+ the room and the inventory,
    #                            fastrank.envs.scienceworld_view), saved with the model so agent-eval shows the same
    sw_siblings: int = 0  # negatives sharing the gold action's verb (open door to kitchen beside open door to workshop)
    sw_guarded_focus: bool = False  # wrong-focus negatives only on objects the goal names (what the focus guard offers)
    sw_valid_sample: int = 300  # valid actions kept per replayed state (verb-stratified; 100000: all, ~1,700)
    # WebShop recipe (recipes/agent_webshop.py) only
    ws_teacher: str = "reward"  # reward (reads the hidden reward) | readable (decides on what the pages show)
    ws_runs_per_goal: int = 2  # teacher episodes per leak-free goal (run 0 without detours)
    ws_detour_prob: float = 0.3  # per results / item page of runs 1+: a detour taken first (recovery states)
    ws_sampled: int = 0  # per training set, other episodes' teacher actions added as distractors (`sampled` mode)
    max_candidates: int = 64  # evaluation: bound on the valid-action list offered (agent-eval --max-candidates)
    # bookkeeping
    seed: int = 42  # seeds game order, negatives, model init
    output_dir: str = "runs/agent_alfworld"  # rounds, model, report.md, results.json go here
    resume: bool = False  # continue after the last finished round in output_dir
