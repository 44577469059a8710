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
``output.dir`` may name the method and objective (``runs/sft-{method}``); the
placeholders are filled in after the overrides (``_`` written ``-``), so that
swap writes to ``runs/sft-ia3`` and keeps the LoRA run.

Parsing is bounded (file size, alias expansion, nesting depth) and refuses
duplicate keys and non-UTF-8 bytes; see :mod:`peftkit.training._bounded_yaml`.
Every field also passes :func:`peftkit.options.value_problem` (no NaN/inf, no
integer past 64 bits, no NUL character) and the range of its section below.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import string
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from peftkit.errors import OptionsError, PeftkitError
from peftkit.options import _short_repr, _type_name, check_value, did_you_mean, value_problem
from peftkit.training._bounded_yaml import MAX_BYTES, MAX_DEPTH, YamlInputError, load_yaml
from peftkit.training.models import load_kwargs_problem

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


def _path_problems(key: str, value: str | None) -> list[str]:
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
        problems += _path_problems("model.name_or_path", self.name_or_path)
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
        problems += _path_problems("data.train", self.train) + _path_problems("data.eval", self.eval)
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

    def validate(self) -> list[str]:
        problems = _empty("output.dir", self.dir, "give a folder such as runs/{objective}-{method} (an empty one would write into the working directory)")
        problems += _path_problems("output.dir", self.dir)
        for key in ("save_every", "eval_every"):
            if getattr(self, key) < 0:
                problems.append(f"output.{key} = {getattr(self, key)!r} must be >= 0")
        if self.log_every < 1:
            problems.append(f"output.log_every = {self.log_every!r} must be >= 1")
        for key in ("save_every", "log_every", "eval_every"):
            problems += _too_large(f"output.{key}", getattr(self, key), MAX_STEPS, "steps")
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


# ---------------------------------------------------------------- overrides
def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Apply ``key.path=value`` overrides (values parsed as YAML, within the bounds of a recipe file) to a copy of ``raw``.

    :returns: ``(new raw dict, problems, notes)``.
    """
    raw = copy.deepcopy(raw)
    problems, notes = [], []
    parsed: list[tuple[list[str], Any]] = []
    for item in overrides:
        key, sep, text = item.partition("=")
        path = key.strip().split(".")
        shown = _short_repr(item)
        if not sep or not all(part.strip() for part in path):
            problems.append(f"override {shown} is not of the form key.path=value (e.g. train.max_steps=20)")
            continue
        if len(path) > MAX_DEPTH:
            problems.append(f"override {shown}: the key path has {len(path)} parts; recipes nest at most {MAX_DEPTH} levels")
            continue
        try:
            value = load_yaml(text, f"the value of override {key.strip()}") if text.strip() else ""
        except YamlInputError as exc:
            problems.extend(f"override {shown}: {p}" for p in exc.problems)
            continue
        except yaml.YAMLError as exc:
            problems.append(f"override {shown}: the value is not valid YAML ({exc})")
            continue
        parsed.append((path, value))
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
        problems.append(f"{name} = {_short_repr(values)} must be a mapping of keys ({', '.join(f.name for f in dataclasses.fields(cls))})")
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
            problems.append(f"{name}.{key} = {_short_repr(value)} is not valid; expected {_type_name(tp)}")
            continue
        problem = None if isinstance(value, dict) else value_problem(value)  # mappings: checked per entry, by their owner
        if problem is not None:
            problems.append(f"{name}.{key} = {_short_repr(value)} {problem}")
            continue
        if isinstance(value, int) and not isinstance(value, bool) and (tp is float or float in typing.get_args(tp)):
            value = float(value)
        kwargs[key] = value
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        problems.extend(validate())
    return instance


def _plugin_options(kind: str, section: Any, pm: Any, problems: list[str]) -> Any:
    from peftkit.options import build_options

    registry = pm.injectors() if kind == "method" else pm.objectives()
    if section.name not in registry:
        reason = pm.unavailable_reason(kind, section.name)  # a plugin meant to provide it but failed or collided
        if reason is not None:
            problems.append(f"{kind}.name = {_short_repr(section.name)}: {reason}")
            return None
        available = ", ".join(sorted(registry)) or "(none installed)"
        problems.append(f"{kind}.name = {_short_repr(section.name)} is not an installed {kind}{did_you_mean(section.name, registry)}; available: {available}")
        return None
    try:
        return build_options(registry[section.name].obj.options, section.options, owner=f"{kind} {section.name!r}")
    except OptionsError as exc:
        problems.extend(f"{kind}.options ({kind} {section.name!r}): {p}" for p in exc.problems)
        return None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, RuntimeError):  # a name too long, a folder we may not search, ~user unknown: no file to read
        return False


def resolve_data_path(value: str, base_dirs: Sequence[Path]) -> str:
    """A data file as given if it exists from the working directory, else relative to ``base_dirs``."""
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~user for an unknown user: reported by DataConfig.validate
        return value
    if path.is_absolute() or _is_file(path):
        return str(path)
    for base in base_dirs:
        if _is_file(base / path):
            return str(base / path)
    return value


_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _expand_output_dir(template: str, names: Mapping[str, str]) -> tuple[str, list[str]]:
    """``output.dir`` with ``{method}``/``{objective}`` filled in from ``names``: ``(dir, problems)``."""
    allowed = ", ".join(f"{{{n}}}" for n in names)
    fix = f"the placeholders are {allowed}; write {{{{ and }}}} for a literal brace"
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:  # a single { or }
        return template, [f"output.dir = {_short_repr(template)} has a stray brace ({exc}); {fix}"]
    bad = [(name, spec, conv) for name, spec, conv in fields if name not in names or spec or conv]
    if bad:
        name, spec, conv = bad[0]
        shown = "{" + name + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        hint = did_you_mean(name, names) if name not in names else " (placeholders take no conversion or format)"
        return template, [f"output.dir = {_short_repr(template)} has unknown placeholder {shown}{hint}; {fix}"]
    return template.format(**names), []


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
    method_options = _plugin_options("method", sections["method"], pm, problems)
    objective_options = _plugin_options("objective", sections["objective"], pm, problems)
    output: OutputConfig = sections["output"]
    names = {key: sections[key].name.replace("_", "-") for key in ("method", "objective")}
    output.dir, dir_problems = _expand_output_dir(output.dir, names)
    problems += dir_problems
    data: DataConfig = sections["data"]
    for key in ("train", "eval"):
        value = getattr(data, key)
        if value and value.endswith(_FILE_SUFFIXES) and not _path_problems(key, value):  # else reported already
            resolved = resolve_data_path(value, base_dirs)
            if not _is_file(Path(resolved)):
                problems.append(f"data.{key} = {_short_repr(value)}: no such file (relative paths are read from the working directory, then next to the recipe)")
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
        with path.open("rb") as file:
            data = file.read(MAX_BYTES + 1)  # one byte more than allowed is enough to refuse it
        raw = load_yaml(data, str(path))
    except OSError as exc:
        raise RecipeError(str(path), [f"cannot read the recipe: {exc.strerror or exc}"]) from None
    except YamlInputError as exc:
        raise RecipeError(str(path), exc.problems) from None
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), [f"not valid YAML: {exc}"]) from None
    raw = {} if raw is None else raw
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
