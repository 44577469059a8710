"""``train.distributed``: the recipe key, and FSDP2 across two CPU processes (gloo) under ``torchrun``.

The two-process tests start ``torchrun --nproc_per_node 2`` in a subprocess on
the tiny Llama (each a few optimizer steps) and are marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from peftkit.testing import tiny_llama, tiny_tokenizer
from peftkit.training.recipe import RecipeError, load_recipe, recipe_from_dict

METHODS = {
    "lora": {"r": 4, "dropout": 0.0},
    "ia3": {},
    "adapter": {},
    "prompt_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4},
    "prefix_tuning": {"num_virtual_tokens": 4},
}

# One process of a run: train the recipe, print what the parent checks.
_RUN = textwrap.dedent(
    """
    import os, sys, torch
    torch.set_num_threads(1)
    import peftkit
    from peftkit.training.recipe import load_recipe
    from peftkit.training.trainer import Trainer

    class Crash:  # a hard kill of rank 0 after the step PEFTKIT_TEST_CRASH_AT is logged; torchrun stops the rest
        @peftkit.hookimpl
        def peftkit_on_log(self, step, metrics):
            if step == int(os.environ["PEFTKIT_TEST_CRASH_AT"]) and "loss" in metrics:
                os._exit(9)

    if os.environ.get("PEFTKIT_TEST_CRASH_AT"):
        peftkit.plugin_manager().register(Crash())
    recipe, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    overrides = [f"output.dir={out}", *sys.argv[4:]]
    t = Trainer(load_recipe(recipe, overrides), progress=False, resume=resume, overwrite=True)
    result = t.train()
    from torch.distributed.tensor import DTensor
    if t.fsdp:
        t.step_module.reshard()  # the root keeps its parameters gathered after a forward until the next backward
    params = list(t.tuned.parameters())
    sharded = "all" if all(isinstance(p, DTensor) for p in params) else "none" if not any(isinstance(p, DTensor) for p in params) else "some"
    rank = t.accelerator.process_index  # one file per process: two processes' prints can interleave mid-line
    with open(f"{out}.result{rank}", "w") as fh:
        fh.write(f"RESULT {rank} {t.accelerator.num_processes} {int(t.fsdp)} {sharded} {result.steps}")
    """
)


def _write_data(folder: Path, n: int = 64) -> str:
    """Arithmetic records whose replies are one digit: every example has the same number of target tokens,
    so the mean of two processes' mean losses is the mean loss of their joint batch."""
    import random

    rng = random.Random(0)
    path = folder / "data.jsonl"
    with open(path, "w") as fh:
        for _ in range(n):
            a, b = rng.randint(0, 4), rng.randint(0, 4)
            fh.write(json.dumps({"prompt": f"what is {a} plus {b}?", "response": f"{a + b}"}) + "\n")
    return str(path)


def _recipe_file(tmp_path: Path, method: str = "lora", **train) -> Path:
    model_dir = tmp_path / "tiny-model"
    if not model_dir.exists():
        tiny_llama().save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "method": {"name": method, "options": METHODS[method]},
        "data": {"train": _write_data(tmp_path), "eval_size": 8, "max_length": 32},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "scheduler": "linear", "warmup_steps": 1, "distributed": "fsdp", **train},
        "output": {"save_every": 2, "log_every": 1, "plot": False},
    }
    path = tmp_path / f"recipe-{method}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PEFTKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "HF_HUB_OFFLINE": "1"}


def _run(
    tmp_path: Path, recipe: Path, out: Path, *overrides: str, nproc: int = 2, resume: bool = False, crash_at: int = 0
) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    if nproc == 1:
        command = [sys.executable, str(script)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script)]  # a free port
    return subprocess.run(
        [*command, str(recipe), str(out), "1" if resume else "0", *overrides], env={**_env(), "PEFTKIT_TEST_CRASH_AT": str(crash_at or "")},
        capture_output=True, text=True, timeout=900,
    )


def _results(out: Path) -> list[str]:
    """Each process's RESULT line: rank, processes, FSDP on, which parameters are DTensors, steps."""
    return sorted(path.read_text() for path in out.parent.glob(f"{out.name}.result*"))


def _errors(proc: subprocess.CompletedProcess) -> str:
    """The processes' error lines (torchrun's own report of the failure comes last and says little)."""
    return "\n".join(line for line in proc.stderr.splitlines() if "Error" in line or "rank0" in line)[-4000:]


def _tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter.safetensors"))


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ------------------------------------------------------------------ the recipe key (default suite)
def test_distributed_defaults_to_auto_and_accepts_each_choice(tmp_path):
    data = {"train": _write_data(tmp_path, n=4)}
    for choice in ("auto", "ddp", "fsdp"):
        recipe = recipe_from_dict({"data": data, "train": {"distributed": choice}})
        assert recipe.train.distributed == choice
    assert recipe_from_dict({"data": data}).train.distributed == "auto"


@pytest.mark.parametrize("value", ["fsdp2", "FSDP", 2, True])
def test_a_bad_distributed_value_is_one_error_naming_field_value_and_choices(tmp_path, value):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"data": {"train": _write_data(tmp_path, n=4)}, "train": {"distributed": value}})
    message = str(info.value)
    assert "1 problem(s)" in message
    assert f"train.distributed = {value!r}" in message
    assert "'auto' | 'ddp' | 'fsdp'" in message


def test_every_shipped_recipe_names_distributed_auto():
    for path in sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["train"]["distributed"] == "auto", path.name
        assert load_recipe(path).train.distributed == "auto"


def test_fsdp_with_one_process_trains_in_that_process_and_says_so(tmp_path, capsys, monkeypatch):
    from peftkit.training.trainer import Trainer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = load_recipe(_recipe_file(tmp_path, max_steps=1), [f"output.dir={tmp_path / 'out'}"])
    trainer = Trainer(recipe, progress=False)
    assert "train.distributed = 'fsdp' with one process: nothing to shard" in capsys.readouterr().out
    assert not trainer.fsdp
    assert trainer.train().steps == 1


def test_fsdp_refuses_a_quantized_base_naming_the_limit():
    from peftkit.training.distributed import fsdp_refusal

    assert fsdp_refusal({}) is None
    message = fsdp_refusal({"quantization_config": object()})
    assert message.startswith("train.distributed = 'fsdp' cannot shard a quantized base model")
    assert "train.distributed: ddp" in message
    assert fsdp_refusal({"load_in_4bit": True}) == message


def test_decoder_layers_are_the_models_repeated_blocks():
    import peftkit
    from peftkit.training.distributed import decoder_layers

    model = tiny_llama()
    layers = decoder_layers(peftkit.wrap(model, "lora", r=2))
    assert layers == list(model.model.layers)


# ------------------------------------------------------------------ two processes (slow)
@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fsdp_two_processes_train_every_method_and_save_a_loadable_adapter(tmp_path, method):
    import peftkit

    recipe = _recipe_file(tmp_path, method)
    out = tmp_path / "fsdp"
    proc = _run(tmp_path, recipe, out)
    assert proc.returncode == 0, _errors(proc)
    assert _results(out) == ["RESULT 0 2 1 all 3", "RESULT 1 2 1 all 3"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    tuned = peftkit.load(tiny_llama(), out / "adapter")  # one process, the normal adapter directory
    assert tuned.adapter_info("default").method == method
    saved = _tensors(out / "adapter")
    assert all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.slow
def test_fsdp_adapter_equals_the_one_process_adapter_of_the_same_global_batch(tmp_path):
    recipe = _recipe_file(tmp_path, "lora", max_steps=4, batch_size=4)
    fsdp = _run(tmp_path, recipe, tmp_path / "fsdp")
    assert fsdp.returncode == 0, _errors(fsdp)
    ddp = _run(tmp_path, recipe, tmp_path / "ddp", "train.distributed=ddp")
    assert ddp.returncode == 0, _errors(ddp)
    single = _run(tmp_path, recipe, tmp_path / "single", "train.batch_size=8", nproc=1)  # 2 x 4 = the same 8 examples per step
    assert single.returncode == 0, _errors(single)
    got = _tensors(tmp_path / "fsdp" / "adapter")
    to_ddp, to_single = _max_difference(got, _tensors(tmp_path / "ddp" / "adapter")), _max_difference(got, _tensors(tmp_path / "single" / "adapter"))
    print(f"max |fsdp - ddp| = {to_ddp:.3g}, max |fsdp - single| = {to_single:.3g}")
    assert to_ddp < 1e-6 and to_single < 1e-6  # measured 8.2e-08 and 6.7e-08 (CPU, gloo, float32)
    assert _max_difference(got, {k: torch.zeros_like(v) for k, v in got.items()}) > 1e-3  # it did train


@pytest.mark.slow
def test_fsdp_resume_restores_the_gathered_optimizer_state_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    recipe = _recipe_file(tmp_path, "lora", max_steps=4, batch_size=4)
    full = _run(tmp_path, recipe, tmp_path / "full")
    assert full.returncode == 0, _errors(full)
    killed = _run(tmp_path, recipe, tmp_path / "run", crash_at=3)  # after the step-2 checkpoint
    assert killed.returncode != 0 and not (tmp_path / "run" / "adapter").exists()
    state = torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    moments = [v["exp_avg"] for v in state["optimizer"]["state"].values()]
    assert moments and all(type(m) is torch.Tensor for m in moments)  # gathered in full, not DTensor shards
    resumed = _run(tmp_path, recipe, tmp_path / "run", resume=True)
    assert resumed.returncode == 0, _errors(resumed)
    difference = _max_difference(_tensors(tmp_path / "full" / "adapter"), _tensors(tmp_path / "run" / "adapter"))
    print(f"max |resumed - uninterrupted| = {difference:.3g}")
    assert difference < 1e-6  # measured 0 (bitwise) on CPU with gloo; not promised on GPU (nccl reduction order)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("override", ["train.gradient_checkpointing=true", "train.mixed_precision=bf16"])
def test_fsdp_combines_with_gradient_checkpointing_and_bf16_autocast_on_cpu(tmp_path, override):
    recipe = _recipe_file(tmp_path, "lora", max_steps=2)
    reference = _run(tmp_path, recipe, tmp_path / "plain")
    assert reference.returncode == 0, _errors(reference)
    proc = _run(tmp_path, recipe, tmp_path / "combined", override)
    assert proc.returncode == 0, _errors(proc)
    plain, combined = _tensors(tmp_path / "plain" / "adapter"), _tensors(tmp_path / "combined" / "adapter")
    difference = _max_difference(plain, combined)
    print(f"{override}: max |combined - plain| = {difference:.3g}")
    if "checkpointing" in override:
        assert difference < 1e-6  # recomputing activations changes no number
    else:
        assert 0 < difference < 1e-2  # bf16 autocast rounds, but trains the same adapter


def _objective_recipe(tmp_path: Path, objective: str) -> Path:
    """The lora FSDP recipe with another objective of the trainer's loop, on a few records of its kind."""
    path = _recipe_file(tmp_path, "lora", max_steps=2)
    raw = yaml.safe_load(path.read_text())
    data = tmp_path / f"{objective}.jsonl"
    if objective == "classify":
        rows = [{"text": f"what is {a} plus {a}?", "label": "even" if a % 2 == 0 else "odd"} for a in range(10)] * 3
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        options = {"lm_weight": 0.5}
    else:
        lines = (Path(__file__).parents[2] / "data" / "rlhf" / "preferences.jsonl").read_text().splitlines()
        data.write_text("\n".join([line for line in lines if '"chosen"' in line][:24]) + "\n")
        options = {"sft_adapter": None} if objective == "dpo" else {}
    raw["objective"] = {"name": objective, "options": options}
    raw["data"] = {"train": str(data), "eval_size": 4, "max_length": 48}
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["reward", "dpo", "classify"])
def test_fsdp_two_processes_run_the_other_objectives_of_the_trainers_loop(tmp_path, objective):
    import peftkit

    out = tmp_path / "fsdp"
    proc = _run(tmp_path, _objective_recipe(tmp_path, objective), out)
    assert proc.returncode == 0, _errors(proc)
    assert _results(out) == ["RESULT 0 2 1 all 2", "RESULT 1 2 1 all 2"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(json.loads(json.dumps(r)) == r for r in records)
    tuned = peftkit.load(tiny_llama(), out / "adapter")
    assert tuned.adapter_info("default").method == "lora"


def test_fsdp_refuses_an_objective_with_a_loop_of_its_own(tmp_path, register_plugin, monkeypatch):
    import peftkit
    from peftkit.errors import TrainingError
    from peftkit.training import distributed
    from peftkit.training.trainer import Trainer

    class LoopObjective:
        name = "own_loop"
        description = "test objective that runs its own loop"
        options = peftkit.plugin_manager().get_objective("sft").options

        def run(self, trainer, options):  # pragma: no cover - refused before
            raise AssertionError

    class Plugin:
        @peftkit.hookimpl
        def peftkit_register_objectives(self, register):
            register(LoopObjective())

    register_plugin(Plugin())
    recipe = load_recipe(_recipe_file(tmp_path), [f"output.dir={tmp_path / 'out'}"])
    recipe.objective.name = "own_loop"
    monkeypatch.setattr(distributed, "launched_world_size", lambda: 2)  # as under torchrun, without starting processes
    with pytest.raises(TrainingError, match=r"train.distributed = 'fsdp': objective 'own_loop' runs a loop of its own.*use train.distributed: auto"):
        Trainer(recipe, progress=False)
