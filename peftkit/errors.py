"""The exceptions peftkit raises. Every message names the thing, the value and the fix."""

from __future__ import annotations

__all__ = [
    "TrainingError",
    "PeftkitError",
    "PluginError",
    "UnknownMethodError",
    "OptionsError",
    "TargetError",
    "AdapterError",
    "AdapterFormatError",
    "SaveError",
    "MergeNotSupportedError",
    "PeftkitWarning",
]


class PeftkitError(Exception):
    """Base class of every error peftkit raises on purpose."""


class PeftkitWarning(UserWarning):
    """Base class of peftkit's warnings; the command line prints them as one ``peftkit: warning: ...`` line."""


class PluginError(PeftkitError):
    """A plugin is broken or conflicts with another plugin."""


class UnknownMethodError(PeftkitError, KeyError):
    """A method name that no installed plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OptionsError(PeftkitError, ValueError):
    """Invalid options for a method or objective; lists every problem at once."""

    def __init__(self, owner: str, problems: list[str]):
        self.owner = owner
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid options for {owner} ({len(self.problems)} problem(s)):\n{lines}")


class TargetError(PeftkitError, ValueError):
    """A target specification that matches no module (or a module of a type the method cannot wrap)."""


class AdapterError(PeftkitError, ValueError):
    """An adapter operation that cannot be done: unknown name, incompatible base model, ..."""


class AdapterFormatError(AdapterError):
    """An adapter directory that is missing, corrupt, or written for another model."""


class MergeNotSupportedError(PeftkitError, NotImplementedError):
    """The method cannot fold its adapter into the base weights."""


class TrainingError(PeftkitError, RuntimeError):
    """Training cannot go on (non-finite loss, no checkpoint to resume, ...)."""


class SaveError(PeftkitError, OSError):
    """Writing a directory failed (disk full, I/O error); the previous copy at the path is intact.

    An ``OSError`` too, so code that handled the raw error keeps working.
    """
