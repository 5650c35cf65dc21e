"""Load an autoencoder checkpoint for analysis and check that it belongs to a store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bae.common.errors import BaeError
from bae.stores import ActivationStore
from bae.stores.sites import resolve_layer

if TYPE_CHECKING:
    from bae.trainer.models import Autoencoder


def load_for_store(
    store: ActivationStore, checkpoint: str, layer: int | str | None = None
) -> tuple[Autoencoder, int]:
    """The checkpoint's model and the store layer it applies to (``layer``, an index or a hook
    site's name, overrides the recorded one).

    Refused, one line each: a layer the store lacks, another d_model, another corpus fingerprint.
    """
    from bae.trainer import load_autoencoder

    model = load_autoencoder(checkpoint)
    provenance = model.provenance
    layer = resolve_layer(store, layer) if layer is not None else provenance.layer
    if layer is None:
        if len(store.layers) != 1:
            raise BaeError(
                f"checkpoint {checkpoint} records no layer and store {store.url} has several: name the layer"
            )
        layer = store.layers[0]
    if layer not in store.layers:
        raise BaeError(
            f"checkpoint {checkpoint} was trained on layer {layer}, but store {store.url} holds layers "
            f"{', '.join(map(str, store.layers))}"
        )
    if model.config.d_model != store.d_model:
        raise BaeError(
            f"checkpoint {checkpoint} was trained on d_model={model.config.d_model} states, "
            f"but store {store.url} holds d_model={store.d_model}"
        )
    recorded, actual = provenance.corpus_fingerprint, store.meta.get("corpus_fingerprint")
    if recorded and actual and recorded != actual:
        raise BaeError(
            f"checkpoint {checkpoint} was trained on another corpus than store {store.url} "
            "(corpus fingerprints differ)"
        )
    return model, int(layer)
