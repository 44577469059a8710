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
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.errors import AdapterError, AdapterFormatError, PeftkitError, UnknownMethodError
from peftkit.plugins import plugin_manager
from peftkit.api import attach_adapter
from peftkit.modules_to_save import saved_module_prefixes
from peftkit.serialization import _contiguous_cpu, atomic_directory
from peftkit.tuned_model import TunedModel

__all__ = [
    "PeftFormat",
    "PeftField",
    "ANY_VALUE",
    "one_of",
    "check_peft_fields",
    "export_peft",
    "import_peft",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
    "PEFT_PREFIX",
    "WEIGHT_CONVERSION_FIX",
]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# peft names weight-side tensors by their path under PeftModel.base_model (a tuner wrapping the model).
PEFT_PREFIX = "base_model.model."


class PeftField(NamedTuple):
    """One peft config field an importer reads exactly: which values it takes, and the fix for the others.

    Attributes:
        accepts: whether a value is one peftkit reproduces exactly.
        allowed: the accepted values, in words, for the error message.
        fix: what the user can do about another value (appended to the error).
    """

    accepts: Callable[[Any], bool]
    allowed: str
    fix: str = ""


#: A field whose value never changes what the adapter computes (metadata, or targeting that the weights decide).
ANY_VALUE = PeftField(lambda value: True, "any value")


def one_of(*values: Any, fix: str = "") -> PeftField:
    """A :class:`PeftField` accepting exactly ``values`` (compared with ``==`` and the same type, so ``1`` is not ``True``)."""
    return PeftField(
        lambda value: any(value == v and type(value) is type(v) for v in values),
        " or ".join(repr(v) for v in values),
        fix,
    )


#: peft's own way to turn an adapter whose initialisation rewrote the base weights (PiSSA, OLoRA, CorDA, LoftQ,
#: LoRA-GA, ...) into a plain LoRA adapter on the untouched base: which imports exactly.
WEIGHT_CONVERSION_FIX = (
    "convert it to plain LoRA with peft first: keep a copy of the adapter as initialised (before training) and save "
    "the trained one with model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=initial_dir), "
    "which writes a plain LoRA adapter for the original base model (rank 2r) that imports exactly"
)

# Fields every peft config has that describe it without changing what it computes.
_METADATA_FIELDS = ("peft_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version")


def _is_off(value: Any) -> bool:
    """peft's convention for a feature that is not used: ``None``, ``False`` or an empty container."""
    return value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and not value)


def check_peft_fields(config: Mapping[str, Any], accepted: Mapping[str, PeftField], *, peft_type: str, method: str, source: str) -> None:
    """Refuse a peft config that uses a field or value not known to import exactly; one error lists them all.

    Every field of ``config`` is checked: peft's metadata fields (``peft_type``,
    ``base_model_name_or_path``, ...) and ``modules_to_save`` (a list of names,
    handled by the core) take any value; fields in ``accepted`` take the values
    their :class:`PeftField` accepts; any other field is accepted only when it
    holds peft's "feature off" value (``None``, ``False``, ``{}``, ``[]``), so
    that a field added by a newer peft version is refused as soon as it is used.

    :param accepted: field name -> the values this method reproduces exactly.
    :param source: the config file, for the message.
    :raises AdapterFormatError: naming each refused field, its value, the accepted values and the fix.
    """
    problems = []
    for field, value in config.items():
        if field in _METADATA_FIELDS:
            continue
        if field == "modules_to_save":
            rule = PeftField(lambda v: v is None or (isinstance(v, list) and all(isinstance(n, str) for n in v)), "null or a list of module names")
        else:
            rule = accepted.get(field)
        if rule is None:
            if _is_off(value):
                continue
            problems.append(f"{field}={value!r} (a peft feature peftkit's {method} does not have; it imports with this field null/false/empty)")
        elif not rule.accepts(value):
            fix = f"; {rule.fix}" if rule.fix else ""
            problems.append(f"{field}={value!r} (peftkit's {method} imports {rule.allowed} exactly{fix})")
    if problems:
        raise AdapterFormatError(
            f"{source!r} is a peft {peft_type} adapter that peftkit cannot load exactly, so it is not loaded: "
            + "; ".join(problems)
        )


class PeftFormat(Protocol):
    """How one method converts its adapters to and from ``peft``'s format.

    Attributes:
        peft_type: the ``peft_type`` value in peft's config (``"LORA"``, ``"IA3"``, ...).
        accepted_fields: the allow-list of config fields :func:`import_peft` lets through to
            :meth:`from_peft` (see :func:`check_peft_fields`): field -> the :class:`PeftField`
            values this method reproduces exactly. Anything else is refused before ``from_peft`` runs.
        exports_only: (optional, default ``False``) ``True`` for a method that exports under another
            method's ``peft_type`` (qlora writes ``LORA``), so :func:`import_peft` never picks it.

    Optional method: ``model_card(options) -> str``, the text of a ``README.md`` written beside the
    adapter (peft records there what its config has no field for, e.g. a 4-bit base's quantization).
    """

    peft_type: str
    accepted_fields: Mapping[str, PeftField]

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
        if getattr(injector, "supports_merge", False):
            portable = (
                "the portable path is merging it into the base model: `peftkit merge ADAPTER_DIR --out DIR` writes a "
                "transformers model directory that loads without peftkit or peft"
            )
        else:
            reason = getattr(injector, "merge_refusal", "") or "it has no weights to fold into the base model"
            portable = (
                f"it cannot be merged either ({reason}), so share the peftkit adapter directory "
                "(peftkit.load runs it on the same base model)"
            )
        raise AdapterError(f"method {method!r} has no Hugging Face peft equivalent to export to; {portable}")
    return fmt


def export_peft(tuned: TunedModel, path: str | os.PathLike, *, adapter_name: str | None = None) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) as a ``peft`` adapter directory, atomically."""
    name = adapter_name or tuned.active_adapter
    if name is None:
        raise AdapterError("this model has no adapter to export")
    info = tuned.adapter_info(name)
    fmt = _format_of(info.method)
    state = tuned.adapter_state_dict(name)
    saved = saved_module_prefixes(tuned, name)
    module_tensors = {k: state.pop(k) for k in list(state) if any(k.startswith(p) for p in saved)}
    fields, tensors = fmt.to_peft(info.options, state, tuned.base_model)
    if saved:
        fields["modules_to_save"] = sorted(p[:-1] for p in saved)
        tensors.update({_modules_prefix(tensors) + k: v for k, v in module_tensors.items()})
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
        model_card = getattr(fmt, "model_card", None)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card(info.options))
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
        if fmt is not None and not getattr(fmt, "exports_only", False):
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
    fmt = _format_of(method)
    check_peft_fields(config, getattr(fmt, "accepted_fields", {}), peft_type=peft_type, method=method, source=str(config_file))
    saved_modules, saved_state = _split_saved_modules(config, tensors)
    try:
        options, state = fmt.from_peft(config, tensors)
    except PeftkitError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise AdapterFormatError(
            f"{str(config_file)!r} cannot be read as a peft {peft_type} adapter ({type(exc).__name__}: {str(exc)[:200]}): "
            "a field has the wrong type or a tensor the wrong shape; it was edited or damaged, or written by a peft "
            "version peftkit does not read"
        ) from None
    name = adapter_name or "default"
    state.update(saved_state)
    add = lambda tuned: tuned.add_adapter_with_state(  # noqa: E731
        name, method, options, state, trainable=is_trainable, source=path, modules_to_save=sorted(saved_modules) or None
    )
    return attach_adapter(model, add, is_trainable)


def _modules_prefix(tensors: dict[str, torch.Tensor]) -> str:
    """Where peft keeps full module copies: under its tuner (``base_model.model.``) for weight-side methods,
    directly under ``base_model.`` for prompt-learning methods (whose tensors have no ``base_model`` prefix)."""
    return PEFT_PREFIX if any(k.startswith(PEFT_PREFIX) for k in tensors) else "base_model."


def _split_saved_modules(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[set[str], dict[str, torch.Tensor]]:
    """Take the tensors of peft's ``modules_to_save`` out of ``tensors``.

    :returns: the module paths (``"lm_head"``, ``"model.embed_tokens"``) and their tensors keyed
        ``<path>.<parameter>``, as peftkit saves them. A listed name with no tensors (peft's
        sequence-classification default ``["classifier", "score"]`` on a model with only one) is skipped.
    """
    names = config.get("modules_to_save") or []
    paths: set[str] = set()
    saved: dict[str, torch.Tensor] = {}
    for key in list(tensors):
        relative = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key.removeprefix("base_model.")
        for module in names:
            at = ("." + relative).find("." + module + ".")
            if at >= 0:
                path = relative[: at + len(module)]
                paths.add(path)
                saved[relative] = tensors.pop(key)
                break
    return paths, saved

