"""The plugin manager: loads built-in and third-party plugins, collects what they register, and calls their hooks.

Loading order, as in pytest: built-in plugins (entry points of the ``peftkit``
distribution itself), then every other distribution's entry points in the
``peftkit`` group. Environment variables:

* ``PEFTKIT_DISABLE_PLUGIN_AUTOLOAD=1``: load no third-party entry points.
* ``PEFTKIT_PLUGINS=a,b``: load only these third-party plugins (entry-point
  names or distribution names). Built-ins always load. Naming a plugin here also
  lets it take a method, objective or reward name from a built-in (see :mod:`peftkit._plugin_registrations`).
* ``PEFTKIT_TRACE_HOOKS=1``: print every hook call to stderr.

One faulty plugin never takes the others down:

* a plugin that fails to import (whatever it raises, ``sys.exit()`` and its own
  ``KeyboardInterrupt`` included) is skipped;
* a plugin whose ``peftkit_register_*`` hook raises, or registers something
  invalid, loses what it registered in that hook;
* a name registered by two plugins goes to the built-in (or the one chosen in
  ``PEFTKIT_PLUGINS``), or to neither of two third-party plugins.

Each case warns once (:class:`PluginLoadWarning`) naming the plugin and its
package, is listed by ``peftkit plugins``, and is explained by ``wrap()`` instead
of "unknown method". A hook that raises while peftkit runs (:meth:`PluginManager.call_hook`)
raises one :class:`~peftkit.errors.PluginError` naming the plugin, its package,
the hook and the original error.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import sys
import threading
import warnings
from typing import Any, Callable

import pluggy

from peftkit import hookspecs
from peftkit._plugin_faults import IMPORT, PluginFailure, failure_message, users_interrupts
from peftkit._plugin_registrations import BUILTIN_PACKAGE, NameCollision, Registered, check_registration, resolve_names
from peftkit.errors import PeftkitWarning, PluginError, UnknownMethodError
from peftkit.options import did_you_mean

__all__ = [
    "ENTRY_POINT_GROUP",
    "NameCollision",
    "PluginFailure",
    "PluginManager",
    "PluginLoadWarning",
    "Registered",
    "create_plugin_manager",
    "plugin_manager",
    "set_plugin_manager",
]

ENTRY_POINT_GROUP = "peftkit"
_REGISTRIES = {
    "method": "peftkit_register_injectors",
    "objective": "peftkit_register_objectives",
    "reward": "peftkit_register_rewards",
}


class PluginLoadWarning(PeftkitWarning):
    """A plugin could not be imported or registered, or lost a name to another plugin."""


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that keeps the registries of methods, objectives and rewards, and contains faulty plugins."""

    def __init__(self) -> None:
        super().__init__("peftkit")
        self.add_hookspecs(hookspecs)
        self._cache: dict[str, dict[str, Registered]] = {}
        self._collisions: dict[str, list[NameCollision]] = {}
        self._failures: dict[tuple[str, str], PluginFailure] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        self._dists: dict[str, tuple[str, str | None]] = {}
        self._selection: frozenset[str] | None = None

    # Registering or unregistering anything invalidates the registries.
    def register(self, plugin: object, name: str | None = None) -> str | None:
        """Register ``plugin`` (see :meth:`pluggy.PluginManager.register`).

        :raises PluginError: if it implements a hook as a wrapper: peftkit calls
            implementations one at a time (to name the one that fails), so wrappers cannot work.
        """
        self._cache.clear()
        registered = super().register(plugin, name)
        wrappers = sorted(
            caller.name
            for caller in self.get_hookcallers(plugin) or []
            for impl in caller.get_hookimpls()
            if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper)
        )
        if wrappers:
            super().unregister(plugin)
            raise PluginError(
                f"plugin {registered!r} implements {', '.join(wrappers)} as a hook wrapper, which peftkit does not "
                "support (it calls implementations one at a time); drop wrapper=True/hookwrapper=True"
            )
        return registered

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        self._cache.clear()
        return super().unregister(plugin, name)

    # ------------------------------------------------------------------ loading
    def load_entry_points(self, *, builtins: bool = True, third_party: bool = True, only: set[str] | None = None) -> None:
        """Import and register ``peftkit`` entry points (built-ins first).

        A plugin that fails to import or register is recorded (:meth:`failures`), warned about
        once and skipped. A ``KeyboardInterrupt`` from the user's Ctrl-C still propagates; one
        the plugin's own import raises is a failure like any other.
        """
        self._selection = frozenset(only) if only is not None else None
        eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        eps.sort(key=lambda ep: (_dist_name(ep) != BUILTIN_PACKAGE, _dist_name(ep) or "", ep.name))
        seen_dist: set[tuple[str | None, str]] = set()
        with users_interrupts() as user_pressed_ctrl_c:
            for ep in eps:
                dist = _dist_name(ep)
                if (dist, ep.name) in seen_dist:  # the same distribution visible twice on sys.path
                    continue
                seen_dist.add((dist, ep.name))
                if self._wanted(ep.name, dist, builtins=builtins, third_party=third_party, only=only):
                    self._load(ep, dist, user_pressed_ctrl_c)

    def _wanted(self, name: str, dist: str | None, *, builtins: bool, third_party: bool, only: set[str] | None) -> bool:
        if dist == BUILTIN_PACKAGE:
            if not builtins:
                return False
        elif not third_party or (only is not None and name not in only and (dist or "") not in only):
            return False
        taken_by = self.plugin_package(name)[0] if self.get_plugin(name) is not None else dist
        if taken_by != dist:  # another package (or code) has this plugin name: say so rather than skip silently
            self._warn(
                f"peftkit plugin {name!r} from package {dist!r} was skipped: the plugin name is already taken by "
                f"{taken_by or 'a plugin registered in code'!r}. Ask {dist!r}'s author to rename its entry point."
            )
        return self.get_plugin(name) is None and not self.is_blocked(name)

    def _load(self, ep: importlib.metadata.EntryPoint, dist: str | None, user_pressed_ctrl_c: list[int]) -> None:
        version = _dist_version(ep)
        try:
            self.register(ep.load(), name=ep.name)
        # A plugin's import may end in anything (sys.exit(), its own KeyboardInterrupt, a
        # GeneratorExit or CancelledError raised by hand: an import is synchronous, so these can
        # only come from the plugin's code). Only the user's Ctrl-C stops the program.
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt) and user_pressed_ctrl_c:
                raise
            self._fail(PluginFailure.of(ep.name, dist, version, IMPORT, exc))
            return
        if dist:
            self._dists[ep.name] = (dist, version)

    def plugin_package(self, plugin_name: str) -> tuple[str | None, str | None]:
        """``(distribution, version)`` that provided a plugin, or ``(None, None)`` if registered by hand."""
        return self._dists.get(plugin_name, (None, None))

    # ------------------------------------------------------------ calling hooks
    def call_hook(self, hook_name: str, **kwargs: Any) -> Any:
        """Call hook ``hook_name`` like ``pm.hook.<hook_name>(**kwargs)``, naming the plugin that fails.

        Implementations run in pluggy's order (``tryfirst`` ones, then the latest registered
        first, ``trylast`` ones last); a ``firstresult`` hook stops at the first non-``None`` answer.

        :returns: that first answer (``None`` if none) for a ``firstresult`` hook, else the list of non-``None`` answers.
        :raises PluginError: naming the plugin, its package, the hook and the original error
            (chained as ``__cause__``) when an implementation raises an ``Exception``.
            ``KeyboardInterrupt`` and ``SystemExit`` pass through: they stop a run on purpose.
        """
        hook = getattr(self.hook, hook_name)
        firstresult = bool(hook.spec and hook.spec.opts.get("firstresult"))
        results = []
        for impl in reversed(hook.get_hookimpls()):
            result = self._call_impl(impl, hook_name, kwargs)
            if result is not None:
                if firstresult:
                    return result
                results.append(result)
        return None if firstresult else results

    def call_hook_isolated(
        self,
        hook_name: str,
        kwargs_for: Callable[[str], dict[str, Any]],
        rollback: Callable[[str], tuple[str, ...]],
    ) -> None:
        """Call every implementation of a registration hook; one that raises cannot harm the others.

        :param kwargs_for: the hook's arguments for the plugin about to be called (by plugin name).
        :param rollback: undoes what that plugin registered when it raised; returns the names it had
            registered, for :attr:`PluginFailure.dropped`.

        A failing plugin is recorded in :meth:`failures` and warned about once. Registering is part
        of loading a plugin, so ``sys.exit()`` here is a failure too, as it is at import.
        """
        for key in [key for key in self._failures if key[1] == hook_name]:
            del self._failures[key]
        for impl in reversed(getattr(self.hook, hook_name).get_hookimpls()):
            plugin = impl.plugin_name
            try:
                self._call_impl(impl, hook_name, kwargs_for(plugin), contain=(Exception, SystemExit))
            except PluginError as exc:  # raised by _call_impl, with the plugin's own error as its cause
                package, version = self.plugin_package(plugin)
                self._fail(PluginFailure.of(plugin, package, version, hook_name, exc.__cause__, rollback(plugin)))

    def _call_impl(
        self,
        impl: pluggy.HookImpl,
        hook_name: str,
        kwargs: dict[str, Any],
        contain: tuple[type[BaseException], ...] = (Exception,),
    ) -> Any:
        try:
            # pluggy's own executor, one implementation at a time: argument matching and
            # PEFTKIT_TRACE_HOOKS tracing stay pluggy's.
            results = self._hookexec(hook_name, [impl], kwargs, False)
        except contain as exc:
            package, version = self.plugin_package(impl.plugin_name)
            raise PluginError(failure_message(impl.plugin_name, package, version, hook_name, exc)) from exc
        return results[0] if results else None

    # ------------------------------------------------------------------ faults
    def failures(self) -> list[PluginFailure]:
        """Plugins that failed to import, or whose registration hooks raised (as collected so far)."""
        return sorted(self._failures.values(), key=lambda f: (f.plugin, f.stage))

    def collisions(self) -> list[NameCollision]:
        """Method, objective and reward names registered by more than one plugin (as collected so far)."""
        return [c for hook_name in _REGISTRIES.values() for c in self._collisions.get(hook_name, [])]

    def _fail(self, failure: PluginFailure) -> None:
        self._failures[failure.plugin, failure.stage] = failure
        self._warn(failure.message)

    def _warn(self, message: str) -> None:
        if message not in self._warned:  # the registries are rebuilt after every (un)register
            self._warned.add(message)
            warnings.warn(message, PluginLoadWarning, stacklevel=3)

    def unavailable_reason(self, kind: str, name: str) -> str | None:
        """Why ``name`` is not a registered ``kind`` (``"method"``/``"objective"``/``"reward"``) although a plugin meant to provide it.

        :returns: a sentence naming the collision or plugin failure that took it away, or ``None``.
        """
        hook_name = _REGISTRIES[kind]
        for collision in self._collisions.get(hook_name, []):
            if collision.name == name and collision.winner is None:
                return collision.message
        for failure in self.failures():
            if failure.stage in (IMPORT, hook_name) and (
                name in failure.dropped or name == failure.plugin or failure.package in (name, f"peftkit-{name}")
            ):
                return f"{kind} {name!r} is unavailable: {failure.message}"
        return None

    # -------------------------------------------------------------- registries
    def _collect(self, kind: str) -> dict[str, Registered]:
        hook_name = _REGISTRIES[kind]
        with self._lock:
            if hook_name not in self._cache:
                claims: dict[str, list[Registered]] = {}

                def kwargs_for(plugin: str) -> dict[str, Any]:
                    mine = claims.setdefault(plugin, [])
                    return {"register": functools.partial(self._register_callback, kind, plugin, mine)}

                def rollback(plugin: str) -> tuple[str, ...]:
                    return tuple(reg.name for reg in claims.pop(plugin, []))

                self.call_hook_isolated(hook_name, kwargs_for, rollback)
                registrations = [reg for regs in claims.values() for reg in regs]
                found, self._collisions[hook_name] = resolve_names(kind, registrations, self._selection)
                for collision in self._collisions[hook_name]:
                    if not collision.selected:
                        self._warn(collision.message)
                self._cache[hook_name] = found
            return self._cache[hook_name]

    def _register_callback(self, kind: str, plugin: str, mine: list[Registered], obj: Any) -> None:
        """The ``register`` argument of a registration hook; raising fails the calling plugin."""
        mine.append(Registered(check_registration(kind, obj, mine), obj, plugin, *self.plugin_package(plugin)))

    def injectors(self) -> dict[str, Registered]:
        """Every registered method, by name."""
        return self._collect("method")

    def objectives(self) -> dict[str, Registered]:
        """Every registered objective, by name."""
        return self._collect("objective")

    def rewards(self) -> dict[str, Registered]:
        """Every registered reward function, by name."""
        return self._collect("reward")

    def get_injector(self, name: str) -> Any:
        """The injector registered as ``name``.

        :raises UnknownMethodError: saying which plugin failed to provide it, or listing the available methods.
        """
        hint = (
            f"Install the plugin that provides it (its entry point group is {ENTRY_POINT_GROUP!r}) "
            "or check `peftkit methods`."
        )
        return self._get("method", name, self.injectors(), hint)

    def get_objective(self, name: str) -> Any:
        """The objective registered as ``name``.

        :raises UnknownMethodError: saying which plugin failed to provide it, or listing the available objectives.
        """
        return self._get("objective", name, self.objectives(), "Check `peftkit methods`.")

    def get_reward(self, name: str) -> Any:
        """The reward function registered as ``name``.

        :raises UnknownMethodError: saying which plugin failed to provide it, or listing the available rewards.
        """
        return self._get("reward", name, self.rewards(), "Check `peftkit methods`.")

    def _get(self, kind: str, name: str, found: dict[str, Registered], hint: str) -> Any:
        if name in found:
            return found[name].obj
        reason = self.unavailable_reason(kind, name)
        if reason is not None:
            raise UnknownMethodError(reason)
        raise UnknownMethodError(
            f"unknown {kind} {name!r}{did_you_mean(name, found)}; available {kind}s: "
            f"{', '.join(sorted(found)) or '(none)'}. {hint}"
        )

    def model_load_kwargs(self, method: str, options: Any) -> dict[str, Any]:
        """Merge every plugin's ``peftkit_model_load_kwargs`` answer for ``method``.

        :raises PluginError: if two plugins set the same keyword, or one raises (naming it and its package).
        """
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for impl in reversed(self.hook.peftkit_model_load_kwargs.get_hookimpls()):
            result = self._call_impl(impl, "peftkit_model_load_kwargs", {"method": method, "options": options})
            for key, value in (result or {}).items():
                if key in merged:
                    raise PluginError(
                        f"plugins {owner[key]!r} and {impl.plugin_name!r} both set from_pretrained keyword "
                        f"{key!r} for method {method!r}; uninstall one of them"
                    )
                merged[key], owner[key] = value, impl.plugin_name
        return merged

    def injector_for_options(self, options: Any) -> Any:
        """The injector whose ``options`` class is ``type(options)``."""
        for reg in self.injectors().values():
            if reg.obj.options is type(options):
                return reg.obj
        raise UnknownMethodError(
            f"no registered method uses options class {type(options).__qualname__}; "
            f"pass a method name instead (available: {', '.join(sorted(self.injectors()))})"
        )


def _dist_name(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else None


def _dist_version(ep: importlib.metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def create_plugin_manager(*, autoload: bool | None = None, only: list[str] | None = None) -> PluginManager:
    """A fresh plugin manager with built-ins and (unless disabled) third-party plugins loaded.

    :param autoload: load third-party entry points; defaults to
        ``not PEFTKIT_DISABLE_PLUGIN_AUTOLOAD``.
    :param only: third-party plugins to load; defaults to ``PEFTKIT_PLUGINS``.
    """
    pm = PluginManager()
    if autoload is None:
        autoload = not _env_flag("PEFTKIT_DISABLE_PLUGIN_AUTOLOAD")
    if only is None and os.environ.get("PEFTKIT_PLUGINS", "").strip():
        only = [p.strip() for p in os.environ["PEFTKIT_PLUGINS"].split(",") if p.strip()]
    pm.load_entry_points(third_party=autoload, only=set(only) if only is not None else None)
    if _env_flag("PEFTKIT_TRACE_HOOKS"):
        pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"[peftkit] {msg}"))
        pm.enable_tracing()
    return pm


_manager: PluginManager | None = None
_manager_lock = threading.Lock()


def plugin_manager() -> PluginManager:
    """The process-wide plugin manager, created on first use."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = create_plugin_manager()
        return _manager


def set_plugin_manager(pm: PluginManager | None) -> PluginManager | None:
    """Replace the process-wide plugin manager (``None``: recreate on next use); returns the old one."""
    global _manager
    with _manager_lock:
        old, _manager = _manager, pm
    return old
