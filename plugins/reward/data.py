"""Reward-model data: preference pairs and ranked groups -> flat batches of (prompt, response) sequences.

Records (jsonl/json/csv/parquet rows) take one of two forms:

* ``{"prompt": str, "chosen": str, "rejected": str}`` -- a pair (K = 2);
* ``{"prompt": str, "responses": [str, ...]}`` -- K >= 2 responses ranked best first.

An example holds the K token sequences of one prompt; :func:`collate` lays the
responses of all groups of a batch out flat (one row per response, right
padded) with ``group_sizes`` saying where each group ends, so the loss sees
all C(K, 2) pairs of a prompt in one batch element.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from peftkit.errors import PeftkitError
from peftkit.training.data import RecordError, require_string
from peftkit_plugins.reward.formatting import encode_prompt, encode_response

__all__ = ["record_responses", "prepare_data", "collate"]


def record_responses(record: Mapping[str, Any], index: int) -> tuple[str, list[str]]:
    """``(prompt, responses best first)`` of a record.

    :raises RecordError: naming what is wrong: missing keys, fewer than two responses, or a prompt or
        response that is not a string (``str()`` of it would score text such as ``None``).
    """
    prompt = record.get("prompt")
    if isinstance(record.get("responses"), (list, tuple)):
        fields = [f"'responses' item {k}" for k in range(len(record["responses"]))]
        responses = list(record["responses"])
    elif "chosen" in record and "rejected" in record:
        fields, responses = ["'chosen'", "'rejected'"], [record["chosen"], record["rejected"]]
    else:
        raise RecordError(
            index,
            f"its keys are {sorted(record)}; reward data needs prompt + chosen + rejected, or prompt + responses "
            "(a list ranked best first)",
        )
    if len(responses) < 2:
        raise RecordError(index, f"'responses' holds {len(responses)} response(s); a ranking needs at least 2")
    for field, value in [("'prompt'", prompt), *zip(fields, responses)]:
        require_string(value, field, index)
    return prompt, responses


def prepare_data(records: Sequence[Mapping[str, Any]], tokenizer: Any, options: Any, max_length: int) -> list[dict[str, Any]]:
    """Tokenize each record into ``{"sequences": [ids of prompt+response_k for k in ranks], "response_lengths": [...]}``.

    ``response_lengths[k]`` counts the last tokens of ``sequences[k]`` that are
    the response and its end token (the ``dpo`` objective scores only those).

    Over-long prompts lose tokens from their start (the response and its end
    token, where the head reads, are kept); a record with a response longer
    than ``max_length - 1`` tokens is dropped.
    """
    examples = []
    for index, record in enumerate(records):
        prompt, responses = record_responses(record, index)
        prompt_ids = encode_prompt(tokenizer, prompt, chat_template=getattr(options, "chat_template", True))
        sequences, response_lengths = [], []
        for response in responses:
            response_ids = encode_response(tokenizer, response)
            room = max_length - len(response_ids)
            if room < 1:
                break
            sequences.append(prompt_ids[-room:] + response_ids)
            response_lengths.append(len(response_ids))
        if len(sequences) == len(responses):
            examples.append({"sequences": sequences, "response_lengths": response_lengths})
    if not examples and records:
        raise PeftkitError(f"no reward example fits data.max_length = {max_length}; raise it")
    return examples


def collate(examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Flat, right-padded ``input_ids``/``attention_mask`` ``(N, T)`` and ``group_sizes`` ``(G,)``."""
    rows = [seq for example in examples for seq in example["sequences"]]
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    group_sizes = torch.tensor([len(example["sequences"]) for example in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "group_sizes": group_sizes}
