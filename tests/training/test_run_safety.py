"""A run's output directory under crashes and competition: crash leftovers, torn metrics, the run lock, overwrites."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit.testing import tiny_llama, tiny_tokenizer
from peftkit.training.recipe import recipe_from_dict
from peftkit.training.run_lock import LOCK_FILE, RunLock, _start_time
from peftkit.training.trainer import Trainer, TrainingError


def _recipe(tmp_path: Path, out: str = "out", **train):
    data = tmp_path / "data.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"prompt": f"what is {i % 5} plus 1?", "response": f"{i % 5 + 1}"}) + "\n" for i in range(24)))
    return recipe_from_dict(
        {
            "method": {"name": "lora", "options": {"r": 4, "dropout": 0.1}},
            "data": {"train": str(data), "eval_size": 4, "max_length": 32},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, **train},
            "output": {"dir": str(tmp_path / out), "save_every": 2, "log_every": 1, "plot": False},
        }
    )


def _trainer(recipe, **kwargs) -> Trainer:
    return Trainer(recipe, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False, **kwargs)


def _tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter.safetensors"))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _interrupted(tmp_path: Path, interrupt_at, step: int, out: str = "run") -> Path:
    """A run stopped after logging ``step`` (its checkpoint is the last even step before it)."""
    interrupt_at(step)
    with pytest.raises(KeyboardInterrupt):
        _trainer(_recipe(tmp_path, out)).train()
    interrupt_at.remove()
    return tmp_path / out


def _logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]


# ------------------------------------------------------------------ crash windows
def test_resume_recovers_a_checkpoint_a_crash_left_between_the_two_renames(tmp_path, interrupt_at, capsys):
    reference = _trainer(_recipe(tmp_path, "ref")).train()
    out = _interrupted(tmp_path, interrupt_at, 5)
    # The crash window of the atomic replacement: the old copy renamed away, the new one not yet in place.
    (out / "checkpoint").rename(out / "checkpoint.peftkit-old")
    resumed = _trainer(_recipe(tmp_path, "run"), resume=True).train()
    assert "restored" in capsys.readouterr().out
    assert not (out / "checkpoint.peftkit-old").exists()
    assert _equal(_tensors(reference.adapter_dir), _tensors(resumed.adapter_dir))
    assert _logged_steps(out) == [1, 2, 3, 4, 5, 6]


def test_a_finished_adapter_left_as_peftkit_old_is_restored_and_protected(tmp_path):
    _trainer(_recipe(tmp_path, max_steps=2)).train()
    out = tmp_path / "out"
    (out / "adapter").rename(out / "adapter.peftkit-old")
    with pytest.raises(TrainingError, match="holds a finished run"):
        _trainer(_recipe(tmp_path, max_steps=2, lr=5e-3)).train()
    assert (out / "adapter" / "adapter.safetensors").is_file() and not (out / "adapter.peftkit-old").exists()


# ------------------------------------------------------------------ metrics.jsonl and recipe.yaml read back
def test_resume_drops_a_torn_last_metrics_line(tmp_path, interrupt_at, capsys):
    out = _interrupted(tmp_path, interrupt_at, 5)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "loss": 0.12')  # a crash mid-write: no closing brace, no newline
    _trainer(_recipe(tmp_path, "run"), resume=True).train()
    assert "cut short mid-write" in capsys.readouterr().out
    assert _logged_steps(out) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda lines: [lines[0], b'{"step": 2, "lo', *lines[1:]], r"metrics.jsonl, line 2: not a JSON record"),
        (lambda lines: [lines[0], b'{"step": 2, "loss": "\xff"}', *lines[1:]], r"metrics.jsonl, line 2: not UTF-8 text: byte 0xff at offset \d+ \(line 2\)"),
        (lambda lines: [lines[0], b"[1, 2]", *lines[1:]], r"metrics.jsonl, line 2: '\[1, 2\]' is not a metrics record"),
    ],
)
def test_a_damaged_metrics_line_before_the_last_is_one_clear_error(tmp_path, interrupt_at, damage, expected):
    out = _interrupted(tmp_path, interrupt_at, 5)
    metrics = out / "metrics.jsonl"
    metrics.write_bytes(b"\n".join(damage(metrics.read_bytes().splitlines())) + b"\n")
    before = metrics.read_bytes()
    with pytest.raises(TrainingError, match=expected) as info:
        _trainer(_recipe(tmp_path, "run"), resume=True).train()
    assert "only the last line can be torn" in str(info.value)
    assert metrics.read_bytes() == before  # left as it was


def test_a_non_utf8_byte_in_the_saved_recipe_names_the_file_and_offset(tmp_path, interrupt_at):
    out = _interrupted(tmp_path, interrupt_at, 3)
    saved = out / "checkpoint" / "recipe.yaml"
    text = saved.read_bytes()
    saved.write_bytes(text[:10] + b"\xfe" + text[10:])
    with pytest.raises(TrainingError, match=rf"{saved} is not UTF-8 text: byte 0xfe at offset 10 \(line 2\)"):
        _trainer(_recipe(tmp_path, "run"), resume=True).train()


@pytest.mark.parametrize(
    "damage, message",
    [
        ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi")), "nodes"),
        ("model: {}\nmodel: {}\n", "duplicate key model at lines 1 and 2"),
    ],
)
def test_a_tampered_saved_recipe_is_refused_quickly_and_clearly(tmp_path, interrupt_at, damage, message):
    out = _interrupted(tmp_path, interrupt_at, 3)
    saved = out / "checkpoint" / "recipe.yaml"
    saved.write_text(damage)
    with pytest.raises(TrainingError, match=rf"{saved} is not the YAML peftkit wrote") as info:
        _trainer(_recipe(tmp_path, "run"), resume=True).train()
    assert message in str(info.value)


@pytest.mark.parametrize(
    "damage",
    [
        lambda state: {},
        lambda state: [1, 2],
        lambda state: {k: v for k, v in state.items() if k != "optimizer"},
        lambda state: {**state, "step": "three"},
        lambda state: {**state, "step": 10**30},
        lambda state: {**state, "step": -3},
        lambda state: {**state, "data": [1, 2]},
        lambda state: {**state, "rng": {"python": 1}},
        lambda state: {**state, "optimizer": {"state": 1}},
        lambda state: {**state, "scheduler": 5},
    ],
    ids=["empty", "a list", "no optimizer", "step a string", "step huge", "step negative", "data position a list",
         "rng damaged", "optimizer damaged", "scheduler damaged"],
)
def test_a_loop_state_that_reads_but_does_not_fit_is_one_clear_error(tmp_path, interrupt_at, damage):
    out = _interrupted(tmp_path, interrupt_at, 3)
    state_file = out / "checkpoint" / "trainer_state.pt"
    torch.save(damage(torch.load(state_file, weights_only=True)), state_file)
    metrics = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(TrainingError, match=rf"cannot resume: {state_file} does not hold the loop state this peftkit writes"):
        _trainer(_recipe(tmp_path, "run"), resume=True).train()
    assert (out / "metrics.jsonl").read_bytes() == metrics, "a refused resume changes nothing"


# ------------------------------------------------------------------ the run lock
def _lock_of(pid: int) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname(), "start": _start_time(pid)})


def test_a_second_run_in_the_same_output_dir_is_refused_while_the_first_runs(tmp_path):
    first = _trainer(_recipe(tmp_path, max_steps=2))
    first.setup()  # holds the lock from here until train() returns
    with pytest.raises(TrainingError, match=rf"output.dir {tmp_path / 'out'} is in use by another run \(pid {os.getpid()}"):
        _trainer(_recipe(tmp_path, max_steps=2)).train()
    assert first.train().steps == 2  # the first run is untouched by the refused one
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_a_lock_of_a_live_process_is_refused_with_its_pid(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK_FILE).write_text(_lock_of(os.getppid()))
    with pytest.raises(TrainingError, match=rf"in use by another run \(pid {os.getppid()} on this host"):
        _trainer(_recipe(tmp_path, max_steps=2)).train()
    assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["pid"] == os.getppid()  # not taken from its owner


def test_a_lock_of_another_host_is_refused_naming_it(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK_FILE).write_text(json.dumps({"pid": 4242, "host": "elsewhere", "start": None}))
    with pytest.raises(TrainingError, match="pid 4242 on host elsewhere"):
        _trainer(_recipe(tmp_path, max_steps=2)).train()


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LOCK_FILE).write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "start": "1"}))
    assert _trainer(_recipe(tmp_path, max_steps=2)).train().steps == 2
    assert f"took over the stale lock of pid {dead_pid}" in capsys.readouterr().out
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_a_lock_naming_a_reused_pid_is_stale(tmp_path):
    lock = RunLock(tmp_path)
    # Our own pid, but written by an earlier process that had it (this process holds no such lock).
    lock.path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}))
    assert "stale lock" in lock.acquire()
    lock.release()
    # A live pid whose process started at another time is a reused pid, not the owner.
    lock.path.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "start": "0"}))
    assert "stale lock" in lock.acquire()
    lock.release()
    assert not lock.path.exists()


@pytest.mark.parametrize("call", ["train", "setup"])
def test_the_lock_is_released_when_the_run_fails(tmp_path, call):
    with pytest.raises(TrainingError, match="no checkpoint"):
        getattr(_trainer(_recipe(tmp_path), resume=True), call)()
    assert not (tmp_path / "out" / LOCK_FILE).exists()


def test_only_rank_zero_takes_the_lock(tmp_path):
    RunLock(tmp_path, enabled=False).acquire()
    assert not (tmp_path / LOCK_FILE).exists()


# ------------------------------------------------------------------ replacing a finished run
def test_a_finished_run_of_another_recipe_is_kept_unless_overwrite(tmp_path):
    first = _trainer(_recipe(tmp_path, max_steps=2)).train()
    kept = _tensors(first.adapter_dir)
    with pytest.raises(TrainingError) as info:
        _trainer(_recipe(tmp_path, max_steps=3, lr=5e-3)).train()
    message = str(info.value)
    assert "train.lr: 0.01 -> 0.005" in message and "train.max_steps: 2 -> 3" in message and "--overwrite" in message
    assert _equal(_tensors(first.adapter_dir), kept)
    # the same recipe again reproduces the run, so it may write there
    again = _trainer(_recipe(tmp_path, max_steps=2)).train()
    assert _equal(_tensors(again.adapter_dir), kept)
    replaced = _trainer(_recipe(tmp_path, max_steps=3, lr=5e-3), overwrite=True).train()
    assert replaced.steps == 3 and not _equal(_tensors(replaced.adapter_dir), kept)


def test_an_unfinished_run_is_not_started_over_unless_overwrite(tmp_path, interrupt_at):
    out = _interrupted(tmp_path, interrupt_at, 3)
    checkpoint = _tensors(out / "checkpoint" / "adapter")
    with pytest.raises(TrainingError, match="holds an unfinished run .* pass --resume to continue it"):
        _trainer(_recipe(tmp_path, "run")).train()
    assert _equal(_tensors(out / "checkpoint" / "adapter"), checkpoint)
    assert _trainer(_recipe(tmp_path, "run"), resume=True).train().steps == 6
    started_over = _interrupted(tmp_path, interrupt_at, 3, out="again")
    assert _trainer(_recipe(tmp_path, "again"), overwrite=True).train().steps == 6
    assert _logged_steps(started_over) == [1, 2, 3, 4, 5, 6]


def test_cli_refuses_replacing_a_finished_run_and_overwrite_replaces_it(tmp_path, capsys):
    import yaml

    from peftkit.cli import main

    model_dir = tmp_path / "tiny-model"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    recipe = _recipe(tmp_path, max_steps=1).to_dict()
    recipe["model"] = {"name_or_path": str(model_dir)}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "method.name=ia3", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("peftkit: error: output.dir") and "method.name: 'lora' -> 'ia3'" in error
    assert main(["train", str(path), "method.name=ia3", "--no-progress", "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())["method"] == "ia3"


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_output_dir_the_file_system_refuses_is_one_clear_error(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker if where == "a file" else blocker / "run"
    with pytest.raises(TrainingError, match=rf"output.dir = '{out}' cannot be written: .*set output.dir to a folder you can write"):
        _trainer(_recipe(tmp_path, out.name if where == "a file" else "blocker/run")).train()
    assert blocker.read_text() == "not a folder"


def test_the_cli_reports_what_the_file_system_refuses_as_one_line(tmp_path, monkeypatch, capsys):
    import errno

    import peftkit.training.recipe as recipe_module
    from peftkit.cli import main

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl"))

    monkeypatch.setattr(recipe_module, "load_recipe", disk_full)
    assert main(["validate", "any.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"peftkit: error: No space left on device: {tmp_path / 'metrics.jsonl'} (OSError); the file system refused it: "
        "check the path, its permissions and the free space\n"
    )
