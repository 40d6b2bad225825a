"""A causal LM as the agent's policy: batched sampling, and per-token log-probs of responses.

Why log-probs are recomputed with a forward pass instead of taken from `generate`'s scores: the scores
of a whole batch of long generations are (batch x new tokens x vocab) floats, gigabytes for a 150k vocab,
and a recomputation in the same layout as the training forward gives exactly the numbers the ratio
pi/pi_old is taken against (verl recomputes old log-probs the same way). Generation itself uses the KV cache.

Two layouts give the same (B, R) right-aligned log-probs (R = the longest response) and mask:
  padded  prompt+response sequences LEFT-padded so that every response ends at the last position; the forward
          keeps only the last R+1 logits (`logits_to_keep`), which bounds the logits memory by the responses, not
          the prompts. position_ids count real tokens only (cumsum of the mask), which is what `generate` uses
          under left padding, so the recomputed log-probs match the sampling model.
  packed  sequences concatenated into rows, position_ids restarting at 0 per sequence and no attention mask:
          transformers then builds a block-diagonal causal mask from the position_ids (sdpa / eager / flex:
          masking_utils.find_packed_sequence_indices) or runs varlen flash attention (flash_attention_2/3:
          cu_seqlens from the position_ids, batch 1 only), so no sequence attends to another. The LM head runs
          only where a response token is predicted (a boolean logits_to_keep): sum(len(r)) logits instead of
          B x (R+1). Flash attention gets ONE row (no padding at all, attention cost sum(L_i^2)). The masked
          kernels compute attention over the whole row, (row length)^2, so one row of N tokens would cost N^2
          instead of the padded B x L^2 (3.6x slower than padded, tiny model on CPU): there, sequences are
          bin-packed (fastrank.packing.pack_rows) into rows no longer than the longest one, which never costs
          more tokens or attention than the padded layout and removes the padding where lengths differ. When
          no two sequences share a row, the rows are simply right-padded with an attention mask (cheaper to
          build than the packed mask); only the LM-head saving remains.

Log-probs are taken at the sampling temperature (logits / T), as verl does for pi and pi_old alike. Sampling
uses nothing but the temperature (no top-k, no repetition penalty from the hub's generation config); top_p < 1
truncates the sampling distribution, and then pi_old is only approximately the sampling policy.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from fastrank.gcd import _compat  # noqa: F401

import torch  # noqa: E402

from fastrank.packing import pack_rows  # noqa: E402


@dataclass
class Generation:
    text: str  # decoded response, special tokens removed
    prompt_ids: list[int]
    response_ids: list[int]  # includes the EOS token when the model stopped by itself
    logprobs: list[float] = field(default_factory=list)  # log pi_old(response token), one per response id
    truncated: bool = False  # stopped by max_new_tokens, not by EOS
    scripted: bool = False  # the text came from a script, not from sampling (ScriptedPolicy)


# attention implementations whose packed-sequence handling (from position_ids, attention_mask None) is verified
# in transformers 5.23: masking_utils.find_packed_sequence_indices (mask-based) and
# modeling_flash_attention_utils._is_packed_sequence (varlen flash attention, one row)
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    out = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        out.add(tokenizer.eos_token_id)
    return out


class Policy:
    """model + tokenizer. `model` may be a peft model; nothing here assumes one.

    chat: wrap prompts in the tokenizer's chat template as one user message (default: when it has one).
    gen_batch_size / score_batch_size: prompts per generate call / sequences per log-prob forward.
    """

    def __init__(self, model, tokenizer, *, chat: bool | None = None, gen_batch_size: int = 8,
                 score_batch_size: int = 8, temperature: float = 1.0, autocast: Callable | None = None,
                 packing: str = "padded"):
        self.model = model
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        self.gen_batch_size = gen_batch_size
        self.score_batch_size = score_batch_size
        self.temperature = temperature
        self.autocast = autocast  # e.g. accelerator.autocast; None -> no autocast
        if packing not in ("packed", "padded"):
            raise ValueError(f"packing must be packed or padded, got {packing!r}")
        self.packing = packing  # the layout of token_logprobs (pi_old); the update picks its own
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = _eos_ids(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _ctx(self):
        return self.autocast() if self.autocast is not None else contextlib.nullcontext()

    # ---- text <-> ids
    def encode_prompt(self, prompt: str) -> list[int]:
        if self.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        else:
            text = prompt
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def encode_response(self, text: str, add_eos: bool = True) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ids + [self.tokenizer.eos_token_id] if add_eos else ids

    def _cut(self, ids: list[int]) -> tuple[list[int], bool]:
        """Response ids up to and including the first EOS (padding after it removed); truncated = no EOS."""
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                return ids[: i + 1], False
        return ids, True

    # ---- sampling
    @contextlib.contextmanager
    def _plain_generation_config(self):
        """Sample from softmax(logits / T) and nothing else. A hub model's generation_config carries sampling
        tweaks (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20, top_p 0.8) that `generate` merges into any
        call; they would make the behaviour policy differ from the pi_old the ratio is taken against. So the
        model's config is swapped for a plain one (special tokens only) for the duration of the call."""
        from transformers import GenerationConfig

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        saved = base.generation_config
        base.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id,
                                                  pad_token_id=saved.pad_token_id)
        try:
            yield
        finally:
            base.generation_config = saved

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 512, greedy: bool = False,
                 top_p: float = 1.0, with_logprobs: bool = True) -> list[Generation]:
        encoded = [self.encode_prompt(p) for p in prompts]
        out: list[Generation | None] = [None] * len(prompts)
        # longest first: batches of similar lengths waste less padding
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        pad = self.tokenizer.pad_token_id
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(order), self.gen_batch_size):
                idx = order[s: s + self.gen_batch_size]
                L = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), L), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), L), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, L - len(encoded[i]):] = torch.tensor(encoded[i])
                    mask[r, L - len(encoded[i]):] = 1
                kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(self.eos_ids),
                              use_cache=True, do_sample=not greedy)
                if not greedy:
                    kwargs.update(temperature=self.temperature, top_p=top_p, top_k=0)
                with self._ctx(), self._plain_generation_config():
                    seqs = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                               **kwargs)
                for r, i in enumerate(idx):
                    resp, truncated = self._cut(seqs[r, L:].tolist())
                    text = self.tokenizer.decode(resp, skip_special_tokens=True)
                    out[i] = Generation(text, encoded[i], resp, [], truncated)
        finally:
            self.model.train(was_training)
        gens = [g for g in out if g is not None]
        if with_logprobs:
            self.fill_logprobs(gens, greedy=greedy)
        return gens

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], *, scripted: bool = True) -> list[Generation]:
        """Teacher forcing: Generations for given response texts (EOS appended), with their log-probs."""
        gens = [Generation(r, self.encode_prompt(p), self.encode_response(r), [], False, scripted)
                for p, r in zip(prompts, responses)]
        self.fill_logprobs(gens)
        return gens

    @torch.no_grad()
    def fill_logprobs(self, gens: list[Generation], greedy: bool = False) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(gens), self.score_batch_size):
                chunk = [g for g in gens[s: s + self.score_batch_size]]
                lps = self.token_logprobs([g.prompt_ids for g in chunk], [g.response_ids for g in chunk],
                                          temperature=1.0 if greedy else self.temperature)
                for g, lp in zip(chunk, lps):
                    g.logprobs = lp.float().cpu().tolist()
        finally:
            self.model.train(was_training)

    # ---- log-probs (also the training forward)
    def token_logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *,
                       temperature: float | None = None, model=None) -> list[torch.Tensor]:
        """log pi(response token | prompt, earlier response tokens), one 1-D tensor per sequence.

        Differentiable when called with grad enabled; `model` overrides self.model (e.g. the reference model)."""
        padded, mask = self.logprobs(prompt_ids, response_ids, temperature=temperature, model=model)
        R = padded.shape[1]
        return [padded[i, R - len(r):] for i, r in enumerate(response_ids)]

    def logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *,
                 temperature: float | None = None, model=None, packing: str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R) log-probs and (B, R) float mask, responses right-aligned, in the `packing` layout (default:
        self.packing); both layouts give the same numbers (see the module doc)."""
        packed = (packing or self.packing) == "packed"
        fn = self.packed_logprobs if packed else self.padded_logprobs
        return fn(prompt_ids, response_ids, temperature=temperature, model=model)

    def _response_mask(self, response_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        if any(len(r) == 0 for r in response_ids):
            raise ValueError("empty response: nothing to score")
        R = max(len(r) for r in response_ids)
        rmask = torch.zeros((len(response_ids), R))
        for i, r in enumerate(response_ids):
            rmask[i, R - len(r):] = 1
        return rmask.to(self.device)

    def _target_logprobs(self, logits: torch.Tensor, target: torch.Tensor, temperature: float | None) -> torch.Tensor:
        T = self.temperature if temperature is None else temperature
        logits = logits.float()
        if T != 1.0:
            logits = logits / T
        return torch.gather(logits, -1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)

    def padded_logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *,
                        temperature: float | None = None, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R) log-probs and (B, R) float mask; left-padded rows (see the module doc)."""
        model = self.model if model is None else model
        rmask = self._response_mask(response_ids)
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        B, L, R = len(seqs), max(len(s) for s in seqs), rmask.shape[1]
        ids = torch.full((B, L), self.tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, L - len(s):] = torch.tensor(s)
            attn[i, L - len(s):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        dev = self.device
        ids, attn, pos = ids.to(dev), attn.to(dev), pos.to(dev)
        with self._ctx():
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=R + 1,
                           use_cache=False).logits
        # logits at position t predict token t+1
        return self._target_logprobs(logits[:, :-1], ids[:, L - R:], temperature) * rmask, rmask

    def packed_logprobs(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], *,
                        temperature: float | None = None, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The same as padded_logprobs from packed rows (see the module doc)."""
        model = self.model if model is None else model
        attn_impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if attn_impl not in PACKED_ATTENTION:
            raise ValueError(f"packed log-probs rely on transformers' packed-sequence handling, checked for "
                             f"{PACKED_ATTENTION}; this model uses {attn_impl!r}: set update_packing: padded")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("empty prompt: the first response token would be predicted from the previous sequence")
        rmask = self._response_mask(response_ids)
        B, R = rmask.shape
        lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
        varlen = attn_impl.startswith("flash_attention")  # transformers' varlen path needs a single row
        rows = pack_rows(lengths, sum(lengths) if varlen else max(lengths))
        W = max(sum(lengths[i] for i in row) for row in rows)
        ids = torch.full((len(rows), W), self.tokenizer.pad_token_id, dtype=torch.long)
        pos = torch.zeros((len(rows), W), dtype=torch.long)
        keep = torch.zeros((len(rows), W), dtype=torch.bool)  # the positions that predict a response token
        real = torch.zeros((len(rows), W), dtype=torch.long)
        target, dest = [], []
        for k, row in enumerate(rows):
            off = 0
            for i in row:
                p, r = prompt_ids[i], response_ids[i]
                ids[k, off:off + lengths[i]] = torch.tensor([*p, *r])
                pos[k, off:off + lengths[i]] = torch.arange(lengths[i])
                real[k, off:off + lengths[i]] = 1
                keep[k, off + len(p) - 1:off + lengths[i] - 1] = True
                target += r
                dest += range(i * R + R - len(r), (i + 1) * R)
                off += lengths[i]
            # the row's padding restarts at 0 too: its own segment, after every real token (which never sees it)
            pos[k, off:] = torch.arange(W - off)
        dev = self.device
        ids, pos, keep = ids.to(dev), pos.to(dev), keep.to(dev)
        # a row per sequence is a plain right-padded batch: its padding mask is cheaper to build than the packed
        # one (position_ids are only read as packing boundaries when there is no attention mask)
        attn = real.to(dev) if len(rows) == B else None
        with self._ctx():
            logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep,
                           use_cache=False).logits
        # a 2-D bool logits_to_keep gives (kept positions, vocab) in row-major order: the order of `target`
        flat = self._target_logprobs(logits, torch.tensor(target, device=dev), temperature)
        out = flat.new_zeros(B * R).index_copy(0, torch.tensor(dest, device=dev), flat)
        return out.view(B, R), rmask


class ScriptedPolicy:
    """A Policy whose responses come from `script(prompt, i)` where it returns text, else from sampling.

    Log-probs are always the model's (teacher forcing for scripted texts), so a GRPO update on scripted
    responses is a real update of the model. Uses: tests and smoke runs where a random model never writes a
    well-formed action, warm starts with an expert, or replaying logged responses."""

    def __init__(self, policy: Policy, script: Callable[[str, int], str | None]):
        self.policy = policy
        self.script = script
        self._calls = 0

    def __getattr__(self, name):  # everything else (tokenizer, model, token_logprobs, ...) is the policy's
        return getattr(self.policy, name)

    def generate(self, prompts: Sequence[str], **kwargs) -> list[Generation]:
        texts = []
        for p in prompts:
            texts.append(self.script(p, self._calls))
            self._calls += 1
        out: list[Generation | None] = [None] * len(prompts)
        free = [i for i, t in enumerate(texts) if t is None]
        if free:
            for i, g in zip(free, self.policy.generate([prompts[i] for i in free], **kwargs)):
                out[i] = g
        fixed = [i for i, t in enumerate(texts) if t is not None]
        if fixed:
            for i, g in zip(fixed, self.policy.score([prompts[i] for i in fixed], [texts[i] for i in fixed])):
                out[i] = g
        return [g for g in out if g is not None]


def mean_logprob(gen: Generation) -> float:
    return sum(gen.logprobs) / max(1, len(gen.logprobs)) if gen.logprobs else -math.inf


__all__ = ["Generation", "Policy", "ScriptedPolicy", "mean_logprob", "PACKED_ATTENTION"]
