"""Classification data: ``{text, label}`` records -> token ids ending with the end token, and label ids.

The text is tokenized as a reply is in the reward and PPO objectives: its
tokens, then the tokenizer's end token, where the label head reads (GPT-1's
"extract" token). Texts longer than ``max_length`` keep their first
``max_length - 1`` tokens and the end token.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from peftkit.training.data import RecordError, require_string
from peftkit.training.losses import IGNORE_INDEX
from peftkit_plugins.reward.formatting import end_token_id

__all__ = ["collate", "label_set", "prepare_data", "record_text_and_label"]


def record_text_and_label(record: Mapping[str, Any], index: int, text_key: str, label_key: str) -> tuple[str, str]:
    """``(text, label)`` of a record; numbers as labels are taken as their text.

    :raises RecordError: naming the record and the missing or non-string field.
    """
    for key in (text_key, label_key):
        if key not in record:
            raise RecordError(index, f"it has no {key!r} field (its keys are {sorted(record)}); classify records are "
                                     f"{{{text_key!r}: ..., {label_key!r}: ...}} (objective.options text_key/label_key)")
    label = record[label_key]
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    return require_string(record[text_key], repr(text_key), index), require_string(label, repr(label_key), index)


def label_set(records: Sequence[Mapping[str, Any]], text_key: str = "text", label_key: str = "label") -> list[str]:
    """The sorted set of labels of ``records`` (checking every record)."""
    return sorted({record_text_and_label(r, i, text_key, label_key)[1] for i, r in enumerate(records)})


def prepare_data(records: Sequence[Mapping[str, Any]], tokenizer: Any, labels: Sequence[str], options: Any, max_length: int) -> list[dict[str, Any]]:
    """``{"input_ids": text tokens + end token, "label": its index in labels}`` per record.

    :raises RecordError: for a record without the fields, or with a label outside ``labels``.
    """
    index_of = {name: i for i, name in enumerate(labels)}
    end = end_token_id(tokenizer)
    examples = []
    for index, record in enumerate(records):
        text, label = record_text_and_label(record, index, options.text_key, options.label_key)
        if label not in index_of:
            raise RecordError(index, f"its {options.label_key!r} = {label!r} is not one of the labels {list(labels)}; fix the record "
                                     "or add the label to objective.options.labels (or to the training data)")
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[: max(max_length - 1, 0)] + [end]
        examples.append({"input_ids": ids, "label": index_of[label]})
    return examples


def collate(examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``lm_labels`` ``(B, T)`` (padding -100 in ``lm_labels``) and ``labels`` ``(B,)``."""
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        input_ids[i, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        attention_mask[i, : len(example["input_ids"])] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "lm_labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX),
        "labels": torch.tensor([e["label"] for e in examples], dtype=torch.long),
    }
