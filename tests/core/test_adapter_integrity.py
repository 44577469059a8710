"""Damage is never saved or loaded: non-finite tensors, wrong dtypes, flipped bits, edited options, huge shapes.

And a failed add/load leaves the model exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import resource
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import pytest
import torch
from torch import nn

import peftkit
import peftkit.serialization as serialization
from peftkit.errors import AdapterError, AdapterFormatError, PeftkitError
from peftkit.interop import export_peft, import_peft
from peftkit.testing import sample_batch, tiny_llama, train_steps

LORA_A = "model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture
def saved(tmp_path):
    tuned = peftkit.wrap(tiny_llama(), "lora", r=2, target_modules=["q_proj", "v_proj"])
    train_steps(tuned, sample_batch())
    path = tmp_path / "adapter"
    tuned.save(path)
    return tuned, path


def _config(path):
    return json.loads((path / serialization.CONFIG_NAME).read_text())


def _rewrite(path, tensors=None, **config_changes):
    """Rewrite an adapter as a faulty writer would: its checksum matches, its content is wrong."""
    config = {k: v for k, v in _config(path).items() if k not in {"format_version", "peftkit_version", "weights_sha256"}}
    config.update(config_changes)
    if tensors is None:
        tensors = serialization.load_file(str(path / serialization.WEIGHTS_NAME))
    serialization.write_adapter(path, config, tensors)


def _tensors(path):
    return serialization.load_file(str(path / serialization.WEIGHTS_NAME))


# ------------------------------------------------------- 1. saving damage
def test_save_refuses_non_finite_adapter_and_keeps_the_previous_copy(saved, tmp_path):
    tuned, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with torch.no_grad():
        a = dict(tuned.named_parameters())["base_model.model.layers.0.self_attn.q_proj.lora_A.default"]
        a[0, :2] = float("nan")
        a[1, 0] = float("inf")
    with pytest.raises(AdapterError) as info:
        tuned.save(path)
    text = str(info.value)
    assert "adapter 'default'" in text and f"{LORA_A} (2 NaN, 1 inf of 64 values)" in text and "1 tensor(s)" in text
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    with pytest.raises(AdapterError, match="non-finite"):
        tuned.save(tmp_path / "fresh", training=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "nothing is written, not even a temp dir"


# ------------------------------------------------------ 2. loading damage
@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64])
def test_load_refuses_a_tensor_of_another_kind_of_number(saved, dtype):
    _, path = saved
    tensors = _tensors(path)
    tensors[LORA_A] = tensors[LORA_A].to(dtype)
    _rewrite(path, tensors)
    model = tiny_llama()
    with pytest.raises(AdapterFormatError) as info:
        peftkit.load(model, path)
    text = str(info.value)
    assert str(path) in text and LORA_A in text and str(dtype) in text and "torch.float32" in text
    assert all(type(m).__name__ != "LoraLayer" for m in model.modules())


def test_load_converts_float_precisions(saved):
    tuned, path = saved
    _rewrite(path, {k: v.to(torch.bfloat16) for k, v in _tensors(path).items()})
    loaded = peftkit.load(tiny_llama(), path)
    for key, tensor in loaded.adapter_state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, tuned.adapter_state_dict()[key].to(torch.bfloat16).float())


def test_load_refuses_an_integer_prompt_for_a_prompt_side_method(tmp_path):
    path = tmp_path / "prompt"
    peftkit.wrap(tiny_llama(), "prompt_tuning", num_virtual_tokens=4).save(path)
    _rewrite(path, {k: v.to(torch.int32) for k, v in _tensors(path).items()})
    with pytest.raises(AdapterFormatError, match=r"'attached.prompt_embeddings' has dtype torch.int32, but .* torch.float32"):
        peftkit.load(tiny_llama(), path)


def test_load_refuses_non_finite_tensors(saved):
    _, path = saved
    tensors = _tensors(path)
    tensors[LORA_A][0, 0] = float("-inf")
    _rewrite(path, tensors)
    with pytest.raises(AdapterFormatError, match=rf"{path}.*non-finite.*{LORA_A} \(0 NaN, 1 inf of 64 values\)"):
        peftkit.load(tiny_llama(), path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_load_refuses_non_finite_options_naming_the_config_file(saved, value):
    _, path = saved
    config = _config(path)
    config["options"]["alpha"] = value
    (path / serialization.CONFIG_NAME).write_text(json.dumps(config))  # json writes NaN / Infinity
    with pytest.raises(PeftkitError) as info:
        peftkit.load(tiny_llama(), path)
    text = str(info.value)
    assert "adapter_config.json" in text and str(path) in text and "alpha" in text and str(value) in text


def test_checksum_is_recorded_and_a_flipped_bit_is_an_error(saved):
    tuned, path = saved
    weights = path / serialization.WEIGHTS_NAME
    assert _config(path)["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's values: still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterFormatError, match="adapter.safetensors' does not match the checksum recorded in adapter_config.json: the file is damaged"):
        peftkit.load(tiny_llama(), path)


def test_adapters_without_checksum_still_load(saved):
    tuned, path = saved
    config = _config(path)
    del config["weights_sha256"]
    (path / serialization.CONFIG_NAME).write_text(json.dumps(config))
    loaded = peftkit.load(tiny_llama(), path)
    assert all(torch.equal(v, tuned.adapter_state_dict()[k]) for k, v in loaded.adapter_state_dict().items())


def test_checksum_of_the_wrong_form_is_a_format_error(saved):
    _, path = saved
    config = _config(path)
    config["weights_sha256"] = "not a digest"
    (path / serialization.CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="weights_sha256='not a digest' \\(expected 64 hex digits\\)"):
        peftkit.load(tiny_llama(), path)


def test_peft_import_refuses_non_finite_tensors(saved, tmp_path):
    tuned, _ = saved
    peft_dir = export_peft(tuned, tmp_path / "peft")
    tensors = serialization.load_file(str(peft_dir / "adapter_model.safetensors"))
    next(iter(tensors.values()))[0] = float("nan")
    serialization.save_file(tensors, str(peft_dir / "adapter_model.safetensors"))
    model = tiny_llama()
    with pytest.raises(AdapterFormatError, match="non-finite"):
        import_peft(model, peft_dir)
    assert all(type(m).__name__ != "LoraLayer" for m in model.modules())


# ------------------------------------------------------------ 3. huge shapes
def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_huge_rank_in_config_is_refused_before_allocating(saved):
    _, path = saved
    config = _config(path)
    config["options"]["r"] = 10**12  # 128 TB of lora_A/lora_B
    (path / serialization.CONFIG_NAME).write_text(json.dumps(config))
    model = tiny_llama()
    peak = _peak_rss_mib()
    with pytest.raises(PeftkitError) as info:
        peftkit.load(model, path)
    assert _peak_rss_mib() - peak < 200
    text = str(info.value)
    assert "adapter_config.json" in text and str(path) in text and "1000000000000" in text


@pytest.mark.parametrize(
    "method,options,edit,key",
    [
        ("lora", {"r": 2, "target_modules": ["q_proj"]}, {"r": 4}, LORA_A),
        ("prompt_tuning", {"num_virtual_tokens": 4}, {"num_virtual_tokens": 6}, "attached.prompt_embeddings"),
        ("p_tuning", {"num_virtual_tokens": 4}, {"num_virtual_tokens": 6}, "attached.prompt_embeddings"),
    ],
)
def test_options_that_do_not_match_the_weights_are_refused_before_injecting(
    tmp_path, register_plugin, method, options, edit, key
):
    path = tmp_path / "adapter"
    peftkit.wrap(tiny_llama(), method, **options).save(path)
    config = _config(path)
    config["options"].update(edit)
    (path / serialization.CONFIG_NAME).write_text(json.dumps(config))
    injected = []

    class Spy:
        @peftkit.hookimpl
        def peftkit_after_inject(self, model, adapter_name, method):
            injected.append(adapter_name)

    register_plugin(Spy(), name="spy")
    model = tiny_llama()
    with pytest.raises(AdapterFormatError) as info:
        peftkit.load(model, path)
    text = str(info.value)
    assert "adapter_config.json" in text and key in text and "nothing was allocated" in text
    assert injected == [], "the real injection never ran"


@dataclass
class VectorOptions:
    size: int = 4


class VectorLayer(nn.Module):
    """A minimal attached adapter: one vector of ``size`` values (no cap on ``size``)."""

    def __init__(self, name: str, size: int, created: list[str]):
        super().__init__()
        self.vector = nn.Parameter(torch.zeros(size))
        created.append(type(self.vector.data).__name__)
        self.name = name

    def adapter_names(self) -> list[str]:
        return [self.name]

    def set_active_adapters(self, names: Sequence[str]) -> None:
        pass

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield self.vector

    def adapter_state_dict(self, name: str, *, training: bool = False) -> dict[str, torch.Tensor]:
        return {"vector": self.vector}

    def load_adapter_state_dict(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.vector.copy_(state["vector"])

    def delete_adapter(self, name: str) -> None:
        self.name = None

    def merge(self, name: str) -> None:
        pass

    def unmerge(self, name: str) -> None:
        pass


def test_a_third_party_method_without_caps_gets_the_same_shape_check(tmp_path, register_plugin):
    created: list[str] = []

    class VectorInjector:
        name, description, options, supports_merge = "vector_test", "one vector", VectorOptions, False

        def inject(self, context, options):
            context.attach(VectorLayer(context.adapter_name, options.size, created))

    class Plugin:
        @peftkit.hookimpl
        def peftkit_register_injectors(self, register):
            register(VectorInjector())

    register_plugin(Plugin(), name="vector-test")
    path = tmp_path / "adapter"
    peftkit.wrap(tiny_llama(), "vector_test").save(path)
    config = _config(path)
    config["options"]["size"] = 10**12  # 4 TB
    (path / serialization.CONFIG_NAME).write_text(json.dumps(config))
    created.clear()
    with pytest.raises(AdapterFormatError, match=r"'attached.vector': the options make shape \(1000000000000,\) .* hold \(4,\)"):
        peftkit.load(tiny_llama(), path)
    assert created == ["FakeTensor"], "only the rehearsal ran, on fake tensors"


# --------------------------------------------------------- 4. all or nothing
def _state(tuned):
    return {
        "modules": [(n, type(m).__name__) for n, m in tuned.named_modules()],
        "tensors": {k: v.clone() for k, v in tuned.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in tuned.named_parameters()},
        "training": {n: m.training for n, m in tuned.named_modules()},
        "adapters": dict(tuned.adapters),
        "active": tuned.active_adapter,
    }


def _assert_same(before, after):
    assert after["modules"] == before["modules"]
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    for key in ("requires_grad", "training", "adapters", "active"):
        assert after[key] == before[key], key


class _Refuse(Exception):
    pass


@pytest.fixture
def failing_after_inject(register_plugin):
    class Failing:
        @peftkit.hookimpl
        def peftkit_after_inject(self, model, adapter_name, method):
            if adapter_name == "new":
                raise KeyboardInterrupt  # not even an Exception: rolled back all the same

    register_plugin(Failing(), name="failing")


@pytest.fixture(params=["fresh", "holding-another"])
def target(request):
    tuned = peftkit.TunedModel(tiny_llama())
    if request.param == "holding-another":
        tuned.add_adapter("first", "lora", r=2, target_modules=["q_proj", "v_proj"])
        tuned.add_adapter("second", "prompt_tuning", num_virtual_tokens=3, trainable=False)
        tuned.eval()
        tuned.base_model.model.layers[0].train()  # modes differ per module: each must come back
    return tuned


@pytest.mark.parametrize("method,options", [("lora", {"r": 2, "target_modules": ["q_proj"]}), ("prompt_tuning", {"num_virtual_tokens": 2})])
def test_add_adapter_rolls_back_when_after_inject_raises(target, failing_after_inject, method, options):
    before = _state(target)
    with pytest.raises(KeyboardInterrupt):
        target.add_adapter("new", method, **options)
    _assert_same(before, _state(target))


@pytest.mark.parametrize("method,options", [("lora", {"r": 2, "target_modules": ["q_proj"]}), ("prompt_tuning", {"num_virtual_tokens": 2})])
def test_load_adapter_rolls_back_when_filling_fails(target, tmp_path, method, options):
    path = tmp_path / "adapter"
    peftkit.wrap(tiny_llama(), method, **options).save(path)
    tensors = _tensors(path)
    tensors["model.layers.0.not_a_module.weight"] = torch.zeros(1)  # fails after injection, while filling
    _rewrite(path, tensors)
    before = _state(target)
    with pytest.raises(AdapterFormatError, match="no module of this model takes"):
        target.load_adapter(path, "new")
    _assert_same(before, _state(target))


def test_load_adapter_rolls_back_when_after_inject_raises(target, failing_after_inject, saved):
    _, path = saved
    before = _state(target)
    with pytest.raises(KeyboardInterrupt):
        target.load_adapter(path, "new")
    _assert_same(before, _state(target))


def test_peftkit_load_and_import_peft_leave_a_plain_model_as_it_was(saved, failing_after_inject, tmp_path):
    tuned, path = saved
    peft_dir = export_peft(tuned, tmp_path / "peft")
    model = tiny_llama()
    model.model.layers[1].train(not model.training)  # modes differ per module: each must come back
    before = {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }
    for attempt in (lambda: peftkit.load(model, path, adapter_name="new"), lambda: import_peft(model, peft_dir, adapter_name="new")):
        with pytest.raises(KeyboardInterrupt):
            attempt()
        assert [(n, type(m).__name__) for n, m in model.named_modules()] == before["modules"]
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before["requires_grad"]
        assert {n: m.training for n, m in model.named_modules()} == before["training"]


@pytest.mark.parametrize("shape", [float("nan"), "32x32", [32.0, 32], None, [True, 1]])
def test_a_fingerprint_shape_that_is_not_a_list_of_sizes_is_a_format_error(saved, shape):
    _, path = saved
    config = _config(path)
    module = next(iter(config["base_model"]["targets"]))
    config["base_model"]["targets"][module] = shape
    (path / serialization.CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match=rf"base_model.targets\['{module}'\]=.* \(expected a list of sizes\)"):
        peftkit.load(tiny_llama(), path)
