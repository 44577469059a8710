"""Small plugins used by several tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import peftkit


@dataclass
class _NoOptions:
    pass


def make_method_plugin(method_name: str) -> Any:
    """A plugin object registering a do-nothing method called ``method_name``."""

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
