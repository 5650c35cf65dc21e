"""Binary Autoencoder training: models, objectives, checkpoints and the ``bae train`` loop.

For analysis code (``bae entropy``, ``bae features``)::

    from bae.trainer import load_autoencoder
    model = load_autoencoder("runs/bae-l15")        # a run dir, a model/ dir or a checkpoint dir
    bits = model.encode_bits(h)                       # numpy bool [n, model.n_bits] from raw states
    packed = model.encode_packed(h)                   # np.packbits(bits, axis=-1)
    model.provenance                                  # store, LLM, layer, positions, ...
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real names for type checkers; at run time they load lazily (no torch for the CLI)
    from bae.trainer.config import ModelConfig
    from bae.trainer.models import (
        ARCHITECTURES,
        Autoencoder,
        BinaryAutoencoder,
        ReluSAE,
        TopKSAE,
        build_autoencoder,
        load_autoencoder,
    )

__all__ = [
    "ARCHITECTURES",
    "Autoencoder",
    "BinaryAutoencoder",
    "ModelConfig",
    "ReluSAE",
    "TopKSAE",
    "build_autoencoder",
    "load_autoencoder",
]


def __getattr__(name: str) -> Any:
    """Lazy exports, so that importing the CLI does not import torch."""
    if name == "ModelConfig":
        from bae.trainer.config import ModelConfig

        return ModelConfig
    if name in __all__:
        from bae.trainer import models

        return getattr(models, name)
    raise AttributeError(f"module 'bae.trainer' has no attribute {name!r}")
