"""Peak training memory: peftkit (chunked loss, optional activation checkpointing) vs ``peft`` + a plain loop.

Each configuration runs in a fresh subprocess, so its peak resident set size
(``ru_maxrss``) is its own: load the model, wrap it with LoRA (r 8, all-linear),
run ``--steps`` optimizer steps of SFT-shaped batches (``--batch`` x ``--seq``
tokens, loss on the second half of each row, as for replies), report the peak.

    python benchmarks/sft_memory.py                       # SmolLM2-135M-Instruct, batch 4 x 256
    python benchmarks/sft_memory.py --model tiny --seq 64 # a tiny model, seconds

The target in issue 4 is peftkit's peak <= 0.6x that of peft + a plain loop.
Measured here (SmolLM2-135M-Instruct, fp32, batch 4 x 256, 1 step, CPU; same first loss 13.3150 in all three):

    peft-plain   peak RSS 3822 MB
    peftkit      peak RSS 3239 MB   0.85x   (chunked loss: the logits are gone, the layer activations remain)
    peftkit-gc   peak RSS 1745 MB   0.46x   (plus train.gradient_checkpointing: true)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CONFIGS = {
    "peft-plain": "peft + plain loop: model(**batch, labels=...).loss (full logits)",
    "peftkit": "peftkit: chunked LM head + cross-entropy",
    "peftkit-gc": "peftkit: chunked loss + activation checkpointing",
}


def _load(model_name: str):

    if model_name == "tiny":
        from peftkit.testing import tiny_llama

        return tiny_llama(vocab_size=128).train()
    from peftkit.training.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_name, dtype="float32")
    return model.train()


def _child(config: str, model_name: str, batch: int, seq: int, steps: int) -> None:
    import resource

    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = _load(model_name)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq))
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if config == "peft-plain":
        from peft import LoraConfig, get_peft_model

        tuned = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))

        def loss_fn():
            return tuned(**data).loss

    else:
        import peftkit
        from peftkit.options import build_options
        from peftkit.training.trainer import enable_gradient_checkpointing

        tuned = peftkit.wrap(model, "lora", r=8, alpha=16, target_modules="all-linear")
        tuned.train()
        if config == "peftkit-gc":
            enable_gradient_checkpointing(tuned)
        sft = peftkit.plugin_manager().get_objective("sft")
        opts = build_options(sft.options, {})

        def loss_fn():
            return sft.loss(tuned, data, opts).loss

    params = [p for p in tuned.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    seconds = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"config": config, "peak_rss_mb": peak, "after_load_mb": base_rss, "s_per_step": seconds, "losses": losses}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model alias/folder, or 'tiny'")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.model, args.batch, args.seq, args.steps)
        return
    results = []
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--child", config, "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if out.returncode or not line:
            print(f"{config}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[-1]))
        r = results[-1]
        print(f"{config:12s} peak RSS {r['peak_rss_mb']:7.0f} MB (after load {r['after_load_mb']:6.0f} MB)  {r['s_per_step']:.2f} s/step  loss {r['losses'][0]:.4f}   # {CONFIGS[config]}", flush=True)
    ref = next((r for r in results if r["config"] == "peft-plain"), None)
    if ref:
        for r in results:
            if r is not ref:
                print(f"{r['config']}: {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x the peak of peft + plain loop")


if __name__ == "__main__":
    main()
