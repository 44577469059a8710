"""Saving and loading a scalar head next to its adapter, and scoring (prompt, response) pairs.

A reward model is saved as ONE directory: the adapter exactly as
:meth:`peftkit.TunedModel.save` writes it, plus ``reward_head.safetensors``
(the head's ``weight``/``bias``, its hidden size in the file's metadata).
Keeping the head out of the adapter's own tensors means the directory is still
a plain adapter (``peftkit.load`` and the peft export read it and ignore the
head), and the head never has to be a fake adapter layer of the core.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.errors import AdapterFormatError
from peftkit_plugins.reward.formatting import encode_prompt, encode_response
from peftkit_plugins.reward.head import ScalarHead, heads_of, sequence_scores

__all__ = ["HEAD_FILE", "save_head", "load_head", "save_reward_model", "load_reward_model", "score"]

HEAD_FILE = "reward_head.safetensors"


def save_head(head: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``head`` to ``directory/reward_head.safetensors`` (atomically: temp file + rename)."""
    path = Path(directory) / HEAD_FILE
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    # One metadata key: safetensors writes several in hash order, and then equal heads give different bytes.
    save_file(tensors, str(tmp), metadata={"hidden_size": str(head.weight.shape[1])})
    os.replace(tmp, path)
    return path


def load_head(directory: str | os.PathLike) -> ScalarHead:
    """Read the head saved by :func:`save_head` (on the CPU)."""
    path = Path(directory) / HEAD_FILE
    if not path.is_file():
        raise AdapterFormatError(
            f"{str(directory)!r} has no {HEAD_FILE}: it is not a reward model directory "
            "(train one with `objective.name: reward`, which saves adapter + head together)"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{str(path)!r} is corrupt or not a safetensors file ({exc}); train or save the reward model again") from None
    problem = _head_problem(tensors)
    if problem:
        raise AdapterFormatError(f"{str(path)!r} is not a usable reward head: {problem}; train or save the reward model again")
    head = ScalarHead(int(tensors["weight"].shape[1]))
    head.load_state_dict(tensors)
    return head


def _head_problem(tensors: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with a saved head's tensors (keys, shapes, dtypes, values), or ``None``."""
    if set(tensors) != {"weight", "bias"}:
        return f"it holds tensors {sorted(tensors)}, expected ['bias', 'weight']"
    weight, bias = tensors["weight"], tensors["bias"]
    if weight.dim() != 2 or weight.shape[0] != 1 or tuple(bias.shape) != (1,):
        return f"weight has shape {tuple(weight.shape)} and bias {tuple(bias.shape)}, expected (1, hidden size) and (1,)"
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            return f"{key} has dtype {tensor.dtype}, expected a floating-point dtype"
        if not torch.isfinite(tensor).all():
            return f"{key} holds NaN or inf values"
    return None


def save_reward_model(tuned: Any, directory: str | os.PathLike, *, adapter_name: str, head_name: str | None = None, training: bool = False) -> Path:
    """Save adapter ``adapter_name`` and head ``head_name`` (default: the same name) into ``directory``."""
    tuned.save(directory, adapter_name=adapter_name, training=training)
    return save_head(heads_of(tuned)[head_name or adapter_name], directory).parent


def load_reward_model(tuned: Any, directory: str | os.PathLike, name: str = "reward", *, trainable: bool = False) -> ScalarHead:
    """Load a reward model directory onto ``tuned`` as adapter ``name`` with head ``heads[name]``.

    :returns: the head (already on the model's device and dtype, frozen unless ``trainable``).
    """
    tuned.load_adapter(directory, name, is_trainable=trainable)
    head = load_head(directory)
    param = next(tuned.base_model.parameters())
    head.to(device=param.device, dtype=param.dtype if param.is_floating_point() else torch.float32)
    head.requires_grad_(trainable)
    heads_of(tuned)[name] = head
    return head


@torch.no_grad()
def score(tuned: Any, head: nn.Module, tokenizer: Any, prompt: str, response: str, *, chat_template: bool = True) -> float:
    """The reward of ``response`` to ``prompt`` under ``tuned``'s active adapter and ``head``."""
    ids = encode_prompt(tokenizer, prompt, chat_template=chat_template) + encode_response(tokenizer, response)
    device = next(head.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    return float(sequence_scores(tuned, head, input_ids, torch.ones_like(input_ids))[0])
