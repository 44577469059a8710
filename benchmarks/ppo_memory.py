"""Peak memory of one PPO step vs one SFT step on the same base model (one frozen base for four roles).

    python benchmarks/ppo_memory.py                         # the embedded SmolLM2-135M-Instruct
    python benchmarks/ppo_memory.py --model tiny            # a tiny model (seconds; for CI)

Each measurement runs in its own process (peak RSS is a per-process high-water
mark): load the base model, set the roles up, run ONE step, and report the peak
resident set size (``ru_maxrss``) and its growth over the state right before
the step. SFT step: LoRA, a batch of ``--batch`` SFT examples, forward +
backward + AdamW. PPO step: LoRA policy (a copy of an SFT adapter), the frozen
SFT adapter as reference, a LoRA reward model + head, a value head, all on the
one base; a rollout of ``--batch`` prompts with ``--new-tokens`` sampled
tokens, then ``ppo_epochs`` x minibatch updates. Adapters are freshly
initialised (memory does not depend on their values).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _load(model_name: str):
    from peftkit.training.models import load_model_and_tokenizer
    from peftkit.testing import tiny_llama

    if model_name == "tiny":
        sys.path.insert(0, str(ROOT / "tests" / "plugins"))
        from test_reward import char_tokenizer  # noqa: PLC0415

        return tiny_llama(), char_tokenizer()
    return load_model_and_tokenizer(model_name)


def measure(which: str, model_name: str, batch: int, new_tokens: int) -> dict:
    import torch

    import peftkit
    from peftkit_plugins.sft import SftObjective, SftOptions

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, tokenizer = _load(model_name)
    lora = {"r": 8, "target_modules": "all-linear"}
    records = [json.loads(line) for line in (ROOT / "data" / "rlhf" / "sft.jsonl").read_text().splitlines()][:batch]
    if which == "sft":
        tuned = peftkit.wrap(model, "lora", **lora)
        tuned.train()
        objective = SftObjective()
        examples = objective.prepare_data(records, tokenizer, SftOptions(), 128)
        data = objective.collate(examples, tokenizer)
        optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-4)
        before = _rss_mb()
        out = objective.loss(tuned, data, SftOptions())
        out.loss.backward()
        optimizer.step()
    else:
        from peftkit_plugins.ppo import PPOLearner, PPOOptions, setup_roles
        from peftkit_plugins.ppo.data import prepare_prompts
        from peftkit_plugins.reward import attach_head, save_reward_model

        tmp = Path(tempfile.mkdtemp())
        scratch = peftkit.wrap(model, "lora", **lora)  # the SFT and reward adapters' files, then removed
        scratch.save(tmp / "sft")
        attach_head(scratch)
        save_reward_model(scratch, tmp / "rm", adapter_name="default")
        scratch.delete_adapter("default")
        del scratch._modules["heads"]
        model = scratch.unload()
        tuned = peftkit.wrap(model, "lora", **lora)
        options = PPOOptions(reward_model=str(tmp / "rm"), sft_adapter=str(tmp / "sft"), max_new_tokens=new_tokens,
                             minibatch_size=max(1, batch // 2), ppo_epochs=2)
        roles = setup_roles(tuned, options)
        prompts = [e["prompt_ids"] for e in prepare_prompts(records, tokenizer, options, 96)]
        optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=1e-4)
        learner = PPOLearner(roles, options, [optimizer], pad_id=int(tokenizer.pad_token_id), stop_ids=[int(tokenizer.eos_token_id)])
        before = _rss_mb()
        learner.step(prompts)
    return {"which": which, "peak_rss_mb": _rss_mb(), "rss_before_step_mb": before, "step_growth_mb": _rss_mb() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="'tiny', an alias, a folder or a hub id")
    parser.add_argument("--batch", type=int, default=8, help="SFT examples / PPO prompts per step")
    parser.add_argument("--new-tokens", type=int, default=24, help="PPO response length limit")
    parser.add_argument("--only", choices=["sft", "ppo"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args.only, args.model, args.batch, args.new_tokens)))
        return
    results = {}
    for which in ("sft", "ppo"):
        cmd = [sys.executable, __file__, "--only", which, "--model", args.model, "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[which] = json.loads(out)
        print(json.dumps(results[which]))
    ratio = results["ppo"]["peak_rss_mb"] / results["sft"]["peak_rss_mb"]
    print(f"model {args.model}: peak RSS PPO step {results['ppo']['peak_rss_mb']:.0f} MB vs SFT step "
          f"{results['sft']['peak_rss_mb']:.0f} MB -> {ratio:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
