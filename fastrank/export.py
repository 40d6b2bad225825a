"""Hugging Face / sentence-transformers interop, both ways.

**Export** (`export_checkpoint`, `fastrank export CKPT OUT --to sentence-transformers`): a fastrank checkpoint
becomes a standard ``*ForSequenceClassification`` folder (config ``num_labels=1``, safetensors, tokenizer, README
model card) that ``sentence_transformers.CrossEncoder(OUT)`` and ``AutoModelForSequenceClassification`` load as they
are, with the scores of ``Reranker.score``.

The head mapping. fastrank scores ``w . h_first + b`` (a linear layer on the first token's last hidden state).
HF's BERT/RoBERTa classification heads are ``classifier(tanh(dense(h_first)))`` — BERT's pooler, RoBERTa's
``classifier.dense`` — with no config switch to drop the tanh, and every BERT-family head has such a fixed
activation. So the export writes ``dense = 2^-20 * I`` (bias 0) and ``classifier = 2^20 * w`` (bias b):
scaling by a power of two is exact in binary floating point, and fp32 ``tanh(y)`` rounds to ``y`` itself for
``|y| < ~4e-4``, i.e. for hidden values ``|h| < ~400`` (MiniLM's are < 20). The result equals fastrank's head up to
fp32 summation order (checked on real candidate sets at export time). Not for fp16 loading: ``2^-20 * h`` is a
subnormal there. A reranker imported from a cross-encoder keeps that model's own dense+tanh, exported as it is.

**Import** (`fastrank.cross_encoder.read_cross_encoder`, used by ``Reranker.from_encoder``): a hub id or folder
of a BERT/RoBERTa-family ``*ForSequenceClassification`` model with one label keeps its trained
dense+tanh+classifier as the rerank head.

Not exportable as one plain model: routed checkpoints (a per-input router mixes LoRA adapters, so no single
merged weight set gives their scores) and the ``shared_prefix`` layout (not a pair cross-encoder input).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fastrank.cross_encoder import SUPPORTED, CrossEncoderParts, is_sequence_classifier, read_cross_encoder

__all__ = ["CrossEncoderParts", "export_checkpoint", "is_sequence_classifier", "read_cross_encoder",
           "to_sequence_classifier"]

POOLER_SCALE = 2.0 ** -20  # see the module docstring: exact identity through tanh for |h| < ~400 in fp32
_IDENTITY_ACT = "torch.nn.modules.linear.Identity"  # CrossEncoder.predict would apply Sigmoid by default


# ------------------------------------------------------------------------------------------------- export
def _check_exportable(src: Path) -> dict:
    from fastrank.model import META_NAME

    meta_path = src / META_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{src}: not a fastrank checkpoint (no {META_NAME})")
    meta = json.loads(meta_path.read_text())
    if "routing" in meta or "routed" in str(meta.get("class", "")).lower() or ".routing" in str(meta.get("class", "")):
        raise ValueError(f"{src}: a routed checkpoint (fastrank.routing) cannot be exported as one plain model: its "
                         f"router mixes per-environment LoRA adapters per input, so no single merged weight set "
                         f"gives its scores. Export a plain (routing=false) checkpoint instead.")
    if meta.get("layout", "pairs") != "pairs":
        raise ValueError(f"{src}: layout={meta['layout']!r} encodes the state once per set, not one (state, action) "
                         f"pair per candidate, so a pair cross-encoder cannot reproduce it")
    mt = meta.get("encoder_model_type")
    if mt not in SUPPORTED:
        raise NotImplementedError(f"{src}: exporting a {mt!r} encoder is not supported (only {SUPPORTED}: their "
                                  f"classification head reproduces fastrank's exactly, see fastrank/export.py)")
    return meta


def to_sequence_classifier(model):
    """An HF ``*ForSequenceClassification`` (num_labels=1, eval mode) giving `model`'s scores."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    src_cfg = model.encoder.config
    config = AutoConfig.for_model(src_cfg.model_type, **{k: v for k, v in src_cfg.to_dict().items()
                                                         if k not in ("model_type", "architectures")})
    config.num_labels = 1
    config.id2label, config.label2id = {0: "LABEL_0"}, {"LABEL_0": 0}
    config.problem_type = None
    config.sentence_transformers = {"activation_fn": _IDENTITY_ACT}  # raw logits = Reranker scores
    hf = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    base = hf.base_model
    missing, unexpected = base.load_state_dict(model.encoder.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise RuntimeError(f"encoder weights do not map onto {type(hf).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    if config.model_type == "bert":
        dense, out = base.pooler.dense, hf.classifier
    else:
        dense, out = hf.classifier.dense, hf.classifier.out_proj
    with torch.no_grad():
        if getattr(model, "pooler", None) is not None:  # an imported head: copy it as it is
            dense.weight.copy_(model.pooler.weight)
            dense.bias.copy_(model.pooler.bias)
            out.weight.copy_(model.head.weight)
        else:
            dense.weight.copy_(torch.eye(dense.in_features) * POOLER_SCALE)
            dense.bias.zero_()
            out.weight.copy_(model.head.weight / POOLER_SCALE)
        out.bias.copy_(model.head.bias)
    hf.config.architectures = [type(hf).__name__]
    return hf.eval()


def _probe_sets(n: int = 3):
    """A few real candidate sets (one per environment) for the export-time self-check."""
    from fastrank.data.bundle import load_bundled
    from fastrank.data.record import ENVS

    return [load_bundled(env, "eval")[0] for env in ENVS][:n]


@torch.no_grad()
def max_score_difference(model, hf, tokenizer, sets) -> float:
    """max |Reranker.score - AutoModelForSequenceClassification logits| over the candidates of `sets`."""
    worst = 0.0
    for cs in sets:
        ours = model.score(cs.goal, cs.observation, cs.candidates)
        pairs = model.featurizer.pairs(cs.goal, cs.observation, cs.candidates)
        enc = tokenizer([p[0] for p in pairs], [p[1] for p in pairs], padding=True, truncation="only_first",
                        max_length=model.max_length, return_tensors="pt")
        theirs = hf(**enc).logits.squeeze(-1).float()
        worst = max(worst, float((ours - theirs).abs().max()))
    return worst


def _results_beside(src: Path) -> dict | None:
    for cand in (src / "results.json", src.parent / "results.json"):
        if cand.is_file():
            try:
                return json.loads(cand.read_text())
            except json.JSONDecodeError:
                return None
    return None


def model_card(model, meta: dict, results: dict | None, arch: str, max_diff: float | None) -> str:
    fz = model.featurizer
    goal, obs, act = "put a clean mug in the coffeemachine", "You are in the kitchen. You see a mug 1.", "take mug 1"
    state, action = fz.pairs(goal, obs, [act])[0]
    lines = ["---", "library_name: sentence-transformers", "pipeline_tag: text-ranking", "tags: [cross-encoder, "
             "reranker, fastrank, text-agents]", "---", "", "# fastrank action reranker (exported cross-encoder)", "",
             f"A `{arch}` (num_labels=1) exported from a fastrank checkpoint. It scores how likely a candidate "
             "action is the expert's next action in a text-agent state; pick the argmax over the candidates.", "",
             "## Usage", "", "```python", "from sentence_transformers import CrossEncoder",
             "model = CrossEncoder(PATH)  # raw logits: the config sets an Identity activation",
             "scores = model.predict([(state_text, action_text), ...])", "```", "",
             "or `AutoModelForSequenceClassification.from_pretrained(PATH)` with "
             f"`tokenizer(state_texts, action_texts, truncation='only_first', max_length={model.max_length})`.", "",
             "## Input format (the two texts a caller must build)", "",
             f"Feature mode `{fz.mode}`. First text (the state; the only part that should be truncated):", "",
             "    state: goal: {goal} observation: {observation}" + (" history: {summary}" if fz.uses_history else ""),
             "", "Second text (the action" + (" plus lexical-overlap features, two decimals)" if fz.mode ==
                                            "state_action_overlap" else ")") + ":", "",
             "    action: {action}" + ("\\nfeatures: jaccard=.. action_coverage=.. state_coverage=.. bigram_overlap=.."
                                     if fz.mode == "state_action_overlap" else
                                     "\\noverlap: J A S B (the same four, in percent)"
                                     if fz.mode == "state_action_overlap_compact" else ""), "",
             "Example, built by `fastrank.data.features.Featurizer`:", "", "```",
             json.dumps([state, action], indent=1), "```", "",
             "The features are word-level overlaps between goal+observation and the action "
             "(`fastrank.data.features.overlap_features`); build them with that function for equal scores.", "",
             "## Equivalence with fastrank", "",
             f"Scores equal `Reranker.score` in fp32 (max difference at export on real candidate sets: "
             f"{'not checked' if max_diff is None else f'{max_diff:.2e}'}). fastrank's head is a linear layer on the "
             "first token; the exported head is dense(2^-20 I) -> tanh -> classifier(2^20 w), the identity in fp32 "
             "for hidden values below ~400 (exact power-of-two scalings), unless the head came from an imported "
             "cross-encoder (then it is that model's own dense+tanh+classifier). Load in fp32 or bf16, not fp16. "
             "CrossEncoder truncates `longest_first`, fastrank only the state: pairs longer than "
             f"{model.max_length} tokens can score differently.", ""]
    if meta.get("aux_heads"):
        lines += [f"Auxiliary heads {sorted(meta['aux_heads'])} are not exported.", ""]
    lines += ["## Training data", ""]
    if results is None:
        lines += ["No `results.json` beside the checkpoint: training data and net gains unknown.", ""]
    else:
        cfg = results.get("config", {})
        lines += [f"fastrank run: base model `{cfg.get('model')}`, environments {cfg.get('envs')}, negatives "
                  f"`{cfg.get('negatives')}`, upsampling {cfg.get('upsample')}, loss `{cfg.get('loss', 'pairwise')}`, "
                  f"{results.get('train_sets')} training candidate sets, {results.get('steps')} optimizer steps, "
                  f"seed {cfg.get('seed')}.", ""]
        for mode, rep in (results.get("eval") or {}).items():
            lines += [f"### Net gain on the clean eval split, `{mode}` negatives", "",
                      "| environment | states | original top-1 | reranked top-1 | net gain |", "|---|---|---|---|---|"]
            lines += [f"| {env} | {r['states']} | {r['original_top1']:.3f} | {r['reranked_top1']:.3f} | "
                      f"{r['net_gain']:+.3f} |" for env, r in rep.items()]
            lines.append("")
    return "\n".join(lines)


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, to: str = "sentence-transformers",
                      verify: bool = True, tol: float = 1e-4) -> Path:
    """Write `checkpoint` (a fastrank `save_pretrained` folder) as a standard cross-encoder folder at `out`.

    `verify`: score a few bundled candidate sets both ways and raise if they differ by more than `tol`.
    """
    if to not in ("sentence-transformers", "hf"):
        raise ValueError(f"unknown export target {to!r}; expected 'sentence-transformers'")
    from fastrank.model import Reranker

    src, dest = Path(checkpoint), Path(out)
    meta = _check_exportable(src)
    model = Reranker.from_pretrained(src).float().eval()
    hf = to_sequence_classifier(model)
    tokenizer = model.tokenizer
    max_diff = max_score_difference(model, hf, tokenizer, _probe_sets()) if verify else None
    if max_diff is not None and not max_diff <= tol:
        raise RuntimeError(f"exported model differs from the checkpoint by {max_diff:.3g} (> {tol}) on real sets; "
                           f"hidden states beyond the exact range of the tanh mapping? not written to {dest}")
    dest.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(dest, safe_serialization=True)
    tokenizer.model_max_length = model.max_length  # CrossEncoder's default max_length
    tokenizer.save_pretrained(dest)
    (dest / "README.md").write_text(model_card(model, meta, _results_beside(src), type(hf).__name__, max_diff))
    return dest


def add_export_args(sub) -> None:
    p = sub.add_parser("export", help="write a fastrank checkpoint as a standard cross-encoder (sentence-transformers "
                                      "CrossEncoder / AutoModelForSequenceClassification)")
    p.add_argument("checkpoint", help="a fastrank checkpoint folder (Reranker.save_pretrained, e.g. runs/x/model)")
    p.add_argument("out", help="output folder")
    p.add_argument("--to", default="sentence-transformers", choices=["sentence-transformers"], help="output format")
    p.add_argument("--no-verify", action="store_true", help="skip the score self-check on bundled sets")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    import sys

    try:
        dest = export_checkpoint(args.checkpoint, args.out, to=args.to, verify=not args.no_verify)
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        print(f"fastrank export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {dest} (load with sentence_transformers.CrossEncoder({str(dest)!r}))")
    return 0
