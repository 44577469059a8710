"""Saving and loading a :class:`~peftkit.TunedModel`'s adapters, so that damage is never saved nor loaded.

Saving refuses NaN/inf tensors before anything is written. Loading checks, in
order: the directory (:func:`peftkit.serialization.read_adapter`: format and
the weights' checksum), the base-model fingerprint, finite tensors and
options, the tensor shapes the options would create (found by rehearsing the
injection on fake tensors, so an edited ``r = 10**12`` is refused before any
allocation), and while filling each layer, the kind of number each tensor
holds. A load that fails at any point leaves the model as it was.

These are ``TunedModel``'s save/load methods, kept apart from its adapter
bookkeeping; ``TunedModel.save``, ``load_adapter`` and
``add_adapter_with_state`` call them.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from peftkit._adapter_checks import (
    check_fingerprint,
    dtype_problem,
    listing,
    non_finite_options,
    non_finite_tensors,
    shape_problems,
)
from peftkit.errors import AdapterError, AdapterFormatError, PeftkitError, UnknownMethodError
from peftkit.options import options_to_dict
from peftkit.serialization import read_adapter, write_adapter

if TYPE_CHECKING:
    from peftkit.tuned_model import TunedModel

__all__ = ["save_adapter", "load_adapter", "add_adapter_with_state"]


def save_adapter(tuned: "TunedModel", path: str | os.PathLike, name: str | None, *, training: bool) -> None:
    """See :meth:`TunedModel.save`."""
    if name is None:
        raise AdapterError("this model has no adapter to save")
    info = tuned.adapter_info(name)
    if name in tuned.merged_adapters:
        raise AdapterError(f"adapter {name!r} is merged; unmerge() before saving it")
    state = tuned.adapter_state_dict(name, training=training)
    damaged = non_finite_tensors(state)
    if damaged:
        raise AdapterError(
            f"adapter {name!r} is not saved to {str(path)!r} (what is there stays as it was): it holds non-finite "
            f"values in {len(damaged)} tensor(s): {listing(damaged)}; training diverged: go back to the last good "
            "checkpoint and lower the learning rate or clip gradients"
        )
    config = {
        "method": info.method,
        "options": options_to_dict(info.options),
        "training_state": training,
        "base_model": {"class": type(tuned.base_model).__name__, "targets": info.targets},
    }
    if info.modules_to_save:
        config["modules_to_save"] = list(info.modules_to_save)
    write_adapter(path, config, state)


def load_adapter(tuned: "TunedModel", path: str | os.PathLike, name: str, *, trainable: bool) -> str:
    """See :meth:`TunedModel.load_adapter`."""
    config, tensors = read_adapter(path)
    method = config["method"]
    try:
        tuned.plugin_manager.get_injector(method)
    except UnknownMethodError as exc:
        raise UnknownMethodError(
            f"adapter {str(path)!r} was made with method {method!r}, which no installed plugin provides ({exc})"
        ) from None
    check_fingerprint(tuned.base_model, path, config)
    add_adapter_with_state(
        tuned, name, method, config["options"], tensors, trainable=trainable, source=path, modules_to_save=config.get("modules_to_save")
    )
    return name


def add_adapter_with_state(
    tuned: "TunedModel",
    name: str,
    method: str,
    options: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    trainable: bool,
    source: Any,
    modules_to_save: list[str] | None = None,
) -> None:
    """See :meth:`TunedModel.add_adapter_with_state`."""
    where = f"adapter {str(source)!r}"
    damaged = non_finite_tensors(tensors)
    if damaged:
        raise AdapterFormatError(
            f"{where} holds non-finite values (NaN/inf) in {len(damaged)} tensor(s): {listing(damaged)}; "
            "a damaged adapter is not loaded: load an earlier copy or checkpoint"
        )
    bad_options = non_finite_options(options)
    if bad_options:
        raise AdapterFormatError(
            f"{where}: adapter_config.json holds non-finite options: {listing(bad_options)}; "
            "options are finite numbers: restore the adapter_config.json saved with these weights"
        )
    injector, opts = tuned._prepare(name, method, options, owner=f"adapter_config.json of {where}")
    mismatched = shape_problems(_rehearsed_shapes(tuned, name, injector, opts, modules_to_save), tensors)
    if mismatched:
        raise AdapterFormatError(
            f"{where}: the options in adapter_config.json do not match the weights in it (nothing was allocated): "
            f"{listing(mismatched)}; the config was edited or damaged: restore the one saved with these weights"
        )
    with tuned._all_or_nothing(name):
        tuned.add_adapter(name, method, trainable=trainable, modules_to_save=modules_to_save, **options)
        _load_state(tuned, name, tensors, source)


def _rehearsed_shapes(
    tuned: "TunedModel", name: str, injector: Any, opts: Any, modules_to_save: list[str] | None = None
) -> dict[str, tuple[int, ...]]:
    """The shapes of the tensors injecting ``name`` would create (both forms), found without allocating them.

    The injection runs on fake tensors (shapes, no storage) and is undone.
    A method whose injection needs real tensor data cannot be rehearsed; it
    gets no shape check here (``{}``), only the one while filling.
    """
    restore = tuned._snapshot()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            tuned._inject(name, injector, copy.deepcopy(opts), trainable=False, modules_to_save=modules_to_save)
            return {
                key: tuple(tensor.shape)
                for training in (False, True)
                for key, tensor in tuned.adapter_state_dict(name, training=training).items()
            }
    except PeftkitError:
        raise
    except Exception:  # the method's own code needs real tensors
        return {}
    finally:
        restore(name)


def _load_state(tuned: "TunedModel", name: str, tensors: dict[str, torch.Tensor], source: Any) -> None:
    remaining = dict(tensors)
    for prefix, layer in tuned._keyed_layers_of(name):
        own = {k[len(prefix):]: remaining.pop(k) for k in list(remaining) if k.startswith(prefix)}
        _check_dtypes(layer, name, prefix, own, source)
        try:
            layer.load_adapter_state_dict(name, own)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise AdapterFormatError(f"adapter {str(source)!r}: tensors for module {prefix[:-1]!r} do not fit: {exc}") from None
    if remaining:
        raise AdapterFormatError(
            f"adapter {str(source)!r} holds tensors no module of this model takes: {', '.join(sorted(remaining)[:5])}"
        )


def _check_dtypes(layer: nn.Module, name: str, prefix: str, own: dict[str, torch.Tensor], source: Any) -> None:
    """Refuse saved tensors of another kind of number than the layer holds (copying would cast them silently)."""
    held = {**layer.adapter_state_dict(name, training=False), **layer.adapter_state_dict(name, training=True)}
    problems = [
        problem
        for key, tensor in own.items()
        if key in held and (problem := dtype_problem(prefix + key, tensor.dtype, held[key].dtype))
    ]
    if problems:
        raise AdapterFormatError(
            f"adapter {str(source)!r}: {listing(problems)}; its weights file is damaged or was not written for this "
            "method: save the adapter again"
        )
