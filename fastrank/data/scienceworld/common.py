"""What the ScienceWorld sources share: the env name, episode ids, the simulator's parser answers, and
the report counts over built Steps."""
from __future__ import annotations

from collections import Counter
from statistics import mean, median
from typing import Sequence

from fastrank.data.record import Step
from fastrank.envs.scienceworld_tasks import canonical_task_name

ENV = "scienceworld"
AMBIGUOUS_PREFIX = "Ambiguous request"
# What the simulator answers to input it cannot parse (the game state does not change).
PARSER_FAILURES = ("No known action matches that input.", "Unknown action.")


def episode_id(task: str, variation: int) -> str:
    return f"{ENV}/{canonical_task_name(task)}/{int(variation)}"


def is_digit_answer(action: str) -> bool:
    return action.strip().isdigit()


# ------------------------------------------------------------------------------------------ stats

def summarize(steps: Sequence[Step], failures: Sequence[dict] = ()) -> dict:
    """Counts for a report: episodes, steps, steps/episode, n_valid, gold-in-valid, per task."""
    eps = Counter(s.episode_id for s in steps)
    per_ep = list(eps.values())
    n_valid = [s.meta["n_valid"] for s in steps if s.meta.get("n_valid") is not None]
    giv = [bool(s.meta["gold_in_valid"]) for s in steps if "gold_in_valid" in s.meta]
    eiv = [bool(s.meta["expert_in_valid"]) for s in steps if "expert_in_valid" in s.meta]
    adm = [len(s.admissible) for s in steps if s.admissible is not None]
    by_task = Counter(s.task_type for s in steps)
    ep_by_task = Counter(e.split("/")[1] for e in eps)

    def _q(xs: list[float]) -> dict:
        if not xs:
            return {}
        xs = sorted(xs)
        return {"min": xs[0], "p10": xs[len(xs) // 10], "median": median(xs), "mean": round(mean(xs), 1),
                "p90": xs[(9 * len(xs)) // 10], "max": xs[-1]}

    return {
        "episodes": len(eps), "steps": len(steps), "failures": len(failures),
        "steps_per_episode": _q(per_ep), "n_valid": _q(n_valid), "admissible_len": _q(adm),
        "gold_in_valid_rate": round(sum(giv) / len(giv), 4) if giv else None,
        "expert_in_valid_rate": round(sum(eiv) / len(eiv), 4) if eiv else None,
        "canonical_method": dict(Counter(s.meta.get("canonical_method", "n/a") for s in steps)),
        "ambiguous_steps": sum(bool(s.meta.get("ambiguous")) for s in steps),
        "steps_by_task": dict(sorted(by_task.items())), "episodes_by_task": dict(sorted(ep_by_task.items())),
        "levels": dict(Counter(s.meta.get("level") for s in steps)),
    }


__all__ = ["AMBIGUOUS_PREFIX", "ENV", "PARSER_FAILURES", "episode_id", "is_digit_answer", "summarize"]
