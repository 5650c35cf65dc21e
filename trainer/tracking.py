"""Experiment trackers through accelerate (TensorBoard, W&B, MLflow, ...): refused in one line when
their package is missing, given the run's config as flat hyperparameters, and resumed as one run."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from bae.common.atomic_files import atomic_write_json, read_json
from bae.common.errors import BaeError
from bae.trainer.config import TrainConfig

TRACKER_FILE = "tracker.json"  # in the run folder: the run id a resumed run logs to again


def check_trackers(names: list[str]) -> None:
    """Refuse a tracker accelerate does not know, or one whose package is not installed (accelerate
    itself would skip it silently)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            known = ", ".join(sorted(LOGGER_TYPE_TO_CLASS))
            raise BaeError(f"--log-with {name}: unknown tracker, expected one of {known}")
        if name not in available:
            raise BaeError(f"--log-with {name}: its package is not installed (pip install {name})")


def hyperparameters(config: TrainConfig) -> dict[str, int | float | str | bool]:
    """The config as scalars (TensorBoard's hparams take int, float, str and bool only)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in config.model_dump(mode="json").items():
        flat[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def start_trackers(accelerator: Accelerator, config: TrainConfig, root: Path) -> None:
    """Start the trackers of ``--log-with``: project ``--tracker-project``, run ``--run-name`` (the
    output folder's name by default), and the run id recorded in the run folder, so that a resumed
    run continues the same W&B run."""
    recorded = read_json(root / TRACKER_FILE) or {}
    run_id = recorded.get("run_id") or uuid.uuid4().hex[:16]
    if accelerator.is_main_process and not recorded:
        atomic_write_json(root / TRACKER_FILE, {"run_id": run_id})
    name = config.run_name or root.resolve().name
    init: dict[str, Any] = {"wandb": {"name": name, "id": run_id, "resume": "allow"}}
    accelerator.init_trackers(config.tracker_project, config=hyperparameters(config), init_kwargs=init)
