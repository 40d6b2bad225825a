"""The zero-training lexical floor and its place in report.md."""
from __future__ import annotations

from fastrank.config import TrainConfig, to_dict
from fastrank.data.record import CandidateSet
from fastrank.lexical_floor import eval_sets_like_training, floor_report, floor_scores
from fastrank.report import eval_table, write_report


def _set(candidates: list[str], expert: int, env: str = "webshop") -> CandidateSet:
    return CandidateSet(env=env, episode_id="e", step=0, task_type="t", goal="buy red shoes",
                        observation="a page with red shoes and blue hats", candidates=candidates,
                        expert_index=expert, sources=["expert" if i == expert else "global" for i in range(len(candidates))])


def test_floor_scores_are_the_share_of_action_words_in_goal_and_observation():
    cs = _set(["click[blue hats]", "click[green socks]", "click[red shoes now]"], 0)
    assert floor_scores(cs) == [2 / 3, 0.0, 0.5]  # "click" is a word of the action, not of the state
    rep = floor_report([cs, _set(["click[green socks]", "click[red shoes]"], 1, env="alfworld")])
    assert rep["webshop"]["reranked_top1"] == 1.0 and rep["webshop"]["net_gain"] == 0.0  # expert was first
    assert rep["alfworld"]["net_gain"] == 1.0 and rep["combined"]["states"] == 2


def test_floor_uses_the_same_eval_sets_as_training():
    from fastrank.train import load_training_data

    cfg = TrainConfig(envs=["webshop"], max_eval_sets=25, seed=7, eval_modes=["sampled", "hard"])
    _, evals = load_training_data(cfg)
    mine = eval_sets_like_training(to_dict(cfg))
    for mode, by_env in evals.items():
        theirs = [cs for env in sorted(by_env) for cs in by_env[env]]
        assert [(c.episode_id, c.step, c.candidates) for c in mine[mode]] == \
            [(c.episode_id, c.step, c.candidates) for c in theirs]


def test_report_puts_the_floor_beside_the_model(tmp_path):
    cfg = TrainConfig(max_eval_sets=10, eval_modes=["hard"])
    floor = floor_report(eval_sets_like_training(to_dict(cfg))["hard"])
    model = {env: {**r, "net_gain": r["net_gain"] + 0.1} for env, r in floor.items()}
    results = {"config": to_dict(cfg), "train_sets": 0, "steps": 0, "train_seconds": 0,
               "history": {"steps": [], "loss": [], "top1": []}, "eval": {"hard": model}}
    text = write_report(results, tmp_path).read_text()
    assert "| lexical floor | model − floor |" in text
    assert f"| {floor['webshop']['net_gain']:+.3f} | +0.100 |" in text
    assert eval_table(model)[0].count("|") == 6  # without a floor: the old table


def test_seed_report_averages_the_floor_over_each_seeds_own_eval_sample(tmp_path):
    from fastrank.lexical_floor import floor_for_run
    from fastrank.report import write_seed_report

    configs = {s: to_dict(TrainConfig(max_eval_sets=6, eval_modes=["sampled"], seed=s)) for s in (1, 2)}
    floors = [floor_for_run(c)["sampled"]["webshop"]["net_gain"] for c in configs.values()]
    agg = {"sampled": {"webshop": {"net_gain_mean": 0.5, "net_gain_std": 0.0, "values": [0.5, 0.5]}}}
    text = write_seed_report(agg, {s: {"config": c} for s, c in configs.items()}, tmp_path).read_text()
    assert f"| +0.500 / +0.500 | {sum(floors) / 2:+.3f} |" in text
    gone = {s: {"config": {**c, "data_dir": str(tmp_path / "gone")}} for s, c in configs.items()}
    assert "| +0.500 / +0.500 | — |" in write_seed_report(agg, gone, tmp_path).read_text()  # no partial mean
