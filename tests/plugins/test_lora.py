"""LoRA: conformance, agreement with Hugging Face peft, dropout without a saved copy, merge on Conv1D."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit.errors import OptionsError
from peftkit.testing import CHECKS, check_injector, sample_batch, tiny_gpt2, tiny_llama, train_steps
from peftkit_plugins.lora import dropout as lora_dropout

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("check", CHECKS)
def test_conformance(model, check):
    check_injector("lora", model_factory=MODELS[model], checks=[check], r=4)


@pytest.mark.parametrize("model", MODELS)
def test_conformance_with_dropout_rslora_gaussian(model):
    targets = ["q_proj", "v_proj"] if model == "llama" else ["c_attn"]
    check_injector(
        "lora", model_factory=MODELS[model], r=4, dropout=0.1, use_rslora=True, init="gaussian", target_modules=targets
    )


@pytest.mark.parametrize("model", MODELS)
def test_matches_peft_reference(model):
    """Identical LoRA weights in peftkit and peft give the same logits (1e-5) and the same greedy tokens."""
    peft = pytest.importorskip("peft")
    factory = MODELS[model]
    batch = sample_batch(batch_size=3, seq_len=12)
    ours = peftkit.wrap(factory(), "lora", r=4, alpha=8, target_modules="all-linear")
    train_steps(ours, batch)  # make B non-zero so the check means something
    targets = sorted({k.split(".")[-3] for k in ours.adapter_state_dict()})
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=(model == "gpt2")
    )
    reference = peft.get_peft_model(factory(), config)
    ref_state = reference.state_dict()
    with torch.no_grad():
        for key, tensor in ours.adapter_state_dict().items():
            module, _, leaf = key.rpartition(".")  # ...q_proj.lora_A, weight
            peft_key = f"base_model.model.{module}.default.{leaf}"
            assert peft_key in ref_state, peft_key
            ref_state[peft_key].copy_(tensor)
    reference.eval()
    with torch.no_grad():
        got = ours(input_ids=batch["input_ids"]).logits
        want = reference(input_ids=batch["input_ids"]).logits
    assert (got - want).abs().max() < 1e-5
    prompt = batch["input_ids"][:, :4]
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids=prompt, **kwargs), reference.generate(input_ids=prompt, **kwargs))


def test_dropout_linear_matches_explicit_dropout():
    """Fused dropout gives F.linear(mask * x / keep, A) and the same gradients, with the same mask."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, requires_grad=True)
    a = torch.randn(3, 8, requires_grad=True)
    p = 0.3
    torch.manual_seed(123)
    h = lora_dropout.dropout_linear(x, a, p)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    mask = lora_dropout._mask(x.detach(), 1 - p, seed)
    x2, a2 = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    h2 = F.linear(x2 * mask / (1 - p), a2)
    assert torch.allclose(h, h2, atol=1e-6)
    g = torch.randn_like(h)
    h.backward(g)
    h2.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and torch.allclose(a.grad, a2.grad, atol=1e-5)
    assert 0.5 < mask.mean() < 0.9


def test_dropout_saves_no_copy_of_the_input():
    x = torch.randn(4, 16, 32)
    a = torch.randn(8, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_dropout.dropout_linear(x, a, 0.1)
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), "only x itself (not a dropped copy) is saved"


def test_no_dropout_work_when_dropout_is_zero(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("dropout ran with dropout=0")

    monkeypatch.setattr("peftkit_plugins.lora.layer.dropout_linear", fail)
    tuned = peftkit.wrap(tiny_llama().train(), "lora", dropout=0.0)
    tuned(**sample_batch()).loss.backward()


def test_dropout_only_in_training_mode():
    tuned = peftkit.wrap(tiny_llama(), "lora", dropout=0.5)
    batch = sample_batch()
    train_steps(tuned, batch)
    with torch.no_grad():
        a = tuned(input_ids=batch["input_ids"]).logits
        b = tuned(input_ids=batch["input_ids"]).logits
    assert torch.equal(a, b)


def test_conv1d_merge_uses_transposed_delta():
    tuned = peftkit.wrap(tiny_gpt2(), "lora", r=2, target_modules=["c_attn"])
    layer = tuned.base_model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.lora_B["default"].normal_()
    x = torch.randn(3, 32)
    expected = layer(x)
    tuned.merge()
    assert torch.allclose(layer.base_layer(x), expected, atol=1e-5)


def test_rslora_scaling():
    a = peftkit.wrap(tiny_llama(), "lora", r=4, alpha=8, target_modules=["q_proj"])
    b = peftkit.wrap(tiny_llama(), "lora", r=4, alpha=8, use_rslora=True, target_modules=["q_proj"])
    layer_a = a.base_model.model.layers[0].self_attn.q_proj
    layer_b = b.base_model.model.layers[0].self_attn.q_proj
    assert layer_a.scaling["default"] == 2.0 and layer_b.scaling["default"] == 4.0


def test_option_validation_reports_all_problems():
    with pytest.raises(OptionsError) as info:
        peftkit.wrap(tiny_llama(), "lora", r=0, alpha=-1, bias="all", target_modules=[])
    problems = info.value.problems
    assert problems == [
        "option 'bias' = 'all' is not valid; expected 'none'",
        "option 'r' = 0 must be >= 1",
        "option 'alpha' = -1.0 must be > 0",
        "option 'target_modules' = [] is empty; name at least one module or use 'all-linear'",
    ]


# ------------------------------------------------------------------ DoRA, rank/alpha patterns
@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_conformance_with_dora_and_patterns(model):
    targets = ["q_proj", "v_proj", "down_proj"] if model == "llama" else ["c_attn", "c_fc"]
    check_injector(
        "lora", model_factory=MODELS[model], r=4, dropout=0.1, use_dora=True, target_modules=targets,
        rank_pattern={targets[1]: 2}, alpha_pattern={targets[0]: 3.0},
    )


def _dense_dora(layer, name, x):
    """DoRA written out densely: W' = m * (W + s B A) / ||W + s B A||_row, h = W' x + bias."""
    weight = layer.dense_base_weight().detach()
    adapted = weight + layer.scaling[name] * layer.lora_B[name] @ layer.lora_A[name]
    norm = torch.linalg.vector_norm(adapted, dim=1).detach()
    bias = getattr(layer.base_layer, "bias", None)
    return F.linear(x, layer.lora_magnitude[name].view(-1, 1) * adapted / norm.view(-1, 1), bias)


@pytest.mark.parametrize("model", MODELS)
def test_dora_layer_matches_the_dense_formula_and_its_gradients(model):
    """The factored norm gives the dense formula's output and gradients (norm detached, as in the paper, 4.3)."""
    target = "q_proj" if model == "llama" else "c_attn"
    tuned = peftkit.wrap(MODELS[model](), "lora", r=4, alpha=8, use_dora=True, target_modules=[target])
    train_steps(tuned, sample_batch())  # B, m away from their init
    layer = next(m for m in tuned.modules() if type(m).__name__ == "LoraLayer")
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    ours, theirs = layer(x), _dense_dora(layer, "default", x)
    assert (ours - theirs).abs().max() < 1e-5
    params = [layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude["default"]]
    got = torch.autograd.grad(ours.square().sum(), params)
    want = torch.autograd.grad(theirs.square().sum(), params)
    assert all((g - w).abs().max() < 1e-4 * max(1.0, w.abs().max().item()) for g, w in zip(got, want))


@pytest.mark.parametrize("model", [pytest.param("llama", marks=pytest.mark.slow), "gpt2"])
def test_dora_gradients_match_peft(model, tmp_path):
    """Same weights in both libraries (through the peft format): the same loss and the same gradients."""
    peft = pytest.importorskip("peft")
    factory = MODELS[model]
    batch = sample_batch()
    ours = peftkit.wrap(factory(), "lora", r=4, alpha=8, use_dora=True)
    train_steps(ours, batch)
    peftkit.export_peft(ours, tmp_path / "exported")
    theirs = peft.PeftModel.from_pretrained(factory(), tmp_path / "exported", is_trainable=True)
    ours.train(), theirs.train()
    ours.zero_grad(set_to_none=True)  # train_steps leaves its last step's gradients
    ours(**batch).loss.backward()
    theirs(**batch).loss.backward()
    their_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    checked = 0
    for name, param in ours.named_trainable_parameters():
        key = name.removeprefix("base_model.").replace(".default", "").replace("lora_magnitude", "lora_magnitude_vector.weight")
        key = key.replace("lora_A", "lora_A.weight").replace("lora_B", "lora_B.weight")
        assert (param.grad - their_grads[key]).abs().max() < 1e-5, name
        checked += 1
    assert checked == len(their_grads)


def test_dora_merge_and_unmerge_on_conv1d():
    tuned = peftkit.wrap(tiny_gpt2(), "lora", r=4, use_dora=True)
    batch = sample_batch()
    train_steps(tuned, batch)
    base = {n: p.detach().clone() for n, p in tuned.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = tuned(**batch).logits
        tuned.merge()
        assert (tuned(**batch).logits - unmerged).abs().max() < 1e-5
        tuned.unmerge()
    assert all((p - base[n]).abs().max() < 1e-6 for n, p in tuned.named_parameters() if n in base)


def test_pattern_key_is_peft_get_pattern_key():
    peft_other = pytest.importorskip("peft.utils.other")
    from peftkit.targeting import pattern_key

    keys = ["v_proj", r"layers\.1\.self_attn\.q_proj", "mlp.down_proj", "proj"]
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.q_proj",
             "model.layers.3.mlp.down_proj", "down_proj", "model.layers.0.self_attn.o_proj", "model.embed_tokens", "xv_proj"]
    for name in names:
        theirs = peft_other.get_pattern_key(keys, name)
        assert pattern_key(keys, name) == (theirs if theirs in keys else None), name


def test_patterns_set_rank_and_alpha_per_module():
    tuned = peftkit.wrap(tiny_llama(), "lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                         rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6}, alpha_pattern={"q_proj": 3.0})
    state = tuned.adapter_state_dict()
    assert state["model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 4
    assert state["model.layers.1.self_attn.q_proj.lora_A.weight"].shape[0] == 6
    assert state["model.layers.0.self_attn.v_proj.lora_A.weight"].shape[0] == 2
    q0 = tuned.get_submodule("model.layers.0.self_attn.q_proj")
    v0 = tuned.get_submodule("model.layers.0.self_attn.v_proj")
    assert q0.scaling["default"] == 3.0 / 4 and v0.scaling["default"] == 8 / 2


def test_pattern_options_are_validated():
    with pytest.raises(OptionsError) as info:
        peftkit.wrap(tiny_llama(), "lora", rank_pattern={"q_proj": 0, "(": 2}, alpha_pattern={"v_proj": -1.0})
    text = str(info.value)
    assert "option 'rank_pattern' = {'q_proj': 0}: the value must be in 1..65536" in text
    assert "option 'rank_pattern' key '(' is not a valid regular expression" in text
    assert "option 'alpha_pattern' = {'v_proj': -1.0}: the value must be in (0, 65536]" in text
