"""Stopping a run whose numbers stop being numbers, before it saves or reports them.

Three checks, each raising :class:`~peftkit.errors.TrainingError` with the step,
what went non-finite, the likely cause and the fix:

* a training loss, before its backward pass (the step never touches the weights);
* the trainable parameters, after every optimizer step and before every save
  (a finite loss can still take a step that overflows the weights, e.g. with a
  huge learning rate);
* a held-out loss.

The run stops where it is, so no new checkpoint or adapter is written and the
last good checkpoint stays as it was.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

from peftkit.errors import TrainingError
from peftkit.training.checkpoint import STATE_FILE

__all__ = ["FiniteGuard"]


class FiniteGuard:
    """The finiteness checks of one run.

    :param checkpoint: the run's ``checkpoint/`` directory (named in the message).
    :param train_config: the recipe's ``train`` section (its ``lr`` and ``max_grad_norm`` are quoted in the fix).
    """

    def __init__(self, checkpoint: Path, train_config: Any):
        self.checkpoint = checkpoint
        self.train_config = train_config

    # ------------------------------------------------------------ checks
    def loss(self, loss: torch.Tensor, step: int) -> None:
        """Refuse a non-finite training loss of optimizer step ``step`` (1-based) before it is back-propagated."""
        if torch.isfinite(loss.detach()).all():
            return
        self._fail(f"the loss became {float(loss.detach())} at step {step}; training stopped before this step changed the adapter")

    def parameters(self, named_parameters: Sequence[tuple[str, torch.Tensor]], step: int) -> None:
        """Refuse trainable parameters holding NaN/inf after optimizer step ``step``."""
        tensors = [p.detach() for _, p in named_parameters]
        if not tensors:
            return
        # One fused pass and one device sync: a finite norm means every element is finite.
        norms = torch._foreach_norm(tensors)
        if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
            return
        # A norm can also overflow on huge but finite values; name only the tensors that really hold NaN/inf.
        bad = [name for (name, _), t in zip(named_parameters, tensors) if not bool(torch.isfinite(t).all())]
        if not bad:
            return
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        self._fail(f"the adapter became non-finite (NaN/inf) in the optimizer update of step {step}: {shown}")

    def eval_loss(self, value: float | None, step: int) -> None:
        """Refuse a non-finite held-out loss measured after ``step`` optimizer steps (0: before training)."""
        if value is None or math.isfinite(value):
            return
        if step == 0:
            self._fail(
                f"the held-out loss is {value} before any training step, so the learning rate is not the cause: the "
                "model itself gives non-finite outputs",
                fix="use model.dtype: float32 (or bfloat16) and train.mixed_precision: no, and check the base model",
            )
        self._fail(f"the held-out loss became {value} after step {step}")

    # ------------------------------------------------------------ message
    def _fail(self, what: str, *, fix: str | None = None) -> None:
        cfg = self.train_config
        if fix is None:
            clip = "set train.max_grad_norm (e.g. 1.0)" if cfg.max_grad_norm is None else f"lower train.max_grad_norm (it is {cfg.max_grad_norm})"
            fix = (
                f"the learning rate is the usual cause: lower train.lr (it is {cfg.lr}), {clip}, or use "
                "train.mixed_precision: no / model.dtype: float32"
            )
        kept = f"the last good checkpoint at {self.checkpoint} is intact" if (self.checkpoint / STATE_FILE).is_file() else "no checkpoint was written yet"
        raise TrainingError(f"{what}. Nothing was saved: {kept}. Fix: {fix}.")
