"""(IA)^3: rescale keys, values and feed-forward activations with learned vectors.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning" (https://arxiv.org/abs/2205.05638). Each
adapted layer gets one vector, initialised to ones so training starts exactly
at the base model. In a transformer block::

    k = l_k ⊙ (W_k x)                   # output of the key projection scaled
    v = l_v ⊙ (W_v x)                   # output of the value projection scaled
    y = W_down (l_ff ⊙ a),  a = FFN activations  # input of the FFN down-projection scaled

Targets whose output is scaled are the ``target_modules`` outside
``feedforward_modules``; those in ``feedforward_modules`` have their input
scaled. Defaults per architecture are in
:data:`peftkit_plugins.ia3.architectures.IA3_LAYOUTS` (GPT-2's fused ``c_attn``
has its whole q/k/v output scaled, as in ``peft``).

Both forms merge exactly into the base weight (rows or columns of ``W``, and
``b`` for output scaling); unmerge divides back, and restores from a copy the
slices whose scale was (nearly) zero.

This package registers the ``ia3`` method and answers the
``peftkit_layer_wrapper`` hook for ``nn.Linear`` and transformers' ``Conv1D``
(with ``trylast``). A wrapper another plugin supplies for ``ia3`` must also
provide ``set_feedforward(adapter_name, feedforward)``, which the injector
calls after wrapping (see :class:`IA3Wrapper`).

Saved tensors are keyed ``<module path>.ia3_l`` with peft's shapes (``(out, 1)``
or ``(1, in)``); the peft key is ``base_model.model.<module path>.ia3_l``.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from torch import nn

from peftkit.errors import TargetError
from peftkit.hookspecs import hookimpl
from peftkit.injection import InjectionContext
from peftkit.targeting import find_targets
from peftkit_plugins.adapter.architectures import detect_layout, has_suffix
from peftkit_plugins.ia3.architectures import IA3_LAYOUTS
from peftkit_plugins.ia3.layer import IA3Layer
from peftkit_plugins.ia3.options import IA3Options
from peftkit_plugins.ia3.peft_format import IA3PeftFormat

__all__ = ["IA3Injector", "IA3Layer", "IA3Options", "IA3Wrapper", "ia3_targets"]


class IA3Wrapper(Protocol):
    """What the ``ia3`` injector needs from a wrapper, beyond :class:`peftkit.registry.AdapterLayer`."""

    def set_feedforward(self, name: str, feedforward: bool) -> None:
        """Make adapter ``name`` scale the layer's input (``True``) or its output (``False``)."""
        ...


def ia3_targets(model: nn.Module, options: IA3Options) -> list[tuple[str, bool]]:
    """``(module name, scales its input)`` for every layer the options target, in model order.

    :raises TargetError: when no default exists for this architecture and
        ``target_modules`` is unset, when a spec matches nothing, or when
        ``feedforward_modules`` selects a module outside the targets.
    """
    layout = detect_layout(model, IA3_LAYOUTS)
    target_spec = options.target_modules
    if target_spec is None:
        if layout is None:
            known = "; ".join(f"{arch}: {spec['target_modules']}" for arch, spec in IA3_LAYOUTS.items())
            raise TargetError(
                f"method 'ia3' has no default targets for {type(model).__name__} (known layouts by module-name "
                f"suffix: {known}); set option 'target_modules' to the key, value and feed-forward "
                "down-projection layers, and 'feedforward_modules' to the down-projection"
            )
        target_spec = IA3_LAYOUTS[layout]["target_modules"]
    targets = find_targets(model, target_spec, layers=options.layers)
    names = [name for name, _ in targets]
    if options.feedforward_modules is None:
        defaults = IA3_LAYOUTS[layout]["feedforward_modules"] if layout is not None else []
        feedforward = {n for n in names if any(has_suffix(n, s) for s in defaults)}
    elif isinstance(options.feedforward_modules, list) and not options.feedforward_modules:
        feedforward = set()
    else:
        # Resolved on the whole model, so that a module it names outside the targets is reported.
        matched = find_targets(
            model, options.feedforward_modules, layers=options.layers, linear_only=False, option="feedforward_modules"
        )
        feedforward = {name for name, _ in matched}
        outside = [name for name, _ in matched if name not in set(names)]
        if outside:
            raise TargetError(
                f"feedforward_modules={options.feedforward_modules!r} selects {', '.join(outside[:5])}, which "
                f"target_modules={target_spec!r} does not; feedforward_modules must select a subset of the targets"
            )
    return [(name, name in feedforward) for name in names]


class IA3Injector:
    name = "ia3"
    description = "(IA)^3: learned vectors rescale keys, values and FFN activations (Liu et al., 2022); exact merge"
    options = IA3Options
    supports_merge = True
    recommended_lr = 1e-2  # train.lr: auto; scaling vectors that start at 1: small relative steps need a larger rate
    peft_format = IA3PeftFormat()

    def inject(self, context: InjectionContext, options: IA3Options) -> None:
        for name, feedforward in ia3_targets(context.model, options):
            layer = context.wrap(name, options)
            layer.set_feedforward(context.adapter_name, feedforward)


@hookimpl
def peftkit_register_injectors(register: Callable[[Any], None]) -> None:
    register(IA3Injector())


@hookimpl(trylast=True)
def peftkit_layer_wrapper(method: str, layer: nn.Module, options: Any) -> Callable[..., nn.Module] | None:
    if method != "ia3":
        return None
    if isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D":
        return IA3Layer
    return None
