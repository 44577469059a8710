"""PPO data: prompts for rollouts, and plain text for the PPO-ptx pretraining term.

Prompt records are ``{"prompt": str, ...}`` (other fields are kept for the
caller, e.g. what a task's true reward needs). Pretraining text comes from a
``.txt`` file (paragraphs separated by blank lines) or a ``.jsonl``/``.json``
file with a ``text`` field; each text becomes one row of at most
``ptx_max_length`` tokens, served in a resumable shuffled order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from peftkit.training.data import BatchOrder, DataError, RecordError, load_records, read_text, require_string
from peftkit_plugins.reward.formatting import encode_prompt

__all__ = ["prepare_prompts", "collate_prompts", "load_ptx_texts", "tokenize_ptx", "PtxStream"]


def prepare_prompts(records: Sequence[Mapping[str, Any]], tokenizer: Any, options: Any, max_length: int) -> list[dict[str, Any]]:
    """``{"prompt_ids": [...], "prompt": str}`` per record (prompts longer than ``max_length`` keep their end)."""
    examples = []
    for index, record in enumerate(records):
        if "prompt" not in record:
            raise RecordError(index, f"its keys are {sorted(record)}; PPO prompt data needs a 'prompt' string")
        prompt = require_string(record["prompt"], "'prompt'", index)
        ids = encode_prompt(tokenizer, prompt, chat_template=getattr(options, "chat_template", True))
        examples.append({"prompt_ids": ids[-max_length:], "prompt": prompt})
    return examples


def collate_prompts(examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids and mask (the layout ``generate`` takes)."""
    from peftkit_plugins.ppo.rollout import left_pad

    pad = getattr(tokenizer, "pad_token_id", None)
    ids, mask = left_pad([e["prompt_ids"] for e in examples], 0 if pad is None else int(pad))
    return {"input_ids": ids, "attention_mask": mask}


def load_ptx_texts(source: str) -> list[str]:
    """The texts of a ``.txt`` (blank-line separated paragraphs) or ``.jsonl``/``.json`` (``text`` field) file."""
    path = Path(source)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"ptx_data file {source!r} does not exist")
        texts = [" ".join(p.split()) for p in read_text(path).split("\n\n")]
    else:
        records = load_records(source)
        if records and "text" not in records[0]:
            raise DataError(f"ptx_data {source!r}: records have keys {sorted(records[0])}; PPO-ptx needs a 'text' field")
        try:
            texts = [require_string(record.get("text"), "'text'", index) for index, record in enumerate(records)]
        except RecordError as exc:
            raise exc.located(records) from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"ptx_data {source!r} holds no text")
    return texts


def tokenize_ptx(texts: Sequence[str], tokenizer: Any, max_length: int) -> list[list[int]]:
    """Token ids of each text, cut to ``max_length``; texts under 2 tokens are dropped."""
    rows = [list(tokenizer(t)["input_ids"])[:max_length] for t in texts]
    return [r for r in rows if len(r) >= 2]


class PtxStream:
    """Endless right-padded batches of pretraining rows in a resumable shuffled order.

    :param rank, world_size: several processes each read their own share of the rows (each epoch's
        shuffle, dealt out as the trainer deals prompts: :class:`peftkit.training.data.BatchOrder`).
    """

    def __init__(
        self, rows: list[list[int]], batch_size: int, pad_id: int, *, seed: int = 0, device: Any = None, rank: int = 0, world_size: int = 1
    ):
        self.rows, self.pad_id, self.device = rows, pad_id, device
        self.order = BatchOrder(len(rows), batch_size, seed=seed, rank=rank, world_size=world_size)
        self._indices = iter(self.order)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = [self.rows[i] for i in next(self._indices)]
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order.load_state_dict(state)
        self._indices = iter(self.order)
