"""The sft objective: reply-only targets with the end-of-turn token, masking, lm_weight, registration."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.training.data import DataError
from peftkit.training.losses import IGNORE_INDEX
from peftkit.options import build_options
from peftkit.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def sft():
    return peftkit.plugin_manager().get_objective("sft")


def _options(sft, **values):
    return build_options(sft.options, values)


def _target_text(tok, example):
    return [tok.convert_ids_to_tokens(t) for t in example["labels"] if t != IGNORE_INDEX]


def test_registered_through_the_objectives_hook(sft):
    assert sft.name == "sft" and "packing" in sft.description


def test_pair_targets_are_the_reply_and_its_end_of_turn_token_only(sft):
    tok = tiny_tokenizer()
    [example] = sft.prepare_data([{"prompt": "what is 2 plus 3?", "response": "5"}], tok, _options(sft), 64)
    assert _target_text(tok, example) == ["5", "<|im_end|>"]
    # everything before the reply, including the assistant header, carries no loss
    header = tok.apply_chat_template([{"role": "user", "content": "what is 2 plus 3?"}], add_generation_prompt=True)["input_ids"]
    assert example["input_ids"][: len(header)] == header
    assert all(t == IGNORE_INDEX for t in example["labels"][: len(header)])


def test_every_assistant_turn_of_a_chat_is_a_target(sft):
    tok = tiny_tokenizer()
    messages = [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "what color is the sky?"},
        {"role": "assistant", "content": "blue"},
    ]
    [example] = sft.prepare_data([{"messages": messages}], tok, _options(sft), 128)
    assert _target_text(tok, example) == ["hi", "<|im_end|>", "blue", "<|im_end|>"]


def test_all_masked_batch_is_an_error(sft):
    tok = tiny_tokenizer()
    opts = _options(sft)
    [example] = sft.prepare_data([{"prompt": "hello", "response": "hi"}], tok, opts, 64)
    example["labels"] = [IGNORE_INDEX] * len(example["labels"])
    batch = sft.collate([example], tok)
    with pytest.raises(DataError, match="no target token"):
        sft.loss(tiny_llama(), batch, opts)


def test_truncation_drops_examples_without_reply_and_fails_when_none_remain(sft):
    tok = tiny_tokenizer()
    opts = _options(sft)
    long_prompt = " ".join(["hello"] * 30)
    records = [{"prompt": long_prompt, "response": "hi"}, {"prompt": "hello", "response": "hi"}]
    assert len(sft.prepare_data(records, tok, opts, 16)) == 1
    with pytest.raises(DataError, match="max_length"):
        sft.prepare_data(records[:1], tok, opts, 16)


def test_records_without_the_expected_keys_name_them(sft):
    with pytest.raises(DataError, match=r"record 0: its keys are \['question'\]"):
        sft.prepare_data([{"question": "x"}], tiny_tokenizer(), _options(sft), 32)


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"prompt": "hi", "response": None}, r"record 1: 'response' is null, not a string"),
        ({"prompt": "hi", "response": ["a", "b"]}, r"record 1: 'response' is a list \(\['a', 'b'\]\), not a string"),
        ({"prompt": 7, "response": "seven"}, r"record 1: 'prompt' is an int \(7\), not a string"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
         r"record 1: 'messages' message 1 'content' is null"),
    ],
)
def test_a_reply_or_prompt_that_is_not_a_string_is_refused_not_stringified(sft, record, expected):
    # str(None) would train on the text "None", str(list) on its repr
    with pytest.raises(DataError, match=expected):
        sft.prepare_data([{"prompt": "ok", "response": "fine"}, record], tiny_tokenizer(), _options(sft), 64)


def test_empty_replies_train_but_are_counted_in_one_warning(sft):
    from peftkit.training.data import DataWarning

    records = [{"prompt": "a", "response": ""}, {"prompt": "b", "response": "fine"}, {"prompt": "c", "response": "  "}]
    with pytest.warns(DataWarning, match="2 empty assistant replies in 3 records") as caught:
        examples = sft.prepare_data(records, tiny_tokenizer(), _options(sft), 64)
    assert len(examples) == 3 and len([w for w in caught if issubclass(w.category, DataWarning)]) == 1


def test_a_refused_record_is_named_by_file_and_number_in_a_run(tmp_path):
    import json

    from peftkit.training.recipe import recipe_from_dict
    from peftkit.training.trainer import Trainer

    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(6)]
    rows[4]["response"] = None
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_from_dict({
        "data": {"train": str(data), "eval_size": 2, "max_length": 32},
        "train": {"max_steps": 1, "batch_size": 2},
        "output": {"dir": str(tmp_path / "out")},
    })
    with pytest.raises(DataError, match=rf"data '{data}', record 5: 'response' is null, not a string"):
        Trainer(recipe, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False).train()


def test_loss_equals_the_models_own_loss_and_lm_weight_adds_the_prompt_loss(sft):
    tok = tiny_tokenizer()
    model = tiny_llama()
    records = [{"prompt": "what is 2 plus 3?", "response": "5"}, {"prompt": "hello there", "response": "hi, how are you?"}]
    opts = _options(sft, lm_weight=0.5, loss_chunk_size=3)
    batch = sft.collate(sft.prepare_data(records, tok, opts, 64), tok)
    out = sft.loss(model, batch, opts)
    with torch.no_grad():
        reply = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        prompt = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["prompt_labels"]).loss
    assert torch.allclose(out.loss, reply + 0.5 * prompt, atol=1e-5)
    assert out.num_targets == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    # padding is neither attended to nor a target
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_without_a_chat_template_the_reply_and_eos_are_targets(sft):
    tok = tiny_tokenizer(chat_template=False)
    [example] = sft.prepare_data([{"prompt": "hello", "response": "hi"}], tok, _options(sft), 32)
    assert _target_text(tok, example) == ["hi", "<|im_end|>"]


def test_options_are_validated(sft):
    with pytest.raises(peftkit.OptionsError, match="lm_weight"):
        _options(sft, lm_weight=-1.0)
