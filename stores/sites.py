"""Hook sites a store holds (``bae harvest --hook``): what each is, and addressing a store layer by
its ``hidden_states`` index, its site key, or its site's name."""

from __future__ import annotations

import re
from typing import Any

from bae.common.errors import BaeError
from bae.stores.activation_store import ActivationStore


def store_sites(store: ActivationStore) -> dict[int, dict[str, Any]]:
    """The store's hook sites by their key on the layer axis (none for a store of layers only)."""
    return {int(record["layer"]): record for record in store.meta.get("sites") or []}


def describe_site(record: dict[str, Any]) -> str:
    """``17 = model.layers.1.mlp:output (first tensor of a tuple)``, and what it equals exactly."""
    text = f"{record['layer']} = {record['name']}"
    notes = [f"{record['module']}:{record['io']}"] if record.get("tl") else []
    if record.get("hidden_state") is not None:
        notes.append(f"= hidden_states[{record['hidden_state']}]")
    if record.get("tuple_output"):
        notes.append(f"first tensor of the module's tuple {record['io']}")
    return text + (f" ({', '.join(notes)})" if notes else "")


def site_lines(records: list[dict[str, Any]]) -> str:
    return "; ".join(describe_site(record) for record in records)


def layer_label(store: ActivationStore, layer: int) -> str:
    """A store layer as shown to users: its site's name, or the ``hidden_states`` index."""
    site = store_sites(store).get(layer)
    return f"{layer} ({site['name']})" if site else str(layer)


def site_names(record: dict[str, Any]) -> set[str]:
    """Every spelling that addresses a site: its name, ``module:io``, and the bare module for outputs."""
    names = {record["name"], f"{record['module']}:{record['io']}"}
    if record["io"] == "output":
        names.add(record["module"])
    return names


def resolve_layer(store: ActivationStore, value: int | str) -> int:
    """The store layer ``value`` addresses: an index (``6``), or a site's name or module path
    (``model.layers.1.mlp``, ``blocks.1.hook_mlp_out``); refused in one line if the store lacks it."""
    if isinstance(value, int) or value.strip().lstrip("-").isdigit():
        return int(value)
    sites = store_sites(store)
    for key, record in sites.items():
        if value.strip() in site_names(record):
            return key
    held = ", ".join(layer_label(store, layer) for layer in store.layers)
    raise BaeError(f"store {store.url} has no layer or hook site {value!r}; it holds {held}")


def layer_of_hook(name: str) -> int | None:
    """The ``hidden_states`` index a TransformerLens residual hook or sparsify hookpoint holds."""
    if name in ("embed_tokens", "drop", "emb_dropout"):
        return 0
    for pattern, offset in ((r"blocks\.(\d+)\.hook_resid_pre", 0), (r"blocks\.(\d+)\.hook_resid_post", 1)):
        match = re.fullmatch(pattern, name)
        if match:
            return int(match.group(1)) + offset
    match = re.fullmatch(r"(?:model\.)?(?:layers|h)[._](\d+)", name)
    return int(match.group(1)) + 1 if match else None
