"""``peftkit export``, ``import`` and ``merge`` on tiny models saved to disk (a local folder as the base model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.cli import main
from peftkit.testing import tiny_llama, tiny_tokenizer

IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 100, 3], [1, 7, 7, 40, 2, 90, 12, 6]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _load_base(base_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _adapter(base_dir: Path, folder: Path, method: str, **options) -> Path:
    """A saved adapter whose weights all differ from their initial values (so it visibly changes the logits),
    with its base model recorded as ``peftkit train`` records it."""
    tuned = peftkit.wrap(_load_base(base_dir), method, **options)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in tuned.named_trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    tuned.save(folder)
    (folder / "base_model.txt").write_text(f"{base_dir}\n")
    return folder


def _unmerged_logits(base_dir: Path, adapter: Path) -> torch.Tensor:
    return _logits(peftkit.load(_load_base(base_dir), adapter))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("peftkit: error: "), err
    return err[-1]


# ------------------------------------------------------------------ merge
_PLAIN_TRANSFORMERS = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    ids = torch.tensor({ids})
    out = {{}}
    for folder in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        AutoTokenizer.from_pretrained(folder)
        GenerationConfig.from_pretrained(folder)
        with torch.no_grad():
            out[folder] = (str(model.dtype), model(input_ids=ids).logits.float())
    assert not any(name == "peftkit" or name.startswith(("peftkit.", "peftkit_plugins")) for name in sys.modules), "peftkit was imported"
    torch.save(out, sys.argv[1])
    """
).format(ids=IDS.tolist())


def test_merge_writes_a_transformers_model_with_the_adapters_logits(base_dir, tmp_path, capsys):
    adapter = _adapter(base_dir, tmp_path / "lora", "lora", r=4)
    expected = _unmerged_logits(base_dir, adapter)
    assert (expected - _logits(_load_base(base_dir))).abs().max() > 0.05  # the adapter matters
    before = _snapshot(adapter)
    fp32, bf16 = tmp_path / "merged-fp32", tmp_path / "merged-bf16"
    assert main(["merge", str(adapter), "--out", str(fp32), "--max-shard-size", "100KB"]) == 0
    captured = capsys.readouterr()
    assert "merged: " in captured.out and "AutoModelForCausalLM.from_pretrained" in captured.out
    assert "loading base model" in captured.err and "merging adapter" in captured.err and "writing" in captured.err
    assert main(["merge", str(adapter), "--out", str(bf16), "--dtype", "bf16"]) == 0
    assert _snapshot(adapter) == before  # the input is only read

    files = {p.name for p in fp32.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer_config.json"} <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1  # sharded as asked
    config = json.loads((fp32 / "config.json").read_text())
    assert "quantization_config" not in config and "peft" not in json.dumps(config).lower()

    for folder, dtype, tolerance in ((fp32, torch.float32, 1e-5), (bf16, torch.bfloat16, 0.03)):
        merged = _load_base(folder)
        assert merged.dtype == dtype
        # bfloat16 keeps 8 bits of mantissa: the tiny model's logits (|x| < 0.4) move by ~0.01 (measured 0.0102)
        assert (_logits(merged) - expected).abs().max() < tolerance, folder


@pytest.mark.slow
def test_the_merged_model_loads_in_a_process_without_peftkit(base_dir, tmp_path):
    adapter = _adapter(base_dir, tmp_path / "lora", "lora", r=4)
    expected = _unmerged_logits(base_dir, adapter)
    fp32, bf16 = tmp_path / "merged-fp32", tmp_path / "merged-bf16"
    assert main(["merge", str(adapter), "--out", str(fp32), "--max-shard-size", "100KB"]) == 0
    assert main(["merge", str(adapter), "--out", str(bf16), "--dtype", "bf16"]) == 0
    result = tmp_path / "logits.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", _PLAIN_TRANSFORMERS, str(result), str(fp32), str(bf16)], check=True, env=env, cwd=tmp_path)
    got = torch.load(result)
    dtype, logits = got[str(fp32)]
    assert dtype == "torch.float32" and (logits - expected).abs().max() < 1e-5
    dtype, logits = got[str(bf16)]
    assert dtype == "torch.bfloat16" and (logits - expected).abs().max() < 0.03


@pytest.mark.parametrize(
    ("method", "options"),
    [("ia3", {}), ("qlora", {"r": 4})],
)
def test_merge_of_other_weight_side_methods(method, options, base_dir, tmp_path):
    if method not in peftkit.available_methods():
        pytest.skip(f"{method} is not installed")
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    adapter = _adapter(base_dir, tmp_path / method, method, **options)
    expected = _unmerged_logits(base_dir, adapter)  # qlora: on its 4-bit base
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # qlora: merged into a dequantized base
    assert (_logits(merged) - expected).abs().max() < 1e-5


def test_merge_of_qlora_trained_on_a_base_loaded_in_4_bit(base_dir, tmp_path):
    """``peftkit train`` loads a QLoRA base already quantized (the method's from_pretrained keywords); merge
    quantizes a float32 load in place instead: the same NF4 codes, so the same model within float32 rounding."""
    if "qlora" not in peftkit.available_methods():
        pytest.skip("qlora is not installed")
    pytest.importorskip("bitsandbytes")
    from peftkit.options import build_options
    from peftkit.training.models import load_model_and_tokenizer

    pm = peftkit.plugin_manager()
    load_kwargs = pm.model_load_kwargs("qlora", build_options(pm.get_injector("qlora").options, {"r": 4}))
    model, _ = load_model_and_tokenizer(str(base_dir), load_kwargs=load_kwargs)
    tuned = peftkit.wrap(model, "qlora", r=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in tuned.named_trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    expected = _logits(tuned.eval())
    tuned.save(tmp_path / "qlora")
    (tmp_path / "qlora" / "base_model.txt").write_text(f"{base_dir}\n")
    assert main(["merge", str(tmp_path / "qlora"), "--out", str(tmp_path / "merged")]) == 0
    assert (_logits(_load_base(tmp_path / "merged")) - expected).abs().max() < 1e-5  # measured 3.1e-6


@pytest.mark.parametrize(
    ("method", "options", "reason", "instead"),
    [
        ("adapter", {"bottleneck_size": 4}, "nonlinear", "load it with peftkit.load"),
        ("prompt_tuning", {"num_virtual_tokens": 3}, "", "peftkit export"),
        ("prefix_tuning", {"num_virtual_tokens": 3}, "", "peftkit export"),
    ],
)
def test_merge_refuses_methods_that_cannot_merge_with_the_reason(method, options, reason, instead, base_dir, tmp_path, capsys, monkeypatch):
    import peftkit.training.models as models

    if method not in peftkit.available_methods():
        pytest.skip(f"{method} is not installed")
    adapter = _adapter(base_dir, tmp_path / method, method, **options)
    monkeypatch.setattr(models, "load_model_and_tokenizer", _fail_if_loaded)
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged")]) == 2
    error = _one_error(capsys)
    injector = peftkit.plugin_manager().get_injector(method)
    assert f"method {method!r} cannot be merged: {injector.merge_refusal}" in error
    assert reason in error and instead in error
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_merge_with_the_embedded_model_alias_as_base(tmp_path):
    """The embedded model works as the base: its converted folder, its ChatML tokenizer, loadable without peftkit."""
    from peftkit.training.models import ModelNotAvailableError, load_model_and_tokenizer

    try:
        model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    except ModelNotAvailableError as exc:
        pytest.skip(str(exc))
    tuned = peftkit.wrap(model, "lora", r=4, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in tuned.named_trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    tuned.save(tmp_path / "adapter")
    (tmp_path / "adapter" / "base_model.txt").write_text("smollm2-135m-instruct\n")
    tokenizer.save_pretrained(tmp_path / "adapter" / "tokenizer")
    expected = _logits(tuned.eval())
    del tuned, model
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), "--dtype", "bf16"]) == 0
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged32")]) == 0  # the alias's own dtype: float32
    result = tmp_path / "logits.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    folders = [str(tmp_path / "merged32"), str(tmp_path / "merged")]
    subprocess.run([sys.executable, "-c", _PLAIN_TRANSFORMERS, str(result), *folders], check=True, env=env, cwd=tmp_path)
    got = torch.load(result)
    dtype, logits = got[folders[0]]
    # float32 rounding through 30 layers (W + s B A vs W x + s B (A x)): measured max 9e-4 on logits up to ~40
    assert dtype == "torch.float32" and (logits - expected).abs().max() < 1e-4 * expected.abs().max()
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    dtype, logits = got[folders[1]]
    assert dtype == "torch.bfloat16" and (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8
    assert "im_start" in (tmp_path / "merged" / "chat_template.jinja").read_text()


# ------------------------------------------------------------------ export / import


@pytest.mark.parametrize(("method", "options"), [("lora", {"r": 4}), ("prompt_tuning", {"num_virtual_tokens": 3})])
def test_export_then_peft_loads_it_with_identical_logits(method, options, base_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    adapter = _adapter(base_dir, tmp_path / method, method, **options)
    expected = _unmerged_logits(base_dir, adapter)
    assert main(["export", str(adapter), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert "exported: " in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    reference = peft.PeftModel.from_pretrained(_load_base(base_dir), tmp_path / "peft").eval()
    got = _logits(reference)[:, -IDS.shape[1] :]  # peft's prompt tuning also returns the virtual tokens' positions
    assert (got - expected).abs().max() < 1e-5


def test_import_then_peftkit_loads_it_and_records_the_base(base_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(_load_base(base_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name:
                p.normal_()
    reference.save_pretrained(tmp_path / "peft")
    expected = _logits(reference.eval())
    # a hub id this machine cannot reach: --model names the local copy
    config_file = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "someone/tiny-llama-not-here"
    config_file.write_text(json.dumps(config))
    before = _snapshot(tmp_path / "peft")
    assert main(["import", str(tmp_path / "peft"), "--out", str(tmp_path / "imported"), "--model", str(base_dir)]) == 0
    assert "imported: " in capsys.readouterr().out
    assert _snapshot(tmp_path / "peft") == before
    assert (tmp_path / "imported" / "base_model.txt").read_text() == f"{base_dir.resolve()}\n"
    tuned = peftkit.load(_load_base(base_dir), tmp_path / "imported")
    assert tuned.adapters == {"default": "lora"}
    assert (_logits(tuned) - expected).abs().max() < 1e-5
    # the recorded base is what export and merge use next, without --model
    assert main(["merge", str(tmp_path / "imported"), "--out", str(tmp_path / "merged")]) == 0
    assert (_logits(_load_base(tmp_path / "merged")) - expected).abs().max() < 1e-5


def test_export_refuses_a_method_without_a_peft_equivalent(base_dir, tmp_path, capsys, monkeypatch):
    import peftkit.training.models as models

    adapter = _adapter(base_dir, tmp_path / "bottleneck", "adapter", bottleneck_size=4)
    monkeypatch.setattr(models, "load_model_and_tokenizer", _fail_if_loaded)
    assert main(["export", str(adapter), "--out", str(tmp_path / "peft")]) == 2
    error = _one_error(capsys)
    assert "method 'adapter' has no Hugging Face peft equivalent" in error and "cannot be merged either" in error


# ------------------------------------------------------------------ one-line errors
def _fail_if_loaded(*args, **kwargs):
    raise AssertionError("the base model loaded before the inputs were checked")


def test_bad_inputs_are_one_line_errors_before_any_model_loads(base_dir, tmp_path, capsys, monkeypatch):
    import shutil

    import peftkit.training.models as models

    adapter = _adapter(base_dir, tmp_path / "run" / "adapter", "lora", r=4)
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (peft_dir / "adapter_model.safetensors").write_bytes(b"")
    flipped = tmp_path / "flipped"
    shutil.copytree(adapter, flipped)
    weights = bytearray((flipped / "adapter.safetensors").read_bytes())
    weights[-10] ^= 1
    (flipped / "adapter.safetensors").write_bytes(bytes(weights))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{not json")
    (bad_json / "adapter_model.safetensors").write_bytes(b"")
    no_base = tmp_path / "no-base"
    shutil.copytree(adapter, no_base)
    (no_base / "base_model.txt").unlink()
    out = str(tmp_path / "out")
    missing = str(tmp_path / "missing")
    cases = [
        (["merge", missing, "--out", out], f"adapter directory {missing!r} does not exist"),
        (["merge", str(adapter / "adapter.safetensors"), "--out", out], "is a file, not an adapter directory"),
        (["export", str(tmp_path / "run"), "--out", out], f"is a training run's output.dir; its adapter is {str(adapter)!r}"),
        (["merge", str(peft_dir), "--out", out], f"is a Hugging Face peft adapter, not a peftkit one: convert it first with `peftkit import {peft_dir}"),
        (["merge", str(flipped), "--out", out], "does not match the checksum recorded in adapter_config.json"),
        (["merge", str(no_base), "--out", out], "does not record its base model; pass --model NAME_OR_PATH"),
        (["merge", str(adapter), "--out", str(occupied)], "exists and is not empty; pass --force to replace it"),
        (["merge", str(adapter), "--out", str(adapter), "--force"], "overlaps the input"),
        (["export", str(adapter), "--out", str(tmp_path / "run"), "--force"], "overlaps the input"),
        (["merge", str(adapter), "--out", str(adapter / "inside")], "overlaps the input"),
        (["merge", str(adapter), "--out", str(base_dir), "--force"], f"overlaps the input {str(base_dir)!r}"),
        (["merge", str(adapter), "--out", str(occupied / "keep.txt")], "is a file; choose a directory path"),
        (["merge", str(adapter), "--out", out, "--model", missing], f"base model folder {missing!r} (--model) does not exist"),
        (["import", missing, "--out", out], f"peft adapter directory {missing!r} does not exist"),
        (["import", str(adapter), "--out", out], "is a peftkit adapter already"),
        (["import", str(tmp_path / "occupied"), "--out", out], "is not a peft adapter directory: adapter_config.json is missing"),
        (["import", str(bad_json), "--out", out], "is not valid JSON"),
        (["import", str(peft_dir), "--out", out], "does not name its base model (base_model_name_or_path); pass --model"),
        (["import", str(peft_dir), "--out", str(base_dir), "--model", str(base_dir), "--force"], "overlaps the input"),
    ]
    before = {folder: _snapshot(folder) for folder in (adapter, peft_dir, occupied, base_dir)}
    monkeypatch.setattr(models, "load_model_and_tokenizer", _fail_if_loaded)
    for argv, message in cases:
        assert main(argv) == 2, argv
        error = _one_error(capsys)
        assert message in error, (argv, error)
    assert all(_snapshot(folder) == content for folder, content in before.items())
    assert not Path(out).exists()


def test_a_missing_base_model_and_a_damaged_weights_file_are_one_line_errors(base_dir, tmp_path, capsys):
    adapter = _adapter(base_dir, tmp_path / "lora", "lora", r=4)
    (adapter / "base_model.txt").write_text("no-such-model-alias\n")
    assert main(["merge", str(adapter), "--out", str(tmp_path / "out")]) == 2
    error = _one_error(capsys)
    assert "cannot load model 'no-such-model-alias'" in error and "pass --model NAME_OR_PATH" in error
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(base_dir)}))
    (peft_dir / "adapter_model.safetensors").write_bytes(b"not safetensors")
    assert main(["import", str(peft_dir), "--out", str(tmp_path / "out")]) == 2
    assert "is corrupt or not a safetensors file" in _one_error(capsys)
    assert not (tmp_path / "out").exists()


def test_force_replaces_a_non_empty_output_and_bad_flags_are_usage_errors(base_dir, tmp_path, capsys):
    adapter = _adapter(base_dir, tmp_path / "lora", "lora", r=4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(["merge", str(adapter), "--out", str(out), "--force"]) == 0
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp") or p.name.endswith(".peftkit-old")]
    for argv in (["merge", str(adapter), "--out", str(out), "--dtype", "int8"], ["export", str(adapter), "--format", "gguf", "--out", "x"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
