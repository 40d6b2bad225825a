"""Wall time of ALFWorld episodes: TextWorld as installed vs with the parse memo (fastrank/envs/textworld_memo.py).

Run: `pytest bench/bench_alfworld_env.py --benchmark-only` (FASTRANK_BENCH_GAMES: how many real train games,
default 4). One round = load + reset + the handcoded expert's whole episode for each game, in one process,
the way DAgger's round 0 and `agent-eval` play them. Both variants play the same games in the same order;
a game's second play would hit the memo's translations, so the `memo` variant clears them before each round
(what a run sees: every game new). extra_info: steps, seconds per game, and the transcript's digest -- it must
be the same for both variants (the memo changes speed only; `tests/test_textworld_memo.py` asserts it state by state).
"""
import contextlib
import hashlib
import os
from pathlib import Path

import pytest

from fastrank.envs import textworld_memo

N = int(os.environ.get("FASTRANK_BENCH_GAMES", "4"))
SHARED = Path(os.environ.get("FASTRANK_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TARBALL = SHARED / "alfworld" / "json_2.1.1_games.tar.xz"


def _games() -> list[Path]:
    if not TARBALL.exists():
        pytest.skip(f"shared data not here: {TARBALL}")
    pytest.importorskip("alfworld")
    from fastrank.envs.alfworld import ensure_games, list_games

    games = list_games(ensure_games(TARBALL), "train")
    return [Path(g.game_file) for g in games[:: max(1, len(games) // N)][:N]]


def _play_all(games: list[Path]) -> tuple[int, str]:
    from fastrank.envs.alfworld import AlfworldEnv

    digest, steps = hashlib.sha1(), 0
    for game in games:
        env = AlfworldEnv(game)
        try:
            s = env.reset()
            while not s.done and env.steps < 50:
                digest.update(repr((s.observation, s.admissible)).encode())
                s = env.step(s.info["expert_plan"])
            steps += env.steps
        finally:
            env.close()
    return steps, digest.hexdigest()[:12]


@pytest.mark.parametrize("variant", ["textworld", "memo"])
def test_expert_episodes(benchmark, variant):
    games = _games()
    textworld_memo.install()
    import fast_downward

    with textworld_memo.disabled() if variant == "textworld" else contextlib.nullcontext():
        setup = fast_downward.pddl2sas.memo.clear if variant == "memo" else None  # every round's games new to it
        steps, digest = benchmark.pedantic(_play_all, args=(games,), setup=setup, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(games=len(games), steps=steps, transcript=digest,
                                seconds_per_game=round(benchmark.stats.stats.median / len(games), 3))
