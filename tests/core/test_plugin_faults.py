"""A faulty plugin never takes the others down: name collisions, hooks that raise, imports that exit.

Plugins come from fake distributions on ``sys.path`` (``fake_distribution``) or are
registered by hand on a fresh manager; every test leaves the process-wide manager as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
from torch import nn

import peftkit
from peftkit.cli import main
from peftkit.errors import PluginError, UnknownMethodError
from peftkit.plugins import PluginLoadWarning, PluginManager, create_plugin_manager, set_plugin_manager
from peftkit.testing import tiny_llama

METHODS = '''
import dataclasses
import peftkit

@dataclasses.dataclass
class Options:
    pass

class Injector:
    description = "a method of a test plugin"
    options = Options
    supports_merge = False

    def __init__(self, name):
        self.name = name

    def inject(self, context, options):
        raise NotImplementedError

@peftkit.hookimpl
def peftkit_register_injectors(register):
    for name in {names!r}:
        register(Injector(name))
'''

RAISES_IN = '''
import peftkit

@peftkit.hookimpl
def {hook}({args}):
    raise ValueError("boom from {hook}")
'''


def methods(*names: str) -> str:
    return METHODS.format(names=names)


def raises_in(hook: str, args: str) -> str:
    return RAISES_IN.format(hook=hook, args=args)


def load(**kwargs) -> tuple[PluginManager, list[str]]:
    """A fresh manager with third-party plugins, and the plugin warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = create_plugin_manager(autoload=True, **kwargs)
        pm.injectors(), pm.objectives()
    return pm, [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]


@pytest.fixture
def process_manager():
    """Factory: make ``pm`` the process-wide manager (``None``: created afresh on first use, as the CLI
    does); the old one is restored after the test."""
    old = set_plugin_manager(None)
    yield set_plugin_manager
    set_plugin_manager(old)


# ------------------------------------------------------------- name collisions


def test_third_party_method_named_like_a_builtin_is_skipped_with_one_warning(fake_distribution):
    fake_distribution("peftkit-impostor", {"impostor": methods("lora", "impostor_method")})
    pm, warned = load()
    assert pm.injectors()["lora"].package == "peftkit", "the built-in keeps its name"
    assert pm.injectors()["impostor_method"].plugin == "impostor", "the plugin's other methods still work"
    assert "ia3" in pm.injectors()
    assert len(warned) == 1
    for part in ("'lora'", "plugin 'impostor'", "'peftkit-impostor'", "package 'peftkit'", "PEFTKIT_PLUGINS=impostor"):
        assert part in warned[0]


@pytest.mark.parametrize("selection", ["impostor", "peftkit-impostor"])
def test_peftkit_plugins_selection_chooses_the_third_party_method_over_the_builtin(fake_distribution, selection):
    fake_distribution("peftkit-impostor", {"impostor": methods("lora")})
    pm, warned = load(only=[selection])
    assert pm.injectors()["lora"].plugin == "impostor"
    assert pm.injectors()["ia3"].package == "peftkit"
    assert warned == [], "an explicit choice is a note, not a warning"
    (note,) = [c for c in pm.collisions() if c.name == "lora"]
    assert note.selected and note.winner.plugin == "impostor" and note.skipped[0].package == "peftkit"


def test_two_third_party_plugins_colliding_neither_gets_the_name(fake_distribution, process_manager):
    fake_distribution("peftkit-one", {"one": methods("shared", "only_one")})
    fake_distribution("peftkit-two", {"two": methods("shared", "only_two")})
    pm, warned = load()
    assert "shared" not in pm.injectors()
    assert {"only_one", "only_two", "lora"} <= set(pm.injectors())
    assert len(warned) == 1
    assert all(part in warned[0] for part in ("'shared'", "'one'", "'two'", "'peftkit-one'", "'peftkit-two'"))
    process_manager(pm)
    with pytest.raises(UnknownMethodError, match="'shared' is unavailable.*'peftkit-one'.*'peftkit-two'"):
        peftkit.wrap(nn.Linear(2, 2), "shared")


def test_objective_collisions_follow_the_same_rules():
    class Objective:
        description = "an objective of a test plugin"
        options = object

        def __init__(self, name):
            self.name = name

    def objectives_plugin(*names):
        class Plugin:
            @peftkit.hookimpl
            def peftkit_register_objectives(self, register):
                for name in names:
                    register(Objective(name))

        return Plugin()

    pm = create_plugin_manager(autoload=False)
    pm.register(objectives_plugin("sft", "mine"), name="sft-impostor")
    pm.register(objectives_plugin("contested"), name="a")
    pm.register(objectives_plugin("contested"), name="b")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = pm.objectives()
    assert found["sft"].package == "peftkit" and found["mine"].plugin == "sft-impostor"
    assert "contested" not in found and "ppo" in found
    texts = [str(w.message) for w in caught if issubclass(w.category, PluginLoadWarning)]
    assert len(texts) == 2 and any("'sft-impostor'" in t for t in texts) and any("'a'" in t and "'b'" in t for t in texts)
    with pytest.raises(UnknownMethodError, match="objective 'contested' is unavailable"):
        pm.get_objective("contested")


def test_collision_warning_is_given_once_per_manager(make_method_plugin):
    pm = create_plugin_manager(autoload=False)
    pm.register(make_method_plugin("lora"), name="impostor")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm.injectors()
        pm.register(make_method_plugin("other"), name="other")  # rebuilds the registry
        pm.injectors()
    assert len([w for w in caught if issubclass(w.category, PluginLoadWarning)]) == 1


def test_two_distributions_with_one_plugin_name_load_one_and_warn(fake_distribution):
    fake_distribution("peftkit-alpha", {"alpha_mod": methods("alpha_method")}, entry_points={"dup": "alpha_mod"})
    fake_distribution("peftkit-beta", {"beta_mod": methods("beta_method")}, entry_points={"dup": "beta_mod"})
    pm, warned = load()
    assert pm.plugin_package("dup")[0] == "peftkit-alpha", "the first distribution by name, whatever the install order"
    assert "alpha_method" in pm.injectors() and "beta_method" not in pm.injectors()
    assert len(warned) == 1 and "'dup'" in warned[0] and "'peftkit-alpha'" in warned[0] and "'peftkit-beta'" in warned[0]

# ------------------------------------------------------------ hooks that raise


def test_failing_register_injectors_drops_only_that_plugin(fake_distribution, process_manager):
    fake_distribution("peftkit-fine", {"fine": methods("fine_method")})
    fake_distribution(
        "peftkit-half",
        {"half": methods("half_method") + raises_in("peftkit_register_objectives", "register")},
    )
    raising_methods = methods("bad_method").replace("for name", "raise ValueError('boom')\n    for name")
    fake_distribution("peftkit-bad", {"bad": raising_methods})
    pm, warned = load()
    assert {"fine_method", "half_method", "lora"} <= set(pm.injectors()) and "bad_method" not in pm.injectors()
    assert {"sft", "ppo"} <= set(pm.objectives())
    failed = {(f.plugin, f.stage): f for f in pm.failures()}
    assert set(failed) == {("bad", "peftkit_register_injectors"), ("half", "peftkit_register_objectives")}
    bad = failed["bad", "peftkit_register_injectors"]
    assert bad.package == "peftkit-bad" and bad.error == "ValueError: boom"
    assert len(warned) == 2
    assert any("'bad'" in w and "'peftkit-bad'" in w and "peftkit_register_injectors" in w for w in warned)
    process_manager(pm)
    explained = "method 'bad' is unavailable: .*plugin 'bad' from package 'peftkit-bad'.*ValueError: boom"
    with pytest.raises(UnknownMethodError, match=explained):
        peftkit.wrap(nn.Linear(2, 2), "bad")


def test_a_recipe_naming_a_failed_plugins_method_says_why(fake_distribution):
    from peftkit.training.recipe import RecipeError, recipe_from_dict

    raising_methods = methods("bad_method").replace("for name", "raise ValueError('boom')\n    for name")
    fake_distribution("peftkit-bad", {"bad": raising_methods})
    pm, _ = load()
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"method": {"name": "bad"}, "data": {"train": "x"}}, plugin_manager=pm)
    (problem,) = [p for p in info.value.problems if p.startswith("method.name")]
    assert "method 'bad' is unavailable" in problem and "'peftkit-bad'" in problem and "ValueError: boom" in problem


def test_registrations_made_before_the_hook_raised_are_dropped_and_explained():
    class Injector:
        description, options = "half-registered", object

        def __init__(self, name):
            self.name = name

    class HalfBroken:
        @peftkit.hookimpl
        def peftkit_register_injectors(self, register):
            register(Injector("first_of_two"))
            register(object())  # no name: the plugin is at fault

    pm = create_plugin_manager(autoload=False)
    pm.register(HalfBroken(), name="half-broken")
    with pytest.warns(PluginLoadWarning, match="'half-broken'.*no string 'name'"):
        found = pm.injectors()
    assert "first_of_two" not in found and "lora" in found
    (failure,) = pm.failures()
    assert failure.dropped == ("first_of_two",)
    with pytest.raises(UnknownMethodError, match="'first_of_two' is unavailable: .*'half-broken'"):
        pm.get_injector("first_of_two")


@pytest.fixture
def faulty(register_plugin):
    """Register one plugin whose implementation of ``hook`` raises ValueError."""

    def install(hook: str, *argnames: str) -> None:
        namespace: dict = {}
        exec(raises_in(hook, ", ".join(argnames)), namespace)
        register_plugin(type("Faulty", (), {hook: staticmethod(namespace[hook])})(), name="faulty")

    return install


def test_peftkit_after_inject_raising_names_the_plugin(faulty):
    faulty("peftkit_after_inject", "model")
    with pytest.raises(PluginError, match="plugin 'faulty' from code.* hook peftkit_after_inject: ValueError: boom") as info:
        peftkit.wrap(tiny_llama(), "lora", r=2)
    assert isinstance(info.value.__cause__, ValueError)


def test_peftkit_layer_wrapper_raising_names_the_plugin(faulty):
    faulty("peftkit_layer_wrapper", "method", "layer")
    with pytest.raises(PluginError, match="'faulty'.*peftkit_layer_wrapper: ValueError: boom"):
        peftkit.wrap(tiny_llama(), "lora", r=2)


def test_peftkit_model_load_kwargs_raising_names_the_plugin(faulty):
    faulty("peftkit_model_load_kwargs", "method")
    with pytest.raises(PluginError, match="'faulty'.*peftkit_model_load_kwargs: ValueError: boom"):
        peftkit.plugin_manager().model_load_kwargs("lora", None)


def test_peftkit_on_log_raising_names_the_plugin_and_its_package(fake_distribution):
    fake_distribution("peftkit-noisy", {"noisy": raises_in("peftkit_on_log", "step, metrics")}, version="2.5")
    pm = create_plugin_manager(autoload=True)
    with pytest.raises(PluginError) as info:
        pm.call_hook("peftkit_on_log", step=3, metrics={"loss": 1.0})
    text = str(info.value)
    for part in ("plugin 'noisy'", "package 'peftkit-noisy' 2.5", "peftkit_on_log", "ValueError: boom", "PEFTKIT_PLUGINS"):
        assert part in text
    assert "\n" not in text


def test_keyboard_interrupt_from_a_hook_still_interrupts(interrupt_at):
    interrupt_at(3)
    with pytest.raises(KeyboardInterrupt):
        peftkit.plugin_manager().call_hook("peftkit_on_log", step=3, metrics={"loss": 1.0})


def test_call_hook_honours_firstresult_and_call_order():
    class Answer:
        def __init__(self, value):
            self.value = value

        @peftkit.hookimpl
        def peftkit_layer_wrapper(self, method):
            return self.value if method == "m" else None

    class Early:
        @peftkit.hookimpl(tryfirst=True)
        def peftkit_layer_wrapper(self, method):
            return None

    pm = PluginManager()  # no built-ins: only these answer
    pm.register(Answer("older"), name="older")
    pm.register(Answer("newer"), name="newer")
    pm.register(Early(), name="early")
    assert pm.call_hook("peftkit_layer_wrapper", method="m", layer=None, options=None) == "newer"
    assert pm.call_hook("peftkit_layer_wrapper", method="m", layer=None, options=None) == pm.hook.peftkit_layer_wrapper(
        method="m", layer=None, options=None
    )
    assert pm.call_hook("peftkit_layer_wrapper", method="other", layer=None, options=None) is None
    assert pm.call_hook("peftkit_after_inject", model=None, adapter_name="a", method="m") == []


def test_hook_wrappers_are_refused_at_registration():
    class Wrapper:
        @peftkit.hookimpl(wrapper=True)
        def peftkit_on_log(self, step, metrics):
            return (yield)

    pm = create_plugin_manager(autoload=False)
    with pytest.raises(PluginError, match="'wrapping'.*peftkit_on_log.*wrapper"):
        pm.register(Wrapper(), name="wrapping")
    assert pm.get_plugin("wrapping") is None


def test_sys_exit_in_a_registration_hook_is_a_failure_not_an_exit():
    class Exits:
        @peftkit.hookimpl
        def peftkit_register_objectives(self, register):
            raise SystemExit(4)

    pm = create_plugin_manager(autoload=False)
    pm.register(Exits(), name="exits")
    with pytest.warns(PluginLoadWarning, match="'exits'.*peftkit_register_objectives: SystemExit: 4"):
        assert "sft" in pm.objectives()
    assert [(f.plugin, f.error) for f in pm.failures()] == [("exits", "SystemExit: 4")]


# -------------------------------------------------------- imports that fail


@pytest.mark.parametrize(
    "statement, error",
    [
        ("import sys\nsys.exit(3)", "SystemExit: 3"),
        ("raise KeyboardInterrupt", "KeyboardInterrupt"),
        ("raise GeneratorExit", "GeneratorExit"),
        ("import no_such_module_for_peftkit_tests", "ModuleNotFoundError"),
    ],
)
def test_whatever_a_plugin_import_raises_is_a_load_failure(fake_distribution, process_manager, statement, error):
    fake_distribution("peftkit-exits", {"exits": statement})
    fake_distribution("peftkit-fine", {"fine": methods("fine_method")})
    pm, warned = load()
    (failure,) = pm.failures()
    assert (failure.plugin, failure.package, failure.stage) == ("exits", "peftkit-exits", "import")
    assert failure.error.startswith(error)
    assert len(warned) == 1 and "'exits'" in warned[0] and "'peftkit-exits'" in warned[0]
    assert {"fine_method", "lora"} <= set(pm.injectors())
    process_manager(pm)
    with pytest.raises(UnknownMethodError, match="plugin 'exits' from package 'peftkit-exits' 1.0 failed to load"):
        peftkit.wrap(nn.Linear(2, 2), "exits")


def test_the_users_ctrl_c_during_a_plugin_import_still_stops_the_program(fake_distribution):
    fake_distribution(
        "peftkit-slow",
        {"slow": "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(10)"},
    )
    with pytest.raises(KeyboardInterrupt):
        create_plugin_manager(autoload=True)


# ---------------------------------------------------------------- the CLI


def test_cli_lists_failed_plugins_and_warns_once(fake_distribution, monkeypatch, capsys, process_manager):
    fake_distribution("peftkit-exits", {"exits": "import sys\nsys.exit(3)"})
    fake_distribution("peftkit-badreg", {"badreg": raises_in("peftkit_register_injectors", "register")})
    fake_distribution("peftkit-badcmd", {"badcmd": raises_in("peftkit_register_commands", "subparsers")})
    monkeypatch.delenv("PEFTKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)

    assert main(["methods"]) == 0
    out, err = capsys.readouterr()
    assert "lora" in out and "exits" in out and "badreg" in out and "SystemExit: 3" in out
    warnings_printed = [line for line in err.splitlines() if line.startswith("peftkit: warning:")]
    assert len(warnings_printed) == 3 and len(err.splitlines()) == 3, err

    assert main(["plugins"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "failed (import)" in rows["exits"] and "SystemExit: 3" in rows["exits"]
    assert "failed (peftkit_register_injectors)" in rows["badreg"] and "ValueError: boom" in rows["badreg"]
    assert "failed (peftkit_register_commands)" in rows["badcmd"]
    assert " ok " in rows["lora"]
    assert err == "", "each warning is given once per process"


def test_cli_warns_once_for_a_plugin_that_fails_to_import(fake_distribution, tmp_path):
    fake_distribution("peftkit-broken", {"broken": "import no_such_module_for_peftkit_tests"})
    env = {k: v for k, v in os.environ.items() if k != "PEFTKIT_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "peftkit", "plugins"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("peftkit plugin 'broken'") == 1, done.stderr
    assert done.stderr.startswith("peftkit: warning: ") and len(done.stderr.splitlines()) == 1
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("broken")]
    assert "failed (import)" in row and "ModuleNotFoundError" in row


def test_register_commands_raising_leaves_every_other_command_working(register_plugin, capsys):
    class HalfCommand:
        @peftkit.hookimpl
        def peftkit_register_commands(self, subparsers):
            subparsers.add_parser("half", help="added before the plugin failed").set_defaults(func=lambda args: 0)
            raise RuntimeError("cannot finish")

    register_plugin(HalfCommand(), name="half-command")
    assert main(["methods"]) == 0
    assert "lora" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["half"])
    assert info.value.code == 2, "the failed plugin's half-added command is gone"
    assert "invalid choice: 'half'" in capsys.readouterr().err
    assert main(["plugins"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("half-command")]
    assert "failed (peftkit_register_commands)" in row and "RuntimeError: cannot finish" in row
    (failure,) = [f for f in peftkit.plugin_manager().failures() if f.plugin == "half-command"]
    assert failure.dropped == ("half",)



def test_a_plugin_command_that_fails_is_one_error_naming_the_plugin(register_plugin, capsys):
    def crash(args):
        raise ZeroDivisionError("division by zero in the plugin")

    def refuse(args):
        raise peftkit.PeftkitError("a documented refusal")

    class Commands:
        @peftkit.hookimpl
        def peftkit_register_commands(self, subparsers):
            subparsers.add_parser("crash", aliases=["boom"]).set_defaults(func=crash)
            subparsers.add_parser("refuse").set_defaults(func=refuse)

    register_plugin(Commands(), name="crashing-commands")
    for command in ("crash", "boom"):
        assert main([command]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert "plugin 'crashing-commands'" in err and "command 'crash'" in err
        assert "ZeroDivisionError: division by zero in the plugin" in err
    assert main(["refuse"]) == 2  # a PeftkitError of the plugin's own is printed as it is
    assert capsys.readouterr().err == "peftkit: error: a documented refusal\n"
    assert main(["methods"]) == 0


def test_cli_prints_peftkits_own_warnings_as_one_line(register_plugin, capsys):
    from peftkit.training.data import DataWarning

    def warn(args):
        warnings.warn(DataWarning("2 empty assistant replies in 3 records"), stacklevel=1)
        warnings.warn(UserWarning("someone else's warning"), stacklevel=1)
        return 0

    class Command:
        @peftkit.hookimpl
        def peftkit_register_commands(self, subparsers):
            subparsers.add_parser("warn").set_defaults(func=warn)

    register_plugin(Command(), name="warning-command")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["warn"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "peftkit: warning: 2 empty assistant replies in 3 records" in err
    assert not any(line.startswith("peftkit:") and "someone else's" in line for line in err), "others keep Python's format"
