"""Options of the ``sft`` objective."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SftOptions"]

#: Largest lm_weight: GPT-1 used 0.5; 1000x the reply loss makes it the only loss, and larger weights
#: overflow float32 gradients.
MAX_LM_WEIGHT = 1000.0


@dataclass
class SftOptions:
    """How records become examples, and how the loss is computed.

    Attributes:
        prompt_key: record field holding the prompt (prompt/response records).
        response_key: record field holding the reply (prompt/response records).
        messages_key: record field holding a chat ``[{"role", "content"}, ...]`` list
            (takes precedence when present; every assistant turn is a target).
        system_prompt: a system message put before prompt/response pairs
            (``None``: whatever the chat template does without one).
        lm_weight: weight of the auxiliary language-modelling loss on prompt
            tokens (GPT-1's ``L3 = L2 + lambda * L1``); 0 turns it off; at most MAX_LM_WEIGHT.
        loss_chunk_size: positions per LM-head call in the chunked loss (bounds
            the logits held at once); 0: all labelled positions at once.
    """

    prompt_key: str = "prompt"
    response_key: str = "response"
    messages_key: str = "messages"
    system_prompt: str | None = None
    lm_weight: float = 0.0
    loss_chunk_size: int = 1024

    def validate(self) -> list[str]:
        problems = []
        if self.lm_weight < 0:
            problems.append(f"option 'lm_weight' = {self.lm_weight!r} must be >= 0")
        if self.lm_weight > MAX_LM_WEIGHT:
            problems.append(f"option 'lm_weight' = {self.lm_weight!r} is too large: must be <= {MAX_LM_WEIGHT:g}")
        if self.loss_chunk_size < 0:
            problems.append(f"option 'loss_chunk_size' = {self.loss_chunk_size!r} must be >= 0 (0: no chunking)")
        return problems
