"""Options of the ``prefix_tuning`` method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: Most virtual tokens: each one is prepended to every input, and 65536 is past any context window
#: a PEFT run trains with (the paper's best settings use 5-100).
MAX_VIRTUAL_TOKENS = 65536
#: Widest reparameterization MLP: past any model's key/value width.
MAX_PROJECTION_HIDDEN_SIZE = 65536

__all__ = ["PrefixTuningOptions"]


@dataclass
class PrefixTuningOptions:
    """Prefix-tuning options.

    Attributes:
        num_virtual_tokens: prefix length ``P``: how many key/value vectors are
            prepended in every attention layer.
        projection: reparameterize the prefixes during training as
            ``MLP(E)`` with a trainable input ``E`` (P x kv_width) and a two-layer
            tanh MLP, as in the paper (and peft's ``prefix_projection``). The
            MLP is folded away when the adapter is saved for inference.
        projection_hidden_size: hidden width of that MLP (``None``: the
            key/value width ``num_key_value_heads * head_dim``, peft's default).
        init: ``"activations"`` (default): the prefixes start as the base
            model's own keys/values for ``P`` real tokens, so the model starts
            as if those tokens were prepended context (near the base model's
            loss); ``"random"``: standard normal, like peft (far from the base).
        init_token_ids: the ``P`` token ids whose activations initialize the
            prefixes (e.g. a tokenized task description); ``None``: ids drawn
            uniformly from the vocabulary with torch's global RNG.
    """

    num_virtual_tokens: int = 20
    projection: bool = False
    projection_hidden_size: int | None = None
    init: Literal["activations", "random"] = "activations"
    init_token_ids: list[int] | None = None

    def validate(self) -> list[str]:
        problems = []
        if self.num_virtual_tokens < 1:
            problems.append(f"option 'num_virtual_tokens' = {self.num_virtual_tokens!r} must be >= 1")
        if self.num_virtual_tokens > MAX_VIRTUAL_TOKENS:
            problems.append(
                f"option 'num_virtual_tokens' = {self.num_virtual_tokens!r} is too large: must be <= {MAX_VIRTUAL_TOKENS} "
                "(every input gets that many tokens more)"
            )
        if self.projection_hidden_size is not None:
            if self.projection_hidden_size < 1:
                problems.append(f"option 'projection_hidden_size' = {self.projection_hidden_size!r} must be >= 1")
            if self.projection_hidden_size > MAX_PROJECTION_HIDDEN_SIZE:
                problems.append(
                    f"option 'projection_hidden_size' = {self.projection_hidden_size!r} is too large: must be <= {MAX_PROJECTION_HIDDEN_SIZE}"
                )
            if not self.projection:
                problems.append(
                    f"option 'projection_hidden_size' = {self.projection_hidden_size!r} has no effect without "
                    "projection; set 'projection': true or drop 'projection_hidden_size'"
                )
        if self.init_token_ids is not None:
            if self.init != "activations":
                problems.append(
                    f"option 'init_token_ids' is only used with init='activations', not init={self.init!r}; "
                    "drop 'init_token_ids' or set 'init': 'activations'"
                )
            if len(self.init_token_ids) != self.num_virtual_tokens:
                problems.append(
                    f"option 'init_token_ids' has {len(self.init_token_ids)} ids but 'num_virtual_tokens' is "
                    f"{self.num_virtual_tokens}; give exactly one id per virtual token"
                )
            negative = [i for i in self.init_token_ids if i < 0]
            if negative:
                problems.append(f"option 'init_token_ids' holds negative ids {negative[:5]}; token ids are >= 0")
        return problems
