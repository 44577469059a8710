"""Exact-match accuracy on the held-out arithmetic prompts, for the base model or an adapter trained by the main job.

    python data/arithmetic/evaluate.py                                   # the bare embedded model
    python data/arithmetic/evaluate.py --adapter runs/sft-lora/adapter   # after `peftkit train recipes/sft-lora.yaml`

Replies are decoded greedily from the chat-formatted prompt (as the SFT
objective renders it). ``exact``: the reply is the number and nothing else
(what the training replies look like); ``number``: the first integer in the
reply is the answer (credits a right answer wrapped in words).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# The scoring rules are the built-in rewards' (arithmetic_exact_match, arithmetic_first_number), so GRPO trains on the metric.
from peftkit_plugins.rewards.arithmetic import exact_match, first_number_match

HERE = Path(__file__).resolve().parent


def main() -> None:
    import peftkit
    from peftkit.training.models import load_model_and_tokenizer
    from peftkit_plugins.reward.formatting import encode_prompt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default=None, help="adapter directory (default: the bare base model)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=200, help="held-out prompts to use (default all 200)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--show", type=int, default=5, help="print this many replies")
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model)
    tuned = peftkit.load(model, args.adapter) if args.adapter else model
    tuned.eval()
    records = [json.loads(line) for line in (HERE / "eval.jsonl").read_text().splitlines()][: args.limit]
    exact = number = 0
    with torch.no_grad():
        for start in range(0, len(records), args.batch_size):
            chunk = records[start : start + args.batch_size]
            batch = [encode_prompt(tokenizer, r["prompt"]) for r in chunk]
            width = max(len(b) for b in batch)
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(b)) + b for b in batch])
            mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
            out = tuned.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            for record, row in zip(chunk, out[:, width:]):
                reply = tokenizer.decode(row, skip_special_tokens=True).strip()
                exact += exact_match(reply, record["answer"])
                number += first_number_match(reply, record["answer"])
                if start == 0 and chunk.index(record) < args.show:
                    print(f"  {record['prompt']!r} -> {reply!r} (answer {record['answer']})")
    n = len(records)
    print(json.dumps({"adapter": args.adapter or "(base)", "prompts": n, "exact_match": exact / n, "first_number_match": number / n}))


if __name__ == "__main__":
    main()
