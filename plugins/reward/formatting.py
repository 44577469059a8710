"""How (prompt, response) text becomes token ids, shared by the reward and PPO objectives.

Both must see exactly the same layout, or the reward model scores sequences
unlike the ones PPO samples:

* the prompt is the user turn rendered with the tokenizer's chat template and
  the generation prompt (``<|im_start|>assistant\\n`` in ChatML) when the
  tokenizer has a template and ``chat_template`` is on; otherwise the text and
  a newline (the ``sft`` objective's layout, so an SFT adapter is the policy's start);
* the response is its text's tokens followed by the end token (the tokenizer's
  EOS, ``<|im_end|>`` for ChatML models), which is where a sampled response
  stops and where the reward head reads the sequence.
"""

from __future__ import annotations

from typing import Any, Mapping

from peftkit.errors import PeftkitError

__all__ = ["encode_prompt", "encode_response", "end_token_id"]


def end_token_id(tokenizer: Any) -> int:
    """The token that closes a response (the tokenizer's EOS)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise PeftkitError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; responses need an end token")
    return int(eos)


def encode_prompt(tokenizer: Any, prompt: str, *, chat_template: bool = True, system: str | None = None) -> list[int]:
    """Token ids of ``prompt`` as the model sees it just before the response (as the ``sft`` objective renders it)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return list(out["input_ids"] if isinstance(out, Mapping) else out)
    # No chat template (a base model): "user text\n", then the reply.
    return list(tokenizer(prompt + "\n", add_special_tokens=False)["input_ids"])


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Token ids of ``response`` followed by the end token."""
    return list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [end_token_id(tokenizer)]
