"""``registered_plugin``: a plugin for one block, isolated from autoloaded plugins, the previous manager restored."""

from __future__ import annotations

import pytest

import peftkit
from peftkit.plugins import create_plugin_manager, plugin_manager, set_plugin_manager
from peftkit.testing import registered_plugin, tiny_llama

FAKE_THIRD_PARTY = """
import peftkit
from dataclasses import dataclass

@dataclass
class Options:
    pass

class Injector:
    name = "fake_autoloaded"
    description = "a third-party method that must not leak into registered_plugin"
    options = Options
    supports_merge = False

    def inject(self, context, options):
        raise NotImplementedError

@peftkit.hookimpl
def peftkit_register_injectors(register):
    register(Injector())
"""


@pytest.fixture
def autoload_everything(fake_distribution, monkeypatch):
    """An installed third-party plugin, with autoloading on and explicitly asked for: the worst case for isolation."""
    fake_distribution("peftkit-fake-autoloaded", {"fake_autoloaded_plugin": FAKE_THIRD_PARTY})
    monkeypatch.delenv("PEFTKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setenv("PEFTKIT_PLUGINS", "fake_autoloaded_plugin")
    assert "fake_autoloaded" in create_plugin_manager().injectors(), "the fake distribution was not autoloaded"


def test_the_block_sees_built_ins_and_the_plugin_but_no_autoloaded_plugin(autoload_everything, make_method_plugin):
    with registered_plugin(make_method_plugin("in_block"), name="in-block") as pm:
        assert plugin_manager() is pm
        methods = peftkit.available_methods()
        assert "in_block" in methods and "lora" in methods
        assert "fake_autoloaded" not in methods
        assert pm.get_plugin("fake_autoloaded_plugin") is None
        assert pm.get_plugin("in-block") is not None


def test_the_previous_manager_comes_back_and_the_plugin_is_gone(make_method_plugin):
    before = plugin_manager()
    with registered_plugin(make_method_plugin("temporary")):
        assert "temporary" in peftkit.available_methods()
    assert plugin_manager() is before
    assert "temporary" not in peftkit.available_methods()


def test_the_previous_manager_comes_back_when_the_block_raises(make_method_plugin):
    before = plugin_manager()
    with pytest.raises(RuntimeError, match="boom"):
        with registered_plugin(make_method_plugin("temporary")):
            raise RuntimeError("boom")
    assert plugin_manager() is before
    assert "temporary" not in peftkit.available_methods()


def test_a_not_yet_created_manager_stays_lazy(make_method_plugin):
    """With no process-wide manager yet, the block leaves none behind: the environment is read on first use."""
    previous = set_plugin_manager(None)
    try:
        with registered_plugin(make_method_plugin("temporary")):
            pass
        assert set_plugin_manager(None) is None
    finally:
        set_plugin_manager(previous)


def test_a_module_plugin_is_used_by_wrap(fake_distribution):
    """A plugin module from a source folder (not installed: no entry point is read) works for wrap()."""
    import importlib

    fake_distribution("peftkit-unused", {"source_plugin": FAKE_THIRD_PARTY.replace("fake_autoloaded", "from_source")}, entry_points={})
    module = importlib.import_module("source_plugin")
    with registered_plugin(module):
        assert "from_source" in peftkit.available_methods()
        with pytest.raises(NotImplementedError):
            peftkit.wrap(tiny_llama(), "from_source")


def test_a_plugin_that_cannot_register_leaves_the_previous_manager():
    from peftkit.errors import PluginError

    class WrapsAHook:
        @peftkit.hookimpl(wrapper=True)
        def peftkit_on_log(self, step, metrics):
            return (yield)

    before = plugin_manager()
    with pytest.raises(PluginError, match="hook wrapper"):
        with registered_plugin(WrapsAHook()):
            pass  # pragma: no cover - never entered
    assert plugin_manager() is before
