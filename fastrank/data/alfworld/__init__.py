"""ALFWorld `Step` records from three real sources, all with the same episode ids and text format.

Split by source: `replay` runs the expert through the simulator (worker pools, resumable cache),
`released` reads the two released trajectory files, `common` holds what both need (the env name,
the game path convention, where the shared files live). Every public name is re-exported here.

1. `build_steps` / `replay_expert`: the handcoded expert (alfworld 0.3.5) replayed through
   `fastrank.envs.alfworld.AlfworldEnv` on the json_2.1.1 games; every step has the game's full
   admissible list. Parallel (worker processes), resumable (per-episode JSONL cache), deterministic
   (seeded episode selection and a per-episode expert seed).
2. `steps_from_gt_traj`: the released ground-truth trajectories of the 3554 solvable train games
   (ShareGPT: human = observation, gpt = action); no admissible lists.
3. `steps_from_expert_admissible`: 140 valid_seen episodes already replayed with the handcoded
   expert, with admissible lists.

Common format (what a reranker sees):
- `episode_id` = `alfworld/<split>/<task folder>/<trial>` (`fastrank.envs.alfworld.episode_id_for`),
  so the same game has the same id in every source (dedup, episode-level splits).
- `goal` = the text after "Your task is to:"; `observation` = at step 0 the room description without
  the welcome banner and the goal line, later the previous action's feedback, with 0.3.5's
  "You arrive at loc <n>. " prefix removed (`clean_feedback`) so the sources read alike.
- `task_type` = one of the 6 ALFWorld types (`fastrank.envs.alfworld.TASK_TYPES`).
- `meta`: source ("replay" | "gt_traj" | "expert_admissible"), split, game (path relative to the
  release root), won, prev_action, and for expert sources `expert_source`:
  "initial_look" (the expert always opens with `look`), "policy", "random" (the expert's own random
  admissible pick when its policy repeats itself), "look_fallback" (its suggestion — in
  `expert_suggested` when known — was not admissible, so the wrapper played `look`).

Episodes the expert did not win are not turned into training steps by default (`only_won=True`), but
they are always counted in the report, never dropped silently.
"""
from __future__ import annotations

from __future__ import annotations

from fastrank.data.alfworld.common import ENV, shared_alfworld_dir
from fastrank.data.alfworld.released import (
    SourceReport,
    admissible_stats,
    load_traj_meta,
    steps_from_expert_admissible,
    steps_from_gt_traj,
)
from fastrank.data.alfworld.replay import (
    DEFAULT_MAX_STEPS,
    BuildReport,
    BuildResult,
    build_steps,
    episode_seed,
    replay_episode,
    replay_expert,
    select_games,
)

__all__ = [
    "BuildReport", "BuildResult", "DEFAULT_MAX_STEPS", "ENV", "SourceReport", "admissible_stats", "build_steps",
    "episode_seed", "load_traj_meta", "replay_episode", "replay_expert", "select_games",
    "steps_from_expert_admissible", "steps_from_gt_traj", "shared_alfworld_dir",
]
