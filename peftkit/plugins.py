"""The plugin manager: loads built-in and third-party plugins and collects what they register.

Loading order, as in pytest: built-in plugins (entry points of the ``peftkit``
distribution itself), then every other distribution's entry points in the
``peftkit`` group. Environment variables:

* ``PEFTKIT_DISABLE_PLUGIN_AUTOLOAD=1``: load no third-party entry points.
* ``PEFTKIT_PLUGINS=a,b``: load only these third-party plugins (entry-point
  names or distribution names). Built-ins always load.
* ``PEFTKIT_TRACE_HOOKS=1``: print every hook call to stderr.

A plugin that raises on import is reported in one warning naming it and its
package; the others still load.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import pluggy

from peftkit import hookspecs
from peftkit.errors import PluginError, UnknownMethodError
from peftkit.options import did_you_mean

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginManager",
    "PluginLoadWarning",
    "Registered",
    "create_plugin_manager",
    "plugin_manager",
    "set_plugin_manager",
]

ENTRY_POINT_GROUP = "peftkit"
_BUILTIN_DIST = "peftkit"


class PluginLoadWarning(UserWarning):
    """A plugin could not be imported or registered."""


@dataclass(frozen=True)
class Registered:
    """Something a plugin registered: an injector or an objective, and who provided it."""

    name: str
    obj: Any
    plugin: str
    package: str | None
    version: str | None


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that also keeps the registries of methods and objectives up to date."""

    def __init__(self) -> None:
        super().__init__("peftkit")
        self.add_hookspecs(hookspecs)
        self._cache: dict[str, dict[str, Registered]] = {}
        self._lock = threading.Lock()
        self.load_errors: dict[str, str] = {}
        self._dists: dict[str, tuple[str, str]] = {}

    # Registering or unregistering anything invalidates the registries.
    def register(self, plugin: object, name: str | None = None) -> str | None:
        self._cache.clear()
        return super().register(plugin, name)

    def unregister(self, plugin: object | None = None, name: str | None = None) -> Any:
        self._cache.clear()
        return super().unregister(plugin, name)

    # ------------------------------------------------------------------ loading
    def load_entry_points(self, *, builtins: bool = True, third_party: bool = True, only: set[str] | None = None) -> None:
        """Import and register ``peftkit`` entry points (built-ins first)."""
        eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        eps.sort(key=lambda ep: (_dist_name(ep) != _BUILTIN_DIST, _dist_name(ep) or "", ep.name))
        seen_dist: set[tuple[str | None, str]] = set()
        for ep in eps:
            dist = _dist_name(ep)
            key = (dist, ep.name)
            if key in seen_dist:  # the same distribution visible twice on sys.path
                continue
            seen_dist.add(key)
            is_builtin = dist == _BUILTIN_DIST
            if is_builtin and not builtins:
                continue
            if not is_builtin:
                if not third_party:
                    continue
                if only is not None and ep.name not in only and (dist or "") not in only:
                    continue
            if self.get_plugin(ep.name) is not None or self.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
                self.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must not take the others down
                where = f"package {dist!r}" if dist else "an unknown package"
                message = (
                    f"peftkit plugin {ep.name!r} from {where} failed to load and was skipped: "
                    f"{type(exc).__name__}: {exc}. Reinstall or uninstall {dist or ep.value!r}, "
                    f"or set PEFTKIT_PLUGINS to the plugins you want."
                )
                self.load_errors[ep.name] = message
                warnings.warn(message, PluginLoadWarning, stacklevel=2)
                continue
            if dist:
                self._dists[ep.name] = (dist, _dist_version(ep))

    def plugin_package(self, plugin_name: str) -> tuple[str | None, str | None]:
        """``(distribution, version)`` that provided a plugin, or ``(None, None)`` if registered by hand."""
        return self._dists.get(plugin_name, (None, None))

    # -------------------------------------------------------------- registries
    def _collect(self, hook_name: str, kind: str) -> dict[str, Registered]:
        with self._lock:
            if hook_name in self._cache:
                return self._cache[hook_name]
            found: dict[str, Registered] = {}
            hook = getattr(self.hook, hook_name)
            # Call each implementation on its own so every registration is
            # attributed to its plugin (needed for duplicate-name errors).
            for impl in reversed(hook.get_hookimpls()):
                plugin_name = impl.plugin_name
                package, version = self.plugin_package(plugin_name)

                def register(obj: Any, _plugin: str = plugin_name, _pkg=package, _ver=version) -> None:
                    name = getattr(obj, "name", None)
                    if not isinstance(name, str) or not name:
                        raise PluginError(
                            f"plugin {_plugin!r} ({hook_name}) registered {obj!r}, which has no string 'name' attribute"
                        )
                    for attr in ("description", "options"):
                        if not hasattr(obj, attr):
                            raise PluginError(f"plugin {_plugin!r} ({hook_name}) registered {kind} {name!r} without {attr!r}")
                    if name in found:
                        other = found[name]
                        raise PluginError(
                            f"{kind} {name!r} is registered twice: by plugin {other.plugin!r} "
                            f"(package {other.package!r}) and by plugin {_plugin!r} (package {_pkg!r}); "
                            "uninstall one of them or restrict loading with PEFTKIT_PLUGINS"
                        )
                    found[name] = Registered(name, obj, _plugin, _pkg, _ver)

                kwargs = {"register": register} if "register" in impl.argnames else {}
                impl.function(**kwargs)
            self._cache[hook_name] = found
            return found

    def injectors(self) -> dict[str, Registered]:
        """Every registered method, by name."""
        return self._collect("peftkit_register_injectors", "method")

    def objectives(self) -> dict[str, Registered]:
        """Every registered objective, by name."""
        return self._collect("peftkit_register_objectives", "objective")

    def get_injector(self, name: str) -> Any:
        """The injector registered as ``name``.

        :raises UnknownMethodError: listing the available methods.
        """
        found = self.injectors()
        if name not in found:
            raise UnknownMethodError(
                f"unknown method {name!r}{did_you_mean(name, found)}; available methods: "
                f"{', '.join(sorted(found)) or '(none)'}. Install the plugin that provides it "
                f"(its entry point group is {ENTRY_POINT_GROUP!r}) or check `peftkit methods`."
            )
        return found[name].obj

    def get_objective(self, name: str) -> Any:
        """The objective registered as ``name``.

        :raises UnknownMethodError: listing the available objectives.
        """
        found = self.objectives()
        if name not in found:
            raise UnknownMethodError(
                f"unknown objective {name!r}{did_you_mean(name, found)}; available objectives: "
                f"{', '.join(sorted(found)) or '(none)'}"
            )
        return found[name].obj

    def model_load_kwargs(self, method: str, options: Any) -> dict[str, Any]:
        """Merge every plugin's ``peftkit_model_load_kwargs`` answer for ``method``.

        :raises PluginError: if two plugins set the same keyword.
        """
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        hook = self.hook.peftkit_model_load_kwargs
        for impl in reversed(hook.get_hookimpls()):
            kwargs = {k: v for k, v in {"method": method, "options": options}.items() if k in impl.argnames}
            result = impl.function(**kwargs)
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


