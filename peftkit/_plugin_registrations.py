"""What plugins register: each registration checked, and a name claimed by several plugins settled.

* A built-in plugin (package ``peftkit``) keeps its name; a third-party plugin registering
  the same name is skipped with a warning naming both plugins and both packages.
* Only an explicit ``PEFTKIT_PLUGINS`` selection naming the third-party plugin (by plugin or
  package name) gives it the name; the built-in's registration is then skipped, with a note.
* Two third-party plugins (or two selected ones) claiming one name cancel out: neither gets it,
  so that which one wins never depends on install order, and the warning names both.

Every other name is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from peftkit.errors import PluginError

__all__ = ["BUILTIN_PACKAGE", "NameCollision", "Registered", "check_registration", "resolve_names"]

BUILTIN_PACKAGE = "peftkit"


@dataclass(frozen=True)
class Registered:
    """Something a plugin registered: an injector, an objective or a reward, and who provided it."""

    name: str
    obj: Any
    plugin: str
    package: str | None
    version: str | None


def check_registration(kind: str, obj: Any, mine: list[Registered]) -> str:
    """The name of ``obj``, registered as a ``kind`` by a plugin that registered ``mine`` so far.

    :raises PluginError: for an object without a string ``name`` or a ``description``; a method or
        objective without ``options``; a reward that is not callable; or a name the plugin registered
        before (the hook's caller names the plugin).
    """
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"registered {obj!r}, which has no string 'name' attribute")
    for attr in ("description",) if kind == "reward" else ("description", "options"):
        if not hasattr(obj, attr):
            raise PluginError(f"registered {kind} {name!r} without {attr!r}")
    if kind == "reward" and not callable(obj):
        raise PluginError(f"registered reward {name!r}, which is not callable as reward(prompts, completions, records)")
    if any(reg.name == name for reg in mine):
        raise PluginError(f"registered {kind} {name!r} twice")
    return name


@dataclass(frozen=True)
class NameCollision:
    """A name that several plugins registered, and how it was settled.

    :param kind: ``"method"``, ``"objective"`` or ``"reward"``.
    :param name: the contested name.
    :param winner: the registration that got the name, ``None`` when none did.
    :param skipped: the registrations that did not.
    :param selected: the winner was chosen by ``PEFTKIT_PLUGINS`` (a note rather than a warning).
    :param message: one line saying who registered it, who got it, and how to choose.
    """

    kind: str
    name: str
    winner: Registered | None
    skipped: tuple[Registered, ...]
    selected: bool
    message: str


def resolve_names(
    kind: str, registrations: Iterable[Registered], selection: frozenset[str] | None
) -> tuple[dict[str, Registered], list[NameCollision]]:
    """Settle every name: ``(name -> registration that got it, collisions)``.

    :param kind: ``"method"``, ``"objective"`` or ``"reward"``, for messages.
    :param registrations: every valid registration of every plugin, in call order.
    :param selection: the ``PEFTKIT_PLUGINS`` names (plugins or packages), ``None`` if unset.
    """
    claims: dict[str, list[Registered]] = {}
    for reg in registrations:
        claims.setdefault(reg.name, []).append(reg)
    found: dict[str, Registered] = {}
    collisions: list[NameCollision] = []
    for name, regs in claims.items():
        if len(regs) == 1:
            found[name] = regs[0]
            continue
        collision = _settle(kind, name, regs, selection or frozenset())
        collisions.append(collision)
        if collision.winner is not None:
            found[name] = collision.winner
    return found, collisions


def _settle(kind: str, name: str, regs: list[Registered], selection: frozenset[str]) -> NameCollision:
    regs = sorted(regs, key=lambda r: r.plugin)  # messages must not depend on install order
    builtins = [r for r in regs if r.package == BUILTIN_PACKAGE]
    selected = [r for r in regs if r not in builtins and ({r.plugin, r.package} & selection)]
    candidates = selected or builtins or regs
    winner = candidates[0] if len(candidates) == 1 else None
    skipped = tuple(r for r in regs if r is not winner)
    if winner is None:
        message = (
            f"{kind} {name!r} is unavailable: it is registered by {_who_all(regs)}, so none of them provides it; "
            f"uninstall all but one, or choose one by naming only it in PEFTKIT_PLUGINS"
        )
    elif selected:
        message = (
            f"note: {kind} {name!r} comes from {_who(winner)}, chosen in PEFTKIT_PLUGINS; "
            f"the registration by {_who_all(skipped)} is skipped"
        )
    else:
        message = (
            f"{kind} {name!r} is registered by built-in {_who(winner)} and by {_who_all(skipped)}; "
            f"the built-in is kept and the other registration skipped. To use the other one, name its plugin "
            f"in PEFTKIT_PLUGINS (e.g. PEFTKIT_PLUGINS={skipped[0].plugin}), or ask its author to rename the {kind}"
        )
    return NameCollision(kind, name, winner, skipped, bool(selected) and winner is not None, message)


def _who(reg: Registered) -> str:
    package = f"package {reg.package!r}" if reg.package else "registered in code"
    return f"plugin {reg.plugin!r} ({package})"


def _who_all(regs: Iterable[Registered]) -> str:
    return " and ".join(_who(r) for r in regs)
