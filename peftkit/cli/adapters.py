"""Commands that move adapters between formats: ``export``, ``import`` and ``merge``.

* ``peftkit export ADAPTER_DIR --format peft --out DIR``: a peftkit adapter as a
  Hugging Face ``peft`` adapter directory (:func:`peftkit.export_peft`);
* ``peftkit import PEFT_DIR --out DIR [--model M]``: a ``peft`` adapter as a
  peftkit adapter directory (:func:`peftkit.import_peft`), with the base model
  recorded beside it (``base_model.txt``) as ``peftkit train`` does;
* ``peftkit merge ADAPTER_DIR --out DIR [--dtype bf16|fp16|fp32]``: the adapter
  folded into its base model (:meth:`peftkit.TunedModel.merge_and_unload`), written
  as a plain transformers model directory (config, safetensors shards, tokenizer,
  generation config) that ``AutoModelForCausalLM.from_pretrained`` loads without
  peftkit. The merge runs in float32; ``--dtype`` only sets what is written
  (default: the base checkpoint's own dtype). QLoRA merges into a dequantized
  base: the 4-bit weights the adapter was trained on, dequantized, plus ``B A``.

The base model is the one the adapter records (``base_model.txt``, written by
``peftkit train`` and ``peftkit import``; for ``import``, the peft config's
``base_model_name_or_path``); ``--model`` names another (a folder, an alias such
as ``smollm2-135m-instruct``, or a hub id).

Every input is checked before the base model loads (the directory, its format
and checksum, the method's support for the command, the output directory), and
each problem is one error line (exit code 2). Inputs are only read. Outputs
are written atomically (:class:`peftkit.serialization.atomic_directory`): a
failed command leaves nothing, or the previous content with ``--force``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_subcommands", "DTYPES"]

#: ``--dtype`` values of ``merge`` and the torch dtype names they stand for.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
#: Files ``peftkit train`` writes into an adapter directory besides the adapter; anything else is an objective's extra.
_ADAPTER_FILES = {"adapter_config.json", "adapter.safetensors", "base_model.txt", "tokenizer"}


def _progress(message: str) -> None:
    """One line per long step, on stderr (stdout keeps the result line)."""
    print(f"peftkit: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------ inputs
def _read_adapter_dir(text: str) -> tuple[Path, dict[str, Any]]:
    """The peftkit adapter directory ``text`` and its config, checked (format, checksum) without loading a model.

    :raises AdapterFormatError: naming the directory, what is wrong and what to pass instead.
    """
    from peftkit.errors import AdapterFormatError
    from peftkit.interop import PEFT_WEIGHTS_NAME
    from peftkit.serialization import CONFIG_NAME, read_adapter

    path = Path(text)
    if not path.exists():
        raise AdapterFormatError(f"adapter directory {text!r} does not exist")
    if not path.is_dir():
        raise AdapterFormatError(f"{text!r} is a file, not an adapter directory")
    if not (path / CONFIG_NAME).is_file() and (path / "adapter" / CONFIG_NAME).is_file():
        raise AdapterFormatError(f"{text!r} is a training run's output.dir; its adapter is {str(path / 'adapter')!r}")
    if (path / PEFT_WEIGHTS_NAME).is_file() and _peft_type(path / CONFIG_NAME) is not None:
        raise AdapterFormatError(
            f"{text!r} is a Hugging Face peft adapter, not a peftkit one: convert it first with "
            f"`peftkit import {text} --out DIR`"
        )
    config, _ = read_adapter(path)
    return path, config


def _injector_of(adapter: Path, config: dict[str, Any]) -> Any:
    """The installed injector of the adapter's method.

    :raises UnknownMethodError: naming the adapter and its method.
    """
    from peftkit.errors import UnknownMethodError
    from peftkit.plugins import plugin_manager

    try:
        return plugin_manager().get_injector(config["method"])
    except UnknownMethodError as exc:
        raise UnknownMethodError(f"adapter {str(adapter)!r} was made with method {config['method']!r}: {exc}") from None


def _peft_type(config_file: Path) -> str | None:
    """The ``peft_type`` of a peft ``adapter_config.json`` (``None`` if it is not one)."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    value = config.get("peft_type") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def _output_dir(text: str, force: bool, inputs: list[Path]) -> Path:
    """``--out``, refused when it exists with content (unless ``force``) or overlaps an input (always).

    :raises PeftkitError: naming the directory and the fix.
    """
    from peftkit.errors import PeftkitError

    out = Path(text)
    resolved = out.resolve()
    for source in inputs:
        src = source.resolve()
        if resolved == src or resolved in src.parents or src in resolved.parents:
            raise PeftkitError(
                f"--out {text!r} overlaps the input {str(source)!r}; the input is never written to: choose another --out"
            )
    if out.exists() and not out.is_dir():
        raise PeftkitError(f"--out {text!r} is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PeftkitError(f"--out {text!r} exists and is not empty; pass --force to replace it, or choose another --out")
    return out


def _base_model_name(adapter: Path, given: str | None) -> str:
    """``--model``, else the base model recorded with the adapter."""
    from peftkit.training.models import recorded_base_model

    return given if given is not None else recorded_base_model(adapter)


def _folders(name: str) -> list[Path]:
    """The base model's folder, if ``name`` is one: an input that ``--out`` must not overwrite either."""
    path = Path(name).expanduser()
    return [path] if path.is_dir() else []


def _local_name(name: str) -> str:
    """``name`` as recorded for later use: an existing folder as an absolute path, anything else as given."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


def _load_base(name: str, *, from_where: str) -> tuple[Any, Any]:
    """The base model (float32) and its tokenizer.

    :param from_where: how ``name`` was chosen, for the error message.
    :raises ModelNotAvailableError: one line naming the model and ``--model``.
    """
    from peftkit.training.models import EMBEDDED_MODELS, ModelNotAvailableError, load_model_and_tokenizer

    folder = Path(name).expanduser()
    if name not in EMBEDDED_MODELS and (name.startswith(("/", ".", "~")) or folder.exists()) and not folder.is_dir():
        state = "is a file, not a model folder" if folder.exists() else "does not exist"
        raise ModelNotAvailableError(f"base model folder {name!r} ({from_where}) {state}; pass --model NAME_OR_PATH")
    _progress(f"loading base model {name} ({from_where})")
    try:
        return load_model_and_tokenizer(name, dtype="float32")
    except ModelNotAvailableError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelNotAvailableError(f"{first[:400]} ({from_where}); pass --model NAME_OR_PATH") from None


def _extras(adapter: Path) -> list[str]:
    """Files beside the adapter that an objective saved (a reward head, ...): no export or merge carries them."""
    return sorted(p.name for p in adapter.iterdir() if p.name not in _ADAPTER_FILES)


def _warn_extras(adapter: Path, what: str) -> None:
    extras = _extras(adapter)
    if extras:
        _progress(
            f"warning: {adapter} also holds {', '.join(extras)} (saved by the training objective, e.g. a reward "
            f"head); {what} does not include them"
        )


# ------------------------------------------------------------ export
def _cmd_export(args: argparse.Namespace) -> int:
    import peftkit
    from peftkit.errors import AdapterError
    from peftkit.interop import export_peft

    adapter, config = _read_adapter_dir(args.adapter)
    injector = _injector_of(adapter, config)
    if getattr(injector, "peft_format", None) is None:
        if getattr(injector, "supports_merge", False):
            instead = f"`peftkit merge {args.adapter} --out DIR` writes a full transformers model instead"
        else:
            reason = getattr(injector, "merge_refusal", "") or "it has no weights to fold into the base model"
            instead = f"it cannot be merged either ({reason}); load it with peftkit.load"
        raise AdapterError(
            f"cannot export {args.adapter!r}: method {config['method']!r} has no Hugging Face peft equivalent; {instead}"
        )
    name = _base_model_name(adapter, args.model)
    out = _output_dir(args.out, args.force, [adapter, *_folders(name)])
    model, _ = _load_base(name, from_where="--model" if args.model else f"recorded in {adapter / 'base_model.txt'}")
    model.config._name_or_path = _local_name(name)  # what peft's base_model_name_or_path will say
    tuned = peftkit.load(model, adapter)
    _warn_extras(adapter, "the peft adapter")
    _progress(f"writing {out} (peft format)")
    export_peft(tuned, out)
    print(f"exported: {out} (peft {injector.peft_format.peft_type}, base {_local_name(name)}); "
          f"load it with peft.PeftModel.from_pretrained(base_model, {str(out)!r})")
    return 0


# ------------------------------------------------------------ import
def _read_peft_dir(text: str) -> tuple[Path, dict[str, Any]]:
    """The peft adapter directory ``text`` and its config, checked before any model loads."""
    from peftkit.errors import AdapterFormatError
    from peftkit.interop import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
    from peftkit.serialization import WEIGHTS_NAME

    path = Path(text)
    if not path.exists():
        raise AdapterFormatError(f"peft adapter directory {text!r} does not exist")
    if not path.is_dir():
        raise AdapterFormatError(f"{text!r} is a file, not a peft adapter directory")
    if (path / WEIGHTS_NAME).is_file() and not (path / PEFT_WEIGHTS_NAME).is_file():
        raise AdapterFormatError(f"{text!r} is a peftkit adapter already; use it as it is (peftkit.load, peftkit generate --adapter)")
    for name in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME):
        if not (path / name).is_file():
            raise AdapterFormatError(f"{text!r} is not a peft adapter directory: {name} is missing")
    try:
        config = json.loads((path / PEFT_CONFIG_NAME).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{str(path / PEFT_CONFIG_NAME)!r} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{str(path / PEFT_CONFIG_NAME)!r} must hold a JSON object, got {type(config).__name__}")
    return path, config


def _cmd_import(args: argparse.Namespace) -> int:
    from peftkit.errors import AdapterFormatError
    from peftkit.interop import import_peft
    from peftkit.serialization import atomic_directory

    source, config = _read_peft_dir(args.peft_dir)
    name = args.model
    if name is None:
        name = config.get("base_model_name_or_path")
        if not isinstance(name, str) or not name.strip():
            raise AdapterFormatError(
                f"{str(source / 'adapter_config.json')!r} does not name its base model (base_model_name_or_path); "
                "pass --model NAME_OR_PATH"
            )
    out = _output_dir(args.out, args.force, [source, *_folders(name)])
    where = "--model" if args.model else f"base_model_name_or_path of {source / 'adapter_config.json'}"
    model, _ = _load_base(name, from_where=where)
    _progress(f"converting {source} (peft {config.get('peft_type')})")
    tuned = import_peft(model, source)
    tokenizer = _peft_dir_tokenizer(source)
    _progress(f"writing {out}")
    with atomic_directory(out) as tmp:
        tuned.save(tmp)
        (tmp / "base_model.txt").write_text(_local_name(name) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
    print(
        f"imported: {out} (method {tuned.adapter_info('default').method}, base {_local_name(name)}); "
        f"try it: peftkit generate --adapter {out} --prompt \"...\""
    )
    return 0


def _peft_dir_tokenizer(source: Path) -> Any:
    """The tokenizer published with a peft adapter (its files beside the adapter), or ``None``."""
    if not (source / "tokenizer_config.json").is_file():
        return None
    from peftkit.training.models import saved_tokenizer

    return saved_tokenizer(source)


# ------------------------------------------------------------ merge
def _cmd_merge(args: argparse.Namespace) -> int:
    import peftkit
    import torch
    from peftkit.errors import MergeNotSupportedError
    from peftkit.serialization import atomic_directory

    adapter, config = _read_adapter_dir(args.adapter)
    method = config["method"]
    injector = _injector_of(adapter, config)
    if not getattr(injector, "supports_merge", False):
        reason = getattr(injector, "merge_refusal", "") or "it has no weights to fold into the base model"
        instead = (
            f"; `peftkit export {args.adapter} --format peft --out DIR` runs it with peft instead"
            if getattr(injector, "peft_format", None) is not None
            else "; load it with peftkit.load"
        )
        raise MergeNotSupportedError(f"cannot merge {args.adapter!r}: method {method!r} cannot be merged: {reason}{instead}")
    name = _base_model_name(adapter, args.model)
    out = _output_dir(args.out, args.force, [adapter, *_folders(name)])
    model, tokenizer = _load_base(name, from_where="--model" if args.model else f"recorded in {adapter / 'base_model.txt'}")
    if (adapter / "tokenizer").is_dir():
        from peftkit.training.models import saved_tokenizer

        tokenizer = saved_tokenizer(adapter / "tokenizer")
    dtype_name = DTYPES[args.dtype] if args.dtype else _checkpoint_dtype(name)
    tuned = peftkit.load(model, adapter)
    layers = len(tuned.adapter_info(tuned.active_adapter).targets)
    _progress(f"merging adapter {adapter} (method {method}, {layers} layers) in float32")
    merged = tuned.merge_and_unload()
    _check_plain(merged, method)
    merged.to(getattr(torch, dtype_name))
    for key in ("quantization_config",):  # a merged model is plain weights whatever the method loaded
        if hasattr(merged.config, key):
            delattr(merged.config, key)
    _warn_extras(adapter, "the merged model")
    _progress(f"writing {out} ({dtype_name}, safetensors shards of at most {args.max_shard_size})")
    with atomic_directory(out) as tmp:
        merged.save_pretrained(tmp, max_shard_size=args.max_shard_size)
        tokenizer.save_pretrained(tmp)
    print(f"merged: {out} ({dtype_name}); load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _checkpoint_dtype(name: str) -> str:
    """The dtype the base checkpoint was saved in (its config's ``dtype``), ``--dtype``'s default; float32 if unknown."""
    from transformers import AutoConfig

    from peftkit.training.models import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name, verbose=False))
    except Exception:  # noqa: BLE001 - the model loaded already; an unreadable config only loses the default
        return "float32"
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    recorded = str(recorded).removeprefix("torch.")
    return recorded if recorded in ("bfloat16", "float16") else "float32"


def _check_plain(model: Any, method: str) -> None:
    """Refuse to write a merged model that still holds quantized (non-float) weights."""
    from peftkit.errors import MergeNotSupportedError

    quantized = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if quantized:
        raise MergeNotSupportedError(
            f"merging method {method!r} left {len(quantized)} quantized weight(s) (e.g. {quantized[0]}) that "
            "transformers cannot load as plain weights; nothing was written"
        )


# ------------------------------------------------------------ parser
def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export``, ``import`` and ``merge`` to the ``peftkit`` parser."""
    force_help = "replace --out if it exists and is not empty (atomically: the old content stays until the new one is complete)"

    p = subparsers.add_parser(
        "export",
        help="write a peftkit adapter as a Hugging Face peft adapter directory",
        description="Write a peftkit adapter directory as a Hugging Face peft adapter (adapter_config.json + "
        "adapter_model.safetensors) that peft.PeftModel.from_pretrained loads. Methods with a peft equivalent: "
        "see `peftkit methods` and docs/README.md.",
    )
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="peftkit adapter directory (e.g. runs/sft-lora/adapter)")
    p.add_argument("--format", choices=["peft"], default="peft", help="output format (default peft)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (must not exist or be empty)")
    p.add_argument("--model", metavar="NAME_OR_PATH", help="base model (default: the one recorded with the adapter)")
    p.add_argument("--force", action="store_true", help=force_help)
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser(
        "import",
        help="convert a Hugging Face peft adapter directory into a peftkit adapter",
        description="Convert a Hugging Face peft adapter directory into a peftkit adapter directory, recording its "
        "base model (base_model.txt) for `peftkit generate`, `export` and `merge`.",
    )
    p.add_argument("peft_dir", metavar="PEFT_DIR", help="peft adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (must not exist or be empty)")
    p.add_argument(
        "--model",
        metavar="NAME_OR_PATH",
        help="base model (default: the peft config's base_model_name_or_path; needed when that is a hub id not reachable here)",
    )
    p.add_argument("--force", action="store_true", help=force_help)
    p.set_defaults(func=_cmd_import)

    p = subparsers.add_parser(
        "merge",
        help="fold an adapter into its base model and write a plain transformers model",
        description="Fold a peftkit adapter into its base model (in float32) and write a full transformers model "
        "directory (config, safetensors shards, tokenizer, generation config) that "
        "AutoModelForCausalLM.from_pretrained loads without peftkit. Methods that cannot merge (bottleneck "
        "adapters, prompt-side methods) are refused with the reason; QLoRA merges into its dequantized base.",
    )
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="peftkit adapter directory (e.g. runs/sft-lora/adapter)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (must not exist or be empty)")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="dtype of the written weights (default: the base checkpoint's own)"
    )
    p.add_argument("--model", metavar="NAME_OR_PATH", help="base model (default: the one recorded with the adapter)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest safetensors shard, e.g. 2GB or 500MB (default 5GB)")
    p.add_argument("--force", action="store_true", help=force_help)
    p.set_defaults(func=_cmd_merge)
