"""Binary Autoencoder training: models, objectives, checkpoints and the ``bae train`` loop.

For analysis code (``bae entropy``, ``bae features``)::

    from bae.trainer import load_autoencoder
    model = load_autoencoder("runs/bae-l15")        # a run dir, a model/ dir or a checkpoint dir
    bits = model.encode_bits(h)                       # numpy bool [n, model.n_bits] from raw states
    packed = model.encode_packed(h)                   # np.packbits(bits, axis=-1)
    model.source                                      # {"store", "model", "layer", ...}
"""

from bae.trainer.models import (
    ARCHITECTURES,
    Autoencoder,
    BinaryAutoencoder,
    ModelConfig,
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
