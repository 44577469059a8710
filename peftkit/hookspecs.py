"""The peftkit plugin contract: every extension point, and nothing else.

Each ``peftkit_*`` function below is a pluggy hook specification. A plugin is
any module or object with functions of the same names decorated with
:data:`peftkit.hookimpl`; it is found through the ``peftkit`` entry-point group
(built-in methods included) or registered by hand with
``peftkit.plugin_manager().register(obj)``.

Plugins may implement any subset of the hooks and may declare only the
arguments they use, as usual with pluggy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import argparse

    from torch import nn

    from peftkit.registry import Injector, Objective
    from peftkit.tuned_model import TunedModel

__all__ = [
    "hookspec",
    "hookimpl",
    "peftkit_register_injectors",
    "peftkit_register_objectives",
    "peftkit_layer_wrapper",
    "peftkit_after_inject",
    "peftkit_model_load_kwargs",
    "peftkit_on_log",
    "peftkit_register_commands",
]

hookspec = pluggy.HookspecMarker("peftkit")
hookimpl = pluggy.HookimplMarker("peftkit")


@hookspec
def peftkit_register_injectors(register: Callable[["Injector"], None]) -> None:
    """Register PEFT methods.

    Call ``register(injector)`` once for each method the plugin provides. An
    injector satisfies the :class:`peftkit.registry.Injector` protocol: it has a
    unique ``name``, a one-line ``description``, an ``options`` dataclass and an
    ``inject(context, options)`` function.

    :param register: callback taking one injector. Registering a name that
        another plugin already registered raises
        :class:`peftkit.errors.PluginError` naming both plugins.
    :returns: nothing; the return value is ignored.
    """


@hookspec
def peftkit_register_objectives(register: Callable[["Objective"], None]) -> None:
    """Register training objectives (SFT, reward modelling, PPO, ...).

    Call ``register(objective)`` once for each objective the plugin provides.
    An objective satisfies the :class:`peftkit.registry.Objective` protocol:
    a unique ``name``, a one-line ``description`` and an ``options`` dataclass;
    the training loop defines what else it calls.

    :param register: callback taking one objective. Duplicate names raise
        :class:`peftkit.errors.PluginError` naming both plugins.
    :returns: nothing; the return value is ignored.
    """


@hookspec(firstresult=True)
def peftkit_layer_wrapper(method: str, layer: "nn.Module", options: Any) -> Callable[..., "nn.Module"] | None:
    """Pick the wrapper class that adapts ``layer`` for ``method``.

    Injectors that wrap individual layers (LoRA, IA3, ...) ask this hook which
    wrapper to use for each target layer, so a plugin can teach a method a new
    layer type (a quantized Linear, a fused kernel) without editing the method.
    The first implementation that returns something other than ``None`` wins
    (``firstresult``); built-in methods answer for the layer types they know
    with ``trylast=True`` so that any other plugin can override them.

    :param method: the method name asking, e.g. ``"lora"``.
    :param layer: the layer about to be wrapped (the innermost base layer when
        it is already wrapped by another adapter).
    :param options: the method's validated options object.
    :returns: a callable ``wrapper(base_layer, adapter_name, options)`` that
        returns the wrapping module, or ``None`` to pass.
    """


@hookspec
def peftkit_after_inject(model: "TunedModel", adapter_name: str, method: str) -> None:
    """Called after an adapter has been injected into a model.

    Use it for loggers, parameter counters, or post-processing of the model
    (every plugin sees every injection, whatever the method).

    :param model: the :class:`peftkit.TunedModel` that now holds the adapter.
    :param adapter_name: the name of the new adapter.
    :param method: the method name that injected it.
    :returns: nothing; the return value is ignored.
    """


@hookspec
def peftkit_model_load_kwargs(method: str, options: Any) -> dict[str, Any] | None:
    """Extra keyword arguments for ``from_pretrained`` when loading a base model for ``method``.

    Lets a method load its base straight into the form it needs, e.g. QLoRA
    returns ``{"quantization_config": BitsAndBytesConfig(...)}`` so the weights
    go to 4-bit without a full-precision copy first. Results of all plugins are
    merged; two plugins giving the same key is an error.

    :param method: the method the model is loaded for.
    :param options: that method's validated options object.
    :returns: a dict of keyword arguments, or ``None`` to add nothing.
    """


@hookspec
def peftkit_on_log(step: int, metrics: dict[str, float]) -> None:
    """Called by the training loop each time it logs metrics.

    :param step: the optimizer step the metrics belong to.
    :param metrics: metric name -> value (losses, learning rate, tokens/s, ...).
    :returns: nothing; the return value is ignored.
    """


@hookspec
def peftkit_register_commands(subparsers: "argparse._SubParsersAction") -> None:
    """Add subcommands to the ``peftkit`` command line.

    Call ``subparsers.add_parser(name, help=...)`` and set a ``func`` default
    taking the parsed ``argparse.Namespace`` and returning an exit code, e.g.
    ``parser.set_defaults(func=run)``. A ``PeftkitError`` raised by ``func`` is
    printed as one error line with exit code 2.

    :param subparsers: the ``argparse`` subparsers object of the ``peftkit`` parser.
    :returns: nothing; the return value is ignored.
    """
