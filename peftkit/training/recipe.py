"""Recipes: YAML training configurations validated into typed objects in one pass.

A recipe has six sections, each a dataclass below (every field with its type
and default): ``model``, ``method``, ``objective``, ``data``, ``train``,
``output``. :func:`load_recipe` reads the YAML, applies ``key.path=value``
overrides, and validates everything at once: an invalid recipe raises ONE
:class:`RecipeError` listing every problem with its key path, the value and
what is allowed; unknown keys are errors with a did-you-mean. Method and
objective options are validated by the plugin that owns them (their options
dataclass, through :func:`peftkit.options.build_options`).

Overriding ``method.name`` drops the recipe's ``method.options`` (they belong to
the old method) unless ``method.options.*`` overrides are given too, so
``peftkit train sft-lora.yaml method.name=ia3`` trains IA3 with its defaults.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from peftkit.errors import OptionsError, PeftkitError
from peftkit.options import _type_name, check_value, did_you_mean

__all__ = [
    "RecipeError",
    "ModelConfig",
    "MethodConfig",
    "ObjectiveConfig",
    "DataConfig",
    "TrainConfig",
    "OutputConfig",
    "Recipe",
    "load_recipe",
    "recipe_from_dict",
    "apply_overrides",
    "resolve_data_path",
]


class RecipeError(PeftkitError, ValueError):
    """An invalid recipe; ``problems`` lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid recipe {source} ({len(self.problems)} problem(s)):\n{lines}")


# ----------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """``model``: the frozen base model."""

    name_or_path: str = "smollm2-135m-instruct"  # an alias (peftkit.training.models.EMBEDDED_MODELS), a folder or a hub id
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    load_kwargs: dict[str, Any] = field(default_factory=dict)  # extra from_pretrained keywords


@dataclass
class MethodConfig:
    """``method``: the PEFT method and its options (validated by the method's plugin)."""

    name: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)


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
    max_length: int = 512  # tokens per example; longer ones are cut at the end
    max_train_samples: int | None = None  # use only the first N training records (after the split)
    seed: int = 0  # shuffles records before the held-out split

    def validate(self) -> list[str]:
        problems = []
        if not self.train:
            problems.append("data.train is required: a .jsonl/.json/.csv/.parquet file or a dataset name")
        if self.eval_size < 0:
            problems.append(f"data.eval_size = {self.eval_size!r} must be >= 0")
        if self.max_length < 8:
            problems.append(f"data.max_length = {self.max_length!r} must be >= 8")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            problems.append(f"data.max_train_samples = {self.max_train_samples!r} must be >= 1 or null")
        return problems


#: The learning rate of ``train.lr: auto`` for a method that recommends none.
DEFAULT_LR = 2e-4


@dataclass
class TrainConfig:
    """``train``: the optimisation loop."""

    max_steps: int | None = None  # optimizer steps; None: run `epochs` epochs
    epochs: float = 1.0
    batch_size: int = 8  # examples per micro-batch, per process
    gradient_accumulation_steps: int = 1
    lr: float | Literal["auto"] = "auto"  # auto: the method's recommended_lr (DEFAULT_LR if it has none)
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping
    seed: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    eval_batch_size: int | None = None  # None: batch_size
    cpu: bool = False  # force the CPU even when an accelerator is present

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
        return problems


@dataclass
class OutputConfig:
    """``output``: where results go and how often things happen."""

    dir: str = "runs/sft"  # adapter/, checkpoint/, metrics.jsonl, loss_curve.png, recipe.yaml
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    log_every: int = 10  # metrics.jsonl line + progress-bar update every N steps
    eval_every: int = 0  # held-out loss every N steps (0: only before and after training)
    plot: bool = True  # write loss_curve.png at the end

    def validate(self) -> list[str]:
        problems = []
        for key in ("save_every", "eval_every"):
            if getattr(self, key) < 0:
                problems.append(f"output.{key} = {getattr(self, key)!r} must be >= 0")
        if self.log_every < 1:
            problems.append(f"output.log_every = {self.log_every!r} must be >= 1")
        return problems


_SECTIONS: dict[str, type] = {
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
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}


# ---------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float (YAML 1.2) rather than the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# ---------------------------------------------------------------- overrides
def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a copy of ``raw``.

    :returns: ``(new raw dict, problems, notes)``.
    """
    import copy

    raw = copy.deepcopy(raw)
    problems, notes = [], []
    parsed: list[tuple[list[str], Any]] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} is not of the form key.path=value (e.g. train.max_steps=20)")
            continue
        try:
            value = _yaml_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            problems.append(f"override {item!r}: the value is not valid YAML ({exc})")
            continue
        parsed.append((key.strip().split("."), value))
    old_method = (raw.get("method") or {}).get("name") if isinstance(raw.get("method"), dict) else None
    for path, value in parsed:
        if path == ["method", "name"] and value != old_method and isinstance(raw.get("method"), dict):
            if raw["method"].get("options") and not any(p[:2] == ["method", "options"] for p, _ in parsed):
                notes.append(
                    f"method.name overridden ({old_method!r} -> {value!r}): the recipe's method.options were for "
                    f"{old_method!r} and are dropped; {value!r} uses its defaults (set method.options.KEY=VALUE to change them)"
                )
            raw["method"]["options"] = {}
    for path, value in parsed:
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is {child!r}, not a section")
                break
            node = child
        else:
            node[path[-1]] = value
    return raw, problems, notes


# ----------------------------------------------------------------- validation
def _check_section(name: str, cls: type, values: Any, problems: list[str]) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        problems.append(f"{name} = {values!r} must be a mapping of keys ({', '.join(f.name for f in dataclasses.fields(cls))})")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            problems.append(
                f"{name}.{key} is not a recipe key{did_you_mean(str(key), fields)}; valid keys in {name}: {', '.join(fields)}"
            )
            continue
        tp = hints[key]
        if not check_value(value, tp):
            problems.append(f"{name}.{key} = {value!r} is not valid; expected {_type_name(tp)}")
            continue
        if isinstance(value, int) and not isinstance(value, bool) and (tp is float or float in typing.get_args(tp)):
            value = float(value)
        kwargs[key] = value
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        problems.extend(validate())
    return instance


def _plugin_options(kind: str, section: Any, registry: dict[str, Any], problems: list[str]) -> Any:
    from peftkit.options import build_options

    if section.name not in registry:
        available = ", ".join(sorted(registry)) or "(none installed)"
        problems.append(f"{kind}.name = {section.name!r} is not an installed {kind}{did_you_mean(section.name, registry)}; available: {available}")
        return None
    try:
        return build_options(registry[section.name].obj.options, section.options, owner=f"{kind} {section.name!r}")
    except OptionsError as exc:
        problems.extend(f"{kind}.options ({kind} {section.name!r}): {p}" for p in exc.problems)
        return None


def resolve_data_path(value: str, base_dirs: Sequence[Path]) -> str:
    """A data file as given if it exists from the working directory, else relative to ``base_dirs``."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        return str(path)
    for base in base_dirs:
        if (base / path).exists():
            return str(base / path)
    return value


_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def recipe_from_dict(raw: Any, *, source: str = "<dict>", base_dirs: Sequence[Path] = (), plugin_manager: Any = None) -> Recipe:
    """Validate a recipe given as plain data.

    :param base_dirs: folders to resolve relative data paths against (after the working directory).
    :raises RecipeError: listing every problem at once.
    """
    from peftkit.plugins import plugin_manager as default_manager

    pm = plugin_manager or default_manager()
    problems: list[str] = []
    if not isinstance(raw, Mapping):
        raise RecipeError(source, [f"the recipe must be a mapping of sections ({', '.join(_SECTIONS)}), got {type(raw).__name__}"])
    for key in raw:
        if key not in _SECTIONS:
            problems.append(f"{key} is not a recipe section{did_you_mean(str(key), _SECTIONS)}; sections: {', '.join(_SECTIONS)}")
    sections = {name: _check_section(name, cls, raw.get(name), problems) for name, cls in _SECTIONS.items()}
    method_options = _plugin_options("method", sections["method"], pm.injectors(), problems)
    objective_options = _plugin_options("objective", sections["objective"], pm.objectives(), problems)
    data: DataConfig = sections["data"]
    for key in ("train", "eval"):
        value = getattr(data, key)
        if value and value.endswith(_FILE_SUFFIXES):
            resolved = resolve_data_path(value, base_dirs)
            if not Path(resolved).is_file():
                problems.append(f"data.{key} = {value!r}: no such file (relative paths are read from the working directory, then next to the recipe)")
            setattr(data, key, resolved)
    if problems:
        raise RecipeError(source, problems)
    notes = []
    train: TrainConfig = sections["train"]
    if train.lr == "auto":
        injector = pm.injectors()[sections["method"].name].obj
        train.lr = float(getattr(injector, "recommended_lr", DEFAULT_LR))
        notes.append(f"train.lr: auto -> {train.lr:g} (the recommended learning rate of method {sections['method'].name!r})")
    return Recipe(**sections, method_options=method_options, objective_options=objective_options, source=source, notes=notes)


def load_recipe(path: str | os.PathLike, overrides: Sequence[str] = (), *, plugin_manager: Any = None) -> Recipe:
    """Read, override and validate a recipe file.

    :param path: a YAML file.
    :param overrides: ``key.path=value`` strings; values are parsed as YAML.
    :raises RecipeError: a missing/unparsable file, or every problem of the recipe at once.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), [f"no such recipe file: {str(path)!r} (see `peftkit recipes` for the shipped ones)"])
    try:
        raw = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), [f"not valid YAML: {exc}"]) from None
    raw, problems, notes = apply_overrides(raw, overrides) if isinstance(raw, dict) else (raw, [], [])
    base_dirs = [path.resolve().parent, path.resolve().parent.parent]
    try:
        recipe = recipe_from_dict(raw, source=str(path), base_dirs=base_dirs, plugin_manager=plugin_manager)
    except RecipeError as exc:
        if problems:
            raise RecipeError(str(path), problems + exc.problems) from None
        raise
    if problems:
        raise RecipeError(str(path), problems)
    recipe.notes = notes + recipe.notes
    return recipe
