"""The adapter directory format: ``adapter_config.json`` + ``adapter.safetensors``, written atomically.

``adapter_config.json`` holds the method, its options, the peftkit version and
a fingerprint of the base model (its class and the names and shapes of the
target modules). ``adapter.safetensors`` holds the adapter's tensors only.
Loading never unpickles anything.

Atomicity: a save writes a sibling temporary directory, then swaps it in with
two renames. A crash at any point leaves either the previous adapter, or the
new one, at ``path`` (after a crash between the two renames, the previous one
waits at ``path.peftkit-old`` and :func:`read_adapter` says so).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftkit._version import __version__
from peftkit.errors import AdapterFormatError

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION", "write_adapter", "read_adapter", "atomic_directory"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_VERSION = 1
_OLD_SUFFIX = ".peftkit-old"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class atomic_directory:
    """Context manager yielding a temporary directory that replaces ``path`` on success.

    On an exception the temporary directory is removed and ``path`` is untouched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for f in self.tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = self.path.with_name(self.path.name + _OLD_SUFFIX)
        if old.exists():
            shutil.rmtree(old)
        if self.path.exists():
            os.rename(self.path, old)
        try:
            os.rename(self.tmp, self.path)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        _fsync_dir(self.path.parent)
        if old.exists():
            shutil.rmtree(old)


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write_adapter(path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter directory atomically and return its path."""
    config = {"format_version": FORMAT_VERSION, "peftkit_version": __version__, **config}
    with atomic_directory(path) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(_contiguous_cpu(tensors), str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "peftkit"})
    return Path(path)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an adapter directory written by :func:`write_adapter`.

    :returns: ``(config, tensors)`` with tensors on the CPU.
    :raises AdapterFormatError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_dir():
        old = path.with_name(path.name + _OLD_SUFFIX)
        hint = (
            f"; a previous save was interrupted and the earlier adapter is at {old}: rename it to {path}"
            if old.is_dir()
            else "; pass the directory that TunedModel.save() wrote"
        )
        raise AdapterFormatError(f"adapter directory {str(path)!r} does not exist{hint}")
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise AdapterFormatError(
                f"{str(path)!r} is not a peftkit adapter: {f.name} is missing "
                f"(a peftkit adapter has {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{str(config_file)!r} is not valid JSON ({exc}); the file is corrupt, save the adapter again") from None
    problems = []
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{str(config_file)!r} must hold a JSON object, got {type(config).__name__}")
    if config.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version={config.get('format_version')!r} (this peftkit reads {FORMAT_VERSION})")
    if not isinstance(config.get("method"), str):
        problems.append(f"method={config.get('method')!r} (expected a method name)")
    if not isinstance(config.get("options"), dict):
        problems.append(f"options={config.get('options')!r} (expected an object)")
    base = config.get("base_model")
    if not isinstance(base, dict) or not isinstance(base.get("targets"), dict):
        problems.append(f"base_model={base!r} (expected an object with 'class' and 'targets')")
    if problems:
        raise AdapterFormatError(f"{str(config_file)!r} is not a valid peftkit adapter config: " + "; ".join(problems))
    try:
        tensors = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{str(weights_file)!r} is corrupt or not a safetensors file ({exc}); save the adapter again") from None
    return config, tensors
