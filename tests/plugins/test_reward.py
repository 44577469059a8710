"""Tests of the ``reward`` objective: last-token indexing, the ranking loss, heads on every kind of method, saving, scoring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import peftkit
from peftkit.testing import tiny_llama
from peftkit_plugins.reward import (
    RewardObjective,
    RewardOptions,
    attach_head,
    evaluate_ranking,
    last_token_index,
    load_reward_model,
    ranking_loss,
    save_reward_model,
    score,
    sequence_scores,
)
from peftkit_plugins.reward.data import collate, prepare_data
from peftkit_plugins.reward.loss import pair_indices


def char_tokenizer():
    """A character-level tokenizer for the 128-token tiny models: pad 0, bos 1, eos 2, printable ASCII 3..97."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# ------------------------------------------------------------------ last token
def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


def test_last_token_index_rejects_empty_rows():
    with pytest.raises(peftkit.PeftkitError, match=r"rows \[1\]"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


# ---------------------------------------------------------------- ranking loss
def test_ranking_loss_k3_is_mean_over_three_pairs():
    scores = torch.tensor([2.0, 0.5, -1.0])  # best first
    expected = -(math.log(1 / (1 + math.exp(-1.5))) + math.log(1 / (1 + math.exp(-3.0))) + math.log(1 / (1 + math.exp(-1.5)))) / 3
    loss, stats = ranking_loss(scores, [3])
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["accuracy"] == 1.0 and stats["margin"] == pytest.approx((1.5 + 3.0 + 1.5) / 3)


def test_ranking_loss_weighs_each_prompt_equally():
    scores = torch.tensor([0.3, 1.0, 2.0, 0.5, -1.0], requires_grad=True)  # a pair (wrong order), then K=3
    loss, stats = ranking_loss(scores, [2, 3])
    pair = -F.logsigmoid(torch.tensor(0.3 - 1.0))
    group, _ = ranking_loss(scores[2:].detach(), [3])
    assert loss.item() == pytest.approx(float((pair + group) / 2), abs=1e-6)
    assert stats["accuracy"] == pytest.approx(3 / 4)
    loss.backward()
    assert scores.grad[0] < 0 < scores.grad[1]  # pushes the chosen up and the rejected down


def test_pair_indices_cover_all_comparisons():
    winners, losers, weights = pair_indices([2, 4])
    pairs = list(zip(winners.tolist(), losers.tolist()))
    assert pairs[0] == (0, 1) and sorted(pairs[1:]) == [(i, j) for i in range(2, 6) for j in range(i + 1, 6)]
    assert weights.sum().item() == pytest.approx(1.0)


# ------------------------------------------------------------------------ data
def test_prepare_data_pairs_and_rankings_and_collate():
    tok = char_tokenizer()
    records = [{"prompt": "Hi", "chosen": "yo!", "rejected": "No."}, {"prompt": "Q", "responses": ["a!", "b", "cc."]}]
    examples = prepare_data(records, tok, RewardOptions(), max_length=64)
    assert [len(e["sequences"]) for e in examples] == [2, 3]
    assert examples[0]["sequences"][0] == tok("Hi\nyo!", add_special_tokens=False)["input_ids"] + [2]
    batch = collate(examples, tok)
    assert batch["input_ids"].shape[0] == 5 and batch["group_sizes"].tolist() == [2, 3]
    assert last_token_index(batch["attention_mask"]).tolist() == [len(s) - 1 for e in examples for s in e["sequences"]]
    assert (batch["input_ids"][torch.arange(5), last_token_index(batch["attention_mask"])] == 2).all()  # reads at EOS


def test_prepare_data_names_bad_records():
    with pytest.raises(peftkit.PeftkitError, match="record 1: its keys are"):
        prepare_data([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "x", "text": "y"}], char_tokenizer(), RewardOptions(), 64)


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"prompt": "a", "chosen": None, "rejected": "c"}, "'chosen' is null, not a string"),
        ({"prompt": "a", "chosen": "b", "rejected": ["c"]}, r"'rejected' is a list \(\['c'\]\), not a string"),
        ({"prompt": None, "chosen": "b", "rejected": "c"}, "'prompt' is null, not a string"),
        ({"prompt": "a", "responses": ["b", 3]}, r"'responses' item 1 is an int \(3\), not a string"),
        ({"prompt": "a", "responses": ["b"]}, "'responses' holds 1 response"),
    ],
)
def test_prepare_data_refuses_texts_that_are_not_strings(record, expected):
    with pytest.raises(peftkit.PeftkitError, match=f"record 1: {expected}"):
        prepare_data([{"prompt": "a", "chosen": "b", "rejected": "c"}, record], char_tokenizer(), RewardOptions(), 64)


def test_prepare_data_keeps_the_response_when_the_prompt_is_too_long():
    tok = char_tokenizer()
    [example] = prepare_data([{"prompt": "x" * 50, "chosen": "good", "rejected": "bad"}], tok, RewardOptions(), max_length=10)
    assert all(len(s) <= 10 and s[-1] == 2 for s in example["sequences"])
    assert example["sequences"][0][-5:-1] == tok("good", add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------- heads and methods
METHOD_OPTIONS = {
    "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "prompt_tuning": {"num_virtual_tokens": 3},
    "prefix_tuning": {"num_virtual_tokens": 3},
    "p_tuning": {"num_virtual_tokens": 3},
}


@pytest.mark.parametrize("method", sorted(METHOD_OPTIONS))
def test_score_reads_the_last_real_token_whatever_the_padding(method):
    torch.manual_seed(0)
    tuned = peftkit.wrap(tiny_llama(), method, **METHOD_OPTIONS[method])
    head = attach_head(tuned, seed=1)
    a, b = [5, 9, 17, 33, 2], [7, 8, 2]
    alone = [sequence_scores(tuned, head, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in (a, b)]
    right_ids = torch.tensor([a, b + [0, 0]])
    right_mask = torch.tensor([[1] * 5, [1] * 3 + [0, 0]])
    left_ids = torch.tensor([a, [0, 0] + b])
    left_mask = torch.tensor([[1] * 5, [0, 0] + [1] * 3])
    right = sequence_scores(tuned, head, right_ids, right_mask).tolist()
    # Left padding needs padding-aware positions; the decoder gets them from the mask under every method.
    assert right == pytest.approx(alone, abs=1e-5)
    left = sequence_scores(tuned, head, left_ids, left_mask).tolist()
    assert left[0] == pytest.approx(alone[0], abs=1e-5)


def test_loss_is_one_forward_per_response():
    tok = char_tokenizer()
    tuned = peftkit.wrap(tiny_llama(), "lora", r=4, target_modules=["q_proj"])
    attach_head(tuned)
    calls = []
    tuned.base_model.model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[0]), with_kwargs=True)
    examples = prepare_data([{"prompt": "Q", "responses": ["a!", "b", "cc.", "d"]}, {"prompt": "P", "chosen": "x", "rejected": "y"}], tok, RewardOptions(), 32)
    out = RewardObjective().loss(tuned, collate(examples, tok), RewardOptions())
    assert calls == [6]  # 4 + 2 responses, one decoder pass, not one per pair (6 + 1 pairs)
    assert out.num_targets == 2 and set(out.metrics) == {"accuracy", "margin"}


def _toy_records(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "tree", "rain", "blue"]
    records = []
    for _ in range(n):
        reply = " ".join(rng.sample(words, 2))
        records.append({"prompt": rng.choice(words), "responses": [reply + "!", reply, reply.upper() + "."]})
    return records


def test_training_learns_a_separable_preference_and_round_trips(tmp_path):
    torch.manual_seed(0)
    tok = char_tokenizer()
    tuned = peftkit.wrap(tiny_llama(), "lora", r=4, target_modules=["q_proj", "v_proj", "o_proj"])
    head = attach_head(tuned, seed=0)
    objective, options = RewardObjective(), RewardOptions()
    train = prepare_data(_toy_records(48), tok, options, 64)
    held_out = prepare_data(_toy_records(16, seed=1), tok, options, 64)
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    before = evaluate_ranking(tuned, held_out, tok)
    for step in range(30):
        batch = collate(train[(step * 8) % 48 : (step * 8) % 48 + 8], tok)
        out = objective.loss(tuned, batch, options)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = evaluate_ranking(tuned, held_out, tok)
    assert after["eval_accuracy"] == 1.0 and after["eval_accuracy"] > before["eval_accuracy"]
    assert after["eval_margin"] > before["eval_margin"]
    assert any("heads" in n for n, _ in tuned.named_trainable_parameters())

    save_reward_model(tuned, tmp_path / "rm", adapter_name="default")
    assert (tmp_path / "rm" / "reward_head.safetensors").is_file()
    expected = score(tuned, head, tok, "cat", "sun dog!")
    fresh = peftkit.TunedModel(tiny_llama())
    loaded_head = load_reward_model(fresh, tmp_path / "rm", "reward")
    assert fresh.active_adapter == "reward" and not any(p.requires_grad for p in fresh.parameters())
    assert score(fresh, loaded_head, tok, "cat", "sun dog!") == expected
    assert score(fresh, loaded_head, tok, "cat", "sun dog!") > score(fresh, loaded_head, tok, "cat", "SUN DOG.")
    # The directory is still a plain adapter for the core.
    assert peftkit.load(tiny_llama(), tmp_path / "rm").adapters == {"default": "lora"}


def test_loss_without_a_head_says_how_to_add_one():
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2, target_modules=["q_proj"])
    batch = collate(prepare_data(_toy_records(2), char_tokenizer(), RewardOptions(), 64), char_tokenizer())
    with pytest.raises(peftkit.PeftkitError, match="attach_head"):
        RewardObjective().loss(tuned, batch, RewardOptions())


@pytest.mark.slow
def test_trainer_runs_the_reward_objective_and_saves_the_head(tmp_path):
    from pathlib import Path

    from peftkit.training.recipe import recipe_from_dict
    from peftkit.training.trainer import Trainer

    data = Path(__file__).resolve().parents[2] / "data" / "rlhf"
    recipe = recipe_from_dict({
        "method": {"name": "prompt_tuning", "options": {"num_virtual_tokens": 4}},
        "objective": {"name": "reward"},
        "data": {"train": str(data / "preferences.jsonl"), "eval": str(data / "preferences_eval.jsonl"), "max_length": 96, "max_train_samples": 32},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2},
        "output": {"dir": str(tmp_path / "rm"), "log_every": 2, "plot": False},
    })
    result = Trainer(recipe, model=tiny_llama(), tokenizer=char_tokenizer(), progress=False).train()
    records = [__import__("json").loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 4]
    fresh = peftkit.TunedModel(tiny_llama())
    head = load_reward_model(fresh, result.adapter_dir)
    assert fresh.adapters == {"reward": "prompt_tuning"} and head.weight.shape == (1, 32)


def test_an_interrupted_reward_run_resumes_bit_identical_head_included(tmp_path, interrupt_at):
    from pathlib import Path

    from safetensors.torch import load_file

    from peftkit.training.recipe import recipe_from_dict
    from peftkit.training.trainer import Trainer

    data = Path(__file__).resolve().parents[2] / "data" / "rlhf"

    def recipe(out):
        return recipe_from_dict({
            "method": {"name": "lora", "options": {"r": 2, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1}},
            "objective": {"name": "reward"},
            "data": {"train": str(data / "preferences.jsonl"), "eval": str(data / "preferences_eval.jsonl"), "max_length": 64,
                     "max_train_samples": 16},
            "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "eval_batch_size": 64},
            "output": {"dir": str(tmp_path / out), "log_every": 1, "save_every": 2, "plot": False},
        })

    def run(r, **kwargs):
        return Trainer(r, model=tiny_llama(), tokenizer=char_tokenizer(), progress=False, **kwargs).train()

    reference = run(recipe("ref"))
    interrupt_at(3)
    with pytest.raises(KeyboardInterrupt):
        run(recipe("run"))
    interrupt_at.remove()
    assert (tmp_path / "run" / "checkpoint" / "adapter" / "reward_head.safetensors").is_file()  # saved with the checkpoint
    resumed = run(recipe("run"), resume=True)
    for name in ("adapter.safetensors", "reward_head.safetensors"):
        want, got = load_file(str(reference.adapter_dir / name)), load_file(str(resumed.adapter_dir / name))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    assert resumed.metrics["eval_accuracy"] == reference.metrics["eval_accuracy"]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.write_bytes(b"not a safetensors file"), "corrupt or not a safetensors file"),
        (lambda f: save_file({"weight": torch.full((1, 8), float("nan")), "bias": torch.zeros(1)}, str(f)), "NaN or inf"),
        (lambda f: save_file({"weight": torch.ones(1, 8, dtype=torch.int8), "bias": torch.zeros(1)}, str(f)), "dtype torch.int8"),
        (lambda f: save_file({"weight": torch.ones(8), "bias": torch.zeros(1)}, str(f)), "shape (8,)"),
        (lambda f: save_file({"weight": torch.ones(1, 8)}, str(f)), "expected ['bias', 'weight']"),
    ],
)
def test_a_damaged_reward_head_is_one_clear_error(tmp_path, damage, message):
    from peftkit.errors import AdapterFormatError
    from peftkit_plugins.reward.saving import HEAD_FILE, load_head

    damage(tmp_path / HEAD_FILE)
    with pytest.raises(AdapterFormatError, match="reward_head.safetensors") as info:
        load_head(tmp_path)
    assert message in str(info.value)
