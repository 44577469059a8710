"""Tests of the ``ppo`` objective: the math against hand-computed values, rollouts, the four roles on one base, every method as the policy, PPO-ptx."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.testing import tiny_llama
from peftkit_plugins.ppo import (
    KLController,
    PPOLearner,
    PPOOptions,
    Roles,
    attach_value_head,
    entropy_from_logits,
    gae,
    generate_responses,
    pack_episodes,
    policy_loss,
    ptx_loss,
    setup_roles,
    token_logprobs,
    token_rewards,
    value_loss,
    whiten,
)
from peftkit_plugins.reward import attach_head, save_reward_model


def char_tokenizer():
    """A character-level tokenizer for the 128-token tiny models: pad 0, bos 1, eos 2, printable ASCII 3..97."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-5, rtol=0)


# ====================================================================== math
def test_gae_matches_a_hand_computed_example():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.0, 9.0]])  # 9.0 sits after row 2's end: never used
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 1: deltas 1.4, 0.35, 0.5; A2 = 0.5, A1 = 0.35 + 0.72 * 0.5, A0 = 1.4 + 0.72 * A1
    # row 2: deltas 3 + 0.9 * 2 - 1 = 3.8, 1 + 0 - 2 = -1 (no bootstrap past the end)
    close(advantages, [[1.9112, 0.71, 0.5], [3.08, -1.0, 0.0]])
    close(returns, [[2.4112, 1.71, 2.0], [4.08, 1.0, 0.0]])


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 0.6]])
    advantages, _ = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(advantages, [[0.8, 0.6, 0.4]])


def test_whiten_uses_masked_positions_only():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    out = whiten(x, mask)
    std = math.sqrt(5.0 / 3.0)  # unbiased variance of 1, 2, 3, 4
    close(out, [[-1.5 / std, -0.5 / std, 0.0], [0.5 / std, 1.5 / std, 0.0]])
    kept = whiten(x, mask, shift_mean=False)
    assert kept[0, 0].item() == pytest.approx(-1.5 / std + 2.5, abs=1e-5)


def test_clipped_policy_loss_by_hand():
    ratio = torch.tensor([[1.5, 0.5, 1.1]])
    old = torch.zeros(1, 3)
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    out = policy_loss(torch.log(ratio), old, advantages, torch.ones(1, 3), clip_range=0.2)
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5; token 3: 1.1 either way
    assert out.loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(1 / 3)
    assert out.approx_kl.item() == pytest.approx(0.5 * float((torch.log(ratio) ** 2).mean()), abs=1e-6)


def test_policy_loss_is_masked_and_its_gradient_vanishes_when_clipped():
    logprobs = torch.log(torch.tensor([[1.5, 1.0]])).requires_grad_()
    out = policy_loss(logprobs, torch.zeros(1, 2), torch.tensor([[1.0, 7.0]]), torch.tensor([[1, 0]]), clip_range=0.2)
    assert out.loss.item() == pytest.approx(-1.2)
    out.loss.backward()
    assert logprobs.grad.tolist() == [[0.0, 0.0]]


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]])
    out = value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # clipped values 0.7, 0.7: errors max(1, 1.69) and max(9, 0.49)
    assert out.loss.item() == pytest.approx(0.5 * (1.69 + 9.0) / 2, abs=1e-6)
    assert out.clip_fraction.item() == pytest.approx(0.5)


def test_per_token_kl_penalty_and_score_at_the_last_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -1.0], [-2.0, -1.0, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards, kl = token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, beta=0.1)
    close(kl, [[0.5, 0.0, 0.0], [1.0, 0.0, -0.5]])
    close(rewards, [[-0.05, 2.0, 0.0], [-0.1, 0.0, 0.05 - 1.0]])


def test_kl_controller_fixed_and_adaptive():
    fixed = KLController(0.1)
    assert fixed.update(50.0, 64) == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=100)
    assert adaptive.update(12.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    assert adaptive.update(5.4, 10) == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 10 / 100))


def test_token_logprobs_and_entropy():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    expected = F.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, tokens), expected, atol=1e-6)
    probs = F.softmax(logits, -1)
    assert torch.allclose(entropy_from_logits(logits), -(probs * probs.log()).sum(-1), atol=1e-5)
    assert entropy_from_logits(torch.zeros(5)).item() == pytest.approx(math.log(5))


def perturbed(tuned, scale: float = 0.3):
    """LoRA starts as the identity (B = 0); give every adapter weight a random value so adapters differ."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return tuned


# ================================================================== rollouts
def test_pack_episodes_aligns_actions_with_the_model_logits():
    torch.manual_seed(0)
    tuned = perturbed(peftkit.wrap(tiny_llama(), "lora", r=4, target_modules=["q_proj", "v_proj"]))
    tuned.add_adapter("reward", "lora", trainable=False, r=2, target_modules=["q_proj"])
    attach_head(tuned, "reward")
    attach_value_head(tuned)
    roles = Roles(tuned, policy="default", reward="reward")
    prompts = [[1, 5, 6, 7], [1, 9]]
    responses = [([10, 11, 2], True), ([12, 13, 14, 15, 16], False)]
    rollout = pack_episodes(prompts, responses, pad_id=0)
    assert rollout.input_ids.tolist() == [[1, 5, 6, 7, 10, 11, 2], [1, 9, 12, 13, 14, 15, 16]]
    assert rollout.response_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    with torch.no_grad():
        logits, values = roles.policy_forward(rollout)
        logprobs = token_logprobs(logits, rollout.response_tokens)
        for b, (prompt, (response, _)) in enumerate(zip(prompts, responses)):
            full = tuned(input_ids=torch.tensor([prompt + response])).logits[0]  # (T, V) the plain model
            expected = F.log_softmax(full, -1)[len(prompt) - 1 : -1].gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)
            assert torch.allclose(logprobs[b, : len(response)], expected, atol=1e-5)
    assert values.shape == (2, 5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sampling_from_a_policy_with_non_finite_logits_is_a_training_error(bad):
    from peftkit.errors import TrainingError

    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight[3].fill_(bad)  # what an overflowing policy gives: non-finite logits from finite-looking code
    with pytest.raises(TrainingError, match="logits hold NaN/inf while sampling token 4 of a rollout"):
        generate_responses(model, [[1, 5, 6]], pad_id=0, stop_ids=[2], max_new_tokens=3)


def test_generation_stops_at_stop_tokens_and_flags_missing_eos():
    torch.manual_seed(0)
    model = tiny_llama()
    results = generate_responses(model, [[1, 5, 6], [1, 7]] * 8, pad_id=0, stop_ids=[2, 40, 41, 42, 43, 44], max_new_tokens=6)
    stops = {2, 40, 41, 42, 43, 44}
    assert any(ended for _, ended in results) and any(not ended for _, ended in results)
    for tokens, ended in results:
        if ended:
            assert tokens[-1] in stops and not stops & set(tokens[:-1])
        else:
            assert len(tokens) == 6 and not stops & set(tokens)


# ============================================================== four roles
def _reward_dir(tmp_path, method="lora", **options):
    torch.manual_seed(1)
    rm = perturbed(peftkit.wrap(tiny_llama(), method, **(options or {"r": 2, "target_modules": ["q_proj", "v_proj"]})))
    head = attach_head(rm, seed=3)
    with torch.no_grad():
        head.weight.mul_(30)  # a reward that varies between responses
    save_reward_model(rm, tmp_path / "rm", adapter_name="default")
    return str(tmp_path / "rm")


def _sft_dir(tmp_path):
    torch.manual_seed(2)
    sft = perturbed(peftkit.wrap(tiny_llama(), "lora", r=4, target_modules=["q_proj", "v_proj"]))
    sft.save(tmp_path / "sft")
    return str(tmp_path / "sft")


PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 10, 11], [1, 3, 4, 5, 6]]


def test_one_base_four_roles_reference_is_the_sft_adapter(tmp_path):
    base = tiny_llama()
    base_ids = {id(p) for p in base.parameters()}
    tuned = peftkit.wrap(base, "lora", r=4, target_modules=["q_proj", "v_proj"])
    options = PPOOptions(reward_model=_reward_dir(tmp_path), sft_adapter=_sft_dir(tmp_path), max_new_tokens=6, minibatch_size=2)
    roles = setup_roles(tuned, options)
    assert tuned.adapters == {"default": "lora", "reference": "lora", "reward": "lora"}
    assert tuned.active_adapter == "default" and roles.reference == "reference"
    trainable = [n for n, _ in tuned.named_trainable_parameters()]
    assert trainable and all(".default" in n or n.startswith("heads.value.") for n in trainable)
    assert not any(".reference" in n or ".reward" in n or n.startswith("heads.reward") for n in trainable)
    # The policy starts as the SFT adapter: the first rollout's KL is exactly 0. Against the bare base it is not.
    learner = PPOLearner(roles, options, [torch.optim.AdamW(roles.trainable_parameters(), lr=1e-3)], pad_id=0, stop_ids=[2])
    torch.manual_seed(0)
    rollout = learner.rollout(PROMPTS)
    assert rollout.stats["kl"].abs().max().item() == 0.0
    bare = Roles(tuned, policy="default", reward="reward", reference=None)
    with torch.no_grad():
        ref_logits = bare.reference_logits(rollout)
        assert (rollout.stats["logprobs"] - token_logprobs(ref_logits, rollout.response_tokens)).abs().max() > 1e-3
    # Still one base: three adapters and two heads, and not one extra copy of a base weight.
    assert {id(p) for n, p in tuned.base_model.named_parameters() if "lora_" not in n} == base_ids


def test_sft_adapter_of_another_method_is_refused(tmp_path):
    tuned = peftkit.wrap(tiny_llama(), "ia3")
    options = PPOOptions(reward_model=_reward_dir(tmp_path), sft_adapter=_sft_dir(tmp_path))
    with pytest.raises(peftkit.PeftkitError, match="set method.name: lora"):
        setup_roles(tuned, options)


def test_train_settings_ppo_would_ignore_are_refused_together():
    from types import SimpleNamespace

    from peftkit_plugins.ppo import PPOObjective

    with pytest.raises(peftkit.PeftkitError) as info:
        PPOObjective._check_train_settings(SimpleNamespace(gradient_accumulation_steps=4, gradient_checkpointing=True))
    message = str(info.value)
    assert "train.gradient_accumulation_steps = 4" in message and "minibatch_size" in message
    assert "train.gradient_checkpointing = true" in message
    PPOObjective._check_train_settings(SimpleNamespace(gradient_accumulation_steps=1, gradient_checkpointing=False))


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
    "method", [m if m == "lora" else pytest.param(m, marks=pytest.mark.slow) for m in sorted(POLICY_METHODS)]
)
def test_every_method_runs_ppo_as_the_policy(tmp_path, method):
    torch.manual_seed(0)
    tuned = peftkit.wrap(tiny_llama(), method, **POLICY_METHODS[method])
    options = PPOOptions(reward_model=_reward_dir(tmp_path), max_new_tokens=5, minibatch_size=2, ppo_epochs=2, kl_coef=0.1)
    roles = setup_roles(tuned, options)
    params = {n: p.detach().clone() for n, p in tuned.named_trainable_parameters()}
    learner = PPOLearner(roles, options, [torch.optim.AdamW(roles.trainable_parameters(), lr=1e-2)], pad_id=0, stop_ids=[2])
    for _ in range(2):
        metrics = learner.step(PROMPTS)
    expected = {"reward", "kl", "entropy", "policy_loss", "value_loss", "clip_fraction", "approx_kl", "response_length"}
    assert expected <= set(metrics) and all(math.isfinite(v) for v in metrics.values())
    changed = [n for n, p in tuned.named_trainable_parameters() if not torch.equal(p, params[n])]
    assert any(not n.startswith("heads.") for n in changed), f"{method}: the policy adapter did not train"
    assert tuned.adapters["reward"] == "lora" and tuned.active_adapter == "default"


def test_prompt_side_reward_under_a_lora_policy(tmp_path):
    torch.manual_seed(0)
    tuned = peftkit.wrap(tiny_llama(), "lora", r=4, target_modules=["q_proj", "v_proj"])
    options = PPOOptions(reward_model=_reward_dir(tmp_path, "prompt_tuning", num_virtual_tokens=4), max_new_tokens=4, minibatch_size=4, ppo_epochs=1)
    roles = setup_roles(tuned, options)
    assert tuned.adapters["reward"] == "prompt_tuning"
    learner = PPOLearner(roles, options, [torch.optim.AdamW(roles.trainable_parameters(), lr=1e-2)], pad_id=0, stop_ids=[2])
    rollout = learner.rollout(PROMPTS)
    with torch.no_grad():  # the reward is the prompt-tuned model's own score, whatever else shares the base
        rm = peftkit.TunedModel(tiny_llama())
        from peftkit_plugins.reward import load_reward_model, sequence_scores

        head = load_reward_model(rm, options.reward_model)
        expected = sequence_scores(rm, head, rollout.input_ids, rollout.attention_mask)
    assert torch.allclose(rollout.stats["scores"], expected, atol=1e-5)


def test_ppo_ptx_adds_the_pretraining_term(tmp_path):
    torch.manual_seed(0)
    tuned = perturbed(peftkit.wrap(tiny_llama(), "lora", r=4, target_modules=["q_proj", "v_proj"]))
    options = PPOOptions(reward_model=_reward_dir(tmp_path), max_new_tokens=4, minibatch_size=4, ppo_epochs=1, ptx_coef=0.5, ptx_data="x.txt")
    roles = setup_roles(tuned, options)
    batch = {"input_ids": torch.tensor([[1, 20, 21, 22, 23], [1, 30, 31, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    with torch.no_grad():
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        expected = tuned(**batch, labels=labels).loss  # the model's own causal-LM loss, same adapter
        assert ptx_loss(roles, batch).item() == pytest.approx(expected.item(), abs=1e-5)
    learner = PPOLearner(roles, options, [torch.optim.AdamW(roles.trainable_parameters(), lr=1e-2)], pad_id=0, stop_ids=[2])
    metrics = learner.step(PROMPTS, iter([batch] * 10))
    assert metrics["ptx_loss"] > 0


def test_options_report_every_problem():
    from peftkit.options import build_options

    with pytest.raises(peftkit.OptionsError) as info:
        build_options(PPOOptions, {"ptx_coef": 1.0, "clip_range": 0, "minibatch_size": 0}, owner="objective 'ppo'")
    text = str(info.value)
    assert "reward_model" in text and "ptx_data" in text and "clip_range" in text and "minibatch_size" in text


# ============================================================ the trainer
DATA = Path(__file__).resolve().parents[2] / "data" / "rlhf"


def _ppo_recipe(tmp_path, reward_dir, out, method="lora", method_options=None):
    from peftkit.training.recipe import recipe_from_dict

    return recipe_from_dict({
        "method": {"name": method, "options": method_options or {"r": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1}},
        "objective": {"name": "ppo", "options": {
            "reward_model": reward_dir, "max_new_tokens": 5, "minibatch_size": 2, "ppo_epochs": 2, "target_kl": 1.0,
            "ptx_coef": 0.5, "ptx_data": str(DATA / "pretrain.txt"), "ptx_max_length": 24, "ptx_batch_size": 2}},
        "data": {"train": str(DATA / "prompts.jsonl"), "eval": str(DATA / "prompts_eval.jsonl"), "max_length": 48, "max_train_samples": 16},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "eval_batch_size": 64},
        "output": {"dir": str(tmp_path / out), "log_every": 1, "save_every": 2, "plot": False},
    })


def _run(recipe, **kwargs):
    from peftkit.training.trainer import Trainer

    return Trainer(recipe, model=tiny_llama(), tokenizer=char_tokenizer(), progress=False, **kwargs).train()


@pytest.mark.slow
def test_trainer_runs_ppo_ptx_and_a_resumed_run_ends_bit_identical(tmp_path, interrupt_at):
    from safetensors.torch import load_file

    reward_dir = _reward_dir(tmp_path)
    reference = _run(_ppo_recipe(tmp_path, reward_dir, "ref"))
    records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all("ptx_loss" in r and "kl" in r for r in steps)
    assert "eval_reward" in records[-1]
    assert peftkit.load(tiny_llama(), reference.adapter_dir).adapters == {"default": "lora"}

    recipe = _ppo_recipe(tmp_path, reward_dir, "run")
    interrupt_at(3, metric="policy_loss")
    with pytest.raises(KeyboardInterrupt):
        _run(recipe)
    interrupt_at.remove()
    assert torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    resumed = _run(recipe, resume=True)
    ref, got = load_file(str(reference.adapter_dir / "adapter.safetensors")), load_file(str(resumed.adapter_dir / "adapter.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    ref_state = torch.load(tmp_path / "ref" / "checkpoint" / "ppo_state.pt", weights_only=True)
    got_state = torch.load(tmp_path / "run" / "checkpoint" / "ppo_state.pt", weights_only=True)
    assert all(torch.equal(ref_state["value_head"][k], got_state["value_head"][k]) for k in ref_state["value_head"])
    assert ref_state["kl"] == got_state["kl"] and ref_state["ptx"] == got_state["ptx"]


def test_a_ppo_update_that_breaks_the_policy_fails_the_run_before_any_save(tmp_path, monkeypatch):
    from peftkit.errors import TrainingError
    from peftkit_plugins.ppo import learner as learner_module

    real_step = learner_module.PPOLearner.step

    def step(self, prompts, ptx=None):
        metrics = real_step(self, prompts, ptx)
        with torch.no_grad():  # what an overflowing update does; the next rollout would sample from NaN logits
            next(p for n, p in self.roles.tuned.named_trainable_parameters() if "lora_B" in n).view(-1)[0] = float("nan")
        return metrics

    monkeypatch.setattr(learner_module.PPOLearner, "step", step)
    recipe = _ppo_recipe(tmp_path, _reward_dir(tmp_path), "run")
    recipe.train.max_steps, recipe.data.eval = 1, None
    with pytest.raises(TrainingError, match=r"adapter became non-finite .* step 1: .*lora_B.*no checkpoint was written yet"):
        _run(recipe)
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.parametrize("prompt, expected", [(None, "'prompt' is null"), (["a"], r"'prompt' is a list \(\['a'\]\)")])
def test_prompts_that_are_not_strings_are_refused(prompt, expected):
    from peftkit.training.data import DataError
    from peftkit_plugins.ppo.data import prepare_prompts

    with pytest.raises(DataError, match=f"record 1: {expected}, not a string"):
        prepare_prompts([{"prompt": "ok"}, {"prompt": prompt}], char_tokenizer(), PPOOptions(reward_model="rm"), 16)


def test_pretraining_texts_must_be_strings_and_utf8(tmp_path):
    from peftkit.training.data import DataError
    from peftkit_plugins.ppo.data import load_ptx_texts

    jsonl = tmp_path / "ptx.jsonl"
    jsonl.write_text('{"text": "some text"}\n{"text": null}\n')
    with pytest.raises(DataError, match=rf"data '{jsonl}', record 2: 'text' is null, not a string"):
        load_ptx_texts(str(jsonl))
    txt = tmp_path / "ptx.txt"
    txt.write_bytes(b"first paragraph\n\nsecond \xe9t\xe9\n")
    with pytest.raises(DataError, match=r"ptx.txt'? is not UTF-8 text: byte 0xe9 at offset 24 \(line 3\)"):
        load_ptx_texts(str(txt))


def test_stop_tokens_must_be_single_tokens():
    from peftkit_plugins.ppo import stop_token_ids

    tok = char_tokenizer()
    assert stop_token_ids(tok, ["!", "?"]) == sorted({2, tok.convert_tokens_to_ids("!"), tok.convert_tokens_to_ids("?")})
    with pytest.raises(peftkit.PeftkitError, match="'END' is not a single token"):
        stop_token_ids(tok, ["END"])


@pytest.mark.parametrize("shares", [False, True])
def test_value_loss_reaches_the_policy_adapter_only_when_the_trunk_is_shared(shares):
    tuned = perturbed(peftkit.wrap(tiny_llama(), "lora", r=4, target_modules=["q_proj", "v_proj"]))
    tuned.add_adapter("reward", "lora", trainable=False, r=2, target_modules=["q_proj"])
    attach_head(tuned, "reward")
    attach_value_head(tuned)
    roles = Roles(tuned, policy="default", reward="reward", value_shares_trunk=shares)
    rollout = pack_episodes([[1, 5, 6]], [([7, 8, 2], True)], pad_id=0)
    _, values = roles.policy_forward(rollout)
    values.sum().backward()
    adapter_grads = [p.grad for n, p in tuned.named_parameters() if "lora_A.default" in n]
    assert tuned.heads["value"].weight.grad is not None
    assert all(g is not None and g.abs().sum() > 0 for g in adapter_grads) if shares else all(g is None for g in adapter_grads)


# ====================================================== several processes
def test_ptx_rows_are_dealt_out_over_ranks_without_overlap():
    from peftkit_plugins.ppo.data import PtxStream

    rows = [[i, i] for i in range(10)]
    seen = [
        {int(r[0]) for _ in range(2) for r in next(iter(stream))["input_ids"]}
        for stream in (PtxStream(rows, 2, 0, seed=3, rank=rank, world_size=2) for rank in (0, 1))
    ]
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]  # two batches each, disjoint shares


def test_whitening_and_sums_over_ranks_are_the_single_process_ones_without_a_process_group():
    from peftkit_plugins.ppo.distributed import mean_over_ranks, sum_over_ranks, whiten_over_ranks

    x, mask = torch.tensor([[1.0, 2.0, 9.0], [4.0, 0.0, 0.0]]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert torch.equal(whiten_over_ranks(x, mask), whiten(x, mask))
    assert sum_over_ranks([1.5, 2]) == [1.5, 2.0] and mean_over_ranks({"a": 1.0}) == {"a": 1.0}


_DDP_SCRIPT = '''
import sys, torch
torch.set_num_threads(1)
from peftkit.training.recipe import load_recipe
from peftkit.training.trainer import Trainer
from peftkit_plugins.ppo import learner as learner_module

recipe, out, resume, stop_at = sys.argv[1], sys.argv[2], sys.argv[3] == "resume", int(sys.argv[4])
t = Trainer(load_recipe(recipe, [f"output.dir={out}"]), progress=False, resume=resume)
prompts = []
original_step, original_log = learner_module.PPOLearner.step, Trainer.log
def step(self, prompt_ids, ptx=None):
    prompts.extend("-".join(map(str, p)) for p in prompt_ids)
    return original_step(self, prompt_ids, ptx)
def log(self, record):
    if record.get("step") == stop_at and "policy_loss" in record:
        raise KeyboardInterrupt  # every rank logs (only the main process writes): all stop at the same point
    return original_log(self, record)
learner_module.PPOLearner.step, Trainer.log = step, log
t.train()
rank = t.accelerator.process_index
t.tuned.save(f"{out}/rank{rank}", adapter_name="default")
torch.save(t.tuned.heads["value"].state_dict(), f"{out}/rank{rank}/value_head.pt")
open(f"{out}/rank{rank}/prompts.txt", "w").write(f"{t.accelerator.num_processes}\\n" + "\\n".join(prompts))  # not stdout: ranks interleave
'''


def _ddp_setup(tmp_path, **train):
    import yaml

    model_dir = tmp_path / "tiny-model"
    tiny_llama().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    evals = DATA / "prompts_eval.jsonl"
    (tmp_path / "eval.jsonl").write_text("".join(evals.read_text().splitlines(keepends=True)[:6]))
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "method": {"name": "lora", "options": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
        "objective": {"name": "ppo", "options": {
            "reward_model": _reward_dir(tmp_path), "max_new_tokens": 5, "top_k": 1, "minibatch_size": 2, "ppo_epochs": 1,
            "target_kl": 1.0, "ptx_coef": 0.5, "ptx_data": str(DATA / "pretrain.txt"), "ptx_max_length": 24, "ptx_batch_size": 2}},
        "data": {"train": str(DATA / "prompts.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 48, "max_train_samples": 16},
        "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "eval_batch_size": 8, **train},
        "output": {"log_every": 1, "save_every": 1, "plot": False},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "ddp.py").write_text(_DDP_SCRIPT)
    return tmp_path / "recipe.yaml"


def _torchrun(tmp_path, recipe, out, *, resume=False, stop_at=0, nproc=2):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(tmp_path / "ddp.py"),
               str(recipe), str(out), "resume" if resume else "fresh", str(stop_at)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def _prompts_seen(out, rank) -> list[str]:
    world, *prompts = (out / f"rank{rank}" / "prompts.txt").read_text().splitlines()
    assert world == "2"
    return prompts


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_roll_out_their_own_prompts_keep_one_policy_and_match_one_process_with_the_global_batch(tmp_path):
    from safetensors.torch import load_file

    from peftkit.training.recipe import load_recipe
    from peftkit.training.trainer import Trainer

    recipe = _ddp_setup(tmp_path)
    out = tmp_path / "ddp"
    proc = _torchrun(tmp_path, recipe, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = [_prompts_seen(out, rank) for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 6  # 3 rollouts x 2 prompts per rank
    assert not set(per_rank[0][:4]) & set(per_rank[1][:4])  # the first epoch (8 prompts a rank) is dealt out disjointly
    a, b = load_file(str(out / "rank0" / "adapter.safetensors")), load_file(str(out / "rank1" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # gradients averaged: one policy
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    va, vb = (torch.load(out / f"rank{r}" / "value_head.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(va[k], vb[k]) for k in va)  # and one value head
    records = _metrics(out)
    steps = [r for r in records if "policy_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all("ptx_loss" in r for r in steps)  # logged once, by rank 0
    assert "eval_reward" in records[-1]
    assert sorted(p.name for p in (out / "checkpoint").glob("ppo_state*.pt")) == ["ppo_state.pt", "ppo_state_rank0.pt", "ppo_state_rank1.pt"]
    # One process with the global batch (2 x 2 prompts, one minibatch of 4): the same prompts, and top_k = 1
    # makes the responses the same, so the first update's losses (before any step) agree.
    single = Trainer(load_recipe(str(recipe), [f"output.dir={tmp_path / 'single'}", "train.batch_size=4", "train.max_steps=1",
                                               "objective.options.minibatch_size=4"]), progress=False)
    single.train()
    first = [r for r in _metrics(tmp_path / "single") if "policy_loss" in r][0]
    gaps = {k: abs(first[k] - steps[0][k]) / max(abs(first[k]), 1.0) for k in ("reward", "kl", "value_loss", "policy_loss", "response_length")}
    assert max(gaps.values()) < 1e-5, gaps  # measured: <= 1.9e-7 (float32 sums in another order)


@pytest.mark.slow
def test_a_resumed_two_process_run_restores_every_rank_and_ends_bit_identical(tmp_path):
    from safetensors.torch import load_file

    recipe = _ddp_setup(tmp_path)
    reference = _torchrun(tmp_path, recipe, tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr[-3000:]
    stopped = _torchrun(tmp_path, recipe, tmp_path / "run", stop_at=3)
    assert stopped.returncode != 0 and "KeyboardInterrupt" in stopped.stderr
    assert torch.load(tmp_path / "run" / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    resumed = _torchrun(tmp_path, recipe, tmp_path / "run", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        ref, got = (load_file(str(tmp_path / d / f"rank{rank}" / "adapter.safetensors")) for d in ("ref", "run"))
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
        assert _prompts_seen(tmp_path / "ref", rank)[-2:] == _prompts_seen(tmp_path / "run", rank)  # its own data position came back
    assert [r for r in _metrics(tmp_path / "ref") if "policy_loss" in r] == [r for r in _metrics(tmp_path / "run") if "policy_loss" in r]
