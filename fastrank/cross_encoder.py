"""Reading a Hugging Face sequence-classification cross-encoder's encoder and trained head (the import side of
`fastrank.export`). Kept apart from `fastrank.export` so that `fastrank.model` can use it without importing the
export code, which imports `fastrank.model`.

BERT's head is ``classifier(tanh(pooler.dense(h_first)))``; RoBERTa-family heads are
``out_proj(tanh(dense(h_first)))``: both are what `Reranker(head_pooler=True)` computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_ROBERTA_LIKE = ("roberta", "xlm-roberta", "camembert")
SUPPORTED = ("bert",) + _ROBERTA_LIKE  # model types whose classification head maps exactly onto ours


@dataclass
class CrossEncoderParts:
    """The pieces of a sequence-classification cross-encoder that a `Reranker` keeps."""

    encoder: nn.Module  # the base model (BertModel / RobertaModel)
    pooler: nn.Linear  # dense before the tanh
    classifier: nn.Linear  # hidden -> 1

    def apply(self, model) -> None:
        """Copy the trained head into `model` (a Reranker built with ``head_pooler=True``)."""
        with torch.no_grad():
            model.pooler.weight.copy_(self.pooler.weight)
            model.pooler.bias.copy_(self.pooler.bias)
            model.head.weight.copy_(self.classifier.weight)
            model.head.bias.copy_(self.classifier.bias)


def is_sequence_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def read_cross_encoder(path: str, config=None, **model_kwargs) -> CrossEncoderParts | None:
    """The encoder and trained head of a sequence-classification checkpoint; None for a plain encoder."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = config if config is not None else AutoConfig.from_pretrained(path)
    if not is_sequence_classifier(config):
        return None
    if config.num_labels != 1:
        raise ValueError(f"{path}: a sequence classifier with {config.num_labels} labels; a rerank head scores one "
                         f"logit, so only num_labels=1 cross-encoders can keep their head")
    if config.model_type not in SUPPORTED:
        raise NotImplementedError(f"{path}: keeping the trained head of a {config.model_type!r} classifier is not "
                                  f"supported (only {SUPPORTED}); load its encoder without the head instead")
    hf = AutoModelForSequenceClassification.from_pretrained(path, **model_kwargs)
    if config.model_type == "bert":
        if hf.bert.pooler is None:
            raise ValueError(f"{path}: BertForSequenceClassification without a pooler")
        return CrossEncoderParts(hf.bert, hf.bert.pooler.dense, hf.classifier)
    return CrossEncoderParts(hf.base_model, hf.classifier.dense, hf.classifier.out_proj)
