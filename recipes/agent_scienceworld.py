"""A history-aware reranker agent for ScienceWorld: behaviour cloning on gold paths, then the 10-task test sample.

    accelerate launch recipes/agent_scienceworld.py                        # agent_scienceworld.yaml: CPU-sized
    accelerate launch recipes/agent_scienceworld.py init_from=runs/agent_alfworld/model
    accelerate launch recipes/agent_scienceworld.py sw_episodes_per_task=20 max_train_sets=null \\
        epochs_per_round=3 max_steps=100 max_candidates=128                # bigger, on a GPU

Training sets: `fastrank.data.scienceworld_agent` (ETO *train* gold paths replayed through the simulator,
cached in `<output_dir>/replay.cache.jsonl`, plus the shared valid-sample file; history per state; wrong
`focus on` negatives). Training: `fastrank.dagger.fit` (listwise loss). Evaluation: `evaluate_agent` on the
same tasks, envs and focus guard as `fastrank agent-eval --env scienceworld --tasks N --split test --seed 0`.
Writes `<output_dir>/model`, `agent_eval_scienceworld.jsonl` (every step), `results.json`, `report.md`.
"""
import argparse
import json
import random
import time
from pathlib import Path

from fastrank.agent_config import AgentConfig
from fastrank.config import recipe_config

MAX_SETS_PER_EPISODE = 40  # long gold paths (grow-fruit ~140 steps of water/wait) must not outweigh short tasks


def build_sets(cfg: AgentConfig, out: Path):
    from fastrank.data.scienceworld_agent import agent_sets, gold_file_steps, replay_steps, train_pairs

    pairs = train_pairs(cfg.sw_episodes_per_task)  # seed 0, not cfg.seed: the data (and its cache) stay put
    res = replay_steps(pairs, out / "replay.cache.jsonl", n_sample=cfg.sw_valid_sample)
    print(res)
    sets, stats = agent_sets(res.steps + gold_file_steps(), max_negatives=cfg.max_negatives, staples=cfg.sw_staples,
                             view=cfg.sw_view, max_siblings=cfg.sw_siblings,
                             guarded_focus=cfg.sw_guarded_focus, max_sets_per_episode=MAX_SETS_PER_EPISODE, seed=cfg.seed)
    info = {"pairs": len(pairs), "replayed_episodes": res.episodes,
            "replay_failures": [[f["task"], f["variation"], f["error"].strip().splitlines()[-1][:200]]
                                for f in res.failures], **stats.as_dict()}
    if cfg.max_train_sets and len(sets) > cfg.max_train_sets:
        sets = random.Random(cfg.seed).sample(sets, cfg.max_train_sets)
    info["trained_sets"] = len(sets)
    return sets, info


def focus_audit(episodes: list[dict]) -> list[dict]:
    """Per episode: the `focus on` actions taken, whether the goal names each, and whether the episode was
    lost right after one (ScienceWorld ends a wrong focus at score -100)."""
    from fastrank.data.scienceworld_agent import focus_named

    rows = []
    for e in episodes:
        acts = [t["action"] for t in e["trajectory"]]
        foc = [a for a in acts if a.startswith("focus on ")]
        lost = bool(acts) and e["score"] < 0 and acts[-1].startswith("focus on ")
        rows.append({"task": e["task"], "focus": foc, "named": [focus_named(e["goal"], a) for a in foc],
                     "lost_to_focus": lost, "lost_to_unnamed_focus": lost and not focus_named(e["goal"], acts[-1])})
    return rows


def write_report(results: dict, out: Path) -> Path:
    from fastrank.agent_eval import failed_to_load_lines, repetition

    d, ev, audit = results["data"], results["eval"], results["focus_audit"]
    lines = ["# Agent recipe: behaviour cloning in ScienceWorld", "",
             f"Data: {d['sets']} sets from {d['episodes']} ETO train gold episodes ({d['replayed_episodes']} replayed "
             f"through the simulator, {len(d['replay_failures'])} failed), {d['trained_sets']} trained on; "
             f"{d['sets_with_wrong_focus']} sets hold a wrong `focus on` negative ({d['wrong_focus_negatives']} in all, "
             f"{d['wrong_focus_named_by_goal']} of them on objects the goal names); {d['not_labelled']} gold states "
             f"had no valid-list spelling (history only).", "",
             f"Training: {results['train']['steps']} steps, {results['train']['seconds']:.0f} s, final loss "
             f"{results['train']['final_loss']}, train top-1 {results['train']['train_top1']}.", "",
             f"## Test sample: {ev['episodes']} tasks (ETO test, seed 0), {results['max_steps']} steps, "
             f"{results['max_candidates']} candidates, focus guard on, avoid_repeats "
             f"{'on' if results['config']['avoid_repeats'] else 'off'}", "",
             f"mean score **{ev['mean_score']:.1f}**, success {ev['success_rate']:.0%}, mean steps {ev['mean_steps']:.1f}, "
             f"{repetition(ev)}, {ev['decisions_per_s']:.2f} decisions/s, "
             f"{ev['wall_seconds']:.0f} s. Episodes lost right after a `focus on`: "
             f"{sum(a['lost_to_focus'] for a in audit)} (on an object the goal does not name: "
             f"{sum(a['lost_to_unnamed_focus'] for a in audit)}).", "",
             f"Same evaluation from the command line: `{results['command']}`", "",
             "| task | score | won | steps | repeats | focus actions taken (goal names it?) | last action |",
             "|---|---|---|---|---|---|---|"]
    for e, a in zip(results["episodes"], audit):
        foc = "; ".join(f"{f} ({'yes' if n else 'NO'})" for f, n in zip(a["focus"], a["named"])) or "—"
        last = e["trajectory"][-1]["action"] if e["trajectory"] else "—"
        lines.append(f"| {e['task']} | {e['score']:.0f} | {'yes' if e['won'] else 'no'} | {e['steps']} | "
                     f"{e['repeats']} | {foc} | {last} |")
    lines += failed_to_load_lines(ev, noun="task")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(cfg: AgentConfig) -> dict:
    from fastrank.agent_eval import _scienceworld_tasks, evaluate_agent, write_episodes
    from fastrank.dagger import agent_accelerator, agent_model, fit

    accelerator = agent_accelerator(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sets, data_info = build_sets(cfg, out)
    accelerator.print(json.dumps(data_info, indent=1))
    model = agent_model(cfg, accelerator.device)
    if not model.featurizer.uses_history:
        accelerator.print(f"warning: {cfg.init_from or cfg.model} reads no history (feature mode "
                          f"{model.featurizer.mode!r})")
    train_info = fit(model, sets, cfg, accelerator, seed=cfg.seed, desc="behaviour cloning")
    accelerator.print(json.dumps(train_info))
    if accelerator.is_main_process:
        model.save_pretrained(out / "model")
    results = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "data": data_info,
               "train": train_info}
    if cfg.final_eval_games and accelerator.is_main_process:
        # exactly what `fastrank agent-eval --env scienceworld` builds: tasks, bounded envs, focus guard
        args = argparse.Namespace(split=cfg.final_eval_split, tasks=cfg.final_eval_games, seed=0,
                                  max_candidates=cfg.max_candidates, max_steps=cfg.max_steps, no_focus_guard=False,
                                  candidate_order="relevance", observation_view=model.featurizer.observation_view)
        make_env, tasks, guard = _scienceworld_tasks(args)
        batch = min(cfg.batch_size, 2)  # one JVM per game in flight, as the CLI caps it
        res = evaluate_agent(model, "scienceworld", make_env, tasks, max_steps=cfg.max_steps, batch_size=batch,
                             candidates=guard, avoid_repeats=cfg.avoid_repeats, repeat_penalty=cfg.repeat_penalty,
                             seed=0, desc=f"agent-eval scienceworld {cfg.final_eval_split}")
        write_episodes(out / "agent_eval_scienceworld.jsonl", res["episodes"])
        results.update(eval=res["summary"], episodes=res["episodes"],
                       focus_audit=focus_audit(res["episodes"]), max_steps=cfg.max_steps,
                       max_candidates=cfg.max_candidates,
                       command=(f"fastrank agent-eval --env scienceworld --split {cfg.final_eval_split} --tasks "
                                f"{cfg.final_eval_games} --max-steps {cfg.max_steps} --max-candidates "
                                f"{cfg.max_candidates} --batch-size {batch} "
                                f"{'--avoid-repeats' if cfg.avoid_repeats else '--allow-repeats'} "
                                f"--repeat-penalty {cfg.repeat_penalty} --checkpoint {out / 'model'}"))
        write_report(results, out)
        results.pop("episodes")
    results["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    if accelerator.is_main_process:
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"report: {out / 'report.md'}  model: {out / 'model'}")
    return results


def cli(argv: list[str]) -> None:  # main's results dict is not an exit code
    main(recipe_config(__file__, argv, cls=AgentConfig))


if __name__ == "__main__":
    from fastrank.entry import run_entry

    run_entry(cli)
