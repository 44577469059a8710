"""``output.report_to``: trackers through accelerate; TensorBoard offline, read back with TensorBoard's own reader."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from peftkit.errors import TrainingError
from peftkit.testing import tiny_llama, tiny_tokenizer
from peftkit.training import tracking
from peftkit.training.recipe import RecipeError, recipe_from_dict
from peftkit.training.trainer import Trainer

pytest.importorskip("tensorboard")
RLHF_DATA = Path(__file__).resolve().parents[2] / "data" / "rlhf"


def _data(folder: Path) -> str:
    rng = random.Random(0)
    path = folder / "data.jsonl"
    with open(path, "w") as fh:
        for _ in range(24):
            a, b = rng.randint(0, 4), rng.randint(0, 4)
            fh.write(json.dumps({"prompt": f"what is {a} plus {b}?", "response": f"{a + b}"}) + "\n")
    return str(path)


def _recipe(tmp_path: Path, **output):
    return recipe_from_dict(
        {
            "method": {"name": "lora", "options": {"r": 4}},
            "data": {"train": _data(tmp_path), "eval_size": 4, "max_length": 32},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2},
            "output": {"dir": str(tmp_path / "run"), "log_every": 1, "eval_every": 2, "plot": False, **output},
        }
    )


def _event_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _event_hparams(folder: Path) -> dict[str, float | str]:
    """The hyperparameters TensorBoard's HParams dashboard shows for the run under ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    (sub,) = [p.parent for p in folder.glob("*/events.out.tfevents.*")]  # add_hparams writes a sub-run
    events = EventAccumulator(str(sub))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {key: value.string_value if value.HasField("string_value") else value.number_value for key, value in hparams.items()}


def _expected_scalars(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    expected: dict[str, list[tuple[int, float]]] = {}
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                expected.setdefault(key, []).append((record["step"], value))
    return expected


def _assert_same_scalars(got: dict[str, list[tuple[int, float]]], expected: dict[str, list[tuple[int, float]]]) -> None:
    assert got.keys() == expected.keys()
    for tag, points in expected.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        # event files hold float32
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(got[tag], points)), tag


def test_tensorboard_gets_every_logged_metric_and_the_recipe_as_hyperparameters(tmp_path):
    recipe = _recipe(tmp_path, report_to=["tensorboard"])
    Trainer(recipe, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False).train()
    folder = tmp_path / "run" / "tracking" / "run"  # <output.dir>/tracking/<project name = last part of output.dir>
    assert list(folder.glob("events.out.tfevents.*"))
    scalars = _event_scalars(folder)
    expected = _expected_scalars(tmp_path / "run" / "metrics.jsonl")
    assert {"loss", "lr", "tokens_per_s", "epoch", "eval_loss"} <= expected.keys()
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4] and [step for step, _ in scalars["eval_loss"]] == [0, 2, 4]
    _assert_same_scalars(scalars, expected)
    hparams = _event_hparams(folder)
    assert hparams["train.lr"] == pytest.approx(1e-2) and hparams["train.max_steps"] == 4
    assert hparams["method.name"] == "lora" and hparams["method.options.r"] == 4
    assert hparams["method.options.alpha"] == 16  # a default the recipe did not set: the options as validated
    assert hparams["output.report_to"] == '["tensorboard"]' and hparams["data.eval"] == "null"
    assert hparams.keys() == tracking.flat_hyperparameters(recipe).keys()


def test_no_report_to_writes_no_tracking_folder(tmp_path):
    recipe = _recipe(tmp_path)
    assert recipe.output.report_to == []
    trainer = Trainer(recipe, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False)
    assert trainer.accelerator.log_with == []
    trainer.train()
    assert not (tmp_path / "run" / "tracking").exists()


def test_a_failed_run_still_closes_its_trackers(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, report_to=["tensorboard"])
    trainer = Trainer(recipe, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False)

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer, "_sft_style_loop", crash)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert trainer.accelerator.trackers == []  # finished and cleared
    assert list((tmp_path / "run" / "tracking" / "run").glob("events.out.tfevents.*"))


def test_unknown_repeated_or_uninstalled_trackers_are_recipe_problems(tmp_path, monkeypatch):
    data = _data(tmp_path)

    def problems(report_to):
        with pytest.raises(RecipeError) as info:
            recipe_from_dict({"data": {"train": data}, "output": {"report_to": report_to}})
        return info.value.problems

    (unknown,) = problems(["tensorbord"])
    assert unknown.startswith("output.report_to = [\"tensorbord\"]: 'tensorbord' is not a tracker accelerate supports")
    assert "did you mean 'tensorboard'?" in unknown and "supported: tensorboard, wandb, mlflow" in unknown
    (twice,) = problems(["tensorboard", "tensorboard"])
    assert "names 'tensorboard' twice" in twice
    (wrong_type,) = problems("tensorboard")
    assert wrong_type == "output.report_to = 'tensorboard' is not valid; expected list[str]"

    monkeypatch.setattr(tracking, "installed_trackers", lambda: {"tensorboard"})
    (missing,) = problems(["tensorboard", "wandb"])
    assert "tracker 'wandb' needs the package 'wandb', which is not installed: pip install wandb" in missing
    assert missing.startswith('output.report_to = ["tensorboard", "wandb"]')
    (missing_comet,) = problems(["comet_ml"])
    assert "pip install comet-ml" in missing_comet


def test_a_recipe_built_by_hand_is_checked_at_run_start(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path)
    recipe.output.report_to = ["mlflow"]
    monkeypatch.setattr(tracking, "installed_trackers", lambda: {"tensorboard"})
    with pytest.raises(TrainingError, match="pip install mlflow"):
        Trainer(recipe, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False)


def test_report_to_may_change_on_resume(tmp_path):
    from peftkit.training.checkpoint import recipe_changes

    before = _recipe(tmp_path).to_dict()
    after = _recipe(tmp_path, report_to=["tensorboard"]).to_dict()
    assert recipe_changes(before, after) == []


def test_flat_hyperparameters_are_plain_values(tmp_path):
    flat = tracking.flat_hyperparameters(_recipe(tmp_path))
    assert all(isinstance(value, (bool, int, float, str)) for value in flat.values())
    assert flat["model.load_kwargs"] == "{}" and flat["train.max_grad_norm"] == 1.0
    assert flat["method.options.target_modules"] == "all-linear"


# ------------------------------------------------------------ a loop of its own
def _char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_ppo_metrics_reach_the_trackers(tmp_path):
    import peftkit

    if "ppo" not in peftkit.plugin_manager().objectives() or "reward" not in peftkit.plugin_manager().objectives():
        pytest.skip("the ppo and reward objectives are not installed")
    from peftkit_plugins.reward import attach_head, save_reward_model

    torch.manual_seed(1)
    reward_model = peftkit.wrap(tiny_llama(), "lora", r=2, target_modules=["q_proj", "v_proj"])
    attach_head(reward_model, seed=3)
    save_reward_model(reward_model, tmp_path / "rm", adapter_name="default")
    recipe = recipe_from_dict(
        {
            "method": {"name": "lora", "options": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
            "objective": {"name": "ppo", "options": {"reward_model": str(tmp_path / "rm"), "max_new_tokens": 4, "minibatch_size": 2, "ppo_epochs": 1}},
            "data": {"train": str(RLHF_DATA / "prompts.jsonl"), "eval": str(RLHF_DATA / "prompts_eval.jsonl"), "max_length": 48, "max_train_samples": 8},
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "eval_batch_size": 64},
            "output": {"dir": str(tmp_path / "ppo"), "log_every": 1, "plot": False, "report_to": ["tensorboard"]},
        }
    )
    Trainer(recipe, model=tiny_llama(), tokenizer=_char_tokenizer(), progress=False).train()
    expected = _expected_scalars(tmp_path / "ppo" / "metrics.jsonl")
    assert {"policy_loss", "kl", "reward", "eval_reward"} <= expected.keys()
    _assert_same_scalars(_event_scalars(tmp_path / "ppo" / "tracking" / "ppo"), expected)


def test_cli_validate_reports_a_bad_tracker_override(tmp_path, capsys):
    import yaml

    from peftkit.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"train": _data(tmp_path)}}))
    assert main(["validate", str(recipe), "output.report_to=[tensorboard]"]) == 0
    assert main(["validate", str(recipe), "output.report_to=[neptune]"]) == 2
    err = capsys.readouterr().err
    assert "output.report_to = [\"neptune\"]: 'neptune' is not a tracker accelerate supports" in err
