"""Training data: reading records, the held-out split, and a resumable batch order.

Records are read through the ``datasets`` library: local ``.jsonl``/``.json``/
``.csv``/``.parquet`` files, or a dataset name (``"name"`` or ``"name:split"``,
from the hub when it is reachable). The objective turns records into examples
(:meth:`peftkit.registry.Objective.prepare_data`).

:class:`BatchOrder` yields batches of example indices in a per-epoch shuffled
order that depends only on ``(seed, epoch)``, and its position
``(epoch, batch_in_epoch)`` is all a checkpoint needs to continue exactly where
it stopped. Under several processes each takes every ``world_size``-th index of
the shuffled order, so together they see each example once per epoch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from peftkit.errors import PeftkitError

__all__ = ["DataError", "load_records", "split_records", "BatchOrder"]

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(PeftkitError, ValueError):
    """Data that cannot be read or trained on."""


def load_records(source: str) -> list[dict[str, Any]]:
    """Every record of a local file or dataset, as a list of dicts.

    :param source: a ``.jsonl``/``.json``/``.csv``/``.parquet`` path, or ``name[:split]`` of a dataset.
    :raises DataError: naming the source and the cause.
    """
    import datasets

    datasets.disable_progress_bars()
    suffix = Path(source).suffix.lower()
    try:
        if suffix in _FORMATS:
            if not Path(source).is_file():
                raise DataError(f"data file {source!r} does not exist")
            ds = datasets.load_dataset(_FORMATS[suffix], data_files=source, split="train")
        else:
            name, _, split = source.partition(":")
            ds = datasets.load_dataset(name, split=split or "train")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the source and the cause
        raise DataError(
            f"cannot read data {source!r}: {type(exc).__name__}: {exc}. Use a local .jsonl/.json/.csv/.parquet file "
            "or a dataset name reachable from this machine."
        ) from None
    return [dict(r) for r in ds]


def split_records(records: list[dict[str, Any]], eval_size: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Shuffle with ``seed`` and hold out the last ``eval_size`` records: ``(train, eval)``.

    :raises DataError: if nothing would be left to train on.
    """
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if eval_size >= len(records):
        raise DataError(
            f"data.eval_size = {eval_size} leaves nothing to train on ({len(records)} records); "
            "lower it or give a separate data.eval file"
        )
    cut = len(records) - eval_size
    return [records[i] for i in order[:cut]], [records[i] for i in order[cut:]]


@dataclass
class BatchOrder:
    """Shuffled, resumable batches of indices for one process.

    :param size: number of examples.
    :param batch_size: examples per batch (per process); the last partial batch of an epoch is dropped
        when there are at least ``batch_size`` examples per process, so every step sees full batches.
    :param seed: the shuffle depends on ``(seed, epoch)`` only.
    :param rank: this process's index; :param world_size: number of processes.
    """

    size: int
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    batch_in_epoch: int = 0

    def _epoch_indices(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.size, generator=gen).tolist()
        return perm[self.rank :: self.world_size]

    @property
    def batches_per_epoch(self) -> int:
        per_rank = self.size // self.world_size
        return max(1, per_rank // self.batch_size) if per_rank >= self.batch_size else 1

    def __iter__(self) -> Iterator[list[int]]:
        """Batches forever (epoch after epoch), starting at the current position; the position advances."""
        while True:
            indices = self._epoch_indices(self.epoch)
            while self.batch_in_epoch < self.batches_per_epoch:
                start = self.batch_in_epoch * self.batch_size
                batch = indices[start : start + self.batch_size]
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
