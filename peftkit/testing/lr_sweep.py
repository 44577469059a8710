"""Measure a method's learning rate: the same short training run at several rates, compared on held-out loss.

What ``recommended_lr`` (the rate a recipe with ``train.lr: auto`` uses) should be
set from. Each rate gets a real run of the trainer
(:class:`peftkit.training.trainer.Trainer`): same recipe, same seed (so the same
adapter initialisation and data order), only ``train.lr`` differs. By default the
runs are supervised fine-tuning of the embedded model (SmolLM2-135M-Instruct, as
``recipes/sft-lora.yaml``) on the arithmetic task set, judged by the held-out loss
after ``steps`` optimizer steps. A rate whose run diverges (the trainer stops it
with a :class:`~peftkit.errors.TrainingError` when a loss or a weight stops being
finite) is recorded as failed and is never the best.

From the command line: ``peftkit tune-lr METHOD [--steps N] [--lrs a,b,c] [key=value ...]``.
"""

from __future__ import annotations

import copy
import functools
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from peftkit.errors import TrainingError

__all__ = ["DEFAULT_LRS", "EMBEDDED_MODEL", "LrRun", "LrSweepResult", "lr_sweep"]

#: A log grid (1-3-10 steps) over the rates PEFT methods are trained with, LoRA's ~1e-4 to prompt tuning's ~1e-1.
DEFAULT_LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
#: The model alias the sweep trains when no model is given (as recipes/sft-lora.yaml).
EMBEDDED_MODEL = "smollm2-135m-instruct"
_ARITHMETIC = ("data/arithmetic/train.jsonl", "data/arithmetic/eval.jsonl")
# The rest of the run is recipes/sft-lora.yaml's, so a measured rate transfers to the shipped recipes.
_TRAIN = {"batch_size": 8, "scheduler": "linear", "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0, "eval_batch_size": 32}
_MAX_LENGTH = 128


@dataclass
class LrRun:
    """One learning rate's run.

    Attributes:
        lr: the peak learning rate.
        eval_loss: held-out loss after the run (``None`` if it failed).
        eval_loss_before: held-out loss before any step (the same for every rate: same seed).
        train_loss: training loss of the last logged steps.
        seconds: wall time of the run, model loading and evaluation included.
        error: why the run failed (the trainer's message), ``None`` if it finished.
    """

    lr: float
    eval_loss: float | None
    eval_loss_before: float | None = None
    train_loss: float | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def failed(self) -> bool:
        """True if the run diverged or ended without a finite held-out loss."""
        return self.error is not None or self.eval_loss is None or not math.isfinite(self.eval_loss)


@dataclass
class LrSweepResult:
    """The runs of one sweep, in the order of the rates given.

    Attributes:
        method: the method swept.
        steps: optimizer steps per run.
        model: what was trained (the embedded model's alias, or the given model's class name).
        runs: one :class:`LrRun` per learning rate.
    """

    method: str
    steps: int
    model: str
    runs: list[LrRun] = field(default_factory=list)

    @property
    def best(self) -> LrRun | None:
        """The run with the lowest finite held-out loss (failed runs never count); ``None`` if every run failed."""
        finished = [run for run in self.runs if not run.failed]
        return min(finished, key=lambda run: run.eval_loss) if finished else None  # type: ignore[arg-type, return-value]

    @property
    def recommended_lr(self) -> float | None:
        """The best run's learning rate (``None`` if every run failed)."""
        best = self.best
        return best.lr if best is not None else None

    @property
    def best_at_edge(self) -> bool:
        """True if the best rate is the smallest or largest tried: the optimum may lie outside the grid."""
        best = self.best
        lrs = [run.lr for run in self.runs]
        return best is not None and len(lrs) > 1 and best.lr in (min(lrs), max(lrs))

    def table(self) -> str:
        """The runs as a text table, best marked with ``*``."""
        best = self.best
        lines = [f"{'lr':>10}  {'held-out loss':>13}  {'before':>8}  {'train loss':>10}  {'seconds':>7}"]
        for run in self.runs:
            mark = "*" if run is best else " "
            if run.failed:
                reason = (run.error or "no finite held-out loss").splitlines()[0]
                lines.append(f"{run.lr:>10.3g}  {'failed':>13}  {_fmt(run.eval_loss_before):>8}  {'':>10}  {run.seconds:>7.1f}  {reason}")
            else:
                lines.append(
                    f"{run.lr:>10.3g}{mark} {_fmt(run.eval_loss):>13}  {_fmt(run.eval_loss_before):>8}  "
                    f"{_fmt(run.train_loss):>10}  {run.seconds:>7.1f}"
                )
        return "\n".join(lines)

    def injector_line(self) -> str:
        """The ``recommended_lr`` line to paste into the injector class, with how it was measured.

        :raises TrainingError: if every run failed (there is nothing to recommend).
        """
        best = self.best
        if best is None:
            raise TrainingError(
                f"every learning rate tried for {self.method!r} failed ({', '.join(f'{r.lr:g}' for r in self.runs)}); "
                "try smaller rates"
            )
        return (
            f"recommended_lr = {best.lr:g}  # train.lr: auto; held-out loss {_fmt(best.eval_loss_before)} -> "
            f"{_fmt(best.eval_loss)} after {self.steps} steps on {self.model} (peftkit tune-lr)"
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _checked_lrs(lrs: Sequence[float] | None) -> list[float]:
    values = list(DEFAULT_LRS if lrs is None else lrs)
    if not values:
        raise ValueError("lr_sweep: lrs is empty; pass at least one learning rate (or None for the default grid)")
    bad = [lr for lr in values if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0]
    if bad:
        raise ValueError(f"lr_sweep: learning rates must be finite numbers > 0, got {bad!r}")
    return [float(lr) for lr in values]


def _data_section(data: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """The recipe's ``data`` section: the arithmetic set by default, a file of records, or a section as given."""
    if isinstance(data, Mapping):
        return dict(data)
    if data is not None:
        return {"train": str(data), "max_length": _MAX_LENGTH}
    checkout = Path(__file__).resolve().parents[2]  # the arithmetic set ships in the repository, not the wheel
    for base in (Path.cwd(), checkout):
        train, evaluation = (base / name for name in _ARITHMETIC)
        if train.is_file() and evaluation.is_file():
            return {"train": str(train), "eval": str(evaluation), "max_length": _MAX_LENGTH}
    from peftkit.training.data import DataError

    raise DataError(
        f"lr_sweep: the arithmetic data set ({_ARITHMETIC[0]}) is not in {Path.cwd()} nor in a peftkit checkout at "
        f"{checkout}; run from a peftkit checkout, or pass data= (a file of prompt/response records, or a recipe "
        "data section)"
    )


@functools.cache
def _sweep_trainer_class() -> type:
    """The trainer, measuring the held-out loss before training once per sweep rather than once per rate.

    Built on first use: importing the training stack (accelerate, ...) is too heavy for ``import peftkit.testing``.
    """
    from peftkit.training.trainer import Trainer

    class SweepTrainer(Trainer):
        """A :class:`Trainer` that shares its step-0 held-out metrics with the other runs of a sweep.

        Every run starts from the same adapter (same seed; the learning rate plays no part before the first
        step), so the first run's numbers are every run's (on the embedded model, 10 steps: runs took 74 s
        with that evaluation, 41-44 s without).
        """

        def __init__(self, *args: Any, before: dict[str, float], **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.before = before

        def evaluate_and_log(self) -> dict[str, float]:
            if self.step == 0 and self.before:
                self.log({"step": 0, **self.before})
                return dict(self.before)
            metrics = super().evaluate_and_log()
            if self.step == 0:
                self.before.update(metrics)
            return metrics

    return SweepTrainer


def lr_sweep(
    method: str,
    lrs: Sequence[float] | None = None,
    *,
    steps: int = 20,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    data: str | Path | Mapping[str, Any] | None = None,
    **options: Any,
) -> LrSweepResult:
    """Train ``method`` for ``steps`` optimizer steps at each learning rate and compare held-out losses.

    :param method: a registered method name.
    :param lrs: peak learning rates to try (default :data:`DEFAULT_LRS`, 1e-4 to 1e-1). Rates above the
        ``train.lr <= 1`` a recipe allows are accepted here, to locate where a method diverges.
    :param steps: optimizer steps per rate (the schedule is recipes/sft-lora.yaml's: linear decay after a
        warm-up of a tenth of the steps).
    :param model: a base model to train instead of the embedded one (copied for each rate; the original is
        left untouched); needs ``tokenizer``.
    :param tokenizer: its tokenizer.
    :param data: the training records: ``None`` for the arithmetic task set (train and eval files of a peftkit
        checkout), a file path (200 records are held out, as a recipe's ``data.eval_size``), or a recipe
        ``data`` section as a mapping.
    :param options: the method's options (as ``peftkit.wrap`` takes them).
    :returns: every rate's held-out loss; ``.best`` is the lowest finite one, ``.injector_line()`` the
        ``recommended_lr`` line to paste into the injector.
    :raises ValueError: for an empty grid, a rate that is not a finite number > 0, or ``steps < 1``.
    :raises RecipeError: if the method, its options or ``data`` are invalid (before anything trains).
    """
    from peftkit.training.recipe import recipe_from_dict

    rates = _checked_lrs(lrs)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"lr_sweep: steps must be a whole number >= 1, got {steps!r}")
    if (model is None) != (tokenizer is None):
        raise ValueError("lr_sweep: pass both model and tokenizer, or neither (then the embedded model is trained)")
    raw: dict[str, Any] = {
        "method": {"name": method, "options": dict(options)},
        "objective": {"name": "sft"},
        "data": _data_section(data),
        "train": {**_TRAIN, "max_steps": steps, "warmup_steps": steps // 10, "lr": "auto"},
        "output": {"save_every": 0, "log_every": steps, "eval_every": 0, "plot": False},
    }
    if model is None:
        raw["model"] = {"name_or_path": EMBEDDED_MODEL, "dtype": "float32"}
    result = LrSweepResult(method=method, steps=steps, model=EMBEDDED_MODEL if model is None else type(model).__name__)
    trainer_class = _sweep_trainer_class()
    before: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="peftkit-lr-sweep-") as tmp:
        for index, lr in enumerate(rates):
            raw["output"]["dir"] = str(Path(tmp) / f"run-{index}")
            recipe = recipe_from_dict(copy.deepcopy(raw), source=f"lr_sweep({method!r})")
            # Set after validation: the sweep may go past the lr <= 1 a recipe allows, to find where it diverges.
            recipe.train.lr = lr
            given = (copy.deepcopy(model), tokenizer) if model is not None else (None, None)
            start = time.perf_counter()
            try:
                trained = trainer_class(recipe, model=given[0], tokenizer=given[1], progress=False, before=before).train()
            except TrainingError as exc:  # diverged: a result of this rate, not a reason to stop the sweep
                seconds = time.perf_counter() - start
                result.runs.append(LrRun(lr=lr, eval_loss=None, eval_loss_before=before.get("eval_loss"), seconds=seconds, error=str(exc)))
                continue
            result.runs.append(
                LrRun(
                    lr=lr,
                    eval_loss=trained.eval_loss_after,
                    eval_loss_before=trained.eval_loss_before,
                    train_loss=trained.train_loss,
                    seconds=time.perf_counter() - start,
                )
            )
    return result
