"""Memoized parsing inside TextWorld's PDDL engine: the same ALFWorld games, about twice as fast.

Profiling an expert replay of ALFWorld train games (cProfile, `bench/bench_alfworld_env.py`) puts most of
an episode's time in work that is repeated with identical inputs:

- `fast_downward.pddl2sas(domain, problem)` -- the PDDL -> SAS translation -- runs four times per game:
  `PddlState` translates twice (plain and `optimize=True`), and TextWorld builds a `PddlState` in `load`
  and again in `reset` from the same problem text.
- the grammar parser (`textgen._parse_and_convert`, a tatsu PEG parser) re-parses the same few command
  templates (`"#intro#"`, `"take {o} from {r}"`, ...) for every admissible command of every step.
- `Rule.parse_conjunctive_query` re-parses the same grammar-rule conditions at every derivation.

All three are pure functions of their (string) arguments, so `install()` wraps each in a bounded
memo that hands every caller its own deep copy of the result -- the callers set attributes on the
returned objects (a derivation's symbols get a `context`), and a shared object would leak one game's
state into the next. Exceptions are not cached (a game whose loader calls `sys.exit` fails every time).
Observations and admissible lists are unchanged, step for step (`tests/test_textworld_memo.py` replays
real games with and without it).

Off with ``FASTRANK_TEXTWORLD_MEMO=0``. Versions it is written against: textworld 1.7.0 (what
alfworld 0.3.5 installs); when an attribute it wraps is missing, `install` leaves that one alone.
"""
from __future__ import annotations

import copy
import functools
import os
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable

_INSTALLED: dict[str, Callable] = {}  # "module:attribute" -> the original function
_MAX_TRANSLATIONS = 32  # ~8 concurrent games x (plain, optimize): the load -> reset pair always hits


def enabled() -> bool:
    return os.environ.get("FASTRANK_TEXTWORLD_MEMO", "1").strip().lower() not in ("0", "false", "no", "off")


def memoize(fn: Callable, maxsize: int | None) -> Callable:
    """`fn` with a memo on its (hashable) arguments; each call returns a deep copy of the stored result."""
    memo: OrderedDict = OrderedDict()

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        try:
            hit = memo[key]
        except KeyError:
            hit = memo[key] = fn(*args, **kwargs)
            if maxsize is not None and len(memo) > maxsize:
                memo.popitem(last=False)
        else:
            memo.move_to_end(key)
        return copy.deepcopy(hit)

    wrapper.memo = memo
    return wrapper


def _targets() -> list[tuple[object, str, int | None]]:
    """(module, attribute, memo size) for each pure function wrapped."""
    import fast_downward
    import textworld.envs.pddl.textgen as textgen
    import textworld.logic as logic

    return [(fast_downward, "pddl2sas", _MAX_TRANSLATIONS),
            (textgen, "_parse_and_convert", 4096),  # ~80 distinct templates in ALFWorld (measured)
            (logic, "_parse_and_convert", 4096)]  # Rule/Proposition parsing: conditions, queries


def install() -> bool:
    """Wrap TextWorld's parsers (idempotent); False when disabled by the environment variable."""
    if not enabled():
        return False
    for module, name, size in _targets():
        key = f"{module.__name__}:{name}"
        fn = getattr(module, name, None)
        if key in _INSTALLED or fn is None:
            continue
        _INSTALLED[key] = fn
        setattr(module, name, memoize(fn, size))
    return True


def uninstall() -> None:
    """Put the original functions back."""
    import importlib

    for key, fn in list(_INSTALLED.items()):
        module_name, name = key.split(":")
        setattr(importlib.import_module(module_name), name, fn)
        del _INSTALLED[key]


@contextmanager
def disabled():
    """TextWorld as installed inside the block (the env var keeps `AlfworldEnv` from re-installing); the memo
    is back after it, errors or not. Tests and the benchmark compare the two."""
    saved = os.environ.get("FASTRANK_TEXTWORLD_MEMO")
    uninstall()
    os.environ["FASTRANK_TEXTWORLD_MEMO"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["FASTRANK_TEXTWORLD_MEMO"]
        else:
            os.environ["FASTRANK_TEXTWORLD_MEMO"] = saved
        install()
