"""The adapter directory format: ``adapter_config.json`` + ``adapter.safetensors``, written atomically.

``adapter_config.json`` holds the method, its options, the peftkit version and
a fingerprint of the base model (its class and the names and shapes of the
target modules), and ``weights_sha256``, the checksum of
``adapter.safetensors``, which holds the adapter's tensors only. Loading never
unpickles anything, and refuses a weights file that does not match its
checksum (directories saved without one load as before).

Atomicity (:class:`atomic_directory`, also used for training checkpoints): a
save writes a sibling temporary directory ``.NAME.tmp-PID@HOST-XXXXXXXX``,
syncs it to disk, then swaps it in. A directory only ever gets the name
``NAME`` or ``NAME.peftkit-old`` by a rename of a fully written temporary
directory, and a directory is only deleted after being renamed back to a
temporary name, so both names always hold a complete copy: the name is the
completion marker. At every instant at least one of them exists (once a first
save finished), and :func:`recover_directory` puts ``NAME.peftkit-old`` back
when a crash left no ``NAME``. Every save and every :func:`read_adapter` call
recovers first, so nobody has to rename anything by hand. A write that fails
(a full disk) raises :class:`~peftkit.errors.SaveError` and leaves the
previous copy in place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftkit._process import pid_alive
from peftkit._version import __version__
from peftkit.errors import AdapterFormatError, PeftkitError, SaveError

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_VERSION",
    "write_adapter",
    "read_adapter",
    "atomic_directory",
    "recover_directory",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_VERSION = 1
_OLD_SUFFIX = ".peftkit-old"
_HOST = socket.gethostname()
# Temporary directories this process is writing right now (other threads' saves included).
_LIVE: set[Path] = set()
# What a full disk or an I/O failure raises from the writers used inside atomic_directory.
_WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)
# Temporary directories without a pid in their name (peftkit 0.1.0) older than this are left-overs.
_LEGACY_TEMP_AGE = 3600.0


def _old_path(path: Path) -> Path:
    return path.with_name(path.name + _OLD_SUFFIX)


def _temp_path(path: Path) -> Path:
    """A fresh sibling name that :func:`recover_directory` can tie to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}@{_HOST}-{secrets.token_hex(4)}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Some file systems cannot fsync a directory; the rename is still atomic there.
    with contextlib.suppress(OSError):
        _fsync(path)


def _sync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` so a renamed directory is complete after a power cut."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder, name))
        _fsync_dir(Path(folder))


def _writer_alive(pid: int, host: str) -> bool:
    """Whether the process that named a temporary directory may still be writing it."""
    if host != _HOST:  # another machine's pid: assume alive
        return True
    if pid == os.getpid():
        return False  # ours, and not in _LIVE (checked by the caller)
    return pid_alive(pid)


def _remove_stale_temps(path: Path) -> None:
    """Delete ``.NAME.tmp-*`` directories next to ``path`` whose writer process is gone.

    peftkit 0.1.0 named them ``.NAME.tmp-XXXXXXXX`` (no pid): those are removed once an hour old, as no
    save takes that long.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-(\d+)@(.+)-[0-9a-f]{{8}}")
    legacy = re.compile(rf"\.{re.escape(path.name)}\.tmp-[a-z0-9_]{{8}}")
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry not in _LIVE and not _writer_alive(int(match[1]), match[2]):
            _remove_tree(entry)
        elif legacy.fullmatch(entry.name) and _age_seconds(entry) > _LEGACY_TEMP_AGE:
            _remove_tree(entry)


def _age_seconds(entry: Path) -> float:
    try:
        return time.time() - entry.stat().st_mtime
    except OSError:  # gone already
        return 0.0


def _remove_tree(directory: Path) -> None:
    # Best effort: whatever stays behind has a temporary name, so the next recovery retries.
    with contextlib.suppress(OSError):
        shutil.rmtree(directory, ignore_errors=True)


def _discard(directory: Path) -> None:
    """Delete ``directory`` without ever leaving a partial copy under its name."""
    trash = _temp_path(directory.with_name(directory.name.removesuffix(_OLD_SUFFIX)))
    try:
        os.rename(directory, trash)
    except FileNotFoundError:  # another process discarded it first
        return
    _remove_tree(trash)


def recover_directory(path: str | os.PathLike) -> bool:
    """Repair what a crash during an :class:`atomic_directory` save left at ``path``.

    If ``path`` is missing and ``path.peftkit-old`` exists (a crash between the
    two renames of a replacement), the old copy is moved back to ``path``. If
    both exist (a crash after the new copy was in place), the old one is
    deleted. Temporary directories ``.NAME.tmp-*`` next to ``path`` whose
    writer process has died are deleted; those of live processes are kept.
    Safe to call at any time, any number of times; called by every save and by
    :func:`read_adapter`, and by ``--resume`` for ``output.dir/checkpoint``.

    :returns: ``True`` if the old copy was moved back to ``path``.
    :raises OSError: if the directory cannot be renamed (read-only file system, ...).
    """
    path = Path(path)
    _remove_stale_temps(path)
    old = _old_path(path)
    if not old.is_dir():
        return False
    if path.is_dir():
        _discard(old)
        return False
    os.rename(old, path)
    _fsync_dir(path.parent)
    return True


class atomic_directory:
    """Context manager yielding a temporary directory that replaces ``path`` on success.

    On entry, whatever an earlier crash left at ``path`` is recovered
    (:func:`recover_directory`). On an exception the temporary directory is
    removed and ``path`` keeps its previous content; an ``OSError``,
    ``SafetensorError`` or ``RuntimeError`` (a full disk, an I/O error) is
    raised as :class:`~peftkit.errors.SaveError` saying so.

    The replacement keeps a complete copy under ``path`` or ``path.peftkit-old``
    at every instant: drop a stale old copy (``path`` is complete), rename
    ``path`` to the old name, rename the temporary directory to ``path``, drop
    the old copy.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        recover_directory(self.path)
        self.had_previous = self.path.is_dir()
        self.tmp = _temp_path(self.path)
        _LIVE.add(self.tmp)  # before it exists, so no other thread's recovery takes it for stale
        try:
            self.tmp.mkdir()
        except OSError as exc:
            _LIVE.discard(self.tmp)
            raise SaveError(self._failure_message(exc)) from exc
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc is None:
                self._swap_in()
        except BaseException as failure:
            exc = failure
        finally:
            _LIVE.discard(self.tmp)
            if self.tmp.exists():  # it is path now after a successful swap
                _remove_tree(self.tmp)
        if exc is None:
            return
        if isinstance(exc, SaveError) and isinstance(exc.__cause__, _WRITE_ERRORS):
            exc = exc.__cause__  # a nested save (the adapter inside a checkpoint): report this directory
        if isinstance(exc, _WRITE_ERRORS) and not isinstance(exc, PeftkitError):
            raise SaveError(self._failure_message(exc)) from exc
        if exc_type is None:
            raise exc

    def _swap_in(self) -> None:
        _sync_tree(self.tmp)
        old = _old_path(self.path)
        if old.is_dir():  # recover_directory found both, then lost a race; path is complete
            _discard(old)
        try:
            if self.path.is_dir():
                os.rename(self.path, old)
            os.rename(self.tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                recover_directory(self.path)
            raise
        _fsync_dir(self.path.parent)
        # The new copy is complete at path: losing the old one now is harmless, failing to is too.
        with contextlib.suppress(OSError):
            _discard(old)

    def _failure_message(self, exc: BaseException) -> str:
        cause = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            cause += " (the disk is full: free some space and save again)"
        kept = f"the previous copy at {self.path} is intact" if self.had_previous else f"nothing was written at {self.path}"
        return f"could not save {self.path}: {cause}; {kept}"


def _contiguous_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_adapter(path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter directory atomically and return its path.

    ``adapter_config.json`` records the sha256 of ``adapter.safetensors``
    (``weights_sha256``), so :func:`read_adapter` detects a damaged file.
    """
    with atomic_directory(path) as tmp:
        weights = tmp / WEIGHTS_NAME
        # One metadata key: safetensors writes several in hash order, and then equal tensors give
        # different bytes (and checksums) from save to save.
        save_file(_contiguous_cpu(tensors), str(weights), metadata={"format": "pt"})
        config = {"format_version": FORMAT_VERSION, "peftkit_version": __version__, **config, "weights_sha256": _sha256(weights)}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(path)


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read an adapter directory written by :func:`write_adapter`.

    :returns: ``(config, tensors)`` with tensors on the CPU.
    :raises AdapterFormatError: naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        recover_directory(path)
    except OSError as exc:
        if _old_path(path).is_dir():
            raise AdapterFormatError(
                f"adapter directory {str(path)!r} does not exist: a save was interrupted and the previous adapter, "
                f"at {str(_old_path(path))!r}, could not be moved back ({exc}); load {str(_old_path(path))!r} instead"
            ) from None
    if not path.is_dir():
        raise AdapterFormatError(
            f"adapter directory {str(path)!r} does not exist; pass the directory that TunedModel.save() wrote"
        )
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
    else:
        shapes = base["targets"].items()
        problems += [
            f"base_model.targets[{name!r}]={shape!r} (expected a list of sizes)"
            for name, shape in shapes
            if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape))
        ][:3]
    recorded = config.get("weights_sha256")
    if recorded is not None and not (isinstance(recorded, str) and re.fullmatch("[0-9a-f]{64}", recorded)):
        problems.append(f"weights_sha256={recorded!r} (expected 64 hex digits)")
    if problems:
        raise AdapterFormatError(f"{str(config_file)!r} is not a valid peftkit adapter config: " + "; ".join(problems))
    # Adapters saved before checksums were recorded (and peft imports) have none and load as before.
    actual = _sha256(weights_file) if recorded is not None else None
    if actual != recorded:
        raise AdapterFormatError(
            f"{str(weights_file)!r} does not match the checksum recorded in {CONFIG_NAME}: the file is damaged "
            f"(sha256 {actual}, recorded {recorded}); restore it from a copy or save the adapter again"
        )
    try:
        tensors = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{str(weights_file)!r} is corrupt or not a safetensors file ({exc}); save the adapter again") from None
    return config, tensors
