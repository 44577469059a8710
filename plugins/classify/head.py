"""The label head of a classifier, and saving it next to its adapter with its label names.

A classifier is the frozen base + an adapter + ``p(y | x) = softmax(W h_last + b)``
on the decoder's last hidden state of the last real token (the end token after
the text), the reward model's head with one output per label
(:class:`peftkit_plugins.reward.head.LinearHead`; Radford et al., 2018, GPT-1,
Sec. 3.2). It lives in the tuned model's ``heads`` ModuleDict under the
adapter's name, and is saved as ``classify_head.safetensors`` beside the
adapter: ``weight`` ``(C, H)``, ``bias`` ``(C,)``, the label names (JSON) in
the file's metadata, so inference maps output ``i`` back to ``labels[i]``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from peftkit.errors import AdapterFormatError
from peftkit_plugins.reward.head import LinearHead, heads_of

__all__ = ["HEAD_FILE", "LabelHead", "attach_label_head", "load_label_head", "save_label_head"]

HEAD_FILE = "classify_head.safetensors"


class LabelHead(LinearHead):
    """``nn.Linear(hidden_size, len(labels))`` with the reward head's small init, and the label names it predicts."""

    def __init__(self, hidden_size: int, labels: Sequence[str], *, generator: torch.Generator | None = None):
        super().__init__(hidden_size, len(labels), generator=generator)
        self.labels = list(labels)


def attach_label_head(tuned: nn.Module, labels: Sequence[str], name: str | None = None, *, seed: int = 0) -> LabelHead:
    """Create (or return the existing) trainable head ``heads[name]`` for adapter ``name`` (default: the active one)."""
    name = name or tuned.active_adapter
    heads = heads_of(tuned)
    if name not in heads:
        head = LabelHead(int(tuned.config.hidden_size), labels, generator=torch.Generator().manual_seed(seed))
        param = next(p for p in tuned.base_model.parameters() if p.is_floating_point())
        heads[name] = head.to(device=param.device, dtype=param.dtype)
    return heads[name]


def save_label_head(head: LabelHead, directory: str | os.PathLike) -> Path:
    """Write ``head`` and its labels to ``directory/classify_head.safetensors`` (atomically: temp file + rename)."""
    path = Path(directory) / HEAD_FILE
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
    # One metadata key: safetensors writes several in hash order, and then equal heads give different bytes.
    save_file(tensors, str(tmp), metadata={"labels": json.dumps(head.labels)})
    os.replace(tmp, path)
    return path


def load_label_head(directory: str | os.PathLike) -> LabelHead:
    """Read the head saved by :func:`save_label_head` (on the CPU, float as saved).

    :raises AdapterFormatError: if the file is missing, corrupt, or its tensors do not fit its labels.
    """
    path = Path(directory) / HEAD_FILE
    if not path.is_file():
        raise AdapterFormatError(
            f"{str(directory)!r} has no {HEAD_FILE}: it is not a classifier directory "
            "(train one with `objective.name: classify`, which saves adapter + head together)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            labels = json.loads((f.metadata() or {}).get("labels", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{str(path)!r} is corrupt or not a safetensors file ({exc}); train the classifier again") from None
    problem = _head_problem(tensors, labels)
    if problem:
        raise AdapterFormatError(f"{str(path)!r} is not a usable label head: {problem}; train the classifier again")
    head = LabelHead(int(tensors["weight"].shape[1]), labels).to(tensors["weight"].dtype)
    head.load_state_dict(tensors)
    return head


def _head_problem(tensors: dict[str, torch.Tensor], labels: object) -> str | None:
    """What is wrong with a saved head (labels, keys, shapes, dtypes, values), or ``None``."""
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        return f"its metadata 'labels' is {labels!r}, expected a list of at least 2 label names"
    if set(tensors) != {"weight", "bias"}:
        return f"it holds tensors {sorted(tensors)}, expected ['bias', 'weight']"
    weight, bias = tensors["weight"], tensors["bias"]
    if weight.dim() != 2 or weight.shape[0] != len(labels) or tuple(bias.shape) != (len(labels),):
        return f"weight has shape {tuple(weight.shape)} and bias {tuple(bias.shape)}, expected ({len(labels)}, hidden size) and ({len(labels)},) for {len(labels)} labels"
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            return f"{key} has dtype {tensor.dtype}, expected a floating-point dtype"
        if not torch.isfinite(tensor).all():
            return f"{key} holds NaN or inf values"
    return None
