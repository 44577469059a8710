"""Experiment trackers (recipe key ``output.report_to``) through accelerate's tracker support.

``output.report_to: [tensorboard, wandb, mlflow, ...]`` (default ``[]``: none)
names trackers that accelerate drives (``Accelerator(log_with=...,
project_dir=...)``); peftkit writes no tracker client of its own. A run then

* starts them with the recipe as flat hyperparameters (:func:`flat_hyperparameters`:
  ``train.lr``, ``method.options.r``, ... with every method and objective option,
  defaults included) under the project name :func:`project_name` (the last part
  of ``output.dir``);
* sends every record the trainer logs (``loss``, ``lr``, ``tokens_per_s``,
  ``epoch``, ``eval_loss``, the objective's own metrics; PPO's rollout statistics,
  which go through the same ``Trainer.log``) with its step;
* ends them when the run returns or fails.

Trackers that take a folder write under ``<output.dir>/tracking/``
(:data:`TRACKING_DIR`): TensorBoard event files in ``tracking/<project name>/``
(the hyperparameters in a sub-folder of it, as TensorBoard's ``add_hparams``
does); MLflow stores an experiment it creates with its artifacts there, and its
runs where ``MLFLOW_TRACKING_URI`` says (accelerate passes MLflow no folder for
those). W&B and the other hosted trackers log to their own service, configured
as usual (``WANDB_MODE=offline`` and the like).

A tracker accelerate does not know, or one whose package is missing (accelerate
would drop it silently), is a recipe problem naming the field, the value and
the fix (the names accelerate supports, or the ``pip install``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "TRACKING_DIR",
    "TRACKER_PACKAGES",
    "report_to_problems",
    "installed_trackers",
    "accelerator_kwargs",
    "project_name",
    "init_kwargs",
    "flat_hyperparameters",
]

#: Sub-folder of ``output.dir`` where trackers that write files write them.
TRACKING_DIR = "tracking"

#: Every tracker accelerate 1.x drives (``accelerate.utils.LoggerType`` but ``all``), with what to pip install.
TRACKER_PACKAGES: dict[str, str] = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def installed_trackers() -> set[str]:
    """The trackers whose package accelerate finds in this environment."""
    from accelerate.tracking import get_available_trackers

    return {str(tracker) for tracker in get_available_trackers()}


def report_to_problems(names: Sequence[str]) -> list[str]:
    """The problems of ``output.report_to = names``: unknown or repeated trackers, missing packages."""
    problems: list[str] = []
    supported = ", ".join(TRACKER_PACKAGES)
    shown = json.dumps(list(names))
    seen: set[str] = set()
    for name in names:
        if name not in TRACKER_PACKAGES:
            from peftkit.options import did_you_mean

            problems.append(
                f"output.report_to = {shown}: {name!r} is not a tracker accelerate supports{did_you_mean(name, TRACKER_PACKAGES)}; "
                f"supported: {supported} (or [] for none)"
            )
        elif name in seen:
            problems.append(f"output.report_to = {shown} names {name!r} twice; list each tracker once")
        seen.add(name)
    wanted = [name for name in dict.fromkeys(names) if name in TRACKER_PACKAGES]
    if wanted:
        missing = [name for name in wanted if name not in installed_trackers()]
        for name in missing:
            problems.append(
                f"output.report_to = {shown}: tracker {name!r} needs the package {TRACKER_PACKAGES[name]!r}, which is not "
                f"installed: pip install {TRACKER_PACKAGES[name]} (or remove {name!r} from output.report_to)"
            )
    return problems


def accelerator_kwargs(report_to: Sequence[str], output_dir: Path) -> dict[str, Any]:
    """The ``Accelerator`` keywords that turn on ``report_to`` (none for ``[]``)."""
    if not report_to:
        return {}
    return {"log_with": list(report_to), "project_dir": str(output_dir / TRACKING_DIR)}


def init_kwargs(report_to: Sequence[str], output_dir: Path) -> dict[str, dict[str, Any]]:
    """Per-tracker keywords for ``init_trackers``: MLflow's artifact folder (accelerate gives it no folder otherwise)."""
    return {"mlflow": {"logging_dir": str(output_dir / TRACKING_DIR)}} if "mlflow" in report_to else {}


def project_name(output_dir: Path) -> str:
    """The tracker project name of a run: the last part of ``output.dir`` (``runs/sft-lora`` -> ``sft-lora``)."""
    return Path(output_dir).resolve().name or "peftkit"


def flat_hyperparameters(recipe: Any) -> dict[str, bool | int | float | str]:
    """The recipe as ``{"train.lr": 0.0002, "method.options.r": 8, ...}``, what every tracker can record.

    ``method.options`` and ``objective.options`` hold every option of the validated options objects
    (defaults included), not only those the recipe file sets. Lists and mappings become JSON text and
    ``None`` the text ``"null"`` (trackers take numbers, booleans and strings only).
    """
    from peftkit.options import options_to_dict

    data = recipe.to_dict()
    if recipe.method_options is not None:
        data["method"]["options"] = options_to_dict(recipe.method_options)
    if recipe.objective_options is not None:
        data["objective"]["options"] = options_to_dict(recipe.objective_options)
    flat: dict[str, bool | int | float | str] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                visit(value, f"{prefix}{key}.")
        elif isinstance(node, (bool, int, float, str)):
            flat[prefix[:-1]] = node
        elif node is None:
            flat[prefix[:-1]] = "null"
        else:
            flat[prefix[:-1]] = json.dumps(node, default=str)

    visit(data, "")
    return flat
