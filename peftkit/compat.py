"""The one place that knows how transformers names the key/value cache.

transformers 5.24 renamed the forward argument and output field
``past_key_values`` to ``cache`` (the old keyword is still accepted, with a
deprecation warning, until 5.40). Plugins that read or fill the cache from a
forward hook see whichever name the caller used, so they go through these
helpers instead of spelling either name.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

__all__ = ["CACHE_NAMES", "cache_argument", "find_cache", "pop_cache", "output_cache_field"]

#: Every name the KV cache has had, newest first.
CACHE_NAMES = ("cache", "past_key_values")


def cache_argument(forward: Callable[..., Any]) -> str | None:
    """The name under which ``forward`` takes the KV cache (``None`` if it takes none)."""
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_NAMES if name in parameters), None)


def find_cache(arguments: dict[str, Any]) -> Any:
    """The cache in a forward's keyword ``arguments`` under any of its names (``None`` if there is none)."""
    return next((arguments[name] for name in CACHE_NAMES if arguments.get(name) is not None), None)


def pop_cache(arguments: dict[str, Any]) -> Any:
    """Remove the cache from a forward's keyword ``arguments`` under any of its names and return it (or ``None``)."""
    found = None
    for name in CACHE_NAMES:
        value = arguments.pop(name, None)
        if found is None:
            found = value
    return found


def output_cache_field(output: Any) -> str | None:
    """The field of a model output that holds the cache (``None`` if it has none)."""
    fields = getattr(output, "__dataclass_fields__", None) or {}
    return next((name for name in CACHE_NAMES if name in fields), None)
