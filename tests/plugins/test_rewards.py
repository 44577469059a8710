"""Tests of the built-in ``rewards`` plugin: each reward against its data set's own scoring, and its errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import peftkit
from peftkit.plugins import create_plugin_manager

DATA = Path(__file__).resolve().parents[2] / "data"


def _rewards():
    return {name: reg.obj for name, reg in create_plugin_manager(autoload=False).rewards().items()}


@pytest.mark.parametrize(
    "reply, exact, first",
    [("48", 1.0, 1.0), (" 48\n", 1.0, 1.0), ("48.", 0.0, 1.0), ("The answer is 48", 0.0, 1.0), ("-48", 0.0, 0.0),
     ("480", 0.0, 0.0), ("4 8", 0.0, 0.0), ("", 0.0, 0.0), ("12 then 48", 0.0, 0.0)],
)
def test_arithmetic_rewards_read_the_reply_as_the_evaluation_does(reply, exact, first):
    rewards = _rewards()
    records = [{"prompt": "63 - 15 = ?", "response": "48", "answer": 48}]
    assert rewards["arithmetic_exact_match"](["63 - 15 = ?"], [reply], records) == [exact]
    assert rewards["arithmetic_first_number"](["63 - 15 = ?"], [reply], records) == [first]


def test_arithmetic_exact_match_on_the_shipped_records_and_negative_answers():
    records = [json.loads(line) for line in (DATA / "arithmetic" / "eval.jsonl").read_text().splitlines()]
    reward = _rewards()["arithmetic_exact_match"]
    replies = [r["response"] for r in records]  # the reference replies are all right
    assert reward([r["prompt"] for r in records], replies, records) == [1.0] * len(records)
    assert any(r["answer"] < 0 for r in records)
    wrong = [str(r["answer"] + 1) for r in records]
    assert reward([r["prompt"] for r in records], wrong, records) == [0.0] * len(records)


def test_evaluate_py_scores_with_the_reward_functions():
    """data/arithmetic/evaluate.py imports its rules from the plugin: one copy, so GRPO trains on the metric."""
    text = (DATA / "arithmetic" / "evaluate.py").read_text()
    assert "from peftkit_plugins.rewards.arithmetic import exact_match, first_number_match" in text
    assert "re.compile" not in text


@pytest.mark.parametrize("record", [{"prompt": "x"}, {"prompt": "x", "answer": "48"}, {"prompt": "x", "answer": True}])
def test_a_record_without_an_integer_answer_is_one_error_naming_the_reward_and_the_field(record):
    with pytest.raises(peftkit.PeftkitError, match=r"reward 'arithmetic_exact_match': record 2 has no integer 'answer'"):
        _rewards()["arithmetic_exact_match"](["p", "p"], ["1", "2"], [{"answer": 1}, record])


def test_rlhf_task_reward_is_data_rlhf_task_true_reward():
    spec = importlib.util.spec_from_file_location("rlhf_task_module", DATA / "rlhf" / "task.py")
    task = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task)
    reward = _rewards()["rlhf_task"]
    replies = list(task.styles("I think cats are lovely").values()) + ["", "!", "  ok!  "]
    expected = [1.0, 0.6, 0.4, 0.0, 0.0, 0.0, 1.0]
    assert reward(["p"] * len(replies), replies, [{}] * len(replies)) == pytest.approx(expected)
    assert [task.true_reward(r) for r in replies] == pytest.approx(expected)
    from peftkit_plugins.rewards import true_reward

    assert task.true_reward is true_reward  # one copy, imported by the data script


def test_data_rlhf_scripts_still_import_true_reward_from_task():
    """evaluate.py and tiny_pipeline.py run from data/rlhf and do ``from task import true_reward``."""
    for script in ("evaluate.py", "tiny_pipeline.py"):
        assert "from task import true_reward" in (DATA / "rlhf" / script).read_text()
    out = subprocess.run(
        [sys.executable, "-c", "from task import true_reward; print(true_reward('hello!'))"],
        cwd=DATA / "rlhf", capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1.0"
