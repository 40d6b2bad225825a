"""The training loop: records → features → packed batches → Reranker → fused loss → AdamW → metrics.

One Accelerate loop for 1 CPU, 1 GPU, N GPUs and multi-process CPU (gloo). Every rank builds the same
batch list from (seed, epoch) and takes its own shard, so a run is reproducible and resumable: a
checkpoint stores the step, and resuming replays the same batch order from there.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from fastrank.config import TrainConfig, to_dict
from fastrank.data.bundle import BUNDLED_DIR, load_dataset
from fastrank.data.features import Featurizer
from fastrank.data.negatives import upsample
from fastrank.data.record import CandidateSet
from fastrank.metrics import net_gain_report
from fastrank.model import Reranker
from fastrank.ops import listwise_rank_loss, pairwise_rank_loss
from fastrank.packing import TokenBudgetBatchSampler

STATE_FILE = "train_state.json"


# --- data ------------------------------------------------------------------------------------------

def keep_fraction(sets: list[CandidateSet], fraction: float, seed: int) -> list[CandidateSet]:
    """Keep a seeded share of the *episodes* (few-shot), so no episode is half-kept."""
    if not 0 < fraction <= 1:
        if fraction == 0:
            return []
        raise ValueError(f"train_fraction must be in [0, 1], got {fraction}")
    episodes = sorted({cs.episode_id for cs in sets})
    random.Random(seed).shuffle(episodes)
    kept = set(episodes[: round(len(episodes) * fraction)])
    return [cs for cs in sets if cs.episode_id in kept]


def load_training_data(cfg: TrainConfig) -> tuple[list[CandidateSet], dict[str, dict[str, list[CandidateSet]]]]:
    """Training sets (fractions, upsampling, cap applied) and {mode: {env: eval sets}}."""
    root = cfg.data_dir or BUNDLED_DIR
    train: list[CandidateSet] = []
    for env in cfg.envs:
        sets = load_dataset(root, env, "train", cfg.negatives)
        if env in cfg.train_fraction:
            sets = keep_fraction(sets, cfg.train_fraction[env], cfg.seed)
        train += upsample(sets, cfg.upsample, seed=cfg.seed)
    if cfg.max_train_sets is not None and len(train) > cfg.max_train_sets:
        train = random.Random(cfg.seed).sample(train, cfg.max_train_sets)
    evals: dict[str, dict[str, list[CandidateSet]]] = {}
    for mode in cfg.eval_modes:
        evals[mode] = {}
        for env in cfg.eval_envs or ["alfworld", "webshop", "scienceworld"]:
            sets = load_dataset(root, env, "eval", mode)
            if cfg.max_eval_sets is not None and len(sets) > cfg.max_eval_sets:
                sets = random.Random(cfg.seed).sample(sets, cfg.max_eval_sets)
            evals[mode][env] = sets
    return train, evals


# --- checkpoints -----------------------------------------------------------------------------------

def _atomic_save_state(accelerator: Accelerator, out: Path, state: dict) -> None:
    """save_state into a temp dir, then rename: a crash mid-save never leaves a half checkpoint as latest."""
    final, tmp = out / "checkpoint", out / "checkpoint.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        old = out / "checkpoint.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)


# --- loop --------------------------------------------------------------------------------------------

def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    # bf16 GEMMs are ~50x slower than fp32 on AVX2-only CPUs: mixed precision only pays on a GPU.
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU does bf16 matmuls in hardware (Linux cpuinfo flags; where there is none, assumed yes)."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


# what both the agent recipes and agent-eval warn on such a CPU (each adds what it does about it)
BF16_EMULATED = ("bf16 on a CPU without AVX512-BF16 / AMX: bf16 matmuls are emulated there (~20-50x slower than fp32, "
                 "STACK_NOTES)")


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay, router = [], [], []
    router_lr = getattr(cfg, "router_lr", None)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if router_lr is not None and name.startswith("router."):
            router.append(p)
        else:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if router_lr is not None:
        if not router:
            raise ValueError("router_lr is set but the model has no router (set routing=true)")
        groups += [{"params": [p for p in router if p.ndim >= 2], "weight_decay": cfg.weight_decay,
                    "lr": float(router_lr)},
                   {"params": [p for p in router if p.ndim < 2], "weight_decay": 0.0, "lr": float(router_lr)}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=(0.9, 0.999))
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected adamw or adamw8bit")


LOSSES = ("pairwise", "listwise")


def rank_loss(cfg: TrainConfig, scores: torch.Tensor, batch):
    """The training objective `cfg.loss` on one packed batch: (loss, top-1 hits per set).
    pairwise: the paper's softplus pairs + point_weight x BCE (eq. 5-7). listwise: softmax cross-entropy over each
    set at `temperature`, + list_mix_pairwise x the pair term (margin) + list_mix_point x BCE."""
    if cfg.loss == "pairwise":
        return pairwise_rank_loss(scores, batch.labels, batch.group_offsets, margin=cfg.margin,
                                  point_weight=cfg.point_weight)
    if cfg.loss == "listwise":
        return listwise_rank_loss(scores, batch.labels, batch.group_offsets, temperature=cfg.temperature,
                                  pair_weight=cfg.list_mix_pairwise, point_weight=cfg.list_mix_point,
                                  margin=cfg.margin)
    raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")


def plain_step(accelerator: Accelerator, cfg: TrainConfig, model, optimizer, scheduler, batch):
    """One micro-batch of plain joint training: fused loss, one backward, clip + step on the sync boundary.
    (loss, hits). bench/bench_routing.py times this same function as its baseline."""
    with accelerator.accumulate(model), accelerator.autocast():
        scores = model(batch)
        loss, hits = rank_loss(cfg, scores, batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, hits


def linear_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


@torch.no_grad()
def score_sets(model: Reranker, sets: list[CandidateSet], accelerator: Accelerator, max_tokens: int,
               desc: str = "scoring") -> list[list[float]]:
    """Scores per candidate for every set, each rank scoring its shard; gathered on every rank."""
    model.eval()
    encoded = model.encode_sets(sets)  # in the model's layout (pairs or shared prefix)
    sampler = TokenBudgetBatchSampler([e.n_tokens for e in encoded], max_tokens, shuffle=False,
                                      num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    collate = model.collator()
    out: list[tuple[int, list[float]]] = []
    for idx in tqdm(list(sampler), desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        batch = collate([encoded[i] for i in idx]).to(accelerator.device)
        with accelerator.autocast():
            scores = model(batch).float().cpu()
        off = batch.group_offsets.tolist()
        out += [(i, scores[off[g]:off[g + 1]].tolist()) for g, i in enumerate(batch.set_index.tolist())]
    gathered = gather_object(out) if accelerator.num_processes > 1 else out  # (no Accelerator.gather_object)
    by_index = dict(gathered)  # sharding may repeat a set to even out ranks: identical scores, keep one
    missing = [i for i in range(len(sets)) if i not in by_index]
    if missing:
        raise RuntimeError(f"{len(missing)} sets were not scored (first: {missing[:5]})")
    model.train()
    return [by_index[i] for i in range(len(sets))]


def evaluate(model: Reranker, evals: dict[str, dict[str, list[CandidateSet]]], accelerator: Accelerator,
             max_tokens: int) -> dict:
    results = {}
    for mode, by_env in evals.items():
        sets = [cs for env in sorted(by_env) for cs in by_env[env]]
        if sets:
            results[mode] = net_gain_report(sets, score_sets(model, sets, accelerator, max_tokens, f"eval {mode}"))
    return results


def train(cfg: TrainConfig) -> dict:
    """Train a reranker as `cfg` says; returns the results dict (also written to output_dir)."""
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), gradient_accumulation_steps=cfg.grad_accum,
                              log_with=cfg.tracker, project_dir=cfg.output_dir)
    set_seed(cfg.seed)
    if accelerator.device.type == "cpu":
        # `accelerate launch` pins CPU runs to 1 thread; use this process's share of the cores instead.
        torch.set_num_threads(cfg.cpu_threads or max(1, (os.cpu_count() or 1) // accelerator.num_processes))
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    if cfg.layout != "pairs" and (cfg.routing or cfg.packing != "packed"):
        raise ValueError(f"layout={cfg.layout!r} has its own batches: it takes neither routing nor packing=padded")

    if cfg.routing:  # environment-aware LoRA routing (fastrank/routing/)
        from fastrank.routing.model import build_model  # the submodule: fastrank.routing's __init__ imports this one

        model = build_model(cfg)
    else:
        model = Reranker.from_pretrained(cfg.init_from) if cfg.init_from else Reranker.from_encoder(
            cfg.model, featurizer=Featurizer(cfg.feature_mode), max_length=cfg.max_length, layout=cfg.layout,
            max_action_tokens=cfg.max_action_tokens)
    if cfg.attention_dropout is not None:
        model.set_attention_dropout(cfg.attention_dropout)
    model.train()
    train_sets, evals = load_training_data(cfg)
    if not train_sets and cfg.epochs > 0:
        raise ValueError(f"no training sets for envs {cfg.envs} (fractions {cfg.train_fraction})")
    encoded = model.encode_sets(train_sets)  # in the model's layout
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {cfg.loss!r}")
    if cfg.loss != "pairwise" and (cfg.routing or cfg.grad_projection != "none"):
        raise ValueError(f"loss={cfg.loss!r} is only wired into the plain training step; routing / "
                         f"grad_projection split the pairwise loss per environment (use loss=pairwise)")
    if cfg.packing not in ("packed", "padded"):
        raise ValueError(f"packing must be 'packed' or 'padded', got {cfg.packing!r}")
    collate = model.collator(packed=cfg.packing == "packed")
    sampler = TokenBudgetBatchSampler([e.n_tokens for e in encoded], cfg.max_tokens, shuffle=True,
                                      seed=cfg.seed, num_replicas=accelerator.num_processes,
                                      rank=accelerator.process_index)
    steps_per_epoch = math.ceil(len(sampler) / cfg.grad_accum)
    total = math.ceil(steps_per_epoch * cfg.epochs)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)

    optimizer = build_optimizer(cfg, model)
    scheduler = linear_warmup(optimizer, math.ceil(cfg.warmup_ratio * total), total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    raw_model: Reranker = accelerator.unwrap_model(model)
    router_step = None
    if cfg.routing or cfg.grad_projection != "none":  # routed / per-env projected step (fastrank/routing/)
        from fastrank.routing.train_step import RoutedTrainStep

        router_step = RoutedTrainStep(cfg, accelerator, model, raw_model, optimizer, scheduler)
    if cfg.tracker:
        accelerator.init_trackers("fastrank", config={k: str(v) for k, v in to_dict(cfg).items()})

    step, hist = 0, History()
    if cfg.resume and (out / "checkpoint" / STATE_FILE).exists():
        accelerator.load_state(str(out / "checkpoint"))
        saved = json.loads((out / "checkpoint" / STATE_FILE).read_text())
        step, hist = saved["step"], History(**saved["history"])
        if router_step is not None:
            router_step.load_state_dict(saved.get("routing"))
        accelerator.print(f"resumed from {out / 'checkpoint'} at step {step}/{total}")

    accelerator.print(f"training on {len(train_sets)} candidate sets ({sum(e.n_candidates for e in encoded)} candidates), "
                      f"{accelerator.num_processes} process(es), {total} optimizer steps, "
                      f"mixed precision {accelerator.mixed_precision}")
    bar = tqdm(total=total, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    t0, seen_cand, seen_tok = time.perf_counter(), 0, 0
    micro = step * cfg.grad_accum  # micro-batches done; resume skips exactly these
    while step < total:
        epoch, offset = divmod(micro, len(sampler))
        sampler.set_epoch(epoch)
        for idx in list(sampler)[offset:]:
            batch = collate([encoded[i] for i in idx]).to(accelerator.device)
            if router_step is not None:
                with accelerator.accumulate(model):
                    loss, hits = router_step(batch, step)
            else:
                loss, hits = plain_step(accelerator, cfg, model, optimizer, scheduler, batch)
            micro += 1
            seen_cand += batch.n_candidates
            seen_tok += batch.n_tokens
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % cfg.log_every == 0 or step == total:
                stats = accelerator.reduce(torch.stack([loss.detach().float(), hits.float().mean()]), "mean")
                hist.steps.append(step)
                hist.loss.append(stats[0].item())
                hist.top1.append(stats[1].item())
                dt = time.perf_counter() - t0
                diag = router_step.log_record(step) if router_step is not None else None  # (collective)
                bar.set_postfix(loss=f"{hist.loss[-1]:.3f}", top1=f"{hist.top1[-1]:.2f}",
                                cand_s=f"{seen_cand * accelerator.num_processes / dt:.0f}",
                                tok_s=f"{seen_tok * accelerator.num_processes / dt:.0f}",
                                **(router_step.postfix(diag) if diag else {}))
                if cfg.tracker:
                    accelerator.log({"loss": hist.loss[-1], "train_top1": hist.top1[-1],
                                     "lr": scheduler.get_last_lr()[0],
                                     **(router_step.scalars(diag) if diag else {})}, step=step)
            bar.update(1)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                _atomic_save_state(accelerator, out, {"step": step, "history": hist.__dict__, **(
                    {"routing": router_step.state_dict()} if router_step is not None else {})})
            if step >= total:
                break
    bar.close()
    train_time = time.perf_counter() - t0

    # Cheap DDP sanity check: every rank must hold the same parameters after training.
    checksum = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).sum().reshape(1)
    rank_checksums = accelerator.gather(checksum.to(accelerator.device)).tolist()
    if accelerator.is_main_process:  # saved before the (long) evaluation, so an interrupted eval loses nothing
        raw_model.save_pretrained(out / "model")
    results = {"config": to_dict(cfg), "train_sets": len(train_sets), "steps": step,
               "rank_param_checksums": rank_checksums,
               "train_seconds": round(train_time, 1), "history": hist.__dict__,
               # candidates this run trained on (all ranks) and per second of the training loop (since resume)
               "train_candidates": seen_cand * accelerator.num_processes,
               "candidates_per_s": round(seen_cand * accelerator.num_processes / max(train_time, 1e-9), 2),
               "eval": evaluate(raw_model, evals, accelerator, cfg.max_tokens)}
    # Diagnostics: routing/projection history; a rising loss is reported loudly, never silently kept.
    if router_step is not None:
        results["routing_diagnostics"] = {"history": router_step.history, "totals": router_step.totals}
    from fastrank.routing.divergence import report_divergence

    report_divergence(results, steps_per_epoch, cfg.divergence_tol,
                      out if accelerator.is_main_process else None, accelerator.print)
    if accelerator.is_main_process:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        from fastrank.report import write_report

        write_report(results, out)
    accelerator.wait_for_everyone()
    if cfg.tracker:
        accelerator.log({f"eval/{mode}/{env}/net_gain": r["net_gain"] for mode, rep in results["eval"].items()
                         for env, r in rep.items()}, step=step)
        accelerator.end_training()
    return results


def summary_line(report: Path, results: dict) -> str:
    """The recipe's last line: where the report is, the combined net gain per eval mode and the throughput."""
    if "aggregate" in results:  # several seeds: mean +- std, mean throughput
        gains = [f"{m} {a['combined']['net_gain_mean']:+.3f}±{a['combined']['net_gain_std']:.3f}"
                 for m, a in results["aggregate"].items() if "combined" in a]
        rates = [r.get("candidates_per_s") for r in results["seeds"].values()]
        rate = sum(rates) / len(rates) if rates and None not in rates else None
    else:
        gains = [f"{m} {r['combined']['net_gain']:+.3f}" for m, r in results["eval"].items() if "combined" in r]
        rate = results.get("candidates_per_s")
    gain_txt = ", ".join(gains) if gains else "no eval"
    rate_txt = f"{rate:.1f} candidates/s" if rate is not None else "throughput n/a"
    return f"report: {report} | net gain (combined) {gain_txt} | {rate_txt}"


def run_recipe(cfg: TrainConfig) -> dict:
    """What every recipe script does: train (once, or once per seed and aggregate) and say where the report is."""
    if not cfg.seeds:
        results = train(cfg)
        print(summary_line(Path(cfg.output_dir) / "report.md", results))
        return results
    from fastrank.metrics import aggregate_seeds
    from fastrank.report import write_seed_report

    runs = {}
    for seed in cfg.seeds:
        runs[seed] = train(dataclasses.replace(cfg, seed=seed, seeds=None,
                                               output_dir=str(Path(cfg.output_dir) / f"seed_{seed}")))
    agg = {mode: aggregate_seeds([r["eval"][mode] for r in runs.values()]) for mode in runs[cfg.seeds[0]]["eval"]}
    path = write_seed_report(agg, runs, Path(cfg.output_dir))
    print(summary_line(path, {"seeds": runs, "aggregate": agg}))
    return {"seeds": runs, "aggregate": agg}
