"""Plugin commands of the ``peftkit`` CLI: ``methods``, ``plugins`` and ``new-method``.

``methods`` and ``plugins`` keep working whatever the installed plugins do: a plugin that
failed to import or register is listed as failed with its error (the warning itself is
printed once, on stderr, when the plugins load). ``new-method`` writes a new plugin package
that passes its own tests (templates in :mod:`peftkit.cli._scaffold`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
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
    rewards = sorted(pm.rewards().items())
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
    if rewards:
        print()
        print_table(("reward", "plugin", "description"), [(n, r.plugin, r.obj.description) for n, r in rewards])
    _print_unavailable(pm)
    return 0 if rows else 1


def _print_unavailable(pm: PluginManager) -> None:
    """What plugins meant to provide but could not: failures and names given up or chosen in a collision."""
    stages = ("import", "peftkit_register_injectors", "peftkit_register_objectives", "peftkit_register_rewards")
    failed = [f for f in pm.failures() if f.stage in stages]
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
    pm.injectors(), pm.objectives(), pm.rewards()  # run the registration hooks, so that their failures are known
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


def _cmd_new_method(args: argparse.Namespace) -> int:
    from peftkit.cli._scaffold import write_plugin

    directory, written = write_plugin(args.name, Path(args.dir) if args.dir else None, kind=args.kind)
    package = f"peftkit_{args.name}"
    print(f"wrote {len(written)} files in {directory}/: the {args.kind} {args.name!r}, a plugin package that passes its own tests")
    for path in written:
        print(f"  {path}")
    where = "layer.py" if args.kind == "method" else "__init__.py"
    print(f"next: cd {directory} && pip install -e \".[test]\" && pytest")
    print(f"then put your own math where {package}/{where} says TODO(you); README.md says what else to edit and how to publish")
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``methods``, ``plugins`` and ``new-method`` to the ``peftkit`` parser."""
    p = subparsers.add_parser("methods", help="list installed PEFT methods, objectives and reward functions")
    p.set_defaults(func=_cmd_methods)
    p = subparsers.add_parser("plugins", help="list loaded plugins, their package versions, hooks and failures")
    p.set_defaults(func=_cmd_plugins)
    p = subparsers.add_parser(
        "new-method",
        help="write a new plugin package (a method or an objective) that passes its own tests",
        description="Write an installable plugin package: pyproject.toml with the entry point, the plugin module, "
        "its options, tests (conformance suite, reference test) and a README. It never overwrites files.",
    )
    p.add_argument("name", metavar="NAME", help="the method or objective name, a lowercase identifier (e.g. loha_demo)")
    p.add_argument("--dir", metavar="DIR", default=None, help="a new or empty folder (default: ./peftkit-NAME)")
    p.add_argument("--kind", choices=("method", "objective"), default="method", help="what the plugin adds (default: method)")
    p.set_defaults(func=_cmd_new_method)
