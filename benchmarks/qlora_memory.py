"""QLoRA vs full-precision LoRA memory on a SmolLM2-135M-shaped Llama (CPU): parameters and training peak.

The model is built from a config (hidden 576, 30 layers, 9 heads / 3 key-value
heads, intermediate 1536, vocab 49152, tied embeddings; ~135M parameters) with
a fixed seed and saved once to a temporary directory. Each configuration then
runs in its own child process, loading that directory the way a user would:

* ``lora``:  ``from_pretrained(dir)`` in float32, then ``wrap(model, "lora")``;
* ``qlora``: ``from_pretrained(dir, **kwargs)`` with the kwargs from the
  ``peftkit_model_load_kwargs`` hook (NF4, double quantization, float32 compute),
  then ``wrap(model, "qlora")``: the weights go to 4-bit while loading.

Both use r=16 on all linear layers. Reported per configuration:

* parameter memory: bytes of every parameter and buffer plus bitsandbytes'
  quantization state (block scales, second-level scales, code books), counted
  once per storage: what the model holds, independent of the allocator;
* peak training memory: the process's peak resident set size (Linux VmHWM,
  reset through ``/proc/self/clear_refs`` right before training, so loading
  does not count) while running ``--steps`` AdamW steps on a batch of 2 x 128
  tokens; also its growth over the RSS just before training (activations,
  gradients, optimizer state, dequantized-weight temporaries);
* median milliseconds per training step (noisy on a shared machine, and
  slowed by the fixed malloc mmap threshold below: read it as a rough figure).

RSS rows are given above the child's RSS once torch, transformers,
bitsandbytes and peftkit are imported (the same libraries in both runs).

    python benchmarks/qlora_memory.py              # ~3 minutes on 2 idle cores
    python benchmarks/qlora_memory.py --layers 8   # quicker, smaller model
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def model_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held by parameters (trainable / frozen), buffers and bitsandbytes quantization state."""
    seen: set[int] = set()

    def size(t: torch.Tensor) -> int:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    out = {"trainable": 0, "frozen": 0, "buffers": 0, "quant_state": 0}
    for p in model.parameters():
        out["trainable" if p.requires_grad else "frozen"] += size(p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            parts = [state.absmax, getattr(state, "code", None), getattr(state, "offset", None)]
            nested = getattr(state, "state2", None)
            if nested is not None:
                parts += [nested.absmax, getattr(nested, "code", None)]
            out["quant_state"] += sum(size(t) for t in parts if isinstance(t, torch.Tensor))
    for b in model.buffers():
        out["buffers"] += size(b)
    return out


def run_child(method: str, model_dir: str, steps: int, r: int) -> dict:
    import bitsandbytes  # noqa: F401  (imported by both runs, so library memory cancels out)
    import peftkit
    from transformers import AutoModelForCausalLM

    from peftkit_plugins.qlora import QLoraOptions, make_optimizer

    rss_start = _status_kb("VmRSS")  # libraries loaded, no model yet
    if method == "qlora":
        kwargs = peftkit.plugin_manager().hook.peftkit_model_load_kwargs(method="qlora", options=QLoraOptions())[0]
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tuned = peftkit.wrap(model, method, r=r, alpha=2 * r)
    # from_pretrained may leave full-precision weights as views of the memory-
    # mapped checkpoint, which only count in RSS once touched: copy them so the
    # RSS before training holds what the model holds.
    with torch.no_grad():
        for p in tuned.parameters():
            if p.is_floating_point():
                p.data = p.data.clone()
    _release_freed_memory()
    sizes = model_bytes(tuned)

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 128), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = make_optimizer(tuned.trainable_parameters(), lr=1e-4)
    tuned.train()
    rss_setup = _status_kb("VmRSS")
    _reset_peak_rss()
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = tuned(**batch).loss
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return {
        "method": method,
        "bytes": sizes,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in tuned.trainable_parameters()),
        "rss_start_mb": rss_start / 1024,
        "rss_setup_mb": rss_setup / 1024,
        "peak_rss_mb": _status_kb("VmHWM") / 1024,
        "ms_per_step": 1000 * statistics.median(times[1:] if len(times) > 1 else times),
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="training steps per configuration (first is warm-up)")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers (30 = SmolLM2-135M)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["lora", "qlora"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.child:
        print(json.dumps(run_child(args.child, args.model_dir, args.steps, args.rank)))
        return

    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": args.layers}))
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        print(f"model: Llama, SmolLM2-135M shape with {args.layers} layers, {n_params / 1e6:.1f}M parameters; "
              f"LoRA r={args.rank} on all linear layers; batch 2 x 128; {args.steps} steps; {args.threads} threads")
        # A fixed mmap threshold makes glibc return every freed tensor to the
        # OS at once, so RSS follows live memory (loading garbage does not linger).
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
        for method in ("lora", "qlora"):
            cmd = [sys.executable, __file__, "--child", method, "--model-dir", tmp, "--steps", str(args.steps),
                   "--rank", str(args.rank), "--threads", str(args.threads)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{method} run failed:\n{done.stderr[-4000:]}")
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])

    def mb(n: int) -> str:
        return f"{n / 2**20:8.1f}"

    print(f"\n{'':28s}{'lora (fp32)':>14s}{'qlora (nf4)':>14s}{'ratio':>8s}")
    rows = [
        ("base weights, frozen (MB)", lambda r: r["bytes"]["frozen"] + r["bytes"]["quant_state"]),
        ("  of which quant state (MB)", lambda r: r["bytes"]["quant_state"]),
        ("adapter, trainable (MB)", lambda r: r["bytes"]["trainable"]),
        ("buffers (MB)", lambda r: r["bytes"]["buffers"]),
        ("parameter memory (MB)", lambda r: sum(r["bytes"].values())),
    ]
    for label, get in rows:
        a, b = get(results["lora"]), get(results["qlora"])
        ratio = f"{b / a:8.3f}" if a else ""
        print(f"{label:28s}{mb(a):>14s}{mb(b):>14s}{ratio}")
    rss_rows = [
        ("RSS: model loaded (MB)", lambda r: r["rss_setup_mb"] - r["rss_start_mb"]),
        ("RSS: training peak (MB)", lambda r: r["peak_rss_mb"] - r["rss_start_mb"]),
        ("RSS: training growth (MB)", lambda r: r["peak_rss_mb"] - r["rss_setup_mb"]),
    ]
    print(f"RSS rows are above the process's RSS with libraries loaded "
          f"({results['lora']['rss_start_mb']:.0f} / {results['qlora']['rss_start_mb']:.0f} MB)")
    for label, get in rss_rows:
        a, b = get(results["lora"]), get(results["qlora"])
        print(f"{label:28s}{a:14.1f}{b:14.1f}{b / a:8.3f}")
    a, b = results["lora"]["ms_per_step"], results["qlora"]["ms_per_step"]
    print(f"{'ms per step (median)':28s}{a:14.0f}{b:14.0f}{b / a:8.3f}")
    print(f"{'trainable params':28s}{results['lora']['trainable_params']:14,d}{results['qlora']['trainable_params']:14,d}")
    for m, r in results.items():
        print(f"{m} losses: {', '.join(f'{x:.4f}' for x in r['losses'])}")


if __name__ == "__main__":
    main()
