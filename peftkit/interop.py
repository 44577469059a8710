"""Export to, and import from, the Hugging Face ``peft`` adapter directory format.

A ``peft`` adapter directory holds ``adapter_config.json`` (with ``peft_type``)
and ``adapter_model.safetensors``. Writing and reading it needs no ``peft``
install. What differs per method (option names, tensor names) lives with the
method: an injector that can convert has a ``peft_format`` attribute satisfying
:class:`PeftFormat`; the core only moves files and dispatches on ``peft_type``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.errors import AdapterError, AdapterFormatError, PeftkitError, UnknownMethodError
from peftkit.plugins import plugin_manager
from peftkit.api import attach_adapter
from peftkit.serialization import _contiguous_cpu, atomic_directory
from peftkit.tuned_model import TunedModel

__all__ = ["PeftFormat", "export_peft", "import_peft", "PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME", "PEFT_PREFIX"]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# peft names weight-side tensors by their path under PeftModel.base_model (a tuner wrapping the model).
PEFT_PREFIX = "base_model.model."


class PeftFormat(Protocol):
    """How one method converts its adapters to and from ``peft``'s format.

    Attributes:
        peft_type: the ``peft_type`` value in peft's config (``"LORA"``, ``"IA3"``, ...).
    """

    peft_type: str

    def to_peft(self, options: Any, tensors: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """peftkit options + inference-form tensors -> peft config fields + peft tensors.

        :raises AdapterError: if these options have no peft equivalent (say which).
        """
        ...

    def from_peft(self, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """peft config + tensors -> peftkit options (a dict) + peftkit tensors.

        :raises AdapterFormatError: naming the config field peftkit cannot represent. Any other
            ``TypeError``/``ValueError``/``KeyError``/``IndexError``/``RuntimeError`` (a field of the wrong
            type, a tensor of the wrong shape) is reported by :func:`import_peft` as an
            ``AdapterFormatError`` naming the config file, so a converter need not check every field.
        """
        ...


def _format_of(method: str) -> PeftFormat:
    injector = plugin_manager().get_injector(method)
    fmt = getattr(injector, "peft_format", None)
    if fmt is None:
        raise AdapterError(f"method {method!r} has no Hugging Face peft equivalent to export to")
    return fmt


def export_peft(tuned: TunedModel, path: str | os.PathLike, *, adapter_name: str | None = None) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) as a ``peft`` adapter directory, atomically."""
    name = adapter_name or tuned.active_adapter
    if name is None:
        raise AdapterError("this model has no adapter to export")
    info = tuned.adapter_info(name)
    fmt = _format_of(info.method)
    fields, tensors = fmt.to_peft(info.options, tuned.adapter_state_dict(name), tuned.base_model)
    base_config = getattr(tuned.base_model, "config", None)
    config = {
        "peft_type": fmt.peft_type,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "base_model_name_or_path": getattr(base_config, "_name_or_path", None) or None,
        "revision": None,
        **fields,
    }
    with atomic_directory(path) as tmp:
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(_contiguous_cpu(tensors), str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    return Path(path)


def import_peft(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    is_trainable: bool = False,
) -> TunedModel:
    """Load a ``peft`` adapter directory onto ``model`` (or a ``TunedModel``) as a peftkit adapter.

    :raises AdapterFormatError: missing/corrupt files, or config fields peftkit cannot represent.
    :raises UnknownMethodError: no installed method converts this ``peft_type``.
    """
    path = Path(path)
    config_file, weights_file = path / PEFT_CONFIG_NAME, path / PEFT_WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise AdapterFormatError(f"{str(path)!r} is not a peft adapter directory: {f.name} is missing")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{str(config_file)!r} is not valid JSON ({exc})") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    converters = {}
    for reg in plugin_manager().injectors().values():
        fmt = getattr(reg.obj, "peft_format", None)
        if fmt is not None:
            converters[fmt.peft_type] = reg.name
    if not isinstance(peft_type, str) or peft_type not in converters:
        raise UnknownMethodError(
            f"{str(config_file)!r} has peft_type={peft_type!r}, which no installed method imports; "
            f"importable peft types: {', '.join(sorted(converters)) or '(none)'}"
        )
    try:
        tensors = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{str(weights_file)!r} is corrupt or not a safetensors file ({exc})") from None
    method = converters[peft_type]
    try:
        options, state = _format_of(method).from_peft(config, tensors)
    except PeftkitError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise AdapterFormatError(
            f"{str(config_file)!r} cannot be read as a peft {peft_type} adapter ({type(exc).__name__}: {str(exc)[:200]}): "
            "a field has the wrong type or a tensor the wrong shape; it was edited or damaged, or written by a peft "
            "version peftkit does not read"
        ) from None
    name = adapter_name or "default"
    add = lambda tuned: tuned.add_adapter_with_state(name, method, options, state, trainable=is_trainable, source=path)  # noqa: E731
    return attach_adapter(model, add, is_trainable)

