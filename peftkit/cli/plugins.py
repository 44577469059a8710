"""Plugin commands of the ``peftkit`` CLI: ``methods`` and ``plugins``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_subcommands"]


def _cmd_methods(args: argparse.Namespace) -> int:
    from peftkit.plugins import plugin_manager

    pm = plugin_manager()
    rows = []
    for name, reg in sorted(pm.injectors().items()):
        package = f"{reg.package} {reg.version}" if reg.package else "(registered in code)"
        lr = getattr(reg.obj, "recommended_lr", None)
        rows.append((name, f"{reg.plugin} [{package}]", "-" if lr is None else f"{lr:g}", reg.obj.description))
    if not rows:
        print("no methods installed")
        return 1
    print_table(("method", "plugin [package version]", "lr (auto)", "description"), rows)
    objectives = sorted(pm.objectives().items())
    if objectives:
        print()
        print_table(
            ("objective", "plugin", "description"),
            [(n, r.plugin, r.obj.description) for n, r in objectives],
        )
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from peftkit.plugins import plugin_manager

    pm = plugin_manager()
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda x: str(x[0])):
        package, version = pm.plugin_package(name)
        hooks = sorted(caller.name for caller in (pm.get_hookcallers(plugin) or []))
        rows.append((name, f"{package} {version}" if package else "(registered in code)", ", ".join(hooks) or "(none)"))
    print_table(("plugin", "package version", "hooks"), rows)
    for message in pm.load_errors.values():
        print(f"\nwarning: {message}", file=sys.stderr)
    return 0


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row, widths)] + [str(row[-1])]
        print("  ".join(cells).rstrip())



def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``methods`` and ``plugins`` to the ``peftkit`` parser."""
    p = subparsers.add_parser("methods", help="list installed PEFT methods and objectives")
    p.set_defaults(func=_cmd_methods)
    p = subparsers.add_parser("plugins", help="list loaded plugins, their package versions and hooks")
    p.set_defaults(func=_cmd_plugins)
