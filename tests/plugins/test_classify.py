"""Tests of the ``classify`` objective: the loss against a direct computation, macro-F1, the head's save/load, the CLI, every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.testing import tiny_llama
from peftkit_plugins.classify import (
    ClassifyObjective,
    ClassifyOptions,
    accuracy,
    attach_label_head,
    evaluate_classifier,
    load_label_head,
    macro_f1,
    save_label_head,
)
from peftkit_plugins.classify.data import collate, prepare_data

LABELS = ["food", "sports", "weather"]
RECORDS = [
    {"text": "I ate a pizza", "label": "food"},
    {"text": "the match was great", "label": "sports"},
    {"text": "rain all day", "label": "weather"},
    {"text": "soup!", "label": "food"},
]


def char_tokenizer():
    """A character-level tokenizer for the 128-token tiny models: pad 0, bos 1, eos 2, printable ASCII 3..97."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


METHOD_OPTIONS = {
    "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "qlora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "ia3": {},
    "adapter": {},
    "prompt_tuning": {"num_virtual_tokens": 3},
    "p_tuning": {"num_virtual_tokens": 3},
    "prefix_tuning": {"num_virtual_tokens": 3},
}


def _batch(tok, options=None):
    options = options or ClassifyOptions(labels=LABELS)
    return collate(prepare_data(RECORDS, tok, LABELS, options, 64), tok)


# ==================================================================== data
def test_examples_end_with_the_end_token_and_carry_label_ids():
    tok = char_tokenizer()
    examples = prepare_data(RECORDS, tok, LABELS, ClassifyOptions(), 8)
    assert [e["label"] for e in examples] == [0, 1, 2, 0]
    assert examples[0]["input_ids"] == tok("I ate a", add_special_tokens=False)["input_ids"] + [2]  # cut to 7 + end token
    batch = collate(examples, tok)
    assert batch["labels"].tolist() == [0, 1, 2, 0] and (batch["lm_labels"][3, 6:] == -100).all()


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"text": "hi"}, "record 1: it has no 'label' field"),
        ({"label": "food"}, "record 1: it has no 'text' field"),
        ({"text": "hi", "label": "music"}, "record 1: its 'label' = 'music' is not one of the labels"),
        ({"text": None, "label": "food"}, "record 1: 'text' is null, not a string"),
        ({"text": "hi", "label": ["food"]}, r"record 1: 'label' is a list"),
    ],
)
def test_a_bad_record_is_one_error_naming_record_and_field(record, expected):
    with pytest.raises(peftkit.PeftkitError, match=expected):
        prepare_data([RECORDS[0], record], char_tokenizer(), LABELS, ClassifyOptions(), 64)


def test_the_trainer_names_the_file_and_line_of_a_record_with_an_unknown_label(tmp_path):
    from peftkit.training.recipe import recipe_from_dict
    from peftkit.training.trainer import Trainer

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (tmp_path / "eval.jsonl").write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"text": "x", "label": "music"}) + "\n")
    recipe = recipe_from_dict({
        "method": {"name": "lora", "options": METHOD_OPTIONS["lora"]}, "objective": {"name": "classify"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
        "train": {"max_steps": 1, "batch_size": 2}, "output": {"dir": str(tmp_path / "out"), "plot": False},
    })
    with pytest.raises(peftkit.PeftkitError, match=r"eval.jsonl', record 2: its 'label' = 'music' is not one of the labels \['food', 'sports', 'weather'\]"):
        Trainer(recipe, model=tiny_llama(), tokenizer=char_tokenizer(), progress=False).setup()


def test_options_report_every_problem_naming_the_field():
    from peftkit.options import build_options

    with pytest.raises(peftkit.OptionsError) as info:
        build_options(ClassifyOptions, {"labels": ["a"], "lm_weight": -1, "text_key": " "}, owner="objective 'classify'")
    text = str(info.value)
    assert "'labels' = ['a']" in text and "'lm_weight' = -1" in text and "'text_key'" in text
    with pytest.raises(peftkit.OptionsError, match=r"'labels' repeats \['a'\]"):
        build_options(ClassifyOptions, {"labels": ["a", "b", "a"]}, owner="objective 'classify'")


# ==================================================================== loss
@pytest.mark.parametrize("lm_weight", [0.0, 0.5])
def test_loss_equals_a_direct_computation(lm_weight):
    tok = char_tokenizer()
    torch.manual_seed(0)
    tuned = peftkit.wrap(tiny_llama(), "lora", **METHOD_OPTIONS["lora"])
    head = attach_label_head(tuned, LABELS, seed=3)
    options = ClassifyOptions(labels=LABELS, lm_weight=lm_weight)
    batch = _batch(tok, options)
    out = ClassifyObjective().loss(tuned, batch, options)
    # By hand: the model's own forward, the hidden state at each row's last real token, its full-vocabulary logits.
    result = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    hidden = result.hidden_states[-1]  # (B, T, H), after the final norm
    last = batch["attention_mask"].sum(-1) - 1
    classify = F.cross_entropy(hidden[torch.arange(4), last] @ head.weight.T + head.bias, batch["labels"])
    lm = F.cross_entropy(result.logits[:, :-1].reshape(-1, 128), batch["lm_labels"][:, 1:].reshape(-1), ignore_index=-100)
    expected = classify + lm_weight * lm
    assert abs(float(out.loss.detach()) - float(expected.detach())) < 1e-5
    assert out.num_targets == 4 and out.metrics["classify_loss"] == pytest.approx(float(classify.detach()), abs=1e-5)
    assert ("lm_loss" in out.metrics) == (lm_weight > 0)


def test_macro_f1_and_accuracy_against_a_hand_computation():
    expected = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 2, 2]
    # label 0: TP 2, FP 0, FN 1 -> 4/5; label 1: TP 1, FP 1, FN 1 -> 1/2; label 2: TP 1, FP 1, FN 0 -> 2/3
    assert macro_f1(predicted, expected) == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3, abs=1e-12)
    assert accuracy(predicted, expected) == pytest.approx(4 / 6)
    # a label never expected but predicted counts with F1 0 (scikit-learn's macro average over the labels seen)
    assert macro_f1([0, 3], [0, 1]) == pytest.approx((1 + 0 + 0) / 3)


# ============================================================ head and CLI
def test_head_save_load_round_trip_is_bit_exact_labels_included(tmp_path):
    from peftkit.errors import AdapterFormatError

    tuned = peftkit.wrap(tiny_llama(), "lora", **METHOD_OPTIONS["lora"])
    head = attach_label_head(tuned, LABELS, seed=5)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    save_label_head(head, tmp_path)
    loaded = load_label_head(tmp_path)
    assert loaded.labels == LABELS
    assert all(torch.equal(loaded.state_dict()[k], head.state_dict()[k]) for k in ("weight", "bias"))
    first = (tmp_path / "classify_head.safetensors").read_bytes()
    save_label_head(loaded, tmp_path)
    assert (tmp_path / "classify_head.safetensors").read_bytes() == first
    with pytest.raises(AdapterFormatError, match="is not a classifier directory"):
        load_label_head(tmp_path / "nowhere")


def _train_tiny_classifier(tmp_path, method="lora", steps=4, resume=False, out="run"):
    from peftkit.training.recipe import recipe_from_dict
    from peftkit.training.trainer import Trainer

    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 4))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    recipe = recipe_from_dict({
        "method": {"name": method, "options": {**METHOD_OPTIONS[method], **({"dropout": 0.1} if method == "lora" else {})}},
        "objective": {"name": "classify", "options": {"lm_weight": 0.5}},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 32},
        "train": {"max_steps": steps, "batch_size": 4, "lr": 1e-2},
        "output": {"dir": str(tmp_path / out), "log_every": 1, "save_every": 2, "plot": False},
    })
    return Trainer(recipe, model=tiny_llama(), tokenizer=char_tokenizer(), progress=False, resume=resume).train()


def test_trainer_saves_the_head_beside_the_adapter_and_peftkit_classify_reads_it(tmp_path, capsys):
    from peftkit.cli import main

    result = _train_tiny_classifier(tmp_path)
    assert {"eval_accuracy", "eval_macro_f1"} <= set(result.metrics)
    head = load_label_head(result.adapter_dir)
    assert head.labels == LABELS  # the sorted labels of the training data
    tok = char_tokenizer()
    tok.save_pretrained(result.adapter_dir / "tokenizer")
    model_dir = tmp_path / "base"
    tiny_llama().save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (result.adapter_dir / "base_model.txt").write_text(str(model_dir) + "\n")
    assert main(["classify", "--adapter", str(result.adapter_dir), "--text", "soup!"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # what the CLI prints is the trained model's own prediction
    tuned = peftkit.load(tiny_llama(), result.adapter_dir)
    from peftkit_plugins.classify import install_head, predict

    install_head(tuned, head, trainable=False)
    [expected] = predict(tuned.eval(), tok, ["soup!"])
    assert lines[0] == next(iter(expected)) and len(lines) == 1 + len(LABELS)
    shown = {line.split()[0]: float(line.split()[1]) for line in lines[1:]}
    assert shown == pytest.approx(expected, abs=1e-4) and sum(shown.values()) == pytest.approx(1.0, abs=1e-3)
    (tmp_path / "texts.jsonl").write_text('{"text": "soup!"}\n{"text": "rain all day", "id": 7}\n')
    assert main(["classify", "--adapter", str(result.adapter_dir), "--file", str(tmp_path / "texts.jsonl")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert rows[0]["predicted"] == lines[0] and rows[1]["id"] == 7 and set(rows[1]["probabilities"]) == set(LABELS)


@pytest.mark.slow
def test_an_interrupted_classify_run_resumes_bit_identical_head_included(tmp_path, interrupt_at):
    from safetensors.torch import load_file

    reference = _train_tiny_classifier(tmp_path, out="ref")
    interrupt_at(3)
    with pytest.raises(KeyboardInterrupt):
        _train_tiny_classifier(tmp_path, out="run")
    interrupt_at.remove()
    resumed = _train_tiny_classifier(tmp_path, out="run", resume=True)
    for name in ("adapter.safetensors", "classify_head.safetensors"):
        want, got = load_file(str(reference.adapter_dir / name)), load_file(str(resumed.adapter_dir / name))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert resumed.metrics == reference.metrics


# ============================================================ every method
@pytest.mark.parametrize("method", [m if m == "lora" else pytest.param(m, marks=pytest.mark.slow) for m in sorted(METHOD_OPTIONS)])
def test_two_training_steps_under_every_method(method):
    tok = char_tokenizer()
    torch.manual_seed(0)
    tuned = peftkit.wrap(tiny_llama(), method, **METHOD_OPTIONS[method])
    head = attach_label_head(tuned, LABELS)
    tuned.train()
    options = ClassifyOptions(labels=LABELS, lm_weight=0.5)
    before = {n: p.detach().clone() for n, p in tuned.named_trainable_parameters()}
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-3)
    objective, batch = ClassifyObjective(), _batch(tok, options)
    losses = []
    for _ in range(2):
        out = objective.loss(tuned, batch, options)
        out.loss.backward()
        with_grad = {n for n, p in tuned.named_parameters() if p.grad is not None}
        assert all(n.startswith("heads.") or ".default" in n for n in with_grad), with_grad
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss.detach()))
    assert losses[1] < losses[0]
    changed = [n for n, p in tuned.named_trainable_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("heads.") for n in changed) and any(not n.startswith("heads.") for n in changed), changed
    metrics = evaluate_classifier(tuned.eval(), prepare_data(RECORDS, tok, LABELS, options, 64), tok)
    assert set(metrics) == {"eval_accuracy", "eval_macro_f1"} and head.labels == LABELS
