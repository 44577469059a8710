"""Several processes on one machine: SFT tokens/s and peak memory per process, 1 process vs DDP vs FSDP.

Each configuration trains ``recipes/sft-lora.yaml`` (SmolLM2-135M-Instruct,
LoRA r 8 all-linear, batch 8 x <= 128 tokens per process) for ``--steps``
optimizer steps through :class:`peftkit.training.trainer.Trainer`, in fresh
processes (one under ``python``, two under ``torchrun --nproc_per_node 2``),
and reports the loop's tokens/s (all processes together; held-out evaluation
excluded), each process's resident set size once the model is loaded, wrapped
and (FSDP) sharded, and its peak resident set size (``ru_maxrss``, which
includes the whole base every process loads before sharding).

    python benchmarks/distributed.py                    # SmolLM2-135M, 4 steps (~3 min on 2 free cores)
    python benchmarks/distributed.py --model tiny       # the tiny test model, seconds

Every process gets ``--threads-per-process`` threads (default 1), so two
processes use twice the cores of one: the table shows how throughput scales
with processes. (Giving one process both cores instead is a different
question, and on a shared, loaded machine OpenMP threads that wait for each
other make it far slower than two single-thread processes.)
Measured figures are in docs/distributed.md, with the date, the cores and the load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, torch
    torch.set_num_threads(int(sys.argv[3]))
    from peftkit.training.recipe import load_recipe
    from peftkit.training.trainer import Trainer
    import gc, os
    t = Trainer(load_recipe(sys.argv[1], json.loads(sys.argv[2])), progress=False, overwrite=True)
    t.setup()
    gc.collect()
    with open("/proc/self/statm") as fh:
        after_setup = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    result = t.train()
    with open(f"{sys.argv[4]}{t.accelerator.process_index}.json", "w") as fh:  # one file per process: prints interleave
        json.dump({
        "rank": t.accelerator.process_index, "world": t.accelerator.num_processes, "fsdp": t.fsdp,
        "tokens_per_s": result.tokens_per_second, "seconds": result.seconds, "loss": result.train_loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_setup_mb": after_setup,
        }, fh)
    """
)

CONFIGS = {
    "1 process": (1, "auto"),
    "2 processes DDP": (2, "ddp"),
    "2 processes FSDP": (2, "fsdp"),
}


def _tiny_model(folder: Path) -> str:
    from peftkit.testing import tiny_llama, tiny_tokenizer

    tiny_llama().save_pretrained(folder / "tiny")
    tiny_tokenizer().save_pretrained(folder / "tiny")
    return str(folder / "tiny")


def run(config: str, model: str, steps: int, threads_per_process: int, folder: Path) -> list[dict]:
    """Train one configuration; one row per process."""
    nproc, mode = CONFIGS[config]
    overrides = [
        f"model.name_or_path={model}", f"train.max_steps={steps}", f"train.distributed={mode}", "train.warmup_steps=0",
        "data.eval=null", "data.eval_size=8", f"output.dir={folder / mode / str(nproc)}", "output.save_every=0",
        "output.plot=false", f"output.log_every={steps}",
    ]
    rows_prefix = folder / f"rows-{mode}-{nproc}-"
    for stale in folder.glob(f"{rows_prefix.name}*.json"):
        stale.unlink()
    script = folder / "child.py"
    script.write_text(_CHILD)
    per_process = threads_per_process
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(per_process), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [*launcher, str(script), str(ROOT / "recipes" / "sft-lora.yaml"), json.dumps(overrides), str(per_process), str(rows_prefix)],
        env=env, capture_output=True, text=True, cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(path.read_text()) for path in sorted(folder.glob(f"{rows_prefix.name}*.json"))]
    return sorted(rows, key=lambda row: row["rank"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model alias or folder; 'tiny': the test model")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads-per-process", type=int, default=1)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = _tiny_model(folder) if args.model == "tiny" else args.model
        print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
              f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())} (before), model {args.model}, {args.steps} steps, "
              f"{args.threads_per_process} thread(s) per process")
        print(f"{'configuration':<18} {'tokens/s':>9} {'vs 1 proc':>9} {'RSS after setup (MB)':>22} {'peak RSS (MB)':>14} {'loss':>8}")
        base = None
        for config in args.configs:
            rows = run(config, model, args.steps, args.threads_per_process, folder)
            tps = rows[0]["tokens_per_s"]
            base = base or tps
            setup = " / ".join(f"{row['rss_after_setup_mb']:.0f}" for row in rows)
            rss = " / ".join(f"{row['peak_rss_mb']:.0f}" for row in rows)
            print(f"{config:<18} {tps:>9.0f} {tps / base:>8.2f}x {setup:>22} {rss:>14} {rows[0]['loss']:>8.4f}", flush=True)
        print(f"# load {' '.join(f'{x:.2f}' for x in os.getloadavg())} (after)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
