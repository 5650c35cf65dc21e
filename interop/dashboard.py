"""``bae export dashboard``: features as SAEDashboard / Neuronpedia batch files.

The output is what SAEDashboard's ``neuronpedia-runner`` writes and Neuronpedia imports
(``NeuronpediaDashboardBatch`` in ``sae_dashboard.neuronpedia.neuronpedia_dashboard``): ``batch-<n>.json``
holding ``model_id``, ``layer``, ``sae_set``, ``sae_id_suffix`` and, per feature, ``feature_index``,
``frac_nonzero``, the decoder direction's top residual dimensions (``neuron_alignment_*``) and
``activations``: one per top context of ``bae features contexts``, its tokens and a value per token
(``qualifying_token_index`` marks the context's token). Per-token values are recomputed from the store
and checkpoint: a BAE bit's margin toward its rarer state (the encoder's pre-step value, signed;
0 where the bit is not in that state), an SAE feature's activation. ComSem explanations, when
``interpretation.json`` exists, go to ``explanations.jsonl`` in Neuronpedia's explanation fields.
The logit tables (``pos_str``/``neg_str``) list the tokens each decoder direction promotes and
suppresses most through the store's LLM unembedding. Left empty: histograms, correlated neurons and
features.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from bae.common.atomic_files import read_json, temporary_dir
from bae.common.console import print_summary
from bae.common.errors import BaeError, first_line
from bae.common.outputs import check_replaceable
from bae.interop.dashboard_config import DashboardExportConfig
from bae.pipeline.analysis.token_text import TokenText, load_store_tokenizer
from bae.pipeline.features.config import FeaturesConfig
from bae.pipeline.features.contexts import CONTEXTS_JSON, ContextReader, rarer_sign
from bae.pipeline.features.interpret import INTERPRETATION_JSON
from bae.pipeline.features.spec import scan_spec
from bae.stores import ActivationStore
from bae.trainer.models import Autoencoder, replace_dir

EXPLANATIONS_JSONL = "explanations.jsonl"
ALIGNMENT_DIMS = 3  # residual dimensions listed per feature, as SAEDashboard's feature tables
LOGIT_TOKENS = 10  # promoted and suppressed tokens listed per feature, as SAEDashboard lists them
DIGITS = 5  # values are rounded as SAEDashboard rounds them
_BATCH = re.compile(r"batch-\d+\.json")


def _features_config(config: DashboardExportConfig, recorded: dict[str, Any]) -> FeaturesConfig:
    overrides = {k: v for k, v in (("store", config.store), ("checkpoint", config.checkpoint)) if v}
    try:
        return FeaturesConfig(**{**recorded["config"], **overrides})
    except ValidationError as exc:
        raise BaeError(f"{config.features}/{CONTEXTS_JSON}: unreadable config ({first_line(exc)})") from None


def token_values(
    store: ActivationStore,
    layer: int,
    model: Autoencoder,
    wanted: list[tuple[int, list[int]]],
    sign: np.ndarray,
    batch_rows: int = 1024,
) -> list[np.ndarray]:
    """For each (feature, store rows): the feature's value at each row, reading every unit once.

    BAE: ``max(0, sign_j · pre_j)`` (its margin toward its rarer state); SAE: its activation.
    Memory: ``batch_rows`` rows × features at a time."""
    if not wanted:
        return []
    feats = np.concatenate([np.full(len(rows), j) for j, rows in wanted]).astype(np.int64)
    rows = np.concatenate([np.asarray(rows, np.int64) for _, rows in wanted])
    values = np.zeros(len(rows))
    units = rows // store.unit_rows
    for unit in np.unique(units):
        pick = np.flatnonzero(units == unit)
        local, inverse = np.unique(rows[pick] - unit * store.unit_rows, return_inverse=True)
        x = store.read_unit_layer(layer, int(unit))
        for a in range(0, len(local), batch_rows):
            part = (inverse >= a) & (inverse < a + batch_rows)
            with torch.no_grad():
                chunk = x[local[a : a + batch_rows]]
                if model.architecture == "bae":
                    value = (model.pre_activations(chunk).double() * torch.from_numpy(sign)).clamp(min=0)
                else:
                    value = model.analyse(chunk).code.double()
            values[pick[part]] = value.cpu().numpy()[inverse[part] - a, feats[pick[part]]]
    return np.split(values, np.cumsum([len(r) for _, r in wanted])[:-1])


def decoder_directions(model: Autoencoder, chunk: int = 1024) -> Iterator[np.ndarray]:
    """Raw-space decoder directions ``decode(e_j) − decode(0)`` [chunk, d], ``chunk`` features at a time
    (k-bit groups, the output standardization and decoder bias handled by ``decode`` itself)."""
    n = model.n_bits
    base = model.decode(torch.zeros(1, n))
    for start in range(0, n, chunk):
        yield (model.decode(torch.eye(n)[start : start + chunk]) - base).double().cpu().numpy()


def decoder_alignment(model: Autoencoder, k: int = ALIGNMENT_DIMS) -> list[dict[str, list]]:
    """Per feature, the ``k`` residual dimensions its decoder direction writes most to: indices,
    values and shares of the direction's L1 norm."""
    out = []
    for directions in decoder_directions(model):
        top = np.argsort(-np.abs(directions), axis=1)[:, :k]
        l1 = np.abs(directions).sum(1, keepdims=True)
        vals = np.take_along_axis(directions, top, 1)
        shares = np.abs(vals) / np.where(l1 > 0, l1, 1)
        out += [
            {
                "neuron_alignment_indices": t.tolist(),
                "neuron_alignment_values": np.round(v, DIGITS).tolist(),
                "neuron_alignment_l1": np.round(s, DIGITS).tolist(),
            }
            for t, v, s in zip(top, vals, shares)
        ]
    return out


def logit_effects(
    store: ActivationStore, model: Autoencoder, text: TokenText, k: int = LOGIT_TOKENS
) -> list[dict[str, list]] | None:
    """Per feature, the ``k`` tokens its decoder direction promotes and suppresses most through the
    store's LLM unembedding (``W_U (γ ⊙ direction)``, γ the final norm's weight where the model has
    one); None for a store that records no model."""
    from bae.pipeline.llm.load import EMBEDDED_ID, load_model

    spec = (store.meta.get("model") or {}).get("id")
    if not spec:
        return None
    llm = load_model(None if spec == EMBEDDED_ID else spec).model
    unembed = llm.get_output_embeddings()
    if unembed is None:
        raise BaeError(f"model {spec}: no output embedding to compute logit effects (pass --no-logits)")
    w_u = unembed.weight.detach().double()
    if w_u.shape[1] != model.config.d_model:
        raise BaeError(
            f"model {spec}: hidden size {w_u.shape[1]}, but the checkpoint reads {model.config.d_model} "
            "dimensions; no logit effects (pass --no-logits)"
        )
    norm = getattr(llm.base_model, "norm", None)
    gamma = norm.weight.detach().double() if norm is not None and norm.weight is not None else 1.0
    out = []
    for directions in decoder_directions(model):
        logits = (torch.from_numpy(directions) * gamma) @ w_u.T
        pos, neg = logits.topk(k, dim=1), (-logits).topk(k, dim=1)
        for pi, pv, ni, nv in zip(pos.indices, pos.values, neg.indices, neg.values):
            out.append(
                {
                    "pos_str": [text.decode([int(t)]) for t in pi],
                    "pos_values": np.round(pv.numpy(), DIGITS).tolist(),
                    "neg_str": [text.decode([int(t)]) for t in ni],
                    "neg_values": np.round(-nv.numpy(), DIGITS).tolist(),
                }
            )
    return out


def _model_id(store: ActivationStore, given: str | None) -> str:
    if given:
        return given
    model = (store.meta.get("model") or {}).get("id")
    return Path(str(model)).name.lower() if model else "unknown"


def dashboard_feature(
    record: dict[str, Any], activations: list[dict[str, Any]], alignment: dict, logits: dict | None
) -> dict:
    """One feature in SAEDashboard's ``NeuronpediaDashboardFeature`` fields."""
    return {
        "feature_index": record["feature"],
        **alignment,
        "correlated_neurons_indices": [],
        "correlated_neurons_l1": [],
        "correlated_neurons_pearson": [],
        "correlated_features_indices": [],
        "correlated_features_l1": [],
        "correlated_features_pearson": [],
        **(logits or {"neg_str": [], "neg_values": [], "pos_str": [], "pos_values": []}),
        "frac_nonzero": record["frequency"],
        "freq_hist_data_bar_values": [],
        "freq_hist_data_bar_heights": [],
        "logits_hist_data_bar_heights": [],
        "logits_hist_data_bar_values": [],
        "n_prompts_total": 0,
        "n_tokens_in_prompt": 0,
        "dataset": "",
        "decoder_weights_dist": [],
        "activations": activations,
        "vector": [],
    }


def _explanations(interpretation: dict[str, Any], model_id: str, source: str) -> list[dict[str, Any]]:
    """Neuronpedia explanation rows (its ``Explanation`` fields) of the features ComSem explained."""
    llm = interpretation["summary"].get("llm")
    return [
        {
            "modelId": model_id,
            "layer": source,
            "index": str(v["feature"]),
            "description": v["explanation"],
            "typeName": "bae-comsem",
            "explanationModelName": llm,
            "notes": f"ComSem score {v['score']:.3f}{' (interpretable)' if v['interpretable'] else ''}",
        }
        for v in interpretation["features"]
        if v.get("explanation")
    ]


def _exported(name: str) -> bool:
    """Whether a file name is one an export writes (a batch or the explanations)."""
    return bool(_BATCH.fullmatch(name)) or name == EXPLANATIONS_JSONL


def feature_activations(
    records: list[dict[str, Any]], reader: ContextReader, layer: int, model: Autoencoder
) -> list[list[dict[str, Any]]]:
    """Per feature, its top contexts as SAEDashboard activations: tokens, a value per token, the
    context's token marked."""
    windows = {(j, c["row"]): reader.window(c["row"]) for j, r in enumerate(records) for c in r["contexts"]}
    sign = rarer_sign(np.array([r["frequency"] for r in records]))
    wanted = [(j, w[0]) for (j, _), w in windows.items()]
    values = dict(zip(windows, token_values(reader.store, layer, model, wanted, sign)))
    pieces: dict[int, str] = {}

    def piece(token: int) -> str:
        if token not in pieces:
            pieces[token] = reader.text.decode([token])
        return pieces[token]

    features = []
    for j, record in enumerate(records):
        activations = []
        for c in record["contexts"]:
            (_, ids, at), v = windows[j, c["row"]], values[j, c["row"]]
            activations.append(
                {
                    "bin_min": -1,  # SAEDashboard's marks of the top-activations group
                    "bin_max": round(float(v.max(initial=0.0)), DIGITS),
                    "bin_contains": -1,
                    "tokens": [piece(t) for t in ids],
                    "values": np.round(v, DIGITS).tolist(),
                    "qualifying_token_index": at,
                }
            )
        features.append(activations)
    return features


def export_dashboard(config: DashboardExportConfig, quiet: bool = False) -> Path:
    """Write ``batch-<n>.json`` (and ``explanations.jsonl``) into ``config.out``, replacing it whole."""
    src = Path(config.features)
    data = read_json(src / CONTEXTS_JSON) if src.is_dir() else None
    if data is None:
        raise BaeError(f"{src}: no {CONTEXTS_JSON} there; run `bae features contexts --out {src}` first")
    out = check_replaceable(Path(config.out), _exported)
    features_config = _features_config(config, data)
    spec = scan_spec(features_config)
    store, model = spec.open()
    records = data["features"]
    if model.n_bits != len(records) or model.architecture != data["architecture"]:
        raise BaeError(
            f"{spec.checkpoint}: a {model.architecture} with {model.n_bits} features, but "
            f"{src / CONTEXTS_JSON} holds {len(records)} features of a {data['architecture']}"
        )
    text = TokenText(load_store_tokenizer(store, features_config.tokenizer))
    reader = ContextReader(store, text, features_config.context_before, features_config.context_after)
    features = feature_activations(records, reader, spec.layer, model)
    alignment = decoder_alignment(model)
    logits = logit_effects(store, model, text) if config.logits else None
    model_id = _model_id(store, config.model_id)
    tmp = temporary_dir(out)
    try:
        step = config.batch_features
        for n, start in enumerate(range(0, len(records), step)):
            batch = {
                "model_id": model_id,
                "layer": spec.layer,
                "sae_set": config.sae_set,
                "sae_id_suffix": None,
                "features": [
                    dashboard_feature(records[j], features[j], alignment[j], logits[j] if logits else None)
                    for j in range(start, min(start + step, len(records)))
                ],
            }
            (tmp / f"batch-{n}.json").write_text(json.dumps(batch, ensure_ascii=False), encoding="utf-8")
        interpretation = read_json(src / INTERPRETATION_JSON)
        explained = (
            _explanations(interpretation, model_id, f"{spec.layer}-{config.sae_set}")
            if interpretation
            else []
        )
        if explained:
            lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in explained)
            (tmp / EXPLANATIONS_JSONL).write_text(lines, encoding="utf-8")
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print_summary(
            f"bae export dashboard -> {out}",
            {
                "features": len(records),
                "batches": -(-len(records) // step),
                "contexts": sum(len(a) for a in features),
                "explanations": len(explained),
                "logit effects": "yes" if logits else "no (--no-logits or no model recorded)",
                "model_id / layer / sae_set": f"{model_id} / {spec.layer} / {config.sae_set}",
                "values": "margin toward the rarer state (0 elsewhere)"
                if model.architecture == "bae"
                else "activation",
            },
        )
    return out
