"""``peftkit new-method``: the packages it writes pass their own tests, and bad input is one clear error.

The generated tests run in a subprocess exactly as an author would run them (``pytest DIR``,
nothing installed, no ``PYTHONPATH``): the generated pyproject's pytest settings find the package.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.cli import main
from peftkit.plugins import create_plugin_manager
from peftkit.testing import CHECKS, registered_plugin, tiny_gpt2

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib


def _run_generated_tests(directory: Path) -> tuple[int, str]:
    """``python -m pytest DIR/tests`` from another folder, without peftkit's own conftest or autoloaded plugins."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PEFTKIT_DISABLE_PLUGIN_AUTOLOAD="1", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", str(directory / "tests")],
        check=False,  # the return code is asserted with the output
        cwd=directory.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _passed(output: str, test: str) -> int:
    """How many cases of ``test`` passed (``-rA`` lists each as ``PASSED path::test[...]``)."""
    return len(re.findall(rf"^PASSED \S+::{test}(\[|$)", output, flags=re.MULTILINE))


def _entry_points(directory: Path) -> dict[str, str]:
    with open(directory / "pyproject.toml", "rb") as fh:
        project = tomllib.load(fh)["project"]
    assert any(dep.startswith("peftkit") for dep in project["dependencies"]), project["dependencies"]
    assert any(dep.startswith("pytest") for dep in project["optional-dependencies"]["test"])
    return project["entry-points"]["peftkit"]


def test_a_method_package_passes_its_own_tests(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default folder is ./peftkit-NAME
    assert main(["new-method", "loha_demo"]) == 0
    directory = tmp_path / "peftkit-loha-demo"
    assert str(directory.name) in capsys.readouterr().out
    assert _entry_points(directory) == {"loha_demo": "peftkit_loha_demo"}
    for name in ("README.md", "peftkit_loha_demo/__init__.py", "peftkit_loha_demo/options.py", "peftkit_loha_demo/layer.py"):
        assert (directory / name).is_file(), name

    returncode, output = _run_generated_tests(directory)
    assert returncode == 0, output[-4000:]
    assert _passed(output, "test_conformance") == 2 * len(CHECKS), output[-4000:]  # on Llama (Linear) and GPT-2 (Conv1D)
    assert _passed(output, "test_matches_a_hand_written_reference") == 2, output[-4000:]


def test_an_objective_package_passes_its_own_tests(tmp_path, capsys):
    directory = tmp_path / "empty"
    directory.mkdir()  # an existing empty folder is fine
    assert main(["new-method", "text_lm_demo", "--kind", "objective", "--dir", str(directory)]) == 0
    assert _entry_points(directory) == {"text_lm_demo": "peftkit_text_lm_demo"}
    assert not (directory / "peftkit_text_lm_demo" / "layer.py").exists()

    returncode, output = _run_generated_tests(directory)
    assert returncode == 0, output[-4000:]
    assert _passed(output, "test_trains_through_the_trainer_and_saves_a_loadable_adapter") == 1, output[-4000:]
    assert _passed(output, "test_loss_equals_the_models_own_language_modelling_loss") == 1, output[-4000:]


def test_a_method_package_installs_and_is_found_through_its_entry_point(tmp_path):
    """What ``pip install DIR`` gives: the entry point makes the method appear, with its distribution's version."""
    directory = tmp_path / "src"
    assert main(["new-method", "loha_demo", "--dir", str(directory)]) == 0
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(directory)], check=True)
    wheel = next((tmp_path / "dist").glob("peftkit_loha_demo-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    sys.path.insert(0, str(site))
    try:
        registration = create_plugin_manager(autoload=True, only=["loha_demo"]).injectors()["loha_demo"]
        assert (registration.plugin, registration.package, registration.version) == ("loha_demo", "peftkit-loha-demo", "0.1.0")
    finally:
        sys.path.remove(str(site))
        for name in [m for m in sys.modules if m == "peftkit_loha_demo" or m.startswith("peftkit_loha_demo.")]:
            del sys.modules[name]


@pytest.fixture
def generated_method(tmp_path):
    """The generated ``loha_demo`` package, imported from its folder (and forgotten after the test)."""
    directory = tmp_path / "pkg"
    assert main(["new-method", "loha_demo", "--dir", str(directory)]) == 0
    sys.path.insert(0, str(directory))
    try:
        import peftkit_loha_demo

        yield peftkit_loha_demo
    finally:
        sys.path.remove(str(directory))
        for name in [m for m in sys.modules if m == "peftkit_loha_demo" or m.startswith("peftkit_loha_demo.")]:
            del sys.modules[name]


def test_another_plugin_can_override_the_generated_layer_wrapper(generated_method):
    """The generated wrapper hook is a default (trylast): a plugin answering first gets its class used."""
    from peftkit_loha_demo.layer import LohaDemoLayer

    class TracingLayer(LohaDemoLayer):
        pass

    class Override:
        @peftkit.hookimpl
        def peftkit_layer_wrapper(self, method, layer, options):
            return TracingLayer if method == "loha_demo" else None

    with registered_plugin(generated_method, name="loha_demo") as pm:
        default = peftkit.wrap(tiny_gpt2(), "loha_demo", r=2)
        assert {type(m) for m in default.modules()} >= {LohaDemoLayer}
        pm.register(Override(), name="override")
        overridden = peftkit.wrap(tiny_gpt2(), "loha_demo", r=2)
    wrappers = {type(m) for m in overridden.modules() if isinstance(m, LohaDemoLayer)}
    assert wrappers == {TracingLayer}


def test_the_generated_layer_starts_inactive_and_holds_a_second_adapter(generated_method):
    from peftkit_loha_demo.layer import LohaDemoLayer
    from peftkit_loha_demo.options import LohaDemoOptions

    base = torch.nn.Linear(6, 5)
    layer = LohaDemoLayer(base, "first", LohaDemoOptions(r=2))
    layer.add_adapter("second", LohaDemoOptions(r=3))
    with torch.no_grad():
        layer.B["first"].normal_()
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), base(x)), "a new wrapper must start with no active adapter"
    layer.set_active_adapters(["first"])
    assert not torch.equal(layer(x), base(x))
    assert layer.adapter_names() == ["first", "second"]
    assert [tuple(p.shape) for p in layer.adapter_parameters("second")] == [(3, 6), (5, 3)]


# ------------------------------------------------------------------ errors
def _refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.startswith("peftkit: error: new-method:") and captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.mark.parametrize("name", ["LoHa-Demo", "2loha", "loha demo", "class", ""])
def test_a_bad_name_is_one_error_naming_it_and_a_fix(tmp_path, capsys, name):
    err = _refused(["new-method", name, "--dir", str(tmp_path / "out")], capsys)
    assert repr(name) in err
    suggestion = re.search(r"\(e\.g\. '([a-z0-9_]+)'\)", err)
    assert suggestion, err
    assert main(["new-method", suggestion.group(1), "--dir", str(tmp_path / "fixed")]) == 0  # the fix works
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "kind"), [("lora", "method"), ("sft", "objective")])
def test_a_built_in_name_is_refused(tmp_path, capsys, name, kind):
    err = _refused(["new-method", name, "--kind", kind, "--dir", str(tmp_path / "out")], capsys)
    assert repr(name) in err and "built-in" in err
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_empty_is_refused_and_left_untouched(tmp_path, capsys):
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "keep.txt").write_text("my work")
    err = _refused(["new-method", "loha_demo", "--dir", str(directory)], capsys)
    assert str(directory) in err and "keep.txt" in err and "--dir" in err
    assert [p.name for p in directory.iterdir()] == ["keep.txt"]
    assert (directory / "keep.txt").read_text() == "my work"


def test_a_file_as_folder_is_refused(tmp_path, capsys):
    path = tmp_path / "a-file"
    path.write_text("x")
    err = _refused(["new-method", "loha_demo", "--dir", str(path)], capsys)
    assert str(path) in err and "is a file" in err
    assert path.read_text() == "x"
