"""The README's SFT -> reward model -> PPO / PPO-ptx pipeline on the embedded model, and its measurements.

    python data/rlhf/pipeline.py [--out runs] [--reuse] [--overwrite]

Runs the shipped recipes exactly as the README's commands do (each stage a
``peftkit train`` process; ``--reuse`` skips a stage whose adapter exists),
then ``evaluate.py`` on the bare base, the SFT policy, the PPO policy and
the PPO-ptx policy. Prints one table: true task reward of greedy replies to
the held-out prompts, how many replies end with EOS, held-out LM loss on
``pretrain_eval.txt``, and from the runs' ``metrics.jsonl``: the reward
model's held-out pairwise accuracy and the PPO runs' last logged KL to the
SFT policy and held-out reward-model score. About 30-40 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _stage(name: str, args: list[str], adapter: Path, reuse: bool, overwrite: bool) -> float:
    if reuse and (adapter / "adapter_config.json").is_file():
        print(f"== {name}: reusing {adapter}", flush=True)
        return 0.0
    print(f"== {name}: peftkit train {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "peftkit", "train", *args, *(["--overwrite"] if overwrite else [])], cwd=ROOT, check=True)
    return time.perf_counter() - start


def _evaluate(adapter: Path | None) -> dict:
    cmd = [sys.executable, str(HERE / "evaluate.py"), "--show", "2"] + (["--adapter", str(adapter)] if adapter else [])
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    print(out, end="", flush=True)
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs", help="folder for the four runs (default runs/, as the recipes)")
    parser.add_argument("--reuse", action="store_true", help="skip stages whose adapter already exists")
    parser.add_argument("--overwrite", action="store_true", help="replace finished runs of other recipes in --out")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    sft, rm, ppo, ptx = out / "rlhf-sft-lora", out / "rm-lora", out / "ppo-lora", out / "ppo-ptx-lora"
    links = [f"objective.options.reward_model={rm / 'adapter'}", f"objective.options.sft_adapter={sft / 'adapter'}"]
    seconds = {
        "sft": _stage("SFT", ["recipes/sft-lora.yaml", "data.train=data/rlhf/sft.jsonl", "data.eval=null", "data.eval_size=32",
                              f"output.dir={sft}"], sft / "adapter", args.reuse, args.overwrite),
        "rm": _stage("reward model", ["recipes/rm-lora.yaml", f"output.dir={rm}"], rm / "adapter", args.reuse, args.overwrite),
        "ppo": _stage("PPO", ["recipes/ppo-lora.yaml", *links, f"output.dir={ppo}"], ppo / "adapter", args.reuse, args.overwrite),
        "ppo-ptx": _stage("PPO-ptx", ["recipes/ppo-ptx-lora.yaml", *links, f"output.dir={ptx}"], ptx / "adapter", args.reuse, args.overwrite),
    }
    rm_eval = [r for r in _metrics(rm) if "eval_accuracy" in r]
    rows = []
    for name, adapter, run in [("base", None, None), ("SFT", sft / "adapter", None), ("PPO", ppo / "adapter", ppo),
                               ("PPO-ptx", ptx / "adapter", ptx)]:
        result = _evaluate(adapter)
        steps = [r for r in _metrics(run) if "kl" in r and "policy_loss" in r] if run else []
        held_out = [r for r in _metrics(run) if "eval_reward" in r] if run else []
        result["final_kl"] = steps[-1]["kl"] if steps else None
        result["eval_rm_score"] = held_out[-1]["eval_reward"] if held_out else None
        rows.append((name, result))
    print("\n| policy | true reward | ends with EOS | held-out LM loss | final KL to SFT | held-out RM score |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows:
        kl = "" if r["final_kl"] is None else f"{r['final_kl']:.3f}"
        score = "" if r["eval_rm_score"] is None else f"{r['eval_rm_score']:.3f}"
        print(f"| {name} | {r['true_reward']:.3f} | {r['ended_with_eos']:.2f} | {r['heldout_lm_loss']:.3f} | {kl} | {score} |")
    if rm_eval:
        print(f"\nreward model held-out pairwise accuracy {rm_eval[0]['eval_accuracy']:.3f} -> {rm_eval[-1]['eval_accuracy']:.3f}")
    print("stage seconds:", json.dumps({k: round(v) for k, v in seconds.items()}))
    print(json.dumps({"policies": dict(rows), "rm_eval": rm_eval, "seconds": seconds}))


if __name__ == "__main__":
    main()
