r"""`RoutedTrainStep`: per-environment losses and projected gradients (paper §5.6; PCGrad / CAGrad).

Called by `fastrank.train` when ``routing`` or ``grad_projection`` is on.
One packed forward pass; `env_task_losses` splits the fused loss into per-environment terms that *sum to it*
exactly (each env's pair term weighted by its share of the batch's groups with negatives, its BCE term by its
share of candidates), so "sum" reproduces plain joint training and PCGrad without conflicts equals it too.
Each env's loss is backpropagated into its row of a `TaskGradBuffer` (``p.grad`` = views, no copies), under
``accelerator.no_sync`` (DDP must not average per-task gradients behind our back), then ONE
`all_reduce_task_grads` of the (T, P) buffer, then -- identically on every rank -- the Gram matrix
(`gram_matrix`), the task weights (`task_weights`, PCGrad or CAGrad; an env absent from the whole step is left
out, so CAGrad does not average in a zero gradient), ``combined = w @ buffer`` and ``p.grad`` = views of
``combined``. The PCGrad orders come from a CPU generator seeded with (seed, step): the same on every rank and
after a resume. ``grad_projection="none"`` with routing: the fused loss as a single task (same buffer/all-reduce
path, which also keeps frozen LoRA parameters out of DDP's reducer).

Cost: one packed forward + T full backwards (each backward runs through every token, with zero gradients on the
other environments' tokens): measured 2.2x the plain step (MiniLM, CPU: bench/bench_routing.py). ``per_env_forward=True``
instead runs one forward + backward per environment on its own sub-batch (`split_by_env`): the *same* per-env
gradients, because candidates never interact in the encoder (per-candidate attention and routing), at ~1 forward +
1 backward in total (measured 1.0x the plain step). Off by default because the issue asks for one packed
forward pass; with dropout the two differ only in which dropout masks are drawn.

Router warm-up: for the first ``router_warmup_steps`` optimizer steps the LoRA A/B parameters have
``requires_grad=False`` (no gradient, ``.grad`` None, so AdamW neither updates nor decays them) while the encoder,
router and heads train.

Diagnostics (per optimizer step, aggregated over each logging interval, all ranks): routing weights per env
(mean weight on each adapter, mean entropy in nats; max ln 4 = 1.386), the per-env gradient cosine matrix
(from the Gram matrix), conflicting pairs (G_ij < 0) and how many PCGrad projections actually fired (replayed
exactly from the step's orders). `detect_divergence` flags runs whose loss rises (epoch mean over epoch mean,
or the end of the run over its best within the last epoch) -- `fastrank.train` reports it in results.json.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from fastrank.data.record import ENVS
from fastrank.ops import pairwise_rank_loss
from fastrank.ops.project_gradients import draw_pcgrad_orders, gram_matrix, task_weights
from fastrank.ops.task_grad_buffer import TaskGradBuffer, all_reduce_task_grads
from fastrank.packing import ENV_IDS, PackedBatch
from fastrank.routing.model import ADAPTERS, RoutedReranker

PROJECTIONS = ("none", "pcgrad", "cagrad", "sum", "mean")


# ------------------------------------------------------------------------------------ per-env losses
def batch_totals(batch: PackedBatch) -> tuple[int, int]:
    """(groups with at least one negative, candidates): the denominators of the fused loss."""
    sizes = batch.group_offsets[1:] - batch.group_offsets[:-1]
    return int((sizes > 1).sum()), int(batch.n_candidates)


def env_task_losses(scores: torch.Tensor, batch: PackedBatch, task_envs: Sequence[int], *, margin: float = 0.0,
                    point_weight: float = 0.5, backend: str = "auto", totals: tuple[int, int] | None = None):
    """Per-environment shares of the fused loss from one forward pass.

    Returns ``(losses, fused, hits)``: ``losses[t]`` is env ``task_envs[t]``'s part of ``pairwise_rank_loss`` on
    the whole batch (None when the env has no candidate in the batch), so ``sum(losses) == fused`` exactly:
    pair term x G'_e / G' (groups with a negative), BCE term x N_e / N (candidates). ``hits`` (G,) in batch order.
    ``totals`` = `batch_totals` of the full batch when ``batch`` is one environment's part of it (`split_by_env`).
    """
    off = batch.group_offsets.long()
    sizes = off[1:] - off[:-1]
    n = scores.numel()
    g_env = batch.env_ids[off[:-1].clamp_max(max(n - 1, 0))] if n else batch.env_ids[:0]
    g_pairs, n = totals if totals is not None else (int((sizes > 1).sum()), n)
    losses: list[torch.Tensor | None] = []
    hits = torch.zeros(sizes.numel(), dtype=torch.bool, device=scores.device)
    covered = 0
    for e in task_envs:
        gsel = (g_env == e).nonzero().squeeze(1)
        if gsel.numel() == 0:
            losses.append(None)
            continue
        cidx = (batch.env_ids == e).nonzero().squeeze(1)
        sz = sizes[gsel]
        offsets_e = torch.cat([sz.new_zeros(1), torch.cumsum(sz, 0)])
        n_e, gp_e = cidx.numel(), int((sz > 1).sum())
        pw = point_weight * n_e / n
        share = gp_e / g_pairs if gp_e else 1.0
        out = pairwise_rank_loss(scores.index_select(0, cidx), batch.labels.index_select(0, cidx), offsets_e,
                                 margin=margin, point_weight=pw / share, backend=backend)
        losses.append(out.loss * share if gp_e else out.loss)
        hits[gsel] = out.hits
        covered += gsel.numel()
    if covered != sizes.numel():
        raise ValueError(f"batch holds environments outside the task list {[ENVS[e] for e in task_envs]}: "
                         f"{sorted({ENVS[int(e)] for e in g_env.tolist()})}")
    present = [x for x in losses if x is not None]
    fused = torch.stack(present).sum() if present else scores.sum() * 0
    return losses, fused, hits


def split_by_env(batch: PackedBatch, collator) -> dict[int, PackedBatch]:
    """{env id: a batch of that environment's candidate sets only}, re-collated with ``collator`` (same order).

    Candidates never interact in the encoder (per-candidate attention, per-candidate routing), so a sub-batch's
    scores equal that environment's scores in the full batch (up to float rounding).
    """
    off = batch.group_offsets.tolist()
    ids = batch.input_ids.reshape(-1).tolist()
    tts = batch.token_type_ids.reshape(-1).tolist() if batch.token_type_ids is not None else None
    starts, lens = batch.cls_index.tolist(), batch.seq_lens.tolist()
    labels, envs, set_index = batch.labels.tolist(), batch.env_ids.tolist(), batch.set_index.tolist()
    from fastrank.packing import EncodedSet

    by_env: dict[int, list] = {}
    for g in range(len(off) - 1):
        cands = range(off[g], off[g + 1])
        seqs = [ids[starts[i]:starts[i] + lens[i]] for i in cands]
        types = None if tts is None else [tts[starts[i]:starts[i] + lens[i]] for i in cands]
        expert = next((k for k, i in enumerate(cands) if labels[i] != 0), -1)
        by_env.setdefault(envs[off[g]], []).append(EncodedSet(index=set_index[g], input_ids=seqs,
                                                              token_type_ids=types, expert_index=expert,
                                                              env_id=envs[off[g]]))
    return {e: collator(items).to(batch.input_ids.device) for e, items in by_env.items()}


# ------------------------------------------------------------------------------------ projection
def cosine_from_gram(G: torch.Tensor) -> torch.Tensor:
    """cos_ij = G_ij / sqrt(G_ii G_jj) (float64, NaN where a gradient is zero)."""
    G = G.double()
    d = G.diagonal().clamp_min(0).sqrt()
    den = d[:, None] * d[None, :]
    return torch.where(den > 0, G / torch.where(den > 0, den, 1.0), torch.full_like(G, float("nan")))


def pcgrad_fire_count(G: torch.Tensor, orders: list[list[int]]) -> int:
    """How many projections PCGrad makes (g_i' . g_j < 0 with g_i' the *current* projected g_i), in the Gram basis."""
    G = G.double().cpu()
    T = G.shape[0]
    C = torch.eye(T, dtype=torch.float64)
    fired = 0
    for s in range(T - 1):
        for i in range(T):
            j = orders[i][s]
            dot = float(C[i] @ G[:, j])
            if dot < 0 and G[j, j] > 0:
                C[i, j] -= dot / float(G[j, j])
                fired += 1
    return fired


class GradientProjector:
    """Per-task backward into a (T, P) `TaskGradBuffer`, one all-reduce, projection, ``p.grad`` = views."""

    def __init__(self, params: Sequence[nn.Parameter], num_tasks: int, method: str = "pcgrad", *,
                 alpha: float = 0.5, seed: int = 0):
        if method not in ("pcgrad", "cagrad", "sum", "mean"):
            raise ValueError(f"grad projection must be pcgrad, cagrad, sum or mean, not {method!r}")
        self.params = list(params)
        self.buf = TaskGradBuffer(self.params, num_tasks)
        if len(self.buf.params) != len(self.params):
            raise ValueError("every projected parameter must require grad when the buffer is built")
        self.method, self.alpha, self.seed, self.num_tasks = method, float(alpha), int(seed), num_tasks

    def generator(self, step: int) -> torch.Generator:
        """The PCGrad order generator of optimizer step ``step``: same on every rank, reproducible on resume."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))

    def backward_task(self, i: int, loss: torch.Tensor, scale: float = 1.0, retain_graph: bool = False) -> None:
        with self.buf.task(i):
            (loss * scale if scale != 1.0 else loss).backward(retain_graph=retain_graph)

    def backward(self, losses: Sequence[torch.Tensor | None], scale: float = 1.0) -> None:
        live = [i for i, x in enumerate(losses) if x is not None]
        for k, i in enumerate(live):
            with self.buf.task(i):
                (losses[i] * scale if scale != 1.0 else losses[i]).backward(retain_graph=k < len(live) - 1)

    def combine(self, step: int) -> dict:
        """All-reduce, project, write ``p.grad`` (views of the combined gradient; None for frozen params)."""
        all_reduce_task_grads(self.buf)
        buf = self.buf.buffer
        G = gram_matrix(buf)
        Gh = G.double().cpu()
        present = [i for i in range(self.num_tasks) if Gh[i, i] > 0]
        w = torch.zeros(self.num_tasks, dtype=torch.float32, device=buf.device)
        fired = 0
        if present:
            idx = torch.tensor(present, device=buf.device)
            sub = G.index_select(0, idx).index_select(1, idx)
            if self.method == "pcgrad":
                orders = draw_pcgrad_orders(len(present), self.generator(step))  # replay of task_weights' draw
                fired = pcgrad_fire_count(Gh[present][:, present], orders)
            w[idx] = task_weights(sub, self.method, generator=self.generator(step), alpha=self.alpha)
        combined = w @ buf if buf.dtype == torch.float32 else (w @ buf.float()).to(buf.dtype)
        off = 0
        for p in self.params:
            k = p.numel()
            p.grad = combined[off:off + k].view_as(p) if p.requires_grad else None
            off += k
        cos = cosine_from_gram(Gh)
        conflicts = sum(1 for i in present for j in present if i < j and Gh[i, j] < 0)
        return {"gram": Gh, "cos": cos, "weights": w.detach().cpu(), "present": present, "conflicts": conflicts,
                "pcgrad_fired": fired}

    def zero_(self) -> None:
        self.buf.zero_()


# ------------------------------------------------------------------------------------ training step
class RoutedTrainStep:
    """One micro-batch of the routed / projected training path (see the module docstring)."""

    def __init__(self, cfg, accelerator, model, raw_model, optimizer, scheduler):
        if cfg.grad_projection not in PROJECTIONS:
            raise ValueError(f"grad_projection must be one of {PROJECTIONS}, got {cfg.grad_projection!r}")
        if accelerator.mixed_precision == "fp16":
            raise ValueError("routing / grad_projection do their own backward: use mixed_precision bf16 or no")
        self.cfg, self.acc, self.model, self.raw = cfg, accelerator, model, raw_model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.task_envs = sorted(ENV_IDS[e] for e in cfg.envs)
        self.task_names = [ENVS[e] for e in self.task_envs]
        self.routed = isinstance(raw_model, RoutedReranker)
        self.warmup = int(cfg.router_warmup_steps) if self.routed else 0
        if self.routed:
            lora = {id(p) for p in raw_model.lora_parameters()}
            params = [p for p in raw_model.parameters() if id(p) not in lora] + raw_model.lora_parameters()
            raw_model.set_lora_trainable(True)
        else:
            params = list(raw_model.parameters())
        params = [p for p in params if p.requires_grad]
        self.fused_only = cfg.grad_projection == "none"
        self.per_env_forward = bool(cfg.per_env_forward) and not self.fused_only
        num_tasks = 1 if self.fused_only else len(self.task_envs)
        self.projector = GradientProjector(params, num_tasks, "sum" if self.fused_only else cfg.grad_projection,
                                           alpha=cfg.cagrad_alpha, seed=cfg.seed)
        self._frozen: bool | None = None
        K, T = len(ADAPTERS), len(self.task_envs)
        self._route_acc = torch.zeros(T, K + 2, dtype=torch.float64)  # per env: sum w (K), sum entropy, count
        self._cos_acc, self._cos_n = torch.zeros(T, T, dtype=torch.float64), torch.zeros(T, T, dtype=torch.float64)
        self._interval = {"steps": 0, "conflict_steps": 0, "conflict_pairs": 0, "pcgrad_fired": 0}
        self.totals = {"steps": 0, "conflict_steps": 0, "pcgrad_fired": 0, "fired_steps": 0}
        self._last: dict | None = None
        self.history: list[dict] = []

    # checkpoint bookkeeping (resume)
    def state_dict(self) -> dict:
        return {"totals": self.totals, "history": self.history}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.totals, self.history = dict(state["totals"]), list(state["history"])

    def _set_frozen(self, frozen: bool) -> None:
        if self.routed and frozen != self._frozen:
            self.raw.set_lora_trainable(not frozen)
            self._frozen = frozen

    def __call__(self, batch: PackedBatch, step: int):
        """Forward + per-task backward; on the accumulation boundary also projection, clipping and the update."""
        acc, cfg = self.acc, self.cfg
        self._set_frozen(step < self.warmup)
        if self.per_env_forward:
            fused, hits = self._per_env_forward_backward(batch)
        else:
            fused, hits = self._one_pass_forward_backward(batch)
        if acc.sync_gradients:
            info = self.projector.combine(step)
            self._accumulate_projection(info)
            if cfg.grad_clip > 0:
                acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            self.projector.zero_()
        return fused.detach(), hits

    def _per_env_forward_backward(self, batch: PackedBatch):
        """One forward + backward per environment on its own sub-batch: the same per-env gradients as one packed
        forward + T backwards (candidates never interact), at ~1 forward + 1 backward of the whole batch."""
        acc, cfg = self.acc, self.cfg
        subs = split_by_env(batch, self.raw.collator(packed=batch.packed))
        totals = batch_totals(batch)
        scale = 1.0 / acc.gradient_accumulation_steps
        fused, hits = None, []
        with acc.no_sync(self.model):
            for t, e in enumerate(self.task_envs):
                sub = subs.pop(e, None)
                if sub is None:
                    continue
                with acc.autocast():
                    scores = self.model(sub)
                    (loss,), _, h = env_task_losses(scores, sub, [e], margin=cfg.margin,
                                                    point_weight=cfg.point_weight, totals=totals)
                self.projector.backward_task(t, loss, scale)
                if self.routed and self.raw.last_routing is not None:
                    self._accumulate_routing(self.raw.last_routing.detach(), sub.env_ids)
                fused = loss.detach() if fused is None else fused + loss.detach()
                hits.append(h)
        if subs:
            raise ValueError(f"batch holds environments outside the task list {self.task_names}: "
                             f"{sorted(ENVS[e] for e in subs)}")
        return fused, torch.cat(hits)

    def _one_pass_forward_backward(self, batch: PackedBatch):
        acc, cfg = self.acc, self.cfg
        with acc.no_sync(self.model):  # per-task gradients are all-reduced by the projector, never by DDP
            with acc.autocast():
                scores = self.model(batch)
                losses, fused, hits = env_task_losses(scores, batch, self.task_envs, margin=cfg.margin,
                                                      point_weight=cfg.point_weight)
            scale = 1.0 / acc.gradient_accumulation_steps
            self.projector.backward([fused] if self.fused_only else losses, scale)
        if self.routed and self.raw.last_routing is not None:
            self._accumulate_routing(self.raw.last_routing.detach(), batch.env_ids)
        return fused, hits

    def _accumulate_routing(self, w: torch.Tensor, env_ids: torch.Tensor) -> None:
        w = w.double().cpu()
        ent = -(w * w.clamp_min(1e-12).log()).sum(1)
        env_ids = env_ids.cpu()
        for t, e in enumerate(self.task_envs):
            m = env_ids == e
            if m.any():
                self._route_acc[t, :-2] += w[m].sum(0)
                self._route_acc[t, -2] += ent[m].sum()
                self._route_acc[t, -1] += m.sum()

    def _accumulate_projection(self, info: dict) -> None:
        self._last = info
        it, tot = self._interval, self.totals
        it["steps"] += 1
        tot["steps"] += 1
        if not self.fused_only:
            cos = info["cos"]
            ok = ~torch.isnan(cos)
            self._cos_acc += torch.where(ok, cos, 0.0)
            self._cos_n += ok.double()
            c = info["conflicts"]
            it["conflict_steps"] += c > 0
            it["conflict_pairs"] += c
            it["pcgrad_fired"] += info["pcgrad_fired"]
            tot["conflict_steps"] += c > 0
            tot["pcgrad_fired"] += info["pcgrad_fired"]
            tot["fired_steps"] += info["pcgrad_fired"] > 0 if self.cfg.grad_projection == "pcgrad" else c > 0

    def log_record(self, step: int) -> dict:
        """Diagnostics since the last call, reduced over ranks (collective: call on every rank)."""
        K = len(ADAPTERS)
        route = self._route_acc.to(self.acc.device, torch.float32)
        route = self.acc.reduce(route, "sum").double().cpu() if self.acc.num_processes > 1 else route.double().cpu()
        rec: dict = {"step": step, "lora_frozen": bool(self._frozen) if self.routed else None}
        if self.routed:
            rec["route"] = {}
            for t, name in enumerate(self.task_names):
                cnt = float(route[t, -1])
                if cnt > 0:
                    rec["route"][name] = {"mean": [round(float(x) / cnt, 4) for x in route[t, :K]],
                                          "entropy": round(float(route[t, -2]) / cnt, 4), "candidates": int(cnt)}
        if not self.fused_only:
            it = self._interval
            mean_cos = torch.where(self._cos_n > 0, self._cos_acc / self._cos_n.clamp_min(1), float("nan"))
            rec.update({
                "tasks": self.task_names,
                "grad_cos": _nested(self._last["cos"]) if self._last else None,
                "grad_cos_mean": _nested(mean_cos),
                "task_weights": [round(float(x), 5) for x in self._last["weights"]] if self._last else None,
                "conflict_pairs": self._last["conflicts"] if self._last else 0,
                "conflict_step_rate": it["conflict_steps"] / max(1, it["steps"]),
                "pcgrad_fired": it["pcgrad_fired"],
                "fired_step_rate_total": self.totals["fired_steps"] / max(1, self.totals["steps"]),
            })
        self._route_acc.zero_()
        self._cos_acc.zero_()
        self._cos_n.zero_()
        self._interval = {k: 0 for k in self._interval}
        self.history.append(rec)
        return rec

    @staticmethod
    def postfix(rec: dict) -> dict:
        """Short progress-bar fields."""
        out = {}
        if rec.get("route"):
            ent = [r["entropy"] for r in rec["route"].values()]
            out["H_route"] = f"{sum(ent) / len(ent):.2f}"
        if "conflict_step_rate" in rec:
            out["conflict"] = f"{rec['conflict_step_rate']:.2f}"
            cos = rec.get("grad_cos")
            if cos:
                vals = [cos[i][j] for i in range(len(cos)) for j in range(i + 1, len(cos)) if cos[i][j] is not None]
                if vals:
                    out["cos_min"] = f"{min(vals):+.2f}"
        if rec.get("lora_frozen"):
            out["lora"] = "frozen"
        return out

    @staticmethod
    def scalars(rec: dict) -> dict:
        """Flat {name: float} for a tracker."""
        out = {}
        for env, r in (rec.get("route") or {}).items():
            for a, v in zip(ADAPTERS, r["mean"]):
                out[f"route/{env}/{a}"] = v
            out[f"route/{env}/entropy"] = r["entropy"]
        cos, names = rec.get("grad_cos"), rec.get("tasks") or []
        if cos:
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    if cos[i][j] is not None:
                        out[f"grad_cos/{names[i]}-{names[j]}"] = cos[i][j]
        for k in ("conflict_pairs", "conflict_step_rate", "pcgrad_fired", "fired_step_rate_total"):
            if k in rec:
                out[f"projection/{k}"] = float(rec[k])
        if rec.get("lora_frozen") is not None:
            out["lora_frozen"] = float(rec["lora_frozen"])
        return out


def _nested(m: torch.Tensor) -> list[list[float | None]]:
    return [[None if math.isnan(float(x)) else round(float(x), 5) for x in row] for row in m]

