"""LoRA training-step time: peftkit vs Hugging Face peft vs the frozen-base limit, in one process run.

The "limit" is the cheapest possible step for any adapter method on this model:
forward + backward down to the input embeddings with every weight frozen (the
backward pass must still cross every layer to reach the first adapter). LoRA
r=16 on all linear layers adds its small matmuls on top; peft is the reference.

Configurations are run round-robin (one step each in turn) so that machine noise
hits all of them alike; the table gives median milliseconds per step and ratios.

    python benchmarks/lora_step.py                 # Llama-shaped, ~33M params, batch 4 x 256, 2 threads
    python benchmarks/lora_step.py --steps 3 --small   # quick smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit


def build_model(small: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    if small:
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4)
    else:  # ~33M parameters
        config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    return LlamaForCausalLM(config).train()


def limit_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step() -> None:
        embeds = embed(ids).detach().requires_grad_()
        loss = model(inputs_embeds=embeds, labels=ids).loss
        loss.backward()

    return step


def adapter_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--small", action="store_true", help="tiny model for a smoke run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import peft  # benchmark-only reference

    ids = torch.randint(0, 512 if args.small else 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    configs: dict[str, Callable[[], None]] = {"frozen-base limit": limit_step(build_model(args.small), ids)}
    for dropout in (0.0, 0.05):
        ours = peftkit.wrap(build_model(args.small), "lora", r=16, alpha=32, dropout=dropout, target_modules="all-linear")
        ours.train()
        configs[f"peftkit lora d={dropout}"] = adapter_step(ours, ids)
        ref_config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear")
        ref = peft.get_peft_model(build_model(args.small), ref_config)
        ref.train()
        configs[f"peft lora d={dropout}"] = adapter_step(ref, ids)

    times: dict[str, list[float]] = {name: [] for name in configs}
    for i in range(args.warmup + args.steps):
        for name, step in configs.items():
            start = time.perf_counter()
            step()
            if i >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1000)

    median = {name: statistics.median(t) for name, t in times.items()}
    limit = median["frozen-base limit"]
    print(f"\nLlama-shaped model, batch {args.batch} x {args.seq}, {args.threads} threads, "
          f"median of {args.steps} steps (torch {torch.__version__}, peft {peft.__version__})\n")
    print("| configuration | ms/step | x limit | x peft (same dropout) |")
    print("|---|---:|---:|---:|")
    for name, ms in median.items():
        vs_peft = ""
        if name.startswith("peftkit"):
            vs_peft = f"{ms / median[name.replace('peftkit', 'peft')]:.2f}"
        print(f"| {name} | {ms:.0f} | {ms / limit:.2f} | {vs_peft} |")


if __name__ == "__main__":
    main()
