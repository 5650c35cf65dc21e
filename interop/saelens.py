"""SAELens 6.x checkpoints: ``bae export saelens`` writes one; ``read_saelens`` loads one with SAELens'
own loader for ``bae import-checkpoint``.

A SAELens SAE directory is ``cfg.json`` (``SAEConfig.to_dict()``: architecture, d_in, d_sae, dtype,
apply_b_dec_to_input, normalize_activations, metadata with model_name, hook_name, ...) and
``sae_weights.safetensors`` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec). The ReLU
baseline is SAELens' ``standard``, TopK its ``topk``, the BAE the ``bae`` architecture of
``bae.interop.saelens_bae``. Writing needs no SAELens (the files are written here); reading does.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from bae.common.atomic_files import shareable, temporary_dir
from bae.common.errors import BaeError, first_line
from bae.common.outputs import check_replaceable
from bae.interop.checkpoint_config import ExportCheckpointConfig
from bae.interop.hook_names import Source, saelens_hook
from bae.interop.sae_weights import ReadSae, SaeWeights, from_autoencoder
from bae.trainer.models import Autoencoder, load_autoencoder, replace_dir

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
TO_SAELENS = {"relu_sae": "standard", "topk_sae": "topk", "bae": "bae"}
FROM_SAELENS = {name: arch for arch, name in TO_SAELENS.items()}


def saelens_version() -> str:
    """The installed SAELens' version (6.0.0 when it is not installed: the format written is 6.x)."""
    try:
        return version("sae-lens")
    except PackageNotFoundError:
        return "6.0.0"


def saelens_config(model: Autoencoder, weights: SaeWeights, source: Source, hook_name: str) -> dict[str, Any]:
    """``cfg.json`` of ``model`` as SAELens' ``SAEConfig.to_dict()`` writes it."""
    block = re.match(r"blocks\.(\d+)\.", hook_name)
    cfg: dict[str, Any] = {
        "architecture": TO_SAELENS[model.architecture],
        "d_in": weights.d_in,
        "d_sae": weights.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": weights.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": saelens_version(),
            "sae_lens_training_version": None,
            "model_name": source.model_name,
            "hook_name": hook_name,
            "hook_layer": int(block.group(1)) if block else None,
            "hook_head_index": None,
            "context_size": source.context_size,
            "bae_architecture": model.architecture,
            "bae_source": source.provenance.model_dump(mode="json"),
            "bae_metrics": model.metrics,
        },
    }
    if model.architecture == "topk_sae":
        cfg.update(k=model.config.topk, rescale_acts_by_decoder_norm=False)
    if model.architecture == "bae":
        cfg["threshold"] = model.config.threshold
    return cfg


def write_sae_dir(out: Path, files: dict[str, Any], tensors: dict[str, Any], weights_file: str) -> Path:
    """JSON ``files`` and one safetensors file of ``tensors`` (paths relative to ``out``) into
    ``out``, complete or not at all (a file at ``out`` or an unwritable parent refused in one line)."""
    check_replaceable(out, {Path(name).parts[0] for name in [*files, weights_file]}.__contains__)
    tmp = temporary_dir(out)
    try:
        for name, data in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(data, indent=2) + "\n")
        (tmp / weights_file).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp / weights_file))
        shareable(tmp / weights_file)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_saelens(config: ExportCheckpointConfig) -> Path:
    """Write ``config.checkpoint`` as a SAELens SAE directory at ``config.out``."""
    from bae.common.console import print_summary

    model = load_autoencoder(config.checkpoint)
    source = Source.of(model.provenance, config.store)
    hook_name = config.hook_name or saelens_hook(source)
    weights = from_autoencoder(model)
    cfg = saelens_config(model, weights, source, hook_name)
    out = write_sae_dir(Path(config.out), {CFG_FILE: cfg}, weights.tensors(), WEIGHTS_FILE)
    rows = {
        "architecture": f"{model.architecture} -> SAELens {cfg['architecture']}",
        "d_in x d_sae": f"{weights.d_in} x {weights.d_sae}",
        "model": source.model_name or "not recorded",
        "hook": hook_name,
        "context size": source.context_size or "not recorded",
        "load": f"SAE.load_from_disk({str(out)!r})"
        + ("  (after `import bae.interop.saelens_bae`)" if model.architecture == "bae" else ""),
    }
    print_summary(f"bae export saelens -> {out}", rows)
    return out


def check_architecture(path: Path, name: str) -> str:
    if name not in FROM_SAELENS:
        raise BaeError(
            f"{path}: SAELens architecture {name!r} has no bae counterpart (bae imports "
            f"{', '.join(FROM_SAELENS)})"
        )
    return name


def read_saelens(path: Path) -> ReadSae:
    """Load a SAELens SAE directory with SAELens' own loader (``standard``, ``topk`` or ``bae``)."""
    try:
        from sae_lens import SAE
    except ImportError as exc:
        raise BaeError("reading a SAELens checkpoint needs sae-lens: pip install 'bae[saelens]'") from exc
    import bae.interop.saelens_bae  # noqa: F401  (registers the "bae" architecture)

    try:  # refused before SAELens builds a class bae cannot hold (older configs name none: standard)
        check_architecture(path, json.loads((path / CFG_FILE).read_text()).get("architecture", "standard"))
        sae: Any = SAE.load_from_disk(path)
    except BaeError:
        raise
    except Exception as exc:  # SAELens reports a bad directory as KeyError, ValueError, OSError...
        raise BaeError(f"{path}: SAELens cannot load it: {first_line(exc)}") from exc
    cfg = sae.cfg
    name = check_architecture(path, cfg.architecture())  # a pre-6.0 topk config loads as topk
    unsupported = {
        "normalize_activations": cfg.normalize_activations != "none",
        "reshape_activations": cfg.reshape_activations != "none",
        "rescale_acts_by_decoder_norm": bool(getattr(cfg, "rescale_acts_by_decoder_norm", False)),
    }
    for field, bad in unsupported.items():
        if bad:
            raise BaeError(f"{path}: {field}={getattr(cfg, field)!r} is not supported (bae applies none)")
    weights = SaeWeights(sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, bool(cfg.apply_b_dec_to_input))
    options = {"topk": cfg.k} if name == "topk" else {"threshold": cfg.threshold} if name == "bae" else {}
    return ReadSae(weights, FROM_SAELENS[name], options, cfg.metadata.model_name, cfg.metadata.hook_name)
