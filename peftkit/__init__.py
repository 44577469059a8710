"""peftkit: parameter-efficient fine-tuning for Hugging Face transformers, with methods as plugins.

>>> import peftkit
>>> tuned = peftkit.wrap(model, "lora", r=8, target_modules="all-linear")
"""

from peftkit import _moved
from peftkit._version import __version__
from peftkit.api import available_methods, load, wrap
from peftkit.errors import (
    AdapterError,
    AdapterFormatError,
    MergeNotSupportedError,
    OptionsError,
    PeftkitError,
    PeftkitWarning,
    PluginError,
    TargetError,
    UnknownMethodError,
)
from peftkit.hookspecs import hookimpl
from peftkit.interop import export_peft, import_peft
from peftkit.plugins import plugin_manager
from peftkit.tuned_model import TunedModel

_moved.install()

__all__ = [
    "__version__",
    "wrap",
    "load",
    "available_methods",
    "export_peft",
    "import_peft",
    "plugin_manager",
    "hookimpl",
    "TunedModel",
    "PeftkitError",
    "PeftkitWarning",
    "PluginError",
    "UnknownMethodError",
    "OptionsError",
    "TargetError",
    "AdapterError",
    "AdapterFormatError",
    "MergeNotSupportedError",
]
