"""QLoRA on real bitsandbytes 4-bit layers (CPU): conformance, loading, the CPU-layout gradient trap, peft reference."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from torch import nn

import peftkit
from peftkit.errors import OptionsError, TargetError
from peftkit.options import build_options
from peftkit.testing import CHECKS, check_injector, sample_batch, tiny_gpt2, tiny_llama, train_steps
from peftkit_plugins.qlora import (
    InputGradients,
    Lora4bitLayer,
    QLoraOptions,
    keep_trainable_layout,
    make_optimizer,
    quantize_model,
)

bnb = pytest.importorskip("bitsandbytes")

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine two
    spin-waiting OpenMP threads made this file ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def quantized(factory, **overrides):
    """The tiny model with every Linear/Conv1D but the head in NF4: the 4-bit base the checks compare against."""
    return quantize_model(factory(**overrides))


QUANTIZED = {name: functools.partial(quantized, factory) for name, factory in MODELS.items()}


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def linear4bit_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


# ------------------------------------------------------------ conformance
# wrap() quantizes a full-precision base irreversibly, so "the base model" the
# checks compare against (disable, unload, save/load) is the 4-bit one; every
# check applies as is. The same suite runs plain `lora` on a 4-bit base.
@pytest.mark.parametrize("method", ["qlora", "lora"])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("check", CHECKS)
def test_conformance_on_4bit_base(method, model, check):
    check_injector(method, model_factory=QUANTIZED[model], checks=[check], r=4)


def test_conformance_with_dropout_rslora_gaussian_fp4_no_double_quant():
    def factory():
        return quantize_model(tiny_llama(), ["q_proj", "v_proj"], quant_type="fp4", double_quant=False)

    check_injector(
        "qlora", model_factory=factory, r=4, dropout=0.1, use_rslora=True, init="gaussian",
        target_modules=["q_proj", "v_proj"], quant_type="fp4", double_quant=False,
    )


# -------------------------------------------------------- wrap quantizes
@pytest.mark.parametrize("model", MODELS)
def test_wrap_quantizes_full_precision_targets_in_place(model):
    base = MODELS[model]()
    head = base.get_output_embeddings()
    tuned = peftkit.wrap(base, "qlora", r=4)
    layers = linear4bit_layers(tuned)
    expected = 14 if model == "llama" else 8  # 7 Linear per llama block, 4 Conv1D per gpt2 block, 2 blocks
    assert len(layers) == expected
    for layer in layers.values():
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_type == "nf4"
        assert layer.weight.quant_state.nested, "double quantization quantizes the block scales"
        assert layer.compute_dtype == torch.float32
        assert layer.support_avx512bf16_for_cpu is False
    assert base.get_output_embeddings() is head and type(head) is nn.Linear, "the head stays full precision"
    assert all(isinstance(tuned.get_submodule(n.rpartition(".base_layer")[0]), Lora4bitLayer) for n in layers)

    # Same 4-bit base as quantizing first: outputs identical.
    batch = sample_batch()
    reference = peftkit.wrap(QUANTIZED[model](), "qlora", r=4)
    for ours, theirs in zip(tuned.trainable_parameters(), reference.trainable_parameters()):
        with torch.no_grad():
            ours.copy_(torch.randn_like(ours))
            theirs.copy_(ours)
    assert torch.equal(logits(tuned, batch), logits(reference, batch))

    # Irreversible by design: unload() gives back the quantized model, floats' flags restored.
    plain = tuned.unload()
    assert set(linear4bit_layers(plain)) == {n.replace(".base_layer", "").removeprefix("base_model.") for n in layers}
    assert all(p.requires_grad for p in plain.parameters() if p.is_floating_point())
    assert torch.equal(logits(plain, batch), logits(QUANTIZED[model](), batch))


def test_wrap_only_quantizes_targets_and_keeps_existing_4bit_layers():
    base = quantize_model(tiny_llama(), ["q_proj"])
    q_layer = base.model.layers[0].self_attn.q_proj
    tuned = peftkit.wrap(base, "qlora", r=2, target_modules=["q_proj", "v_proj"], layers=[0])
    attn0, attn1 = tuned.model.layers[0].self_attn, tuned.model.layers[1].self_attn
    assert attn0.q_proj.base_layer is q_layer, "an already-4-bit layer is injected into, not re-quantized"
    assert isinstance(attn0.v_proj.base_layer, bnb.nn.Linear4bit)
    assert type(attn0.k_proj) is nn.Linear and type(attn1.v_proj) is nn.Linear
    assert isinstance(attn1.q_proj, bnb.nn.Linear4bit), "pre-quantized layers outside the targets stay as they were"


def test_conv1d_is_transposed_into_linear4bit():
    base = tiny_gpt2()
    conv = base.transformer.h[0].attn.c_attn
    x = torch.randn(2, 3, 32)
    quantize_model(base, ["c_attn"], layers=[0])
    layer = base.transformer.h[0].attn.c_attn
    assert isinstance(layer, bnb.nn.Linear4bit) and (layer.in_features, layer.out_features) == (32, 96)
    with torch.no_grad():
        dense = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # (out, in)
        assert torch.equal(layer(x), x @ dense.t() + conv.bias)
        want = conv(x)
        assert (layer(x) - want).norm() < 0.3 * want.norm(), "4-bit rounding error only (a scrambled weight gives ~1.4)"


def test_target_already_wrapped_by_full_precision_adapter_is_refused_untouched():
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2, target_modules=["q_proj"])
    with pytest.raises(TargetError, match=r"q_proj is already wrapped by another adapter around a Linear.*add the qlora adapter first"):
        tuned.add_adapter("q", "qlora", target_modules=["q_proj", "v_proj"])
    assert not linear4bit_layers(tuned), "nothing was quantized"
    assert tuned.adapters == {"default": "lora"}


def test_lora_and_qlora_adapters_share_a_4bit_base():
    tuned = peftkit.wrap(quantized(tiny_llama), "lora", r=2, target_modules=["q_proj"])
    tuned.add_adapter("q", "qlora", r=4, target_modules=["q_proj"])
    outer = tuned.model.layers[0].self_attn.q_proj
    assert isinstance(outer, Lora4bitLayer) and outer.peftkit_method == "qlora"
    assert isinstance(outer.base_layer, Lora4bitLayer) and outer.base_layer.peftkit_method == "lora"
    batch = sample_batch()
    train_steps(tuned, batch, steps=1)
    tuned.set_adapter("q")
    train_steps(tuned, batch, steps=1)
    adapted = logits(tuned, batch)
    tuned.merge()
    assert torch.allclose(logits(tuned, batch), adapted, atol=1e-5, rtol=0)
    tuned.unmerge()
    assert torch.equal(logits(tuned, batch), adapted)


# ------------------------------------------------------------------ merge
def test_merge_swaps_in_dequantized_linear_and_unmerge_restores_the_4bit_layer():
    tuned = peftkit.wrap(quantized(tiny_llama), "qlora", r=4, target_modules=["q_proj"])
    batch = sample_batch()
    train_steps(tuned, batch)
    wrapper = tuned.model.layers[0].self_attn.q_proj
    original = wrapper.base_layer
    codes = original.weight.detach().clone()
    before = logits(tuned, batch)

    tuned.merge()
    dense = wrapper.base_layer
    assert type(dense) is nn.Linear and not dense.weight.requires_grad
    expected = bnb.functional.dequantize_4bit(codes, original.weight.quant_state) + wrapper.delta_weight("default")
    assert torch.equal(dense.weight, expected)
    assert {n for n, _ in wrapper.named_modules()} == {"", "base_layer", "lora_A", "lora_B", "lora_magnitude"}, (
        "the set-aside 4-bit layer is not a submodule while merged"
    )
    tuned.unmerge()
    assert wrapper.base_layer is original and torch.equal(original.weight, codes)
    assert torch.equal(logits(tuned, batch), before), "unmerge is bit-exact"

    plain = tuned.merge_and_unload()
    merged = plain.model.layers[0].self_attn.q_proj
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    assert isinstance(plain.model.layers[0].self_attn.k_proj, nn.Linear)
    assert torch.allclose(logits(plain, batch), before, atol=1e-5, rtol=0)


def test_requantizing_the_merged_weight_would_lose_the_update():
    """Why merge goes to a dequantized copy: re-quantizing adds a rounding error as large as a small update."""
    tuned = peftkit.wrap(quantized(tiny_llama), "qlora", r=4, target_modules=["q_proj"], layers=[0])
    train_steps(tuned, sample_batch(), lr=1e-4)
    wrapper = tuned.model.layers[0].self_attn.q_proj
    base = bnb.functional.dequantize_4bit(wrapper.base_layer.weight.data, wrapper.base_layer.weight.quant_state)
    delta = wrapper.delta_weight("default")
    assert delta.abs().max() > 0
    codes, state = bnb.functional.quantize_4bit(base + delta, quant_type="nf4", compress_statistics=True)
    requantized = bnb.functional.dequantize_4bit(codes, state)
    assert delta.norm() < 0.05 * base.norm(), "a small update, as in fine-tuning"
    error = (requantized - (base + delta)).norm() / delta.norm()
    assert error > 0.5, f"re-quantizing erred by only {error:.2f} of the update"


# ------------------------------------------------ the CPU-layout gradient trap
GRAD_MODEL = functools.partial(tiny_llama, hidden_size=64, intermediate_size=128)  # dims bnb's CPU repacking accepts


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="bitsandbytes only repacks 4-bit weights on CPUs with AVX512-BF16")
def test_unguarded_bitsandbytes_layer_loses_gradients_after_eval_forward():
    """Documents the trap peftkit guards against (fails once bitsandbytes fixes it: then drop the guard)."""
    layer = quantize_model(nn.Sequential(nn.Linear(64, 64, bias=False)))[0]
    layer.support_avx512bf16_for_cpu = True  # bitsandbytes' default on this CPU
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert layer.weight.quant_state.packing_format_for_cpu
    x = torch.randn(2, 64, requires_grad=True)
    layer.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer(x).sum().backward()
    assert x.grad is None, "bitsandbytes now back-propagates through its CPU layout"


def _grads_after(tuned, batch, *, eval_first: bool):
    if eval_first:
        tuned.eval()
        with torch.no_grad():
            tuned(**batch)
            tuned.generate(input_ids=batch["input_ids"][:, :3], max_new_tokens=2, do_sample=False, pad_token_id=0)
    tuned.train()
    seen = {}
    handle = tuned.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.setdefault("emb", out))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bitsandbytes' "no autograd kernel" warning would fail here
        loss = tuned(**batch).loss
        embeddings = seen["emb"]
        if embeddings.requires_grad:  # only with k-bit preparation (qlora)
            embeddings.retain_grad()
        loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in tuned.named_trainable_parameters() if p.grad is not None}
    return grads, embeddings.grad


@pytest.mark.parametrize(
    "how",
    ["qlora-on-full-precision", "qlora-on-loaded-4bit", "lora-on-4bit-only-q_proj"],
)
def test_gradients_still_flow_through_4bit_layers_after_an_eval_no_grad_forward(how, tmp_path):
    if how == "qlora-on-loaded-4bit":
        from transformers import AutoModelForCausalLM

        GRAD_MODEL().save_pretrained(tmp_path)
        kwargs = peftkit.plugin_manager().hook.peftkit_model_load_kwargs(method="qlora", options=QLoraOptions())
        make = lambda: AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs[0]).eval()  # noqa: E731
        wrap = lambda m: peftkit.wrap(m, "qlora", r=4)  # noqa: E731
    elif how == "qlora-on-full-precision":
        make, wrap = GRAD_MODEL, (lambda m: peftkit.wrap(m, "qlora", r=4))
    else:  # unwrapped 4-bit layers (k, v, o, mlp) sit between the adapters and the loss
        make = lambda: quantize_model(GRAD_MODEL())  # noqa: E731
        wrap = lambda m: peftkit.wrap(m, "lora", r=4, target_modules=["q_proj"])  # noqa: E731
    batch = sample_batch(vocab_size=128)
    models = []
    for eval_first in (True, False):
        tuned = wrap(make())
        layers = linear4bit_layers(tuned)
        assert len(layers) == 14 and all(m.support_avx512bf16_for_cpu is False for m in layers.values())
        torch.manual_seed(0)
        for p in tuned.trainable_parameters():
            with torch.no_grad():
                p.copy_(torch.randn_like(p) * 0.1)
        models.append(_grads_after(tuned, batch, eval_first=eval_first))
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers.values())
    (grads, emb_grad), (fresh_grads, fresh_emb_grad) = models
    first_a = [n for n in grads if "layers.0." in n and "lora_A" in n]
    assert first_a and all(grads[n].abs().sum() > 0 for n in first_a), "layer-0 LoRA A gets gradient through layer 1"
    assert grads.keys() == fresh_grads.keys() and all(torch.equal(grads[n], fresh_grads[n]) for n in grads), (
        "an eval forward must not change the gradients"
    )
    if how.startswith("qlora"):
        assert emb_grad is not None and emb_grad.abs().sum() > 0, "input embeddings require grad (k-bit preparation)"
        assert torch.equal(emb_grad, fresh_emb_grad)


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="layers are only repacked on CPUs with AVX512-BF16")
def test_guard_converts_back_layers_repacked_before_wrapping():
    base = quantize_model(GRAD_MODEL())
    for layer in linear4bit_layers(base).values():
        layer.support_avx512bf16_for_cpu = True  # as bitsandbytes builds them
    batch = sample_batch()
    with torch.no_grad():
        base(**batch)  # repacks every 4-bit layer
    assert all(m.weight.quant_state.packing_format_for_cpu for m in linear4bit_layers(base).values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = peftkit.wrap(base, "lora", r=2, target_modules=["q_proj"])
    messages = [str(w.message) for w in caught if "CPU inference layout" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("14 bitsandbytes 4-bit layer(s)"), messages
    assert not any(m.weight.quant_state.packing_format_for_cpu for m in linear4bit_layers(tuned).values())
    reference = logits(quantized(GRAD_MODEL), batch)
    with tuned.disable_adapters():
        assert torch.allclose(logits(tuned, batch), reference, atol=1e-2), "close to the original quantization"
    grads, _ = _grads_after(tuned, batch, eval_first=True)
    assert len(grads) == 4 and all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B = 0: A's grad is 0


def test_every_4bit_layer_is_guarded_for_any_method():
    base = quantize_model(tiny_llama())
    for layer in linear4bit_layers(base).values():
        layer.support_avx512bf16_for_cpu = True
    peftkit.wrap(base, "ia3")  # not a LoRA method: the after-inject hook still guards
    assert all(m.support_avx512bf16_for_cpu is False for m in linear4bit_layers(base).values())


# ---------------------------------------------------------- k-bit training
def test_kbit_preparation_casts_norms_and_head_and_hooks_input_embeddings():
    base = tiny_llama().to(torch.bfloat16)
    hooks_before = sum(len(m._forward_hooks) for m in base.modules())
    tuned = peftkit.wrap(base, "qlora", r=2, compute_dtype="bfloat16")
    norms = [m for m in base.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert base.lm_head.weight.dtype == torch.float32
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16, "only norms and head are cast"
    assert all(m.compute_dtype == torch.bfloat16 for m in linear4bit_layers(base).values())
    assert isinstance(tuned.attached["default"], InputGradients) and tuned.attached["default"].hooked
    batch = sample_batch()
    loss = tuned(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in tuned.trainable_parameters())
    tuned.unload()
    assert sum(len(m._forward_hooks) for m in base.modules()) == hooks_before, "unload removes the input hook"


def test_gradient_checkpointing_trains_adapters():
    """Reentrant checkpointing only back-propagates into segments whose inputs require grad."""
    tuned = peftkit.wrap(tiny_llama(), "qlora", r=2)
    tuned.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    tuned.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note about use_reentrant
        tuned(**sample_batch()).loss.backward()
    grads = {n: p.grad for n, p in tuned.named_trainable_parameters()}
    assert len(grads) == 28 and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # A's grad is 0 while B is 0


# ------------------------------------------------------------- loading
@pytest.mark.parametrize("model", MODELS)
def test_model_load_kwargs_load_straight_into_4bit(model, tmp_path):
    from transformers import AutoModelForCausalLM

    MODELS[model]().save_pretrained(tmp_path)
    options = build_options(QLoraOptions, {"quant_type": "nf4", "compute_dtype": "float32"})
    results = peftkit.plugin_manager().hook.peftkit_model_load_kwargs(method="qlora", options=options)
    assert len(results) == 1
    config = results[0]["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **results[0]).eval()
    ours = quantized(MODELS[model])
    assert linear4bit_layers(loaded).keys() == linear4bit_layers(ours).keys()
    assert type(loaded.get_output_embeddings()) is nn.Linear
    ours_state, loaded_state = ours.state_dict(), loaded.state_dict()
    assert ours_state.keys() == loaded_state.keys()
    assert all(torch.equal(ours_state[k], loaded_state[k]) for k in ours_state), "same 4-bit codes and scales"
    assert not any(peftkit.plugin_manager().hook.peftkit_model_load_kwargs(method="lora", options=options))


def test_adapter_trained_on_full_precision_base_loads_onto_loaded_4bit_base(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    tuned = peftkit.wrap(tiny_llama(), "qlora", r=4)
    batch = sample_batch()
    train_steps(tuned, batch)
    tuned.save(tmp_path / "adapter")
    kwargs = peftkit.plugin_manager().hook.peftkit_model_load_kwargs(method="qlora", options=QLoraOptions())[0]
    loaded = peftkit.load(AutoModelForCausalLM.from_pretrained(tmp_path / "base", **kwargs), tmp_path / "adapter")
    assert torch.equal(logits(loaded, batch), logits(tuned, batch))
    again = peftkit.load(tiny_llama(), tmp_path / "adapter")  # full precision: quantized while loading the adapter
    assert len(linear4bit_layers(again)) == 14 and torch.equal(logits(again, batch), logits(tuned, batch))


# ------------------------------------------------------------ reference
@pytest.mark.parametrize("model", MODELS)
def test_matches_peft_reference_on_the_same_4bit_model(model, tmp_path):
    """peft's bitsandbytes LoRA layer with identical weights: logits within 1e-3, same greedy tokens."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    MODELS[model]().save_pretrained(tmp_path)
    kwargs = peftkit.plugin_manager().hook.peftkit_model_load_kwargs(method="qlora", options=QLoraOptions())[0]
    batch = sample_batch(batch_size=3, seq_len=12)
    ours = peftkit.wrap(AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs), "qlora", r=4, alpha=8)
    train_steps(ours, batch)  # B non-zero
    targets = sorted({k.split(".")[-3] for k in ours.adapter_state_dict()})
    reference_base = AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs)
    keep_trainable_layout(reference_base)  # peft does not guard; repacking would change its numerics
    reference = peft.get_peft_model(reference_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    wrapped = reference.base_model.model.get_submodule(next(iter(ours.adapter_state_dict())).rpartition(".lora_A")[0])
    assert type(wrapped).__module__.endswith("lora.bnb"), f"peft used {type(wrapped)} instead of its 4-bit layer"
    ref_state = reference.state_dict()
    with torch.no_grad():
        for key, tensor in ours.adapter_state_dict().items():
            module, _, leaf = key.rpartition(".")
            ref_state[f"base_model.model.{module}.default.{leaf}"].copy_(tensor)
    reference.eval()
    got, want = logits(ours, batch), logits(reference, batch)
    assert (got - want).abs().max() < 1e-3
    prompt = batch["input_ids"][:, :4]
    gen = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(input_ids=prompt, **gen), reference.generate(input_ids=prompt, **gen))


# ------------------------------------------------------ DoRA, peft export
def test_dora_on_a_4bit_base_trains_merges_and_unmerges():
    tuned = peftkit.wrap(quantized(tiny_llama), "qlora", r=4, target_modules=["q_proj", "v_proj"], use_dora=True)
    batch = sample_batch()
    before = logits(tuned, batch)
    with tuned.disable_adapters():
        assert torch.equal(logits(tuned, batch), before)  # the magnitude starts at the row norms: the base exactly
    magnitudes = {n: p.detach().clone() for n, p in tuned.named_trainable_parameters() if "lora_magnitude" in n}
    assert len(magnitudes) == 4
    train_steps(tuned, batch)
    assert all(not torch.equal(p, magnitudes[n]) for n, p in tuned.named_trainable_parameters() if n in magnitudes)
    unmerged = logits(tuned, batch)
    layers = linear4bit_layers(tuned)
    tuned.merge()
    assert (logits(tuned, batch) - unmerged).abs().max() < 1e-4
    tuned.unmerge()
    assert linear4bit_layers(tuned).keys() == layers.keys() and all(linear4bit_layers(tuned)[k] is v for k, v in layers.items())
    assert torch.equal(logits(tuned, batch), unmerged)


@pytest.mark.parametrize("use_dora", [False, True])
def test_export_is_a_peft_lora_adapter_for_the_4bit_base(use_dora, tmp_path):
    """peft loads the export on the same 4-bit base (logits within 1e-3 as above, same greedy tokens); lora imports it back."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from peftkit_plugins.qlora.peft_format import QUANTIZATION_PREFIX

    tiny_llama().save_pretrained(tmp_path / "base")
    kwargs = peftkit.plugin_manager().hook.peftkit_model_load_kwargs(method="qlora", options=QLoraOptions())[0]
    load_4bit = lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "base", **kwargs)  # noqa: E731
    batch = sample_batch()
    ours = peftkit.wrap(load_4bit(), "qlora", r=4, alpha=8, use_dora=use_dora)
    train_steps(ours, batch)
    peftkit.export_peft(ours, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is use_dora and config["fan_in_fan_out"] is False
    card = (tmp_path / "peft" / "README.md").read_text()
    assert QUANTIZATION_PREFIX in card and "- bnb_4bit_quant_type: nf4" in card and "- load_in_4bit: True" in card
    base = load_4bit()
    keep_trainable_layout(base)
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert (logits(reference, batch) - logits(ours, batch)).abs().max() < 1e-3
    prompt = batch["input_ids"][:, :4]
    gen = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(reference.generate(input_ids=prompt, **gen), ours.generate(input_ids=prompt, **gen))
    back = peftkit.import_peft(load_4bit(), tmp_path / "peft")
    assert back.adapters == {"default": "lora"} and back.adapter_info("default").options.use_dora is use_dora
    assert (logits(back, batch) - logits(ours, batch)).abs().max() < 1e-5


# -------------------------------------------------------------- options
def test_option_validation_reports_all_problems():
    with pytest.raises(OptionsError) as info:
        peftkit.wrap(tiny_llama(), "qlora", bits=8, quant_type="int4", compute_dtype="float64", r=0, double_quant="yes")
    text = str(info.value)
    assert "option 'quant_type' = 'int4' is not valid; expected 'nf4' | 'fp4'" in text
    assert "option 'compute_dtype' = 'float64' is not valid; expected 'float32' | 'bfloat16' | 'float16'" in text
    assert "option 'double_quant' = 'yes' is not valid; expected bool" in text
    with pytest.raises(OptionsError) as info:
        peftkit.wrap(tiny_llama(), "qlora", bits=8, r=0)
    text = str(info.value)
    assert "option 'bits' = 8 is not supported; qlora quantizes the base to 4 bits only" in text
    assert "option 'r' = 0 must be >= 1" in text


def test_failed_wrap_leaves_model_full_precision():
    model = tiny_llama()
    with pytest.raises(TargetError):
        peftkit.wrap(model, "qlora", target_modules=["nope"])
    assert not linear4bit_layers(model) and all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------- optimizer
def test_make_optimizer_is_torch_adamw_without_cuda():
    params = [nn.Parameter(torch.zeros(3))]
    optimizer = make_optimizer(params, lr=1e-3, weight_decay=0.1)
    if torch.cuda.is_available():
        pytest.skip("covers the CPU branch; CUDA machines get bitsandbytes' paged AdamW")
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="state_bits=16 is not supported; use 8 or 32"):
        make_optimizer(params, lr=1e-3, state_bits=16)
    with pytest.raises(ValueError, match="got no parameters"):
        make_optimizer([], lr=1e-3)
