"""How peftkit contains a faulty plugin: the failure record, its one-line message, and whose Ctrl-C it was.

A plugin can fail while it is imported (its entry point raises anything, ``sys.exit()`` and
``KeyboardInterrupt`` included) or inside a hook. peftkit records a :class:`PluginFailure`,
warns once and goes on without what the plugin offered there; every other plugin keeps working.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

__all__ = ["IMPORT", "PluginFailure", "describe_error", "failure_message", "users_interrupts"]

IMPORT = "import"
"""The ``stage`` of a failure while importing the plugin (its entry point); other stages are hook names."""


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that failed to import, or whose registration hook raised.

    :param plugin: the plugin's name (its entry-point name, or the name it was registered under).
    :param package: the distribution that provides it, ``None`` if it was registered in code.
    :param version: that distribution's version.
    :param stage: ``"import"``, or the hook that raised (``"peftkit_register_injectors"``, ...).
    :param error: the original error, ``"Type: message"`` on one line.
    :param message: the full warning: plugin, package, stage, error and the fix.
    :param dropped: names the plugin had registered in that hook before it raised (all dropped).
    """

    plugin: str
    package: str | None
    version: str | None
    stage: str
    error: str
    message: str
    dropped: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        plugin: str,
        package: str | None,
        version: str | None,
        stage: str,
        exc: BaseException,
        dropped: tuple[str, ...] = (),
    ) -> PluginFailure:
        """The failure record of ``exc``, raised by ``plugin`` at ``stage``."""
        message = failure_message(plugin, package, version, stage, exc)
        return cls(plugin, package, version, stage, describe_error(exc), message, dropped)


def describe_error(exc: BaseException) -> str:
    """``"Type: message"`` on one line (multi-line messages are joined), or just ``"Type"``."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _origin(package: str | None, version: str | None) -> str:
    """Where a plugin comes from, for messages: ``package 'peftkit-x' 1.0`` or ``code (no package)``."""
    if package is None:
        return "code (registered by hand, no package)"
    return f"package {package!r} {version}" if version else f"package {package!r}"


def failure_message(plugin: str, package: str | None, version: str | None, stage: str, exc: BaseException) -> str:
    """One line naming the plugin, its package, where it failed, the original error and the fix."""
    if stage == IMPORT:
        where = "failed to load"
    else:  # a hook name, or what else of the plugin's ran ("command 'score'")
        where = f"failed in hook {stage}" if stage.startswith("peftkit_") else f"failed in {stage}"
    fix = (
        f"Update, reinstall or uninstall {package!r}, or list only the plugins you want in PEFTKIT_PLUGINS"
        if package is not None
        else f"Fix plugin {plugin!r} or unregister it"
    )
    return f"peftkit plugin {plugin!r} from {_origin(package, version)} {where}: {describe_error(exc)}. {fix}."


@contextmanager
def users_interrupts() -> Iterator[list[int]]:
    """Record each SIGINT (the user's Ctrl-C) that arrives inside the block, still handling it as before.

    A plugin's import may raise ``KeyboardInterrupt`` itself; that is the plugin failing and is
    reported like any other import error. A ``KeyboardInterrupt`` that follows a recorded SIGINT
    is the user's and must stop the program. Outside the main thread, or when SIGINT is ignored or
    left to the operating system, Ctrl-C raises nothing here, so every ``KeyboardInterrupt`` is a
    plugin's and nothing needs watching.
    """
    received: list[int] = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    if not callable(previous):
        yield received
        return

    def record(signum: int, frame: object) -> None:
        received.append(signum)
        previous(signum, frame)

    signal.signal(signal.SIGINT, record)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)
