"""The plugin manager: loading order, environment switches, broken and conflicting plugins."""

from __future__ import annotations

import importlib.metadata
import sys
import types
import warnings

import pytest

import peftkit
from peftkit.errors import UnknownMethodError
from peftkit.plugins import PluginLoadWarning, create_plugin_manager


class _FakeDist:
    def __init__(self, name: str, version: str = "9.9"):
        self.metadata = {"Name": name}
        self.version = version


def _entry_point(name: str, module: str, dist: str) -> importlib.metadata.EntryPoint:
    ep = importlib.metadata.EntryPoint(name=name, value=module, group="peftkit")
    return ep._for(_FakeDist(dist)) if hasattr(ep, "_for") else ep


@pytest.fixture
def fake_entry_points(monkeypatch):
    """Add third-party entry points (backed by in-memory modules) to the real ones."""
    real = importlib.metadata.entry_points
    added: list[importlib.metadata.EntryPoint] = []

    def entry_points(**kwargs):
        found = list(real(**kwargs))
        if kwargs.get("group") == "peftkit":
            found += added
        return found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    def add(name: str, module: types.ModuleType | None, dist: str, *, module_name: str | None = None):
        module_name = module_name or f"fake_peftkit_plugin_{name}"
        if module is not None:
            monkeypatch.setitem(sys.modules, module_name, module)
        added.append(_entry_point(name, module_name, dist))

    return add


def _module_with(plugin_obj: object, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    for attr in dir(plugin_obj):
        if attr.startswith("peftkit_"):
            setattr(module, attr, getattr(plugin_obj, attr))
    return module


def test_builtins_load_through_entry_points():
    pm = create_plugin_manager(autoload=False)
    assert "lora" in pm.injectors()
    reg = pm.injectors()["lora"]
    assert reg.package == "peftkit" and reg.version == peftkit.__version__
    # The core never imports the built-in plugins by name; they come from the entry-point group.
    eps = {ep.name for ep in importlib.metadata.entry_points(group="peftkit")}
    assert "lora" in eps


def test_third_party_entry_point_is_loaded_and_attributed(fake_entry_points, make_method_plugin):
    fake_entry_points("thirdparty", _module_with(make_method_plugin("thirdparty_method"), "m"), "peftkit-thirdparty")
    pm = create_plugin_manager(autoload=True)
    reg = pm.injectors()["thirdparty_method"]
    assert (reg.plugin, reg.package, reg.version) == ("thirdparty", "peftkit-thirdparty", "9.9")


def test_autoload_can_be_disabled_by_environment(fake_entry_points, monkeypatch, make_method_plugin):
    fake_entry_points("thirdparty", _module_with(make_method_plugin("thirdparty_method"), "m"), "peftkit-thirdparty")
    monkeypatch.setenv("PEFTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = create_plugin_manager()
    assert "thirdparty_method" not in pm.injectors()
    assert "lora" in pm.injectors(), "built-ins must still load"


def test_peftkit_plugins_restricts_third_party_plugins(fake_entry_points, monkeypatch, make_method_plugin):
    fake_entry_points("one", _module_with(make_method_plugin("method_one"), "m1"), "peftkit-one", module_name="m_one")
    fake_entry_points("two", _module_with(make_method_plugin("method_two"), "m2"), "peftkit-two", module_name="m_two")
    monkeypatch.delenv("PEFTKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setenv("PEFTKIT_PLUGINS", "one")
    pm = create_plugin_manager()
    assert "method_one" in pm.injectors() and "method_two" not in pm.injectors()
    monkeypatch.setenv("PEFTKIT_PLUGINS", "peftkit-two")  # distribution names work too
    pm = create_plugin_manager()
    assert "method_two" in pm.injectors() and "method_one" not in pm.injectors()


def test_broken_plugin_warns_once_naming_plugin_and_package(fake_entry_points, make_method_plugin):
    fake_entry_points("broken", None, "peftkit-broken", module_name="no_such_module_for_peftkit_tests")
    fake_entry_points("fine", _module_with(make_method_plugin("fine_method"), "m"), "peftkit-fine", module_name="m_fine")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = create_plugin_manager(autoload=True)
    ours = [w for w in caught if issubclass(w.category, PluginLoadWarning)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "'broken'" in message and "peftkit-broken" in message and "ModuleNotFoundError" in message
    assert "fine_method" in pm.injectors() and "lora" in pm.injectors()


def test_duplicate_method_names_keep_the_builtin_and_name_both_plugins(make_method_plugin):
    pm = create_plugin_manager(autoload=False)
    pm.register(make_method_plugin("lora"), name="impostor")
    with pytest.warns(PluginLoadWarning) as caught:
        found = pm.injectors()
    text = str(caught[0].message)
    assert "'lora'" in text and "'impostor'" in text and "package 'peftkit'" in text
    assert found["lora"].package == "peftkit" and "ia3" in found


def test_registry_follows_register_and_unregister(register_plugin, make_method_plugin):
    assert "handmade" not in peftkit.available_methods()
    name = register_plugin(make_method_plugin("handmade"))
    assert "handmade" in peftkit.available_methods()
    peftkit.plugin_manager().unregister(name=name)
    assert "handmade" not in peftkit.available_methods()


def test_unknown_method_lists_available_with_did_you_mean():
    with pytest.raises(UnknownMethodError) as info:
        peftkit.plugin_manager().get_injector("lorra")
    text = str(info.value)
    assert "did you mean 'lora'" in text and "available methods" in text and "lora" in text


def test_registration_without_name_fails_only_that_plugin():
    class Bad:
        @peftkit.hookimpl
        def peftkit_register_injectors(self, register):
            register(object())

    pm = create_plugin_manager(autoload=False)
    pm.register(Bad(), name="bad")
    with pytest.warns(PluginLoadWarning, match="'bad'.*peftkit_register_injectors.*no string 'name'"):
        assert "lora" in pm.injectors()
    assert [(f.plugin, f.stage) for f in pm.failures()] == [("bad", "peftkit_register_injectors")]


# ------------------------------------------------------------------ rewards
def _reward_plugin(*rewards: object) -> object:
    class Plugin:
        @peftkit.hookimpl
        def peftkit_register_rewards(self, register):
            for reward in rewards:
                register(reward)

    return Plugin()


class _Reward:
    description = "a test reward"

    def __init__(self, name: str, value: float = 1.0):
        self.name, self.value = name, value

    def __call__(self, prompts, completions, records):
        return [self.value] * len(completions)


def test_builtin_rewards_are_registered_by_the_rewards_plugin():
    found = create_plugin_manager(autoload=False).rewards()
    assert {"arithmetic_exact_match", "rlhf_task"} <= set(found)
    assert all(found[n].plugin == "rewards" and found[n].package == "peftkit" for n in ("arithmetic_exact_match", "rlhf_task"))


def test_a_faulty_reward_plugin_loses_only_its_own_rewards():
    class NotCallable:
        name, description = "not_callable", "a reward without __call__"

    pm = create_plugin_manager(autoload=False)
    pm.register(_reward_plugin(_Reward("fine_reward")), name="good")
    pm.register(_reward_plugin(_Reward("dropped_reward"), NotCallable()), name="bad")
    with pytest.warns(PluginLoadWarning, match="'bad'.*peftkit_register_rewards.*'not_callable', which is not callable"):
        found = pm.rewards()
    assert "fine_reward" in found and "arithmetic_exact_match" in found
    assert "dropped_reward" not in found and "not_callable" not in found
    failure = pm.failures()[0]
    assert (failure.plugin, failure.stage, failure.dropped) == ("bad", "peftkit_register_rewards", ("dropped_reward",))
    with pytest.raises(UnknownMethodError, match="reward 'dropped_reward' is unavailable: .*'bad'"):
        pm.get_reward("dropped_reward")


def test_duplicate_reward_names_keep_the_builtin_and_two_third_party_ones_cancel():
    pm = create_plugin_manager(autoload=False)
    pm.register(_reward_plugin(_Reward("rlhf_task", 0.5)), name="impostor")
    pm.register(_reward_plugin(_Reward("shared", 1.0)), name="first")
    pm.register(_reward_plugin(_Reward("shared", 2.0)), name="second")
    with pytest.warns(PluginLoadWarning) as caught:
        found = pm.rewards()
    text = " ".join(str(w.message) for w in caught)
    assert "reward 'rlhf_task' is registered by built-in plugin 'rewards'" in text and "'impostor'" in text
    assert found["rlhf_task"].plugin == "rewards" and "shared" not in found
    with pytest.raises(UnknownMethodError, match="reward 'shared' is unavailable: .*'first'.*'second'"):
        pm.get_reward("shared")


def test_unknown_reward_lists_the_registered_ones():
    with pytest.raises(UnknownMethodError, match=r"unknown reward 'rlhf_tsak' \(did you mean 'rlhf_task'\?\); available rewards: .*arithmetic_exact_match"):
        create_plugin_manager(autoload=False).get_reward("rlhf_tsak")
