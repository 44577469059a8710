"""Rewards of the arithmetic task (data/arithmetic): is the reply the record's ``answer``?

The rules are the ones ``data/arithmetic/evaluate.py`` scores held-out replies
with (it imports them from here), so a GRPO run's training reward and the
evaluation metric are one function:

* ``exact_match``: the reply, stripped of surrounding whitespace, is the answer
  written as an integer and nothing else (``"48"`` for 48; ``"48."`` is not);
* ``first_number_match``: the first integer in the reply (``-?\\d+``) is the answer.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from peftkit.errors import PeftkitError

__all__ = ["ArithmeticExactMatch", "ArithmeticFirstNumber", "exact_match", "first_number_match"]

_INTEGER = re.compile(r"-?\d+")


def exact_match(reply: str, answer: int) -> bool:
    """Whether ``reply`` (stripped) is exactly ``str(answer)``."""
    return reply.strip() == str(answer)


def first_number_match(reply: str, answer: int) -> bool:
    """Whether the first integer in ``reply`` equals ``answer``."""
    first = _INTEGER.search(reply)
    return first is not None and int(first.group()) == answer


def _answers(name: str, records: Sequence[Mapping[str, Any]]) -> list[int]:
    answers = []
    for index, record in enumerate(records):
        answer = record.get("answer") if isinstance(record, Mapping) else None
        if isinstance(answer, bool) or not isinstance(answer, int):
            keys = sorted(record) if isinstance(record, Mapping) else type(record).__name__
            raise PeftkitError(
                f"reward {name!r}: record {index + 1} has no integer 'answer' (its keys: {keys}, answer = {answer!r}); "
                "it scores data/arithmetic-style records {prompt, response, answer}"
            )
        answers.append(answer)
    return answers


class ArithmeticExactMatch:
    """1.0 when the completion is exactly the answer (data/arithmetic's ``exact_match``), else 0.0."""

    name = "arithmetic_exact_match"
    description = "1 if the reply is exactly the record's integer 'answer' (data/arithmetic's exact_match), else 0"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[float]:
        return [float(exact_match(c, a)) for c, a in zip(completions, _answers(self.name, records), strict=True)]


class ArithmeticFirstNumber:
    """1.0 when the completion's first integer is the answer (data/arithmetic's ``first_number_match``), else 0.0."""

    name = "arithmetic_first_number"
    description = "1 if the first integer in the reply is the record's 'answer' (data/arithmetic's first_number_match), else 0"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], records: Sequence[Mapping[str, Any]]) -> list[float]:
        return [float(first_number_match(c, a)) for c, a in zip(completions, _answers(self.name, records), strict=True)]
