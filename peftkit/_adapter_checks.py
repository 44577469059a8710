"""The checks an adapter passes before it is saved and after it is read, so damage is never saved or loaded.

Pure functions over tensors, options and shapes; :class:`peftkit.TunedModel`
raises the errors. None of them names a method: what a method's layers hold
is read from the layers themselves.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from peftkit.errors import AdapterFormatError
from peftkit.injection import layer_shape

__all__ = ["non_finite_tensors", "non_finite_options", "dtype_problem", "shape_problems", "check_fingerprint", "listing"]


def listing(items: list[str], limit: int = 5) -> str:
    """``"a; b; c and 7 more"``: long lists shortened for a one-line message."""
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """``"key (3 NaN, 1 inf of 64 values)"`` for every floating-point tensor holding NaN or inf."""
    found = []
    for key, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        tensor = tensor.detach()
        if bool(torch.isfinite(tensor).all()):
            continue
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        found.append(f"{key} ({nan} NaN, {inf} inf of {tensor.numel()} values)")
    return found


def non_finite_options(options: Any, prefix: str = "") -> list[str]:
    """``"alpha = nan"`` for every NaN/inf number in a JSON-like options value, nested ones included."""
    if isinstance(options, float):
        return [] if math.isfinite(options) else [f"{prefix or 'value'} = {options}"]
    if isinstance(options, Mapping):
        return [p for k, v in options.items() for p in non_finite_options(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(options, (list, tuple)):
        return [p for i, v in enumerate(options) for p in non_finite_options(v, f"{prefix}[{i}]")]
    return []


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "boolean"
    if dtype.is_complex:
        return "complex"
    return "floating-point" if dtype.is_floating_point else "integer"


def dtype_problem(key: str, found: torch.dtype, expected: torch.dtype) -> str | None:
    """Why a saved tensor of ``found`` dtype cannot fill a parameter of ``expected`` dtype, or ``None``.

    Float precisions convert (an adapter trained in bfloat16 loads into a
    float32 model); another kind of number (integer, boolean, complex where a
    float is held) means the file is damaged or was not written by this method.
    """
    if _kind(found) == _kind(expected):
        return None
    return f"tensor {key!r} has dtype {found}, but the adapter layer holds {expected} ({_kind(expected)})"


def shape_problems(
    expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, torch.Tensor]
) -> list[str]:
    """``"key: the options make (r, in) = N values, the weights hold (r', in)"`` for every shape that differs."""
    problems = []
    for key, shape in expected.items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            found = tuple(tensors[key].shape)
            problems.append(
                f"tensor {key!r}: the options make shape {shape} ({math.prod(shape):,} values), "
                f"the weights hold {found} ({math.prod(found):,} values)"
            )
    return problems


def check_fingerprint(base_model: nn.Module, source: Any, config: dict[str, Any]) -> None:
    """Refuse an adapter whose recorded target modules are missing or shaped differently in ``base_model``.

    :raises AdapterFormatError: naming the modules and both shapes.
    """
    problems = []
    for module_name, shape in config["base_model"]["targets"].items():
        try:
            module = base_model.get_submodule(module_name)
        except AttributeError:
            problems.append(f"module {module_name!r} does not exist in {type(base_model).__name__}")
            continue
        actual = layer_shape(module)
        if list(shape) != actual:
            problems.append(f"module {module_name!r} has shape {actual}, the adapter expects {list(shape)}")
    if problems:
        saved_cls = config["base_model"].get("class")
        raise AdapterFormatError(
            f"adapter {str(source)!r} was made for another base model ({saved_cls}): "
            + listing(problems)
            + ". Load it onto the model it was trained on."
        )
