"""The recipe's sections: one dataclass per section, every field with its type, default and range.

``model``, ``method``, ``objective``, ``data``, ``train`` and ``output``; each
section's ``validate()`` returns its range problems (key path, value, what is
allowed). :mod:`peftkit.training.recipe` reads YAML into them and reports every
problem at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from peftkit.options import _short_repr
from peftkit.training.models import load_kwargs_problem
from peftkit.training.tracking import report_to_problems

__all__ = [
    "ModelConfig",
    "MethodConfig",
    "ObjectiveConfig",
    "DataConfig",
    "TrainConfig",
    "OutputConfig",
    "Recipe",
    "SECTIONS",
    "DEFAULT_LR",
    "path_problems",
]


#: Largest meaningful counts. A billion optimizer steps (or log/save/eval intervals) is past any run;
#: 2**20 examples per batch past any accelerator; 2**24 tokens per example past any model's context
#: window (the longest, 10M); a million epochs past any dataset. Larger values can only overflow or
#: hang later, so the recipe refuses them.
MAX_STEPS = 10**9
MAX_SIZE = 2**20
MAX_TOKENS = 2**24
MAX_EPOCHS = 10**6
#: Seeds go to numpy, whose seeds are 32-bit unsigned.
MAX_SEED = 2**32 - 1
#: With AdamW, a step moves each weight by about ``lr``; above 1 no PEFT method trains (the highest
#: published rates are prompt tuning's ~0.3). weight_decay <= 1 keeps the decay factor 1 - lr * wd in [0, 1).
MAX_LR = 1.0
MAX_WEIGHT_DECAY = 1.0
def _too_large(key: str, value: float | None, limit: float, why: str) -> list[str]:
    """The problem of a value above its upper bound (``None``: unset, fine)."""
    if value is None or value <= limit:
        return []
    shown = limit if isinstance(limit, int) else f"{limit:g}"
    return [f"{key} = {value!r} is too large: must be <= {shown} ({why})"]


def _empty(key: str, value: str, fix: str) -> list[str]:
    """The problem of a required text left empty or blank."""
    return [] if value.strip() else [f"{key} = {value!r} is empty; {fix}"]


#: File-system limits on a path and on each of its parts (Linux, macOS and NTFS alike).
MAX_PATH_BYTES, MAX_NAME_BYTES = 4096, 255


def path_problems(key: str, value: str | None) -> list[str]:
    """The problems of a path no file system can hold, found before anything touches the disk."""
    if value is None:
        return []
    if len(value.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return [f"{key} = {_short_repr(value)} is longer than {MAX_PATH_BYTES} bytes, the file-system limit for a path"]
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in Path(value).parts):
        return [f"{key} = {_short_repr(value)} has a part longer than {MAX_NAME_BYTES} bytes, the file-system limit for a name"]
    try:
        Path(value).expanduser()
    except RuntimeError:
        return [f"{key} = {_short_repr(value)} starts with ~user for a user this machine does not know; give the full path"]
    return []


@dataclass
class ModelConfig:
    """``model``: the frozen base model."""

    name_or_path: str = "smollm2-135m-instruct"  # an alias (peftkit.training.models.EMBEDDED_MODELS), a folder or a hub id
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    # extra from_pretrained keywords, checked by peftkit.training.models.load_kwargs_problem
    load_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> list[str]:
        problems = _empty("model.name_or_path", self.name_or_path, "give a model alias, a folder or a hub id")
        problems += path_problems("model.name_or_path", self.name_or_path)
        for key, value in self.load_kwargs.items():
            problem = load_kwargs_problem(key, value)
            if problem:
                problems.append(f"model.load_kwargs.{key} = {_short_repr(value)} {problem}")
        return problems


@dataclass
class MethodConfig:
    """``method``: the PEFT method and its options (validated by the method's plugin)."""

    name: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)
    # modules the adapter also trains as full copies, with any method (["lm_head"], ["score"]); checked against
    # the model when the adapter is made (peftkit.modules_to_save)
    modules_to_save: list[str] | None = None

    def validate(self) -> list[str]:
        if self.modules_to_save is not None and (not self.modules_to_save or not all(n.strip() for n in self.modules_to_save)):
            return [f"method.modules_to_save = {self.modules_to_save!r} must list module names such as [lm_head], or be left out"]
        return []


@dataclass
class ObjectiveConfig:
    """``objective``: the training objective and its options (validated by the objective's plugin)."""

    name: str = "sft"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    """``data``: where examples come from and how long they may be."""

    train: str = ""  # a local .jsonl/.json/.csv/.parquet file, or a dataset name ("name" or "name:split")
    eval: str | None = None  # held-out file/dataset; None: hold out eval_size records of train
    eval_size: int = 200
    max_length: int = 512  # tokens per example (8..MAX_TOKENS); longer ones are cut at the end
    max_train_samples: int | None = None  # use only the first N training records (after the split)
    seed: int = 0  # shuffles records before the held-out split; 0..MAX_SEED

    def validate(self) -> list[str]:
        problems = []
        if not self.train.strip():
            problems.append("data.train is required: a .jsonl/.json/.csv/.parquet file or a dataset name")
        problems += path_problems("data.train", self.train) + path_problems("data.eval", self.eval)
        if self.eval_size < 0:
            problems.append(f"data.eval_size = {self.eval_size!r} must be >= 0")
        if self.max_length < 8:
            problems.append(f"data.max_length = {self.max_length!r} must be >= 8")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            problems.append(f"data.max_train_samples = {self.max_train_samples!r} must be >= 1 or null")
        problems += _too_large("data.max_length", self.max_length, MAX_TOKENS, "tokens per example, past any model's context window")
        problems += _seed_problems("data.seed", self.seed)
        return problems


def _seed_problems(key: str, seed: int) -> list[str]:
    if 0 <= seed <= MAX_SEED:
        return []
    return [f"{key} = {seed!r} must be in [0, {MAX_SEED}] (2**32 - 1, numpy's seed range); e.g. 0"]


#: The learning rate of ``train.lr: auto`` for a method that recommends none.
DEFAULT_LR = 2e-4


@dataclass
class TrainConfig:
    """``train``: the optimisation loop. Every count is bounded above (MAX_STEPS, MAX_SIZE, MAX_EPOCHS)."""

    max_steps: int | None = None  # optimizer steps; None: run `epochs` epochs
    epochs: float = 1.0  # (0, MAX_EPOCHS]
    batch_size: int = 8  # examples per micro-batch, per process
    gradient_accumulation_steps: int = 1
    lr: float | Literal["auto"] = "auto"  # (0, MAX_LR]; auto: the method's recommended_lr (DEFAULT_LR if it has none)
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0  # [0, MAX_WEIGHT_DECAY]
    max_grad_norm: float | None = 1.0  # None: no clipping
    seed: int = 0  # 0..MAX_SEED
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    eval_batch_size: int | None = None  # None: batch_size
    cpu: bool = False  # force the CPU even when an accelerator is present
    # several processes (torchrun/accelerate launch): auto and ddp replicate the model (DDP); fsdp shards the base
    # and the adapter per decoder layer with torch FSDP2 (peftkit.training.distributed). One process: no effect
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"

    def validate(self) -> list[str]:
        problems = []
        for key in ("batch_size", "gradient_accumulation_steps"):
            if getattr(self, key) < 1:
                problems.append(f"train.{key} = {getattr(self, key)!r} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"train.max_steps = {self.max_steps!r} must be >= 1 or null")
        if self.max_steps is None and self.epochs <= 0:
            problems.append(f"train.epochs = {self.epochs!r} must be > 0 when train.max_steps is null")
        if self.lr != "auto" and self.lr <= 0:
            problems.append(f"train.lr = {self.lr!r} must be > 0 or auto")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            problems.append("train.warmup_steps and train.weight_decay must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            problems.append(f"train.max_grad_norm = {self.max_grad_norm!r} must be > 0 or null")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            problems.append(f"train.eval_batch_size = {self.eval_batch_size!r} must be >= 1 or null")
        for key in ("max_steps", "warmup_steps"):
            problems += _too_large(f"train.{key}", getattr(self, key), MAX_STEPS, "optimizer steps")
        for key in ("batch_size", "gradient_accumulation_steps", "eval_batch_size"):
            problems += _too_large(f"train.{key}", getattr(self, key), MAX_SIZE, "examples")
        problems += _too_large("train.epochs", self.epochs, MAX_EPOCHS, "passes over the data")
        if self.lr != "auto":
            problems += _too_large("train.lr", self.lr, MAX_LR, "AdamW moves each weight by about lr per step; use auto for the method's rate")
        problems += _too_large("train.weight_decay", self.weight_decay, MAX_WEIGHT_DECAY, "decoupled decay removes lr * weight_decay of each weight per step")
        problems += _seed_problems("train.seed", self.seed)
        return problems


@dataclass
class OutputConfig:
    """``output``: where results go and how often things happen."""

    # adapter/, checkpoint/, metrics.jsonl, loss_curve.png, recipe.yaml. {method} and {objective} are replaced
    # by method.name and objective.name (after overrides), "_" written "-" as in the recipe file names
    # (prompt_tuning -> runs/sft-prompt-tuning), so a one-line method swap keeps both runs
    dir: str = "runs/{objective}-{method}"
    save_every: int = 0  # checkpoint every N steps (0: only at the end); <= MAX_STEPS, as the two below
    log_every: int = 10  # metrics.jsonl line + progress-bar update every N steps
    eval_every: int = 0  # held-out loss every N steps (0: only before and after training)
    plot: bool = True  # write loss_curve.png at the end
    # experiment trackers through accelerate (peftkit.training.tracking): tensorboard, wandb, mlflow, comet_ml, aim,
    # clearml, dvclive, swanlab, trackio; every logged metric and the recipe as hyperparameters; files under
    # <dir>/tracking/. [] (the default): none
    report_to: list[str] = field(default_factory=list)

    def validate(self) -> list[str]:
        problems = _empty("output.dir", self.dir, "give a folder such as runs/{objective}-{method} (an empty one would write into the working directory)")
        problems += path_problems("output.dir", self.dir)
        for key in ("save_every", "eval_every"):
            if getattr(self, key) < 0:
                problems.append(f"output.{key} = {getattr(self, key)!r} must be >= 0")
        if self.log_every < 1:
            problems.append(f"output.log_every = {self.log_every!r} must be >= 1")
        for key in ("save_every", "log_every", "eval_every"):
            problems += _too_large(f"output.{key}", getattr(self, key), MAX_STEPS, "steps")
        problems += report_to_problems(self.report_to)
        return problems


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "method": MethodConfig,
    "objective": ObjectiveConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "output": OutputConfig,
}


@dataclass
class Recipe:
    """A validated recipe: the six sections plus the method's and objective's options objects."""

    model: ModelConfig
    method: MethodConfig
    objective: ObjectiveConfig
    data: DataConfig
    train: TrainConfig
    output: OutputConfig
    method_options: Any = None
    objective_options: Any = None
    source: str = "<dict>"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what a YAML file would hold)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
