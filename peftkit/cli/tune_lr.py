"""``peftkit tune-lr``: measure a method's learning rate on the embedded model (see :mod:`peftkit.testing.lr_sweep`)."""

from __future__ import annotations

import argparse
import math
import sys
import time

__all__ = ["add_subcommands"]


class _IntermixedParser(argparse.ArgumentParser):
    """Lets ``KEY=VALUE`` options follow ``--steps``/``--lrs`` (``tune-lr lora --steps 10 r=16``).

    Plain argparse fills a ``nargs="*"`` positional at its first chance (right after
    METHOD, with nothing) and then rejects later ``KEY=VALUE`` words as unrecognized.
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def, override]
        if self._intermixing:  # parse_known_intermixed_args calls back in here
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _lrs(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers (e.g. 1e-4,1e-3,1e-2)") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more learning rates > 0, comma-separated (e.g. 1e-4,1e-3,1e-2)")
    return values


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of optimizer steps") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} optimizer steps: give at least 1")
    return value


def _options(items: list[str]) -> dict[str, object]:
    """``key=value`` method options, values parsed as YAML (as recipe overrides are)."""
    from peftkit.errors import OptionsError
    from peftkit.training._bounded_yaml import load_yaml

    options: dict[str, object] = {}
    problems: list[str] = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"{item!r} is not of the form key=value (e.g. r=16 or target_modules=[q_proj,v_proj])")
            continue
        try:
            options[key.strip()] = load_yaml(text, f"the value of option {key.strip()}") if text.strip() else ""
        except Exception as exc:  # any YAML problem is this option's problem
            problems.append(f"{item!r}: the value is not valid YAML ({exc})")
    if problems:
        raise OptionsError("peftkit tune-lr", problems)
    return options


def _cmd_tune_lr(args: argparse.Namespace) -> int:
    from peftkit.testing.lr_sweep import DEFAULT_LRS, lr_sweep

    lrs = args.lrs or list(DEFAULT_LRS)
    print(f"tune-lr: {args.method}, {len(lrs)} learning rates x {args.steps} steps on the embedded model; one run at a time")
    start = time.perf_counter()
    result = lr_sweep(args.method, lrs, steps=args.steps, **_options(args.options))
    print(result.table())
    print(f"({time.perf_counter() - start:.0f} s in all)")
    if result.best is None:
        print(f"tune-lr: every learning rate failed for {args.method!r}; try smaller ones with --lrs", file=sys.stderr)
        return 1
    if result.best_at_edge:
        print(f"note: the best rate {result.best.lr:g} is at the edge of the grid; the optimum may lie beyond it (widen --lrs)")
    print("paste into the injector:")
    print(f"    {result.injector_line()}")
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tune-lr`` to the ``peftkit`` parser."""
    p = subparsers.add_parser(
        "tune-lr",
        help="measure a method's learning rate (train each rate briefly, compare held-out losses)",
        description=(
            "Train METHOD on the embedded model (SmolLM2-135M-Instruct) and the arithmetic task set for --steps "
            "optimizer steps at each learning rate, same seed each time, and print each rate's held-out loss and the "
            "recommended_lr line for the injector. Diverged runs count as failed. Run it from a peftkit checkout "
            "(the data set lives there)."
        ),
    )
    p.add_argument("method", help="a method name from `peftkit methods`")
    p.add_argument("--steps", type=_steps, default=20, help="optimizer steps per learning rate (default 20)")
    p.add_argument("--lrs", type=_lrs, help="comma-separated learning rates (default 1e-4,3e-4,...,1e-1: 7 rates)")
    p.add_argument("options", nargs="*", metavar="KEY=VALUE", help="method options, values as YAML, e.g. r=16 alpha=32")
    p.__class__ = _IntermixedParser  # add_parser builds the parent's class; only this command needs intermixing
    p.set_defaults(func=_cmd_tune_lr)
