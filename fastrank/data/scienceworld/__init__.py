"""ScienceWorld expert Steps: gold paths replayed through the simulator, or read from the shared
gold files.

    pairs = select_pairs("train", per_task=5, seed=0)            # ETO train (task, variation)s
    result = build_steps(pairs, workers=2, cache_path="build_cache/sw_train.cache.jsonl")
    write_records("build_cache/scienceworld_train_steps.jsonl.gz", result.steps)
    steps = steps_from_gold_files()                              # the shared 50/30-episode files

One Step per *decision* of the gold path:
- observation: the feedback the agent saw before acting (first step: the initial `look around`);
  `meta["look"]` / `meta["inventory"]` hold the free look / inventory texts of that state.
- expert_action: the **canonical** valid-list string of the gold action (the simulator's parser
  maps the gold string to an action template + object ids, and the valid-list string with the
  same template + objects is the canonical form, see `ScienceWorldEnv.resolve_action`). Gold
  strings are often aliases (`examine X`, `open door to X`, `use T in inventory on X`); using the
  valid-list form keeps the expert in the same surface style as its distractors, so a ranker cannot
  spot it by style. The gold string is kept in `meta["gold_action"]`; when the simulator lists no
  equivalent (e.g. `open door to hallway` on an open door: accepted, not listed) the gold string
  itself is the expert and `meta["canonical_method"]` says "none".
- admissible: a bounded sample (`n_sample`, default 50, seeded per step) of the state's valid
  actions, deduplicated, *without any alias of the expert*, plus the expert exactly once
  (`bounded_admissible` policy: stratified by verb, sorted). `meta["n_valid"]` is the number of
  distinct valid strings, `meta["gold_in_valid"]` whether the gold string was verbatim in it.
- Parser answers are not decisions: a digit answering an "Ambiguous request" prompt is folded
  into the preceding Step (whose expert is the option the digit picks), and digits where no prompt
  is pending (the gold generator emits a few; the simulator answers "No known action ...") are
  replayed but dropped. The next Step's observation is then the result of the real action.
- The gold generator writes object referents drawn at random, and on replay a few of its strings
  do not parse ("No known action matches that input.": the game does not change; that action is
  dropped) or become ambiguous where it expected none (we answer "0", which is what it meant).
  `meta["replay"]` counts these per episode. Gold strings also differ between loads of the same
  (task, variation), so rebuilt data are equal in content, not byte-identical.
- `meta["gold_index"]` is the position in the gold action sequence; `step` counts emitted Steps.

Episodes whose gold path does not reach score 100 are reported as failures, not emitted.

Modules: `replay` (which (task, variation) pairs, and one gold path replayed into Steps), `parallel`
(`build_steps`: worker processes, resumable cache), `released` (the shared gold files), `common` (env
name, episode ids, parser answers, `summarize`). Every public name is re-exported here.
"""
from __future__ import annotations

from fastrank.data.scienceworld.common import AMBIGUOUS_PREFIX, ENV, PARSER_FAILURES, episode_id, summarize
from fastrank.data.scienceworld.parallel import BuildResult, build_steps, read_cache
from fastrank.data.scienceworld.released import GOLD_FILES, gold_files, steps_from_gold_file, steps_from_gold_files
from fastrank.data.scienceworld.replay import EpisodeFailure, gold_episode, select_pairs

__all__ = [
    "AMBIGUOUS_PREFIX", "BuildResult", "ENV", "EpisodeFailure", "GOLD_FILES", "PARSER_FAILURES", "build_steps",
    "episode_id", "gold_episode", "gold_files", "read_cache", "select_pairs", "steps_from_gold_file",
    "steps_from_gold_files", "summarize",
]
