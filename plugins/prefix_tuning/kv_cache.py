"""The prefix-tuning mechanism: put the prefixes in the KV cache the decoder is about to use.

Before each forward of the decoder backbone, :func:`add_prefix_to_inputs`
rewrites three of its arguments so that the prefixes look like ``P`` tokens
the model has already processed:

* ``past_key_values``: a ``DynamicCache`` whose first ``P`` entries in every
  layer are the prefix keys/values (a new cache when none is given; an empty
  one, as ``generate()`` passes on its first step, is filled in place; one
  filled earlier is used as is; a cache made for a ``use_cache=False`` call is
  removed from the output by :func:`drop_unrequested_cache`);
* ``attention_mask`` (2-D, for the caller's tokens): ``P`` ones prepended, so
  every query, padded rows included, may attend to the prefix;
* ``position_ids`` (when given): shifted by ``P``; when absent the model
  derives them from the cache length, which already counts the prefix.

Everything else (causal masks for every attention backend, RoPE, grouped-query
head repetition) is then done by the model itself, exactly as when it
continues from a cache, which is what every decoder must support for
``generate()``.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

from peftkit.compat import output_cache_field
from peftkit.errors import AdapterError

__all__ = ["add_prefix_to_inputs", "drop_unrequested_cache", "prefix_owner"]

# Caches we filled, and with whose prefix: a cache is re-used across generate() steps
# (and by users continuing from a returned cache) and must not get the prefix twice.
_FILLED: "weakref.WeakKeyDictionary[Any, tuple[tuple[str, int], int]]" = weakref.WeakKeyDictionary()
# Caches made only to carry the prefix through a call with use_cache=False: the caller
# must not get them back (generate() would feed them into its next full-length step).
_UNREQUESTED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def prefix_owner(cache: Any) -> tuple[tuple[str, int], int] | None:
    """``(owner, P)`` if ``cache`` holds a prefix put there by :func:`add_prefix_to_inputs`, else ``None``."""
    if cache is None:
        return None
    try:
        return _FILLED.get(cache)
    except TypeError:  # not weak-referenceable: not one of ours
        return None


def _batch_and_length(arguments: dict[str, Any]) -> tuple[int, int, torch.device]:
    for key in ("input_ids", "inputs_embeds"):
        value = arguments.get(key)
        if value is not None:
            return int(value.shape[0]), int(value.shape[1]), value.device
    raise AdapterError("prefix_tuning: the model was called with neither input_ids nor inputs_embeds")


def add_prefix_to_inputs(
    arguments: dict[str, Any],
    *,
    cache_name: str,
    owner: tuple[str, int],
    num_virtual_tokens: int,
    prefix: Callable[[], torch.Tensor],
    config: Any,
    dtype: torch.dtype,
) -> None:
    """Rewrite a backbone call's ``arguments`` (in place) so the model sees the prefixes as cached tokens.

    :param arguments: the bound arguments of the backbone's forward.
    :param cache_name: the name the backbone takes the cache under (``cache`` or ``past_key_values``).
    :param owner: ``(adapter name, id of the module holding it)``, checked when a filled cache comes back.
    :param num_virtual_tokens: ``P``.
    :param prefix: returns the ``(L, 2, H_kv, P, D)`` prefixes (called only when a cache is filled).
    :param config: the model config (for the ``DynamicCache`` layer types).
    :param dtype: the dtype keys/values are computed in.
    :raises AdapterError: for a cache that is not a ``DynamicCache``, that holds
        tokens without (or with another adapter's) prefix, or a mask that is not
        2-D ``(batch, past + tokens)``.
    """
    from transformers import DynamicCache

    batch, length, device = _batch_and_length(arguments)
    P = num_virtual_tokens
    cache = arguments.get(cache_name)

    if cache is None:
        cache = DynamicCache(config=config)
        arguments[cache_name] = cache
        use_cache = arguments.get("use_cache")
        if not (use_cache if use_cache is not None else getattr(config, "use_cache", True)):
            _UNREQUESTED.add(cache)
    filled_by = prefix_owner(cache)
    if filled_by is not None:
        if filled_by != (owner, P):
            raise AdapterError(
                f"past_key_values holds the prefix of adapter {filled_by[0][0]!r}, but adapter {owner[0]!r} is active; "
                "start a new cache (or none) after switching adapters"
            )
        past = cache.get_seq_length() - P
    else:
        if not isinstance(cache, DynamicCache):
            raise AdapterError(
                f"prefix_tuning fills the KV cache with its prefixes and supports DynamicCache, got "
                f"{type(cache).__name__}; pass a DynamicCache (generate: cache_implementation='dynamic')"
            )
        if cache.get_seq_length() != 0:
            raise AdapterError(
                f"past_key_values already holds {cache.get_seq_length()} tokens computed without the prefix of "
                f"adapter {owner[0]!r}; pass an empty cache (or none), or one returned while {owner[0]!r} was active"
            )
        prefixes = prefix().to(device=device, dtype=dtype)  # (L, 2, H_kv, P, D)
        for layer_idx in range(prefixes.shape[0]):
            keys = prefixes[layer_idx, 0].unsqueeze(0).expand(batch, -1, -1, -1)  # (B, H_kv, P, D)
            values = prefixes[layer_idx, 1].unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(keys, values, layer_idx)
        _FILLED[cache] = (owner, P)
        past = 0

    mask = arguments.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise AdapterError(
                f"prefix_tuning takes a 2-D attention_mask (batch, past + new tokens), got {shape}; "
                "pass the padding mask of your tokens and let the model build the causal mask"
            )
        if mask.shape[1] != past + length:
            raise AdapterError(
                f"attention_mask covers {mask.shape[1]} positions but there are {past} cached and {length} new "
                f"tokens (the {P} prefix positions are added by adapter {owner[0]!r}: leave them out of the mask). "
                + _CONTINUATION_HINT
            )
        ones = torch.ones(mask.shape[0], P, dtype=mask.dtype, device=mask.device)
        arguments["attention_mask"] = torch.cat([ones, mask], dim=1)  # (B, P + past + T)

    position_ids = arguments.get("position_ids")
    if position_ids is not None:
        # Without padding, positions derived from a mask continue the cache; anything else means the
        # caller counted the prefix as its own tokens (generate() restarting from a prefixed cache).
        if mask is None and past > 0 and bool((position_ids[..., 0] != past).any()):
            raise AdapterError(
                f"{length} new tokens start at position {int(position_ids[..., 0].min())}, but {past} tokens are "
                f"already cached after the {P}-token prefix of adapter {owner[0]!r}. " + _CONTINUATION_HINT
            )
        arguments["position_ids"] = position_ids + P


_CONTINUATION_HINT = (
    "If this comes from generate(past_key_values=...): generate() cannot restart from a cache that holds a "
    "prefix (it takes the prefix for prompt tokens already processed and skips as many of yours); pass the "
    "whole prompt to generate() without past_key_values"
)


def drop_unrequested_cache(output: Any) -> Any:
    """``output`` without its cache if that cache was only made to carry the prefix (``use_cache=False``)."""
    field = output_cache_field(output)
    cache = None if field is None else output.get(field)
    if cache is None or cache not in _UNREQUESTED:
        return output
    # ModelOutput forbids deleting keys and keeps None-valued ones out of its tuple form: rebuild it.
    return type(output)(**{key: value for key, value in output.items() if key != field})
