"""The training loop on tiny models: outputs, resume bit-identity, NaN stop, activation checkpointing, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.training.recipe import recipe_from_dict
from peftkit.testing import tiny_llama, tiny_tokenizer
from peftkit.training.trainer import Trainer, TrainingError, enable_gradient_checkpointing


def _write_data(folder: Path, n: int = 48) -> str:
    import random

    rng = random.Random(0)
    path = folder / "data.jsonl"
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(0, 4), rng.randint(0, 4)
            fh.write(json.dumps({"prompt": f"what is {a} plus {b}?", "response": f"{a + b}"}) + "\n")
    return str(path)


def _recipe(tmp_path: Path, out: str = "out", **train):
    train = {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "scheduler": "linear", "warmup_steps": 1, **train}
    return recipe_from_dict(
        {
            "method": {"name": "lora", "options": {"r": 4, "dropout": 0.1}},  # dropout: the RNG state matters on resume
            "data": {"train": _write_data(tmp_path), "eval_size": 8, "max_length": 32},
            "train": train,
            "output": {"dir": str(tmp_path / out), "save_every": 2, "log_every": 1, "eval_every": 3},
        }
    )


def _train(recipe, **kwargs):
    return Trainer(recipe, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False, **kwargs).train()


def _tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter.safetensors"))


def test_training_lowers_the_held_out_loss_and_writes_every_output(tmp_path):
    result = _train(_recipe(tmp_path, max_steps=12))
    assert result.steps == 12
    assert result.eval_loss_after < result.eval_loss_before
    out = tmp_path / "out"
    for name in ("metrics.jsonl", "loss_curve.png", "recipe.yaml", "checkpoint/trainer_state.pt", "adapter/adapter_config.json"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 3, 6, 9, 12]
    assert all(r["tokens_per_s"] > 0 for r in records if "loss" in r)
    # the final adapter loads back in one line and has the checkpoint's weights
    loaded = peftkit.load(tiny_llama(), out / "adapter")
    assert loaded.active_adapter == "default"
    final, ckpt = _tensors(out / "adapter"), _tensors(out / "checkpoint" / "adapter")
    assert all(torch.equal(final[k], ckpt[k]) for k in final)


def test_an_interrupted_and_resumed_run_ends_bit_identical(tmp_path, interrupt_at):
    reference = _train(_recipe(tmp_path, out="ref"))
    recipe = _recipe(tmp_path, out="run")
    interrupt_at(5)
    with pytest.raises(KeyboardInterrupt):
        _train(recipe)
    interrupt_at.remove()
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4  # step 5 ran but was never checkpointed
    resumed = _train(recipe, resume=True)
    assert resumed.steps == 6
    ref, got = _tensors(reference.adapter_dir), _tensors(resumed.adapter_dir)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # the replayed step 5 is logged once
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(TrainingError, match="run without --resume"):
        _train(_recipe(tmp_path), resume=True)


def test_resume_from_a_corrupt_checkpoint_is_one_clear_error_that_keeps_the_file(tmp_path):
    _train(_recipe(tmp_path, out="run", max_steps=2))
    state = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    before = state.read_bytes()
    with pytest.raises(TrainingError, match="trainer_state.pt is not a readable peftkit checkpoint") as info:
        _train(_recipe(tmp_path, out="run", max_steps=2), resume=True)
    assert "Start a new run" in str(info.value) and state.read_bytes() == before


def test_resume_with_a_changed_recipe_is_refused_and_names_every_change(tmp_path, interrupt_at):
    interrupt_at(3)
    with pytest.raises(KeyboardInterrupt):
        _train(_recipe(tmp_path, out="run"))
    interrupt_at.remove()
    checkpoint = tmp_path / "run" / "checkpoint"
    before = {p.name: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}
    changed = _recipe(tmp_path, out="run", lr=5e-3, seed=7)
    with pytest.raises(TrainingError) as info:
        _train(changed, resume=True)
    message = str(info.value)
    assert "train.lr: 0.01 -> 0.005" in message and "train.seed: 0 -> 7" in message
    assert "another output.dir" in message and str(checkpoint / "recipe.yaml") in message
    assert {p.name: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()} == before  # the checkpoint is untouched
    # What does not change the training (how often to log, the eval batch size) may change.
    relaxed = _recipe(tmp_path, out="run", eval_batch_size=2)
    relaxed.output.log_every = 2
    assert _train(relaxed, resume=True).steps == 6


class _NanObjective:
    """The sft objective, except that the n-th training loss is NaN."""

    name = "nan_sft"
    description = "sft with a NaN loss at a given training call (test only)"

    def __init__(self, nan_at: int):
        self.sft = peftkit.plugin_manager().get_objective("sft")
        self.options = self.sft.options
        self.prepare_data, self.collate = self.sft.prepare_data, self.sft.collate
        self.calls, self.nan_at = 0, nan_at

    def loss(self, model, batch, options):
        out = self.sft.loss(model, batch, options)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.nan_at:
                return out._replace(loss=out.loss * float("nan"))
        return out


def test_a_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, register_plugin):
    objective = _NanObjective(nan_at=5)

    class Plugin:
        @peftkit.hookimpl
        def peftkit_register_objectives(self, register):
            register(objective)

    register_plugin(Plugin())
    recipe = _recipe(tmp_path)
    recipe.objective.name = "nan_sft"
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*last good checkpoint .* is intact"):
        _train(recipe)
    state = torch.load(tmp_path / "out" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_diverging_learning_rate_fails_the_run_and_saves_nothing(tmp_path):
    recipe = _recipe(tmp_path, max_steps=1, warmup_steps=0, scheduler="constant")
    # Past what validation allows (lr <= 1), to stand for any run that diverges: the one update leaves
    # weights near 1e30, finite, but their held-out loss is not.
    recipe.train.lr = 1e30
    with pytest.raises(TrainingError) as info:
        _train(recipe)
    message = str(info.value)
    assert "held-out loss became" in message and "after step 1" in message
    assert "lower train.lr (it is 1e+30)" in message and "train.max_grad_norm" in message
    assert "no checkpoint was written yet" in message
    out = tmp_path / "out"
    assert not (out / "adapter").exists() and not (out / "checkpoint").exists()


def _break_adapter_after_update(trainer, monkeypatch, update: int) -> None:
    """Make the ``update``-th optimizer step leave NaN in one adapter tensor (the loss stays finite)."""
    real_step, calls = trainer.optimizer.step, []

    def step(*args, **kwargs):
        real_step(*args, **kwargs)
        calls.append(None)
        if len(calls) == update:
            with torch.no_grad():
                trainer.tuned.trainable_parameters()[0].view(-1)[0] = float("nan")

    monkeypatch.setattr(trainer.optimizer, "step", step)


def test_a_non_finite_adapter_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(_recipe(tmp_path), model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False)
    trainer.setup()
    _break_adapter_after_update(trainer, monkeypatch, update=3)
    with pytest.raises(TrainingError, match=r"non-finite \(NaN/inf\) in the optimizer update of step 3: .*last good checkpoint .* is intact"):
        trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint"
    assert torch.load(checkpoint / "trainer_state.pt", weights_only=True)["step"] == 2
    assert all(torch.isfinite(t).all() for t in _tensors(checkpoint / "adapter").values())
    assert not (tmp_path / "out" / "adapter").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2  # the broken step is not reported as a logged step


class _NanEvalObjective(_NanObjective):
    """The sft objective, except that the n-th held-out evaluation gives a NaN loss."""

    name = "nan_eval_sft"

    def loss(self, model, batch, options):
        out = self.sft.loss(model, batch, options)
        if not torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.nan_at:
                return out._replace(loss=out.loss * float("nan"))
        return out


@pytest.mark.parametrize("nan_at, expected", [(1, "held-out loss is nan before any training step"), (2, "held-out loss became nan after step 3")])
def test_a_non_finite_held_out_loss_fails_the_run(tmp_path, register_plugin, nan_at, expected):
    objective = _NanEvalObjective(nan_at=nan_at)  # 8 held-out examples, 4 per batch: evaluation 1 is at step 0, 2 at step 3

    class Plugin:
        @peftkit.hookimpl
        def peftkit_register_objectives(self, register):
            register(objective)

    register_plugin(Plugin())
    recipe = _recipe(tmp_path, eval_batch_size=8)
    recipe.objective.name = "nan_eval_sft"
    with pytest.raises(TrainingError, match=expected):
        _train(recipe)
    out = tmp_path / "out"
    assert not (out / "adapter").exists()
    if nan_at == 2:
        assert torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if nan_at == 2 else []
    assert all(record.get("eval_loss", 0.0) == record.get("eval_loss", 0.0) for record in logged)  # no NaN is logged


def test_an_objective_with_its_own_loop_is_handed_the_trainer(tmp_path, register_plugin):
    seen = {}

    class LoopObjective:
        name = "own_loop"
        description = "test objective that runs its own loop"
        options = peftkit.plugin_manager().get_objective("sft").options
        sft = peftkit.plugin_manager().get_objective("sft")
        prepare_data, collate, loss = sft.prepare_data, sft.collate, sft.loss

        def run(self, trainer, options):
            seen["examples"] = len(trainer.train_examples)
            seen["has_optimizer"] = trainer.optimizer is not None
            return "done"

    class Plugin:
        @peftkit.hookimpl
        def peftkit_register_objectives(self, register):
            register(LoopObjective())

    register_plugin(Plugin())
    recipe = _recipe(tmp_path)
    recipe.objective.name = "own_loop"
    assert _train(recipe) == "done"
    assert seen == {"examples": 40, "has_optimizer": True}


@pytest.mark.parametrize(
    "method, options",
    [
        ("lora", {"r": 4, "init": "gaussian"}),
        ("ia3", {}),
        ("adapter", {}),
        ("prompt_tuning", {"num_virtual_tokens": 3}),
        ("p_tuning", {"num_virtual_tokens": 3}),
    ],
)
def test_gradient_checkpointing_gives_the_same_gradients(method, options):
    if method not in peftkit.available_methods():
        pytest.skip(f"{method} is not installed")
    sft = peftkit.plugin_manager().get_objective("sft")
    from peftkit.options import build_options

    opts = build_options(sft.options, {"loss_chunk_size": 4})
    tok = tiny_tokenizer()
    batch = sft.collate(
        sft.prepare_data([{"prompt": "hello", "response": "hi, how are you?"}, {"prompt": "what is 2 plus 2?", "response": "4"}], tok, opts, 32),
        tok,
    )
    grads = []
    for checkpointing in (False, True):
        tuned = peftkit.wrap(tiny_llama(), method, **options)
        tuned.train()
        if checkpointing:
            enable_gradient_checkpointing(tuned)
            hf = tuned.base_model
            assert getattr(hf, "is_activation_checkpointing", None) or hf.is_gradient_checkpointing
        loss = sft.loss(tuned, batch, opts).loss
        grads.append(torch.autograd.grad(loss, tuned.trainable_parameters()))
    assert any(g.abs().sum() > 0 for g in grads[1])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


# ------------------------------------------------------------------ processes
_RUN_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    import peftkit
    from peftkit.training.recipe import load_recipe
    from peftkit.training.trainer import Trainer

    class Crash:
        @peftkit.hookimpl
        def peftkit_on_log(self, step, metrics):
            if step == int(sys.argv[3]) and "loss" in metrics:
                import os; os._exit(9)  # a hard kill: no cleanup, no exception handling

    if int(sys.argv[3]):
        peftkit.plugin_manager().register(Crash())
    Trainer(load_recipe(sys.argv[1], [f"output.dir={sys.argv[2]}"]), resume=sys.argv[4] == "1", progress=False).train()
    """
)


def _tiny_model_recipe(tmp_path: Path) -> Path:
    model_dir = tmp_path / "tiny-model"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "method": {"name": "lora", "options": {"r": 4, "dropout": 0.1}},
        "data": {"train": _write_data(tmp_path, n=72), "eval_size": 8, "max_length": 32},
        "train": {"max_steps": 8, "batch_size": 4, "lr": 1e-2},
        "output": {"save_every": 2, "log_every": 1},
    }
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_train_then_generate(tmp_path, capsys):
    from peftkit.cli import main

    recipe = _tiny_model_recipe(tmp_path)
    out = tmp_path / "cli-run"
    assert main(["train", str(recipe), f"output.dir={out}", "train.max_steps=2", "--no-progress"]) == 0
    assert "held-out loss" in capsys.readouterr().out
    assert main(["generate", "--adapter", str(out / "adapter"), "--prompt", "what is 2 plus 2?", "--max-new-tokens", "3"]) == 0
    reply = capsys.readouterr().out.strip()
    assert isinstance(reply, str)  # a random tiny model says anything; the command must run end to end


def test_cli_generate_refuses_a_damaged_adapter_folder_in_one_line(tmp_path, capsys, monkeypatch):
    import shutil

    import peftkit.training.models as models
    from peftkit.cli import main

    recipe = _tiny_model_recipe(tmp_path)
    out = tmp_path / "cli-run"
    assert main(["train", str(recipe), f"output.dir={out}", "train.max_steps=1", "--no-progress"]) == 0
    capsys.readouterr()

    def damaged(name, edit):
        folder = tmp_path / name
        shutil.copytree(out / "adapter", folder)
        edit(folder)
        return str(folder)

    def flip_a_bit(folder):
        weights = bytearray((folder / "adapter.safetensors").read_bytes())
        weights[-10] ^= 1
        (folder / "adapter.safetensors").write_bytes(bytes(weights))

    def fail_if_loaded(*args, **kwargs):
        raise AssertionError("the base model loaded before the adapter folder was checked")

    with monkeypatch.context() as patch:
        patch.setattr(models, "load_model_and_tokenizer", fail_if_loaded)
        cases = [
            (damaged("flipped", flip_a_bit), "does not match the checksum recorded in adapter_config.json"),
            (damaged("latin1", lambda f: (f / "base_model.txt").write_bytes(b"caf\xe9\n")), "base_model.txt is not UTF-8 text: byte 0xe9"),
            (damaged("empty", lambda f: (f / "base_model.txt").write_text("\n")), "base_model.txt does not hold one model name"),
        ]
        for folder, message in cases:
            assert main(["generate", "--adapter", folder, "--prompt", "hi"]) == 2
            err = capsys.readouterr().err
            assert err.startswith("peftkit: error: ") and message in err and len(err.splitlines()) == 1, err
    tokenizer_gone_bad = damaged("tokenizer", lambda f: (f / "tokenizer" / "tokenizer.json").write_text("{not json"))
    assert main(["generate", "--adapter", tokenizer_gone_bad, "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("peftkit: error: the tokenizer saved with the adapter") and "restore it" in err
    with pytest.raises(SystemExit) as info:
        main(["generate", "--adapter", str(out / "adapter"), "--prompt", "hi", "--max-new-tokens", "-5"])
    assert info.value.code == 2 and "-5 is not a positive number of tokens" in capsys.readouterr().err


def test_cli_reports_a_non_finite_run_as_one_error_with_exit_code_2(tmp_path, capsys, monkeypatch):
    from peftkit.cli import main

    real_step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):  # what a diverging update does to the weights
        result = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    recipe = _tiny_model_recipe(tmp_path)
    out = tmp_path / "cli-run"
    assert main(["train", str(recipe), f"output.dir={out}", "train.max_steps=2", "--no-progress"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after transformers' progress bars of saving the tiny model
    assert error.startswith("peftkit: error: the adapter became non-finite (NaN/inf) in the optimizer update of step 1")
    assert "Fix: the learning rate is the usual cause" in error
    assert not (out / "adapter").exists() and not (out / "checkpoint").exists()


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PEFTKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_a_killed_process_resumes_bit_identical(tmp_path):
    recipe = _tiny_model_recipe(tmp_path)
    script = tmp_path / "run.py"
    script.write_text(_RUN_SCRIPT)

    def run(out, crash_at, resume):
        return subprocess.run([sys.executable, str(script), str(recipe), str(tmp_path / out), str(crash_at), resume], env=_env(), capture_output=True, text=True)

    assert run("ref", 0, "0").returncode == 0
    killed = run("run", 7, "0")
    assert killed.returncode == 9, killed.stderr[-2000:]
    done = run("run", 0, "1")
    assert done.returncode == 0, done.stderr[-2000:]
    ref, got = _tensors(tmp_path / "ref" / "adapter"), _tensors(tmp_path / "run" / "adapter")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_torchrun_two_processes_end_with_identical_adapters_and_a_falling_loss(tmp_path):
    recipe = _tiny_model_recipe(tmp_path)
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, torch
            torch.set_num_threads(1)
            from peftkit.training.recipe import load_recipe
            from peftkit.training.trainer import Trainer
            t = Trainer(load_recipe(sys.argv[1], [f"output.dir={sys.argv[2]}"]), progress=False)
            result = t.train()
            rank = t.accelerator.process_index
            t.tuned.save(f"{sys.argv[2]}/rank{rank}")
            # its own file: two ranks' prints to one pipe can interleave mid-line
            with open(f"{sys.argv[2]}/rank{rank}/world.txt", "w") as fh:
                fh.write(str(t.accelerator.num_processes))
            """
        )
    )
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(recipe), str(out)],
        env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(out / f"rank{r}" / "world.txt").read_text() for r in (0, 1)] == ["2", "2"]
    a, b = _tensors(out / "rank0"), _tensors(out / "rank1")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in losses if "eval_loss" in r]
    assert evals[-1] < evals[0]


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_schedules_match_transformers(name):
    from transformers import get_scheduler

    from peftkit.training.trainer import make_scheduler

    param = [torch.nn.Parameter(torch.zeros(1))]
    ours_opt, ref_opt = torch.optim.SGD(param, lr=1.0), torch.optim.SGD(param, lr=1.0)
    ours, ref = make_scheduler(ours_opt, name, 3, 10), get_scheduler(name, ref_opt, num_warmup_steps=3, num_training_steps=10)
    for _ in range(10):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        ours_opt.step(), ref_opt.step(), ours.step(), ref.step()


def test_a_run_after_another_accelerate_user_with_another_precision_in_the_same_process(tmp_path):
    # TRL's configs default to bf16: after a TRL run in this process, accelerate's process-wide
    # state refused every later Accelerator(mixed_precision="no") ("already been initialized").
    code = textwrap.dedent(
        f"""
        import accelerate, peftkit
        from peftkit.testing import tiny_llama, tiny_tokenizer
        from peftkit.training.recipe import recipe_from_dict
        from peftkit.training.trainer import Trainer

        accelerate.Accelerator(cpu=True, mixed_precision="bf16")
        recipe = recipe_from_dict({{
            "data": {{"train": {_write_data(tmp_path)!r}, "eval_size": 4, "max_length": 32}},
            "train": {{"max_steps": 1, "batch_size": 4}},
            "output": {{"dir": {str(tmp_path / "out")!r}, "plot": False}},
        }})
        result = Trainer(recipe, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False).train()
        print("steps", result.steps)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PEFTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "steps 1" in proc.stdout
