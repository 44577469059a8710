"""Shared test setup: no third-party plugin autoloading, a few threads, quiet transformers."""

from __future__ import annotations

import os

# Tests see only the built-in plugins unless a test is about autoloading.
os.environ.setdefault("PEFTKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import peftkit  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@dataclass
class _NoOptions:
    pass


def _make_method_plugin(method_name: str) -> Any:
    import peftkit

    class Injector:
        name = method_name
        description = f"test method {method_name}"
        options = _NoOptions
        supports_merge = False

        def inject(self, context, options):  # pragma: no cover - registration tests only
            raise NotImplementedError

    class Plugin:
        @peftkit.hookimpl
        def peftkit_register_injectors(self, register):
            register(Injector())

    return Plugin()


@pytest.fixture
def make_method_plugin():
    """Factory: a plugin object registering a do-nothing method with the given name."""
    return _make_method_plugin


@pytest.fixture
def register_plugin():
    """Register plugin objects on the process-wide manager for one test, unregistering them after."""
    import peftkit

    pm = peftkit.plugin_manager()
    names = []

    def register(plugin, name=None):
        names.append(pm.register(plugin, name=name))
        return names[-1]

    yield register
    for name in names:
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)


class _InterruptAt:
    """A plugin that interrupts a run when ``step`` is logged with ``metric`` (after that step's update)."""

    def __init__(self, step: int, metric: str):
        self.step, self.metric = step, metric

    @peftkit.hookimpl
    def peftkit_on_log(self, step, metrics):
        if step == self.step and self.metric in metrics:
            raise KeyboardInterrupt(f"interrupted at step {step}")


@pytest.fixture
def interrupt_at(register_plugin):
    """Register a plugin that interrupts training at a step (``metric``: the key a training log line has); yields a remover."""
    names = []

    def install(step: int, metric: str = "loss") -> None:
        names.append(register_plugin(_InterruptAt(step, metric)))

    def remove() -> None:
        while names:
            peftkit.plugin_manager().unregister(name=names.pop())

    install.remove = remove
    return install


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """Factory: install a fake distribution on ``sys.path`` (``*.dist-info`` with METADATA and
    ``entry_points.txt`` under ``[peftkit]``, plus its modules from source); removed after the test.

    ``make(dist, modules={"mod": "source"}, entry_points={"ep": "mod"}, version="1.0")``;
    ``entry_points`` defaults to one entry point per module, named after it.
    """
    import importlib
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    modules_made: list[str] = []

    def make(dist: str, modules: dict[str, str], entry_points: dict[str, str] | None = None, version: str = "1.0") -> None:
        info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = entry_points if entry_points is not None else {m: m for m in modules}
        (info / "entry_points.txt").write_text("[peftkit]\n" + "".join(f"{n} = {m}\n" for n, m in eps.items()))
        for module, source in modules.items():
            (tmp_path / f"{module}.py").write_text(source)
            modules_made.append(module)
        importlib.invalidate_caches()  # importlib.metadata caches directory listings

    yield make
    for module in modules_made:
        sys.modules.pop(module, None)
