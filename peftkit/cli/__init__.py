"""The ``peftkit`` command line: one module per command group (:mod:`.plugins`: ``methods``/``plugins``;
:mod:`.training`: ``train``/``validate``/``recipes``/``generate``; :mod:`.adapters`: ``export``/``import``/``merge``),
plus what plugins add."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from peftkit._version import __version__

    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning with pluggable methods.")
    parser.add_argument("--version", action="version", version=f"peftkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from peftkit.cli import adapters as adapter_commands
    from peftkit.cli import plugins as plugin_commands
    from peftkit.cli import training as training_commands
    from peftkit.cli import tune_lr as tune_lr_command

    plugin_commands.add_subcommands(sub)
    training_commands.add_subcommands(sub)
    adapter_commands.add_subcommands(sub)
    tune_lr_command.add_subcommands(sub)
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Let every plugin add commands; one whose hook raises loses the commands it added, the rest keep working.

    A command a plugin added that then fails with anything but a ``PeftkitError`` is reported as one
    error naming the plugin and its package (see :func:`_guard_command`).
    """
    from peftkit.plugins import plugin_manager

    before: dict[str, Any] = {}
    snapshots: list[tuple[str, set[str]]] = []  # (plugin, command names before its hook ran)

    def kwargs_for(plugin: str) -> dict[str, Any]:
        before.update(choices=dict(sub.choices), help=list(sub._choices_actions))
        snapshots.append((plugin, set(sub.choices)))
        return {"subparsers": sub}

    def rollback(plugin: str) -> tuple[str, ...]:
        added = tuple(name for name in sub.choices if name not in before["choices"])
        sub.choices.clear()
        sub.choices.update(before["choices"])
        sub._choices_actions[:] = before["help"]
        return added

    plugin_manager().call_hook_isolated("peftkit_register_commands", kwargs_for, rollback)
    guarded: set[int] = set()
    for i, (plugin, known) in enumerate(snapshots):
        after = snapshots[i + 1][1] if i + 1 < len(snapshots) else set(sub.choices)
        for name in sorted(after - known):
            parser = sub.choices[name]
            func = parser.get_default("func")
            if callable(func) and id(parser) not in guarded:  # an alias shares its parser
                guarded.add(id(parser))
                parser.set_defaults(func=_guard_command(func, plugin, parser.prog.rsplit(" ", 1)[-1]))


def _guard_command(func: Callable[[argparse.Namespace], Any], plugin: str, command: str) -> Callable[[argparse.Namespace], Any]:
    """``func`` of a plugin's command, with its unexpected errors turned into one ``PluginError`` naming the plugin."""
    from peftkit._plugin_faults import failure_message
    from peftkit.errors import PeftkitError, PluginError
    from peftkit.plugins import plugin_manager

    def run(args: argparse.Namespace) -> Any:
        try:
            return func(args)
        except PeftkitError:
            raise
        except Exception as exc:
            package, version = plugin_manager().plugin_package(plugin)
            raise PluginError(failure_message(plugin, package, version, f"its command {command!r}", exc)) from exc

    return run


def _one_line_warnings(show: Callable[..., None]) -> Callable[..., None]:
    """Print peftkit's own warnings (plugins, data) as one ``peftkit: warning: ...`` line: the source line of
    peftkit's ``warn()`` call helps nobody. Other warnings go to ``show`` as before."""
    from peftkit.errors import PeftkitWarning

    def show_warning(message: Any, category: type[Warning], *where: Any) -> None:
        if issubclass(category, PeftkitWarning):
            print(f"peftkit: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *where)

    return show_warning


def main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(warnings.showwarning)
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        from peftkit.errors import PeftkitError

        try:
            return int(args.func(args) or 0)
        except PeftkitError as exc:
            print(f"peftkit: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # the file system refused (disk full, permissions, not a folder): no traceback helps
            where = f": {exc.filename}" if exc.filename else ""
            print(
                f"peftkit: error: {exc.strerror or exc}{where} ({type(exc).__name__}); the file system refused it: "
                "check the path, its permissions and the free space",
                file=sys.stderr,
            )
            return 2


if __name__ == "__main__":
    sys.exit(main())
