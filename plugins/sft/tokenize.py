"""Turning prompt/response pairs and chat ``messages`` into token ids with reply-only targets.

The targets of an assistant turn are found by tokenizing twice with the model's
chat template: the conversation *before* the turn with the generation prompt
(``... <|im_start|>assistant\\n``) and the conversation *through* the turn
(``... <|im_start|>assistant\\n{reply}<|im_end|>\\n``). The second must start
with the first (checked: a template that rewrites earlier turns is an error),
and the tokens in between are the reply, end-of-turn token included: without
it as a target the model never learns to stop. Separator tokens the template
puts after the end-of-turn token (the ``\\n``), which ``generate`` never
produces because it stops at end-of-turn, are not targets. This relies on no
``{% generation %}`` tags, which most templates lack.

Packing is off: each example is its own padded row, so no attention crosses
examples.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from peftkit.training.data import DataError
from peftkit.training.losses import IGNORE_INDEX

__all__ = ["to_messages", "tokenize_conversation"]


def to_messages(record: Mapping[str, Any], options: Any, index: int) -> list[dict[str, str]]:
    """The chat messages of one record (a ``messages`` list, or a prompt/response pair)."""
    if options.messages_key in record and record[options.messages_key] is not None:
        messages = record[options.messages_key]
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
            raise DataError(f"record {index}: {options.messages_key!r} must be a list of {{'role', 'content'}} dicts, got {messages!r:.200}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"record {index}: {options.messages_key!r} has no assistant message, so nothing to train on")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    if options.prompt_key in record and options.response_key in record:
        messages = [] if options.system_prompt is None else [{"role": "system", "content": options.system_prompt}]
        messages += [
            {"role": "user", "content": str(record[options.prompt_key])},
            {"role": "assistant", "content": str(record[options.response_key])},
        ]
        return messages
    raise DataError(
        f"record {index} has keys {sorted(record)}; SFT needs {options.messages_key!r} (a chat) or "
        f"{options.prompt_key!r} + {options.response_key!r} (set objective.options.prompt_key/response_key/messages_key)"
    )


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        ids = out["input_ids"] if isinstance(out, Mapping) else out
        return list(ids)
    # No chat template (a base model): "user text\n" then "reply<eos>".
    text = "".join(m["content"] + ("\n" if m["role"] != "assistant" else tokenizer.eos_token or "") for m in messages)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]], index: int) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation and, per token, whether it is a reply target.

    :raises DataError: if the chat template does not render the conversation incrementally.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    full = _render(tokenizer, messages[: last + 1], False)
    is_target = [False] * len(full)
    for turn, message in enumerate(messages[: last + 1]):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:turn], True)
        through = _render(tokenizer, messages[: turn + 1], False)
        if full[: len(before)] != before or full[: len(through)] != through:
            raise DataError(
                f"record {index}: the chat template does not render the conversation incrementally (turn {turn} "
                "changes earlier tokens), so reply tokens cannot be located; use prompt/response pairs or another template"
            )
        span = range(len(before), len(through))
        ends = [i for i in span if full[i] in special]
        stop = ends[-1] + 1 if ends else len(through)  # keep end-of-turn, drop the separator after it
        for i in range(len(before), stop):
            is_target[i] = True
    return full, is_target


def targets(ids: Sequence[int], is_target: Sequence[bool]) -> list[int]:
    """Labels for the loss: the token id where it is a target, ``-100`` elsewhere."""
    return [t if m else IGNORE_INDEX for t, m in zip(ids, is_target)]
