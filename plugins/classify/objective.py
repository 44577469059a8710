"""The ``classify`` objective: GPT-1 style classification, a label head on the last token plus an auxiliary LM loss.

    L3 = L2 + lm_weight * L1,   L2 = CE(softmax(W h_last + b), y),   L1 = next-token CE on the input text

(Radford et al., 2018, "Improving Language Understanding by Generative
Pre-Training", Eq. 5; lambda = 0.5 there). One decoder pass gives both: the
head reads the last real token's hidden state (:mod:`.head`), the LM loss the
same hidden states through the model's output head (chunked, as in SFT).

The label set is ``objective.options.labels`` or, when that is empty, the
sorted labels of the training data. The trainer asks ``setup_model`` before it
reads the data, so with labels from the data the head is made while the
training split is prepared (still before the optimizer sees the parameters);
on ``--resume`` the checkpoint's head, labels included, comes back instead.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.registry import ObjectiveLoss
from peftkit.training.data import DataError
from peftkit.training.losses import chunked_cross_entropy, decoder_and_head, lm_hidden_states
from peftkit_plugins.classify import data as classify_data
from peftkit_plugins.classify.head import LabelHead, attach_label_head, load_label_head, save_label_head
from peftkit_plugins.classify.metrics import accuracy, macro_f1
from peftkit_plugins.classify.options import ClassifyOptions
from peftkit_plugins.reward.head import heads_of, last_token_hidden

__all__ = ["ClassifyObjective", "evaluate_classifier", "install_head", "label_logits", "predict"]


def install_head(tuned: nn.Module, head: LabelHead, name: str | None = None, *, trainable: bool = True) -> LabelHead:
    """Put a loaded ``head`` on ``tuned`` as ``heads[name]`` (default: the active adapter), on the model's device and dtype."""
    param = next(p for p in tuned.base_model.parameters() if p.is_floating_point())
    head = head.to(device=param.device, dtype=param.dtype)
    head.requires_grad_(trainable)
    heads_of(tuned)[name or tuned.active_adapter] = head
    return head


def _head_for(model: nn.Module) -> LabelHead:
    name = getattr(model, "active_adapter", None)
    heads = model._modules.get("heads") or {}
    if name not in heads or not isinstance(heads[name], LabelHead):
        raise PeftkitError(
            f"the classify objective found no label head for adapter {name!r}; call "
            "peftkit_plugins.classify.attach_label_head(tuned, labels) before training (the trainer does it)"
        )
    return heads[name]


def label_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(label logits (B, C) float32, last hidden states (B, T, H))`` of the active adapter and its head."""
    head = _head_for(model)
    hidden = lm_hidden_states(model, dict(batch))  # (B, T, H)
    return head(last_token_hidden(hidden, batch["attention_mask"])).float(), hidden


@torch.no_grad()
def evaluate_classifier(model: nn.Module, examples: Sequence[Mapping[str, Any]], tokenizer: Any, batch_size: int = 16) -> dict[str, float]:
    """Held-out accuracy and macro-F1 of the argmax label over ``examples``."""
    device = next(_head_for(model).parameters()).device
    predicted, expected = [], []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in classify_data.collate(examples[start : start + batch_size], tokenizer).items()}
        logits, _ = label_logits(model, batch)
        predicted += logits.argmax(-1).tolist()
        expected += batch["labels"].tolist()
    return {"eval_accuracy": accuracy(predicted, expected), "eval_macro_f1": macro_f1(predicted, expected)} if expected else {}


@torch.no_grad()
def predict(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, max_length: int = 512) -> list[dict[str, float]]:
    """``{label: probability}`` of each text, most likely first, under the active adapter and its head."""
    head = _head_for(model)
    labels = head.labels
    options = ClassifyOptions()
    records = [{"text": text, "label": labels[0]} for text in texts]
    batch = classify_data.collate(classify_data.prepare_data(records, tokenizer, labels, options, max_length), tokenizer)
    device = next(head.parameters()).device
    logits, _ = label_logits(model, {k: v.to(device) for k, v in batch.items()})
    out = []
    for row in logits.softmax(-1).tolist():
        out.append(dict(sorted(zip(labels, row), key=lambda item: -item[1])))
    return out


class ClassifyObjective:
    """Classification: a label head on the last token, cross-entropy, plus ``lm_weight`` x LM loss on the text."""

    name = "classify"
    description = "classification (GPT-1): label head on the last token, cross-entropy + lm_weight * LM loss on the text"
    options = ClassifyOptions

    def __init__(self) -> None:
        self._model: weakref.ref | None = None  # the model setup_model saw: the training split's labels make its head

    # ------------------------------------------------------------------ data
    def _labels(self, records: Sequence[Mapping[str, Any]], options: ClassifyOptions) -> list[str]:
        model = self._model() if self._model is not None else None
        heads = model._modules.get("heads") if model is not None else None
        head = heads[model.active_adapter] if heads is not None and model.active_adapter in heads else None
        if isinstance(head, LabelHead):
            return head.labels
        labels = list(options.labels) or classify_data.label_set(records, options.text_key, options.label_key)
        if len(labels) < 2:
            raise DataError(f"the training data has {len(labels)} label(s) {labels}; a classifier needs at least 2 "
                            "(check objective.options.label_key, or list them in objective.options.labels)")
        if model is not None:  # the training split comes first, before the optimizer is built
            attach_label_head(model, labels, seed=options.head_seed)
        return labels

    def prepare_data(self, records: Sequence[Mapping[str, Any]], tokenizer: Any, options: ClassifyOptions, max_length: int) -> list[dict[str, Any]]:
        """Token ids and label ids; the first call (the training split) fixes the label set when ``labels`` is empty.

        :raises RecordError: naming the record and field (missing field, non-string text, unknown label).
        """
        return classify_data.prepare_data(records, tokenizer, self._labels(records, options), options, max_length)

    def collate(self, examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        return classify_data.collate(examples, tokenizer)

    # ------------------------------------------------------------------ loss
    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], options: ClassifyOptions) -> ObjectiveLoss:
        """Mean cross-entropy of the labels (+ ``lm_weight`` x mean next-token CE over the texts' tokens)."""
        logits, hidden = label_logits(model, batch)  # (B, C), (B, T, H)
        loss = F.cross_entropy(logits, batch["labels"])
        metrics = {"classify_loss": float(loss.detach()), "accuracy": float((logits.argmax(-1) == batch["labels"]).float().mean())}
        if options.lm_weight > 0:
            _, lm_head = decoder_and_head(model)
            total, count = chunked_cross_entropy(hidden, lm_head, batch["lm_labels"])
            if count:
                lm_loss = total / count
                metrics["lm_loss"] = float(lm_loss.detach())
                loss = loss + options.lm_weight * lm_loss
        return ObjectiveLoss(loss, int(batch["labels"].numel()), metrics)

    # --------------------------------------------- the trainer's optional steps
    def setup_model(self, tuned: nn.Module, options: ClassifyOptions, *, checkpoint: Path | None = None) -> None:
        """The label head: the checkpoint's on resume, a fresh one for ``options.labels``, else made with the training data."""
        self._model = weakref.ref(tuned)
        if checkpoint is not None:
            head = load_label_head(checkpoint)
            if options.labels and list(options.labels) != head.labels:
                raise PeftkitError(f"the checkpoint's classifier predicts labels {head.labels}, but objective.options.labels is "
                                   f"{list(options.labels)}; resume with the run's own recipe")
            install_head(tuned, head)
        elif options.labels:
            attach_label_head(tuned, options.labels, seed=options.head_seed)

    def save_extras(self, tuned: nn.Module, directory: Path, options: ClassifyOptions) -> None:
        """The head and its labels beside every adapter the trainer saves (checkpoint and final)."""
        save_label_head(_head_for(tuned), directory)

    def eval_metrics(self, model: nn.Module, examples: Sequence[Mapping[str, Any]], tokenizer: Any, options: ClassifyOptions) -> dict[str, float]:
        """Held-out accuracy and macro-F1."""
        return evaluate_classifier(model, examples, tokenizer)
