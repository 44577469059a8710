"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_example_runs(tmp_path, monkeypatch):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    assert len(code.strip().splitlines()) <= 12
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "my-adapter" / "adapter.safetensors").is_file()
    assert namespace["again"].adapters == {"default": "lora"}


def _section_blocks(title: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end != -1 else None], re.S)


def test_trainer_example_runs(tmp_path, monkeypatch):
    """The transformers.Trainer snippet: trains, checkpoints and saves an adapter that loads back."""
    pytest.importorskip("datasets")
    blocks = _section_blocks("Use with transformers.Trainer / TRL")
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    for directory in ("trainer-run", "trainer-run/checkpoint-2", "trainer-run/checkpoint-4"):
        assert (tmp_path / directory / "adapter.safetensors").is_file(), directory
    assert not (tmp_path / "trainer-run" / "model.safetensors").exists()
    assert namespace["again"].adapters == {"default": "lora"}


@pytest.mark.slow
def test_trl_examples_run(tmp_path, monkeypatch):
    """The SFTTrainer and DPOTrainer snippets (one namespace, in order), each saving an adapter."""
    pytest.importorskip("trl")
    import peftkit
    from peftkit.testing import tiny_llama

    blocks = _section_blocks("Use with transformers.Trainer / TRL")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block, run, method in ((blocks[1], "sft-run", "prompt_tuning"), (blocks[2], "dpo-run", "lora")):
        exec(compile(block, "README.md", "exec"), namespace)
        assert peftkit.load(tiny_llama(), tmp_path / run).adapters == {"default": method}
