"""EleutherAI sparsify checkpoints: ``bae export sparsify`` writes one; ``read_sparsify`` reads one.

sparsify saves a run as ``<run>/config.json`` plus one directory per hookpoint (a module of the
base model, e.g. ``layers.5``) holding ``cfg.json`` (``SparseCoderConfig`` fields and ``d_in``) and
``sae.safetensors`` (``encoder.weight`` [n, d], ``encoder.bias`` [n], ``W_dec`` [n, d], ``b_dec`` [d]).
It encodes top-k(ReLU(encoder(x − b_dec))) and decodes acts @ W_dec + b_dec: TopK only, so only
a TopK SAE exports. ReLU before or after the top-k selection gives the same dense code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from bae.common.errors import BaeError, first_line
from bae.interop.checkpoint_config import ExportCheckpointConfig
from bae.interop.hook_names import Source, sparsify_hookpoint
from bae.interop.sae_weights import ReadSae, SaeWeights, from_autoencoder
from bae.interop.saelens import write_sae_dir
from bae.trainer.models import load_autoencoder

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_FILE = "config.json"
KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


def sparsify_tensors(weights: SaeWeights) -> dict[str, torch.Tensor]:
    """sparsify's four tensors; it always subtracts b_dec from the input, so an SAE that does not
    gets b_dec @ W_enc added to its encoder bias (folded in float64)."""
    b_enc = weights.b_enc
    if not weights.apply_b_dec_to_input:
        b_enc = (b_enc.double() + weights.b_dec.double() @ weights.W_enc.double()).to(b_enc.dtype)
    tensors = (weights.W_enc.T, b_enc, weights.W_dec, weights.b_dec)
    return {key: t.contiguous() for key, t in zip(KEYS, tensors)}


def export_sparsify(config: ExportCheckpointConfig) -> Path:
    """Write the TopK checkpoint ``config.checkpoint`` as a sparsify run at ``config.out``."""
    from bae.common.console import print_summary

    model = load_autoencoder(config.checkpoint)
    if model.architecture != "topk_sae":
        raise BaeError(
            f"{config.checkpoint} is a {model.architecture}: sparsify holds TopK SAEs only (its encoder "
            "always keeps the k largest ReLU activations); use `bae export saelens`"
        )
    source = Source.of(model.provenance, config.store)
    hookpoint = config.hook_name or sparsify_hookpoint(source)
    weights = from_autoencoder(model)
    d, n = weights.d_in, weights.d_sae
    cfg = {
        "activation": "topk",
        "expansion_factor": max(n // d, 1),
        "normalize_decoder": False,
        "num_latents": n,
        "k": model.config.topk,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": d,
    }
    run = {"model": source.model_name, "ctx_len": source.context_size, "hookpoints": [hookpoint]}
    run["bae_source"] = source.provenance.model_dump(mode="json")
    files = {RUN_FILE: run, f"{hookpoint}/{CFG_FILE}": cfg}
    out = write_sae_dir(Path(config.out), files, sparsify_tensors(weights), f"{hookpoint}/{WEIGHTS_FILE}")
    rows = {
        "architecture": f"topk_sae -> sparsify topk, k={cfg['k']}",
        "d_in x latents": f"{d} x {n}",
        "model": source.model_name or "not recorded",
        "hookpoint": hookpoint,
        "load": f"SparseCoder.load_from_disk({str(out / hookpoint)!r})",
    }
    print_summary(f"bae export sparsify -> {out}", rows)
    return out


def sparsify_dir(path: Path) -> Path:
    """``path`` if it is a hookpoint directory, else the single hookpoint directory of a run."""
    if (path / CFG_FILE).is_file():
        return path
    found = sorted(p.parent for p in path.glob(f"*/{CFG_FILE}") if (p.parent / WEIGHTS_FILE).is_file())
    if not found:
        raise BaeError(f"{path}: not a SAELens or sparsify SAE directory (no {CFG_FILE})")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise BaeError(f"{path} holds {len(found)} sparsify hookpoints ({names}): name one, e.g. {found[0]}")
    return found[0]


def read_sparsify(path: Path) -> ReadSae:
    """A sparsify hookpoint directory as a TopK SAE (transcoders and skip connections refused)."""
    try:
        cfg = json.loads((path / CFG_FILE).read_text())
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (OSError, ValueError) as exc:
        raise BaeError(f"{path}: not a sparsify SAE directory ({first_line(exc)})") from exc
    for field, why in (("transcode", "a transcoder"), ("skip_connection", "a skip connection")):
        if cfg.get(field):
            raise BaeError(f"{path}: {why} is not an autoencoder bae can hold ({field}=true)")
    if cfg.get("activation", "topk") != "topk":
        raise BaeError(f"{path}: activation {cfg['activation']!r} is not supported (bae imports topk)")
    missing = [key for key in KEYS if key not in tensors]
    if missing:
        raise BaeError(f"{path}/{WEIGHTS_FILE}: missing {', '.join(missing)}")
    weights = SaeWeights(
        tensors["encoder.weight"].T, tensors["encoder.bias"], tensors["W_dec"], tensors["b_dec"], True
    )
    run = path.parent / RUN_FILE
    model = json.loads(run.read_text()).get("model") if run.is_file() else None
    return ReadSae(weights, "topk_sae", {"topk": int(cfg["k"])}, model, path.name)
