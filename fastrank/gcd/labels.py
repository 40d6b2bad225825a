"""Good / bad labels for (state, action) pairs of an episode (paper §4, "how to obtain the label").

Rules, per turn t (GOOD = 1, BAD = 0, None = no label):
  success  the last action of a won episode is GOOD ("it directly leads to success");
  repeat   an action whose next observation repeats an earlier observation of the episode (the initial one
           included) is BAD: it leads back to a visited state, a loop or a redundant move (GiGPO's anchor
           states). Observations are compared after whitespace normalisation. The rule is noisy by design:
           going back to a receptacle whose content did not change is "bad" even on an expert path.
  success wins over repeat (the winning step never revisits a state in practice).
Turns without a usable action (format errors: the env was not stepped) get no label: there is no action to
judge. External labelers (e.g. an LLM, DeepSeek-V3 in the paper) fill turns the rules leave open; a rule
label is never overwritten.

An external labeler is any callable `(episode, turn_index) -> 1 | 0 | None`; one that also has
`label_many([(episode, turn_index), ...])` gets all of an update's open steps in one call (batched generation).
`SelfConsistentLabeler` keeps a label only when >= min_agree of n calls agree (paper: 4 of 5); `CriticLabeler`
asks any text -> text LLM with the paper's critic prompt and parses the verdict; `VotingCriticLabeler` does both
with a Policy-like sampler in one batched generate call, and `build_labeler` makes one from a GCDConfig
(`labeler: policy` or a separate frozen causal LM). LLM calls are expensive, so `apply_labels` sends at most
`max_external` open steps per call and counts what was sent, labeled, abstained on and left out by the cap.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from fastrank.gcd.prompts import critic_prompt, parse_verdict
from fastrank.gcd.rollout import Episode

GOOD, BAD = 1, 0
Labeler = Callable[[Episode, int], "int | None"]


def _norm(obs: str) -> str:
    return re.sub(r"\s+", " ", obs).strip().lower()


def rule_labels(ep: Episode) -> list[tuple[int | None, str | None]]:
    """[(label, rule name)] per turn: ("success" / "repeat" / None)."""
    out: list[tuple[int | None, str | None]] = []
    seen = {_norm(ep.turns[0].observation)} if ep.turns else set()
    for i, t in enumerate(ep.turns):
        label, rule = None, None
        stepped = t.env_action is not None and t.error != "env_error"
        nxt = _norm(t.next_observation)
        if stepped and ep.won and i == len(ep.turns) - 1:
            label, rule = GOOD, "success"
        elif stepped and nxt in seen:
            label, rule = BAD, "repeat"
        if stepped:
            seen.add(nxt)
        out.append((label, rule))
    return out


@dataclass
class LabeledStep:
    """A (state, action) with its label; `prompt` is the state as the agent saw it, `response` its answer."""

    env: str
    prompt: str
    response: str
    action: str | None
    label: int
    source: str  # success | repeat | external
    level: str
    task: str
    step: int
    episode_won: bool


def label_many(labeler: Labeler, pairs: Sequence[tuple[Episode, int]]) -> list[int | None]:
    batched = getattr(labeler, "label_many", None)
    return list(batched(pairs)) if batched is not None else [labeler(ep, i) for ep, i in pairs]


def apply_labels(episodes: Sequence[Episode], external: Labeler | None = None, *, max_external: int | None = None,
                 rng: random.Random | None = None) -> tuple[list[LabeledStep], dict]:
    """Rule labels, plus the external labeler's on open steps (no rule label, an action to judge).

    At most `max_external` open steps go to the labeler (a seeded sample with `rng`, else the first ones); the
    stats count them: candidates = sent + skipped_cap, sent = labeled + abstained."""
    eps = [ep for ep in episodes if ep.error is None]
    rules = [rule_labels(ep) for ep in eps]
    open_steps = [(e, i) for e, ep in enumerate(eps) for i, (label, _) in enumerate(rules[e])
                  if label is None and ep.turns[i].action is not None]
    sent: list[tuple[int, int]] = []
    if external is not None:
        sent = open_steps
        if max_external is not None and len(open_steps) > max_external:
            sent = sorted(rng.sample(open_steps, max_external)) if rng is not None else open_steps[:max_external]
    answers = label_many(external, [(eps[e], i) for e, i in sent]) if sent else []
    if len(answers) != len(sent):
        raise ValueError(f"the labeler answered {len(answers)} of {len(sent)} steps")
    ext = {key: int(a) for key, a in zip(sent, answers) if a in (GOOD, BAD)}
    stats = {"candidates": len(open_steps), "sent": len(sent), "labeled": len(ext), "good": sum(ext.values()),
             "abstained": len(sent) - len(ext),
             "skipped_cap": len(open_steps) - len(sent) if external is not None else 0}
    out = []
    for e, ep in enumerate(eps):
        for i, (label, rule) in enumerate(rules[e]):
            if (e, i) in ext:
                label, rule = ext[(e, i)], "external"
            if label is not None:
                t = ep.turns[i]
                out.append(LabeledStep(ep.env, t.prompt, t.response, t.action, label, rule, ep.level, ep.task, i,
                                       ep.won))
    return out, stats


def label_episodes(episodes: Sequence[Episode], external: Labeler | None = None) -> list[LabeledStep]:
    return apply_labels(episodes, external)[0]


def consensus(votes: Sequence[int | None], min_agree: int) -> int | None:
    """The label at least min_agree votes gave (abstentions count for nothing), else None."""
    counts = Counter(v for v in votes if v in (GOOD, BAD))
    if not counts:
        return None
    label, count = counts.most_common(1)[0]
    return int(label) if count >= min_agree else None


def _check_votes(n: int, min_agree: int) -> None:
    if not 1 <= min_agree <= n:
        raise ValueError(f"need 1 <= min_agree <= n, got min_agree={min_agree}, n={n}")
    if 2 * min_agree <= n:  # else both labels could reach min_agree and the tie would be broken arbitrarily
        raise ValueError(f"min_agree must be a strict majority of n, got min_agree={min_agree}, n={n}")


def _critic_text(ep: Episode, i: int) -> str:
    t = ep.turns[i]
    return critic_prompt(ep.env, t.prompt, t.response)


class SelfConsistentLabeler:
    """Wraps a labeler that may disagree with itself (a sampled LLM): call it n times, keep the majority label
    only when at least min_agree calls gave it (paper: 5 calls, >= 4 agreeing)."""

    def __init__(self, judge_fn: Labeler, n: int = 5, min_agree: int = 4):
        _check_votes(n, min_agree)
        self.judge_fn, self.n, self.min_agree = judge_fn, n, min_agree

    def __call__(self, ep: Episode, i: int) -> int | None:
        return consensus([self.judge_fn(ep, i) for _ in range(self.n)], self.min_agree)


class CriticLabeler:
    """One verdict from any LLM given as `generate(prompt_text) -> completion_text`, with the critic prompt."""

    def __init__(self, generate: Callable[[str], str]):
        self.generate = generate

    def __call__(self, ep: Episode, i: int) -> int | None:
        return parse_verdict(self.generate(_critic_text(ep, i))).label


class VotingCriticLabeler:
    """n sampled critic verdicts per step from `policy.generate` (a Policy, or anything with its signature),
    all steps of a call in one batched generate; the label is their consensus (>= min_agree, else None)."""

    def __init__(self, policy, *, n: int = 5, min_agree: int = 4, max_new_tokens: int = 512, greedy: bool = False,
                 name: str = "llm"):
        _check_votes(n, min_agree)
        self.policy, self.n, self.min_agree = policy, n, min_agree
        self.max_new_tokens, self.greedy, self.name = max_new_tokens, greedy, name

    def __call__(self, ep: Episode, i: int) -> int | None:
        return self.label_many([(ep, i)])[0]

    def label_many(self, pairs: Sequence[tuple[Episode, int]]) -> list[int | None]:
        prompts = [_critic_text(ep, i) for ep, i in pairs for _ in range(self.n)]
        if not prompts:
            return []
        gens = self.policy.generate(prompts, max_new_tokens=self.max_new_tokens, greedy=self.greedy,
                                    with_logprobs=False)
        votes = [parse_verdict(g.text).label for g in gens]
        return [consensus(votes[k * self.n:(k + 1) * self.n], self.min_agree) for k in range(len(pairs))]


def build_labeler(cfg, policy=None, device=None) -> VotingCriticLabeler | None:
    """The external labeler a GCDConfig asks for: None (`labeler: none`), the policy model's own sampling
    (`policy`, sharing its weights), or a separate causal LM loaded frozen in eval mode by modeling.load_base
    (hub id, folder, "smollm2", "tiny"; with labeler_gguf_file / labeler_dtype / labeler_load_in_4bit|8bit)."""
    if cfg.labeler == "none":
        return None
    from fastrank.gcd.policy import Policy

    if cfg.labeler == "policy":
        if policy is None:
            raise ValueError("labeler: policy needs the policy")
        model, tok, autocast = policy.model, policy.tokenizer, policy.autocast
    else:
        from fastrank.gcd.modeling import ModelSpec, load_base

        spec = ModelSpec(model=cfg.labeler, gguf_file=cfg.labeler_gguf_file, dtype=cfg.labeler_dtype,
                         load_in_4bit=cfg.labeler_load_in_4bit, load_in_8bit=cfg.labeler_load_in_8bit, lora_r=0)
        model, tok = load_base(spec, device)
        model.eval().requires_grad_(False)
        autocast = None
    greedy = cfg.labeler_temperature == 0
    sampler = Policy(model, tok, gen_batch_size=cfg.gen_batch_size, autocast=autocast,
                     temperature=1.0 if greedy else cfg.labeler_temperature)
    return VotingCriticLabeler(sampler, n=cfg.labeler_samples, min_agree=cfg.labeler_min_agree,
                               max_new_tokens=cfg.labeler_max_new_tokens, greedy=greedy, name=cfg.labeler)


__all__ = ["GOOD", "BAD", "Labeler", "rule_labels", "LabeledStep", "apply_labels", "label_episodes", "label_many",
           "consensus", "SelfConsistentLabeler", "CriticLabeler", "VotingCriticLabeler", "build_labeler"]
