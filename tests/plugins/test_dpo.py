"""Tests of the ``dpo`` objective: the loss against a separate reference model and TRL, the reference on one base, every method, resume."""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.testing import tiny_llama
from peftkit_plugins.dpo import DPOObjective, DPOOptions, preference_losses, sequence_logprobs, setup_reference

DATA = Path(__file__).resolve().parents[2] / "data" / "rlhf"
RECORDS = [
    {"prompt": "Hi", "chosen": "yo there!", "rejected": "No."},
    {"prompt": "Tell me", "responses": ["a b!", "b", "CC."]},
    {"prompt": "Q?", "chosen": "ok!", "rejected": "NOPE, NEVER."},
]


def char_tokenizer():
    """A character-level tokenizer for the 128-token tiny models: pad 0, bos 1, eos 2, printable ASCII 3..97."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def perturbed(tuned, scale: float = 0.2, seed: int = 7):
    """Give every trainable adapter tensor random noise, so that adapters (and the policy and its reference) differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in tuned.named_trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return tuned


METHOD_OPTIONS = {
    "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "qlora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    "ia3": {},
    "adapter": {},
    "prompt_tuning": {"num_virtual_tokens": 3},
    "p_tuning": {"num_virtual_tokens": 3},
    "prefix_tuning": {"num_virtual_tokens": 3},
}


def _sft_dir(tmp_path, method="lora"):
    torch.manual_seed(2)
    sft = perturbed(peftkit.wrap(tiny_llama(), method, **METHOD_OPTIONS[method]))
    sft.save(tmp_path / f"sft-{method}")
    return str(tmp_path / f"sft-{method}")


def _batch(tok, options):
    objective = DPOObjective()
    return objective.collate(objective.prepare_data(RECORDS, tok, options, 64), tok)


# ==================================================================== data
def test_collate_labels_exactly_the_response_and_its_end_token():
    tok = char_tokenizer()
    batch = _batch(tok, DPOOptions())
    assert batch["group_sizes"].tolist() == [2, 3, 2] and batch["input_ids"].shape[0] == 7
    first = tok("yo there!", add_special_tokens=False)["input_ids"] + [2]
    assert [t for t in batch["labels"][0].tolist() if t != -100] == first
    assert batch["response_lengths"].tolist() == [len(first), 4, 5, 2, 4, 4, 13]
    assert ((batch["labels"] != -100).sum(-1) == batch["response_lengths"]).all()


# ==================================================================== loss
def _direct_logprobs(model, batch):
    """Summed response log-probabilities from the model's full logits: log_softmax and gather, no shortcut."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()  # (N, T, V)
    logp = torch.log_softmax(logits[:, :-1], -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    return (logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)


def _direct_loss(policy, reference, batch, beta, label_smoothing, loss_type):
    """The batch loss by hand: every pair of every group, the mean over a group's pairs, then over groups."""
    pi, ref = _direct_logprobs(policy, batch), _direct_logprobs(reference, batch)
    lengths = batch["response_lengths"].float()
    group_losses, start = [], 0
    for k in batch["group_sizes"].tolist():
        pairs = []
        for i in range(start, start + k):
            for j in range(i + 1, start + k):
                ratio_w, ratio_l = pi[i] - ref[i], pi[j] - ref[j]
                if loss_type == "sigmoid":
                    z = beta * (ratio_w - ratio_l)
                    pairs.append(-(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z))
                else:
                    pairs.append((ratio_w / lengths[i] - ratio_l / lengths[j] - 1 / (2 * beta)) ** 2)
        group_losses.append(torch.stack(pairs).mean())
        start += k
    return torch.stack(group_losses).mean()


@pytest.mark.parametrize("reference", ["sft_adapter", "bare_base"])
@pytest.mark.parametrize("beta, label_smoothing, loss_type", [(0.5, 0.0, "sigmoid"), (0.1, 0.2, "sigmoid"), (0.3, 0.0, "ipo")])
def test_loss_equals_a_direct_computation_with_a_separate_reference_model(tmp_path, reference, beta, label_smoothing, loss_type):
    tok = char_tokenizer()
    options = DPOOptions(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                         sft_adapter=_sft_dir(tmp_path) if reference == "sft_adapter" else None)
    base = tiny_llama()
    if reference == "sft_adapter":
        tuned = peftkit.wrap(base, "lora", **METHOD_OPTIONS["lora"])
        setup_reference(tuned, options)
        reference_model = peftkit.load(copy.deepcopy(base), options.sft_adapter)  # the SFT policy, its own model
    else:
        reference_model = copy.deepcopy(base)  # the bare base, its own model
        tuned = peftkit.wrap(base, "lora", **METHOD_OPTIONS["lora"])
    perturbed(tuned, seed=11)  # the policy moved away from its reference
    tuned.eval()
    batch = _batch(tok, options)
    out = DPOObjective().loss(tuned, batch, options)
    with torch.no_grad():
        expected = _direct_loss(tuned, reference_model.eval(), batch, beta, label_smoothing, loss_type)
    assert abs(float(out.loss.detach()) - float(expected)) < 1e-5
    assert out.num_targets == 3 and float(out.loss.detach()) > 0
    assert set(out.metrics) == {"accuracy", "margin", "chosen_reward", "rejected_reward"}


def trl_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, *, beta, loss_type, chosen_lengths, rejected_lengths):
    """TRL's own DPOTrainer._compute_loss on these summed log-probabilities (a stand-in model returns them)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    logps = torch.cat([chosen, rejected])  # TRL's batch is [chosen..., rejected...]
    lengths = torch.cat([chosen_lengths, rejected_lengths])
    width = int(lengths.max()) + 1
    completion_mask = (torch.arange(width) >= width - lengths.unsqueeze(-1)).long()  # (2P, T): the last `length` tokens
    per_token = torch.zeros(len(logps), width - 1)
    per_token[:, -1] = logps  # TRL sums per-token log-probs over the sequence
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token), mean_logits=torch.zeros_like(per_token),
                              is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x),
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0, f_divergence_type="reverse_kl",
        use_weighting=False, aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=None,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("sigmoid", 2.0), ("ipo", 0.3)])
def test_loss_equals_trls_dpo_loss_on_the_same_tensors(loss_type, beta):
    pytest.importorskip("trl")
    gen = torch.Generator().manual_seed(0)
    chosen, rejected, ref_chosen, ref_rejected = (torch.randn(6, generator=gen) * 4 - 10 for _ in range(4))
    chosen_lengths, rejected_lengths = torch.tensor([3, 4, 5, 1, 2, 7]), torch.tensor([2, 6, 1, 3, 3, 4])
    ours = preference_losses(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                             chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    theirs, metrics = trl_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                                   chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    assert abs(float(ours.losses.mean()) - float(theirs)) < 1e-5
    assert float(ours.chosen_rewards.mean()) == pytest.approx(metrics["rewards/chosen"][0], abs=1e-5)
    assert float(ours.rejected_rewards.mean()) == pytest.approx(metrics["rewards/rejected"][0], abs=1e-5)


def test_sequence_logprobs_of_a_prompt_tuned_model_skip_the_virtual_tokens():
    tok = char_tokenizer()
    torch.manual_seed(0)
    tuned = perturbed(peftkit.wrap(tiny_llama(), "prompt_tuning", num_virtual_tokens=3)).eval()
    batch = _batch(tok, DPOOptions())
    with torch.no_grad():
        got = sequence_logprobs(tuned, batch)
        expected = _direct_logprobs(tuned, batch)  # the model's own forward cuts the virtual positions off its logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ============================================================ one base, two roles
def test_only_the_policy_trains_and_the_reference_adapter_stays_unchanged(tmp_path):
    tok = char_tokenizer()
    base = tiny_llama()
    base_ids = {id(p) for p in base.parameters()}
    tuned = peftkit.wrap(base, "lora", **METHOD_OPTIONS["lora"])
    options = DPOOptions(beta=0.5, sft_adapter=_sft_dir(tmp_path))
    setup_reference(tuned, options)
    assert tuned.adapters == {"default": "lora", "reference": "lora"} and tuned.active_adapter == "default"
    reference_before = {k: v.clone() for k, v in tuned.adapter_state_dict("reference").items()}
    sft = peftkit.load(tiny_llama(), options.sft_adapter).adapter_state_dict()
    assert all(torch.equal(tuned.adapter_state_dict("default")[k], sft[k]) for k in sft)  # the policy starts as the SFT adapter
    tuned.train()
    objective, batch = DPOObjective(), _batch(tok, options)
    first = objective.loss(tuned, batch, options)
    assert first.metrics["margin"] == 0.0 and abs(float(first.loss) - 0.6931472) < 1e-6  # policy == reference: log 2
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        out = objective.loss(tuned, batch, options)
        out.loss.backward()
        with_grad = {n for n, p in tuned.named_parameters() if p.grad is not None}
        assert with_grad and all(".default" in n for n in with_grad), with_grad
        optimizer.step()
        optimizer.zero_grad()
    assert objective.loss(tuned, batch, options).metrics["margin"] > 0
    assert all(torch.equal(tuned.adapter_state_dict("reference")[k], v) for k, v in reference_before.items())
    assert tuned.active_adapter == "default" and tuned.training  # the reference pass restored both
    assert {id(p) for n, p in tuned.base_model.named_parameters() if "lora_" not in n} == base_ids  # one base, no copy


def test_sft_adapter_of_another_method_is_refused(tmp_path):
    tuned = peftkit.wrap(tiny_llama(), "ia3")
    with pytest.raises(peftkit.PeftkitError, match="set method.name: lora"):
        setup_reference(tuned, DPOOptions(sft_adapter=_sft_dir(tmp_path)))
    with pytest.raises(peftkit.PeftkitError, match="no adapter_config.json"):
        setup_reference(tuned, DPOOptions(sft_adapter=str(tmp_path)))


@pytest.mark.parametrize("method", [m if m == "lora" else pytest.param(m, marks=pytest.mark.slow) for m in sorted(METHOD_OPTIONS)])
def test_two_training_steps_under_every_method(tmp_path, method):
    tok = char_tokenizer()
    torch.manual_seed(0)
    tuned = peftkit.wrap(tiny_llama(), method, **METHOD_OPTIONS[method])
    options = DPOOptions(beta=0.5, sft_adapter=_sft_dir(tmp_path, method))
    setup_reference(tuned, options)
    tuned.train()
    reference_before = {k: v.clone() for k, v in tuned.adapter_state_dict("reference").items()}
    policy_before = {n: p.detach().clone() for n, p in tuned.named_trainable_parameters()}
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    objective, batch = DPOObjective(), _batch(tok, options)
    losses = []
    for _ in range(2):
        out = objective.loss(tuned, batch, options)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss))
    assert abs(losses[0] - 0.6931472) < 1e-5 and losses[1] < losses[0], losses  # starts at log 2 (policy == reference), falls
    assert any(not torch.equal(p, policy_before[n]) for n, p in tuned.named_trainable_parameters())
    assert all(torch.equal(tuned.adapter_state_dict("reference")[k], v) for k, v in reference_before.items())


def test_options_report_every_problem_naming_the_field():
    from peftkit.options import build_options

    with pytest.raises(peftkit.OptionsError) as info:
        build_options(DPOOptions, {"beta": 0, "label_smoothing": 0.5, "loss_type": "hinge"}, owner="objective 'dpo'")
    text = str(info.value)
    assert "'beta' = 0" in text and "'label_smoothing' = 0.5" in text and "'loss_type' = 'hinge'" in text and "sigmoid, ipo" in text
    with pytest.raises(peftkit.OptionsError, match="'beta'"):
        build_options(DPOOptions, {"beta": "high"}, owner="objective 'dpo'")
    with pytest.raises(peftkit.OptionsError, match="'label_smoothing' = 0.1 applies to loss_type 'sigmoid' only"):
        build_options(DPOOptions, {"loss_type": "ipo", "label_smoothing": 0.1}, owner="objective 'dpo'")


# ============================================================ the trainer
def _recipe(tmp_path, out, sft_dir):
    from peftkit.training.recipe import recipe_from_dict

    return recipe_from_dict({
        "method": {"name": "lora", "options": METHOD_OPTIONS["lora"]},
        "objective": {"name": "dpo", "options": {"beta": 0.5, "sft_adapter": sft_dir}},
        "data": {"train": str(DATA / "preferences.jsonl"), "eval": str(DATA / "preferences_eval.jsonl"), "max_length": 64,
                 "max_train_samples": 16},
        "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-2, "eval_batch_size": 64},
        "output": {"dir": str(tmp_path / out), "log_every": 1, "save_every": 2, "plot": False},
    })


def _run(recipe, **kwargs):
    from peftkit.training.trainer import Trainer

    return Trainer(recipe, model=tiny_llama(), tokenizer=char_tokenizer(), progress=False, **kwargs).train()


@pytest.mark.slow
def test_trainer_runs_dpo_and_an_interrupted_run_resumes_bit_identical(tmp_path, interrupt_at):
    from safetensors.torch import load_file

    sft_dir = _sft_dir(tmp_path)
    reference = _run(_recipe(tmp_path, "ref", sft_dir))
    records = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert evals[0]["eval_margin"] == 0.0 and evals[-1]["eval_margin"] != 0.0  # the policy starts as its reference
    assert {"eval_chosen_reward", "eval_rejected_reward", "eval_loss"} <= set(evals[-1])
    assert all("accuracy" in r and "margin" in r for r in records if "loss" in r)
    assert peftkit.load(tiny_llama(), reference.adapter_dir).adapters == {"default": "lora"}  # the policy alone

    recipe = _recipe(tmp_path, "run", sft_dir)
    interrupt_at(3)
    with pytest.raises(KeyboardInterrupt):
        _run(recipe)
    interrupt_at.remove()
    resumed = _run(recipe, resume=True)
    want, got = load_file(str(reference.adapter_dir / "adapter.safetensors")), load_file(str(resumed.adapter_dir / "adapter.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert resumed.metrics == reference.metrics


@pytest.mark.slow
def test_two_processes_switch_adapters_under_ddp_and_end_identical(tmp_path):
    import os
    import subprocess
    import sys
    import textwrap

    import yaml
    from safetensors.torch import load_file

    model_dir = tmp_path / "tiny-model"
    tiny_llama().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    recipe = _recipe(tmp_path, "ddp", _sft_dir(tmp_path)).to_dict()
    recipe["model"]["name_or_path"] = str(model_dir)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(
        """
        import sys, torch
        torch.set_num_threads(1)
        from peftkit.training.recipe import load_recipe
        from peftkit.training.trainer import Trainer
        t = Trainer(load_recipe(sys.argv[1]), progress=False)
        result = t.train()
        t.tuned.save(f"{sys.argv[2]}/rank{t.accelerator.process_index}")
        t.tuned.save(f"{sys.argv[2]}/reference{t.accelerator.process_index}", adapter_name="reference")
        # its own file: two ranks' prints to one pipe can interleave mid-line
        with open(f"{sys.argv[2]}/rank{t.accelerator.process_index}/world.txt", "w") as fh:
            fh.write(str(t.accelerator.num_processes))
        """
    ))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PEFTKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path / "recipe.yaml"), str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / "ddp" / f"rank{r}" / "world.txt").read_text() for r in (0, 1)] == ["2", "2"]
    tensors = {name: load_file(str(tmp_path / "ddp" / name / "adapter.safetensors")) for name in ("rank0", "rank1", "reference0", "reference1")}
    assert all(torch.equal(tensors["rank0"][k], tensors["rank1"][k]) for k in tensors["rank0"])  # one policy, synchronised
    sft = load_file(str(tmp_path / "sft-lora" / "adapter.safetensors"))
    for name in ("reference0", "reference1"):  # the frozen reference never moved on either rank
        assert all(torch.equal(tensors[name][k], sft[k]) for k in sft)
    assert any(not torch.equal(tensors["rank0"][k], sft[k]) for k in sft)
