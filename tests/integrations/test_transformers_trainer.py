"""A TunedModel as the model of transformers.Trainer: plain Trainer trains with default arguments; AdapterTrainer saves and resumes adapters."""

from __future__ import annotations

import os

import pytest
import torch

import peftkit
from peftkit.errors import AdapterError
from peftkit.integrations import AdapterTrainer
from peftkit.testing import tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

PROBE = torch.tensor([[5, 9, 17, 33, 4, 60, 7, 21]])


def dataset(rows: int = 16, length: int = 12):
    """Token rows plus a ``text`` column the model does not take (Trainer must drop it, or collating fails)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (rows, length), generator=gen).tolist()
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * length] * rows, "labels": ids, "text": ["a row"] * rows}
    )


def arguments(tmp_path, **overrides):
    """Default TrainingArguments except the run's length and place (and no tracker, no bf16 autocast to compare logits)."""
    values = dict(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                  report_to=[], save_strategy="no", disable_tqdm=True)
    values.update(overrides)
    return transformers.TrainingArguments(**values)


def logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def snapshot(tuned):
    return {name: param.detach().clone() for name, param in tuned.named_parameters()}


def test_plain_trainer_trains_with_default_arguments(tmp_path):
    tuned = peftkit.wrap(tiny_llama(), "lora", r=4, target_modules="all-linear")
    before = snapshot(tuned)
    trainer = transformers.Trainer(model=tuned, args=arguments(tmp_path), train_dataset=dataset(), eval_dataset=dataset(4))
    assert trainer.label_names == ["labels"]
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = {name for name, param in tuned.named_parameters() if not torch.equal(param, before[name])}
    assert changed == {name for name, _ in tuned.named_trainable_parameters()} and changed
    assert all(".lora_" in name for name in changed), "base parameters must not change"
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"])), "labels are found, so evaluation has a loss"


def test_plain_trainer_gradient_checkpointing_reaches_frozen_embeddings(tmp_path):
    # Prompt tuning's only parameters join at the frozen embeddings: reentrant checkpointing
    # needs the input-grad hook that activation_checkpointing_enable installs.
    tuned = peftkit.wrap(tiny_llama(), "prompt_tuning", num_virtual_tokens=4)
    before = snapshot(tuned)
    args = arguments(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}, max_steps=2)
    trainer = transformers.Trainer(model=tuned, args=args, train_dataset=dataset())
    trainer.train()
    assert tuned.base_model.is_activation_checkpointing
    prompt = dict(tuned.named_parameters())["attached.default.prompt.prompt_embeddings"]
    assert not torch.equal(prompt, before["attached.default.prompt.prompt_embeddings"])


def test_plain_trainer_save_writes_the_full_state_dict(tmp_path):
    """The limit AdapterTrainer exists for: Trainer saves adapters only for PreTrainedModel/PeftModel (isinstance)."""
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2)
    trainer = transformers.Trainer(model=tuned, args=arguments(tmp_path, max_steps=1), train_dataset=dataset())
    trainer.save_model(str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    tied = transformers.Trainer(model=peftkit.wrap(tiny_gpt2(), "lora", r=2), args=arguments(tmp_path, max_steps=1))
    with pytest.raises(RuntimeError, match="Some tensors share memory"):  # GPT-2, SmolLM2: tied embeddings
        tied.save_model(str(tmp_path / "tied"))


def test_adapter_trainer_saves_adapters_in_checkpoints_and_save_model(tmp_path):
    tuned = peftkit.wrap(tiny_gpt2(), "lora", r=4)  # tied embeddings: a full state dict would not even save
    args = arguments(tmp_path, save_strategy="steps", save_steps=2)
    trainer = AdapterTrainer(model=tuned, args=args, train_dataset=dataset())
    trainer.train()
    trainer.save_model()
    run = tmp_path / "run"
    for directory in (run, run / "checkpoint-2", run / "checkpoint-4"):
        names = set(os.listdir(directory))
        assert {"adapter_config.json", "adapter.safetensors", "training_args.bin"} <= names, directory
        assert not names & {"model.safetensors", "pytorch_model.bin"}, directory
    assert (run / "checkpoint-2" / "optimizer.pt").is_file(), "save_model into the run keeps its checkpoints"
    tuned.eval()
    again = peftkit.load(tiny_gpt2(), run)
    assert torch.equal(logits(again), logits(tuned))
    from_checkpoint = peftkit.TunedModel.from_pretrained(tiny_gpt2(), run / "checkpoint-4")
    assert torch.equal(logits(from_checkpoint), logits(tuned))


@pytest.mark.parametrize(
    "method, options", [("lora", {"r": 4}), pytest.param("prefix_tuning", {"num_virtual_tokens": 4}, marks=pytest.mark.slow)]
)
def test_adapter_trainer_resume_restores_the_adapter(tmp_path, method, options):
    def run(resume=None):
        tuned = peftkit.wrap(tiny_llama(), method, **options)
        args = arguments(tmp_path, save_strategy="steps", save_steps=2, seed=3)
        trainer = AdapterTrainer(model=tuned, args=args, train_dataset=dataset())
        params = [p for _, p in tuned.named_trainable_parameters()]
        trainer.train(resume_from_checkpoint=resume)
        assert params == [p for _, p in tuned.named_trainable_parameters()], "resume refills the adapter in place"
        return tuned.adapter_state_dict()

    straight = run()
    resumed = run(resume=str(tmp_path / "run" / "checkpoint-2"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def test_resume_into_a_different_adapter_is_refused(tmp_path):
    trainer = AdapterTrainer(model=peftkit.wrap(tiny_llama(), "lora", r=2), args=arguments(tmp_path, max_steps=1),
                             train_dataset=dataset())
    trainer.save_model(str(tmp_path / "ckpt"))
    other = AdapterTrainer(model=peftkit.wrap(tiny_llama(), "lora", r=4), args=arguments(tmp_path, max_steps=1),
                           train_dataset=dataset())
    with pytest.raises(AdapterError, match=r"holds method 'lora' with options .*'r': 2.* is 'lora' with options .*'r': 4"):
        other.train(resume_from_checkpoint=str(tmp_path / "ckpt"))


def test_adapter_trainer_needs_a_tuned_model(tmp_path):
    with pytest.raises(AdapterError, match="needs model=TunedModel .* got LlamaForCausalLM"):
        AdapterTrainer(model=tiny_llama(), args=arguments(tmp_path))


def test_label_smoothing_on_a_causal_lm_is_refused(tmp_path):
    # Trainer would smooth unshifted labels: it shifts only for classes it knows as causal LMs.
    with pytest.raises(AdapterError, match=r"label_smoothing_factor = 0.1: .*trainer.py:2190"):
        AdapterTrainer(model=peftkit.wrap(tiny_llama(), "lora", r=2), args=arguments(tmp_path, label_smoothing_factor=0.1))
