"""The SFT objective: next-token loss on assistant replies only, optionally plus a prompt LM loss.

    L = CE(reply tokens)  +  lm_weight * CE(prompt tokens)       (GPT-1's L3 = L2 + lambda * L1)

Each CE is a mean over its tokens in the batch. The loss runs through
:func:`peftkit.training.losses.chunked_cross_entropy`, so the full-vocabulary logits of
every position never exist at once.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch

from peftkit.training.data import DataError, DataWarning
from peftkit.training.losses import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    decoder_and_head,
    lm_hidden_states,
    supports_chunked_loss,
)
from peftkit.registry import ObjectiveLoss
from peftkit_plugins.sft.options import SftOptions
from peftkit_plugins.sft.tokenize import empty_replies, targets, to_messages, tokenize_conversation

__all__ = ["SftObjective"]


class SftObjective:
    name = "sft"
    description = "supervised fine-tuning: loss on assistant replies (end-of-turn included), chat templates, no packing"
    options = SftOptions

    # ------------------------------------------------------------------ data
    def prepare_data(self, records: Sequence[Mapping[str, Any]], tokenizer: Any, options: SftOptions, max_length: int) -> list[dict[str, Any]]:
        """Tokenize records; examples whose replies are cut away by ``max_length`` are dropped (and counted).

        :raises RecordError: for a record that is not a chat or prompt/response pair of strings.
        """
        examples, dropped, empty = [], 0, 0
        for index, record in enumerate(records):
            messages = to_messages(record, options, index)
            empty += empty_replies(messages)
            ids, is_target = tokenize_conversation(tokenizer, messages, index)
            ids, is_target = ids[:max_length], is_target[:max_length]
            if not any(is_target[1:]):  # position 0 is never predicted
                dropped += 1
                continue
            example = {"input_ids": ids, "labels": targets(ids, is_target)}
            if options.lm_weight > 0:
                example["prompt_labels"] = targets(ids, [not m for m in is_target])
            examples.append(example)
        if empty:
            warnings.warn(
                f"peftkit sft: {empty} empty assistant repl{'y' if empty == 1 else 'ies'} in {len(records)} records; each "
                "teaches the model to end its turn at once. Fill or drop them if that is not meant",
                DataWarning,
                stacklevel=2,
            )
        if dropped:
            print(f"peftkit sft: dropped {dropped} of {len(records)} examples whose reply starts after data.max_length = {max_length}")
        if records and not examples:
            raise DataError(f"every one of {len(records)} records lost its reply to data.max_length = {max_length}; raise it")
        return examples

    def collate(self, examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example; padding is masked out of attention and loss."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        length = max(len(e["input_ids"]) for e in examples)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        has_prompt = all("prompt_labels" in e for e in examples)
        if has_prompt:
            batch["prompt_labels"] = []
        for e in examples:
            n = len(e["input_ids"])
            batch["input_ids"].append(list(e["input_ids"]) + [pad] * (length - n))
            batch["attention_mask"].append([1] * n + [0] * (length - n))
            batch["labels"].append(list(e["labels"]) + [IGNORE_INDEX] * (length - n))
            if has_prompt:
                batch["prompt_labels"].append(list(e["prompt_labels"]) + [IGNORE_INDEX] * (length - n))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}

    # ------------------------------------------------------------------ loss
    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor], options: SftOptions) -> ObjectiveLoss:
        """Mean CE over reply targets (+ ``lm_weight`` x mean CE over prompt tokens).

        :raises DataError: when the batch has no reply target at all (a silent
            zero loss would train nothing and look fine).
        """
        if supports_chunked_loss(model):
            hidden = lm_hidden_states(model, batch)  # (B, T, C)
            _, head = decoder_and_head(model)
            chunk = options.loss_chunk_size
        else:  # the model post-processes its logits: use its own head, then the same CE
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits  # (B, T, V)
            head, chunk = (lambda x: x), 0
        total, count = chunked_cross_entropy(hidden, head, batch["labels"], chunk_size=chunk)
        if count == 0:
            raise DataError(
                "SFT batch has no target token (every label is -100): the replies were masked or cut away. "
                "Check objective.options (prompt_key/response_key/messages_key) and data.max_length"
            )
        loss = total / count
        metrics = {"reply_loss": float(loss.detach())}
        if options.lm_weight > 0 and "prompt_labels" in batch:
            prompt_total, prompt_count = chunked_cross_entropy(hidden, head, batch["prompt_labels"], chunk_size=chunk)
            if prompt_count:
                prompt_loss = prompt_total / prompt_count
                metrics["prompt_loss"] = float(prompt_loss.detach())
                loss = loss + options.lm_weight * prompt_loss
        return ObjectiveLoss(loss, count, metrics)
