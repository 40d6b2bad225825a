"""One optimizer step of the GRPO / GCD update: L_GRPO + gcd_coef * L_GCD over an update's samples.

Distributed (Accelerate, one process per device): every process computes its own micro-batches; the gradients of
the trainable parameters (LoRA: small) are then averaged with one all-reduce. This avoids DDP's requirement that
every rank run the same number of backward passes, which rollouts of different lengths would break.
"""
from __future__ import annotations

import random

from fastrank.gcd import _compat  # noqa: F401

import torch  # noqa: E402

from fastrank.gcd.config import GCDConfig  # noqa: E402
from fastrank.gcd.grpo import PolicySample, clipped_policy_loss, kl_low_var  # noqa: E402
from fastrank.gcd.modeling import is_peft  # noqa: E402
from fastrank.gcd.policy import Policy  # noqa: E402


def _right_aligned(rows: list[list[float]], R: int, device) -> torch.Tensor:
    out = torch.zeros((len(rows), R), device=device)
    for i, r in enumerate(rows):
        out[i, R - len(r):] = torch.tensor(r, dtype=torch.float32, device=device)
    return out


def _micro_batches(samples: list[PolicySample], size: int) -> list[list[PolicySample]]:
    # similar lengths together: less padding in the left-padded forward, similar memory per packed row
    ordered = sorted(samples, key=lambda s: len(s.prompt_ids) + len(s.response_ids))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def _all_reduce_grads(params, accelerator) -> None:
    if accelerator.num_processes <= 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n


def policy_update(policy: Policy, optimizer, accelerator, params, samples: list[PolicySample], cfg: GCDConfig,
                  rng: random.Random) -> dict:
    """`ppo_epochs` optimizer steps on L_GRPO + gcd_coef * L_GCD over all samples (token-mean per kind)."""
    tokens = {k: sum(len(s.response_ids) for s in samples if s.kind == k) for k in ("agent", "judge")}
    coef = {"agent": 1.0, "judge": cfg.gcd_coef}
    # zero-advantage samples contribute nothing without KL: skip their forward, keep them in the token count
    work = [s for s in samples if s.advantage != 0.0 or cfg.kl_coef > 0]
    stats = {"loss_agent": 0.0, "loss_judge": 0.0, "kl": 0.0, "clipped": 0.0, "ratio": 0.0, "tokens": 0.0,
             "grad_norm": 0.0, "trained_samples": len(work), "samples": len(samples)}
    peft = is_peft(policy.model)
    policy.model.train()
    for _ in range(cfg.ppo_epochs):
        rng.shuffle(work)
        for kind in ("agent", "judge"):
            for mb in _micro_batches([s for s in work if s.kind == kind], cfg.micro_batch_size):
                lp, mask = policy.logprobs([s.prompt_ids for s in mb], [s.response_ids for s in mb],
                                           packing=cfg.update_packing)
                old = _right_aligned([s.old_logprobs for s in mb], lp.shape[1], lp.device)
                adv = torch.tensor([s.advantage for s in mb], device=lp.device)
                loss_sum, st = clipped_policy_loss(lp, old, adv, mask, cfg.clip_eps, cfg.clip_eps_high)
                loss = loss_sum * coef[kind] / max(1, tokens[kind])
                if cfg.kl_coef > 0:
                    with torch.no_grad():
                        if peft:
                            with policy.model.disable_adapter():
                                ref, _ = policy.logprobs([s.prompt_ids for s in mb], [s.response_ids for s in mb],
                                                         packing=cfg.update_packing)
                        else:
                            raise ValueError("kl_coef > 0 needs a LoRA model (the frozen base is the reference)")
                    kl = (kl_low_var(lp, ref) * mask).sum()
                    loss = loss + cfg.kl_coef * coef[kind] * kl / max(1, tokens[kind])
                    stats["kl"] += float(kl.detach()) / max(1, tokens[kind])
                accelerator.backward(loss)
                stats[f"loss_{kind}"] += float(loss_sum.detach()) / max(1, tokens[kind])
                for k in ("clipped", "ratio", "tokens"):
                    stats[k] += st[k]
        _all_reduce_grads(params, accelerator)
        if cfg.grad_clip and cfg.grad_clip > 0:
            stats["grad_norm"] = float(accelerator.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if stats["tokens"]:
        stats["clip_frac"] = stats.pop("clipped") / stats["tokens"]
        stats["ratio_mean"] = stats.pop("ratio") / stats["tokens"]
    else:
        stats.pop("clipped"), stats.pop("ratio")
    stats["loss"] = stats["loss_agent"] + cfg.gcd_coef * stats["loss_judge"]
    return stats


__all__ = ["policy_update"]
