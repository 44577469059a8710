"""Register a plugin for one test, without installing it and without any other third-party plugin.

This is the way to test a plugin from its source folder: no ``pip install``, no
entry point, no autoloading::

    import my_plugin
    from peftkit.testing import registered_plugin

    def test_my_method():
        with registered_plugin(my_plugin):
            tuned = peftkit.wrap(tiny_llama(), "my_method")

Why a fresh manager rather than registering on the process-wide one: the
process-wide plugin manager is created on first use (the first ``peftkit.wrap``,
``peftkit.plugin_manager()``, recipe validation...), and *that* is when
``PEFTKIT_DISABLE_PLUGIN_AUTOLOAD`` and ``PEFTKIT_PLUGINS`` are read. Setting them
later changes nothing, so whatever third-party plugins happened to be installed
when it was created are in it. :func:`registered_plugin` sidesteps that: the block
sees the built-in plugins and ``plugin`` only, whatever those variables say.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from peftkit.plugins import PluginManager, create_plugin_manager, set_plugin_manager

__all__ = ["registered_plugin"]


@contextlib.contextmanager
def registered_plugin(plugin: object, name: str | None = None) -> Iterator[PluginManager]:
    """Make ``plugin`` available to peftkit for the duration of a ``with`` block, isolated from installed plugins.

    Builds a fresh plugin manager holding the built-in plugins only (no autoloaded
    third-party plugin, whatever ``PEFTKIT_DISABLE_PLUGIN_AUTOLOAD``/``PEFTKIT_PLUGINS``
    say), registers ``plugin`` on it, and makes it the process-wide manager
    (what ``peftkit.wrap``, ``peftkit.load``, recipes and the trainer use) for the
    block. The previous manager is put back afterwards, also when the block raises.

    :param plugin: a module or an object with ``@peftkit.hookimpl`` methods (what an entry point would load).
    :param name: the plugin name (the entry-point name it would have when installed); default: pluggy's
        (the module name, or an id for an object).
    :returns: the fresh manager, e.g. for ``pm.injectors()``.
    :raises PluginError: if ``plugin`` cannot be registered (e.g. it implements a hook as a wrapper); the
        previous manager is then left in place.
    """
    pm = create_plugin_manager(autoload=False, only=[])
    pm.register(plugin, name=name)
    previous = set_plugin_manager(pm)
    try:
        yield pm
    finally:
        set_plugin_manager(previous)
