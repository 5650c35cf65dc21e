"""``RunFolder``: the layout of a ``bae train`` output directory, named in one place.

```
<run>/model/                      the final autoencoder (config.json + model.safetensors)
<run>/checkpoints/step-NNNNNNNN/  resumable checkpoints, newest last
<run>/train_log.jsonl             metrics, one JSON object per line
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_PREFIX = "step-"


@dataclass(frozen=True)
class RunFolder:
    """Paths inside one training run's output directory."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> RunFolder:
        return cls(Path(path))

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def log(self) -> Path:
        return self.root / LOG_FILE

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{step:08d}"

    def checkpoint_candidates(self) -> list[Path]:
        """Checkpoint directories by name, oldest first (completeness is the caller's test)."""
        if not self.checkpoints_dir.is_dir():
            return []
        return sorted(self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*"))

    @property
    def finished(self) -> bool:
        """Whether the final model was written."""
        return self.model_dir.is_dir()
