"""What the ALFWorld sources share: the env name, the game path convention and the shared-file location."""
from __future__ import annotations

import os
from pathlib import Path

from fastrank.envs.alfworld import episode_id_for
from fastrank.paths import shared_data_dir

ENV = "alfworld"


def shared_alfworld_dir() -> Path:
    """Where the released ALFWorld files live: `shared_data_dir() / "alfworld"`."""
    return shared_data_dir() / "alfworld"


def game_rel(game_file: str | os.PathLike) -> str:
    """The game path relative to the release root (`meta["game"]`), the same for every source."""
    return episode_id_for(game_file).split("/", 1)[1] + "/game.tw-pddl"


__all__ = ["ENV", "game_rel", "shared_alfworld_dir"]
