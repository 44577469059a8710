"""The whole SFT -> reward model -> PPO / PPO-ptx pipeline on a tiny model, in minutes on a CPU, with its measurements.

    python data/rlhf/tiny_pipeline.py [--out /tmp/rlhf-tiny]

Base: ``peftkit.testing.tiny_llama`` (2 layers, 32 wide, random weights drawn
with ``initializer_range=0.2``: with the default 0.02 the frozen output head
can only produce near-uniform next-token distributions, which no adapter can
sharpen) with a character-level tokenizer, so the task's surface features
(case, a final '!') are visible to it. Every stage runs through the peftkit trainer with the
same objectives and data as the shipped recipes (only sizes differ). Prints,
for base / SFT / PPO / PPO-ptx: true task reward of greedy replies to the
held-out prompts, held-out LM loss on ``pretrain_eval.txt``; and the reward
model's held-out pairwise accuracy and the final KL.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests" / "plugins"))

from task import true_reward  # noqa: E402
from test_reward import char_tokenizer  # noqa: E402


def _base():
    from peftkit.testing import tiny_llama

    return tiny_llama(initializer_range=0.2)


def _train(recipe: dict, out: Path, reuse: bool = False) -> Path:
    from peftkit.training.recipe import recipe_from_dict
    from peftkit.training.trainer import Trainer

    if reuse and (out / "adapter" / "adapter_config.json").is_file():
        return out / "adapter"
    recipe["output"] = {"dir": str(out), "log_every": 5, "plot": False}
    # Without --reuse a stage is meant to be trained again (e.g. with another --ppo-lr): replace the earlier run.
    trainer = Trainer(recipe_from_dict(recipe), model=_base(), tokenizer=char_tokenizer(), progress=False, overwrite=True)
    return trainer.train().adapter_dir


@torch.no_grad()
def _measure(adapter: Path | None, tokenizer) -> dict:
    import peftkit
    from peftkit_plugins.ppo.data import load_ptx_texts
    from peftkit_plugins.reward.formatting import encode_prompt

    model = _base()
    tuned = peftkit.load(model, adapter) if adapter else model
    prompts = [json.loads(line)["prompt"] for line in (HERE / "prompts_eval.jsonl").read_text().splitlines()]
    rewards, sample = [], None
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        out = tuned.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        reply = tokenizer.decode(out[: out.index(2)] if 2 in out else out, skip_special_tokens=True)
        rewards.append(true_reward(reply))
        sample = sample or reply
    total = count = 0
    for text in load_ptx_texts(str(HERE / "pretrain_eval.txt")):
        ids = torch.tensor([tokenizer(text)["input_ids"][:128]])
        total += float(tuned(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return {"true_reward": sum(rewards) / len(rewards), "heldout_lm_loss": total / count, "sample_reply": sample}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/rlhf-tiny")
    parser.add_argument("--ppo-steps", type=int, default=40)
    parser.add_argument("--ppo-lr", type=float, default=3e-3)
    parser.add_argument("--reuse", action="store_true", help="keep SFT and reward adapters already in --out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    tok = char_tokenizer()
    lora = {"name": "lora", "options": {"r": 16, "alpha": 32, "target_modules": "all-linear"}}
    sft = _train({"method": lora, "objective": {"name": "sft"},
                  "data": {"train": str(HERE / "sft.jsonl"), "eval_size": 32, "max_length": 128},
                  "train": {"max_steps": 150, "batch_size": 16, "lr": 1e-2, "warmup_steps": 10}}, out / "sft", args.reuse)
    rm = _train({"method": lora, "objective": {"name": "reward"},
                 "data": {"train": str(HERE / "preferences.jsonl"), "eval": str(HERE / "preferences_eval.jsonl"), "max_length": 128},
                 "train": {"max_steps": 150, "batch_size": 8, "lr": 5e-3, "warmup_steps": 10}}, out / "rm", args.reuse)
    rm_eval = [json.loads(line) for line in (out / "rm" / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in line]
    results = {"reward_model": {"heldout_accuracy_before": rm_eval[0]["eval_accuracy"], "heldout_accuracy": rm_eval[-1]["eval_accuracy"],
                                "heldout_margin": rm_eval[-1]["eval_margin"]}}
    ppo_options = {"reward_model": str(rm), "sft_adapter": str(sft), "max_new_tokens": 24, "minibatch_size": 8, "ppo_epochs": 2,
                   "kl_coef": 0.1}
    policies = {"ppo": 0.0, "ppo_ptx": 0.5}
    for name, ptx in policies.items():
        options = dict(ppo_options, ptx_coef=ptx, **({"ptx_data": str(HERE / "pretrain.txt")} if ptx else {}))
        _train({"method": {"name": "lora"}, "objective": {"name": "ppo", "options": options},
                "data": {"train": str(HERE / "prompts.jsonl"), "eval": str(HERE / "prompts_eval.jsonl"), "max_length": 96},
                "train": {"max_steps": args.ppo_steps, "batch_size": 16, "lr": args.ppo_lr, "scheduler": "constant", "eval_batch_size": 64}},
               out / name)
        logs = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in logs if "policy_loss" in r]
        results[name + "_training"] = {"reward_first": steps[0]["reward"], "reward_last": steps[-1]["reward"], "kl_last": steps[-1]["kl"],
                                       "heldout_reward_model_score": logs[-1].get("eval_reward"), "heldout_kl": logs[-1].get("eval_kl")}
    for name, adapter in {"base": None, "sft": sft, "ppo": out / "ppo" / "adapter", "ppo_ptx": out / "ppo_ptx" / "adapter"}.items():
        results[name] = _measure(adapter, tok)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
