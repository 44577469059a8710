"""One command that proves the CUDA path: the main job in bf16, QLoRA, every method vs peft, PPO vs SFT, FSDP.

    python benchmarks/gpu_check.py            # on a CUDA machine, the embedded SmolLM2-135M only (no internet)
    python benchmarks/gpu_check.py --smoke    # anywhere: the smallest configuration, tiny model, CPU if no CUDA

Rows (one table at the end; the exit status is 1 if any row failed, 2 if
there is no CUDA device and ``--smoke`` was not given):

* ``sft bf16``: ``recipes/sft-lora.yaml`` through the trainer with
  ``train.mixed_precision: bf16``: tokens/s, peak GPU memory, held-out loss
  before -> after (it must fall);
* ``qlora paged-adamw-8bit``: one LoRA and one QLoRA run of a few SFT steps,
  QLoRA with bitsandbytes' ``PagedAdamW8bit``; peak GPU memory, QLoRA / LoRA
  (CUDA only: bitsandbytes);
* ``<method> vs peft``: forward+backward+AdamW step time of every method, peftkit
  and Hugging Face peft on the same device (the model and options of
  benchmarks/methods.py, bf16 autocast on CUDA), ratio peftkit / peft
  (``--smoke``: lora and prompt_tuning on the tiny model);
* ``ppo vs sft``: one PPO step (benchmarks/ppo_memory.py: four roles on one
  base) vs one SFT step, peak memory (GPU memory on CUDA, RSS on CPU);
* ``fsdp 2 processes``: ``train.distributed: fsdp`` under ``torchrun
  --nproc_per_node 2`` (benchmarks/distributed.py): two GPUs when present;
  with ``--smoke`` on CPU, two gloo processes.

Each heavy row runs in its own process, so one failure or out-of-memory does
not hide the rest. Not run on a GPU by its author (no GPU was available): the
``--smoke`` configuration is what CI runs (tests/training/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent
ROWS = ("sft", "qlora", "methods", "ppo", "fsdp")


# ------------------------------------------------------------------ helpers
def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _peak_gpu_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _tiny_model_dir(folder: Path) -> str:
    from peftkit.testing import tiny_llama, tiny_tokenizer

    path = folder / "tiny-model"
    if not path.exists():
        tiny_llama().save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return str(path)


def _model(args: argparse.Namespace, folder: Path) -> str:
    return _tiny_model_dir(folder) if args.smoke else args.model


# ------------------------------------------------------------------ rows (each returns its figures as text)
def row_sft(args: argparse.Namespace, folder: Path) -> str:
    from peftkit.training.recipe import load_recipe
    from peftkit.training.trainer import Trainer

    steps = 3 if args.smoke else args.sft_steps
    overrides = [
        f"model.name_or_path={_model(args, folder)}", f"train.max_steps={steps}", "train.mixed_precision=bf16",
        f"output.dir={folder / 'sft'}", "output.save_every=0", "output.plot=false", f"output.log_every={steps}",
    ]
    if args.smoke:
        overrides += ["data.eval=null", "data.eval_size=16", "data.max_train_samples=64"]
    _reset_peak()
    result = Trainer(load_recipe(ROOT / "recipes" / "sft-lora.yaml", overrides), progress=False, overwrite=True).train()
    peak = _peak_gpu_mb()
    before, after = result.eval_loss_before, result.eval_loss_after
    if before is None or after is None or not math.isfinite(after):
        raise RuntimeError(f"no finite held-out loss ({before} -> {after})")
    if not args.smoke and after >= before:
        raise RuntimeError(f"held-out loss did not fall: {before:.4f} -> {after:.4f}")
    memory = f", peak GPU {peak:.0f} MB" if peak is not None else ""
    return f"{steps} steps, {result.tokens_per_second:.0f} tokens/s{memory}, held-out loss {before:.4f} -> {after:.4f}"


def _qlora_peak(kind: str, model_name: str, steps: int) -> dict[str, float]:
    """Peak GPU memory of ``steps`` SFT steps with LoRA (AdamW) or QLoRA (paged 8-bit AdamW). Child process."""
    import torch

    import peftkit
    from peftkit.options import build_options
    from peftkit.training.models import load_model_and_tokenizer
    from peftkit_plugins.sft import SftObjective, SftOptions

    pm = peftkit.plugin_manager()
    options = {"r": 8, "target_modules": "all-linear"}
    kwargs = pm.model_load_kwargs(kind, build_options(pm.get_injector(kind).options, options)) if kind == "qlora" else {}
    _reset_peak()
    model, tokenizer = load_model_and_tokenizer(model_name, dtype="bfloat16" if kind == "lora" else "float32", load_kwargs=kwargs)
    if kind == "lora":
        model = model.to("cuda")
    tuned = peftkit.wrap(model, kind, **options)
    tuned.train()
    if kind == "qlora":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(tuned.trainable_parameters(), lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-4)
    records = [json.loads(line) for line in (ROOT / "data" / "arithmetic" / "train.jsonl").read_text().splitlines()[:8]]
    objective = SftObjective()
    batch = objective.collate(objective.prepare_data(records, tokenizer, SftOptions(), 128), tokenizer)
    batch = {k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = objective.loss(tuned, batch, SftOptions()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    return {"peak_mb": _peak_gpu_mb() or 0.0, "loss": float(loss)}


def row_qlora(args: argparse.Namespace, folder: Path) -> str:
    if _device() != "cuda":
        raise _Skip("needs CUDA (bitsandbytes 4-bit and paged optimizers)")
    results = {kind: _child("qlora-child", kind, args) for kind in ("lora", "qlora")}
    lora, qlora = results["lora"]["peak_mb"], results["qlora"]["peak_mb"]
    return f"peak GPU: LoRA bf16 + AdamW {lora:.0f} MB, QLoRA nf4 + PagedAdamW8bit {qlora:.0f} MB ({qlora / lora:.2f}x)"


def _method_ms(method: str, impl: str, base_dir: str, steps: int, batch: int, seq: int) -> dict[str, Any]:
    """Median step milliseconds of one (method, implementation) on this device. Child process."""
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(BENCHMARKS))
    from methods import METHODS, _peft_config  # the benchmark's own model and options

    device = _device()
    model = LlamaForCausalLM.from_pretrained(base_dir).to(device)
    if impl == "peftkit":
        import peftkit

        tuned = peftkit.wrap(model, method, **METHODS[method])
    else:
        import peft

        config = _peft_config(method)
        if config is None:
            return {"skipped": f"peft has no {method}"}
        tuned = peft.get_peft_model(model, config)
    tuned.train()
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    times = []
    for i in range(2 + steps):
        _sync()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = tuned(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1000)
    return {"ms": statistics.median(times)}


def row_methods(args: argparse.Namespace, folder: Path) -> list[tuple[str, str]]:
    sys.path.insert(0, str(BENCHMARKS))
    from methods import _base_dir

    base_dir = _tiny_model_dir(folder) if args.smoke else str(_base_dir(folder))
    methods = ("lora", "prompt_tuning") if args.smoke else ("lora", "ia3", "adapter", "prompt_tuning", "p_tuning", "prefix_tuning")
    rows = []
    for method in methods:
        ours = _child("method-child", f"{method}:peftkit:{base_dir}", args)
        ref = _child("method-child", f"{method}:peft:{base_dir}", args)
        if "ms" not in ref:
            rows.append((f"{method} vs peft", f"peftkit {ours['ms']:.1f} ms/step ({ref.get('skipped')})"))
        else:
            rows.append((f"{method} vs peft", f"peftkit {ours['ms']:.1f} ms, peft {ref['ms']:.1f} ms per step: {ours['ms'] / ref['ms']:.2f}x"))
    return rows


def _ppo_measure(which: str, model_name: str) -> dict[str, Any]:
    """One PPO or SFT step of benchmarks/ppo_memory.py on this device. Child process."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    import ppo_memory

    if torch.cuda.is_available():
        torch.set_default_device("cuda")
    _reset_peak()
    result = ppo_memory.measure(which, model_name, batch=4 if model_name == "tiny" else 8, new_tokens=8 if model_name == "tiny" else 24)
    result["peak_gpu_mb"] = _peak_gpu_mb()
    return result


def row_ppo(args: argparse.Namespace, folder: Path) -> str:
    model = "tiny" if args.smoke else args.model
    sft, ppo = _child("ppo-child", f"sft:{model}", args), _child("ppo-child", f"ppo:{model}", args)
    key, unit = ("peak_gpu_mb", "GPU") if sft.get("peak_gpu_mb") is not None else ("peak_rss_mb", "RSS")
    return f"peak {unit}: PPO step {ppo[key]:.0f} MB, SFT step {sft[key]:.0f} MB ({ppo[key] / sft[key]:.2f}x)"


def row_fsdp(args: argparse.Namespace, folder: Path) -> str:
    import torch

    if _device() == "cuda" and torch.cuda.device_count() < 2:
        raise _Skip(f"needs 2 GPUs ({torch.cuda.device_count()} present)")
    sys.path.insert(0, str(BENCHMARKS))
    from distributed import run

    steps = 2 if args.smoke else 10
    rows = run("2 processes FSDP", _model(args, folder), steps, max(1, (os.cpu_count() or 2) // 2), folder)
    if not all(row["fsdp"] for row in rows) or len(rows) != 2:
        raise RuntimeError(f"expected 2 FSDP processes, got {rows}")
    rss = " / ".join(f"{row['peak_rss_mb']:.0f}" for row in rows)
    where = "2 GPUs" if _device() == "cuda" else "2 CPU processes (gloo)"
    return f"{where}, {steps} steps, {rows[0]['tokens_per_s']:.0f} tokens/s, peak RSS per process {rss} MB, loss {rows[0]['loss']:.4f}"


class _Skip(Exception):
    """A row that cannot run here (no CUDA, one GPU): reported as skipped, not as a failure."""


# ------------------------------------------------------------------ child processes
def _child(kind: str, what: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, what, "--model", args.model, "--method-steps", str(args.method_steps)]
    if args.smoke:
        cmd.append("--smoke")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} {what} failed: {proc.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


def _run_child(kind: str, what: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if kind == "qlora-child":
        return _qlora_peak(what, args.model, steps=5)
    if kind == "method-child":
        method, impl, base_dir = what.split(":", 2)
        batch, seq = (1, 16) if args.smoke else (4, 256)
        return _method_ms(method, impl, base_dir, 1 if args.smoke else args.method_steps, batch, seq)
    which, model = what.split(":", 1)
    return _ppo_measure(which, model)


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="smallest configuration on the tiny model (runs on CPU)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model alias or folder (default the embedded SmolLM2-135M)")
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--method-steps", type=int, default=10)
    parser.add_argument("--only", nargs="*", choices=ROWS, default=list(ROWS))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_run_child(*args.child, args)))
        return 0
    if _device() != "cuda" and not args.smoke:
        print("gpu_check: no CUDA device here; run it on a GPU machine, or with --smoke for the CPU configuration", file=sys.stderr)
        return 2

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    started = time.perf_counter()
    table: list[tuple[str, str, str]] = []
    functions = {"sft": row_sft, "qlora": row_qlora, "methods": row_methods, "ppo": row_ppo, "fsdp": row_fsdp}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            row_start = time.perf_counter()
            try:
                got = functions[name](args, Path(tmp))
                for label, text in got if isinstance(got, list) else [(name, got)]:
                    table.append((label, "ok", text))
            except _Skip as skip:
                table.append((name, "skipped", str(skip)))
            except Exception as exc:  # noqa: BLE001 - every failure becomes a FAIL row; the exit status says it
                table.append((name, "FAIL", f"{type(exc).__name__}: {str(exc)[-600:]}"))
                traceback.print_exc(file=sys.stderr)
            print(f"[{name}: {time.perf_counter() - row_start:.0f} s]", file=sys.stderr, flush=True)
    print(f"\n# gpu_check {'--smoke ' if args.smoke else ''}{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"GPU {gpu}, torch {torch.__version__}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
          f"{time.perf_counter() - started:.0f} s in all")
    print("| check | status | figures |\n|---|---|---|")
    for label, status, text in table:
        print(f"| {label} | {status} | {text} |")
    return 1 if any(status == "FAIL" for _, status, _ in table) else 0


if __name__ == "__main__":
    raise SystemExit(main())
