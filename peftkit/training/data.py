"""Training data: reading records, the held-out split, and a resumable batch order.

Records are read through the ``datasets`` library: local ``.jsonl``/``.json``/
``.csv``/``.parquet`` files, or a dataset name (``"name"`` or ``"name:split"``,
from the hub when it is reachable). The objective turns records into examples
(:meth:`peftkit.registry.Objective.prepare_data`).

Each record is a :class:`Record`, a dict that remembers its file and number,
so an objective that refuses one (:class:`RecordError`, with its position in
the list it was given) is reported against the file. A local file that
``datasets`` cannot read is examined here instead, so the error names the
line (or byte offset) and what is wrong: bad JSON, a line that is not an
object, a field whose type changes between records, bytes that are not
UTF-8, an empty file.

:class:`BatchOrder` yields batches of example indices in a per-epoch shuffled
order that depends only on ``(seed, epoch)``, and its position
``(epoch, batch_in_epoch)`` is all a checkpoint needs to continue exactly where
it stopped. Under several processes each takes every ``world_size``-th index of
the shuffled order, so together they see each example once per epoch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.training._text import NotUtf8Error, decode_utf8

__all__ = ["DataError", "DataWarning", "Record", "RecordError", "require_string", "read_text", "load_records", "split_records", "BatchOrder"]

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(PeftkitError, ValueError):
    """Data that cannot be read or trained on."""


class DataWarning(PeftkitWarning):
    """Data that trains, but probably not as meant (e.g. empty replies)."""


class Record(dict):
    """One record: its fields, plus ``source`` (the file or dataset) and ``number`` (1-based) for messages."""

    def __init__(self, fields: dict[str, Any], source: str, number: int):
        super().__init__(fields)
        self.source, self.number = source, number


class RecordError(DataError):
    """An objective refusing record ``index`` of the list it was given; ``problem`` says why."""

    def __init__(self, index: int, problem: str):
        super().__init__(f"record {index}: {problem}")
        self.index, self.problem = index, problem

    def located(self, records: list[dict[str, Any]]) -> DataError:
        """The same error naming the file and record number, when ``records[index]`` knows them."""
        record = records[self.index] if 0 <= self.index < len(records) else None
        if not isinstance(record, Record):
            return self
        return DataError(f"data {record.source!r}, record {record.number}: {self.problem}")


def require_string(value: Any, what: str, index: int) -> str:
    """``value`` if it is a string; otherwise a :class:`RecordError` for record ``index`` naming ``what`` it is.

    Objectives call it on every text field: ``str()`` of ``None`` or of a list would train on ``"None"`` or a repr.
    """
    if isinstance(value, str):
        return value
    kind = type(value).__name__
    shown = "null" if value is None else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} ({value!r:.60})"
    raise RecordError(index, f"{what} is {shown}, not a string; fix or drop the record")


def load_records(source: str) -> list[Record]:
    """Every record of a local file or dataset, in order.

    :param source: a ``.jsonl``/``.json``/``.csv``/``.parquet`` path, or ``name[:split]`` of a dataset.
    :raises DataError: naming the source and the cause (for a local text file, the line or byte offset).
    """
    import datasets

    datasets.disable_progress_bars()
    suffix = Path(source).suffix.lower()
    if suffix in _FORMATS and not Path(source).is_file():
        raise DataError(f"data file {source!r} does not exist")
    try:
        if suffix in _FORMATS:
            ds = datasets.load_dataset(_FORMATS[suffix], data_files=source, split="train")
        else:
            name, _, split = source.partition(":")
            ds = datasets.load_dataset(name, split=split or "train")
        rows = [dict(r) for r in ds]  # reading the rows can fail too (e.g. bytes that are not UTF-8)
    except Exception as exc:  # datasets raises many types; the user needs the source and the cause
        problem = _explain_unreadable(Path(source)) if suffix in _FORMATS else None
        if problem:
            raise DataError(f"data file {source!r}: {problem}") from None
        raise DataError(
            f"cannot read data {source!r}: {type(exc).__name__}: {exc}. Use a local .jsonl/.json/.csv/.parquet file "
            "or a dataset name reachable from this machine."
        ) from None
    if not rows:
        raise DataError(f"data {source!r} holds no records; give a file with at least one")
    return [Record(row, source, number) for number, row in enumerate(rows, start=1)]


def read_text(path: Path) -> str:
    """The text of a local data file.

    :raises DataError: naming the file and the byte offset (and line) of the first byte that is not UTF-8.
    """
    try:
        return decode_utf8(path.read_bytes())
    except NotUtf8Error as exc:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text: {exc}; save the file as UTF-8") from None


def _explain_unreadable(path: Path) -> str | None:
    """What makes a local data file unreadable, with its line or byte offset; ``None`` if nothing is found."""
    if path.suffix.lower() == ".parquet":
        return None
    text = read_text(path)
    if not text.strip():
        return "the file is empty; give a file with at least one record"
    if path.suffix.lower() == ".jsonl":
        return _explain_jsonl(text)
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno}, column {exc.colno} is not valid JSON ({exc.msg})"
        if not content:
            return f"the file holds no records (an empty JSON {_json_kind(content)}); give a list of objects"
    return None


def _json_kind(value: Any) -> str:
    kinds = {str: "string", bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}
    return kinds.get(type(value), type(value).__name__)


def _explain_jsonl(text: str) -> str | None:
    """The first line of a JSON-lines text that is not a JSON object, or whose field changes type."""
    first_kind: dict[str, tuple[str, int]] = {}  # field -> (kind, line where it was first seen)
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number} is not valid JSON ({exc.msg} at column {exc.colno}); one JSON object per line"
        if not isinstance(record, dict):
            return f"line {number} is a JSON {_json_kind(record)}, not an object; one JSON object per line"
        for key, value in record.items():
            if value is None:
                continue
            kind, seen = first_kind.setdefault(key, (_json_kind(value), number))
            if kind != _json_kind(value):
                return (
                    f"line {number}: field {key!r} is a {_json_kind(value)} ({value!r:.60}) but a {kind} on line {seen}; "
                    "a field must have one type in every record"
                )
    return None


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
