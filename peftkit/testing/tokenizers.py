"""A tiny offline tokenizer with a ChatML chat template, for tests (no downloads, fits ``tiny_llama``'s 128 ids)."""

from __future__ import annotations

from typing import Any

__all__ = ["tiny_tokenizer", "CHATML_TEMPLATE"]

# The same layout as SmolLM2/Qwen ChatML, without a default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SPECIAL = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
_WORDS = (
    "system user assistant you are a helpful the is of and to in what who how why when where which do does did "
    "can i it my your me hello hi good bad yes no thanks please tell about name capital france paris sky blue "
    "color what's plus minus equals answer question number add subtract reverse word letters count cat dog "
    "red green big small like love hate time day night sun moon one two three four five six seven eight nine ten"
).split()
_PUNCT = list(".,?!:;'\"-+=()")


def tiny_tokenizer(*, chat_template: bool = True) -> Any:
    """A word-level ``PreTrainedTokenizerFast`` (< 128 ids) with ChatML special tokens.

    Words outside its small vocabulary become ``<unk>``; digits are single tokens.
    ``eos_token`` is ``<|im_end|>`` (as in SmolLM2), ``pad_token`` is ``<pad>`` (id 0).

    :param chat_template: attach the ChatML template (``False``: a tokenizer without one).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*_SPECIAL, *_WORDS, *[str(d) for d in range(10)], *_PUNCT]:
        vocab.setdefault(token, len(vocab))
    assert len(vocab) <= 128, len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
