"""benchmarks/gpu_check.py: its ``--smoke`` configuration runs on the CPU and skips the CUDA-only rows cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_row_it_can_and_skips_the_cuda_only_ones():
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a CUDA machine run the full check: python benchmarks/gpu_check.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PEFTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1] for line in proc.stdout.splitlines() if line.startswith("| ") and " | " in line}
    assert rows.pop("check") == "status"
    assert rows == {
        "sft": "ok", "qlora": "skipped", "lora vs peft": "ok", "prompt_tuning vs peft": "ok", "ppo": "ok", "fsdp": "ok",
    }
    assert "2 CPU processes (gloo)" in proc.stdout and "held-out loss" in proc.stdout


def test_gpu_check_without_cuda_and_without_smoke_says_how_to_run_it():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the full check")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    assert gpu_check.main([]) == 2
