"""The two records the data pipeline passes along, and their JSONL(.gz) I/O with validation.

`Step`: one state of a real expert trajectory (what a builder extracts from an environment's data).
`CandidateSet`: a Step turned into a ranking problem: the expert action among distractors.

Reading validates every record and raises `DataError("file:line: what is wrong")`; with
`skip_invalid=True` bad records are counted and reported in a `ReadReport` instead — never dropped
without a trace.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, TypeVar

ENVS = ("alfworld", "scienceworld", "webshop")
SOURCES = ("expert", "same_task", "other_task", "global", "admissible")
MAX_CANDIDATES = 20


class DataError(ValueError):
    """A record that breaks the data contract; the message starts with `file:line:`."""


@dataclass
class Step:
    """One expert state. `admissible` is the state's own valid-action list when the source has one."""

    env: str
    episode_id: str  # the *base* episode: upsampled copies share it, so splits never separate them
    step: int
    task_type: str
    goal: str
    observation: str
    expert_action: str
    admissible: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def validate(self, **_: object) -> None:
        _check_common(self)
        if not self.expert_action.strip():
            raise ValueError("empty expert_action")
        if self.admissible is not None and not isinstance(self.admissible, list):
            raise ValueError("admissible must be a list of strings or null")


@dataclass
class CandidateSet:
    """A goal + observation + candidate actions, exactly one of them the expert's."""

    env: str
    episode_id: str
    step: int
    task_type: str
    goal: str
    observation: str
    candidates: list[str]
    expert_index: int
    sources: list[str]  # one per candidate, from SOURCES
    copy: int = 0  # upsampling copy index (0 = the original)
    # the episode so far as [action, observation] pairs (agent data; None for the paper's per-step sets)
    history: list[list[str]] | None = None

    @property
    def expert_action(self) -> str:
        return self.candidates[self.expert_index]

    def validate(self, *, min_candidates: int = 1, max_candidates: int = MAX_CANDIDATES) -> None:
        _check_common(self)
        n = len(self.candidates)
        if not (min_candidates <= n <= max_candidates):
            raise ValueError(f"{n} candidates, expected {min_candidates}..{max_candidates}")
        if len(self.sources) != n:
            raise ValueError(f"{len(self.sources)} sources for {n} candidates")
        if not (0 <= self.expert_index < n):
            raise ValueError(f"expert_index {self.expert_index} out of range for {n} candidates")
        n_expert = sum(s == "expert" for s in self.sources)
        if n_expert != 1 or self.sources[self.expert_index] != "expert":
            raise ValueError(f"exactly one expert expected at expert_index, sources say {n_expert}")
        bad = sorted(set(self.sources) - set(SOURCES))
        if bad:
            raise ValueError(f"unknown candidate source(s) {bad}; known: {list(SOURCES)}")
        if any(not isinstance(c, str) or not c.strip() for c in self.candidates):
            raise ValueError("empty candidate action")
        if self.history is not None and any(not isinstance(t, (list, tuple)) or len(t) != 2 for t in self.history):
            raise ValueError("history must be a list of [action, observation] pairs")
        dup = [c for c, k in Counter(self.candidates).items() if k > 1]
        if dup:
            raise ValueError(f"duplicate candidate(s) {dup[:3]}")


def _check_common(r: Step | CandidateSet) -> None:
    if r.env not in ENVS:
        raise ValueError(f"unknown env {r.env!r}; expected one of {list(ENVS)}")
    for name in ("goal", "observation"):
        value = getattr(r, name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"empty {name}")
    if not str(r.episode_id):
        raise ValueError("empty episode_id")


R = TypeVar("R", Step, CandidateSet)


@dataclass
class ReadReport:
    path: str
    read: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" for each skipped record

    def __str__(self) -> str:
        s = f"{self.path}: {self.read} records read, {len(self.skipped)} skipped"
        return s + "".join(f"\n  {m}" for m in self.skipped[:10]) + ("\n  ..." if len(self.skipped) > 10 else "")


def _open_text(path: str | os.PathLike, mode: str, gz: bool | None = None) -> io.TextIOBase:
    if str(path).endswith(".gz") if gz is None else gz:
        # mtime=0 keeps rebuilt .gz files byte-identical for identical content.
        raw = open(path, mode + "b")
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw, mode=mode + "b", mtime=0), encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, parsed object) for each non-blank line; bad JSON raises DataError with file:line."""
    with _open_text(path, "r") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            yield lineno, obj


def read_records(
    path: str | os.PathLike,
    kind: type[R] = CandidateSet,
    *,
    skip_invalid: bool = False,
    min_candidates: int = 1,
    max_candidates: int = MAX_CANDIDATES,
    report: ReadReport | None = None,
) -> list[R]:
    """Read and validate a JSONL(.gz) file of `kind` records."""
    report = report if report is not None else ReadReport(str(path))
    names = {f.name for f in dataclasses.fields(kind)}
    required = {f.name for f in dataclasses.fields(kind) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING}
    out: list[R] = []
    for lineno, obj in iter_jsonl(path):
        try:
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            missing = sorted(required - obj.keys())
            if missing:
                raise ValueError(f"missing field(s) {missing}")
            unknown = sorted(obj.keys() - names)
            if unknown:
                raise ValueError(f"unknown field(s) {unknown}")
            rec = kind(**obj)
            rec.validate(min_candidates=min_candidates, max_candidates=max_candidates)
        except (ValueError, TypeError) as exc:
            msg = f"{path}:{lineno}: {exc}"
            if not skip_invalid:
                raise DataError(msg) from None
            report.skipped.append(msg)
            continue
        out.append(rec)
    report.read = len(out)
    return out


def write_records(path: str | os.PathLike, records: Iterable[Step | CandidateSet]) -> int:
    """Write records as JSONL (gzip when the name ends in .gz), atomically; returns the count."""
    tmp = f"{path}.tmp"
    n = 0
    with _open_text(tmp, "w", gz=str(path).endswith(".gz")) as f:
        for r in records:
            f.write(json.dumps(dataclasses.asdict(r), ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    os.replace(tmp, path)
    return n
