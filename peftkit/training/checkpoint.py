"""A training run's checkpoint: what is in it, and how it is read back for ``--resume``.

``output.dir/checkpoint/`` holds the adapter in its training form
(``adapter/``, plus whatever the objective saves beside it), the recipe that
wrote it (``recipe.yaml``) and the loop state (``trainer_state.pt``: step,
data position, optimizer, scheduler and every RNG state). The state file is
written with ``torch.save`` and read with ``weights_only=True``: tensors and
plain data, no unpickled code.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Iterator

import torch

from peftkit.errors import PeftkitError, TrainingError

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINT_DIR",
    "STATE_FILE",
    "METRICS_FILE",
    "RECIPE_FILE",
    "RESUME_MAY_CHANGE",
    "rng_state",
    "set_rng_state",
    "recipe_changes",
    "read_state_file",
    "restoring",
]

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "recipe.yaml"

#: Recipe keys a resumed run may change: they do not touch what is trained or how.
RESUME_MAY_CHANGE = ("output.", "train.eval_batch_size", "train.cpu")


def rng_state() -> dict[str, Any]:
    """Every RNG state a run draws from (python, numpy, torch, CUDA), for a checkpoint."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import numpy as np

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def recipe_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``key.path: old -> new`` for every recipe value that differs, but those in :data:`RESUME_MAY_CHANGE`."""

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix[:-1]: node}
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out

    old, new = flat(before), flat(after)
    return [
        f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not key.startswith(RESUME_MAY_CHANGE)
    ]


def read_state_file(path: Path) -> dict[str, Any]:
    """A checkpoint's loop state (written with ``torch.save``), read without unpickling code: tensors and plain data only.

    :raises TrainingError: for a missing, truncated or foreign file, naming it (the file is left as it is).
    """
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise TrainingError(
            f"cannot resume: {path} is not a readable peftkit checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
            "it is truncated, corrupt or from an incompatible version. Start a new run (another output.dir, or "
            "without --resume)"
        ) from None


@contextlib.contextmanager
def restoring(path: Path) -> Iterator[None]:
    """Restore loop state read from ``path`` inside this block: a state that reads but does not fit (a key
    missing, a value of the wrong type, an optimizer of another shape) is one :class:`TrainingError` naming the
    file, not whatever the restoring code raised."""
    try:
        yield
    except PeftkitError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise TrainingError(
            f"cannot resume: {path} does not hold the loop state this peftkit writes ({type(exc).__name__}: "
            f"{str(exc)[:200]}); it is damaged or from an incompatible version. Start a new run (another output.dir, "
            "or --overwrite without --resume)"
        ) from None
