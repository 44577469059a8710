"""Adapter files in directories that hold other files too, as the Hugging Face conventions need them.

``TunedModel.save`` replaces a whole directory atomically; ``save_pretrained``
and ``transformers.Trainer`` write into directories that also hold a tokenizer,
training arguments or checkpoints, which must survive. The helpers here put the
adapter files into such a directory, and refill an existing adapter from a
saved directory in place (a Trainer checkpoint resume, where the optimizer may
already hold the adapter's parameters).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from peftkit._adapter_checks import check_fingerprint
from peftkit.adapter_io import _load_state
from peftkit.errors import AdapterError, AdapterFormatError
from peftkit.options import options_to_dict
from peftkit.serialization import CONFIG_NAME, WEIGHTS_NAME, read_adapter

if TYPE_CHECKING:
    from peftkit.tuned_model import TunedModel

__all__ = ["save_beside_other_files", "holds_adapter", "reload_adapter_in_place"]

_ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME}


def holds_adapter(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a peftkit adapter (its ``adapter_config.json``)."""
    return (Path(directory) / CONFIG_NAME).is_file()


def save_beside_other_files(save: Callable[[Path], None], directory: str | os.PathLike) -> None:
    """Run ``save(path)`` so that the adapter files end up in ``directory``, whatever else it holds.

    :param save: writes an adapter directory at the path it is given (``TunedModel.save``).
    """
    directory = Path(directory)
    if not directory.is_dir() or {entry.name for entry in directory.iterdir()} <= _ADAPTER_FILES:
        save(directory)  # nothing else there: the atomic replacement of the whole directory
        return
    staging = directory / f".peftkit-adapter-{secrets.token_hex(4)}"
    try:
        save(staging)
        # Weights first: the config names their checksum, so a crash between the two
        # replacements leaves a mismatch that loading reports rather than a silent mix.
        os.replace(staging / WEIGHTS_NAME, directory / WEIGHTS_NAME)
        os.replace(staging / CONFIG_NAME, directory / CONFIG_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def reload_adapter_in_place(tuned: "TunedModel", path: str | os.PathLike, adapter_name: str | None = None) -> str:
    """Copy the tensors saved at ``path`` into the existing adapter ``adapter_name`` (default: the active one).

    The adapter keeps its parameter objects (an optimizer holding them stays
    valid). The directory must have been saved from an adapter of the same
    method and options on the same base model.

    :returns: the adapter name.
    :raises AdapterFormatError: damaged directory, another base model, or tensors that do not fit.
    :raises AdapterError: no such adapter, or the directory holds another method or other options.
    """
    name = adapter_name or tuned.active_adapter
    if name is None:
        raise AdapterError(f"cannot reload {str(path)!r}: this model has no adapter to reload it into")
    info = tuned.adapter_info(name)
    config, tensors = read_adapter(path)
    saved = (config.get("method"), config.get("options"))
    # A JSON round trip gives the saved form (lists, not tuples) for the comparison.
    current = (info.method, json.loads(json.dumps(options_to_dict(info.options))))
    if saved != current:
        raise AdapterError(
            f"adapter {str(path)!r} holds method {saved[0]!r} with options {saved[1]}, but adapter {name!r} of this "
            f"model is {current[0]!r} with options {current[1]}; resume with the model the checkpoint was saved from"
        )
    check_fingerprint(tuned.base_model, path, config)
    try:
        _load_state(tuned, name, tensors, path)
    except KeyError as exc:  # a layer missing a tensor
        raise AdapterFormatError(f"adapter {str(path)!r}: {exc}") from None
    return name
