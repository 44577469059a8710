"""Options of the ``classify`` objective."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ClassifyOptions", "MAX_LM_WEIGHT"]

#: Largest lm_weight: GPT-1 used 0.5; 1000x the classification loss makes it the only loss, and larger weights
#: overflow float32 gradients.
MAX_LM_WEIGHT = 1000.0
#: Seeds are 32-bit unsigned, as train.seed (numpy's range).
MAX_SEED = 2**32 - 1


@dataclass
class ClassifyOptions:
    """``objective.options`` for ``objective.name: classify``.

    Attributes:
        labels: the label names, in the order of the head's outputs. Empty: the sorted set of labels of
            the training data. A held-out record with a label outside the set is an error.
        text_key: record field holding the text to classify.
        label_key: record field holding its label (a string; numbers are taken as their text).
        lm_weight: weight of the auxiliary language-modelling loss on the input text (GPT-1's
            ``L3 = L2 + lambda * L1``, lambda = 0.5 there); 0 turns it off; at most MAX_LM_WEIGHT.
        head_seed: seed of the label head's initialisation (w ~ N(0, 1/(H+1))); 0..MAX_SEED.
    """

    labels: list[str] = field(default_factory=list)
    text_key: str = "text"
    label_key: str = "label"
    lm_weight: float = 0.0
    head_seed: int = 0

    def validate(self) -> list[str]:
        problems = []
        if len(self.labels) == 1:
            problems.append(f"option 'labels' = {self.labels!r} names one label; a classifier needs at least 2 (or [] to read them from the data)")
        duplicates = sorted({str(x) for x in self.labels if self.labels.count(x) > 1})
        if duplicates:
            problems.append(f"option 'labels' repeats {duplicates}; name each label once")
        if any(not isinstance(x, str) or not x.strip() for x in self.labels):
            problems.append(f"option 'labels' = {self.labels!r} must hold non-empty strings")
        if not 0 <= self.lm_weight <= MAX_LM_WEIGHT:
            problems.append(f"option 'lm_weight' = {self.lm_weight!r} must be in [0, {MAX_LM_WEIGHT:g}]; GPT-1 used 0.5")
        if not 0 <= self.head_seed <= MAX_SEED:
            problems.append(f"option 'head_seed' = {self.head_seed!r} must be in [0, {MAX_SEED}] (2**32 - 1, as train.seed); e.g. 0")
        for key in ("text_key", "label_key"):
            if not getattr(self, key).strip():
                problems.append(f"option {key!r} is empty; name the record field (default {key.split('_')[0]!r})")
        return problems
