"""Where the shared (not shipped) data lives: one lookup for builders, environments and recipes.

It sits at the bottom of the import graph (standard library only) so that the environment wrappers and
the data builders can both use it without importing `fastrank.data.build`, which imports them.
"""
from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path:
    """`$FASTRANK_SHARED_DATA`, else the `shared/data` folder beside the repository checkout."""
    env = os.environ.get("FASTRANK_SHARED_DATA")
    # fastrank/paths.py -> fastrank -> <checkout> -> <checkout's parent>/shared/data
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


__all__ = ["shared_data_dir"]
