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

from peftkit.training.data import RecordError, require_string
from peftkit.training.losses import IGNORE_INDEX

__all__ = ["to_messages", "tokenize_conversation", "empty_replies"]


def to_messages(record: Mapping[str, Any], options: Any, index: int) -> list[dict[str, str]]:
    """The chat messages of one record (a ``messages`` list, or a prompt/response pair).

    :raises RecordError: for a record without them, or with a role, content, prompt or reply that is not a string
        (``str()`` of it would train on text such as ``None`` or a list's repr).
    """
    key = options.messages_key
    if key in record and record[key] is not None:
        messages = record[key]
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
            raise RecordError(index, f"{key!r} must be a list of {{'role', 'content'}} dicts, got {messages!r:.200}")
        for turn, message in enumerate(messages):
            for field in ("role", "content"):
                require_string(message[field], f"{key!r} message {turn} {field!r}", index)
        if not any(m["role"] == "assistant" for m in messages):
            raise RecordError(index, f"{key!r} has no assistant message, so nothing to train on")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if options.prompt_key in record and options.response_key in record:
        require_string(record[options.prompt_key], repr(options.prompt_key), index)
        require_string(record[options.response_key], repr(options.response_key), index)
        messages = [] if options.system_prompt is None else [{"role": "system", "content": options.system_prompt}]
        messages += [
            {"role": "user", "content": record[options.prompt_key]},
            {"role": "assistant", "content": record[options.response_key]},
        ]
        return messages
    raise RecordError(
        index,
        f"its keys are {sorted(record)}; SFT needs {key!r} (a chat) or {options.prompt_key!r} + {options.response_key!r} "
        "(set objective.options.prompt_key/response_key/messages_key)",
    )


def empty_replies(messages: list[dict[str, str]]) -> int:
    """How many assistant turns of ``messages`` are empty (they teach only the end-of-turn token)."""
    return sum(1 for m in messages if m["role"] == "assistant" and not m["content"].strip())


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

    :raises RecordError: if the chat template does not render the conversation incrementally.
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
            raise RecordError(
                index,
                f"the chat template does not render the conversation incrementally (turn {turn} changes earlier "
                "tokens), so reply tokens cannot be located; use prompt/response pairs or another template",
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
