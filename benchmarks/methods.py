"""Every built-in method side by side with Hugging Face peft's: step time, peak memory, parameters, file size.

One command runs everything; each (method, implementation) pair runs in its own
child process so that its peak memory is its own (peak RSS is per process).
Columns: median train-step milliseconds, peak RSS growth during training over the
RSS after setup (activations, gradients, optimizer state), trainable parameters,
and the saved adapter's size on disk. Ratios are peftkit / peft.

    python benchmarks/methods.py                  # Llama-shaped ~20M model, batch 4 x 128, 2 threads
    python benchmarks/methods.py --only lora ia3 --steps 3
    python benchmarks/methods.py --only lora lora+dora    # DoRA's overhead over LoRA, in both libraries

A row named ``METHOD+VARIANT`` runs METHOD with extra options (``lora+dora``: ``use_dora``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VIRTUAL = 20
# peftkit method -> (peftkit options, peft config builder name). "adapter" has no peft counterpart.
METHODS: dict[str, dict] = {
    "lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
    "lora+dora": {"r": 8, "alpha": 16, "target_modules": "all-linear", "use_dora": True},
    "qlora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
    "ia3": {},
    "adapter": {"bottleneck_size": 64},
    "prompt_tuning": {"num_virtual_tokens": VIRTUAL},
    "p_tuning": {"num_virtual_tokens": VIRTUAL, "encoder_hidden_size": 128},
    "prefix_tuning": {"num_virtual_tokens": VIRTUAL},
}


def _peft_config(method: str):
    import peft

    if method in ("lora", "qlora", "lora+dora"):
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, use_dora=method == "lora+dora")
    if method == "ia3":
        return peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL, encoder_hidden_size=128)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL)
    return None


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _base_dir(tmp: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp / "base"
    if not path.exists():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(path)
    return path


def child(method: str, impl: str, args: argparse.Namespace) -> dict:
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    base_dir = Path(args.base_dir)
    options = METHODS[method]
    load_kwargs = {}
    if method == "qlora":
        import peftkit

        pm = peftkit.plugin_manager()
        opts = peftkit.options.build_options(pm.get_injector("qlora").options, options)
        load_kwargs = pm.model_load_kwargs("qlora", opts)
    model = LlamaForCausalLM.from_pretrained(base_dir, **load_kwargs)
    if impl == "peftkit":
        import peftkit

        tuned = peftkit.wrap(model, method.split("+")[0], **options)
    else:
        import peft

        config = _peft_config(method)
        if config is None:
            return {"skipped": f"peft has no {method}"}
        tuned = peft.get_peft_model(model, config)
    tuned.train()
    params = [p for p in tuned.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rss_before = _rss_mb()
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = tuned(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        if i >= args.warmup:
            times.append((time.perf_counter() - start) * 1000)
    with tempfile.TemporaryDirectory() as out:
        tuned.save(out + "/a") if impl == "peftkit" else tuned.save_pretrained(out + "/a")
        size = sum(f.stat().st_size for f in Path(out, "a").rglob("*.safetensors"))
    return {
        "ms": statistics.median(times),
        "peak_mb": max(0.0, _peak_mb() - rss_before),
        "trainable": sum(p.numel() for p in params),
        "file_kb": size / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--only", nargs="*", default=list(METHODS))
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--base-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return

    results: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = _base_dir(Path(tmp))
        for method in args.only:
            for impl in ("peftkit", "peft"):
                cmd = [sys.executable, __file__, "--child", method, impl, "--base-dir", str(base_dir),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                       "--batch", str(args.batch), "--seq", str(args.seq)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                results[method, impl] = json.loads(lines[-1]) if lines else {"error": proc.stderr.strip()[-300:]}
                print(f"{method:14s} {impl:8s} {results[method, impl]}", file=sys.stderr)

    print(f"\nLlama-shaped ~20M model (4 layers, hidden 512, GQA 8/4 heads), batch {args.batch} x {args.seq}, "
          f"{args.threads} threads, median of {args.steps} steps; peak = RSS growth during training\n")
    print("| method | ms/step peftkit | ms/step peft | time ratio | peak MB peftkit | peak MB peft | memory ratio "
          "| trainable peftkit | trainable peft | file KB peftkit | file KB peft |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method in args.only:
        ours, ref = results[method, "peftkit"], results[method, "peft"]
        if "ms" not in ours:
            print(f"| {method} | error: {ours.get('error', '')[:80]} |")
            continue
        if "ms" not in ref:
            note = ref.get("skipped") or ref.get("error", "")[:60]
            print(f"| {method} | {ours['ms']:.0f} | - | - | {ours['peak_mb']:.0f} | - | - | {ours['trainable']:,} | - "
                  f"| {ours['file_kb']:.0f} | - ({note}) |")
            continue
        mem_ratio = ours["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else float("nan")
        print(f"| {method} | {ours['ms']:.0f} | {ref['ms']:.0f} | {ours['ms'] / ref['ms']:.2f} | {ours['peak_mb']:.0f} "
              f"| {ref['peak_mb']:.0f} | {mem_ratio:.2f} | {ours['trainable']:,} | {ref['trainable']:,} "
              f"| {ours['file_kb']:.0f} | {ref['file_kb']:.0f} |")


if __name__ == "__main__":
    main()
