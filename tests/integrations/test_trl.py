"""TRL's SFTTrainer, DPOTrainer and GRPOTrainer with a TunedModel (AdapterTrainerMixin, ReferenceModel)."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.integrations import AdapterTrainerMixin, ReferenceModel
from peftkit.testing import tiny_llama
from peftkit.testing.tokenizers import tiny_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

METHODS = {"lora": {"r": 4, "target_modules": "all-linear"}, "prompt_tuning": {"num_virtual_tokens": 4}}
PROBE = torch.tensor([[5, 9, 17, 33, 4, 60, 7, 21]])
PROMPT = "attached.default.prompt.prompt_embeddings"


class SFTTrainer(AdapterTrainerMixin, trl.SFTTrainer):
    pass


class DPOTrainer(AdapterTrainerMixin, trl.DPOTrainer):
    pass


class GRPOTrainer(AdapterTrainerMixin, trl.GRPOTrainer):
    pass


def common(tmp_path, **overrides):
    """A few steps on the CPU, no tracker; bf16 off so saved and live logits compare exactly."""
    values = dict(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                  report_to=[], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", disable_tqdm=True)
    values.update(overrides)
    return values


def conversations(rows: int = 8):
    return datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": f"what is {i} plus 3 ?"}, {"role": "assistant", "content": str(i + 3)}]}
         for i in range(rows)]
    )


def preferences(rows: int = 8):
    return datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"what is {i} plus 3 ?"}],
          "chosen": [{"role": "assistant", "content": str(i + 3)}],
          "rejected": [{"role": "assistant", "content": "no"}]} for i in range(rows)]
    )


def trained(tuned, before):
    return {name for name, param in tuned.named_parameters() if not torch.equal(param, before[name])}


def snapshot(tuned):
    return {name: param.detach().clone() for name, param in tuned.named_parameters()}


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_saved_adapter_loads(trainer, tuned):
    trainer.save_model()
    tuned.eval()
    again = peftkit.load(tiny_llama(), trainer.args.output_dir)
    with torch.no_grad():
        assert torch.equal(again(input_ids=PROBE).logits, tuned(input_ids=PROBE).logits)


def fused_log_probs_by_hand(model, ids):
    """Per-token log-probabilities of ``ids`` from the full logits (what the fused LM head must return)."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("method", [pytest.param("lora"), pytest.param("prompt_tuning", marks=pytest.mark.slow)])
def test_sft_trains_and_saves_an_adapter(tmp_path, method):
    tuned = peftkit.wrap(tiny_llama(), method, **METHODS[method])
    before = snapshot(tuned)
    trainer = SFTTrainer(model=tuned, args=trl.SFTConfig(**common(tmp_path)), train_dataset=conversations(),
                         processing_class=tiny_tokenizer())
    # TRL's fused LM head now sits on the transformers model and sees the adapter (and virtual tokens).
    tuned.eval()
    with torch.no_grad():
        fused = tuned(input_ids=PROBE, labels=PROBE, fused_lm_head=True).log_probs
    torch.testing.assert_close(fused, fused_log_probs_by_hand(tuned, PROBE), rtol=1e-5, atol=1e-5)
    tuned.train()
    trainer.train()
    assert all(torch.isfinite(torch.tensor(losses(trainer))))
    changed = trained(tuned, before)
    assert changed and changed == {name for name, _ in tuned.named_trainable_parameters()}
    assert_saved_adapter_loads(trainer, tuned)


def test_reference_model_is_the_base_without_a_copy():
    tuned = peftkit.wrap(tiny_llama(), "prompt_tuning", num_virtual_tokens=4)
    base = tiny_llama()
    reference = ReferenceModel(tuned)
    with torch.no_grad():
        assert torch.equal(reference(input_ids=PROBE).logits, base(input_ids=PROBE).logits)
        assert not torch.equal(tuned(input_ids=PROBE).logits, base(input_ids=PROBE).logits), "the policy is back after the call"
    assert {id(p) for p in reference.parameters()} <= {id(p) for p in tuned.parameters()}
    trl.trainer.add_fused_lm_head(reference)  # what DPOTrainer does to ref_model
    with torch.no_grad():
        fused = reference(input_ids=PROBE, labels=PROBE, fused_lm_head=True).log_probs
    torch.testing.assert_close(fused, fused_log_probs_by_hand(base, PROBE), rtol=1e-5, atol=1e-5)
    tuned.load_adapter(_saved(tuned), "sft")
    with torch.no_grad():
        assert torch.equal(ReferenceModel(tuned, "sft")(input_ids=PROBE).logits, tuned(input_ids=PROBE).logits)
    assert tuned.active_adapter == "default"


def _saved(tuned):
    import tempfile

    path = tempfile.mkdtemp()
    tuned.save(f"{path}/adapter")
    return f"{path}/adapter"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_trains_against_the_disabled_adapters(tmp_path, method, precompute):
    tuned = peftkit.wrap(tiny_llama(), method, **METHODS[method])
    before = snapshot(tuned)
    args = trl.DPOConfig(**common(tmp_path), precompute_ref_log_probs=precompute)
    # Given, or by default (ref_model=None): the same model with its adapters disabled.
    reference = {"ref_model": ReferenceModel(tuned)} if precompute else {}
    trainer = DPOTrainer(model=tuned, args=args, train_dataset=preferences(), processing_class=tiny_tokenizer(), **reference)
    trainer.train()
    first = trainer.state.log_history[0]
    if method == "lora":  # a fresh LoRA adapter is the base: policy == reference at step 1
        assert first["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    else:  # virtual tokens change the policy from the start; the reference stays the base
        assert first["rewards/chosen"] != 0.0
    assert all(torch.isfinite(torch.tensor(losses(trainer))))
    assert trained(tuned, before) == {name for name, _ in tuned.named_trainable_parameters()}
    assert_saved_adapter_loads(trainer, tuned)


def _length_reward(completions, **_):
    return [float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_grpo_trains_and_prompt_tokens_reach_generation_and_log_probs(tmp_path, method):
    """huggingface/trl#6186: virtual tokens must be in both the sampling and the log-probability passes."""
    tuned = peftkit.wrap(tiny_llama(), method, **METHODS[method])
    before = snapshot(tuned)
    seen = []  # (grad enabled, the decoder input starts with the virtual tokens) per fresh (cache-less) call
    if method == "prompt_tuning":
        prompt = dict(tuned.named_parameters())[PROMPT]

        def record(module, args, kwargs):  # registered after the adapter's hook: sees what the decoder gets
            embeds = kwargs.get("inputs_embeds")
            if embeds is not None and embeds.shape[1] > prompt.shape[0]:
                seen.append((torch.is_grad_enabled(), torch.equal(embeds[0, : prompt.shape[0]], prompt.to(embeds.dtype))))

        tuned.base_model.base_model.register_forward_pre_hook(record, with_kwargs=True)
    args = trl.GRPOConfig(**common(tmp_path, max_steps=2), num_generations=4, max_completion_length=6)
    trainer = GRPOTrainer(model=tuned, args=args, reward_funcs=_length_reward,
                          train_dataset=datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "what is 2 plus 3 ?"}]}] * 8),
                          processing_class=tiny_tokenizer())
    trainer.train()
    assert all(torch.isfinite(torch.tensor(losses(trainer))))
    assert trained(tuned, before) == {name for name, _ in tuned.named_trainable_parameters()}
    if method == "prompt_tuning":
        assert any(not grad for grad, _ in seen) and any(grad for grad, _ in seen), seen
        assert all(starts for _, starts in seen), "every fresh decoder call starts with the virtual tokens"
    assert_saved_adapter_loads(trainer, tuned)


def test_an_adapter_on_the_output_head_is_refused(tmp_path):
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2, target_modules=["q_proj", "lm_head"])
    with pytest.raises(peftkit.AdapterError, match=r"fused LM head .* remove the output head \(e.g. 'lm_head'\)"):
        SFTTrainer(model=tuned, args=trl.SFTConfig(**common(tmp_path)), train_dataset=conversations(),
                   processing_class=tiny_tokenizer())


def test_dpo_reference_defaults_to_the_disabled_adapters(tmp_path):
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2)
    for given in ({}, {"ref_model": None}):
        trainer = DPOTrainer(tuned, args=trl.DPOConfig(**common(tmp_path)), train_dataset=preferences(2),
                             processing_class=tiny_tokenizer(), **given)
        reference = trainer.accelerator.unwrap_model(trainer.ref_model)
        assert isinstance(reference, ReferenceModel) and reference.tuned is tuned and reference.adapter_name is None
