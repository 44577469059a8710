"""Damaged adapter folders: whatever is wrong with adapter_config.json or adapter.safetensors, loading gives one
PeftkitError (never another exception) and leaves the model as it was."""

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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for method, options in METHODS.items():
        peftkit.wrap(tiny_llama(), method, **options).save(root / method)
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


def _damage_weights(folder: Path, config: dict, rng: random.Random) -> None:
    """Truncate, overwrite or flip bytes of the weights file; drop the checksum so the deeper checks are reached."""
    config.pop("weights_sha256", None)
    weights = bytearray((folder / WEIGHTS_NAME).read_bytes())
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
    (folder / WEIGHTS_NAME).write_bytes(bytes(weights))


def _run(saved: Path, tmp_path: Path, seed: int, count: int) -> None:
    rng = random.Random(seed)
    for i in range(count):
        method = rng.choice(list(METHODS))
        folder = tmp_path / f"m{i}"
        shutil.copytree(saved / method, folder)
        config = json.loads((folder / CONFIG_NAME).read_text())
        for _ in range(rng.randint(0 if rng.random() < 0.3 else 1, 3)):
            _mutate(config, rng)
        if rng.random() < 0.4:
            _damage_weights(folder, config, rng)
        (folder / CONFIG_NAME).write_text(json.dumps(config))
        model = tiny_llama()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            peftkit.load(model, folder)
        except PeftkitError:
            # the model is as it was: same modules, same weights
            assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys(), (method, config)
            assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), (method, config)
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{method}: {type(exc).__name__}: {exc}\nconfig: {json.dumps(config)[:500]}")
        shutil.rmtree(folder)


def test_damaged_adapters_fail_with_one_peftkit_error(saved, tmp_path):
    _run(saved, tmp_path, seed=0, count=150)


@pytest.mark.slow
def test_many_more_damaged_adapters_fail_with_one_peftkit_error(saved, tmp_path):
    _run(saved, tmp_path, seed=1, count=1500)
