"""Prompt tuning: conformance, agreement with Hugging Face peft, padding, generation, labels, init, options."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.errors import AdapterError, MergeNotSupportedError, OptionsError
from peftkit.testing import CHECKS, check_injector, greedy_by_full_forward, sample_batch, tiny_gpt2, tiny_llama, train_steps
from peftkit_plugins.prompt_tuning import token_ids_for_text
from peftkit_plugins.prompt_tuning.virtual_tokens import VirtualTokenAdapter

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
P = 4
GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
ROWS = [[5, 17, 99, 42, 8, 63, 21], [77, 3, 51, 120], [9, 88, 14, 30, 65]]  # three prompts of different lengths


def _padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with pad id 0 on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def _prompt(tuned: peftkit.TunedModel, name: str = "default") -> torch.nn.Parameter:
    return tuned.attached[name].prompt.prompt_embeddings


def _ours(model: str, seed: int = 0, **options) -> peftkit.TunedModel:
    """A prompt-tuned model whose virtual tokens are large enough to change the output clearly."""
    tuned = peftkit.wrap(MODELS[model](), "prompt_tuning", num_virtual_tokens=P, **options)
    with torch.no_grad():
        _prompt(tuned).copy_(torch.randn(_prompt(tuned).shape, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return tuned


def _logits(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


# ------------------------------------------------------------------ conformance
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("check", CHECKS)
def test_conformance(model, check):
    check_injector("prompt_tuning", model_factory=MODELS[model], checks=[check], num_virtual_tokens=P)


@pytest.mark.parametrize("init", ["random", "text"])
def test_conformance_other_inits(init):
    extra = {"init_token_ids": [5, 6, 7]} if init == "text" else {}
    check_injector("prompt_tuning", checks=["save_load_roundtrip", "generate"], num_virtual_tokens=P, init=init, **extra)


# ------------------------------------------------------------------ reference: Hugging Face peft
def _peft_twin(model: str, ours: peftkit.TunedModel):
    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(
        MODELS[model](), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    ).eval()
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(_prompt(ours))
    return reference


@pytest.mark.parametrize("model", MODELS)
def test_logits_match_peft(model):
    ours = _ours(model)
    reference = _peft_twin(model, ours)
    for side in ("none", "right"):
        ids, mask = _padded(ROWS, "right") if side == "right" else _padded([r[:4] for r in ROWS], "right")
        got = _logits(ours, ids, mask)
        expected = _logits(reference, ids, mask)[:, P:]  # peft's causal-LM logits include the virtual positions
        assert got.shape == ids.shape + (128,)
        real = mask.bool()
        torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    # And the adapter really changes the output.
    with ours.disable_adapters():
        assert not torch.allclose(_logits(ours, ids, mask)[real], got[real], atol=1e-3)


@pytest.mark.parametrize("model", MODELS)
def test_left_padding_matches_peft_row_by_row(model):
    # peft drops position_ids for prompt learning, so its own left-padded rows are shifted
    # by their padding; peftkit's positions are padding-aware, so each left-padded row
    # must equal peft on that row without padding.
    ours = _ours(model)
    reference = _peft_twin(model, ours)
    ids, mask = _padded(ROWS, "left")
    got = _logits(ours, ids, mask)
    for i, row in enumerate(ROWS):
        one = torch.tensor([row])
        expected = _logits(reference, one, torch.ones_like(one))[0, P:]
        torch.testing.assert_close(got[i, -len(row):], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", MODELS)
def test_generate_matches_peft(model):
    ours = _ours(model)
    reference = _peft_twin(model, ours)
    ids, mask = _padded([r[:5] for r in ROWS], "left")  # equal lengths: no padding
    out = ours.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert out.shape == (3, 5 + 6)
    # peft's own generate() is not the reference: under transformers >= 5.24 it loses the virtual tokens.
    assert torch.equal(out, greedy_by_full_forward(reference, ids, GREEDY["max_new_tokens"], suppress=[reference.config.eos_token_id]))

    ids, mask = _padded(ROWS, "left")
    out = ours.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(out[:, : ids.shape[1]], ids), "generate must return the real prompt, no virtual positions"
    for i, row in enumerate(ROWS):
        one = torch.tensor([row])
        expected = greedy_by_full_forward(reference, one, GREEDY["max_new_tokens"], suppress=[reference.config.eos_token_id])[0]
        assert torch.equal(out[i, ids.shape[1] - len(row):], expected), f"row {i}"


@pytest.mark.parametrize("model", MODELS)
def test_state_dict_maps_to_peft_keys(model):
    peft = pytest.importorskip("peft")
    ours = _ours(model)
    reference = _peft_twin(model, ours)
    theirs = peft.get_peft_model_state_dict(reference)
    mine = ours.adapter_state_dict()
    assert set(theirs) == {"prompt_embeddings"}
    assert set(mine) == {"attached.prompt_embeddings"}
    assert torch.equal(mine["attached.prompt_embeddings"], theirs["prompt_embeddings"])


# ------------------------------------------------------------------ padding, positions, generation
@pytest.mark.parametrize("model", MODELS)
def test_left_and_right_padding_agree(model):
    ours = _ours(model)
    left_ids, left_mask = _padded(ROWS, "left")
    right_ids, right_mask = _padded(ROWS, "right")
    left, right = _logits(ours, left_ids, left_mask), _logits(ours, right_ids, right_mask)
    torch.testing.assert_close(left[left_mask.bool()], right[right_mask.bool()], atol=1e-5, rtol=0)
    # Generation from left-padded prompts equals generating each prompt alone.
    out = ours.generate(input_ids=left_ids, attention_mask=left_mask, **GREEDY)
    for i, row in enumerate(ROWS):
        one = torch.tensor([row])
        alone = ours.generate(input_ids=one, attention_mask=torch.ones_like(one), **GREEDY)[0]
        assert torch.equal(out[i, left_ids.shape[1] - len(row):], alone)


@pytest.mark.parametrize("model", MODELS)
def test_generate_without_cache_and_without_mask(model):
    ours = _ours(model)
    ids, mask = _padded(ROWS, "left")
    scored = dict(GREEDY, output_scores=True, return_dict_in_generate=True)
    cached = ours.generate(input_ids=ids, attention_mask=mask, **scored)
    uncached = ours.generate(input_ids=ids, attention_mask=mask, use_cache=False, **scored)
    assert torch.equal(uncached.sequences, cached.sequences)
    # Step by step the cached path (mask extended, positions shifted) scores like the full recomputation.
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-5, rtol=0)
    one = torch.tensor([ROWS[0]])
    assert torch.equal(
        ours.generate(input_ids=one, **GREEDY), ours.generate(input_ids=one, attention_mask=torch.ones_like(one), **GREEDY)
    )


def test_generate_from_embeds_in_chunks_and_with_beams():
    ours = _ours("gpt2")
    ids, mask = _padded([r[:5] for r in ROWS], "left")
    expected = ours.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    embeds = ours.get_input_embeddings()(ids).detach()
    assert torch.equal(ours.generate(inputs_embeds=embeds, attention_mask=mask, **GREEDY), expected[:, 5:])
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, prefill_chunk_size=2, **GREEDY), expected)
    beams = ours.generate(input_ids=ids, attention_mask=mask, num_beams=2, **GREEDY)
    assert beams.shape == expected.shape and torch.equal(beams[:, :5], ids)


def test_deepcopy_gives_an_independent_adapter():
    import copy

    ours = _ours("llama")
    twin = copy.deepcopy(ours)
    ids, mask = _padded(ROWS, "left")
    expected = _logits(ours, ids, mask)
    assert torch.equal(_logits(twin, ids, mask), expected)
    with twin.disable_adapters():
        assert torch.equal(_logits(ours, ids, mask), expected), "disabling the copy must not touch the original"
        assert not torch.equal(_logits(twin, ids, mask), expected)


@pytest.mark.parametrize("model", MODELS)
def test_inputs_embeds_position_ids_and_hidden_states(model):
    ours = _ours(model)
    ids, mask = _padded(ROWS, "left")
    expected = _logits(ours, ids, mask)
    with torch.no_grad():
        embeds = ours.get_input_embeddings()(ids)
        from_embeds = ours(inputs_embeds=embeds, attention_mask=mask).logits
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with_positions = ours(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(from_embeds, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_positions[mask.bool()], expected[mask.bool()], atol=1e-6, rtol=0)
    assert all(h.shape[:2] == ids.shape for h in out.hidden_states), "hidden states must cover the real tokens only"


@pytest.mark.parametrize("model", MODELS)
def test_loss_covers_real_tokens_only(model):
    ours = _ours(model)
    ids, mask = _padded(ROWS, "right")
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    # The standard shifted loss over the real positions: virtual positions have no output, i.e. are -100.
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, atol=1e-6, rtol=0)


def test_sequence_classification_head_sees_real_tokens():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, num_labels=1,
    )
    tuned = peftkit.wrap(LlamaForSequenceClassification(config).eval(), "prompt_tuning", num_virtual_tokens=P)
    ids, mask = _padded(ROWS, "right")
    batched = _logits(tuned, ids, mask)  # the head picks each row's last real token from input_ids
    for i, row in enumerate(ROWS):
        one = torch.tensor([row])
        torch.testing.assert_close(batched[i], _logits(tuned, one, torch.ones_like(one))[0], atol=1e-5, rtol=0)


def test_bfloat16_model_keeps_float32_prompt():
    tuned = peftkit.wrap(tiny_llama().to(torch.bfloat16), "prompt_tuning", num_virtual_tokens=P)
    assert _prompt(tuned).dtype == torch.float32
    batch = sample_batch()
    assert tuned(**batch).logits.dtype == torch.bfloat16
    assert tuned.generate(input_ids=batch["input_ids"][:, :3], **GREEDY).shape == (2, 9)


def test_rejects_4d_mask_and_foreign_cache():
    tuned = _ours("llama")
    ids, mask = _padded(ROWS, "left")
    with pytest.raises(ValueError, match="2-D attention_mask"):
        tuned(input_ids=ids, attention_mask=mask[:, None, None, :].float())
    with tuned.disable_adapters():
        cache = tuned(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values  # no virtual tokens in it
    step = torch.ones(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask has 8 columns, expected 4"):
        tuned(input_ids=step, attention_mask=torch.ones(3, ids.shape[1] + 1, dtype=torch.long), past_key_values=cache)


# ------------------------------------------------------------------ adapters, hooks, merge
def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_two_adapters_switch_and_delete_remove_hooks():
    base = tiny_llama()
    before = _hook_count(base)
    ids, mask = _padded(ROWS, "left")
    expected_base = _logits(base, ids, mask)
    tuned = peftkit.wrap(base, "prompt_tuning", adapter_name="a", num_virtual_tokens=3)
    tuned.add_adapter("b", "prompt_tuning", num_virtual_tokens=5)
    assert isinstance(tuned.attached["b"], VirtualTokenAdapter)
    a_out = _logits(tuned, ids, mask)
    tuned.set_adapter("b")
    b_out = _logits(tuned, ids, mask)
    alone = peftkit.wrap(tiny_llama(), "prompt_tuning", adapter_name="b", num_virtual_tokens=5)
    with torch.no_grad():
        _prompt(alone, "b").copy_(_prompt(tuned, "b"))
    assert torch.equal(b_out, _logits(alone, ids, mask))
    assert not torch.equal(a_out, b_out)
    with tuned.disable_adapters():
        assert torch.equal(_logits(tuned, ids, mask), expected_base)
    tuned.delete_adapter("b")
    assert torch.equal(_logits(tuned, ids, mask), a_out)
    tuned.delete_adapter("a")
    assert _hook_count(base) == before
    assert torch.equal(_logits(base, ids, mask), expected_base)


def test_merge_is_refused_with_reason():
    tuned = _ours("llama")
    with pytest.raises(MergeNotSupportedError, match="prompt_tuning.*virtual tokens are extra input embeddings"):
        tuned.merge()


# ------------------------------------------------------------------ initialisation
def test_vocab_init_copies_vocabulary_rows():
    tuned = peftkit.wrap(tiny_llama(), "prompt_tuning", num_virtual_tokens=6)
    vocab = tuned.get_input_embeddings().weight
    for row in _prompt(tuned):
        assert (vocab == row).all(dim=1).any(), "each virtual token starts as some vocabulary embedding"


def test_random_init_matches_embedding_scale():
    tuned = peftkit.wrap(tiny_llama(), "prompt_tuning", num_virtual_tokens=64, init="random")
    std = float(tuned.get_input_embeddings().weight.std())
    assert 0.5 * std < float(_prompt(tuned).detach().std()) < 2 * std


def test_text_init_from_token_ids_repeats_and_cuts():
    for count, expected in ((7, [5, 6, 7, 5, 6, 7, 5]), (2, [5, 6])):
        tuned = peftkit.wrap(tiny_gpt2(), "prompt_tuning", num_virtual_tokens=count, init="text", init_token_ids=[5, 6, 7])
        weight = tuned.get_input_embeddings().weight
        assert torch.equal(_prompt(tuned), weight[expected])


def _tokenizer_dir(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "classify": 5, "the": 6, "review": 7, ":": 8}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(str(path))
    return str(path)


def test_text_init_from_init_text_records_ids_and_reloads_without_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    tokenizer_dir = _tokenizer_dir(tmp_path / "tokenizer")
    ids = token_ids_for_text(AutoTokenizer.from_pretrained(tokenizer_dir), "classify the review :")
    assert ids == [5, 6, 7, 8]
    tuned = peftkit.wrap(
        tiny_llama(), "prompt_tuning", num_virtual_tokens=6, init="text", init_text="classify the review :",
        tokenizer=tokenizer_dir,
    )
    assert torch.equal(_prompt(tuned), tuned.get_input_embeddings().weight[[5, 6, 7, 8, 5, 6]])
    assert tuned.adapter_info("default").options.init_token_ids == [5, 6, 7, 8]
    tuned.save(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["options"]
    assert saved["init_token_ids"] == [5, 6, 7, 8]
    (tmp_path / "tokenizer" / "tokenizer.json").unlink()  # reloading must not need the tokenizer
    loaded = peftkit.load(tiny_llama(), tmp_path / "adapter")
    assert torch.equal(_prompt(loaded), _prompt(tuned))


def test_text_init_uses_the_models_own_tokenizer_by_default(tmp_path):
    model = tiny_llama()
    model.config._name_or_path = _tokenizer_dir(tmp_path / "model")  # as from_pretrained(path) records it
    tuned = peftkit.wrap(model, "prompt_tuning", num_virtual_tokens=2, init="text", init_text="review the")
    assert tuned.adapter_info("default").options.init_token_ids == [7, 6]


def test_text_init_without_tokenizer_says_how_to_fix():
    with pytest.raises(AdapterError, match="needs a tokenizer.*init_token_ids"):
        peftkit.wrap(tiny_llama(), "prompt_tuning", init="text", init_text="hello")


# ------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_virtual_tokens": 0}, "'num_virtual_tokens' = 0 must be >= 1"),
        ({"init": "text"}, "needs 'init_token_ids'"),
        ({"init": "words"}, "'init' = 'words' is not valid"),
        ({"init_token_ids": [1, 2]}, "only used with init='text'"),
        ({"init": "text", "init_token_ids": []}, "is empty"),
        ({"init": "text", "init_token_ids": [-1]}, "negative ids"),
        ({"init": "text", "init_token_ids": [1], "tokenizer": "x"}, "'tokenizer' = 'x' is only used with 'init_text'"),
        ({"num_virtual_token": 3}, "did you mean 'num_virtual_tokens'"),
    ],
)
def test_options_validation(options, message):
    with pytest.raises(OptionsError, match=message):
        peftkit.wrap(tiny_llama(), "prompt_tuning", **options)


def test_options_report_every_problem_at_once():
    with pytest.raises(OptionsError) as info:
        peftkit.wrap(tiny_llama(), "prompt_tuning", num_virtual_tokens=0, init_text="x")
    assert len(info.value.problems) == 2


def test_out_of_vocabulary_init_ids_are_refused():
    with pytest.raises(AdapterError, match=r"ids \[500\] outside the model's vocabulary of 128"):
        peftkit.wrap(tiny_llama(), "prompt_tuning", init="text", init_token_ids=[5, 500])


def test_training_moves_only_the_prompt():
    tuned = peftkit.wrap(tiny_gpt2(), "prompt_tuning", num_virtual_tokens=P)
    assert [n for n, _ in tuned.named_trainable_parameters()] == ["attached.default.prompt.prompt_embeddings"]
    losses = train_steps(tuned, sample_batch(), steps=5, lr=0.1)
    assert losses[-1] < losses[0]
