"""Measure a policy on the RLHF demo task: true reward on held-out prompts, and held-out LM loss on plain text.

    python data/rlhf/evaluate.py                                   # the bare base model
    python data/rlhf/evaluate.py --adapter runs/ppo-lora/adapter   # an SFT or PPO policy

Replies are decoded greedily (deterministic) from the held-out prompts in
``prompts_eval.jsonl``, rendered with the chat template exactly as the
objectives do, and scored with :func:`task.true_reward`. The LM loss is the
mean per-token negative log-likelihood of ``pretrain_eval.txt`` (paragraphs
never used in training), which PPO-ptx is meant to keep low.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from task import true_reward  # noqa: E402


def main() -> None:
    import peftkit
    from peftkit.training.models import load_model_and_tokenizer
    from peftkit_plugins.ppo.data import load_ptx_texts
    from peftkit_plugins.reward.formatting import encode_prompt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=None, help="adapter directory (default: the bare base model)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=64, help="held-out prompts to use")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--show", type=int, default=3, help="print this many replies")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model)
    tuned = peftkit.load(model, args.adapter) if args.adapter else model
    tuned.eval()
    prompts = [json.loads(line)["prompt"] for line in (HERE / "prompts_eval.jsonl").read_text().splitlines()][: args.limit]
    rewards, lengths, ended = [], [], []
    with torch.no_grad():
        for start in range(0, len(prompts), 16):
            batch = [encode_prompt(tokenizer, p) for p in prompts[start : start + 16]]
            width = max(len(b) for b in batch)
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(b)) + b for b in batch])
            mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
            out = tuned.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=args.max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            for row, prompt in zip(out[:, width:].tolist(), prompts[start : start + 16]):
                stop = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else None
                reply = tokenizer.decode(row[:stop], skip_special_tokens=True)
                rewards.append(true_reward(reply))
                lengths.append(len(row[:stop]) if stop is not None else len(row))
                ended.append(stop is not None)
                if len(rewards) <= args.show:
                    print(f"  {prompt!r} -> {reply!r} (true reward {rewards[-1]:.1f})")
        total, count = 0.0, 0
        for text in load_ptx_texts(str(HERE / "pretrain_eval.txt")):
            ids = torch.tensor([tokenizer(text)["input_ids"][:256]])
            loss = tuned(input_ids=ids, labels=ids).loss
            total += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    result = {
        "adapter": args.adapter or "(base)",
        "true_reward": sum(rewards) / len(rewards),
        "ended_with_eos": sum(ended) / len(ended),
        "mean_reply_tokens": sum(lengths) / len(lengths),
        "heldout_lm_loss": total / count,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
