"""Issue 4's anchor: every shipped ``sft-*`` recipe on the chatterbot set, plus ``peft`` LoRA under the same trainer.

The shipped recipes (``recipes/sft-<method>.yaml``, ``train.lr: auto``) run
with the anchor's budget as overrides: chatterbot English pairs
(``data/chatterbot/english.jsonl``, 1,029 train / 200 held out by
``data.seed``), batch 8, ``--steps`` optimizer steps (80), max length 128,
reply tokens only. ``peft-lora`` is the ``sft-lora`` recipe with the adapter
made by Hugging Face ``peft`` (LoRA r 8, alpha 16, all-linear, no dropout)
and everything else -- data order, optimizer, schedule, clipping, evaluation
-- from the same :class:`peftkit.training.trainer.Trainer` (its ``build_adapter``
extension point). ``peft`` is a benchmark-only dependency.

Each configuration runs in a child process of this one command, so its peak
resident set size (``ru_maxrss``: model load, evaluation and training) is
its own. Reported: held-out loss before and after (mean per reply token),
tokens/s of the training steps (non-padding tokens; the median over the
logged windows), peak RSS, adapter size on disk, wall time.

    python benchmarks/sft_anchor.py                            # all eight configurations (~45 min on 2 cores)
    python benchmarks/sft_anchor.py --configs lora,peft-lora --steps 80
    python benchmarks/sft_anchor.py --model tiny --steps 4     # a tiny random model, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["lora", "qlora", "ia3", "adapter", "prompt_tuning", "p_tuning", "prefix_tuning"]
CONFIGS = METHODS + ["peft-lora"]

# The anchor in issue 4 (peft + a plain loop; its own 1,029/200 split): held-out loss after 80 steps.
ANCHOR_BASE = 2.863
ANCHOR = {"lora": 2.312, "ia3": 2.362, "prompt_tuning": 2.450, "p_tuning": 2.502, "prefix_tuning": 2.951, "qlora": 2.455}


def _overrides(steps: int, out_dir: Path) -> list[str]:
    return [
        "data.train=data/chatterbot/english.jsonl",
        "data.eval=null",
        "data.eval_size=200",
        "data.max_length=128",
        "train.batch_size=8",
        f"train.max_steps={steps}",
        f"output.dir={out_dir}",
        "output.save_every=0",
        f"output.log_every={max(1, steps // 8)}",
        "output.plot=false",
    ]


def _peft_trainer_class():
    """A Trainer whose adapter is made by ``peft``: the same loop, another library's LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from peftkit.training.trainer import Trainer

    class PeftLora(nn.Module):
        """What the trainer needs of an adapted model, over a ``peft`` model."""

        def __init__(self, peft_model: nn.Module):
            super().__init__()
            self.peft_model = peft_model

        def forward(self, **kwargs):
            return self.peft_model(**kwargs)

        def trainable_parameters(self) -> list[torch.nn.Parameter]:
            return [p for p in self.peft_model.parameters() if p.requires_grad]

        def save(self, directory, training: bool = False) -> None:
            self.peft_model.save_pretrained(str(directory))

    class PeftTrainer(Trainer):
        def build_adapter(self, model: nn.Module) -> nn.Module:
            opts = self.recipe.method_options
            config = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules="all-linear")
            return PeftLora(get_peft_model(model, config))

    return PeftTrainer


def _read_metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _child(config: str, model_name: str, steps: int, out_dir: Path) -> None:
    import resource
    import time

    import torch

    from peftkit.training.recipe import load_recipe
    from peftkit.training.trainer import Trainer

    torch.set_num_threads(2)
    method = "lora" if config == "peft-lora" else config
    overrides = _overrides(steps, out_dir)
    kwargs = {}
    if model_name == "tiny":
        from peftkit.testing import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        kwargs = {"model": tiny_llama(vocab_size=len(tokenizer)), "tokenizer": tokenizer}
        overrides.append("data.max_train_samples=64")
    else:
        overrides.append(f"model.name_or_path={model_name}")
    recipe = load_recipe(ROOT / "recipes" / f"sft-{method.replace('_', '-')}.yaml", overrides)
    trainer_class = _peft_trainer_class() if config == "peft-lora" else Trainer
    start = time.perf_counter()
    # A rerun (another --steps into the same --out) re-measures: it replaces the earlier run on purpose.
    result = trainer_class(recipe, progress=False, overwrite=True, **kwargs).train()
    wall = time.perf_counter() - start
    adapter_bytes = sum(f.stat().st_size for f in result.adapter_dir.glob("*.safetensors"))
    # The median over the logged windows: one window slowed by something else on the machine does not move it.
    windows = sorted(r["tokens_per_s"] for r in _read_metrics(out_dir) if "tokens_per_s" in r)
    print(
        json.dumps(
            {
                "config": config,
                "lr": recipe.train.lr,
                "before": result.eval_loss_before,
                "after": result.eval_loss_after,
                "tokens_per_s": windows[len(windows) // 2] if windows else result.tokens_per_second,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "adapter_mb": adapter_bytes / 2**20,
                "wall_s": wall,
            }
        ),
        flush=True,
    )


def _table(results: list[dict]) -> str:
    lines = [
        "| config | lr | held-out before | after | change | anchor (peft) after | tokens/s | peak RSS MB | adapter MB | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        anchor = ANCHOR.get(r["config"])
        lines.append(
            f"| {r['config']} | {r['lr']:g} | {r['before']:.3f} | {r['after']:.3f} | {r['after'] - r['before']:+.3f} | "
            f"{'' if anchor is None else f'{anchor:.3f} ({anchor - ANCHOR_BASE:+.3f})'} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['adapter_mb']:.2f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model alias/folder, or 'tiny'")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also append each result as a JSON line to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out_root = Path(args.out or tempfile.mkdtemp(prefix="peftkit-anchor-"))
    if args.child:
        _child(args.child, args.model, args.steps, out_root / args.child)
        return
    results = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            parser.error(f"--configs: unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")
        cmd = [sys.executable, __file__, "--child", config, "--model", args.model, "--steps", str(args.steps), "--out", str(out_root)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode or not lines:
            print(f"{config}: failed\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        results.append(json.loads(lines[-1]))
        print(json.dumps(results[-1]), flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps({**results[-1], "steps": args.steps, "model": args.model}) + "\n")
    print(_table(results))
    ours = next((r for r in results if r["config"] == "lora"), None)
    ref = next((r for r in results if r["config"] == "peft-lora"), None)
    if ours and ref:
        print(f"\nLoRA held-out loss after: peftkit {ours['after']:.4f} vs peft {ref['after']:.4f} "
              f"({100 * (ours['after'] / ref['after'] - 1):+.2f}%); peak RSS {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x; "
              f"tokens/s {ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
