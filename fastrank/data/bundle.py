"""Steps → split → candidate sets → files, and the small real dataset shipped inside the package.

Layout of a dataset directory (the bundled one is `fastrank/data/bundled/`):
    {env}.{split}.{mode}.jsonl.gz   CandidateSets, split ∈ train/test/eval, mode ∈ sampled/hard
    manifest.json                   counts, seed, sources and every split/negative-sampling report
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from fastrank.data.negatives import MODES, ActionPool, make_candidate_sets
from fastrank.data.record import ENVS, CandidateSet, DataError, Step, read_records, write_records
from fastrank.data.splits import SPLITS, assert_disjoint, dedup_key, split_episodes

BUNDLED_DIR = Path(__file__).with_name("bundled")


def dataset_path(root: str | os.PathLike, env: str, split: str, mode: str = "sampled") -> Path:
    if env not in ENVS:
        raise ValueError(f"unknown env {env!r}; expected one of {ENVS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if mode not in MODES:
        raise ValueError(f"unknown negative mode {mode!r}; expected one of {MODES}")
    return Path(root) / f"{env}.{split}.{mode}.jsonl.gz"


def write_dataset(steps_by_env: dict[str, Sequence[Step]], out_dir: str | os.PathLike, *, seed: int = 42,
                  eval_frac: float = 0.2, test_frac: float = 0.3, sources: dict | None = None) -> dict:
    """Split each environment's steps by episode, sample negatives per split in both modes, write files.

    Distractors for a split come only from that split's own expert actions, so no evaluation state's
    candidates are built from training states.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Rebuilding some environments (`--envs webshop`) keeps the other environments' files and entries.
    old = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    manifest: dict = {"seed": seed,
                      "envs": {k: v for k, v in old.get("envs", {}).items() if k not in steps_by_env},
                      "sources": {**{k: v for k, v in old.get("sources", {}).items() if k not in steps_by_env},
                                  **(sources or {})}}
    for env, steps in sorted(steps_by_env.items()):
        splits, split_report = _split(steps, seed=seed, eval_frac=eval_frac, test_frac=test_frac)
        env_report: dict = {"split": split_report, "files": {}}
        for split, split_steps in splits.items():
            pool = ActionPool.from_steps(split_steps)
            for mode in MODES:
                sets, rep = make_candidate_sets(split_steps, mode=mode, seed=seed, pool=pool)
                path = dataset_path(out, env, split, mode)
                write_records(path, sets)
                env_report["files"][path.name] = rep
        manifest["envs"][env] = env_report
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest


def _split(steps: Sequence[Step], **kw) -> tuple[dict[str, list[Step]], dict]:
    """`split_episodes`, except for steps whose builder fixed the split (`meta["split"]`, e.g. WebShop's
    test goals): those keep it. Fixed eval states that duplicate a train state are still removed."""
    fixed = [s for s in steps if s.meta.get("split")]
    splits, report = split_episodes([s for s in steps if not s.meta.get("split")], **kw)
    if not fixed:
        return splits, report
    bad = sorted({str(s.meta["split"]) for s in fixed} - set(SPLITS))
    if bad:
        raise ValueError(f"unknown fixed split(s) {bad}; expected one of {SPLITS}")
    for s in fixed:
        splits[s.meta["split"]].append(s)
    train_keys = {dedup_key(s) for s in splits["train"]}
    n_eval = len(splits["eval"])
    splits["eval"] = [s for s in splits["eval"] if s.meta.get("split") != "eval" or dedup_key(s) not in train_keys]
    assert_disjoint(splits)
    report["eval_removed_as_duplicates_of_train"] += n_eval - len(splits["eval"])
    report["fixed_split_states"] = dict(sorted(Counter(s.meta["split"] for s in fixed).items()))
    report["states"] = {k: len(v) for k, v in splits.items()}
    report["episodes"] = {k: len({s.episode_id for s in v}) for k, v in splits.items()}
    return splits, report


def load_dataset(root: str | os.PathLike, env: str, split: str, mode: str = "sampled", **read_kw) -> list[CandidateSet]:
    path = dataset_path(root, env, split, mode)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (dataset {root}: env={env} split={split} mode={mode})")
    return read_records(path, CandidateSet, **read_kw)


def load_bundled(env: str, split: str, mode: str = "sampled", **read_kw) -> list[CandidateSet]:
    """The small real dataset that ships with fastrank (built by `fastrank data build`)."""
    return load_dataset(BUNDLED_DIR, env, split, mode, **read_kw)


def stats(sets: Iterable[CandidateSet]) -> dict:
    """Per-environment counts, set-size histogram and mean candidates per set."""
    per_env: dict[str, Counter] = {}
    for cs in sets:
        per_env.setdefault(cs.env, Counter())[len(cs.candidates)] += 1
    out = {}
    for env, hist in sorted(per_env.items()):
        n = sum(hist.values())
        out[env] = {"sets": n, "candidates": sum(k * v for k, v in hist.items()),
                    "mean_candidates": sum(k * v for k, v in hist.items()) / n,
                    "size_histogram": dict(sorted(hist.items()))}
    return out


def format_stats(path: str, st: dict) -> str:
    lines = [f"{path}"]
    for env, s in st.items():
        lines.append(f"  {env}: {s['sets']} sets, {s['candidates']} candidates, "
                     f"mean {s['mean_candidates']:.2f} candidates/set")
        peak = max(s["size_histogram"].values())
        for size, count in s["size_histogram"].items():
            lines.append(f"    {size:>3} | {'#' * max(1, round(40 * count / peak)):<40} {count}")
    return "\n".join(lines)


__all__ = ["BUNDLED_DIR", "DataError", "dataset_path", "format_stats", "load_bundled", "load_dataset",
           "stats", "write_dataset"]
