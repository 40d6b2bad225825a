"""DAgger (Ross et al. 2011) for the reranker policy in ALFWorld: roll out, label with the expert, aggregate, retrain.

Round r plays `episodes[r]` train games with a mixture policy -- each step takes the handcoded expert's
action with probability beta_r, else the reranker's -- and labels every visited state with the action
the expert would take there (TextWorld's `expert_plan`). Round 0 has beta = 1: plain behaviour cloning
on expert states. Later rounds visit the states the policy's own mistakes lead to, which is what
per-step training on expert states never shows it (the cause of the 0 % success measured before).

A labelled state becomes a `CandidateSet`: the expert's action among up to `max_negatives` other
admissible actions of that state -- up to a third the ones the current policy scores highest (hard-negative
mining), up to a third actions the agent already took in the episode, the rest uniform -- with the episode
so far as `history`. After each round the model is
trained on the round's states plus an equal-size sample of the older ones, then plays `eval_games` fixed
train games alone (beta = 0): the per-round table. Every round is saved (`<output_dir>/dagger/round_N`:
states, model, metrics), so `resume=true` continues after the last finished round.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from fastrank.agent_config import AgentConfig
from fastrank.config import ConfigError
from fastrank.data.features import NOTES_VERSION, goal_stems, named_words
from fastrank.data.goal_roles import goal_roles
from fastrank.data.record import CandidateSet, read_records, write_records
from fastrank.ops import listwise_rank_loss, pairwise_rank_loss
from fastrank.packing import TokenBudgetBatchSampler
from fastrank.train import BF16_EMULATED, build_optimizer, cpu_has_bf16, linear_warmup
from fastrank.rollout import Slot, run_episodes


def agent_accelerator(cfg: AgentConfig) -> Accelerator:
    """The recipes' Accelerator; on a CPU torch gets this process's share of the cores (`accelerate launch`
    pins it to one thread). bf16 asked for on a CPU that emulates it becomes fp32, with a warning: there a bf16 step
    took 188 s against fp32's 9.3 s (session 16), hours lost to a flag copied from a machine that has it."""
    import os

    emulated = (os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16" and not torch.cuda.is_available()
                and not cpu_has_bf16())
    if emulated:
        warnings.warn(f"--mixed_precision {BF16_EMULATED}; training in fp32 instead", stacklevel=2)
    accelerator = Accelerator(mixed_precision="no" if emulated else None)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    return accelerator


def agent_model(cfg: AgentConfig, device):
    """`init_from` (a saved Reranker), else a fresh `model` encoder with the config's feature mode, layout and
    state budget; seeded, on `device`."""
    from fastrank.data.features import Featurizer
    from fastrank.model import Reranker

    torch.manual_seed(cfg.seed)
    model = Reranker.from_pretrained(cfg.init_from) if cfg.init_from else Reranker.from_encoder(
        cfg.model, featurizer=Featurizer(cfg.feature_mode, notes=NOTES_VERSION if cfg.notes is None else cfg.notes,
                                         observation_view=cfg.sw_view),
        max_length=cfg.max_length, layout=cfg.layout, max_action_tokens=cfg.max_action_tokens)
    if cfg.attention_dropout is not None:
        model.set_attention_dropout(cfg.attention_dropout)
    return model.to(device)


def expert_label(state) -> str | None:
    """The expert's own next action at this state, or None when it has none worth imitating (the
    opening `look`, its random pick when its plan repeats itself, a non-admissible suggestion)."""
    plan = state.info.get("expert_plan")
    if not plan or plan not in state.admissible:
        return None
    return plan if state.info.get("expert_source") in ("policy", None) else None


def labelled_set(slot: Slot, label: str, max_negatives: int, rng: random.Random,
                 scores: dict[str, float] | None = None) -> CandidateSet:
    s = slot.state
    others = [a for a in dict.fromkeys(s.admissible) if a != label]
    # The informative negatives: the actions the current policy scores highest (hard-negative mining) -- on
    # an expert-only state, which no policy scored, the actions naming the most goal words (putting the
    # apple back where it lay names "apple" too: a BC policy that never saw that contrast did exactly that,
    # measured) -- and its own earlier actions offered again (a uniform sample of ~30 admissible actions
    # rarely contains the one it repeats); the rest uniform.
    third = max(1, max_negatives // 3)
    if scores:
        hard = sorted((a for a in others if a in scores), key=lambda a: -scores[a])[:third]
    else:
        stems = goal_stems(s.goal)
        named = {a: len(named_words(stems, a)) for a in rng.sample(others, len(others))}  # ties in a random order
        hard = [a for a in sorted(named, key=lambda a: -named[a]) if named[a]][:third]
    taken = set(a for a, _ in slot.memory.turns)
    mine = [a for a in others if a in taken and a not in hard][:third]
    picked = set(hard) | set(mine)
    rest = [a for a in others if a not in picked]
    negs = hard + mine + rng.sample(rest, min(max_negatives - len(picked), len(rest)))
    return CandidateSet(env="alfworld", episode_id=str(s.info.get("episode_id", slot.task)), step=len(slot.log),
                        task_type=s.task_type, goal=s.goal, observation=s.observation, candidates=[label] + negs,
                        expert_index=0, sources=["expert"] + ["admissible"] * len(negs),
                        history=[list(t) for t in slot.memory.turns])


def inferable(slot: Slot, label: str) -> bool:
    """False for the expert's ``go to X`` while the agent holds nothing the goal asks for: the handcoded expert knows
    where every object lies and walks straight there, a choice no history predicts. As DAgger labels in the
    policy's off-course states those taught it to leave the place it was searching for an arbitrary other (two
    DAgger rounds lowered the fixed train games won: README). Goals without roles (`goal_roles`) keep every label."""
    roles = goal_roles(slot.state.goal)
    if roles is None or not label.startswith("go to "):
        return True
    return any(roles.role(obj) == "goal object" for obj in slot.memory.holding)


def collect(ranker, make_env, games: list, beta: float, cfg: AgentConfig, seed: int, desc: str):
    """Play `games` with the beta-mixture; (labelled sets, rollout)."""
    rng = random.Random(seed)
    sets: list[CandidateSet] = []
    skip_search = beta < 1 and cfg.search_labels == "inferable"

    def on_state(slot: Slot, scores: dict[str, float] | None) -> dict:
        label = expert_label(slot.state)
        if label is not None and not (skip_search and not inferable(slot, label)):
            sets.append(labelled_set(slot, label, cfg.max_negatives, rng, scores))
        return {"label": label}

    with tqdm(total=len(games), desc=desc, leave=False) as bar:
        ro = run_episodes(make_env, games, ranker, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
                          beta=beta, expert=lambda s: s.info.get("expert_plan"), on_state=on_state, seed=seed,
                          progress=bar, score_all=True, avoid_repeats=cfg.avoid_repeats,
                          repeat_penalty=cfg.repeat_penalty)
    return sets, ro


def agreement(episodes: list[dict]) -> float | None:
    """Share of the policy's own decisions that match the expert's label (labelled states only)."""
    pairs = [(t["action"], t["label"]) for e in episodes for t in e["trajectory"]
             if t.get("by") == "policy" and t.get("label")]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None


def fit(model, sets: list[CandidateSet], cfg: AgentConfig, accelerator: Accelerator, seed: int,
        desc: str = "train") -> dict:
    """`epochs_per_round` passes over `sets`: packed token-budget batches, AdamW, linear warm-up, clip."""
    if not isinstance(cfg.epochs_per_round, (int, float)):  # per-round lists are resolved by run_dagger
        raise ConfigError(f"this recipe fits once: epochs_per_round must be one number, got {cfg.epochs_per_round}")
    encoded = model.encode_sets(sets)
    sampler = TokenBudgetBatchSampler([e.n_tokens for e in encoded], cfg.max_tokens, shuffle=True, seed=seed,
                                      num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    total = max(1, math.ceil(len(sampler) * cfg.epochs_per_round))
    opt = build_optimizer(cfg, model)  # the trainer's AdamW groups (no decay on biases / norms)
    sched = linear_warmup(opt, max(1, math.ceil(cfg.warmup_ratio * total)), total)
    ddp, opt, sched = accelerator.prepare(model, opt, sched)
    collate, step, t0, losses, hits_all = model.collator(), 0, time.perf_counter(), [], []
    ddp.train()
    bar = tqdm(total=total, desc=desc, leave=False, disable=not accelerator.is_local_main_process)
    epoch = 0
    while step < total:
        sampler.set_epoch(epoch)
        for idx in sampler:
            batch = collate([encoded[i] for i in idx]).to(accelerator.device)
            with accelerator.autocast():
                scores = ddp(batch)
                if cfg.loss == "listwise":
                    loss, hits = listwise_rank_loss(scores, batch.labels, batch.group_offsets,
                                                    temperature=cfg.temperature, point_weight=cfg.point_weight)
                else:
                    loss, hits = pairwise_rank_loss(scores, batch.labels, batch.group_offsets,
                                                    point_weight=cfg.point_weight)
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(ddp.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            hits_all.append(hits.float().mean().item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}",
                            top1=f"{sum(hits_all[-10:]) / len(hits_all[-10:]):.2f}")
            if step >= total:
                break
        epoch += 1
    bar.close()
    ddp.eval()
    # the curve, ten-step means: a fit that sat at the uniform loss (ln of the set size) or fell back to it
    # is told apart from one that learned (measured: two WebShop runs of one recipe, 0.54 and 0.80 final loss)
    curve = [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 3) for i in range(0, len(losses), 10)]
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "sets": len(sets),
            "final_loss": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 4),
            "train_top1": round(sum(hits_all[-10:]) / max(1, len(hits_all[-10:])), 3), "loss_curve": curve}


def round_epochs(cfg: AgentConfig) -> list[float]:
    """`epochs_per_round` as one value per round (a single number applies to every round)."""
    e = cfg.epochs_per_round
    epochs = [float(x) for x in e] if isinstance(e, (list, tuple)) else [float(e)] * len(cfg.episodes)
    if len(epochs) != len(cfg.episodes):
        raise ConfigError(f"epochs_per_round has {len(epochs)} entries for {len(cfg.episodes)} rounds (episodes); "
                          f"give one per round or a single number")
    if any(x <= 0 for x in epochs):
        raise ConfigError(f"epochs_per_round must be > 0, got {e}")
    return epochs


def pick_round(rounds: list[dict]) -> int:
    """The round whose model won most fixed train games, then repeated itself least, then the later one:
    model selection on train games only (a DAgger round can be worse than the one before: measured, README)."""
    return max(rounds, key=lambda r: (r["eval"]["success_rate"], -r["eval"]["repeated_action_rate"], r["round"]))["round"]


def round_table(rounds: list[dict]) -> list[str]:
    """The per-round markdown table of the report."""
    lines = ["| round | beta | episodes | rollout success | states added | aggregate | expert agreement | "
             "train steps | eval success (fixed train games) | eval repeats | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rounds:
        agree = "—" if r["agreement"] is None else f"{r['agreement']:.1%}"
        ev = r.get("eval") or {}
        lines.append(f"| {r['round']} | {r['beta']:.2f} | {r['episodes']} | {r['rollout_success']:.1%} | "
                     f"{r['states_added']} | {r['aggregate']} | {agree} | {r['train']['steps']} | "
                     f"{ev.get('success_rate', float('nan')):.1%} | {ev.get('repeated_action_rate', float('nan')):.1%} | "
                     f"{r['minutes']:.1f} |")
    return lines


def load_round(out: Path, r: int) -> tuple[list[CandidateSet], dict]:
    d = out / "dagger" / f"round_{r}"
    return read_records(d / "states.jsonl.gz", max_candidates=10_000), json.loads((d / "metrics.json").read_text())


def save_round(out: Path, r: int, model, new_sets: list[CandidateSet], metrics: dict) -> None:
    d = out / "dagger" / f"round_{r}"
    d.mkdir(parents=True, exist_ok=True)
    write_records(d / "states.jsonl.gz", new_sets)
    log = (metrics.get("eval") or {}).pop("episodes_log", None)
    if log is not None:  # every step of the fixed-game evaluation, to read the failures
        from fastrank.agent_eval import write_episodes

        write_episodes(d / "eval_episodes.jsonl", log)
    model.save_pretrained(d / "model")
    (d / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")  # written last: marks the round done


def _shard(items: list, accelerator: Accelerator) -> list:
    return items[accelerator.process_index::accelerator.num_processes]


def _gather(items: list, accelerator: Accelerator) -> list:
    if accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def game_plan(cfg: AgentConfig, games: list) -> dict:
    """Which `cfg.train_split` games the recipe plays: a fixed, type-balanced eval set first; each round's rollout
    games from the rest in a seeded order, new each round; "unplayed" = the games no round or eval touched."""
    from fastrank.agent_eval import spread_over_types

    eval_games = [g.game_file for g in spread_over_types(games, cfg.eval_games)] if cfg.eval_games else []
    pool = [g.game_file for g in games if g.game_file not in set(eval_games)]
    random.Random(cfg.seed).shuffle(pool)
    if sum(cfg.episodes) > len(pool):
        raise ValueError(f"{sum(cfg.episodes)} rollout episodes asked for, {len(pool)} {cfg.train_split} games")
    bounds = [sum(cfg.episodes[:r]) for r in range(len(cfg.episodes) + 1)]
    return {"split": cfg.train_split, "eval": eval_games,
            "rounds": [pool[a:b] for a, b in zip(bounds, bounds[1:])], "unplayed": pool[bounds[-1]:]}


def run_dagger(cfg: AgentConfig) -> dict:
    """BC + DAgger rounds as `cfg` says; writes `<output_dir>/model`, `report.md` and `results.json`."""
    from fastrank.agent_eval import spread_over_types, summarize, write_episodes
    from fastrank.envs.alfworld import AlfworldEnv, ensure_games, list_games
    from fastrank.model import Reranker

    if cfg.output_round not in ("best", "last"):
        raise ConfigError(f"output_round must be 'best' or 'last', not {cfg.output_round!r}")
    if cfg.search_labels not in ("expert", "inferable"):
        raise ConfigError(f"search_labels must be 'expert' or 'inferable', not {cfg.search_labels!r}")
    if cfg.loss not in ("listwise", "pairwise"):
        raise ConfigError(f"loss must be 'listwise' or 'pairwise', not {cfg.loss!r}")
    if len(cfg.episodes) != len(cfg.betas):
        raise ConfigError(f"episodes ({len(cfg.episodes)} rounds) and betas ({len(cfg.betas)}) must have one entry "
                          f"per round")
    epochs = round_epochs(cfg)
    accelerator = agent_accelerator(cfg)
    out = Path(cfg.output_dir)
    if cfg.games_dir is None:
        from fastrank.paths import shared_data_dir

        cfg.games_dir = str(shared_data_dir() / "alfworld" / "json_2.1.1_games.tar.xz")
    plan = game_plan(cfg, list_games(ensure_games(cfg.games_dir), cfg.train_split))
    eval_games = plan["eval"]
    if accelerator.is_main_process:  # which train games no round saw: `agent-eval --unplayed-by` tunes decoding there
        out.mkdir(parents=True, exist_ok=True)
        (out / "games.json").write_text(json.dumps(plan, indent=1) + "\n")

    def eval_fixed(policy) -> dict | None:
        """The policy alone on the fixed train games (the per-round table's eval columns)."""
        if not eval_games:
            return None
        with accelerator.autocast():
            ro_eval = run_episodes(AlfworldEnv, _shard(eval_games, accelerator), policy, max_steps=cfg.max_steps,
                                   batch_size=cfg.batch_size, seed=cfg.seed, avoid_repeats=cfg.avoid_repeats,
                                   repeat_penalty=cfg.repeat_penalty)
        episodes = _gather(ro_eval.episodes, accelerator)
        ev = summarize(episodes)
        ev.pop("per_task_type", None)
        ev["episodes_log"] = episodes  # saved beside the round (eval_episodes.jsonl), not in metrics.json
        return ev

    def new_model() -> Reranker:
        return agent_model(cfg, accelerator.device)

    model = new_model()
    aggregate, rounds, start = [], [], 0
    if cfg.resume:
        while start < len(cfg.episodes) and (out / "dagger" / f"round_{start}" / "metrics.json").exists():
            sets, metrics = load_round(out, start)
            aggregate += sets
            rounds.append(metrics)
            start += 1
        if start:
            model = Reranker.from_pretrained(out / "dagger" / f"round_{start - 1}" / "model").to(accelerator.device)
            accelerator.print(f"resumed after round {start - 1} ({len(aggregate)} states)")
    accelerator.print(f"DAgger: {len(cfg.episodes)} rounds, episodes {cfg.episodes}, betas {cfg.betas}; "
                      f"{len(eval_games)} fixed eval games; model {cfg.model} ({cfg.layout}, {cfg.feature_mode})")
    for r in range(start, len(cfg.episodes)):
        t0 = time.perf_counter()
        round_games = plan["rounds"][r]
        beta = cfg.betas[r]
        with accelerator.autocast():  # the policy's decisions in the training precision (bf16: faster)
            new, ro = collect(model if beta < 1 else None, AlfworldEnv, _shard(round_games, accelerator), beta,
                              cfg, seed=cfg.seed + r, desc=f"round {r} rollouts (beta {beta:.2f})")
        new, episodes = _gather(new, accelerator), _gather(ro.episodes, accelerator)
        rng = random.Random(cfg.seed + 1000 + r)
        replay = rng.sample(aggregate, min(len(aggregate), int(cfg.old_ratio * len(new))))
        train_sets = new + replay
        if cfg.max_train_sets and len(train_sets) > cfg.max_train_sets:
            train_sets = rng.sample(train_sets, cfg.max_train_sets)
        train_info = fit(model, train_sets, dataclasses.replace(cfg, epochs_per_round=epochs[r]), accelerator,
                         seed=cfg.seed + r, desc=f"round {r} train")
        aggregate += new
        ev = eval_fixed(model)
        metrics = {"round": r, "beta": beta, "episodes": len(episodes),
                   "rollout_success": sum(e["won"] for e in episodes) / max(1, len(episodes)),
                   "load_failures": [[e["task"], e["error"]] for e in episodes if e.get("error")],
                   "states_added": len(new), "aggregate": len(aggregate), "agreement": agreement(episodes),
                   "train": train_info, "eval": ev, "minutes": round((time.perf_counter() - t0) / 60, 2)}
        rounds.append(metrics)
        if accelerator.is_main_process:
            save_round(out, r, model, new, metrics)
        accelerator.print("\n".join(round_table(rounds)))
    results = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "rounds": rounds}
    if cfg.final_fit_epochs > 0:  # a fresh model on the whole aggregate, the rounds' policies only collected it
        model = new_model()
        t0 = time.perf_counter()
        info = fit(model, aggregate, dataclasses.replace(cfg, epochs_per_round=cfg.final_fit_epochs), accelerator,
                   seed=cfg.seed + 999, desc="final fit (all states)")
        ev = eval_fixed(model)
        if ev is not None and accelerator.is_main_process:
            write_episodes(out / "final_fit_eval_episodes.jsonl", ev.pop("episodes_log"))
        results["final_fit"] = {"train": info, "eval": ev, "minutes": round((time.perf_counter() - t0) / 60, 2)}
        accelerator.print(f"final fit on {len(aggregate)} states: {info}; eval on the fixed train games: {ev}")
    elif cfg.output_round == "best" and rounds and all(r.get("eval") for r in rounds):
        best = pick_round(rounds)
        results["output_round"] = best
        if best != rounds[-1]["round"]:
            model = Reranker.from_pretrained(out / "dagger" / f"round_{best}" / "model").to(accelerator.device)
        accelerator.print(f"output: round {best}'s model (most fixed train games won)")
    if accelerator.is_main_process:
        model.save_pretrained(out / "model")
    if cfg.final_eval_games:
        from fastrank.agent_eval import evaluate_agent

        val = list_games(ensure_games(cfg.games_dir), cfg.final_eval_split)
        tasks = [g.game_file for g in spread_over_types(val, None if cfg.final_eval_games < 0 else cfg.final_eval_games)]
        res = evaluate_agent(model, "alfworld", AlfworldEnv, tasks, max_steps=cfg.max_steps,
                             batch_size=cfg.batch_size, avoid_repeats=cfg.avoid_repeats,
                             repeat_penalty=cfg.repeat_penalty,
                             desc=f"final eval {cfg.final_eval_split}")
        results["final_eval"] = {"split": cfg.final_eval_split, **res["summary"]}
        if accelerator.is_main_process:
            write_episodes(out / f"agent_eval_{cfg.final_eval_split}.jsonl", res["episodes"])
    if accelerator.is_main_process:
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        write_agent_report(results, out)
        print(f"report: {out / 'report.md'}  model: {out / 'model'}")
    return results


def write_agent_report(results: dict, out: Path) -> Path:
    from fastrank.agent_eval import failed_to_load_lines, repetition

    lines = ["# Agent recipe: BC + DAgger in ALFWorld", "", *round_table(results["rounds"]), ""]
    if "output_round" in results:
        lines += [f"Output model: round {results['output_round']} (most fixed train games won).", ""]
    ff = results.get("final_fit")
    if ff:
        ev = ff["eval"] or {}
        lines += [f"Final fit: a fresh model on all {ff['train']['sets']} aggregated states, {ff['train']['steps']} "
                  f"steps, {ff['minutes']:.1f} min; fixed train games: success {ev.get('success_rate', float('nan')):.1%}, "
                  f"repeats {ev.get('repeated_action_rate', float('nan')):.1%}.", ""]
    fe = results.get("final_eval")
    if fe:
        lines += [f"## Held-out games: {fe['split']} ({fe['episodes']} played)", "",
                  f"success {fe['success_rate']:.1%}, mean steps {fe['mean_steps']:.1f}, {repetition(fe)}, "
                  f"{fe['decisions_per_s']:.1f} decisions/s", "",
                  "| task type | games | success | mean steps | repeats | looped |", "|---|---|---|---|---|---|"]
        for t, a in fe["per_task_type"].items():
            lines.append(f"| {t} | {a['episodes']} | {a['success_rate']:.1%} | {a['mean_steps']:.1f} | "
                         f"{a['repeated_action_rate']:.1%} | {a['looped_action_rate']:.1%} |")
        lines += failed_to_load_lines(fe)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
