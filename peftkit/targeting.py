"""Module targeting shared by every method: suffix lists, full-match regexes, ``"all-linear"``.

A target specification is one of:

* a list of module-name suffixes (``["q_proj", "v_proj"]`` matches
  ``model.layers.3.self_attn.q_proj``; a suffix matches at a ``.`` boundary);
* a string, read as a regular expression that must match the *whole* module
  name (``r".*\\.(q|v)_proj"``);
* ``"all-linear"``: every Linear-like layer except the output head.

``layers`` optionally restricts matches to modules whose first integer path
component (the block index in ``model.layers.<i>.``) is in the given set.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from torch import nn

from peftkit.errors import TargetError

__all__ = ["TargetSpec", "find_targets", "is_linear_like", "innermost_base", "layer_index", "pattern_key", "ALL_LINEAR"]

ALL_LINEAR = "all-linear"
TargetSpec = str | Sequence[str]

# Linear-like layer classes known by name, so that optional libraries
# (transformers' Conv1D, bitsandbytes) never need importing here.
_LINEAR_CLASS_NAMES = {"Linear", "Conv1D", "Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4"}


def innermost_base(module: nn.Module) -> nn.Module:
    """Follow ``base_layer`` attributes down to the original layer."""
    seen = 0
    while isinstance(getattr(module, "base_layer", None), nn.Module) and seen < 64:
        module = module.base_layer
        seen += 1
    return module


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear``, GPT-2's ``Conv1D`` and quantized linears (seen through adapter wrappers)."""
    base = innermost_base(module)
    return isinstance(base, nn.Linear) or type(base).__name__ in _LINEAR_CLASS_NAMES


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first key of ``patterns`` that names module ``name``, or ``None``.

    The rule of peft's ``get_pattern_key`` (so per-module options such as LoRA's
    ``rank_pattern`` mean the same in both libraries): a key matches when
    ``re.match(rf"(.*\\.)?({key})$", name)`` does, i.e. it is a suffix of the
    name at a ``.`` boundary, or a regex matching such a suffix.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The first integer component of a module path (``model.layers.3.mlp`` -> 3)."""
    m = _INDEX.search(name)
    return int(m.group(1)) if m else None


def _output_head_names(model: nn.Module) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and (module is out or innermost_base(module) is out):
            heads.add(name)
        elif name.split(".")[-1] in {"lm_head", "score", "classifier"}:
            heads.add(name)
    return heads


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Module names eligible as targets: not inside an adapter wrapper's own children."""
    out = []
    wrapped_children: set[str] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in wrapped_children):
            continue
        if isinstance(getattr(module, "base_layer", None), nn.Module):
            wrapped_children.add(name)
        out.append((name, module))
    return out


def find_targets(
    model: nn.Module,
    target_modules: TargetSpec,
    *,
    layers: int | Iterable[int] | None = None,
    linear_only: bool = True,
    option: str = "target_modules",
) -> list[tuple[str, nn.Module]]:
    """Resolve a target specification to ``(name, module)`` pairs, in model order.

    :param model: the (base) model to search.
    :param target_modules: suffix list, full-match regex string, or ``"all-linear"``.
    :param layers: restrict to these block indices (an int or an iterable).
    :param linear_only: only accept Linear-like layers (see :func:`is_linear_like`).
    :param option: the option name to use in error messages.
    :raises TargetError: when nothing matches; the message lists candidate names.
    """
    candidates = _candidates(model)
    if isinstance(target_modules, str) and target_modules == ALL_LINEAR:
        heads = _output_head_names(model)
        matched = [(n, m) for n, m in candidates if is_linear_like(m) and n not in heads]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise TargetError(f"{option}={target_modules!r} is not a valid regular expression: {exc}") from None
        matched = [(n, m) for n, m in candidates if pattern.fullmatch(n)]
    else:
        suffixes = list(target_modules)
        matched = [(n, m) for n, m in candidates if any(n == s or n.endswith("." + s) for s in suffixes)]
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        matched = [(n, m) for n, m in matched if layer_index(n) in wanted]
    if linear_only:
        wrong = [(n, type(innermost_base(m)).__name__) for n, m in matched if not is_linear_like(m)]
        if wrong:
            listing = ", ".join(f"{n} ({t})" for n, t in wrong[:8])
            raise TargetError(
                f"{option}={target_modules!r} matched modules that are not Linear-like: {listing}; "
                "target Linear, Conv1D or quantized linear layers only"
            )
    if not matched:
        names = sorted(
            {
                n.split(".")[-1]
                for n, m in candidates
                if is_linear_like(m) or (not linear_only and not n.split(".")[-1].isdigit())
            }
        )
        extra = f" in layers {sorted(wanted)}" if layers is not None else ""
        raise TargetError(
            f"{option}={target_modules!r} matches no module of {type(model).__name__}{extra}; "
            f"candidate module names: {', '.join(names)}"
        )
    return matched
