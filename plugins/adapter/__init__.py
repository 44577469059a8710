"""Bottleneck adapters (Houlsby et al., 2019, https://arxiv.org/abs/1902.00751).

A small bottleneck network with a residual is inserted after chosen layers.
For the output ``h`` (d features) of an adapted layer::

    y = h + W_up f(W_down h + b_down) + b_up      # W_down: m x d, W_up: d x m, m << d

with ``f`` one of relu, gelu, silu, tanh. ``W_up`` and ``b_up`` start at zero, so
training starts exactly at the base model.

Placement (option ``placement``):

* ``"houlsby"``: after the attention output projection and after the
  feed-forward output projection of every block (Houlsby et al., 2019);
* ``"pfeiffer"``: after the feed-forward output projection only (Pfeiffer et
  al., 2020, "AdapterFusion", https://arxiv.org/abs/2005.00247). The original
  reads the feed-forward's residual-stream input as well; here, as for Houlsby,
  the adapter sits on the projection's output, before the block's own residual add.

The projections are found by a per-architecture table of module-name suffixes
(:data:`peftkit_plugins.adapter.architectures.ADAPTER_LAYOUTS`: Llama-style
``self_attn.o_proj`` / ``mlp.down_proj``, GPT-2-style ``attn.c_proj`` /
``mlp.c_proj``); other models set ``target_modules``.

The adapter cannot be merged: ``f`` is nonlinear, so ``y`` is no linear map of
the layer's input (``supports_merge = False``).

This package registers the ``adapter`` method and answers the
``peftkit_layer_wrapper`` hook for ``nn.Linear`` and transformers' ``Conv1D``
(with ``trylast``, so other plugins can wrap other layer types).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from peftkit.errors import TargetError
from peftkit.hookspecs import hookimpl
from peftkit.injection import InjectionContext
from peftkit_plugins.adapter.architectures import ADAPTER_LAYOUTS, detect_layout
from peftkit_plugins.adapter.layer import MERGE_REFUSAL, BottleneckAdapterLayer
from peftkit_plugins.adapter.options import AdapterOptions

__all__ = ["AdapterInjector", "AdapterOptions", "BottleneckAdapterLayer", "adapter_targets"]


def adapter_targets(model: nn.Module, options: AdapterOptions) -> dict[str, str | list[str]]:
    """Role -> target spec for the roles ``options.placement`` uses.

    :raises TargetError: when ``target_modules`` is not given and the model's
        architecture is not in the default table.
    """
    if options.target_modules is not None:
        return {role: options.target_modules[role] for role in options.roles}
    layout = detect_layout(model, ADAPTER_LAYOUTS)
    if layout is None:
        known = "; ".join(f"{arch}: {roles}" for arch, roles in ADAPTER_LAYOUTS.items())
        raise TargetError(
            f"method 'adapter' does not know where the attention and feed-forward outputs of "
            f"{type(model).__name__} are (known layouts by module-name suffix: {known}); "
            "set option 'target_modules' to {'attention': [<attention output projection>], "
            "'feedforward': [<feed-forward output projection>]} (module-name suffixes or a full-match regex)"
        )
    return {role: ADAPTER_LAYOUTS[layout][role] for role in options.roles}


class AdapterInjector:
    name = "adapter"
    description = "Bottleneck adapters h + W_up f(W_down h) after attention/FFN outputs (Houlsby et al., 2019)"
    options = AdapterOptions
    supports_merge = False
    recommended_lr = 1e-3  # train.lr: auto; bottleneck MLPs with a zero-initialised up-projection, as LoRA
    merge_refusal = MERGE_REFUSAL

    def inject(self, context: InjectionContext, options: AdapterOptions) -> None:
        for spec in adapter_targets(context.model, options).values():
            for name, _ in context.find_targets(spec, layers=options.layers):
                context.wrap(name, options)


@hookimpl
def peftkit_register_injectors(register: Callable[[Any], None]) -> None:
    register(AdapterInjector())


@hookimpl(trylast=True)
def peftkit_layer_wrapper(method: str, layer: nn.Module, options: Any) -> Callable[..., nn.Module] | None:
    if method != "adapter":
        return None
    if isinstance(layer, nn.Linear) or type(layer).__name__ == "Conv1D":
        return BottleneckAdapterLayer
    return None
