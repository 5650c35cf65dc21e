"""``bae import-checkpoint``: a SAELens (standard, topk, bae) or sparsify SAE as a bae checkpoint.

The result is an ordinary bae model directory (``relu_sae``, ``topk_sae`` or ``bae``) computing the
same encode and decode; with ``--store`` it records that store (layer, d_model, corpus fingerprint),
so ``bae features compare`` and ``bae evaluate`` take it beside a BAE trained there.
"""

from __future__ import annotations

from pathlib import Path

from bae.common.errors import BaeError
from bae.common.outputs import check_replaceable
from bae.interop.checkpoint_config import ImportCheckpointConfig
from bae.interop.sae_weights import ReadSae, to_autoencoder
from bae.interop.saelens import CFG_FILE, WEIGHTS_FILE, read_saelens
from bae.interop.sparsify import read_sparsify, sparsify_dir
from bae.stores.sites import layer_of_hook, site_names, store_sites
from bae.trainer.models import CONFIG_FILE as MODEL_CONFIG
from bae.trainer.models import WEIGHTS_FILE as MODEL_WEIGHTS
from bae.trainer.provenance import Provenance


def read_sae(src: Path) -> tuple[str, ReadSae]:
    """(format name, SAE) of a SAELens or sparsify directory."""
    if not src.is_dir():
        raise BaeError(f"{src}: no such directory")
    if (src / CFG_FILE).is_file() and (src / WEIGHTS_FILE).is_file():
        return "SAELens", read_saelens(src)
    return "sparsify", read_sparsify(sparsify_dir(src))


def import_provenance(config: ImportCheckpointConfig, sae: ReadSae) -> Provenance:
    """What the imported checkpoint records: the given store and layer, else what the SAE names."""
    from bae.stores import ActivationStore

    d = sae.weights.d_in
    layer = config.layer if config.layer is not None else layer_of_hook(sae.hook_name or "")
    model = {"id": sae.model_name} if sae.model_name else None
    if config.store is None:
        return Provenance(model=model, layer=layer, d_model=d)
    store = ActivationStore.open(config.store)
    if config.layer is None and sae.hook_name:  # a hook site of `bae harvest --hook`
        named = [key for key, site in store_sites(store).items() if sae.hook_name in site_names(site)]
        layer = named[0] if named else layer
    if layer is None and len(store.layers) == 1:
        layer = store.layers[0]
    if layer is None:
        raise BaeError(f"hook {sae.hook_name!r} names no hidden_states layer: pass --layer")
    if layer not in store.layers:
        held = ", ".join(map(str, store.layers))
        raise BaeError(f"store {config.store} has no layer {layer} (hook {sae.hook_name}); it holds {held}")
    if store.d_model != d:
        raise BaeError(
            f"the SAE reads d_in={d} states, but store {config.store} holds d_model={store.d_model}"
        )
    return Provenance(
        store=config.store,
        model=store.meta.get("model") or model,
        layer=layer,
        d_model=d,
        corpus_fingerprint=store.meta.get("corpus_fingerprint"),
        n_units=store.n_units,
    )


def import_checkpoint(config: ImportCheckpointConfig) -> Path:
    """Write ``config.src`` as a bae model directory at ``config.out``."""
    from bae.common.console import print_summary

    kind, sae = read_sae(Path(config.src))
    check_replaceable(Path(config.out), {MODEL_CONFIG, MODEL_WEIGHTS}.__contains__)
    provenance = import_provenance(config, sae)
    model = to_autoencoder(sae.weights, sae.architecture, provenance, **sae.options)  # type: ignore[arg-type]
    out = model.save_pretrained(config.out)
    rows = {
        "from": f"{kind} {config.src}",
        "architecture": sae.architecture + "".join(f", {k}={v}" for k, v in sae.options.items()),
        "d_in x features": f"{sae.weights.d_in} x {sae.weights.d_sae}",
        "hook": sae.hook_name or "not recorded",
        "store": provenance.store or "none (pass --store to record it)",
        "layer": provenance.layer if provenance.layer is not None else "not recorded",
    }
    print_summary(f"bae import-checkpoint -> {out}", rows)
    return out
