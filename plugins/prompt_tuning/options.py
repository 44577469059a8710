"""Options of the ``prompt_tuning`` method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: Most virtual tokens: each one is prepended to every input, and 65536 is past any context window
#: a PEFT run trains with (the paper's best settings use 5-100).
MAX_VIRTUAL_TOKENS = 65536

__all__ = ["PromptTuningOptions"]


@dataclass
class PromptTuningOptions:
    """Prompt-tuning options.

    Attributes:
        num_virtual_tokens: ``P``, the number of trainable virtual tokens prepended to every input.
        init: how the virtual tokens start:
            ``"vocab"`` (default): copies of the embeddings of ``P`` random vocabulary tokens;
            ``"random"``: normal noise with the standard deviation of the model's token embeddings;
            ``"text"``: the embeddings of a text's tokens, repeated or cut to ``P``
            (needs ``init_token_ids`` or ``init_text``).
        init_token_ids: token ids for ``init="text"``: the serializable form, needs no tokenizer.
            Build it with :func:`peftkit_plugins.prompt_tuning.token_ids_for_text`.
        init_text: a text for ``init="text"``, tokenized at injection (without special tokens) with
            ``tokenizer``, or with the tokenizer of ``model.config.name_or_path`` when ``tokenizer`` is unset.
            The resulting ids are recorded in ``init_token_ids``, so a saved adapter reloads without the
            tokenizer.
        tokenizer: a local path or hub name for ``AutoTokenizer.from_pretrained`` (only with ``init_text``).
    """

    num_virtual_tokens: int = 20
    init: Literal["vocab", "random", "text"] = "vocab"
    init_token_ids: list[int] | None = None
    init_text: str | None = None
    tokenizer: str | None = None

    def validate(self) -> list[str]:
        problems = []
        if self.num_virtual_tokens < 1:
            problems.append(f"option 'num_virtual_tokens' = {self.num_virtual_tokens!r} must be >= 1")
        if self.num_virtual_tokens > MAX_VIRTUAL_TOKENS:
            problems.append(
                f"option 'num_virtual_tokens' = {self.num_virtual_tokens!r} is too large: must be <= {MAX_VIRTUAL_TOKENS} "
                "(every input gets that many tokens more)"
            )
        if self.init == "text":
            if self.init_token_ids is None and not self.init_text:
                problems.append("option 'init' = 'text' needs 'init_token_ids' (a list of token ids) or 'init_text'")
        elif self.init_token_ids is not None or self.init_text is not None:
            given = "init_token_ids" if self.init_token_ids is not None else "init_text"
            problems.append(f"option {given!r} is only used with init='text', but init = {self.init!r}; set init='text'")
        if self.init_token_ids is not None:
            if not self.init_token_ids:
                problems.append("option 'init_token_ids' = [] is empty; give at least one token id")
            negative = [i for i in self.init_token_ids if i < 0]
            if negative:
                problems.append(f"option 'init_token_ids' holds negative ids {negative[:5]}; token ids are >= 0")
        if self.init_text is not None and not self.init_text:
            problems.append("option 'init_text' = '' is empty; give a text or leave it unset")
        if self.tokenizer is not None and self.init_text is None:
            problems.append(f"option 'tokenizer' = {self.tokenizer!r} is only used with 'init_text'; remove it or set init_text")
        return problems
