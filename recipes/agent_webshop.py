"""A history-aware reranker agent for WebShop: behaviour cloning on a reward teacher, then the 500 test goals.

    accelerate launch recipes/agent_webshop.py                        # agent_webshop.yaml: CPU-sized
    accelerate launch recipes/agent_webshop.py ws_runs_per_goal=4 max_train_sets=null epochs_per_round=3

Training sets: `fastrank.data.webshop_agent` (the teacher's episodes over the 745 leak-free goals, with
detours for recovery states; every page action a candidate; history per state). Training:
`fastrank.dagger.fit` (listwise loss). Evaluation: exactly `fastrank agent-eval --env webshop --goals N
--max-steps S`, beside the reference policies on the same goals (oracle, the teacher, first result,
random, the lexical floor as a policy) and the net gain on the bundled WebShop click eval states beside
the lexical floor. Writes `<output_dir>/model`, `agent_eval_webshop.jsonl`, `results.json`, `report.md`.
"""
import json
import random
import time
from pathlib import Path

from fastrank.agent_config import AgentConfig
from fastrank.config import recipe_config


def reference_policies(goals: list[int], max_steps: int) -> dict:
    """The README's reference policies and the two teachers on `goals`: the reward teacher (an oracle: it reads
    the reward) and the readable one (it reads the pages only)."""
    from fastrank.data.webshop_agent import readable_teacher_action, teacher_action
    from fastrank.envs.webshop import WebShopEnv
    from fastrank.envs.webshop_expert import baselines

    env = WebShopEnv()
    out = baselines(goals, env=env)
    teachers = {"reward_teacher": lambda state, turns: teacher_action(env, state),
                "readable_teacher": lambda state, turns: readable_teacher_action(env, state, turns)}
    for name, act in teachers.items():
        rewards = []
        for g in goals:
            state, turns = env.reset(g), []
            while not state.done and len(turns) < max_steps and (a := act(state, turns)) is not None:
                state = env.step(a)
                turns.append((a, state.observation))
            rewards.append(state.reward if state.done else 0.0)
        n = max(1, len(rewards))
        out[name] = {"episodes": len(rewards), "mean_score": 100 * sum(rewards) / n,
                     "success_rate": sum(r == 1.0 for r in rewards) / n}
    return out


CLICK_EVAL_SETS = 600  # per mode, a seeded sample of the ~3,900 click eval states: +-0.04 on a net gain, minutes on a CPU


def click_state_net_gain(model, accelerator, max_tokens: int, n: int | None = CLICK_EVAL_SETS) -> dict:
    """{mode: {model, floor}} net gain on the bundled WebShop click eval states (results and item pages);
    model and floor on the same `n` sets (None: all)."""
    from fastrank.data.bundle import load_bundled
    from fastrank.lexical_floor import floor_report
    from fastrank.metrics import net_gain_report
    from fastrank.train import score_sets

    out = {}
    for mode in ("sampled", "hard"):
        sets = [cs for cs in load_bundled("webshop", "eval", mode) if cs.task_type in ("results", "item")]
        if n and len(sets) > n:
            sets = random.Random(0).sample(sets, n)
        scores = score_sets(model, sets, accelerator, max_tokens, desc=f"click states ({mode})")
        out[mode] = {"states": len(sets), "model": net_gain_report(sets, scores)["webshop"]["net_gain"],
                     "floor": floor_report(sets)["webshop"]["net_gain"]}
    return out


def write_report(results: dict, out: Path) -> Path:
    from fastrank.agent_eval import repetition

    d, tr, ev = results["data"], results["train"], results.get("eval")
    lines = ["# Agent recipe: behaviour cloning in WebShop", "",
             f"Data: {d['sets']} sets from {d['episodes']} {results['config']['ws_teacher']}-teacher episodes over {results['goals']} leak-free "
             f"goals ({d['detours']} detours; teacher {d['teacher_mean_score']:.1f} / {d['teacher_success']:.1%} on "
             f"them), {results['trained_sets']} trained on; sets per page {d['sets_by_page']}.", "",
             f"Training: {tr['steps']} steps, {tr['seconds']:.0f} s, final loss {tr['final_loss']}, "
             f"train top-1 {tr['train_top1']}; loss every 10 steps: {tr.get('loss_curve', 'not recorded')}.", ""]
    if ev:
        lines += [f"## Test goals: {ev['episodes']} (SPEC §10), {results['max_steps']} steps", "",
                  "| policy | mean score | success |", "|---|---|---|",
                  f"| **this model** | **{ev['mean_score']:.2f}** | **{ev['success_rate']:.1%}** |"]
        for name, r in results["reference"].items():
            lines.append(f"| {name.replace('_', ' ')} | {r['mean_score']:.2f} | {r['success_rate']:.1%} |")
        lines += ["", f"Model: mean steps {ev['mean_steps']:.1f}, {repetition(ev)}, "
                  f"{ev['decisions_per_s']:.1f} decisions/s, {ev['wall_seconds']:.0f} s. Same evaluation from the "
                  f"command line: `{results['command']}`", ""]
    ng = results.get("click_states")
    if ng:
        lines += ["## Net gain on the bundled WebShop click eval states (results + item pages)", "",
                  "A seeded sample of each mode's click eval states (test goals; labels: the target-following "
                  "expert of `fastrank.data.webshop_clicks`), model and floor on the same sets.", "",
                  "| negatives | states | lexical floor | model | model − floor |", "|---|---|---|---|---|"]
        for mode, r in ng.items():
            lines.append(f"| {mode} | {r['states']} | {r['floor']:+.3f} | **{r['model']:+.3f}** | "
                         f"{r['model'] - r['floor']:+.3f} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(cfg: AgentConfig) -> dict:
    from fastrank.agent_eval import evaluate_agent, write_episodes
    from fastrank.dagger import agent_accelerator, agent_model, fit
    from fastrank.data.webshop_agent import leak_free_goals, teacher_sets, with_sampled_distractors
    from fastrank.envs.webshop import WebShopEnv, agent_tasks

    accelerator = agent_accelerator(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = WebShopEnv()
    goals = leak_free_goals(env)
    sets, stats = teacher_sets(goals, runs_per_goal=cfg.ws_runs_per_goal, detour_prob=cfg.ws_detour_prob,
                               seed=cfg.seed, env=env, teacher=cfg.ws_teacher)
    accelerator.print(json.dumps(stats.as_dict()))
    train_sets = with_sampled_distractors(sets, cfg.ws_sampled, seed=cfg.seed)
    if cfg.max_train_sets and len(train_sets) > cfg.max_train_sets:
        train_sets = random.Random(cfg.seed).sample(train_sets, cfg.max_train_sets)
    model = agent_model(cfg, accelerator.device)
    train_info = fit(model, train_sets, cfg, accelerator, seed=cfg.seed, desc="behaviour cloning")
    accelerator.print(json.dumps(train_info))
    if accelerator.is_main_process:
        model.save_pretrained(out / "model")
    results = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "goals": len(goals),
               "data": stats.as_dict(), "trained_sets": len(train_sets), "train": train_info}
    if cfg.final_eval_games and accelerator.is_main_process:
        make_env, tasks = agent_tasks(cfg.final_eval_games)
        res = evaluate_agent(model, "webshop", make_env, tasks, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
                             desc="agent-eval webshop test goals")
        write_episodes(out / "agent_eval_webshop.jsonl", res["episodes"])
        results.update(eval=res["summary"], max_steps=cfg.max_steps,
                       reference=reference_policies(tasks, cfg.max_steps),
                       command=(f"fastrank agent-eval --env webshop --goals {cfg.final_eval_games} --max-steps "
                                f"{cfg.max_steps} --batch-size {cfg.batch_size} --checkpoint {out / 'model'}"))
        results["click_states"] = click_state_net_gain(model, accelerator, cfg.max_tokens)
    results["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    if accelerator.is_main_process:
        write_report(results, out)
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        ev = results.get("eval")
        print(f"report: {out / 'report.md'}  model: {out / 'model'}" +
              (f"  score {ev['mean_score']:.2f}  success {ev['success_rate']:.1%}" if ev else ""))
    return results


def cli(argv: list[str]) -> None:  # main's results dict is not an exit code
    main(recipe_config(__file__, argv, cls=AgentConfig))


if __name__ == "__main__":
    from fastrank.entry import run_entry

    run_entry(cli)
