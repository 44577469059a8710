"""A run's own files in ``output.dir``: read back as a crash may have left them, and not replaced by another run.

A crash mid-write can tear the last line of ``metrics.jsonl``; that line only
ever belongs to a step after the last checkpoint, so :func:`read_metrics`
drops it. Anything else that does not read (a corrupt line in the middle,
bytes that are not UTF-8, a recipe that is not a mapping) is one
:class:`~peftkit.errors.TrainingError` naming the file and the line or byte
offset; the file is left as it is.

:func:`refuse_wrong_resume` and :func:`refuse_replacing_run` stop a
run before the model loads when it would not continue the run it resumes, or
would silently replace the adapter of a finished run of another recipe, or the checkpoint of an
unfinished run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import TrainingError
from peftkit.training._bounded_yaml import YamlInputError, load_yaml
from peftkit.training._text import NotUtf8Error, decode_utf8
from peftkit.training.checkpoint import ADAPTER_DIR, CHECKPOINT_DIR, RECIPE_FILE, STATE_FILE, recipe_changes

__all__ = ["read_run_recipe", "read_metrics", "keep_metrics_through", "refuse_wrong_resume", "refuse_replacing_run"]


def _read_utf8(path: Path) -> str:
    """The text of ``path``.

    :raises TrainingError: naming the file and the byte offset of the first byte that is not UTF-8.
    """
    try:
        return decode_utf8(path.read_bytes())
    except NotUtf8Error as exc:
        raise TrainingError(
            f"{path} is not UTF-8 text: {exc}; peftkit writes this file as UTF-8, so it was damaged or written by "
            "something else. Restore it, or start a new run in another output.dir"
        ) from None


def read_run_recipe(path: Path) -> dict[str, Any]:
    """The recipe a run saved (``recipe.yaml`` in ``output.dir`` or its checkpoint), as a plain dict."""
    try:  # bounded like a recipe file: a damaged or tampered copy must not hang --resume
        recipe = load_yaml(_read_utf8(path), str(path))
    except (YamlInputError, yaml.YAMLError) as exc:
        raise TrainingError(f"{path} is not the YAML peftkit wrote ({str(exc)[:200]}); restore it, or use another output.dir") from None
    if not isinstance(recipe, dict):
        raise TrainingError(f"{path} holds a {type(recipe).__name__}, not a recipe mapping; restore it, or use another output.dir")
    return recipe


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int | None]:
    """The records of ``metrics.jsonl`` and the number of a torn last line that was left out (``None`` if none).

    :raises TrainingError: for a line other than the last that is not a JSON object with a ``step``.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the newline that ends the last complete record
        lines.pop()
    records, offset = [], 0
    for number, raw in enumerate(lines, start=1):
        try:
            record = _metrics_record(raw, offset, number)
        except ValueError as exc:
            if number == len(lines):  # a crash mid-write: the last line alone may be cut short
                return records, number
            raise TrainingError(
                f"{path}, line {number}: {exc}; only the last line can be torn by a crash, so the file was damaged. "
                "Restore it, or start a new run in another output.dir"
            ) from None
        if record is not None:
            records.append(record)
        offset += len(raw) + 1
    return records, None


def _metrics_record(raw: bytes, offset: int, line: int) -> dict[str, Any] | None:
    """Line ``line`` of ``metrics.jsonl`` (its first byte at ``offset`` in the file); ``None`` for a blank line.

    :raises ValueError: saying what is wrong with it.
    """
    try:
        text = decode_utf8(raw, offset=offset, line=line)
    except NotUtf8Error as exc:
        raise ValueError(f"not UTF-8 text: {exc}") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON record ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError(f"{text[:80]!r} is not a metrics record (a JSON object with an integer 'step')")
    return record


def refuse_wrong_resume(output_dir: Path, recipe: dict[str, Any]) -> None:
    """Refuse to resume without a checkpoint in ``output_dir``, or with a recipe other than the one that wrote it.

    :raises TrainingError: saying what is missing, or listing every changed key.
    """
    checkpoint = output_dir / CHECKPOINT_DIR
    if not (checkpoint / STATE_FILE).is_file():
        raise TrainingError(
            f"cannot resume: no checkpoint at {checkpoint} (output.dir = {str(output_dir)!r}); "
            "run without --resume to start, or point output.dir at the run to continue"
        )
    saved = checkpoint / RECIPE_FILE
    if not saved.is_file():  # a checkpoint from before the recipe was kept in it
        return
    changes = recipe_changes(read_run_recipe(saved), recipe)
    if changes:
        raise TrainingError(
            f"cannot resume the run in {output_dir}: the recipe differs from the one its checkpoint was "
            "written with, so the resumed run would not continue that run:\n"
            + "\n".join(f"  - {change}" for change in changes)
            + f"\nresume with the original values (they are in {saved}), or start a new run in another output.dir"
        )


def refuse_replacing_run(output_dir: Path, recipe: dict[str, Any]) -> None:
    """Refuse to start ``recipe`` afresh where it would replace another run's results.

    A finished run (an ``adapter/`` beside a ``recipe.yaml``) of a different
    recipe is refused; the same recipe again is allowed (it reproduces that
    run), and so are differences that do not change what is trained
    (:data:`~peftkit.training.checkpoint.RESUME_MAY_CHANGE`). An unfinished
    run (a checkpoint, no adapter) is refused whatever its recipe: starting
    afresh would throw its progress away, where ``--resume`` continues it.

    :raises TrainingError: saying what would be replaced (every changed key), and how to keep or replace it.
    """
    saved = output_dir / RECIPE_FILE
    if not (output_dir / ADAPTER_DIR).is_dir():
        if (output_dir / CHECKPOINT_DIR / STATE_FILE).is_file():
            raise TrainingError(
                f"output.dir {output_dir} holds an unfinished run (its checkpoint, {output_dir / CHECKPOINT_DIR}), which "
                "starting afresh would replace: pass --resume to continue it, set output.dir to another directory to "
                "keep it, or pass --overwrite (Trainer(..., overwrite=True)) to start over"
            )
        return
    if not saved.is_file():
        return
    changes = recipe_changes(read_run_recipe(saved), recipe)
    if changes:
        raise TrainingError(
            f"output.dir {output_dir} holds a finished run whose adapter this run would replace, and its recipe "
            f"({saved}) differs from this one:\n"
            + "\n".join(f"  - {change}" for change in changes)
            + "\nset output.dir to another directory to keep both, or pass --overwrite (Trainer(..., overwrite=True)) "
            "to replace that run"
        )


def keep_metrics_through(path: Path, step: int, *, rewrite: bool) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` up to ``step`` (a resumed run replays the later ones, so they go).

    :param rewrite: also cut the file down to them (atomically; the main process), saying so when a torn last
        line was dropped.
    """
    records, torn = read_metrics(path)
    kept = [record for record in records if record["step"] <= step]
    if rewrite:
        if torn is not None:
            print(f"note: dropped line {torn} of {path}, which a crash cut short mid-write")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
        tmp.replace(path)
    return kept
