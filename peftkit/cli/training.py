"""Training commands of the ``peftkit`` CLI: ``train``, ``validate``, ``recipes``, ``generate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_subcommands", "find_recipes_dir"]


def find_recipes_dir() -> Path | None:
    """The shipped recipes: ``./recipes`` if present, else the ``recipes/`` folder of a peftkit checkout."""
    for candidate in (Path.cwd() / "recipes", Path(__file__).resolve().parents[2] / "recipes"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    return None


def _recipe_summary(path: Path) -> str:
    """The recipe's ``# Summary:`` comment line (its one-line description)."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("# Summary:"):
            return line.removeprefix("# Summary:").strip()
    return ""


# ---------------------------------------------------------------- commands
def _cmd_recipes(args: argparse.Namespace) -> int:
    folder = find_recipes_dir()
    if folder is None:
        print("no recipes/ folder found here; the shipped recipes live in recipes/ of the peftkit repository", file=sys.stderr)
        return 1
    rows = [(str(p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p), _recipe_summary(p)) for p in sorted(folder.glob("*.yaml"))]
    width = max(len(r[0]) for r in rows)
    for name, summary in rows:
        print(f"{name.ljust(width)}  {summary}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from peftkit.training.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    for note in recipe.notes:
        print(f"note: {note}")
    steps = recipe.train.max_steps if recipe.train.max_steps is not None else f"{recipe.train.epochs} epoch(s)"
    print(
        f"ok: {args.recipe} is valid: model {recipe.model.name_or_path}, method {recipe.method.name}, "
        f"objective {recipe.objective.name}, {steps} steps, output {recipe.output.dir}"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from peftkit.training.recipe import load_recipe
    from peftkit.training.trainer import Trainer

    recipe = load_recipe(args.recipe, args.overrides)
    for note in recipe.notes:
        print(f"note: {note}")
    trainer = Trainer(recipe, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    result = trainer.train()
    if not trainer.accelerator.is_main_process:
        return 0

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    print(
        f"done: {result.steps} steps in {result.seconds:.0f} s ({result.tokens_per_second:.0f} tokens/s); "
        f"held-out loss {fmt(result.eval_loss_before)} -> {fmt(result.eval_loss_after)}\n"
        f"adapter: {result.adapter_dir}   metrics: {result.output_dir / 'metrics.jsonl'}\n"
        f"chat with it: peftkit generate --adapter {result.adapter_dir} --prompt \"...\""
    )
    return 0


def _load_for_generation(adapter: Path, model_name: str | None) -> tuple[Any, Any]:
    import peftkit
    from peftkit.options import build_options
    from peftkit.plugins import plugin_manager
    from peftkit.serialization import read_adapter
    from peftkit.training.models import load_model_and_tokenizer, recorded_base_model, saved_tokenizer

    # Every check of a load (format, checksum, values) before the base model takes its seconds to load.
    config, _ = read_adapter(adapter)
    if model_name is None:
        model_name = recorded_base_model(adapter)
    pm = plugin_manager()
    injector = pm.get_injector(config["method"])
    options = build_options(injector.options, config["options"], owner=f"method {config['method']!r} of {adapter}")
    model, tokenizer = load_model_and_tokenizer(model_name, load_kwargs=pm.model_load_kwargs(config["method"], options))
    if (adapter / "tokenizer").is_dir():
        tokenizer = saved_tokenizer(adapter / "tokenizer")
    return peftkit.load(model, adapter), tokenizer


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of tokens")
    return value


def _reply(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int) -> str:
    import torch

    if getattr(tokenizer, "chat_template", None):
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(messages[-1]["content"] + "\n", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer = _load_for_generation(Path(args.adapter), args.model)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        print(_reply(model, tokenizer, [*system, {"role": "user", "content": args.prompt}], args.max_new_tokens))
        return 0
    print("peftkit chat: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
    history = list(system)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line or line in {"exit", "quit"}:
            break
        history.append({"role": "user", "content": line})
        answer = _reply(model, tokenizer, history, args.max_new_tokens)
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}", flush=True)
    return 0


# ------------------------------------------------------------------ parser
def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``validate``, ``recipes`` and ``generate`` to the ``peftkit`` parser."""
    override_help = "recipe overrides key.path=value (values are YAML), e.g. method.name=ia3 train.max_steps=20"

    p = subparsers.add_parser("train", help="train a recipe")
    p.add_argument("recipe", help="recipe YAML file (see `peftkit recipes`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=override_help)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in output.dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a finished run in output.dir even if it was trained with another recipe"
    )
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("validate", help="check a recipe and report every problem at once")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=override_help)
    p.set_defaults(func=_cmd_validate)

    p = subparsers.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=_cmd_recipes)

    p = subparsers.add_parser("generate", help="chat with a trained adapter (one prompt, or interactive)")
    p.add_argument("--adapter", required=True, help="adapter directory (output.dir/adapter)")
    p.add_argument("--prompt", help="one user message; without it, an interactive chat")
    p.add_argument("--model", help="base model (default: the one recorded with the adapter)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
    p.set_defaults(func=_cmd_generate)
