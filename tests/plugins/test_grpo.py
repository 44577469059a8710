"""Tests of the ``grpo`` objective: the maths against direct computations, every method as the policy, virtual tokens, rewards, the trainer and --resume."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.testing import tiny_llama
from peftkit.testing.tokenizers import tiny_tokenizer
from peftkit_plugins.grpo import GRPOLearner, GRPOOptions, group_advantages, grpo_loss, k3_kl
from peftkit_plugins.ppo import Roles, pack_episodes, setup_roles, token_logprobs
from peftkit_plugins.reward import attach_head, save_reward_model

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.eos_token_id


def length_reward(prompts, completions, records):
    """A reward that varies between samples of a random tiny model: the completion's length in characters."""
    return [float(len(c)) for c in completions]


def encode(text: str) -> list[int]:
    out = TOKENIZER.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


PROMPT_TEXTS = ["what is 2 plus 3 ?", "what is 7 minus 4 ?"]
PROMPTS = [encode(t) for t in PROMPT_TEXTS]
RECORDS = [{"prompt": PROMPT_TEXTS[0], "answer": 5}, {"prompt": PROMPT_TEXTS[1], "answer": 3}]


def learner_for(tuned, options, *, reward=length_reward, lr=1e-2):
    roles = setup_roles(tuned, options, value_head=False)
    optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=lr)
    return GRPOLearner(
        roles, options, optimizer, reward_function=reward, decode=lambda ids: TOKENIZER.decode(ids, skip_special_tokens=True),
        pad_id=TOKENIZER.pad_token_id, stop_ids=[EOS],
    )


def perturbed(tuned, scale: float = 0.3):
    """LoRA starts as the identity (B = 0); random adapter weights make policy and reference differ."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return tuned


# ====================================================================== maths
def test_group_advantages_match_a_direct_computation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0, 0.5, 2.0, -1.0, 4.0])
    expected = []
    for g in range(3):
        group = rewards[g * 4 : (g + 1) * 4].tolist()
        mean, std = statistics.fmean(group), statistics.stdev(group)  # the sample std (Bessel), as TRL
        expected += [(r - mean) / (std + 1e-4) for r in group]
    torch.testing.assert_close(group_advantages(rewards, 4, eps=1e-4), torch.tensor(expected), atol=1e-6, rtol=0)
    centred = group_advantages(rewards, 4, scale_rewards=False)
    assert centred.tolist()[:4] == [0.5, -0.5, -0.5, 0.5] and centred[4:8].abs().max() == 0  # a zero-variance group: 0
    assert group_advantages(rewards, 2).shape == (12,)


def test_k3_kl_is_zero_at_equality_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert k3_kl(logp, logp).abs().max() == 0
    ref = torch.tensor([-1.5, -1.0, -0.5])
    expected = [math.exp(d) - d - 1 for d in (-0.5, 1.0, 0.0)]
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor(expected), atol=1e-7, rtol=0)


@pytest.mark.parametrize("loss_type", ["token", "sequence"])
def test_grpo_loss_on_a_fixed_batch_matches_a_hand_computation(loss_type):
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]])
    old = torch.tensor([[-1.3, -1.8, -0.5], [-0.3, -1.0, -9.0]])
    ref = torch.tensor([[-1.1, -2.5, -0.4], [-0.2, -1.2, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([0.7, -1.5])
    eps, beta = 0.2, 0.1
    per_row = []
    clipped_taken = 0
    for b in range(2):
        terms = []
        for t in range(3):
            if not mask[b, t]:
                continue
            ratio = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b].item()
            unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)
            clipped_taken += clipped > unclipped
            d = ref[b, t].item() - logp[b, t].item()
            terms.append(max(unclipped, clipped) + beta * (math.exp(d) - d - 1))
        per_row.append(terms)
    if loss_type == "token":
        expected = sum(sum(r) for r in per_row) / 5
    else:
        expected = sum(sum(r) / len(r) for r in per_row) / 2
    out = grpo_loss(logp, old, adv, mask, clip_range=eps, ref_logprobs=ref, kl_coef=beta, loss_type=loss_type)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(clipped_taken / 5)
    no_kl = grpo_loss(logp, old, adv, mask, clip_range=eps, loss_type=loss_type)
    assert no_kl.kl.item() == 0 and no_kl.loss.item() == pytest.approx(out.policy_loss.item(), abs=1e-6)


def test_loss_gradient_vanishes_when_the_ratio_is_clipped():
    logp = torch.log(torch.tensor([[1.5, 1.0]])).requires_grad_()
    out = grpo_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[1, 1]]), clip_range=0.2)
    out.loss.backward()
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() == pytest.approx(-0.5)


# ============================================================== options
def test_options_report_every_problem_and_an_unknown_reward_names_the_key_the_value_and_the_registered_ones():
    from peftkit.options import build_options

    with pytest.raises(peftkit.OptionsError) as info:
        build_options(GRPOOptions, {"reward": "exact_mach", "num_generations": 1, "clip_range": 0, "loss_type": "mean"}, owner="objective 'grpo'")
    text = str(info.value)
    assert "objective.options.reward = 'exact_mach' names no registered reward" in text
    assert "arithmetic_exact_match, arithmetic_first_number, rlhf_task" in text
    assert "num_generations" in text and "clip_range" in text and "loss_type" in text
    assert build_options(GRPOOptions, {"reward": "runs/rm-lora/adapter"}).reward_model == "runs/rm-lora/adapter"
    assert build_options(GRPOOptions, {"reward": "rlhf_task"}).reward_model is None


def test_an_unknown_reward_in_a_recipe_is_one_recipe_problem(tmp_path):
    import yaml

    from peftkit.training.recipe import RecipeError, load_recipe

    raw = yaml.safe_load((RECIPES / "grpo-lora.yaml").read_text())
    raw["objective"]["options"]["reward"] = "nope"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "objective.options.reward = 'nope'" in str(info.value) and "rlhf_task" in str(info.value)


@pytest.mark.parametrize("name", ["grpo-lora.yaml", "grpo-prompt-tuning.yaml"])
def test_shipped_grpo_recipes_validate(name):
    from peftkit.training.recipe import load_recipe

    recipe = load_recipe(RECIPES / name)
    assert recipe.objective.name == "grpo" and recipe.objective_options.reward == "arithmetic_exact_match"


# ============================================================== learner
POLICY_METHODS = {
    "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "qlora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "ia3": {},
    "adapter": {},
    "prompt_tuning": {"num_virtual_tokens": 3},
    "p_tuning": {"num_virtual_tokens": 3},
    "prefix_tuning": {"num_virtual_tokens": 3},
}


@pytest.mark.parametrize(
    "method", [m if m in ("lora", "prompt_tuning") else pytest.param(m, marks=pytest.mark.slow) for m in sorted(POLICY_METHODS)]
)
def test_every_method_runs_two_grpo_steps_as_the_policy(method):
    torch.manual_seed(0)
    tuned = peftkit.wrap(tiny_llama(), method, **POLICY_METHODS[method])
    options = GRPOOptions(reward="x", num_generations=4, max_new_tokens=5, kl_coef=0.1, num_iterations=2, minibatch_size=4)
    learner = learner_for(tuned, options)
    before = {n: p.detach().clone() for n, p in tuned.named_trainable_parameters()}
    for _ in range(2):
        metrics = learner.step(PROMPTS, PROMPT_TEXTS, RECORDS)
    expected = {"reward", "reward_std", "zero_std_fraction", "kl", "clip_fraction", "completion_length", "entropy", "loss", "policy_loss"}
    assert expected <= set(metrics) and all(math.isfinite(v) for v in metrics.values())
    assert metrics["kl"] > 0  # the second step's policy has moved away from the bare-base reference
    changed = [n for n, p in tuned.named_trainable_parameters() if not torch.equal(p, before[n])]
    assert changed, f"{method}: the policy adapter did not train"
    assert tuned.active_adapter == "default" and "value" not in getattr(tuned, "heads", {})


def test_only_the_policy_adapter_gets_gradients_and_the_reference_is_the_sft_adapter(tmp_path):
    torch.manual_seed(2)
    sft = perturbed(peftkit.wrap(tiny_llama(), "lora", r=4, target_modules=["q_proj", "v_proj"]))
    sft.save(tmp_path / "sft")
    base = tiny_llama()
    base_ids = {id(p) for p in base.parameters()}
    tuned = peftkit.wrap(base, "lora", r=4, target_modules=["q_proj", "v_proj"])
    options = GRPOOptions(reward="x", sft_adapter=str(tmp_path / "sft"), num_generations=4, max_new_tokens=5, kl_coef=0.1)
    learner = learner_for(tuned, options)
    assert tuned.adapters == {"default": "lora", "reference": "lora"} and learner.roles.reference == "reference"
    torch.manual_seed(0)
    rollout = learner.rollout(PROMPTS, PROMPT_TEXTS, RECORDS)
    # The policy starts as the SFT adapter: the reference log-probs are the policy's own (the KL is 0).
    with torch.no_grad():
        logits, _ = learner.roles.policy_forward(rollout, options.temperature, with_values=False)
    assert torch.equal(token_logprobs(logits, rollout.response_tokens), rollout.stats["ref_logprobs"])
    learner.roles.tuned.zero_grad(set_to_none=True)
    mb = rollout.select(torch.arange(len(rollout)))
    logits, _ = learner.roles.policy_forward(mb, options.temperature, with_values=False)
    logprobs = token_logprobs(logits, mb.response_tokens)
    grpo_loss(logprobs, logprobs.detach() - 0.1, mb.stats["advantages"], mb.response_mask, clip_range=0.2,
              ref_logprobs=mb.stats["ref_logprobs"], kl_coef=0.1).loss.backward()
    with_grad = {n for n, p in tuned.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".default" in n for n in with_grad), sorted(with_grad)
    assert not any(p.requires_grad for n, p in tuned.named_parameters() if ".default" not in n)
    assert {id(p) for n, p in tuned.base_model.named_parameters() if "lora_" not in n} == base_ids  # one base


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_prompt_side_virtual_tokens_take_part_in_sampling_and_in_the_log_probs(method):
    """huggingface/trl#6186: a GRPO log-prob pass that bypasses the PEFT forward trains without the virtual tokens."""
    from peftkit.testing.reference import greedy_by_full_forward

    torch.manual_seed(0)
    tuned = peftkit.wrap(tiny_llama(), method, **POLICY_METHODS[method])
    params = [p for _, p in tuned.named_trainable_parameters()]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    options = GRPOOptions(reward="x", num_generations=2, max_new_tokens=4, kl_coef=0.0)
    learner = learner_for(tuned, options)
    # sampling: greedy generation equals a greedy full forward of the prompt-tuned model (virtual tokens included) ...
    greedy = learner.sample(PROMPTS[:1], copies=1, greedy=True)
    reference = greedy_by_full_forward(tuned, torch.tensor([PROMPTS[0]]), 4)[0, len(PROMPTS[0]) :].tolist()
    n = int(greedy.response_mask.sum())
    assert greedy.response_tokens[0, :n].tolist() == reference[:n]
    with tuned.disable_adapters():
        bare = greedy_by_full_forward(tuned, torch.tensor([PROMPTS[0]]), 4)[0, len(PROMPTS[0]) :].tolist()
    # ... and the log-probs GRPO trains on are the full model's, virtual tokens included
    rollout = pack_episodes([PROMPTS[0]], [(reference, False)], pad_id=0)
    logits, _ = learner.roles.policy_forward(rollout, 1.0, with_values=False)
    logprobs = token_logprobs(logits, rollout.response_tokens)
    with torch.no_grad():
        full = tuned(input_ids=rollout.input_ids).logits[0]
        expected = F.log_softmax(full, -1)[len(PROMPTS[0]) - 1 : -1].gather(-1, torch.tensor(reference).unsqueeze(-1)).squeeze(-1)
        with tuned.disable_adapters():
            base = F.log_softmax(tuned(input_ids=rollout.input_ids).logits[0], -1)[len(PROMPTS[0]) - 1 : -1]
            base = base.gather(-1, torch.tensor(reference).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logprobs[0], expected, atol=1e-5, rtol=0)
    assert (logprobs[0] - base).abs().max() > 1e-3 or bare != reference  # the adapter changes what is sampled and scored
    out = grpo_loss(logprobs, logprobs.detach(), torch.tensor([1.0]), rollout.response_mask, clip_range=0.2)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params), f"{method}: virtual tokens got no gradient"


def test_a_reward_model_directory_scores_like_ppos_reward_role(tmp_path):
    from peftkit_plugins.reward import load_reward_model, sequence_scores

    torch.manual_seed(1)
    rm = perturbed(peftkit.wrap(tiny_llama(), "lora", r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        attach_head(rm, seed=3).weight.mul_(30)
    save_reward_model(rm, tmp_path / "rm", adapter_name="default")
    tuned = peftkit.wrap(tiny_llama(), "prompt_tuning", num_virtual_tokens=3)
    options = GRPOOptions(reward=str(tmp_path / "rm"), num_generations=3, max_new_tokens=4, kl_coef=0.0)
    learner = learner_for(tuned, options, reward=None)
    assert tuned.adapters["reward"] == "lora" and learner.roles.reward == "reward"
    rollout = learner.rollout(PROMPTS, PROMPT_TEXTS, RECORDS)
    with torch.no_grad():
        alone = peftkit.TunedModel(tiny_llama())
        head = load_reward_model(alone, str(tmp_path / "rm"))
        expected = sequence_scores(alone, head, rollout.input_ids, rollout.attention_mask)
    torch.testing.assert_close(rollout.stats["rewards"], expected.float(), atol=1e-5, rtol=0)
    assert learner.update(rollout)["loss"] == pytest.approx(learner.update(rollout)["loss"], abs=1.0)  # updates run


@pytest.mark.parametrize(
    "reward, expected",
    [(lambda p, c, r: [1.0], r"reward 'bad' returned list of length 1 for 4 completions"),
     (lambda p, c, r: [float("nan")] * len(c), r"reward 'bad' returned nan for completion 0"),
     (lambda p, c, r: ["1"] * len(c), r"reward 'bad' returned '1' for completion 0")],
)
def test_a_reward_that_returns_the_wrong_thing_is_one_error_naming_it(reward, expected):
    class Bad:
        name = "bad"

        def __call__(self, prompts, completions, records):
            return reward(prompts, completions, records)

    tuned = peftkit.wrap(tiny_llama(), "lora", r=2, target_modules=["q_proj"])
    learner = learner_for(tuned, GRPOOptions(reward="x", num_generations=2, max_new_tokens=3), reward=Bad())
    with pytest.raises(peftkit.PeftkitError, match=expected):
        learner.rollout(PROMPTS, PROMPT_TEXTS, RECORDS)


def test_rewards_see_each_completion_with_its_own_prompt_and_record():
    seen = []

    def spy(prompts, completions, records):
        seen.extend(zip(prompts, [r["answer"] for r in records]))
        return [0.0] * len(completions)

    tuned = peftkit.wrap(tiny_llama(), "lora", r=2, target_modules=["q_proj"])
    learner = learner_for(tuned, GRPOOptions(reward="x", num_generations=3, max_new_tokens=3, kl_coef=0.0), reward=spy)
    metrics = learner.step(PROMPTS, PROMPT_TEXTS, RECORDS)
    assert seen == [(PROMPT_TEXTS[0], 5)] * 3 + [(PROMPT_TEXTS[1], 3)] * 3
    assert metrics["zero_std_fraction"] == 1.0 and metrics["reward_std"] == 0.0 and metrics["loss"] == 0.0


# ============================================================ the trainer
def _data(tmp_path) -> tuple[str, str]:
    rows = [{"prompt": f"what is {a} plus {b} ?", "answer": a + b} for a in range(1, 10) for b in range(1, 3)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:14]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[14:]))
    return str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")


class LengthReward:
    name = "test_length"
    description = "completion length in characters (a test reward that varies on a random model)"

    def __call__(self, prompts, completions, records):
        return length_reward(prompts, completions, records)


class _RewardPlugin:
    @peftkit.hookimpl
    def peftkit_register_rewards(self, register):
        register(LengthReward())


def _grpo_recipe(tmp_path, out, **options):
    from peftkit.training.recipe import recipe_from_dict

    train, evals = _data(tmp_path)
    return recipe_from_dict({
        "method": {"name": "lora", "options": {"r": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1}},
        "objective": {"name": "grpo", "options": {
            "reward": "test_length", "num_generations": 3, "max_new_tokens": 4, "kl_coef": 0.1, "num_iterations": 2,
            "minibatch_size": 4, **options}},
        "data": {"train": train, "eval": evals, "max_length": 48},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "eval_batch_size": 8},
        "output": {"dir": str(tmp_path / out), "log_every": 1, "save_every": 2, "plot": False},
    })


def _run(recipe, **kwargs):
    from peftkit.training.trainer import Trainer

    return Trainer(recipe, model=tiny_llama(), tokenizer=tiny_tokenizer(), progress=False, **kwargs).train()


def test_train_settings_grpo_would_ignore_are_refused(register_plugin, tmp_path):
    register_plugin(_RewardPlugin(), name="test-rewards")
    recipe = _grpo_recipe(tmp_path, "run")
    recipe.train.gradient_accumulation_steps = 2
    with pytest.raises(peftkit.PeftkitError, match="(?s)objective 'grpo' cannot use .*train.gradient_accumulation_steps = 2: grpo updates once per minibatch"):
        _run(recipe)


@pytest.mark.slow
def test_trainer_runs_grpo_and_a_resumed_run_ends_bit_identical(register_plugin, tmp_path, interrupt_at):
    from safetensors.torch import load_file

    register_plugin(_RewardPlugin(), name="test-rewards")
    reference = _run(_grpo_recipe(tmp_path, "ref"))
    records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all({"reward", "reward_std", "zero_std_fraction", "kl", "clip_fraction", "completion_length"} <= set(r) for r in steps)
    assert "eval_reward" in records[-1]
    assert peftkit.load(tiny_llama(), reference.adapter_dir).adapters == {"default": "lora"}

    recipe = _grpo_recipe(tmp_path, "run")
    interrupt_at(3, metric="policy_loss")
    with pytest.raises(KeyboardInterrupt):
        _run(recipe)
    interrupt_at.remove()
    assert torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    resumed = _run(recipe, resume=True)
    ref, got = load_file(str(reference.adapter_dir / "adapter.safetensors")), load_file(str(resumed.adapter_dir / "adapter.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    ref_steps = [r for r in records if "policy_loss" in r]
    got_steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in got_steps if "policy_loss" in r] == ref_steps


@pytest.mark.slow
def test_trainer_starts_grpo_from_an_sft_adapter_with_a_zero_first_kl(register_plugin, tmp_path):
    register_plugin(_RewardPlugin(), name="test-rewards")
    torch.manual_seed(2)
    sft = perturbed(peftkit.wrap(tiny_llama(), "lora", r=4, target_modules=["q_proj", "v_proj"]))
    sft.save(tmp_path / "sft")
    recipe = _grpo_recipe(tmp_path, "run", sft_adapter=str(tmp_path / "sft"), num_iterations=1, minibatch_size=None)
    recipe.train.max_steps, recipe.train.warmup_steps = 2, 0
    result = _run(recipe)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["kl"] == 0.0 and steps[1]["kl"] > 0
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["method"] == "lora"


_DDP_SCRIPT = '''
import sys, torch
torch.set_num_threads(1)
import peftkit
from peftkit.training.recipe import load_recipe
from peftkit.training.trainer import Trainer


class Length:
    name, description = "test_length", "completion length"

    def __call__(self, prompts, completions, records):
        return [float(len(c)) for c in completions]


class Plugin:
    @peftkit.hookimpl
    def peftkit_register_rewards(self, register):
        register(Length())


peftkit.plugin_manager().register(Plugin(), name="test-rewards")
t = Trainer(load_recipe(sys.argv[1], [f"output.dir={sys.argv[2]}"]), progress=False)
prompts = []
from peftkit_plugins.grpo import learner as learner_module
original = learner_module.GRPOLearner.step
def step(self, prompt_ids, texts, records):
    prompts.extend(texts)
    return original(self, prompt_ids, texts, records)
learner_module.GRPOLearner.step = step
t.train()
rank = t.accelerator.process_index
t.tuned.save(f"{sys.argv[2]}/rank{rank}", adapter_name="default")
# each rank writes its own file: two processes' prints to one pipe can interleave mid-line
import json
with open(f"{sys.argv[2]}/rank{rank}/prompts.json", "w") as fh:
    json.dump({"world": t.accelerator.num_processes, "prompts": prompts}, fh)
'''


@pytest.mark.slow
def test_two_processes_keep_groups_on_their_rank_and_end_with_identical_adapters(tmp_path):
    import os
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    model_dir = tmp_path / "tiny-model"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    train, evals = _data(tmp_path)
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "method": {"name": "lora", "options": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
        "objective": {"name": "grpo", "options": {"reward": "test_length", "num_generations": 3, "max_new_tokens": 4, "kl_coef": 0.1}},
        "data": {"train": train, "eval": evals, "max_length": 48},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2},
        "output": {"log_every": 1, "save_every": 2, "plot": False},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "ddp.py").write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PEFTKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(tmp_path / "ddp.py"), str(tmp_path / "recipe.yaml"), str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((out / f"rank{r}" / "prompts.json").read_text()) for r in (0, 1)]
    assert [s["world"] for s in seen] == [2, 2]
    per_rank = [set(s["prompts"]) for s in seen]
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]  # each rank samples (and groups) its own prompts
    a, b = load_file(str(out / "rank0" / "adapter.safetensors")), load_file(str(out / "rank1" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # gradients averaged: one policy
    assert any(k.endswith("lora_B") or "lora_B" in k for k in a) and any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "policy_loss" in r] == [1, 2, 3] and "eval_reward" in steps[-1]
