"""``PrefixTuningLayer``: the prefixes of one adapter, and the hook that hands them to the decoder.

It is attached to the tuned model (``context.attach``), not wrapped around a
layer: it owns the trainable tensors and two hooks on the decoder backbone (one
before its forward, one after), removed in :meth:`PrefixTuningLayer.delete_adapter`.

Two parameterizations (Li & Liang, 2021, https://arxiv.org/abs/2101.00190)::

    direct:      prefix = θ                                    θ: (L, 2, H_kv, P, D)
    projection:  prefix = W2 · tanh(W1 · E + b1) + b2          E: (P, H_kv·D), reshaped to (L, 2, H_kv, P, D)

The projection form is folded into the direct one for inference:
``adapter_state_dict(name, training=False)`` returns only ``prefix``;
``training=True`` keeps ``E`` and the MLP so training can resume.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from peftkit.compat import cache_argument, find_cache, pop_cache
from peftkit.errors import AdapterError, MergeNotSupportedError
from peftkit_plugins.prefix_tuning.backbone import KVGeometry, input_embedding_weight
from peftkit_plugins.prefix_tuning.kv_cache import add_prefix_to_inputs, drop_unrequested_cache, prefix_owner
from peftkit_plugins.prefix_tuning.options import PrefixTuningOptions

__all__ = ["PrefixTuningLayer", "MERGE_REFUSAL"]

MERGE_REFUSAL = (
    "its prefixes are extra key/value entries that every attention softmax normalizes over together with the "
    "real tokens, not a change to any weight matrix, so no base weight can absorb them; keep the adapter "
    "loaded (its inference form is only the prefix tensors)"
)

_MLP_KEYS = ("embedding", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")


class PrefixTuningLayer(nn.Module):
    """The key/value prefixes of one adapter for every attention layer of ``backbone``.

    :param backbone: the decoder stack (it receives a forward pre-hook and a forward hook).
    :param config: the model's config (for the caches it creates).
    :param adapter_name: the adapter's name.
    :param options: validated options.
    :param geometry: what each layer caches (from :func:`~.backbone.cached_keys_values`).
    :param initial_prefix: ``(L, 2, H_kv, P, D)`` starting prefixes, or ``None`` for peft's
        random init (standard normal ``θ`` or ``E``, default ``nn.Linear`` MLP).
    """

    peftkit_method = "prefix_tuning"

    def __init__(
        self,
        backbone: nn.Module,
        config: Any,
        adapter_name: str,
        options: PrefixTuningOptions,
        geometry: KVGeometry,
        initial_prefix: torch.Tensor | None,
    ):
        super().__init__()
        self.adapter_name = adapter_name
        self.geometry = geometry
        self.num_virtual_tokens = options.num_virtual_tokens
        self._active = False
        # The input embeddings stay in float even in quantized models: their dtype is the compute dtype.
        embedding = input_embedding_weight(backbone)
        dtype = embedding.dtype if embedding.dtype.is_floating_point else torch.float32
        factory = dict(device=embedding.device, dtype=dtype)
        L, H, P, D = geometry.num_layers, geometry.num_kv_heads, options.num_virtual_tokens, geometry.head_dim

        self.prefix: nn.Parameter | None = None
        self.embedding: nn.Parameter | None = None
        self.transform: nn.Sequential | None = None
        if options.projection:
            hidden = options.projection_hidden_size or geometry.width
            self.embedding = nn.Parameter(torch.randn(P, geometry.width, **factory))  # peft: nn.Embedding's N(0, 1)
            self.transform = nn.Sequential(
                nn.Linear(geometry.width, hidden, **factory),
                nn.Tanh(),
                nn.Linear(hidden, L * 2 * geometry.width, **factory),
            )
            if initial_prefix is not None:
                self._fit_output(initial_prefix)
        else:
            start = initial_prefix if initial_prefix is not None else torch.randn(L, 2, H, P, D)
            self.prefix = nn.Parameter(start.to(**factory).clone())

        # The signature lets the hook find arguments however the caller passed them.
        self._signature = inspect.signature(backbone.forward)
        self._cache_name = cache_argument(backbone.forward) or "past_key_values"
        self._config = config
        self._hook = backbone.register_forward_pre_hook(self._before_backbone_forward, with_kwargs=True)
        self._output_hook = backbone.register_forward_hook(self._after_backbone_forward)

    def _fit_output(self, target_prefix: torch.Tensor) -> None:
        """Set ``W2, b2`` so the MLP's output is ``target_prefix`` while ``E, W1, b1`` keep their random init.

        ``b2`` is the mean over virtual tokens and ``W2`` the minimum-norm solution of
        ``tanh(W1 E + b1) W2^T = target - b2``, exact (to rounding) when the hidden
        width is at least ``P``. Every parameter then gets gradients from the first
        step, unlike a zero ``W2`` (which would also force all ``P`` prefixes equal).
        """
        with torch.no_grad():
            target = _flatten(target_prefix).float()  # (P, L * 2 * H_kv * D)
            bias = target.mean(dim=0)
            hidden = torch.tanh(self.transform[0](self.embedding))  # (P, hidden)
            # Only the small (hidden, P) pseudo-inverse in float64: W2 itself can be large.
            inverse = torch.linalg.pinv(hidden.double()).float()  # (hidden, P)
            self.transform[2].weight.copy_((inverse @ (target - bias)).T)
            self.transform[2].bias.copy_(bias)

    # ------------------------------------------------------------- prefixes
    @property
    def is_projected(self) -> bool:
        """Whether the prefixes are computed by the projection MLP (training form)."""
        return self.transform is not None

    def prefixes(self) -> torch.Tensor:
        """The ``(L, 2, H_kv, P, D)`` key (index 0) and value (index 1) prefixes."""
        if self.transform is None:
            return self.prefix
        flat = self.transform(self.embedding)  # (P, L * 2 * H_kv * D)
        g = self.geometry
        return flat.view(self.num_virtual_tokens, g.num_layers, 2, g.num_kv_heads, g.head_dim).permute(1, 2, 3, 0, 4)

    # ----------------------------------------------------------- the hook
    def _before_backbone_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache = find_cache(kwargs)
        if not self._active:
            filled = prefix_owner(cache)
            if filled is not None and filled[0] == (self.adapter_name, id(self)):
                raise AdapterError(
                    f"past_key_values holds the prefix of adapter {self.adapter_name!r}, which is not active now; "
                    "start a new cache (or none) after switching or disabling adapters"
                )
            return None
        if module.training and any(getattr(m, "gradient_checkpointing", False) for m in module.modules()):
            raise AdapterError(
                f"prefix_tuning (adapter {self.adapter_name!r}) passes its prefixes through the KV cache, which "
                "transformers' gradient checkpointing drops in training; call gradient_checkpointing_disable()"
            )
        bound = self._signature.bind_partial(*args, **kwargs)
        arguments = bound.arguments
        var_keyword = [p.name for p in self._signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
        extra = arguments.pop(var_keyword[0], {}) if var_keyword else {}
        # The caller may use either name for the cache (transformers >= 5.24 calls it ``cache``).
        cache = pop_cache(arguments)
        cache = pop_cache(extra) if cache is None else cache
        if cache is not None:
            arguments[self._cache_name] = cache
        add_prefix_to_inputs(
            arguments,
            cache_name=self._cache_name,
            owner=(self.adapter_name, id(self)),
            num_virtual_tokens=self.num_virtual_tokens,
            prefix=self.prefixes,
            config=self._config,
            dtype=self._compute_dtype(module, arguments),
        )
        return (), {**arguments, **extra}

    def _after_backbone_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return drop_unrequested_cache(output) if self._active else None

    @staticmethod
    def _compute_dtype(module: nn.Module, arguments: dict[str, Any]) -> torch.dtype:
        """The dtype the model's keys/values come out in (autocast's, else the input embeddings')."""
        embeds = arguments.get("inputs_embeds")
        weight = input_embedding_weight(module)
        device = embeds.device if embeds is not None else weight.device
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return embeds.dtype if embeds is not None else weight.dtype

    # ------------------------------------------------------- AdapterLayer
    def adapter_names(self) -> list[str]:
        return [self.adapter_name] if self._hook is not None else []

    def set_active_adapters(self, names: Sequence[str]) -> None:
        self._active = self.adapter_name in names

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        self._check(name)
        if self.transform is None:
            yield self.prefix
        else:
            yield self.embedding
            yield from self.transform.parameters()

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        self._check(name)
        if self.transform is None:
            return {"prefix": self.prefix}
        if not training:
            with torch.no_grad():
                return {"prefix": self.prefixes().contiguous()}
        state = {"embedding": self.embedding}
        state.update({f"transform.{k}": v for k, v in self.transform.state_dict(keep_vars=True).items()})
        return state

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """Load either form: ``{"prefix"}`` (inference; folds away an MLP) or the MLP's tensors (training)."""
        self._check(name)
        keys = set(state)
        if keys == {"prefix"}:
            if self.transform is not None:
                self._fold()
            self._copy(self.prefix, state["prefix"], "prefix")
        elif keys == set(_MLP_KEYS):
            if self.transform is None:
                raise KeyError(
                    f"the tensors are the projection MLP's ({sorted(keys)}) but adapter {name!r} was created "
                    "without projection; create it with projection=True to resume this training state"
                )
            self._copy(self.embedding, state["embedding"], "embedding")
            for key, param in self.transform.state_dict(keep_vars=True).items():
                self._copy(param, state[f"transform.{key}"], f"transform.{key}")
        else:
            raise KeyError(
                f"expected {{'prefix'}} or {sorted(_MLP_KEYS)} for prefix adapter {name!r}, got {sorted(keys)}"
            )

    def fold(self) -> None:
        """Replace the projection MLP by the prefixes it computes now (no-op without projection)."""
        if self.transform is not None:
            self._fold()

    def _fold(self) -> None:
        with torch.no_grad():
            folded = self.prefixes().detach().contiguous()
        requires_grad = self.embedding.requires_grad
        self.embedding = None
        self.transform = None
        self.prefix = nn.Parameter(folded, requires_grad=requires_grad)

    @staticmethod
    def _copy(param: torch.Tensor, value: torch.Tensor, key: str) -> None:
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{key} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value)

    def delete_adapter(self, name: str) -> None:
        self._check(name)
        self._hook.remove()
        self._output_hook.remove()
        self._hook = self._output_hook = None
        self._active = False

    def merge(self, name: str) -> None:
        raise MergeNotSupportedError(f"method 'prefix_tuning' (adapter {name!r}) cannot be merged: {MERGE_REFUSAL}")

    def unmerge(self, name: str) -> None:
        pass  # never merged

    def _check(self, name: str) -> None:
        if name != self.adapter_name or self._hook is None:
            raise KeyError(f"this prefix module holds adapter {self.adapter_name!r}, not {name!r}")

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"adapter={self.adapter_name!r}, num_virtual_tokens={self.num_virtual_tokens}, layers={g.num_layers}, "
            f"kv_heads={g.num_kv_heads}, head_dim={g.head_dim}, projection={self.is_projected}"
        )


def _flatten(prefix: torch.Tensor) -> torch.Tensor:
    """``(L, 2, H_kv, P, D)`` -> ``(P, L * 2 * H_kv * D)`` rows, the MLP's output layout (and peft's)."""
    layers, two, heads, tokens, head_dim = prefix.shape
    return prefix.permute(3, 0, 1, 2, 4).reshape(tokens, layers * two * heads * head_dim)
