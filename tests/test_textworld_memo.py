"""The TextWorld parse memo (fastrank/envs/textworld_memo.py): same games step for step, results never shared."""
from __future__ import annotations

import random

import pytest

from fastrank.envs import textworld_memo
from test_alfworld import games_root  # noqa: F401  (fixture: the unpacked json_2.1.1 release)

# A game whose expert falls back to a random command (step 3) and one that takes and places.
GAMES = ("train/look_at_obj_in_light-AlarmClock-None-DeskLamp-301/trial_T20190907_174127_043461",
         "train/pick_and_place_simple-KeyChain-None-SideTable-322/trial_T20190909_091659_910683")


def test_memoize_returns_copies_and_does_not_cache_errors():
    calls = []

    def parse(text, rule=None):
        calls.append(text)
        if text == "bad":
            raise SystemExit(1)
        return [{"symbol": text, "rule": rule}]

    f = textworld_memo.memoize(parse, maxsize=2)
    a = f("x", rule="r")
    a[0]["context"] = "game 1"  # callers mutate what they get (derivations set a context)
    assert f("x", rule="r") == [{"symbol": "x", "rule": "r"}] and calls == ["x"]
    for _ in range(2):
        with pytest.raises(SystemExit):
            f("bad")
    assert calls == ["x", "bad", "bad"]
    f("y"), f("z")  # evicts the least recently used ("x")
    f("x", rule="r")
    assert calls[-1] == "x" and len(f.memo) == 2


def _play(game_file, seed: int) -> list[tuple]:
    """Expert for 4 steps, then random admissible commands: every state the env gives, in full."""
    from fastrank.envs.alfworld import AlfworldEnv

    rng, env, seen = random.Random(seed), AlfworldEnv(game_file), []
    try:
        s = env.reset()
        while True:
            seen.append((s.observation, s.goal, tuple(s.admissible), s.reward, s.done, s.won,
                         s.info.get("expert_plan"), s.info.get("expert_source")))
            if s.done or len(seen) > 14:
                return seen
            s = env.step(s.info["expert_plan"] if len(seen) <= 4 else rng.choice(s.admissible))
    finally:
        env.close()


@pytest.mark.parametrize("game", GAMES)
def test_games_play_the_same_with_and_without_the_memo(games_root, game):  # noqa: F811
    game_file = games_root / game / "game.tw-pddl"
    textworld_memo.install()
    memo = [_play(game_file, seed=3), _play(game_file, seed=3)]  # the second replays from the memo
    with textworld_memo.disabled():
        import fast_downward

        assert not hasattr(fast_downward.pddl2sas, "memo")  # really TextWorld as installed
        plain = _play(game_file, seed=3)
    assert hasattr(fast_downward.pddl2sas, "memo")
    assert len(plain) > 5
    assert memo[0] == plain and memo[1] == plain
