"""Plugin commands of the ``peftkit`` CLI: ``methods`` and ``plugins``.

Both keep working whatever the installed plugins do: a plugin that failed to import or
register is listed as failed with its error (the warning itself is printed once, on stderr,
when the plugins load).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peftkit.plugins import PluginFailure, PluginManager

__all__ = ["add_subcommands"]


def _cmd_methods(args: argparse.Namespace) -> int:
    from peftkit.plugins import plugin_manager

    pm = plugin_manager()
    rows = []
    for name, reg in sorted(pm.injectors().items()):
        package = f"{reg.package} {reg.version}" if reg.package else "(registered in code)"
        lr = getattr(reg.obj, "recommended_lr", None)
        rows.append((name, f"{reg.plugin} [{package}]", "-" if lr is None else f"{lr:g}", reg.obj.description))
    objectives = sorted(pm.objectives().items())
    if rows:
        print_table(("method", "plugin [package version]", "lr (auto)", "description"), rows)
    else:
        print("no methods installed")
    if objectives:
        print()
        print_table(
            ("objective", "plugin", "description"),
            [(n, r.plugin, r.obj.description) for n, r in objectives],
        )
    _print_unavailable(pm)
    return 0 if rows else 1


def _print_unavailable(pm: PluginManager) -> None:
    """What plugins meant to provide but could not: failures and names given up or chosen in a collision."""
    failed = [f for f in pm.failures() if f.stage in ("import", "peftkit_register_injectors", "peftkit_register_objectives")]
    if failed:
        print("\nfailed plugins (what they provide is unavailable; see `peftkit plugins`):")
        rows = [(f.plugin, f.package or "-", f.stage, f.error) for f in failed]
        print_table(("plugin", "package", "failed in", "error"), rows)
    for collision in pm.collisions():
        if collision.selected:
            print(f"\n{collision.message}")


def _cmd_plugins(args: argparse.Namespace) -> int:
    from peftkit.plugins import plugin_manager

    pm = plugin_manager()
    pm.injectors(), pm.objectives()  # run the registration hooks, so that their failures are known
    failed: dict[str, list[PluginFailure]] = {}
    for failure in pm.failures():
        failed.setdefault(failure.plugin, []).append(failure)
    rows = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda x: str(x[0])):
        hooks = ", ".join(sorted(caller.name for caller in (pm.get_hookcallers(plugin) or []))) or "(none)"
        rows.append(_plugin_row(name, *pm.plugin_package(name), failed.pop(name, []), hooks))
    for name, failures in failed.items():  # failed at import: never registered
        rows.append(_plugin_row(name, failures[0].package, failures[0].version, failures, "-"))
    print_table(("plugin", "package version", "status", "hooks / error"), sorted(rows))
    return 0


def _plugin_row(
    name: str, package: str | None, version: str | None, failures: list[PluginFailure], hooks: str
) -> tuple[str, ...]:
    package_version = " ".join(p for p in (package, version) if p) or "(registered in code)"
    if not failures:
        return (name, package_version, "ok", hooks)
    stages = ", ".join(f.stage for f in failures)
    return (name, package_version, f"failed ({stages})", "; ".join(f.error for f in failures))


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row, widths)] + [str(row[-1])]
        print("  ".join(cells).rstrip())


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``methods`` and ``plugins`` to the ``peftkit`` parser."""
    p = subparsers.add_parser("methods", help="list installed PEFT methods and objectives")
    p.set_defaults(func=_cmd_methods)
    p = subparsers.add_parser("plugins", help="list loaded plugins, their package versions, hooks and failures")
    p.set_defaults(func=_cmd_plugins)
