"""Shared test doubles for the GCD tests (no tests here): a tiny corridor TextEnv and a policy stub that plays a script."""
from __future__ import annotations

from fastrank.envs.base import EnvState
from fastrank.gcd.policy import Generation
from fastrank.gcd.rollout import Episode, Turn


class CorridorEnv:
    """Rooms 0..n-1; start in room 0; won on entering the last room. Counts the steps it was given."""

    ADMISSIBLE = ["go forward", "go back", "look"]

    def __init__(self, n: int = 3):
        self.n, self.room, self.steps, self.actions = n, 0, 0, []

    def _state(self, obs, reward=0.0):
        won = self.room == self.n - 1
        return EnvState(obs, f"reach room {self.n - 1}", list(self.ADMISSIBLE), "corridor", reward, won, won, {})

    def reset(self, task):
        self.room, self.steps, self.actions = 0, 0, []
        return self._state("You are in room 0.")

    def step(self, action):
        self.steps += 1
        self.actions.append(action)
        if action == "go forward":
            self.room = min(self.n - 1, self.room + 1)
        elif action == "go back":
            self.room = max(0, self.room - 1)
        elif action != "look":
            return self._state("Nothing happens.")
        won = self.room == self.n - 1
        return self._state(f"You are in room {self.room}.", 1.0 if won else 0.0)

    def close(self):
        pass


class StubPolicy:
    """generate() returns script(prompt, call index) as text; no tokens (for rollout logic only)."""

    def __init__(self, script):
        self.script, self.calls, self.prompts = script, 0, []

    def generate(self, prompts, **kwargs):
        out = []
        for p in prompts:
            self.prompts.append(p)
            out.append(Generation(self.script(p, self.calls), [], []))
            self.calls += 1
        return out


def say(action: str, think: str = "ok") -> str:
    return f"<think>{think}</think><action>{action}</action>"


def verdict(label: int, advice: str = "Do not repeat an action that changed nothing.") -> str:
    return f"<think>check</think><answer>\\boxed{{{label}}}</answer><advise>{advice}</advise>"


def make_turn(step, obs, action, nxt, error=None, env_action="same", ids=(1,)):
    """A Turn as the rollout records it; env_action "same": the env was given `action`."""
    return Turn(step=step, observation=obs, prompt=f"prompt {step}", response=say(action or ""), think="ok",
                action=action, env_action=action if env_action == "same" else env_action, error=error,
                next_observation=nxt, response_ids=list(ids), prompt_ids=[5], logprobs=[-1.0] * len(ids))


def make_episode(turns, won, group="g", sample=0, level="L0"):
    return Episode(task=group, group=group, sample=sample, env="alfworld", level=level, task_type="t", goal="goal",
                   turns=turns, won=won, reward=1.0 if won else 0.0)
