"""GCD pure units: prompts and parsers, advantages and the clipped loss by hand, label rules on crafted
trajectories, flawed-action metrics, suggestion injection, judging rewards, coupling cosines on crafted gradients.
No model, no simulator: fast."""
from __future__ import annotations

import math
import random

import pytest
import torch

from fastrank.gcd import prompts as P
from fastrank.gcd.coupling import TABLE1, cosine_matrix, table1
from fastrank.gcd.envpool import LocalEnvPool
from fastrank.gcd.grpo import clipped_policy_loss, episode_samples, group_advantages, kl_low_var
from fastrank.gcd.judge import collect_advice, judge_stats, judge_steps, judgment_samples, select_for_judging
from fastrank.gcd.labels import BAD, GOOD, SelfConsistentLabeler, label_episodes, rule_labels
from fastrank.gcd.metrics import action_flaws, rollout_metrics
from fastrank.gcd.rollout import FORMAT_FEEDBACK, RolloutConfig, run_episodes
from fastrank.gcd.suggestions import SuggestionBank, chunk_clusters, extract_rule
from fastrank.gcd.tasks import Task, stratified
from test_gcd_helpers import CorridorEnv, StubPolicy, say, verdict
from test_gcd_helpers import make_episode as _episode
from test_gcd_helpers import make_turn as _turn

CORRIDOR = Task("corridor/0", None, "L0", "corridor")


# ------------------------------------------------------------------------------------------ prompts

def test_agent_prompt_paper_wording_and_history_window():
    hist = [(f"obs {k}", f"act {k}") for k in range(1, 6)]
    p = P.agent_prompt("alfworld", goal="put a pen in bed.", observation="On the desk 1, you see a pen 1.",
                       admissible=["go to bed 1", "help", "take pen 1 from desk 1"], history=hist, step_count=5,
                       history_length=2)
    assert p.startswith("You are an expert agent operating in the ALFRED Embodied Environment. Your task is to: "
                        "put a pen in bed.\n")
    assert "Prior to this step, you have already taken 5 step(s). Below are the most recent 2 observaitons" in p
    assert "[Observation 4: 'obs 4', Action 4: 'act 4']\n[Observation 5: 'obs 5', Action 5: 'act 5']" in p
    assert "obs 3" not in p
    assert "You are now at step 6 and your current observation is: On the desk 1, you see a pen 1." in p
    assert "['go to bed 1'\n 'take pen 1 from desk 1']" in p and "'help'" not in p
    assert "MUST be enclosed within <think> </think> tags" in p and "present it within <action> </action> tags" in p
    assert "guideline" not in p  # no suggestions: verl-agent's plain template
    s = P.agent_prompt("scienceworld", goal="boil water", observation="kitchen", admissible=["look around", "wait"])
    assert "Here are the actions you may take: Current available actions: look around, wait" in s
    assert "most recent 0 observations" in s and "You are now at step 1" in s
    with pytest.raises(ValueError):
        P.agent_prompt("webshop", goal="", observation="", admissible=[])


def test_suggestions_are_injected_into_both_templates():
    rules = ["Never repeat an action that changed nothing.", "Check the fridge for cold items."]
    for env in P.ENVS:
        p = P.agent_prompt(env, goal="g", observation="o", admissible=["look"], suggestions=rules)
        assert ("You should strictly follow the guidelines below, do what the guideline suggests in your thinking "
                "steps to make better actions: \n1. Never repeat an action that changed nothing.\n2. Check the fridge "
                "for cold items.\n") in p
    assert "reason step-by-step based on the guideline about the current situation" in \
        P.agent_prompt("alfworld", goal="g", observation="o", admissible=["look"], suggestions=rules)


def test_critic_and_suggestion_prompts():
    c = P.critic_prompt("scienceworld", "THE STATE", "<think>t</think><action>a</action>")
    assert "* **Problem:** THE STATE\n* **Agent Response:** <think>t</think><action>a</action>" in c
    assert "<answer>\n\\boxed{0/1}\n</answer>" in c and "ehnahce its advantage" in c
    assert P.critic_prompt("alfworld", "x", "y") == P.CRITIC_TEMPLATE.format(problem="x", response="y")
    s = P.suggestion_prompt("loops", ["Avoid A.", "Avoid B."])
    assert s.endswith("ADVICE LIST: \nTheme: loops\n- Avoid A.\n- Avoid B.\n") and "Golden Rule" in s


@pytest.mark.parametrize("text,action,error", [
    ("<think>go</think><action>go to bed 1</action>", "go to bed 1", None),
    ("<think>go</think>\n<action>\n  'Go to  bed 1'. \n</action>", "Go to bed 1", None),
    ("<THINK>x</THINK><ACTION>look</ACTION>", "look", None),
    ("", None, "empty_response"),
    ("<think>no action here</think> go to bed 1", None, "no_action_tag"),
    ("<think>x</think><action>go to bed", None, "unclosed_action_tag"),
    ("<think>x</think><action>look</action><action>go to bed 1</action>", None, "multiple_action_tags"),
    ("<think>x</think><action>  </action>", None, "empty_action"),
    ("<action>look</action>", "look", "no_think_tag"),
])
def test_parse_action(text, action, error):
    got = P.parse_action(text)
    assert (got.action, got.error) == (action, error)


def test_parse_action_think_optional_and_admissible_matching():
    assert P.parse_action("<action>look</action>", require_think=False).error is None
    adm = ["go to bed 1", "take pen 1 from desk 1"]
    assert P.match_admissible("Go To Bed 1.", adm) == "go to bed 1"
    assert P.match_admissible("go to bed 2", adm) is None


@pytest.mark.parametrize("text,label,error", [
    ("<think>fine</think><answer>\\boxed{1}</answer><advise>Keep going.</advise>", 1, None),
    ("<answer>\n\\boxed{ 0 }\n</answer>", 0, None),
    ("<answer>1</answer>", 1, None),
    ("<answer>$\\boxed{0}$</answer>", 0, None),
    ("<answer>\\boxed{0/1}</answer>", None, "bad_value"),
    ("<answer>\\boxed{yes}</answer>", None, "bad_value"),
    ("<answer>\\boxed{1}</answer> ... <answer>\\boxed{0}</answer>", None, "conflicting_answers"),
    ("<answer>\\boxed{1}</answer><answer>1</answer>", 1, None),
    ("The action is good: \\boxed{1}", None, "no_answer_tag"),
    ("<answer>\\boxed{1}", None, "unclosed_answer_tag"),
    ("", None, "no_answer_tag"),
])
def test_parse_verdict(text, label, error):
    v = P.parse_verdict(text)
    assert (v.label, v.error) == (label, error)


def test_parse_verdict_advice():
    assert P.parse_verdict(verdict(1, "  Explore   before acting. ")).advice == "Explore before acting."
    assert P.parse_verdict("<answer>1</answer><advice>Use advice tag.</advice>").advice == "Use advice tag."
    assert P.parse_verdict("<answer>1</answer>").advice is None


# ----------------------------------------------------------------------------------------- advantages

def test_group_advantages_by_hand():
    rewards = [1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1]
    groups = ["a"] * 4 + ["b"] * 4 + ["c"] * 4 + ["d"]
    adv = group_advantages(rewards, groups, eps=0.0)
    # a: mean 0.5, unbiased std sqrt(1/3) -> +-0.5 / 0.57735 = +-0.8660
    assert adv[:4].tolist() == pytest.approx([0.8660254, -0.8660254, -0.8660254, 0.8660254], abs=1e-6)
    assert adv[4:8].tolist() == [0, 0, 0, 0]  # all equal: no signal
    # c: [1,0,0,0]: mean .25, var (.5625 + 3 * .0625) / 3 = .25, std .5 -> 1.5, -0.5
    assert adv[8:12].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-6)
    assert adv[12].item() == 0  # a group of one: no baseline
    # eps in the denominator, and the unscaled variant
    assert group_advantages([1, 0], ["g", "g"], eps=1.0)[0].item() == pytest.approx(0.5 / (math.sqrt(0.5) + 1))
    assert group_advantages([1, 0, 0, 0], ["g"] * 4, scale=False).tolist() == pytest.approx([0.75, -.25, -.25, -.25])


def test_clipped_loss_by_hand():
    lp = torch.tensor([[0.5, 0.5, -0.5, -0.5]], requires_grad=True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, st = clipped_policy_loss(lp, old, adv, mask, clip_eps=0.2)
    r_hi, r_lo = math.exp(0.5), math.exp(-0.5)
    # A>0, r>1+eps: clipped (-1.2); A<0, r>1: unclipped (r); A>0, r<1: unclipped (-r); A<0, r<1-eps: clipped (0.8)
    assert loss.item() == pytest.approx(-1.2 + r_hi - r_lo + 0.8, abs=1e-6)
    assert st["clipped"] == 2 and st["tokens"] == 4
    loss.backward()
    # clipped tokens carry no gradient; unclipped ones d(-A r)/dlogp = -A r
    assert lp.grad.tolist()[0] == pytest.approx([0.0, r_hi, -r_lo, 0.0], abs=1e-6)
    # the mask removes tokens; asymmetric clip (clip-higher) moves the upper bound only
    loss_m, st_m = clipped_policy_loss(lp.detach(), old, adv, torch.tensor([[1.0, 0, 0, 0]]), clip_eps=0.2,
                                       clip_eps_high=0.28)
    assert loss_m.item() == pytest.approx(-1.28, abs=1e-6) and st_m["tokens"] == 1


def test_kl_low_var_is_zero_at_equal_and_positive_elsewhere():
    a = torch.tensor([-1.0, -2.0, -0.1])
    assert kl_low_var(a, a).abs().max().item() == 0
    assert (kl_low_var(a, a - 0.3) > 0).all()


def test_episode_samples_carry_the_episode_advantage():
    e1 = _episode([_turn(0, "o0", "a", "o1"), _turn(1, "o1", "b", "o2")], True, sample=0)
    e2 = _episode([_turn(0, "o0", "a", "o1")], False, sample=1)
    broken = _episode([_turn(0, "o0", "a", "o1")], False, sample=2)
    broken.error = "reset: GameLoadError"
    s = episode_samples([e1, e2, broken], eps=0.0)
    assert [round(x.advantage, 4) for x in s] == [0.7071, 0.7071, -0.7071]  # error episode left out
    assert all(x.kind == "agent" and x.group == "g" for x in s)


# ------------------------------------------------------------------------------------------- labels

def test_label_rules_on_crafted_trajectories():
    won = _episode([
        _turn(0, "start", "go to desk 1", "On the desk 1, you see a pen 1."),
        _turn(1, "On the desk 1, you see a pen 1.", "look", "On the desk 1, you see a pen 1."),  # repeat -> bad
        _turn(2, "x", None, FORMAT_FEEDBACK, error="no_action_tag", env_action=None),  # no action: no label
        _turn(3, "x", "go to bed 1", "On the bed 1, you see nothing."),
        _turn(4, "x", "go to desk 1", "On the  desk 1, you see a pen 1. "),  # repeat (whitespace-insensitive)
        _turn(5, "x", "go back", "start"),  # back to the initial observation -> bad
        _turn(6, "x", "put pen 1 in/on bed 1", "You put the pen 1 in/on the bed 1."),  # last of a win -> good
    ], won=True)
    assert rule_labels(won) == [(None, None), (BAD, "repeat"), (None, None), (None, None), (BAD, "repeat"),
                                (BAD, "repeat"), (GOOD, "success")]
    lost = _episode([_turn(0, "start", "look", "room"), _turn(1, "room", "put pen", "You put the pen.")], won=False)
    assert rule_labels(lost) == [(None, None), (None, None)]  # the last step of a failure is not "good"
    # an inadmissible action that the env answered with "Nothing happens." twice: the 2nd is a repeat
    nothing = _episode([_turn(0, "s", "fly", "Nothing happens.", error="inadmissible"),
                        _turn(1, "Nothing happens.", "fly", "Nothing happens.", error="inadmissible")], won=False)
    assert rule_labels(nothing) == [(None, None), (BAD, "repeat")]


def test_external_labeler_fills_gaps_and_never_overrides():
    ep = _episode([_turn(0, "s", "a", "o1"), _turn(1, "o1", "b", "o1"), _turn(2, "o1", None, "fb", "no_action_tag",
                                                                          None)], won=False)
    calls = []

    def ext(e, i):
        calls.append(i)
        return GOOD

    steps = label_episodes([ep], external=ext)
    assert [(s.step, s.label, s.source) for s in steps] == [(0, GOOD, "external"), (1, BAD, "repeat")]
    assert calls == [0]  # asked only where no rule applied and there is an action
    assert steps[1].prompt == "prompt 1" and steps[1].response == say("b") and steps[1].level == "L0"


def test_self_consistent_labeler():
    def seq(values):
        it = iter(values)
        return lambda e, i: next(it)

    assert SelfConsistentLabeler(seq([1, 1, 1, 1, 0]))(None, 0) == 1
    assert SelfConsistentLabeler(seq([0, 0, 0, 0, 0]))(None, 0) == 0
    assert SelfConsistentLabeler(seq([1, 1, 1, 0, 0]))(None, 0) is None  # 3/5 < 4
    assert SelfConsistentLabeler(seq([1, 1, 1, None, None]))(None, 0) is None  # abstentions do not count
    assert SelfConsistentLabeler(seq([1, 1, 1]), n=3, min_agree=3)(None, 0) == 1
    with pytest.raises(ValueError):
        SelfConsistentLabeler(lambda e, i: 1, n=5, min_agree=6)


# ------------------------------------------------------------------------------------------ rollouts

def test_rollout_invalid_actions_and_format_errors_are_explicit():
    script = [say("go forward"), "I think I should go forward", say("fly away"), "<action>look</action>",
              say("go forward")]
    pol = StubPolicy(lambda p, i: script[i])
    pool = LocalEnvPool(lambda: CorridorEnv(3), 1)
    [ep] = run_episodes(pol, pool, [CORRIDOR], RolloutConfig(env="alfworld", max_steps=10))
    env = pool.envs[0]
    assert [t.error for t in ep.turns] == [None, "no_action_tag", "inadmissible", "no_think_tag", None]
    assert env.actions == ["go forward", "fly away", "go forward"]  # format errors never reach the env
    assert ep.turns[1].env_action is None and ep.turns[1].next_observation == FORMAT_FEEDBACK.format(
        error="no_action_tag")
    assert ep.turns[2].env_action == "fly away" and ep.turns[2].next_observation == "Nothing happens."
    assert ep.won and ep.reward == 1.0 and ep.done and ep.n_invalid == 3
    # the agent sees the feedback as its observation, and the history shows NO_ACTION for the malformed turn
    assert "current observation is: " + FORMAT_FEEDBACK.format(error="no_action_tag") in pol.prompts[2]
    assert "[Observation 2: 'You are in room 1.', Action 2: '(no valid action)']" in pol.prompts[2]


def test_rollout_inadmissible_feedback_mode_penalty_and_max_steps():
    pol = StubPolicy(lambda p, i: say("fly away"))
    pool = LocalEnvPool(lambda: CorridorEnv(3), 2)
    eps = run_episodes(pol, pool, [CORRIDOR], RolloutConfig(max_steps=3, inadmissible="feedback",
                                                            invalid_penalty=0.1), group_size=2)
    assert [e.sample for e in eps] == [0, 1] and all(e.group == "corridor/0" for e in eps)
    for e in eps:
        assert e.steps == 3 and not e.won and not e.done and e.reward == pytest.approx(-0.3)
        assert all(t.env_action is None and t.error == "inadmissible" for t in e.turns)
    assert all(env.steps == 0 for env in pool.envs)


def test_rollout_continuous_batching_and_group_order():
    # 3 tasks x 2 samples on a pool of 2 slots: slots are refilled as episodes end
    pol = StubPolicy(lambda p, i: say("go forward"))
    tasks = [Task(f"corridor/{k}", None, "L1", "corridor") for k in range(3)]
    eps = run_episodes(pol, LocalEnvPool(lambda: CorridorEnv(3), 2), tasks, RolloutConfig(), group_size=2)
    assert [(e.task, e.sample) for e in eps] == [(t.key, k) for t in tasks for k in range(2)]
    assert all(e.won and e.steps == 2 for e in eps)


def test_rollout_env_errors_do_not_kill_the_batch():
    class Broken(CorridorEnv):
        def reset(self, task):
            if task == "bad":
                raise RuntimeError("cannot load")
            return super().reset(task)

    pol = StubPolicy(lambda p, i: say("go forward"))
    tasks = [Task("ok", "ok", "L0", "c"), Task("bad", "bad", "L0", "c")]
    eps = run_episodes(pol, LocalEnvPool(lambda: Broken(3), 2), tasks, RolloutConfig())
    assert eps[0].won and eps[1].error.startswith("reset: RuntimeError: cannot load")
    assert rollout_metrics(eps)["failed_to_run"] == 1


def test_suggestions_reach_the_rollout_prompts():
    bank = SuggestionBank(lambda prompt: "<think>loops</think>\nGolden Rule: Never repeat a useless action.",
                          refresh_every=2)
    bank.add(["Do not look twice.", "Do not look twice.", "Move on when nothing changes."])
    assert not bank.maybe_refresh(1) and bank.suggestions == []
    assert bank.maybe_refresh(2) and bank.suggestions == ["Never repeat a useless action."]
    pol = StubPolicy(lambda p, i: say("go forward"))
    run_episodes(pol, LocalEnvPool(lambda: CorridorEnv(2), 1), [CORRIDOR], RolloutConfig(),
                 suggestions=bank.suggestions)
    assert "make better actions: \n1. Never repeat a useless action.\n" in pol.prompts[0]


def test_suggestion_helpers():
    assert extract_rule("blah\n**Golden Rule:** Always verify the object location.") == \
        "Always verify the object location."
    assert extract_rule("<think>x</think>\nfirst\nlast line") == "last line"
    themes = chunk_clusters(["a", "b", "A ", "c", "d"], max_themes=2)
    assert themes == {"theme 1": ["d", "c"], "theme 2": ["A", "b"]}  # newest first, case-insensitive dedupe
    bank = SuggestionBank(lambda p: "", refresh_every=1)
    bank.suggestions = ["keep me"]
    bank.add(["x"])
    bank.refresh(1)
    assert bank.suggestions == ["keep me"]  # an empty summary does not wipe the suggestions


# -------------------------------------------------------------------------------------------- judging

def test_judge_rewards_and_advantages():
    ep = _episode([_turn(0, "s", "a", "o1"), _turn(1, "o1", "b", "o1"), _turn(2, "o1", "win", "done")], won=True)
    steps = label_episodes([ep])  # step 1 bad (repeat), step 2 good (success)
    assert [(s.step, s.label) for s in steps] == [(1, BAD), (2, GOOD)]
    answers = [verdict(0), verdict(0), "<answer>\\boxed{0/1}</answer>", verdict(1),  # bad step: 2 right
               verdict(1), verdict(1), verdict(1), verdict(1)]  # good step: all right -> no signal
    pol = StubPolicy(lambda p, i: answers[i])
    groups = judge_steps(pol, steps, n=4)
    assert "* **Problem:** prompt 1" in pol.prompts[0] and "**Agent Response:** " + say("b") in pol.prompts[0]
    assert [[j.reward for j in g] for g in groups] == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert groups[0][2].verdict.error == "bad_value"
    for g in groups:  # give the stub generations tokens so that they become samples
        for j in g:
            j.generation.response_ids, j.generation.logprobs, j.generation.prompt_ids = [1, 2], [-1, -1], [3]
    s = judgment_samples(groups, eps=0.0)
    assert [round(x.advantage, 4) for x in s] == [0.866, 0.866, -0.866, -0.866, 0, 0, 0, 0]
    assert all(x.kind == "judge" for x in s)
    st = judge_stats(groups)
    assert st["accuracy"] == 0.75 and st["accuracy_bad"] == 0.5 and st["accuracy_good"] == 1.0
    assert st["format_error_rate"] == 0.125 and st["groups_with_signal"] == 0.5
    assert collect_advice(groups) == ["Do not repeat an action that changed nothing."] * 2  # correct, bad label


def test_select_for_judging_balances_labels():
    from fastrank.gcd.labels import LabeledStep

    def mk(label, k):
        return LabeledStep("alfworld", f"p{k}", "r", "a", label, "repeat", "L0", "t", k, False)

    labeled = [mk(BAD, k) for k in range(50)] + [mk(GOOD, 100 + k) for k in range(5)]
    chosen = select_for_judging(labeled, 30, rng=random.Random(0))
    assert len(chosen) == 30 and sum(s.label for s in chosen) == 5  # all 5 good ones, 25 bad
    labeled = [mk(BAD, k) for k in range(40)] + [mk(GOOD, 100 + k) for k in range(40)]
    assert sum(s.label for s in select_for_judging(labeled, 30, rng=random.Random(1))) == 15
    assert len(select_for_judging(labeled[:10], 30)) == 10
    unbalanced = select_for_judging(labeled, 30, balance=False, rng=random.Random(0))
    assert len(unbalanced) == 30 and len({s.prompt for s in unbalanced}) == 30


# -------------------------------------------------------------------------------------------- metrics

def test_repeated_and_looped_actions():
    acts = ["a", "a", "b", "c", "b", "c", None, "d", "e", "f", "d", "e", "f"]
    assert action_flaws(acts) == [None, "repeated", None, None, None, "looped", None, None, None, None, None, None,
                                  "looped"]
    assert action_flaws(["a", "b", "a", "b", "a"]) == [None, None, None, "looped", "looped"]
    ep = _episode([_turn(k, "o", a, f"n{k}") for k, a in enumerate(["a", "a", "b", "a", "b"])], won=False)
    m = rollout_metrics([ep])
    assert m["repeated_rate"] == pytest.approx(1 / 5) and m["looped_rate"] == pytest.approx(1 / 5)
    assert m["success"] == 0 and m["steps"] == 5 and m["response_tokens"] == 1


def test_stratified_task_sample():
    tasks = [Task(f"{t}/{k}", None, "L1", t) for t in "abc" for k in range(4)]
    got = stratified(tasks, 5, seed=0)
    assert [t.task_type for t in got] == ["a", "b", "c", "a", "b"]
    assert stratified(tasks, 5, seed=0) == got and len(stratified(tasks, None, 1)) == 12


# ------------------------------------------------------------------------------------------- coupling

def test_coupling_cosines_on_crafted_gradients():
    def at(deg, scale=1.0):
        r = math.radians(deg)
        return torch.tensor([math.cos(r), math.sin(r), 0.0]) * scale

    grads = {"ID+": at(0), "ID-": at(60, 3.0), "OOD+": at(90, 0.5), "OOD-": at(180)}
    names, cos = cosine_matrix(grads)
    assert names == ["ID+", "ID-", "OOD+", "OOD-"]
    want = torch.tensor([[1, .5, 0, -1], [.5, 1, math.sqrt(3) / 2, -.5], [0, math.sqrt(3) / 2, 1, 0],
                         [-1, -.5, 0, 1]], dtype=torch.float32)
    assert torch.allclose(cos, want, atol=1e-6)
    row = table1(names, cos)
    assert row == pytest.approx({"nn": math.cos(math.radians(120)), "np": math.cos(math.radians(30)),
                                 "pn": -1.0, "pp": 0.0}, abs=1e-6)
    assert set(TABLE1) == {"nn", "np", "pn", "pp"}
    assert table1(["ID+", "OOD+"], cos[[0, 2]][:, [0, 2]]) == {"nn": None, "np": None, "pn": None,
                                                              "pp": pytest.approx(0.0, abs=1e-6)}
