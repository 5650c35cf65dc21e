"""Training checkpoints: ``<out>/checkpoints/step-NNNNNNNN/``, each written whole then renamed.

A checkpoint directory holds the model (``model.safetensors`` + ``config.json``, loadable by
``load_autoencoder``), ``trainer_state.json`` (step, tokens, train config, sampler cursor, objective
state) and ``trainer_state.pt`` (optimizer, scheduler, torch RNG, metric windows).
A directory only gets its ``step-`` name once every file is in it, so a kill at any instant leaves
either the previous checkpoints or the new one complete, never a half-written one under that name.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from bae.common.atomic_files import temporary_dir
from bae.common.errors import BaeError, first_line
from bae.trainer.models import Autoencoder, replace_dir
from bae.trainer.run_folder import RunFolder

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in RunFolder.at(out).checkpoint_candidates() if (p / STATE_PT).is_file()]


def latest_checkpoint(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def save_checkpoint(
    out: Path,
    step: int,
    model: Autoencoder,
    json_state: dict[str, Any],
    torch_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically, then drop all but the newest ``keep``."""
    target = RunFolder.at(out).checkpoint(step)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(target)
    try:
        model.write_files(tmp)
        buffer = io.BytesIO()  # torch reports a failed file write as a RuntimeError; a plain write
        torch.save({**torch_state, "torch_rng": torch.get_rng_state()}, buffer)  # gives the OSError
        (tmp / STATE_PT).write_bytes(buffer.getbuffer())
        (tmp / STATE_JSON).write_text(json.dumps({**json_state, "step": step}) + "\n")
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(json state, torch state) of a checkpoint; the RNG state is restored by ``restore_rng``."""
    try:
        json_state = json.loads((path / STATE_JSON).read_text())
        torch_state = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, RuntimeError) as exc:
        raise BaeError(f"checkpoint {path}: unreadable ({first_line(exc)})") from exc
    return json_state, torch_state


def restore_rng(torch_state: dict[str, Any]) -> None:
    """torch's global RNG as the checkpoint left it (bae draws from no Python or NumPy global RNG;
    checkpoints of older versions also hold those states, which are not needed)."""
    torch.set_rng_state(torch_state["torch_rng"])
