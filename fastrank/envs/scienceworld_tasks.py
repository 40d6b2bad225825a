"""ScienceWorld's 30 task types, their names in the data sets in use, the GCD levels and ETO's splits.

No simulator needed: the data builder, the GCD recipe and the tests read task names and splits without
starting the JVM. (`simulator_split_variations`, which asks the simulator, is in fastrank.envs.scienceworld.)
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from fastrank.paths import shared_data_dir

# (task id, canonical name), in the simulator's order. Task id "T-k": topic T, k-th task type.
TASKS: tuple[tuple[str, str], ...] = (
    ("1-1", "boil"), ("1-2", "melt"), ("1-3", "freeze"), ("1-4", "change-the-state-of-matter-of"),
    ("2-1", "use-thermometer"), ("2-2", "measure-melting-point-known-substance"),
    ("2-3", "measure-melting-point-unknown-substance"),
    ("3-1", "power-component"), ("3-2", "power-component-renewable-vs-nonrenewable-energy"),
    ("3-3", "test-conductivity"), ("3-4", "test-conductivity-of-unknown-substances"),
    ("4-1", "find-living-thing"), ("4-2", "find-non-living-thing"), ("4-3", "find-plant"),
    ("4-4", "find-animal"),
    ("5-1", "grow-plant"), ("5-2", "grow-fruit"),
    ("6-1", "chemistry-mix"), ("6-2", "chemistry-mix-paint-secondary-color"),
    ("6-3", "chemistry-mix-paint-tertiary-color"),
    ("7-1", "lifespan-longest-lived"), ("7-2", "lifespan-shortest-lived"),
    ("7-3", "lifespan-longest-lived-then-shortest-lived"),
    ("8-1", "identify-life-stages-1"), ("8-2", "identify-life-stages-2"),
    ("9-1", "inclined-plane-determine-angle"), ("9-2", "inclined-plane-friction-named-surfaces"),
    ("9-3", "inclined-plane-friction-unnamed-surfaces"),
    ("10-1", "mendelian-genetics-known-plant"), ("10-2", "mendelian-genetics-unknown-plant"),
)
TASK_NAMES: tuple[str, ...] = tuple(name for _, name in TASKS)
TASK_ID: dict[str, str] = {name: tid for tid, name in TASKS}


def _last_of_topic() -> frozenset[str]:
    last: dict[str, tuple[int, str]] = {}
    for tid, name in TASKS:
        topic, k = tid.split("-")
        if topic not in last or int(k) > last[topic][0]:
            last[topic] = (int(k), name)
    return frozenset(name for _, name in last.values())


L2_TASKS: frozenset[str] = _last_of_topic()


def canonical_task_name(name: str) -> str:
    """The simulator's task name for any spelling in use: "task-2a-test-conductivity-of-unknown-
    substances" (ETO), "measure-melting-point-(known-substance)", task ids ("1-1"), canonical names.
    Mirrors `scienceworld.utils.infer_task` without importing the simulator."""
    name = name.strip()
    if name in TASK_ID:
        return name
    ids = {tid: n for tid, n in TASKS}
    if name in ids:
        return ids[name]
    out = name.replace("mendellian", "mendelian")
    out = re.sub(r"task-(\d|a|b)+-|[()]", "", out)
    if out not in TASK_ID:
        raise ValueError(f"unknown ScienceWorld task {name!r}")
    return out


def task_topic(task: str) -> int:
    return int(TASK_ID[canonical_task_name(task)].split("-")[0])


def task_level(task: str) -> str:
    """"L2" for the out-of-domain task types (the last of each topic), else "L0/L1"."""
    return "L2" if canonical_task_name(task) in L2_TASKS else "L0/L1"


# ----------------------------------------------------------------------------------------- splits

def eto_split_pairs(split: str = "train", data_dir: str | os.PathLike | None = None) -> list[tuple[str, int]]:
    """ETO's (task, variation) pairs for split train/dev/test, task names canonicalised, file order."""
    if split not in ("train", "dev", "test"):
        raise ValueError(f"split must be train, dev or test, got {split!r}")
    root = Path(data_dir) if data_dir is not None else shared_data_dir()
    path = root / "scienceworld" / f"eto_sciworld_{split}_indices.json"
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    out = []
    for item in raw:
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise ValueError(f"{path}: expected [task, variation] pairs, got {item!r}")
        out.append((canonical_task_name(str(item[0])), int(item[1])))
    return out


__all__ = ["L2_TASKS", "TASKS", "TASK_ID", "TASK_NAMES", "canonical_task_name", "eto_split_pairs", "task_level",
           "task_topic"]
