"""The GRPO / GCD / GCD_sugg update loop, evaluation on L0/L1/L2, and the report.

One update (paper Figure 9):
  1. sample `tasks_per_update` tasks of the RL pool and roll out `group_size` episodes of each (GCD_sugg: with
     the current suggestions in the prompt);
  2. per-turn samples with the episodes' group-relative advantages            -> L_GRPO
  3. GCD: label (state, action)s (repeat / success rules, optional external labeler), judge `judge_samples` of
     them `judge_group` times each with the critic prompt, reward = verdict == label  -> L_GCD
  4. one optimizer step on L_GRPO + gcd_coef * L_GCD (each a token-mean of the clipped surrogate)
  5. GCD_sugg: add the correct judges' advice to the bank; every `sugg_refresh_every` updates re-summarise.

Distributed (Accelerate, one process per device): every process rolls out its share of the update's tasks;
the optimizer step (fastrank.gcd.update) averages the gradients with one all-reduce. Mixed precision via
Accelerate's autocast (fp16 with its scaler).
"""
from __future__ import annotations

import random
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable

from fastrank.gcd import _compat  # noqa: F401

import torch  # noqa: E402

from fastrank.gcd.config import GCDConfig, to_dict  # noqa: E402
from fastrank.gcd.envpool import EnvFactory, make_pool  # noqa: E402
from fastrank.gcd.grpo import episode_samples  # noqa: E402
from fastrank.gcd.judge import (collect_advice, judge_stats, judge_steps, judgment_samples,  # noqa: E402
                                select_for_judging)
from fastrank.gcd.labels import Labeler, apply_labels, build_labeler  # noqa: E402
from fastrank.gcd.metrics import level_metrics, rollout_metrics  # noqa: E402
from fastrank.gcd.modeling import ModelSpec, is_peft, load_model, save_checkpoint  # noqa: E402
from fastrank.gcd.policy import Policy  # noqa: E402
from fastrank.gcd.rollout import RolloutConfig, run_episodes, save_episodes  # noqa: E402
from fastrank.gcd.suggestions import SuggestionBank, policy_summarizer  # noqa: E402
from fastrank.gcd.tasks import LEVELS, Task  # noqa: E402
from fastrank.gcd.update import policy_update  # noqa: E402


# ------------------------------------------------------------------------------------------ setup

def model_spec(cfg: GCDConfig) -> ModelSpec:
    names = {f.name for f in fields(ModelSpec)}
    return ModelSpec(**{k: v for k, v in to_dict(cfg).items() if k in names})


def rollout_config(cfg: GCDConfig, greedy: bool = False) -> RolloutConfig:
    return RolloutConfig(env=cfg.env, max_steps=cfg.max_steps, history_length=cfg.history_length,
                         max_new_tokens=cfg.max_new_tokens, greedy=greedy, top_p=cfg.top_p,
                         require_think=cfg.require_think, inadmissible=cfg.inadmissible,
                         invalid_penalty=cfg.invalid_penalty)


def env_factory(cfg: GCDConfig) -> EnvFactory:
    if cfg.env == "alfworld":
        return EnvFactory("alfworld")
    return EnvFactory("scienceworld", {"max_admissible": cfg.max_admissible, "step_limit": cfg.sw_step_limit,
                                       "seed": cfg.seed})


def task_splits(cfg: GCDConfig) -> dict[str, list[Task]]:
    if cfg.env == "alfworld":
        from fastrank.envs.alfworld import ensure_games
        from fastrank.paths import shared_data_dir
        from fastrank.gcd.tasks import alfworld_splits

        games = cfg.games or str(shared_data_dir() / "alfworld" / "json_2.1.1_games.tar.xz")
        return alfworld_splits(ensure_games(games), n_train=cfg.n_train_tasks, n_eval=cfg.n_eval_tasks,
                               seed=cfg.seed, eval_split=cfg.eval_split)
    from fastrank.gcd.tasks import scienceworld_splits

    return scienceworld_splits(n_train=cfg.n_train_tasks, n_eval=cfg.n_eval_tasks, seed=cfg.seed,
                               fill_missing=cfg.fill_missing)


def mixed_precision(cfg: GCDConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def build_optimizer(params, cfg: GCDConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer != "adamw":
        raise ValueError(f"optimizer must be adamw or adamw8bit, got {cfg.optimizer!r}")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------------------- trainer

class GCDTrainer:
    """Holds the model, optimizer, env pool, suggestion bank and history; `train()` runs everything.

    labeler: optional external labeler (labels.Labeler), instead of the config's `labeler` key; summarizer:
    text -> text for GCD_sugg (default: the policy model). Tasks may be given (tests); by default they come
    from `task_splits(cfg)`. policy_wrapper changes what is sampled (e.g. ScriptedPolicy), never what is
    trained."""

    def __init__(self, cfg: GCDConfig, *, labeler: Labeler | None = None,
                 summarizer: Callable[[str], str] | None = None, splits: dict[str, list[Task]] | None = None,
                 policy_wrapper: Callable[[Policy], object] | None = None, accelerator=None,
                 env_factory_fn: Callable[[], object] | None = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.acc = accelerator or Accelerator(mixed_precision=mixed_precision(cfg))
        set_seed(cfg.seed)  # the same initial weights (LoRA A is random) on every process
        self.out = Path(cfg.output_dir)
        self.spec = model_spec(cfg)
        model, tok = load_model(self.spec, device=self.acc.device)
        set_seed(cfg.seed + self.acc.process_index)  # different samples per process
        self.policy = Policy(model, tok, gen_batch_size=cfg.gen_batch_size, score_batch_size=cfg.score_batch_size,
                             temperature=cfg.temperature, packing=cfg.update_packing,
                             autocast=self.acc.autocast if self.acc.mixed_precision != "no" else None)
        # a wrapper (e.g. ScriptedPolicy) changes what is sampled, never what is trained
        self.actor = policy_wrapper(self.policy) if policy_wrapper else self.policy
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = self.acc.prepare_optimizer(build_optimizer(self.params, cfg))
        self.splits = splits if splits is not None else task_splits(cfg)
        if labeler is not None and cfg.labeler != "none":
            raise ValueError(f"a labeler= argument and labeler: {cfg.labeler} in the config: give one of them")
        self.labeler = labeler if labeler is not None else build_labeler(cfg, self.policy, device=self.acc.device)
        self.labeler_name = cfg.labeler if labeler is None else getattr(labeler, "name", type(labeler).__name__)
        self.bank = None
        if cfg.suggestions:
            self.bank = SuggestionBank(summarizer or policy_summarizer(self.policy, cfg.sugg_max_new_tokens),
                                       refresh_every=cfg.sugg_refresh_every, max_advice=cfg.sugg_max_advice,
                                       max_rules=cfg.sugg_max_rules)
        self.pool = None
        self.env_factory_fn = env_factory_fn  # tests: any zero-argument env constructor (local pools only)
        self.rng = random.Random(cfg.seed)
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.update = 0
        self._order: list[Task] = []

    # ---- helpers
    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def log(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    def _pool(self):
        if self.pool is None:
            factory = self.env_factory_fn or env_factory(self.cfg)
            self.pool = make_pool(factory, self.cfg.num_envs, workers=self.cfg.env_workers)
        return self.pool

    def _shard(self, items: list) -> list:
        return items[self.acc.process_index::self.acc.num_processes]

    def _gather(self, items: list) -> list:
        if self.acc.num_processes <= 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def _label(self, episodes: list, rng: random.Random) -> tuple[list, dict]:
        """Rule + external labels with the labeler's stats; the per-update cap is shared among processes."""
        cap = self.cfg.labeler_max_per_update
        if cap is not None:
            cap = max(1, cap // self.acc.num_processes)
        t0 = time.perf_counter()
        labeled, stats = apply_labels(episodes, self.labeler, max_external=cap, rng=rng)
        return labeled, {**stats, "seconds": time.perf_counter() - t0}

    def next_tasks(self) -> list[Task]:
        """The update's tasks: cycles through a seeded shuffle of the RL pool (the same on every process)."""
        pool = self.splits["train"]
        if not pool:
            raise ValueError("empty RL task pool")
        out = []
        while len(out) < self.cfg.tasks_per_update:
            if not self._order:
                self._order = list(pool)
                random.Random(self.cfg.seed * 1000 + self.update).shuffle(self._order)
            out.append(self._order.pop())
        return out

    # ---- one update
    def step(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        self.update += 1
        tasks = self._shard(self.next_tasks())
        sugg = self.bank.suggestions if self.bank else []
        episodes = run_episodes(self.actor, self._pool(), tasks, rollout_config(cfg), group_size=cfg.group_size,
                                suggestions=sugg)
        t_roll = time.perf_counter() - t0
        samples = episode_samples(episodes, eps=cfg.adv_eps, scale=cfg.scale_adv)
        rec = {"update": self.update, **{f"rollout/{k}": v for k, v in rollout_metrics(episodes).items()}}
        groups = []
        if cfg.judging:
            t1 = time.perf_counter()
            labeled, lstats = self._label(episodes, self.rng)
            chosen = select_for_judging(labeled, max(1, cfg.judge_samples // self.acc.num_processes),
                                        balance=cfg.balance_labels, rng=self.rng)
            groups = judge_steps(self.actor, chosen, n=cfg.judge_group, max_new_tokens=cfg.judge_max_new_tokens)
            samples += judgment_samples(groups, eps=cfg.adv_eps, scale=cfg.scale_adv)
            rec.update({"labels/total": len(labeled), "labels/good": sum(s.label for s in labeled),
                        "labels/judged": len(chosen), "time/judge": time.perf_counter() - t1})
            rec.update({f"judge/{k}": v for k, v in judge_stats(groups).items() if not isinstance(v, dict)})
            if self.labeler is not None:
                rec.update({f"labeler/{k}": v for k, v in lstats.items()})
        t2 = time.perf_counter()
        rec.update(policy_update(self.policy, self.optimizer, self.acc, self.params, samples, cfg, self.rng))
        rec["time/update"] = time.perf_counter() - t2
        if self.bank is not None:
            self.bank.add(collect_advice(groups, cfg.sugg_advice_from))
            if self.bank.maybe_refresh(self.update):
                rec["suggestions"] = list(self.bank.suggestions)
        rec["time/rollout"] = t_roll
        rec["time/total"] = time.perf_counter() - t0
        if cfg.save_episodes and self.main:
            save_episodes(self.out / "episodes" / f"update_{self.update:05d}.jsonl", episodes)
        return rec

    # ---- evaluation
    def evaluate(self, tag: str) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        own = []
        for level in LEVELS:
            tasks = self._shard(self.splits.get(level, []))
            own += run_episodes(self.actor, self._pool(), tasks, rollout_config(cfg, greedy=cfg.eval_greedy),
                                group_size=1)  # no suggestions at test time (paper §5)
        eps = self._gather(own)
        res = {"tag": tag, "update": self.update, "levels": level_metrics(eps)}
        if cfg.eval_judge_samples > 0:
            res["judge"] = {}
            # each process labels its own episodes: a sampled labeler run on every process over all of them
            # would repeat the work and could disagree between processes, splitting the selection below
            own_labeled, lstats = self._label(own, random.Random(cfg.seed))
            labeled = self._gather(own_labeled)
            if self.labeler is not None:
                every = self._gather([lstats])
                res["labeler"] = {k: (max if k == "seconds" else sum)(st[k] for st in every) for k in lstats}
            for level in LEVELS:
                chosen = select_for_judging([s for s in labeled if s.level == level], cfg.eval_judge_samples,
                                            balance=cfg.balance_labels, rng=random.Random(cfg.seed))
                chosen = self._shard(chosen)
                groups = judge_steps(self.actor, chosen, n=1, max_new_tokens=cfg.judge_max_new_tokens,
                                     greedy=cfg.eval_greedy)
                st = judge_stats(self._gather([[j for g in groups for j in g]]))  # one flat list per process
                res["judge"][level] = {k: v for k, v in st.items() if k in ("judgments", "accuracy",
                                                                             "accuracy_good", "accuracy_bad",
                                                                             "format_error_rate")}
        res["time"] = time.perf_counter() - t0
        if self.main:
            if cfg.save_episodes:
                save_episodes(self.out / "eval" / f"{tag}.jsonl", eps)
            if cfg.coupling:
                from fastrank.gcd.coupling import coupling_report

                try:
                    res["coupling"] = coupling_report(self.policy, eps, self.out / "coupling" / tag,
                                                      max_per_population=cfg.coupling_max_per_population,
                                                      seed=cfg.seed, title=tag)["table1"]
                except ValueError as exc:  # e.g. no successful OOD episode yet
                    res["coupling"] = {"skipped": str(exc)}
        self.evals.append(res)
        return res

    # ---- checkpoints
    def save(self, name: str) -> Path | None:
        if not self.main:
            return None
        path = save_checkpoint(self.policy.model, self.policy.tokenizer, self.out / name, self.spec,
                               {"update": self.update, "method": self.cfg.method})
        state = {"update": self.update, "optimizer": self.optimizer.state_dict(), "history": self.history,
                 "evals": self.evals, "bank": self.bank.state_dict() if self.bank else None,
                 "order": [t.key for t in self._order], "rng": self.rng.getstate()}
        torch.save(state, path / "trainer_state.pt")
        return path

    def load(self, path: str | Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(path)
        if is_peft(self.policy.model):
            set_peft_model_state_dict(self.policy.model, load_file(str(path / "adapter_model.safetensors")))
        else:
            from safetensors.torch import load_model

            load_model(self.policy.model, str(path / "model.safetensors"))
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.update, self.history, self.evals = state["update"], state["history"], state["evals"]
        self.optimizer.load_state_dict(state["optimizer"])
        if self.bank and state["bank"]:
            self.bank.load_state_dict(state["bank"])
        by_key = {t.key: t for t in self.splits["train"]}
        self._order = [by_key[k] for k in state["order"] if k in by_key]
        self.rng.setstate(state["rng"])

    def _latest_checkpoint(self) -> Path | None:
        cands = sorted(self.out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        return cands[-1] if cands and (cands[-1] / "trainer_state.pt").is_file() else None

    # ---- the loop
    def train(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume and (ck := self._latest_checkpoint()) is not None:
            self.load(ck)
            self.log(f"resumed from {ck} at update {self.update}")
        n_train = sum(p.numel() for p in self.params)
        n_all = sum(p.numel() for p in self.policy.model.parameters())
        self.log(f"gcd: method {cfg.method}, env {cfg.env}, model {cfg.model} ({n_train:,} of {n_all:,} params "
                 f"train), {self.acc.num_processes} process(es), mixed precision {self.acc.mixed_precision}, "
                 f"RL pool {len(self.splits['train'])} tasks, eval {[len(self.splits.get(l, [])) for l in LEVELS]}, "
                 f"labeler {self._labeler_desc()}")
        t0 = time.perf_counter()
        try:
            if cfg.eval_before and self.update == 0 and not self.evals:
                self._log_eval(self.evaluate("eval_0000"))
            while self.update < cfg.updates:
                rec = self.step()
                self.history.append(rec)
                if cfg.log_every and self.update % cfg.log_every == 0:
                    self.log(self._line(rec))
                if cfg.eval_every and self.update % cfg.eval_every == 0 and self.update < cfg.updates:
                    self._log_eval(self.evaluate(f"eval_{self.update:04d}"))
                if cfg.save_every and self.update % cfg.save_every == 0:
                    self.save(f"checkpoint-{self.update}")
            if not self.evals or self.evals[-1]["update"] != self.update:
                self._log_eval(self.evaluate(f"eval_{self.update:04d}"))
            self.save("model")
        finally:
            if self.pool is not None:
                self.pool.close()
                self.pool = None
        results = {"config": to_dict(cfg), "updates": self.update, "train_seconds": round(time.perf_counter() - t0, 1),
                   "trainable_params": n_train, "history": self.history, "evals": self.evals,
                   "suggestions": self.bank.history if self.bank else [], "labeler": self._labeler_desc()}
        if self.main:
            from fastrank.gcd.report import write_report

            write_report(results, self.out)
        return results

    def _labeler_desc(self) -> str:
        if self.labeler is None:
            return "none (rules only)"
        votes = f"{self.labeler.min_agree} of {self.labeler.n} votes, " if hasattr(self.labeler, "n") else ""
        cap = self.cfg.labeler_max_per_update
        return f"{self.labeler_name} ({votes}{'no cap' if cap is None else f'at most {cap} steps per update'})"

    def _line(self, rec: dict) -> str:
        parts = [f"update {rec['update']}", f"reward {rec.get('rollout/reward', 0):.3f}",
                 f"success {rec.get('rollout/success', 0):.3f}", f"loss {rec['loss']:+.4f}",
                 f"fmt-err {rec.get('rollout/format_error_rate', 0):.2f}"]
        if "judge/accuracy" in rec:
            parts.append(f"judge acc {rec['judge/accuracy']:.3f}")
        if "labeler/sent" in rec:
            parts.append(f"labeler {rec['labeler/labeled']}/{rec['labeler/sent']} labeled, "
                         f"{rec['labeler/abstained']} abstained, {rec['labeler/skipped_cap']} over cap")
        parts.append(f"{rec['time/total']:.1f}s (rollout {rec['time/rollout']:.1f}s)")
        return " | ".join(parts)

    def _log_eval(self, res: dict) -> None:
        def pct(x):
            return "—" if x is None else f"{x:.3f}"

        msg = ", ".join(f"{k} {pct(v.get('success'))}" for k, v in res["levels"].items())
        if "judge" in res:
            msg += " | judge acc " + ", ".join(f"{k} {pct(v.get('accuracy'))}" for k, v in res["judge"].items())
        self.log(f"eval {res['tag']}: success {msg} ({res['time']:.1f}s)")


def run(cfg: GCDConfig, **kwargs) -> dict:
    return GCDTrainer(cfg, **kwargs).train()


__all__ = ["GCDTrainer", "run", "policy_update", "model_spec", "rollout_config", "env_factory", "task_splits",
           "mixed_precision", "build_optimizer"]
