"""Recipes: YAML training configurations validated into typed objects in one pass.

A recipe has six sections, each a dataclass in :mod:`.recipe_sections` (every
field with its type, default and range): ``model``, ``method``, ``objective``, ``data``, ``train``,
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
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from peftkit.errors import OptionsError, PeftkitError
from peftkit.options import _short_repr, _type_name, check_value, did_you_mean, value_problem
from peftkit.training._bounded_yaml import MAX_BYTES, MAX_DEPTH, YamlInputError, load_yaml
from peftkit.training.recipe_sections import (
    DEFAULT_LR,
    SECTIONS,
    DataConfig,
    MethodConfig,
    ModelConfig,
    ObjectiveConfig,
    OutputConfig,
    Recipe,
    TrainConfig,
    path_problems,
)

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
        raise RecipeError(source, [f"the recipe must be a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}"])
    for key in raw:
        if key not in SECTIONS:
            problems.append(f"{key} is not a recipe section{did_you_mean(str(key), SECTIONS)}; sections: {', '.join(SECTIONS)}")
    sections = {name: _check_section(name, cls, raw.get(name), problems) for name, cls in SECTIONS.items()}
    method_options = _plugin_options("method", sections["method"], pm, problems)
    objective_options = _plugin_options("objective", sections["objective"], pm, problems)
    output: OutputConfig = sections["output"]
    names = {key: sections[key].name.replace("_", "-") for key in ("method", "objective")}
    output.dir, dir_problems = _expand_output_dir(output.dir, names)
    problems += dir_problems
    data: DataConfig = sections["data"]
    for key in ("train", "eval"):
        value = getattr(data, key)
        if value and value.endswith(_FILE_SUFFIXES) and not path_problems(key, value):  # else reported already
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
