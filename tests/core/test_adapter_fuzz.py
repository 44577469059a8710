"""Damaged adapter folders: whatever is wrong with the config or the weights file, ``peftkit.load`` (peftkit's format)
and ``peftkit.import_peft`` (peft's) give one PeftkitError (never another exception) and leave the model as it was."""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.errors import PeftkitError
from peftkit.interop import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from peftkit.serialization import CONFIG_NAME, WEIGHTS_NAME
from peftkit.testing import tiny_llama

METHODS = {
    "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
    "ia3": {},
    "adapter": {},
    "prompt_tuning": {"num_virtual_tokens": 3},
    "p_tuning": {"num_virtual_tokens": 3},
    "prefix_tuning": {"num_virtual_tokens": 3},
}
VALUES = [None, True, 0, -1, 10**12, 2**70, 1.5, float("nan"), float("inf"), "", "x" * 1000, "\x00", [], [1], {},
          {"a": 1}, [[[[[]]]]], "q_proj", ["nope"], [16, 32], [-1, 2**40]]


#: The peft format has no bottleneck adapters.
PEFT_METHODS = [m for m in METHODS if m != "adapter"]
# (save, load, config file, weights file) of each format
FORMATS = {
    "peftkit": (lambda tuned, path: tuned.save(path), peftkit.load, CONFIG_NAME, WEIGHTS_NAME),
    "peft": (peftkit.export_peft, peftkit.import_peft, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for fmt, (save, _, _, _) in FORMATS.items():
        for method in PEFT_METHODS if fmt == "peft" else METHODS:
            save(peftkit.wrap(tiny_llama(), method, **METHODS[method]), root / fmt / method)
    return root


def _mutate(node, rng: random.Random, depth: int = 0) -> None:
    """Delete, replace or descend into one entry of a JSON value."""
    if isinstance(node, dict) and node:
        key = rng.choice(list(node))
        roll = rng.random()
        if roll < 0.2:
            del node[key]
        elif roll < 0.6 or depth > 3:
            node[key] = copy.deepcopy(rng.choice(VALUES))
        else:
            _mutate(node[key], rng, depth + 1)
    elif isinstance(node, list) and node:
        if rng.random() < 0.5:
            node[rng.randrange(len(node))] = copy.deepcopy(rng.choice(VALUES))
        else:
            node.append(copy.deepcopy(rng.choice(VALUES)))


def _damage_weights(weights_file: Path, config: dict, rng: random.Random) -> None:
    """Truncate, overwrite or flip bytes of the weights file; drop the checksum so the deeper checks are reached."""
    config.pop("weights_sha256", None)
    weights = bytearray(weights_file.read_bytes())
    roll = rng.random()
    if roll < 0.3:
        weights = weights[: rng.randrange(len(weights))]
    elif roll < 0.6:  # inside the JSON header: names, dtypes, shapes, offsets
        header = int.from_bytes(weights[:8], "little")
        for _ in range(rng.randint(1, 4)):
            weights[8 + rng.randrange(header)] = rng.randrange(32, 127)
    else:  # tensor data: any bit pattern, NaN and inf included
        for _ in range(rng.randint(1, 8)):
            weights[rng.randrange(len(weights))] = rng.randrange(256)
    weights_file.write_bytes(bytes(weights))


def _run(saved: Path, tmp_path: Path, fmt: str, seed: int, count: int) -> None:
    _, load, config_name, weights_name = FORMATS[fmt]
    rng = random.Random(seed)
    for i in range(count):
        method = rng.choice(PEFT_METHODS if fmt == "peft" else list(METHODS))
        folder = tmp_path / f"m{i}"
        shutil.copytree(saved / fmt / method, folder)
        config = json.loads((folder / config_name).read_text())
        for _ in range(rng.randint(0 if rng.random() < 0.3 else 1, 3)):
            _mutate(config, rng)
        if rng.random() < 0.4:
            _damage_weights(folder / weights_name, config, rng)
        (folder / config_name).write_text(json.dumps(config))
        model = tiny_llama()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            load(model, folder)
        except PeftkitError:
            # the model is as it was: same modules, same weights
            assert model.state_dict().keys() == before.keys(), (method, config)
            assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), (method, config)
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{fmt} {method}: {type(exc).__name__}: {exc}\nconfig: {json.dumps(config)[:500]}")
        shutil.rmtree(folder)


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_adapters_fail_with_one_peftkit_error(saved, tmp_path, fmt):
    _run(saved, tmp_path, fmt, seed=0, count=150)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_many_more_damaged_adapters_fail_with_one_peftkit_error(saved, tmp_path, fmt):
    _run(saved, tmp_path, fmt, seed=1, count=1000)
