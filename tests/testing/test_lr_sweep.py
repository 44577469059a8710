"""``lr_sweep``: the real trainer at each rate, same seed; the best is the lowest finite held-out loss, divergence fails."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

from peftkit.testing import LrSweepResult, lr_sweep, tiny_llama, tiny_tokenizer
from peftkit.testing.lr_sweep import LrRun


def _data(folder: Path, n: int = 40) -> dict:
    import random

    rng = random.Random(0)
    path = folder / "data.jsonl"
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(0, 4), rng.randint(0, 4)
            fh.write(json.dumps({"prompt": f"what is {a} plus {b}?", "response": f"{a + b}"}) + "\n")
    return {"train": str(path), "eval_size": 8, "max_length": 32}


def test_three_rates_on_tiny_llama_give_a_best_with_a_finite_loss_and_a_diverging_rate_fails(tmp_path):
    model = tiny_llama()
    # 1e30 stands for any rate that diverges (as in tests/training/test_trainer.py): its updates leave weights
    # or losses non-finite, and the trainer stops the run with a TrainingError.
    result = lr_sweep("lora", [1e-3, 1e-2, 1e30], steps=2, model=model, tokenizer=tiny_tokenizer(), data=_data(tmp_path), r=4)
    assert [run.lr for run in result.runs] == [1e-3, 1e-2, 1e30]
    diverged = result.runs[2]
    assert diverged.failed and diverged.eval_loss is None and "lower train.lr (it is 1e+30)" in diverged.error
    finished = result.runs[:2]
    assert not any(run.failed for run in finished)
    assert result.best is min(finished, key=lambda run: run.eval_loss)
    assert math.isfinite(result.best.eval_loss)
    assert result.recommended_lr == result.best.lr
    # same seed: every run starts from the same held-out loss
    assert finished[0].eval_loss_before == finished[1].eval_loss_before
    assert all(run.eval_loss != run.eval_loss_before for run in finished), "a run did not train"
    # the given model is copied for each rate, never trained itself
    assert not any(hasattr(module, "base_layer") for module in model.modules())
    # the same seed each time: a rate run on its own (held-out loss before measured afresh) gives the same numbers
    alone = lr_sweep("lora", [1e-2], steps=2, model=model, tokenizer=tiny_tokenizer(), data=_data(tmp_path), r=4).runs[0]
    assert (alone.eval_loss_before, alone.eval_loss) == (finished[1].eval_loss_before, finished[1].eval_loss)
    table = result.table()
    assert "failed" in table and f"{result.best.lr:>10.3g}*" in table
    assert result.injector_line().startswith(f"recommended_lr = {result.best.lr:g}  #")


def test_best_skips_failed_runs_and_is_none_when_every_run_failed():
    runs = [LrRun(lr=1e-3, eval_loss=2.0), LrRun(lr=1e-2, eval_loss=float("nan")), LrRun(lr=1e-1, eval_loss=None, error="diverged")]
    result = LrSweepResult(method="m", steps=2, model="tiny", runs=runs)
    assert result.best is runs[0] and result.best_at_edge
    everything_failed = LrSweepResult(method="m", steps=2, model="tiny", runs=runs[1:])
    assert everything_failed.best is None and everything_failed.recommended_lr is None
    with pytest.raises(Exception, match="every learning rate tried for 'm' failed"):
        everything_failed.injector_line()


@pytest.mark.parametrize("lrs, message", [([], "lrs is empty"), ([1e-3, 0.0], "got \\[0.0\\]"), ([float("nan")], "finite numbers")])
def test_bad_rates_are_refused_before_anything_trains(lrs, message):
    with pytest.raises(ValueError, match=message):
        lr_sweep("lora", lrs, model=tiny_llama(), tokenizer=tiny_tokenizer())


# ------------------------------------------------------------------ peftkit tune-lr
def test_tune_lr_passes_rates_steps_and_options_and_prints_the_injector_line(monkeypatch, capsys):
    """The command is lr_sweep on the embedded model; here lr_sweep is replaced so nothing downloads or trains."""
    sweep_module = importlib.import_module("peftkit.testing.lr_sweep")  # the attribute is the function
    from peftkit.cli import main

    calls = []

    def fake_sweep(method, lrs, *, steps, **options):
        calls.append((method, lrs, steps, options))
        runs = [LrRun(lr=lr, eval_loss=1.0 + abs(math.log10(lr) + 3), eval_loss_before=3.0) for lr in lrs]
        return LrSweepResult(method=method, steps=steps, model="embedded", runs=runs)

    monkeypatch.setattr(sweep_module, "lr_sweep", fake_sweep)
    assert main(["tune-lr", "lora", "--steps", "10", "--lrs", "1e-4,1e-3,1e-2", "r=16", "target_modules=[q_proj, v_proj]"]) == 0
    assert calls == [("lora", [1e-4, 1e-3, 1e-2], 10, {"r": 16, "target_modules": ["q_proj", "v_proj"]})]
    out = capsys.readouterr().out
    assert "recommended_lr = 0.001  #" in out and "held-out loss 3.0000 -> 1.0000 after 10 steps" in out


def test_tune_lr_exits_1_when_every_rate_failed(monkeypatch, capsys):
    sweep_module = importlib.import_module("peftkit.testing.lr_sweep")  # the attribute is the function
    from peftkit.cli import main

    def fake_sweep(method, lrs, *, steps, **options):
        return LrSweepResult(method=method, steps=steps, model="embedded", runs=[LrRun(lr=lr, eval_loss=None, error="diverged") for lr in lrs])

    monkeypatch.setattr(sweep_module, "lr_sweep", fake_sweep)
    assert main(["tune-lr", "lora", "--lrs", "1,2"]) == 1
    assert "every learning rate failed" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [(["--lrs", "1e-3,abc"], "comma-separated"), (["--lrs", "0"], "> 0"), (["--steps", "0"], "at least 1")])
def test_tune_lr_refuses_bad_arguments(argv, message, capsys):
    from peftkit.cli import main

    with pytest.raises(SystemExit) as info:
        main(["tune-lr", "lora", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_tune_lr_names_every_malformed_option(capsys):
    from peftkit.cli import main

    assert main(["tune-lr", "lora", "r16", "=3", "alpha=[1"]) == 2
    err = capsys.readouterr().err
    assert "'r16' is not of the form key=value" in err and "'=3'" in err and "'alpha=[1': the value is not valid YAML" in err
