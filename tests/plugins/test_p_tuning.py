"""P-tuning: conformance, agreement with Hugging Face peft, training vs inference forms, options."""

from __future__ import annotations

import json

import pytest
import torch

import peftkit
from peftkit.errors import AdapterFormatError, MergeNotSupportedError, OptionsError
from peftkit.testing import CHECKS, check_injector, greedy_by_full_forward, sample_batch, tiny_gpt2, tiny_llama, train_steps
from peftkit_plugins.p_tuning import PromptEncoder

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
P = 4
HIDDEN = 16
GREEDY = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
ROWS = [[5, 17, 99, 42, 8, 63, 21], [77, 3, 51, 120], [9, 88, 14, 30, 65]]


def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _encoder(tuned: peftkit.TunedModel) -> PromptEncoder:
    return tuned.attached["default"].prompt.encoder


def _ours(model: str, **options) -> peftkit.TunedModel:
    options = {"num_virtual_tokens": P, "encoder_hidden_size": HIDDEN, **options}
    return peftkit.wrap(MODELS[model](), "p_tuning", **options)


# ------------------------------------------------------------------ conformance
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("check", CHECKS)
def test_conformance(model, check):
    check_injector("p_tuning", model_factory=MODELS[model], checks=[check], num_virtual_tokens=P, encoder_hidden_size=HIDDEN)


# The hooks are shared with the MLP encoder; what the LSTM changes is parameters, state and determinism.
@pytest.mark.parametrize("check", ["only_adapter_parameters_train", "save_load_roundtrip", "generate"])
def test_conformance_lstm(check):
    check_injector("p_tuning", checks=[check], num_virtual_tokens=P, encoder="lstm", encoder_hidden_size=8)


# ------------------------------------------------------------------ reference: Hugging Face peft
def _peft_twin(model: str, ours: peftkit.TunedModel, encoder: str = "MLP"):
    peft = pytest.importorskip("peft")
    ours_encoder = _encoder(ours)
    hidden = ours_encoder.lstm_head.hidden_size if encoder == "LSTM" else ours_encoder.mlp_head[0].out_features
    config = peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=hidden, encoder_reparameterization_type=encoder
    )
    reference = peft.get_peft_model(MODELS[model](), config).eval()
    # Same submodule names as peft's PromptEncoder: the weights copy key for key.
    reference.prompt_encoder["default"].load_state_dict(_encoder(ours).state_dict(), strict=True)
    return reference


@pytest.mark.parametrize("model", MODELS)
def test_logits_and_generate_match_peft_mlp(model):
    ours = _ours(model)
    reference = _peft_twin(model, ours)
    ids = torch.tensor([r[:4] for r in ROWS])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(_logits(ours, ids, mask), _logits(reference, ids, mask)[:, P:], atol=1e-5, rtol=0)
    with ours.disable_adapters():
        assert not torch.allclose(_logits(ours, ids, mask), _logits(reference, ids, mask)[:, P:], atol=1e-3)
    out = ours.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    # peft's own generate() is not the reference: under transformers >= 5.24 it loses the virtual tokens.
    assert torch.equal(out, greedy_by_full_forward(reference, ids, GREEDY["max_new_tokens"], suppress=[reference.config.eos_token_id]))

    # Left padding: peft ignores position ids (its padded rows shift), peftkit's are padding-aware,
    # so each left-padded row equals peft on the row alone.
    ids, mask = _left_padded(ROWS)
    got = _logits(ours, ids, mask)
    out = ours.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    for i, row in enumerate(ROWS):
        one = torch.tensor([row])
        expected = _logits(reference, one, torch.ones_like(one))[0, P:]
        torch.testing.assert_close(got[i, -len(row):], expected, atol=1e-5, rtol=0)
        expected_out = greedy_by_full_forward(reference, one, GREEDY["max_new_tokens"], suppress=[reference.config.eos_token_id])[0]
        assert torch.equal(out[i, ids.shape[1] - len(row):], expected_out), f"row {i}"


def test_logits_match_peft_lstm():
    ours = _ours("llama", encoder="lstm", encoder_hidden_size=8)
    reference = _peft_twin("llama", ours, encoder="LSTM")
    ids = torch.tensor([r[:4] for r in ROWS])
    mask = torch.ones_like(ids)
    torch.testing.assert_close(_logits(ours, ids, mask), _logits(reference, ids, mask)[:, P:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_state_dict_maps_to_peft_keys(encoder):
    peft = pytest.importorskip("peft")
    ours = _ours("llama", encoder=encoder.lower(), encoder_hidden_size=HIDDEN if encoder == "MLP" else 8)
    reference = _peft_twin("llama", ours, encoder=encoder)
    # peft's file holds the encoder output only, under the same name as peftkit's inference form.
    theirs = peft.get_peft_model_state_dict(reference)
    mine = ours.adapter_state_dict(training=False)
    assert set(theirs) == {"prompt_embeddings"} and set(mine) == {"attached.prompt_embeddings"}
    torch.testing.assert_close(mine["attached.prompt_embeddings"], theirs["prompt_embeddings"], atol=1e-6, rtol=0)
    # peft's in-memory encoder: prompt_encoder.<adapter>.<name>  <->  peftkit: attached.encoder.<name>
    in_memory = {k.removeprefix("prompt_encoder.default."): v for k, v in reference.state_dict().items() if k.startswith("prompt_encoder.")}
    training = ours.adapter_state_dict(training=True)
    assert set(training) == {"attached.prompt_embeddings"} | {f"attached.encoder.{k}" for k in in_memory}
    assert all(torch.equal(training[f"attached.encoder.{k}"], v) for k, v in in_memory.items())


# ------------------------------------------------------------------ training and inference forms
def test_inference_form_is_the_encoder_output():
    ours = _ours("gpt2")
    train_steps(ours, sample_batch(), steps=2)
    with torch.no_grad():
        expected = _encoder(ours)()
    state = ours.adapter_state_dict(training=False)
    assert set(state) == {"attached.prompt_embeddings"}
    assert torch.equal(state["attached.prompt_embeddings"], expected)
    assert state["attached.prompt_embeddings"].shape == (P, 32)


def test_inference_form_is_deterministic_with_lstm_dropout():
    ours = _ours("llama", encoder="lstm", encoder_hidden_size=8, encoder_num_layers=2, encoder_dropout=0.5)
    ours.train()
    first = ours.adapter_state_dict()["attached.prompt_embeddings"]
    assert torch.equal(first, ours.adapter_state_dict()["attached.prompt_embeddings"])
    assert _encoder(ours).training, "saving must not leave the encoder in eval mode"


@pytest.mark.parametrize("is_trainable", [False, True])
def test_inference_form_loads_as_fixed_embeddings(tmp_path, is_trainable):
    ours = _ours("llama")
    batch = sample_batch()
    train_steps(ours, batch, steps=2)
    ours.save(tmp_path / "adapter")  # inference form: no encoder
    loaded = peftkit.load(tiny_llama(), tmp_path / "adapter", is_trainable=is_trainable)
    prompt = loaded.attached["default"].prompt
    assert prompt.encoder is None and prompt.fixed is not None
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert torch.equal(_logits(loaded, ids, mask), _logits(ours, ids, mask))
    trainable = [n for n, _ in loaded.named_trainable_parameters()]
    if not is_trainable:
        assert trainable == []
        return
    # Loaded trainable, the embeddings themselves train (as in prompt tuning): the encoder is gone.
    assert trainable == ["attached.default.prompt.fixed.prompt_embeddings"]
    losses = train_steps(loaded, batch, steps=4, lr=0.05)
    assert losses[-1] < losses[0]
    again = loaded.adapter_state_dict(training=True)
    assert set(again) == {"attached.prompt_embeddings"}


def test_training_form_resumes_exactly(tmp_path):
    ours = _ours("llama")
    batch = sample_batch()
    train_steps(ours, batch, steps=2)
    ours.save(tmp_path / "checkpoint", training=True)
    resumed = peftkit.load(tiny_llama(), tmp_path / "checkpoint", is_trainable=True)
    assert _encoder(resumed) is not None
    # The same further steps (fresh optimizers on both sides) give bit-identical weights.
    train_steps(ours, batch, steps=2)
    train_steps(resumed, batch, steps=2)
    original, again = ours.adapter_state_dict(training=True), resumed.adapter_state_dict(training=True)
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_mismatched_encoder_weights_are_refused(tmp_path):
    ours = _ours("llama")
    ours.save(tmp_path / "checkpoint", training=True)
    config_file = tmp_path / "checkpoint" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["options"]["encoder_hidden_size"] = HIDDEN * 2
    config_file.write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="do not match the weights in it \\(nothing was allocated\\)"):
        peftkit.load(tiny_llama(), tmp_path / "checkpoint")


def test_encoder_output_prepended_in_model_dtype():
    tuned = peftkit.wrap(tiny_llama().to(torch.bfloat16), "p_tuning", num_virtual_tokens=P)
    assert all(p.dtype == torch.float32 for p in _encoder(tuned).parameters())
    batch = sample_batch()
    assert tuned(**batch).logits.dtype == torch.bfloat16
    assert _encoder(tuned).mlp_head[0].out_features == 32, "encoder_hidden_size defaults to the model's hidden size"


def test_merge_is_refused_with_reason():
    with pytest.raises(MergeNotSupportedError, match="p_tuning.*not a change of the base weights"):
        _ours("gpt2").merge()


# ------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_virtual_tokens": 0}, "'num_virtual_tokens' = 0 must be >= 1"),
        ({"encoder": "gru"}, "'encoder' = 'gru' is not valid"),
        ({"encoder_hidden_size": 0}, "'encoder_hidden_size' = 0 must be >= 1"),
        ({"encoder_num_layers": 3}, "only applies to encoder='lstm'"),
        ({"encoder_dropout": 0.1}, "only applies to encoder='lstm'"),
        ({"encoder": "lstm", "encoder_dropout": 1.0}, r"must be in \[0, 1\)"),
        ({"encoder": "lstm", "encoder_num_layers": 1, "encoder_dropout": 0.1}, "encoder_num_layers >= 2"),
        ({"encoder_type": "mlp"}, "did you mean 'encoder'"),
    ],
)
def test_options_validation(options, message):
    with pytest.raises(OptionsError, match=message):
        peftkit.wrap(tiny_llama(), "p_tuning", **options)
