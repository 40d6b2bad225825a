"""ALFWorld sources 2 and 3: the released trajectory files, read into `Step`s.

- `steps_from_gt_traj`: the ground-truth trajectories of the 3554 solvable train games (ShareGPT:
  human = observation, gpt = action); no admissible lists.
- `steps_from_expert_admissible`: 140 valid_seen episodes already replayed with the handcoded
  expert, with admissible lists.
"""
from __future__ import annotations

import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from fastrank.data.alfworld.common import ENV, game_rel, shared_alfworld_dir
from fastrank.data.record import DataError, Step, iter_jsonl
from fastrank.envs.alfworld import clean_feedback, episode_id_for, split_intro


@dataclass
class SourceReport:
    """What a reader of a released file kept, and what it left out and why."""

    path: str
    episodes: int = 0
    episodes_kept: int = 0
    episodes_not_won: list[str] = field(default_factory=list)
    steps: int = 0
    expert_in_admissible: int = 0  # over steps that have an admissible list
    steps_with_admissible: int = 0
    look_fallbacks: int = 0

    def __str__(self) -> str:
        s = (f"{self.path}: {self.episodes} episodes, {self.episodes_kept} kept, "
             f"{len(self.episodes_not_won)} not won (left out), {self.steps} steps")
        if self.steps_with_admissible:
            s += (f", expert action in admissible {self.expert_in_admissible}/{self.steps_with_admissible}"
                  f", look fallbacks {self.look_fallbacks}")
        return s + "".join(f"\n  not won: {e}" for e in self.episodes_not_won[:10])



def load_traj_meta(path: str | os.PathLike) -> dict[str, dict]:
    """traj_meta.jsonl.gz rows by episode id (split, task_type, pddl_params, human goals, ...)."""
    return {episode_id_for(row["dir"]): row for _, row in iter_jsonl(path)}


def _task_type(episode_id: str, meta: dict[str, dict] | None) -> str:
    if meta and episode_id in meta and meta[episode_id].get("task_type"):
        return meta[episode_id]["task_type"]
    return episode_id.split("/")[2].split("-", 1)[0]


def _default_meta_path(path: str | os.PathLike) -> Path | None:
    p = Path(path).with_name("traj_meta.jsonl.gz")
    return p if p.is_file() else None


def steps_from_gt_traj(path: str | os.PathLike | None = None, meta_path: str | os.PathLike | None = None, *,
                       report: SourceReport | None = None) -> list[Step]:
    """Steps of the released ground-truth train trajectories (gt_traj_train.jsonl.gz).

    Each line: {"dir": "json_2.1.1/train/<task>/<trial>", "conversations": [human, gpt, human, ...,
    human]}: human i is the observation before gpt action i (the first one holds the room and the
    goal; the last one is the final feedback, not a step). No admissible lists. `meta_path`
    (traj_meta.jsonl.gz, default: next to `path` if there) gives the task types.
    """
    path = path if path is not None else shared_alfworld_dir() / "gt_traj_train.jsonl.gz"
    report = report if report is not None else SourceReport(str(path))
    meta_path = meta_path if meta_path is not None else _default_meta_path(path)
    tmeta = load_traj_meta(meta_path) if meta_path else None
    out: list[Step] = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            episode_id = episode_id_for(row["dir"])
            conv = row["conversations"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: {exc}") from None
        roles = [m.get("from") for m in conv]
        if not conv or roles[0] != "human" or any(r != ("human" if i % 2 == 0 else "gpt") for i, r in enumerate(roles)):
            raise DataError(f"{where}: conversation is not human/gpt alternating from human: {roles[:6]}")
        report.episodes += 1
        observation, goal = split_intro(conv[0]["value"])
        if not goal:
            raise DataError(f"{where}: no 'Your task is to:' line in the first observation")
        split = episode_id.split("/")[1]
        task_type = _task_type(episode_id, tmeta)
        prev = None
        for t in range(len(conv) // 2):
            obs = observation if t == 0 else clean_feedback(conv[2 * t]["value"])
            action = conv[2 * t + 1]["value"].strip()
            st = Step(env=ENV, episode_id=episode_id, step=t, task_type=task_type, goal=goal, observation=obs,
                      expert_action=action, admissible=None,
                      meta={"source": "gt_traj", "split": split, "game": game_rel(episode_id),
                            "won": True, "prev_action": prev})
            try:
                st.validate()
            except ValueError as exc:
                raise DataError(f"{where}: step {t}: {exc}") from None
            out.append(st)
            prev = action
        report.episodes_kept += 1
    report.steps = len(out)
    return out


def steps_from_expert_admissible(path: str | os.PathLike | None = None, meta_path: str | os.PathLike | None = None, *,
                                 only_won: bool = True, report: SourceReport | None = None) -> list[Step]:
    """Steps of the replayed valid_seen episodes (expert_admissible_valid_seen.jsonl.gz).

    Each line: {"game": "json_2.1.1/valid_seen/<task>/<trial>", "won", "final_obs", "steps": [{"obs",
    "admissible", "expert"}]}, where obs is the observation the expert acted on (the first one holds
    the room and the goal). `expert_source` is inferred: "initial_look" at step 0, "look_fallback"
    for a later `look` (the policy itself never says look), else "policy".
    """
    path = path if path is not None else shared_alfworld_dir() / "expert_admissible_valid_seen.jsonl.gz"
    report = report if report is not None else SourceReport(str(path))
    meta_path = meta_path if meta_path is not None else _default_meta_path(path)
    tmeta = load_traj_meta(meta_path) if meta_path else None
    out: list[Step] = []
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            episode_id = episode_id_for(row["game"])
            raw_steps = row["steps"]
            won = bool(row["won"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: {exc}") from None
        report.episodes += 1
        if not raw_steps:
            raise DataError(f"{where}: no steps")
        observation, goal = split_intro(raw_steps[0]["obs"])
        if not goal:
            raise DataError(f"{where}: no 'Your task is to:' line in the first observation")
        split = episode_id.split("/")[1]
        task_type = _task_type(episode_id, tmeta)
        steps: list[Step] = []
        prev = None
        for t, s in enumerate(raw_steps):
            action = s["expert"].strip()
            adm = list(s["admissible"]) if s.get("admissible") is not None else None
            source = "policy"
            if action == "look":
                source = "initial_look" if t == 0 else "look_fallback"
            st = Step(env=ENV, episode_id=episode_id, step=t, task_type=task_type, goal=goal,
                      observation=observation if t == 0 else clean_feedback(s["obs"]), expert_action=action,
                      admissible=adm, meta={"source": "expert_admissible", "split": split,
                                            "game": game_rel(episode_id), "won": won, "prev_action": prev,
                                            "expert_source": source})
            try:
                st.validate()
            except ValueError as exc:
                raise DataError(f"{where}: step {t}: {exc}") from None
            steps.append(st)
            prev = action
        if not won:
            report.episodes_not_won.append(episode_id)
            if only_won:
                continue
        report.episodes_kept += 1
        for st in steps:
            if st.admissible is not None:
                report.steps_with_admissible += 1
                report.expert_in_admissible += st.expert_action in st.admissible
            report.look_fallbacks += st.meta["expert_source"] == "look_fallback"
        out.extend(steps)
    report.steps = len(out)
    return out


def admissible_stats(steps: Iterable[Step]) -> dict:
    """Coverage of the expert action by the admissible list, overall and without `look` steps."""
    c = Counter()
    sizes = []
    for st in steps:
        if st.admissible is None:
            c["no_admissible"] += 1
            continue
        sizes.append(len(st.admissible))
        inside = st.expert_action in st.admissible
        c["with_admissible"] += 1
        c["in_admissible"] += inside
        if st.expert_action != "look":
            c["non_look"] += 1
            c["non_look_in_admissible"] += inside
    out = dict(c)
    if sizes:
        out["admissible_size"] = {"min": min(sizes), "median": statistics.median(sizes),
                                  "mean": round(statistics.fmean(sizes), 2), "max": max(sizes)}
    return out




__all__ = ["SourceReport", "admissible_stats", "load_traj_meta", "steps_from_expert_admissible", "steps_from_gt_traj"]
