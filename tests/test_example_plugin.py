"""The worked third-party plugin (examples/peftkit-bitfit) installs, is discovered, and passes conformance."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import peftkit
from peftkit.plugins import create_plugin_manager, set_plugin_manager
from peftkit.testing import CHECKS, check_injector, tiny_gpt2

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "peftkit-bitfit"


@pytest.fixture(scope="module")
def bitfit_installed(tmp_path_factory):
    """Build the example's wheel and install it into a private site directory on sys.path."""
    tmp = tmp_path_factory.mktemp("bitfit")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(EXAMPLE)],
        check=True,
    )
    wheel = next((tmp / "dist").glob("peftkit_bitfit-*.whl"))
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True)
    sys.path.insert(0, str(site))
    pm = create_plugin_manager(autoload=True, only=["bitfit"])
    old = set_plugin_manager(pm)
    yield pm
    set_plugin_manager(old)
    sys.path.remove(str(site))
    for name in [m for m in sys.modules if m.startswith("peftkit_bitfit")]:
        del sys.modules[name]


def test_discovered_through_its_entry_point(bitfit_installed):
    reg = bitfit_installed.injectors()["bitfit"]
    assert (reg.plugin, reg.package, reg.version) == ("bitfit", "peftkit-bitfit", "0.1.0")
    assert "bitfit" in peftkit.available_methods()


@pytest.mark.parametrize("check", CHECKS)
def test_passes_conformance(bitfit_installed, check):
    check_injector("bitfit", model_factory=tiny_gpt2, checks=[check])


@pytest.mark.parametrize("where", ["installed", "source"])
def test_its_own_tests_pass_installed_and_from_the_source_folder(bitfit_installed, where):
    """The example's tests register the plugin themselves (registered_plugin), so they need neither install nor autoload."""
    site = next(p for p in sys.path if p.endswith("site") and (Path(p) / "peftkit_bitfit").is_dir())
    env = {**os.environ, "PYTHONPATH": site if where == "installed" else ""}
    env.pop("PEFTKIT_DISABLE_PLUGIN_AUTOLOAD", None)  # autoload on: the tests must not depend on it either way
    # -P: the working directory (the source folder) must not shadow the installed package.
    found = subprocess.run(
        [sys.executable, "-P", "-c", "import sys; sys.path.append('tests'); import conftest, peftkit_bitfit; print(peftkit_bitfit.__file__)"],
        cwd=EXAMPLE, env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert found.startswith(site if where == "installed" else str(EXAMPLE)), found
    run = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=EXAMPLE, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout


def test_not_loaded_when_autoload_is_off(bitfit_installed):
    assert "bitfit" not in create_plugin_manager(autoload=False).injectors()
