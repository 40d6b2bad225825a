"""WebShop search-query `Step`s (and demonstration states) from the human data in shared/data/webshop.

The click states on real pages come from a separate source, `fastrank.data.webshop_clicks` (the expert in
our WebShop environment over the 1000-product catalog). This module reads the human data, which is on
the full catalog that the environment does not have:

1. **Query-selection states** from `goal_query_map.json` (1,506 human instructions -> the search
   queries humans typed for them in the demonstrations). One Step per (goal, distinct query): the
   search page is the same page whichever query the human then types, so a goal with k distinct
   queries gives k Steps with the same goal/observation and different expert actions, all in the
   goal's episode. Queries are whitespace-collapsed; case/space duplicates of a goal are collapsed
   (counted). `admissible` is None: the search box accepts any text.
2. **Session logs** (`human_session_logs/*.jsonl`, raw human browsing sessions). They record
   the page *kind*, URL, goal and ids (search keywords, result ASINs, chosen options) but **no page
   text**, so only their search states can be rendered faithfully (the search page shows nothing but
   the instruction). Every other transition is decoded into the human's action (reported) and then
   skipped with the reason "no page text" — a results page without product titles and prices is not
   an observation an agent ever sees.
3. **`il_trajs_finalized_images.jsonl`** (the official 1,571 human demonstrations, not obtainable here;
   `steps_from_il_trajs` reads it when a user has it): per trajectory `states` (page texts),
   `available_actions` (per state), `actions` (`search[...]` / `click[...]`) and `action_idxs` (index
   of the taken action in the state's list, -1 for searches), as read by WebShop's
   `baseline_models/train_choice_il.py`.

Observation rendering: WebShop's `text` observation mode (what ReAct/ETO-style agents see):
`' [SEP] '.join(visible text nodes)`, e.g. the search page is
`"WebShop [SEP] Instruction: [SEP] <instruction> [SEP] Search"`. The demonstrations file stores
states in the `text_rich` mode (`"WebShop\\nInstruction:  \\n...\\n[button] Search [button_]\\n"`);
`rich_to_text` converts them so all WebShop Steps share one format (`observation_format="raw"` keeps
them verbatim). The instructions in `human_goals.json` / `goal_query_map.json` are WebShop's
*processed* goals (lower-cased, quotes removed, no ", and price lower than N dollars" clause: that
price comes from the catalog), so query-map observations lack the price clause that the live site
shows; session-log and demonstration states carry the full instruction.

Episodes: `episode_id = "webshop/goal/<i>"`, `i` the first index of the instruction in
`human_goals.json` (what `human_goals.index(goal)` gives in WebShop's code; WebShop's `fixed_<i>`
sessions and ETO's goal splits use the same indexing). Every source's states of one goal share the
episode, so an episode-level split never separates them. An instruction not in `human_goals.json`
gets `"webshop/goaltext/<sha1 of the processed instruction>"` (counted). `step` is a running index,
unique within the episode; `meta["turn"]` is the position inside the source trajectory.

task_type: the product category is not derivable (`human_goals.json` carries no ASIN and
`items_ins_v2_1000.json` has no category and only synthetic instructions), so task_type is the page
kind: "search" (query selection), "results", "item" (product page, options, buy), "item_detail"
(description/features/reviews/attributes sub-pages). The session logs' category is kept in
`meta["category"]`.

When sources overlap, the more faithful copy of a search state wins — demonstrations, then session
logs, then the query map — keyed on (episode, normalised query); dropped copies are counted.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import unquote

from fastrank.data.record import DataError, Step, iter_jsonl, write_records

ENV = "webshop"
SEARCH_PAGE_TEMPLATE = "WebShop [SEP] Instruction: [SEP] {instruction} [SEP] Search"
PRICE_CLAUSE = ", and price lower than"
# WebShop's official goal-index split (baseline_models/env.py, train_choice_il.py).
OFFICIAL_SPLITS = (("test", 0, 500), ("eval", 500, 1500), ("train", 1500, None))
SOURCE_PRIORITY = ("il_trajs", "session_logs", "goal_query_map")  # most faithful first
MAX_EXAMPLES = 20  # skip messages kept verbatim per source (all are counted)

_ASIN = re.compile(r"^b[0-9a-z]{9}$")
_BUTTON = re.compile(r"^\[(?:clicked )?button\]\s?(.*?)\s?\[(?:clicked )?button_\]$")
_INSTRUCTION = re.compile(r"Instruction:\s*(?:\[SEP\])?\s*(.*?)\s*(?:\[SEP\]|\[button\]|$)", re.S)
DETAIL_TABS = ("description", "features", "reviews", "attributes")


# --------------------------------------------------------------------------------------------- paths

def default_data_dir() -> Path:
    """`shared_data_dir() / "webshop"`."""
    from fastrank.paths import shared_data_dir

    return shared_data_dir() / "webshop"


def _resolve(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir) if data_dir is not None else default_data_dir()


# --------------------------------------------------------------------------------------------- goals

def process_goal(text: str) -> str:
    """WebShop's `process_goal`: the instruction as stored in human_goals.json (no page header,
    lower-cased, quotes removed, price clause cut)."""
    s = text.lower().replace('"', "").replace("'", "")
    s = s.replace("amazon shopping game\ninstruction:", "").replace("webshop\ninstruction:", "")
    s = s.replace("\n[button] search [button_]", "").strip()
    if PRICE_CLAUSE in s:
        s = s.split(PRICE_CLAUSE)[0]
    return s


def _norm_goal(text: str) -> str:
    return " ".join(process_goal(text).split())


def normalize_query(query: str) -> str:
    return " ".join(query.split())


def _query_key(query: str) -> str:
    return " ".join(query.lower().split())


class GoalIndex:
    """Instruction text -> indices in human_goals.json (exact, then whitespace-normalised)."""

    def __init__(self, human_goals: Sequence[str]):
        self.goals = list(human_goals)
        self.exact: dict[str, list[int]] = defaultdict(list)
        self.loose: dict[str, list[int]] = defaultdict(list)
        for i, g in enumerate(self.goals):
            self.exact[g].append(i)
            self.loose[" ".join(g.split())].append(i)

    def lookup(self, instruction: str) -> list[int]:
        """All indices of the instruction (processed like WebShop does), [] if absent."""
        p = process_goal(instruction)
        return list(self.exact.get(p) or self.loose.get(" ".join(p.split()), []))

    def episode_id(self, instruction: str) -> tuple[str, list[int]]:
        idxs = self.lookup(instruction)
        if idxs:
            return f"{ENV}/goal/{idxs[0]}", idxs
        digest = hashlib.sha1(_norm_goal(instruction).encode()).hexdigest()[:12]
        return f"{ENV}/goaltext/{digest}", []


def load_goal_index(data_dir: str | os.PathLike | None = None) -> GoalIndex:
    return GoalIndex(_load_json(_resolve(data_dir) / "human_goals.json", list))


def official_split(goal_idx: int) -> str:
    """WebShop's own split of goal indices: test [0, 500), eval [500, 1500), train [1500, ...)."""
    for name, lo, hi in OFFICIAL_SPLITS:
        if goal_idx >= lo and (hi is None or goal_idx < hi):
            return name
    raise ValueError(f"negative goal index {goal_idx}")


def goal_split(data_dir: str | os.PathLike | None = None) -> dict[str, list[int]]:
    """ETO's WebShop goal-index split: {"train": [...], "test": [...], "both": [...]}.

    Indices are into human_goals.json (= WebShop's `fixed_<i>` sessions). The shipped lists overlap:
    "both" holds the indices listed in train *and* test (21 here); a leak-safe splitter should treat
    them as test. Use `eto_split_of(step, split)` to place a Step.
    """
    d = _resolve(data_dir)
    train = sorted(set(_load_json(d / "eto_webshop_train_indices.json", list)))
    test = sorted(set(_load_json(d / "eto_webshop_test_indices.json", list)))
    return {"train": train, "test": test, "both": sorted(set(train) & set(test))}


def eto_split_of(step: Step, split: dict[str, list[int]]) -> str | None:
    """"test" if any of the step's goal indices is in ETO's test list (leak-safe for duplicated
    instructions), else "train" if any is in the train list, else None (goal not in ETO's lists)."""
    idxs = set(step.meta.get("goal_indices") or [])
    if idxs & set(split["test"]):
        return "test"
    if idxs & set(split["train"]):
        return "train"
    return None


# --------------------------------------------------------------------------------------- rendering

def search_page(instruction: str) -> str:
    """The search page in WebShop's text observation mode."""
    return SEARCH_PAGE_TEMPLATE.format(instruction=instruction.strip())


def rich_to_text(state: str) -> str:
    """A `text_rich` observation (one visible text node per line, buttons as `[button] x [button_]`)
    in the `text` mode (`' [SEP] '.join(nodes)`). Text mode states pass through unchanged."""
    if "\n" not in state and "[button]" not in state:
        return state.strip()
    nodes = []
    for line in state.split("\n"):
        s = line.strip()
        if not s:
            continue
        m = _BUTTON.match(s)
        nodes.append(m.group(1).strip() if m else s)
    # text_rich prepends "You have clicked <option>." lines that the text mode does not have.
    while nodes and nodes[0].startswith("You have clicked ") and nodes[0].endswith("."):
        nodes.pop(0)
    return " [SEP] ".join(nodes)


def instruction_from_state(state: str) -> str | None:
    """The instruction shown on a page (rich or text mode), None if the page shows none."""
    m = _INSTRUCTION.search(state)
    if not m or not m.group(1).strip():
        return None
    return m.group(1).strip()


def page_kind(admissible: Sequence[str] | None, expert: str) -> str:
    """task_type of a state from its clickables: search / results / item / item_detail."""
    if expert.startswith("search[") or not admissible:
        return "search" if expert.startswith("search[") else "other"
    args = {a[len("click["):-1].strip().lower() for a in admissible if a.startswith("click[")}
    if "buy now" in args:
        return "item"
    if "next >" in args or any(_ASIN.match(a) for a in args):
        return "results"
    return "item_detail"


def as_click(action: str) -> str:
    a = action.strip()
    if a.startswith("click[") or a.startswith("search["):
        return a
    return f"click[{a}]"


# ------------------------------------------------------------------------------------------ report

class _Skips:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def add(self, reason: str, where: str = "") -> None:
        self.counts[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}" if where else reason)

    def as_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": list(self.examples)}


def _load_json(path: Path, kind: type):
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(obj, kind):
        raise DataError(f"{path}:1: expected a JSON {kind.__name__}, got {type(obj).__name__}")
    return obj


def _goal_meta(idxs: list[int]) -> dict:
    if not idxs:
        return {"goal_idx": None, "goal_indices": [], "official_split": None}
    return {"goal_idx": idxs[0], "goal_indices": idxs, "official_split": official_split(idxs[0])}


# ------------------------------------------------------------------------------ 1. goal_query_map

def steps_from_goal_query_map(data_dir: str | os.PathLike | None = None,
                              goals: GoalIndex | None = None) -> tuple[list[Step], dict]:
    """One search-page Step per (goal, distinct query) of goal_query_map.json."""
    d = _resolve(data_dir)
    path = d / "goal_query_map.json"
    gmap = _load_json(path, dict)
    goals = goals or load_goal_index(d)
    skips = _Skips()
    steps: list[Step] = []
    n_pairs = collapsed = mapped = multi = 0
    for goal, queries in gmap.items():
        if not isinstance(queries, list):
            skips.add(f"queries not a list ({type(queries).__name__})", f"{path}: {goal[:60]!r}")
            continue
        episode, idxs = goals.episode_id(goal)
        mapped += bool(idxs)
        multi += len(idxs) > 1
        seen: set[str] = set()
        for rank, q in enumerate(queries):
            n_pairs += 1
            if not isinstance(q, str) or not q.strip():
                skips.add("empty or non-string query", f"{path}: {goal[:60]!r}")
                continue
            query = normalize_query(q)
            if "[" in query or "]" in query:
                skips.add("query contains a bracket (not expressible as search[...])", f"{path}: {query!r}")
                continue
            if _query_key(query) in seen:
                collapsed += 1
                continue
            seen.add(_query_key(query))
            if not goal.strip():
                skips.add("empty goal", str(path))
                continue
            steps.append(Step(
                env=ENV, episode_id=episode, step=0, task_type="search", goal=goal.strip(),
                observation=search_page(goal), expert_action=f"search[{query}]", admissible=None,
                meta={"source": "goal_query_map", "turn": 0, "query_rank": rank, **_goal_meta(idxs)},
            ))
    report = {
        "goals": len(gmap), "pairs": n_pairs, "states": len(steps),
        "case_space_duplicate_queries_collapsed": collapsed,
        "goals_mapped_to_human_goals": mapped, "goals_unmapped": len(gmap) - mapped,
        "goals_with_several_indices": multi, "skipped": skips.as_dict(),
    }
    return steps, report


# ------------------------------------------------------------------------------- 2. session logs

def _session_keywords(entry: dict) -> list[str] | None:
    kw = (entry.get("content") or {}).get("keywords")
    if isinstance(kw, list) and all(isinstance(k, str) for k in kw):
        return kw
    if isinstance(kw, str):  # item pages log the keywords as a Python list repr
        return re.findall(r"'([^']*)'", kw) or None
    return None


def _decode_transition(prev: dict, cur: dict) -> str | None:
    """The human action that led from page `prev` to page `cur`, None if not recoverable."""
    a, b = prev.get("page"), cur.get("page")
    pc, cc = prev.get("content") or {}, cur.get("content") or {}
    if a == "index" and b == "search_results":
        kw = _session_keywords(cur)
        return f"search[{normalize_query(' '.join(kw))}]" if kw else None
    if a == "search_results" and b == "index":
        return "click[back to search]"
    if a == "search_results" and b == "search_results":
        try:
            p0, p1 = int(pc.get("page")), int(cc.get("page"))
        except (TypeError, ValueError):
            return None
        return "click[next >]" if p1 == p0 + 1 else "click[< prev]" if p1 == p0 - 1 else None
    if a == "search_results" and b == "item_page" and cc.get("asin"):
        return f"click[{cc['asin'].lower()}]"
    if a == "item_page" and b == "item_page" and pc.get("asin") == cc.get("asin"):
        o0, o1 = pc.get("options") or {}, cc.get("options") or {}
        changed = [v for k, v in o1.items() if o0.get(k) != v]
        return f"click[{changed[0]}]" if len(changed) == 1 else None
    if a == "item_page" and b == "item_sub_page":
        m = re.search(r"/item_sub_page/[^/]+/[^/]+/[^/]+/[^/]+/([^/]+)/", cur.get("url", ""))
        return f"click[{unquote(m.group(1)).lower()}]" if m else None
    if a == "item_sub_page" and b == "item_page":
        return "click[< prev]"
    if a == "item_page" and b == "search_results":
        return "click[< prev]"
    if a == "item_page" and b == "done":
        return "click[buy now]"
    return None


def parse_session_log(path: str | os.PathLike, goals: GoalIndex) -> tuple[list[Step], dict]:
    """Steps from one raw session log: search states (fully renderable); every other decoded action is
    reported and skipped because the log holds no page text."""
    entries = list(iter_jsonl(path))
    name = Path(path).name
    skips = _Skips()
    steps: list[Step] = []
    actions: list[str] = []
    for (ln0, prev), (ln1, cur) in zip(entries, entries[1:]):
        where = f"{path}:{ln0}"
        if not isinstance(prev, dict) or not isinstance(cur, dict):
            raise DataError(f"{path}:{ln0 if not isinstance(prev, dict) else ln1}: expected a JSON object")
        goal = prev.get("goal") or {}
        instruction = goal.get("instruction_text")
        if not isinstance(instruction, str) or not instruction.strip():
            skips.add("no goal instruction_text", where)
            continue
        if (cur.get("goal") or {}).get("instruction_text") != instruction:
            skips.add("goal changes between consecutive pages", where)
            continue
        if prev.get("page") == cur.get("page") and prev.get("url") == cur.get("url"):
            skips.add("same page logged twice (reload, no action)", where)
            continue
        action = _decode_transition(prev, cur)
        if action is None:
            skips.add(f"unrecognised transition {prev.get('page')} -> {cur.get('page')}", where)
            continue
        actions.append(action)
        if prev.get("page") != "index":
            skips.add("click state: the log has no page text or clickables", where)
            continue
        episode, idxs = goals.episode_id(instruction)
        steps.append(Step(
            env=ENV, episode_id=episode, step=0, task_type="search", goal=instruction.strip(),
            observation=search_page(instruction), expert_action=action, admissible=None,
            meta={"source": "session_logs", "file": name, "line": ln0, "turn": len(actions) - 1,
                  "category": goal.get("category"), **_goal_meta(idxs)},
        ))
    terminal = sum(1 for _, e in entries if isinstance(e, dict) and e.get("page") == "done")
    report = {"pages": len(entries), "states": len(steps), "actions_decoded": actions,
              "terminal_pages": terminal, "skipped": skips.as_dict()}
    return steps, report


def steps_from_session_logs(data_dir: str | os.PathLike | None = None,
                            goals: GoalIndex | None = None) -> tuple[list[Step], dict]:
    d = _resolve(data_dir)
    goals = goals or load_goal_index(d)
    files = sorted((d / "human_session_logs").glob("*.jsonl"))
    steps: list[Step] = []
    per_file: dict[str, dict] = {}
    total = Counter()
    for f in files:
        s, r = parse_session_log(f, goals)
        steps += s
        per_file[f.name] = r
        total.update(r["skipped"]["counts"])
    report = {"files": len(files), "states": len(steps),
              "actions_decoded": sum(len(r["actions_decoded"]) for r in per_file.values()),
              "skipped": dict(sorted(total.items())), "per_file": per_file}
    return steps, report


# ------------------------------------------------------------------------------------ 3. il_trajs

IL_REQUIRED = ("states", "available_actions", "actions", "action_idxs")


def steps_from_il_trajs(path: str | os.PathLike, goals: GoalIndex | None = None,
                        data_dir: str | os.PathLike | None = None,
                        observation_format: str = "text") -> tuple[list[Step], dict]:
    """Steps from WebShop's `il_trajs_finalized_images.jsonl` (one trajectory per line).

    A line that is not JSON, not an object, lacks a field or has misaligned lists raises
    `DataError("file:line: ...")`: that is a broken file, not a skippable state. Steps whose action
    cannot be recovered (index out of range, action disagreeing with its indexed choice, empty
    action) are skipped and counted. `observation_format`: "text" (WebShop text mode, default) or
    "raw" (the stored state verbatim).
    """
    if observation_format not in ("text", "raw"):
        raise ValueError(f"observation_format must be 'text' or 'raw', not {observation_format!r}")
    goals = goals or load_goal_index(data_dir)
    skips = _Skips()
    steps: list[Step] = []
    n_traj = n_raw = 0
    unmapped = 0
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in IL_REQUIRED if k not in obj]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing}")
        states, avail, actions, idxs = (obj[k] for k in IL_REQUIRED)
        for k in IL_REQUIRED:
            if not isinstance(obj[k], list):
                raise DataError(f"{where}: field {k!r} must be a list, got {type(obj[k]).__name__}")
        n = len(actions)
        if not (len(avail) == len(idxs) == n and len(states) in (n, n + 1)):
            raise DataError(f"{where}: misaligned lists: {len(states)} states, {len(avail)} "
                            f"available_actions, {n} actions, {len(idxs)} action_idxs")
        translate = obj.get("actions_translate")
        n_traj += 1
        if not states or not isinstance(states[0], str):
            skips.add("trajectory without a first state", where)
            n_raw += n
            continue
        instruction = instruction_from_state(rich_to_text(states[0]))
        if instruction is None:
            skips.add("no instruction on the first page", where)
            n_raw += n
            continue
        episode, gidx = goals.episode_id(instruction)
        unmapped += not gidx
        for t in range(n):
            n_raw += 1
            state, action, acts, idx = states[t], actions[t], avail[t], idxs[t]
            w = f"{where} step {t}"
            if not isinstance(state, str) or not state.strip():
                skips.add("empty state", w)
                continue
            if not isinstance(action, str) or not action.strip():
                skips.add("empty action", w)
                continue
            action = action.strip()
            obs = rich_to_text(state) if observation_format == "text" else state
            meta = {"source": "il_trajs", "traj_line": lineno, "turn": t, **_goal_meta(gidx)}
            if isinstance(translate, list) and t < len(translate) and translate[t] != action:
                meta["action_translate"] = translate[t]
            if action.startswith("search["):
                if not action.endswith("]") or not action[len("search["):-1].strip():
                    skips.add("malformed search action", w)
                    continue
                expert = f"search[{normalize_query(action[len('search['):-1])}]"
                steps.append(Step(env=ENV, episode_id=episode, step=0, task_type="search",
                                  goal=instruction, observation=obs, expert_action=expert,
                                  admissible=None, meta=meta))
                continue
            if not isinstance(acts, list) or not all(isinstance(a, str) for a in acts):
                skips.add("available_actions is not a list of strings", w)
                continue
            if not isinstance(idx, int) or isinstance(idx, bool) or not (0 <= idx < len(acts)):
                skips.add("action_idx out of range of available_actions", w)
                continue
            admissible = list(dict.fromkeys(as_click(a) for a in acts if a.strip()))
            chosen = as_click(acts[idx])
            if " ".join(chosen.lower().split()) != " ".join(as_click(action).lower().split()):
                skips.add("action disagrees with available_actions[action_idx]", w)
                continue
            steps.append(Step(env=ENV, episode_id=episode, step=0,
                              task_type=page_kind(admissible, chosen), goal=instruction,
                              observation=obs, expert_action=chosen, admissible=admissible,
                              meta=meta))
    report = {"trajectories": n_traj, "raw_steps": n_raw, "states": len(steps),
              "trajectories_goal_not_in_human_goals": unmapped, "skipped": skips.as_dict()}
    return steps, report


# ------------------------------------------------------------------------------------------- build

def _number_steps(steps: list[Step]) -> None:
    """`step` := running index within the episode, in output order."""
    counter: Counter[str] = Counter()
    for s in steps:
        s.step = counter[s.episode_id]
        counter[s.episode_id] += 1


def build_steps(data_dir: str | os.PathLike | None = None,
                il_trajs: str | os.PathLike | None = None,
                observation_format: str = "text") -> tuple[list[Step], dict]:
    """All WebShop Steps obtainable from `data_dir` (+ the demonstrations file when given).

    Returns (steps, report). Order: demonstrations, session logs, query map; search states present
    in a more faithful source are dropped from the less faithful ones (counted under "overlap").
    Every Step is validated (a failure raises: it would be a builder bug).
    """
    d = _resolve(data_dir)
    goals = load_goal_index(d)
    by_source: dict[str, list[Step]] = {}
    report: dict = {"data_dir": str(d)}
    if il_trajs is not None:
        by_source["il_trajs"], report["il_trajs"] = steps_from_il_trajs(
            il_trajs, goals, observation_format=observation_format)
    else:
        report["il_trajs"] = None
    by_source["session_logs"], report["session_logs"] = steps_from_session_logs(d, goals)
    by_source["goal_query_map"], report["goal_query_map"] = steps_from_goal_query_map(d, goals)

    seen: set[tuple[str, str]] = set()
    overlap: Counter[str] = Counter()
    out: list[Step] = []
    for src in SOURCE_PRIORITY:
        fresh = []
        for s in by_source.get(src, []):
            if s.task_type == "search":
                key = (s.episode_id, _query_key(s.expert_action))
                if key in seen and src != "il_trajs":  # demonstrations keep their own repeats
                    overlap[f"{src} search states already in a more faithful source"] += 1
                    continue
                fresh.append((key, s))
            else:
                fresh.append((None, s))
        for key, s in fresh:
            if key is not None:
                seen.add(key)
            out.append(s)
    _number_steps(out)
    for s in out:
        try:
            s.validate()
        except ValueError as exc:
            raise AssertionError(f"builder produced an invalid Step {s.episode_id}/{s.step}: {exc}")

    split = goal_split(d)
    eto = Counter(eto_split_of(s, split) or "none" for s in out)
    report.update({
        "overlap_dropped": dict(overlap),
        "states_per_source": dict(Counter(s.meta["source"] for s in out)),
        "task_types": dict(sorted(Counter(s.task_type for s in out).items())),
        "total": len(out),
        "episodes": len({s.episode_id for s in out}),
        "eto_split_of_states": dict(sorted(eto.items())),
        "eto_split_of_episodes": dict(sorted(Counter(
            eto_split_of(s, split) or "none" for s in {s.episode_id: s for s in out}.values()).items())),
        "official_split_of_states": dict(sorted(Counter(
            str(s.meta.get("official_split")) for s in out).items())),
        "eto_index_lists_overlap": len(split["both"]),
    })
    return out, report


def _summary(report: dict) -> dict:
    """The report without the long per-file action lists (for printing)."""
    r = json.loads(json.dumps(report))
    for f in (r.get("session_logs") or {}).get("per_file", {}).values():
        f["actions_decoded"] = len(f["actions_decoded"])
        f["skipped"] = f["skipped"]["counts"]
    return r


def main(argv: Iterable[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build WebShop expert Steps (JSONL.gz).")
    ap.add_argument("--data-dir", default=None, help="shared WebShop data (default: %(default)s -> auto)")
    ap.add_argument("--il-trajs", default=None, help="il_trajs_finalized_images.jsonl, if you have it")
    ap.add_argument("--out", default="build_cache/webshop_steps.jsonl.gz")
    ap.add_argument("--observation-format", choices=("text", "raw"), default="text")
    args = ap.parse_args(list(argv) if argv is not None else None)
    steps, report = build_steps(args.data_dir, args.il_trajs, args.observation_format)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    n = write_records(args.out, steps)
    json.dump(_summary(report), sys.stdout, indent=1)
    print(f"\nwrote {n} steps to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
