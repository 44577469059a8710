"""The peftkit plugin contract: every extension point, and nothing else.

Each ``peftkit_*`` function below is a pluggy hook specification. A plugin is
any module or object with functions of the same names decorated with
:data:`peftkit.hookimpl`; it is found through the ``peftkit`` entry-point group
(built-in methods included) or registered by hand with
``peftkit.plugin_manager().register(obj)``.

Plugins may implement any subset of the hooks and may declare only the
arguments they use, as usual with pluggy. Hook wrappers (``wrapper=True``,
``hookwrapper=True``) are not supported: peftkit calls implementations one at a
time so that it can name the one that fails.

A faulty plugin cannot take the others down. An implementation that raises an
``Exception`` while peftkit runs is reported as one
:class:`peftkit.errors.PluginError` naming the plugin, its package, the hook and
the original error (``KeyboardInterrupt`` and ``SystemExit`` pass through). A
registration hook (``peftkit_register_*``) that raises loses only what that
plugin registered there; it is listed as failed by ``peftkit plugins``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    import argparse

    from torch import nn

    from peftkit.registry import Injector, Objective, Reward
    from peftkit.tuned_model import TunedModel

__all__ = [
    "hookspec",
    "hookimpl",
    "peftkit_register_injectors",
    "peftkit_register_objectives",
    "peftkit_register_rewards",
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

    :param register: callback taking one injector. It raises
        :class:`peftkit.errors.PluginError` for an object without a string
        ``name``, a ``description`` or ``options``, or a name this plugin
        registered before; if that (or anything else) escapes the hook, every
        method this plugin registered here is dropped, the plugin is listed as
        failed and the others keep working. A name another plugin registers too
        goes to the built-in one (a warning names both plugins and packages),
        unless ``PEFTKIT_PLUGINS`` names the third-party plugin; two third-party
        plugins claiming one name both lose it, with a warning naming both.
    :returns: nothing; the return value is ignored.
    """


@hookspec
def peftkit_register_objectives(register: Callable[["Objective"], None]) -> None:
    """Register training objectives (SFT, reward modelling, PPO, ...).

    Call ``register(objective)`` once for each objective the plugin provides.
    An objective satisfies the :class:`peftkit.registry.Objective` protocol:
    a unique ``name``, a one-line ``description`` and an ``options`` dataclass;
    the training loop defines what else it calls.

    :param register: callback taking one objective; it checks the object and
        settles names registered by several plugins exactly as
        :func:`peftkit_register_injectors` does (built-ins win unless
        ``PEFTKIT_PLUGINS`` chooses the third-party plugin; two third-party
        plugins both lose the name). A hook that raises loses only this
        plugin's objectives.
    :returns: nothing; the return value is ignored.
    """


@hookspec
def peftkit_register_rewards(register: Callable[["Reward"], None]) -> None:
    """Register reward functions for objectives that score sampled completions (GRPO, ...).

    Call ``register(reward)`` once for each reward the plugin provides. A
    reward satisfies the :class:`peftkit.registry.Reward` protocol: a unique
    ``name`` (what ``objective.options.reward`` names), a one-line
    ``description``, and ``__call__(prompts, completions, records)`` returning
    one float per completion. Rewards are code, not models: a learned reward
    model stays a directory the objective loads itself.

    :param register: callback taking one reward. It raises
        :class:`peftkit.errors.PluginError` for an object without a string
        ``name`` or a ``description``, one that is not callable, or a name this
        plugin registered before; if that (or anything else) escapes the hook,
        every reward this plugin registered here is dropped, the plugin is
        listed as failed and the others keep working. A name several plugins
        register is settled exactly as for :func:`peftkit_register_objectives`
        (built-ins win unless ``PEFTKIT_PLUGINS`` chooses the third-party
        plugin; two third-party plugins both lose the name).
    :returns: nothing; the return value is ignored.
    """


@hookspec(firstresult=True)
def peftkit_layer_wrapper(method: str, layer: "nn.Module", options: Any) -> Callable[..., "nn.Module"] | None:
    """Pick the wrapper class that adapts ``layer`` for ``method``.

    Injectors that wrap individual layers (LoRA, IA3, ...) ask this hook which
    wrapper to use for each target layer, so a plugin can teach a method a new
    layer type (a quantized Linear, a fused kernel) without editing the method.
    The first implementation that returns something other than ``None`` wins
    (``firstresult``). Built-in methods answer for the layer types they know
    with ``trylast=True``, so an implementation declared without ``trylast``
    runs before them and overrides them. Among ``trylast`` implementations the
    earliest registered answers first (the built-ins load first): declare
    ``trylast=True`` for layer types you add and would let a built-in keep.

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
    merged; two plugins giving the same key is a :class:`peftkit.errors.PluginError`,
    and so is an implementation that raises (naming the plugin and its package).

    :param method: the method the model is loaded for.
    :param options: that method's validated options object.
    :returns: a dict of keyword arguments, or ``None`` to add nothing.
    """


@hookspec
def peftkit_on_log(step: int, metrics: dict[str, float]) -> None:
    """Called by the training loop each time it logs metrics.

    Raising ``KeyboardInterrupt`` here stops the run as Ctrl-C would; any other
    exception stops it with a :class:`peftkit.errors.PluginError` naming this
    plugin, its package and the error.

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
    printed as one error line with exit code 2. If this hook raises, the
    commands the plugin added are removed, every other command keeps working,
    and ``peftkit plugins`` lists the plugin as failed with its error.

    :param subparsers: the ``argparse`` subparsers object of the ``peftkit`` parser.
    :returns: nothing; the return value is ignored.
    """
