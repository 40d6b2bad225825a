"""Training throughput of packed vs padded batches, and rank() latency, with the real MiniLM on CPU.

Run: `pytest bench/ --benchmark-only` (or `pytest bench/bench_packing.py --benchmark-only`).

Data: a fixed seeded sample of 64 candidate sets — from the bundled dataset (`fastrank/data/bundled/`) when it
exists, else built from the ALFWorld expert trajectories in /work/shared/data/alfworld (each step: the expert
action + 8 of its admissible actions) — featurized and tokenized once (max_length 256). The sets are split by
`TokenBudgetBatchSampler(max_tokens=8192)`; every layout trains on the same first FASTRANK_BENCH_BATCHES
(default 2) batches (~22 sets, ~200 candidates): one round = fwd+bwd (train mode, BCE on the scores) over all
of them; packed and padded_longest run 2 rounds (the fastest counts), the slow baselines 1.
Wall and process-CPU time are both recorded (the CPU machine is shared; with one BLAS thread, CPU time is the
less noisy one): extra_info has candidates/s, real tokens/s, tokens in the tensors, padding fraction and the
speedup over padded_longest (layouts run in the order of LAYOUTS, so padded_longest comes first).

Layouts: `packed` (the model's own: varlen attention over one unpadded row), `packed_blockmask` (rows of 256,
4-D block-diagonal mask through SDPA), `padded_longest` (one row per candidate, padded to the batch's longest),
`padded_256` (padded to a fixed 256).

DeBERTa (`test_deberta_train_throughput`, needs the extra `fastrank[deberta]`): the same batches through
DeBERTa-v3-layout encoders, padded vs block-mask rows vs packed varlen (see the section below):
`pytest bench/bench_packing.py --benchmark-only -k deberta`.
"""
import copy
import gzip
import json
import os
import random
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastrank.data.bundle import BUNDLED_DIR
from fastrank.data.record import CandidateSet, read_records
from fastrank.model import Reranker
from fastrank.packing import PackedCollator, PaddedCollator, TokenBudgetBatchSampler, encode_sets

ALFWORLD = Path("/work/shared/data/alfworld/expert_admissible_valid_seen.jsonl.gz")
N_SETS, MAX_TOKENS, SEED = 64, 8192, 0
N_BATCHES = int(os.environ.get("FASTRANK_BENCH_BATCHES", "2"))
LAYOUTS = ["padded_longest", "padded_256", "packed_blockmask", "packed"]
_results: dict = {}


def alfworld_sets(path=ALFWORLD, n=N_SETS, k=9, seed=SEED) -> list[CandidateSet]:
    steps = []
    with gzip.open(path, "rt") as f:
        for ep, line in enumerate(f):
            o = json.loads(line)
            m = re.search(r"Your task is to: (.*)", o["steps"][0]["obs"])
            goal = m.group(1).strip() if m else "complete the task."
            task = o["game"].split("/")[-2].split("-")[0]
            for t, s in enumerate(o["steps"]):
                others = [a for a in s["admissible"] if a != s["expert"]]
                if others and s["obs"].strip():
                    steps.append((ep, t, task, goal, s["obs"], s["expert"], others))
    rng = random.Random(seed)
    out = []
    for ep, t, task, goal, obs, expert, others in rng.sample(steps, n):
        cands = [expert] + rng.sample(others, min(k - 1, len(others)))
        rng.shuffle(cands)
        out.append(CandidateSet("alfworld", f"alfworld/{ep}", t, task, goal, obs, cands, cands.index(expert),
                                ["expert" if c == expert else "admissible" for c in cands]))
    return out


def bench_sets() -> tuple[list[CandidateSet], str]:
    files = sorted(BUNDLED_DIR.glob("*.train.sampled.jsonl.gz")) or sorted(BUNDLED_DIR.glob("*.jsonl.gz"))
    if files:
        sets = [cs for f in files for cs in read_records(f)]
        return random.Random(SEED).sample(sets, min(N_SETS, len(sets))), f"bundled ({len(files)} files)"
    return alfworld_sets(), ALFWORLD.name


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Reranker.from_encoder("minilm")
    sets, source = bench_sets()
    enc = encode_sets(sets, model.tokenizer, model.featurizer, max_length=256)
    sampler = TokenBudgetBatchSampler([e.n_tokens for e in enc], max_tokens=MAX_TOKENS, shuffle=True, seed=SEED)
    batches = [[enc[i] for i in b] for b in list(sampler)[:N_BATCHES]]
    lengths = [n for e in enc for n in e.lengths]
    info = dict(data=source, n_sets=len(sets), n_candidates=len(lengths), mean_len=sum(lengths) / len(lengths),
                max_len=max(lengths), max_tokens=MAX_TOKENS, n_batches=len(batches),
                torch_threads=torch.get_num_threads())
    return model, batches, info


def _collator(model, layout):
    pad = model.tokenizer.pad_token_id
    return {"packed": model.collator(), "packed_blockmask": PackedCollator(pad, row_len=model.row_len),
            "padded_longest": PaddedCollator(pad), "padded_256": PaddedCollator(pad, pad_to=256)}[layout]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_throughput(benchmark, setup, layout):
    model, batches, info = setup
    impl = "sdpa" if layout == "packed_blockmask" else "fastrank_varlen"
    model.encoder.set_attn_implementation(impl)  # varlen: SDPA for padded batches, per-candidate for packed
    model.train()
    coll = _collator(model, layout)
    t0 = time.perf_counter()
    collated = [coll(b) for b in batches]
    collate_s = time.perf_counter() - t0

    def step(batch):
        model.zero_grad(set_to_none=True)
        scores = model(batch)
        F.binary_cross_entropy_with_logits(scores, batch.labels).backward()

    step(coll([batches[0][0]]))  # warm-up (allocator, first-call paths) on a single set
    rounds = []

    def one_pass():  # one round = fwd+bwd over every bench batch
        w, c = time.perf_counter(), time.process_time()
        for batch in collated:
            step(batch)
        rounds.append((time.perf_counter() - w, time.process_time() - c))

    benchmark.group = f"train fwd+bwd over {len(collated)} batches of <= {MAX_TOKENS} tokens, MiniLM, CPU"
    # the two layouts compared most get 2 rounds (the faster one counts: the CPU machine is shared)
    n_rounds = 2 if layout in ("packed", "padded_longest") else 1
    benchmark.pedantic(one_pass, rounds=n_rounds, iterations=1)
    wall, cpu = min(r[0] for r in rounds), min(r[1] for r in rounds)
    cands = sum(b.n_candidates for b in collated)
    real = sum(b.n_tokens for b in collated)
    in_tensor = sum(b.input_ids.numel() for b in collated)
    _results[layout] = (cands / wall, cands / cpu)
    extra = dict(info, layout=layout, attn_implementation=impl, candidates_per_s=cands / wall,
                 tokens_per_s=real / wall, tensor_tokens_per_s=in_tensor / wall, cpu_candidates_per_s=cands / cpu,
                 cpu_tokens_per_s=real / cpu, real_tokens=real, tensor_tokens=in_tensor,
                 padding_fraction=1 - real / in_tensor, collate_ms=1e3 * collate_s, round_wall_cpu_s=rounds)
    if "padded_longest" in _results:
        ref = _results["padded_longest"]
        extra["speedup_vs_padded_longest"] = _results[layout][0] / ref[0]
        extra["cpu_speedup_vs_padded_longest"] = _results[layout][1] / ref[1]
    benchmark.extra_info.update(extra)
    model.encoder.set_attn_implementation("fastrank_varlen")


@pytest.mark.parametrize("path", ["packed", "padded"])
def test_rank_latency_9_candidates(benchmark, setup, path):
    model, batches, _ = setup
    model.eval()
    sets, _ = bench_sets()
    cs = next(s for s in sets if len(s.candidates) == 9)
    packed = path == "packed"
    ranking = model.rank(cs.goal, cs.observation, cs.candidates, packed=packed)
    assert sorted(ranking.order) == list(range(9))
    benchmark.group = "rank() latency, 9 candidates, MiniLM, CPU"
    benchmark.extra_info.update(path=path, torch_threads=torch.get_num_threads())
    benchmark.pedantic(model.rank, args=(cs.goal, cs.observation, cs.candidates), kwargs={"packed": packed},
                       rounds=20, iterations=1, warmup_rounds=2)


# ------------------------------------------------------------------------------------------------- DeBERTa
# DeBERTa-v3-layout encoders (random weights; no DeBERTa weights are obtainable offline) on the same token
# batches as above (MiniLM's WordPiece ids, vocab 30522): tiny (hidden 64, 2 layers, 4 heads) and base-shaped
# (hidden 768, 12 heads, FFN 3072; FASTRANK_BENCH_DEBERTA_LAYERS layers, default 2, instead of 12 for CPU time,
# on the first FASTRANK_BENCH_DEBERTA_BASE_BATCHES batches, default 1). Layouts, fwd+bwd in train mode:
# padded_longest and packed_blockmask (rows of 256 + block-diagonal mask) through HF eager, packed_varlen
# (one unpadded row, cu_seqlens, `fastrank.deberta_varlen`, backend auto) and, on CPU, packed_varlen_pkgloop
# (disentangled-flash's own torch `forward_packed`, which loops over sequences; why fastrank drives it itself).
# The cuda rows (bf16 autocast, 12 layers) skip without a GPU; there packed_varlen is Triton and
# packed_varlen_torch is the torch driver, to check what `auto` picks.
DEBERTA_LAYERS = int(os.environ.get("FASTRANK_BENCH_DEBERTA_LAYERS", "2"))
DEBERTA_BASE_BATCHES = int(os.environ.get("FASTRANK_BENCH_DEBERTA_BASE_BATCHES", "1"))
DEBERTA_SHAPES = {"tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
                  "base": dict(hidden_size=768, num_hidden_layers=DEBERTA_LAYERS, num_attention_heads=12,
                               intermediate_size=3072)}
DEBERTA_CASES = [("cpu", s, lay) for s in DEBERTA_SHAPES
                 for lay in ("padded_longest", "packed_blockmask", "packed_varlen", "packed_varlen_pkgloop")]
DEBERTA_CASES += [("cuda", "base", lay) for lay in ("padded_longest", "packed_blockmask", "packed_varlen",
                                                    "packed_varlen_torch")]
_deberta_models: dict = {}
_deberta_results: dict = {}


def _deberta_models_for(tok, device, shape):
    key = (device, shape)
    if key not in _deberta_models:
        from transformers import DebertaV2Config

        import fastrank.deberta_varlen as dv
        if not dv.available():
            pytest.skip("disentangled-flash not installed (pip install 'fastrank[deberta]')")
        dims = dict(DEBERTA_SHAPES[shape], **({"num_hidden_layers": 12} if device == "cuda" else {}))
        cfg = DebertaV2Config(vocab_size=tok.vocab_size, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                              relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
                              share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                              max_relative_positions=-1, type_vocab_size=0, **dims)
        torch.manual_seed(0)
        ref = Reranker.from_config(cfg, tok, packed_attention="mask")
        models = {"hf": ref}
        for name, backend in (("varlen", "auto"), ("varlen_torch", "torch")):
            m = Reranker(copy.deepcopy(ref.encoder), tok, varlen_backend=backend)
            m.head.load_state_dict(ref.head.state_dict())
            models[name] = m
        _deberta_models[key] = {k: m.to(device).train() for k, m in models.items()}
    return _deberta_models[key]


def _pkgloop_step(model, batch):
    """disentangled-flash's own packed torch path: encoder.forward_packed over the cu_seqlens token stream."""
    from disentangled_flash import validate_cu_seqlens

    model.zero_grad(set_to_none=True)
    enc = model.encoder
    hidden = enc.embeddings(input_ids=batch.input_ids, mask=torch.ones_like(batch.input_ids))[0]
    cu = torch.zeros(batch.n_candidates + 1, dtype=torch.int32, device=hidden.device)
    cu[1:] = torch.cumsum(batch.seq_lens, 0)
    info = validate_cu_seqlens(cu, hidden.shape[0])
    out = enc.encoder.forward_packed(hidden, cu, info.max_seqlen, packed_info=info,
                                     output_hidden_states=False).last_hidden_state
    scores = model.head(out.index_select(0, batch.cls_index)).squeeze(-1)
    F.binary_cross_entropy_with_logits(scores, batch.labels).backward()


@pytest.mark.parametrize("device,shape,layout", DEBERTA_CASES)
def test_deberta_train_throughput(benchmark, setup, device, shape, layout):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    minilm, batches, info = setup
    if device == "cpu" and shape == "base":
        batches = batches[:DEBERTA_BASE_BATCHES]
    models = _deberta_models_for(minilm.tokenizer, device, shape)
    model = models["varlen_torch" if layout in ("packed_varlen_pkgloop", "packed_varlen_torch") else
                   "varlen" if layout == "packed_varlen" else "hf"]
    pad = minilm.tokenizer.pad_token_id
    coll = {"padded_longest": PaddedCollator(pad), "packed_blockmask": PackedCollator(pad, row_len=256)}.get(
        layout, model.collator())
    collated = [coll(b).to(device) for b in batches]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step(batch):
        with autocast:
            if layout == "packed_varlen_pkgloop":
                return _pkgloop_step(model, batch)
            model.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(batch), batch.labels).backward()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    step(collated[0])  # warm-up (allocator, position plans, kernel compilation on CUDA)
    sync()
    rounds = []

    def one_pass():
        w, c = time.perf_counter(), time.process_time()
        for batch in collated:
            step(batch)
        sync()
        rounds.append((time.perf_counter() - w, time.process_time() - c))

    benchmark.group = (f"DeBERTa-v3-layout {shape} ({DEBERTA_SHAPES[shape]['hidden_size']}h, "
                       f"{12 if device == 'cuda' else DEBERTA_SHAPES[shape]['num_hidden_layers']}L) fwd+bwd over "
                       f"{len(collated)} batches, {device}{' bf16' if device == 'cuda' else ' fp32'}")
    n_rounds = 3 if device == "cuda" else (2 if shape == "tiny" else 1)
    benchmark.pedantic(one_pass, rounds=n_rounds, iterations=1)
    wall, cpu = min(r[0] for r in rounds), min(r[1] for r in rounds)
    cands = sum(b.n_candidates for b in collated)
    real = sum(b.n_tokens for b in collated)
    in_tensor = sum(b.input_ids.numel() for b in collated)
    _deberta_results[(device, shape, layout)] = (wall, cpu)
    extra = dict(info, device=device, shape=shape, layout=layout, n_batches=len(collated),
                 backend=getattr(model, "varlen_backend", None), candidates_per_s=cands / wall,
                 cpu_candidates_per_s=cands / cpu, real_tokens=real, tensor_tokens=in_tensor,
                 padding_fraction=1 - real / in_tensor, round_wall_cpu_s=rounds)
    for base in ("padded_longest", "packed_blockmask"):
        ref = _deberta_results.get((device, shape, base))
        if ref is not None:  # side by side: the baseline ran first on the same batches
            extra[f"speedup_vs_{base}"] = ref[0] / wall
            extra[f"cpu_speedup_vs_{base}"] = ref[1] / cpu
    benchmark.extra_info.update(extra)
