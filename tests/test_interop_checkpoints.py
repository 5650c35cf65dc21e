"""bae checkpoints to and from SAELens (loaded with SAELens' own loader) and sparsify (its documented
format; sparsify is not installed, so its files are checked field by field, read back with
SAELens' sparsify reader and round-tripped through bae)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bae_testing.stores import synthetic_rows, write_units
from bae_testing.tiny_models import tiny_config
from sae_lens import SAE, HookedSAETransformer, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file
from transformer_lens import HookedTransformerConfig
from transformers import AutoModelForCausalLM

from bae.common.errors import BaeError
from bae.interop.checkpoint_config import ExportCheckpointConfig, ImportCheckpointConfig
from bae.interop.checkpoint_import import import_checkpoint
from bae.interop.hook_names import Source, sparsify_hookpoint
from bae.interop.saelens import export_saelens
from bae.interop.saelens_bae import BinarySAE
from bae.interop.sparsify import export_sparsify
from bae.pipeline.features.compare import run_compare
from bae.pipeline.features.config import FeaturesConfig
from bae.stores import ActivationStore, StoreLayout
from bae.stores.sites import layer_of_hook
from bae.trainer import ModelConfig, build_autoencoder, load_autoencoder
from bae.trainer.config import TrainConfig
from bae.trainer.provenance import Provenance
from bae.trainer.run import train

D, LAYER, LAST = 16, 2, 3  # the tiny LLM has 3 blocks: hidden_states[3] is after its final norm
SAELENS_CLASS = {"relu_sae": StandardSAE, "topk_sae": TopKSAE, "bae": BinarySAE}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A store of layers 2 and 3 recording a real tiny Llama's config, and a BAE, a ReLU and a
    TopK SAE trained briefly on layer 2 (normalized objective: standardized, encoder-scaled)."""
    tmp = tmp_path_factory.mktemp("interop")
    llm = tiny_config("llama", 320).save_pretrained(tmp / "llm") or tmp / "llm"
    layout = StoreLayout(n_rows=1024, unit_rows=256, d_model=D, layers=[LAYER, LAST], dtype="float32")
    attrs = {"config": {}, "model": {"id": str(llm), "revision": None}, "context_length": 64}
    store = ActivationStore.create(str(tmp / "store.zarr"), layout, {**attrs, "corpus_fingerprint": "c0"})
    data = synthetic_rows(1024, D, [LAYER, LAST], seed=0, doc_len=16)
    data["layers"][LAYER] = data["layers"][LAYER] * 3 + 5  # off-centre, so standardization matters
    write_units(store, data, range(store.n_units))
    checkpoints = {}
    for arch in SAELENS_CLASS:
        out = tmp / arch
        options = {"architecture": arch, "topk": 4, "steps": 30, "batch_size": 48, "val_every": 30}
        train(
            TrainConfig.model_validate({"store": store.url, "layer": LAYER, "out": str(out), **options}),
            False,
        )
        checkpoints[arch] = out / "model"
    return tmp, store, data, checkpoints


def export(write, checkpoint, out, **options) -> Path:
    """``export_saelens`` or ``export_sparsify`` of ``checkpoint`` into ``out``."""
    return write(ExportCheckpointConfig(checkpoint=str(checkpoint), out=str(out), **options))


def import_sae(src, out, **options) -> Path:
    return import_checkpoint(ImportCheckpointConfig(src=str(src), out=str(out), **options))


def rows(data, n=200, seed=1) -> torch.Tensor:
    """Store rows and random rows of their scale."""
    x = torch.from_numpy(data["layers"][LAYER][:n])
    noise = torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * x.std() + x.mean()
    return torch.cat([x, noise])


def assert_same_function(model, sae, x: torch.Tensor) -> None:
    """SAELens' encode/decode equal bae's analyse/reconstruct; binary codes bit for bit."""
    ours = model.analyse(x)
    theirs = sae.encode(x)
    if model.architecture == "bae":
        assert torch.equal(theirs > 0, ours.bits)
    else:
        torch.testing.assert_close(theirs, ours.code, rtol=1e-4, atol=1e-5)
    decoded = model.reconstruct(ours.decoder_input)
    torch.testing.assert_close(sae.decode(theirs), decoded, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", list(SAELENS_CLASS))
def test_export_saelens_loads_with_saelens_and_computes_the_same(env, arch):
    tmp, _, data, checkpoints = env
    out = export(export_saelens, checkpoints[arch], tmp / f"sl-{arch}")
    sae = SAE.load_from_disk(out)
    model = load_autoencoder(checkpoints[arch])
    assert type(sae) is SAELENS_CLASS[arch] and model.config.standardize and model.config.encoder_scale
    meta = sae.cfg.metadata
    assert (meta.hook_name, meta.hook_layer, meta.context_size) == ("blocks.2.hook_resid_pre", 2, 64)
    assert meta.model_name == str(tmp / "llm") and sae.cfg.d_in == D and sae.cfg.d_sae == model.n_bits
    if arch == "topk_sae":
        assert sae.cfg.k == 4
    assert_same_function(model, sae, rows(data))


def test_saelens_tools_splice_the_exported_bae_at_its_hook(env):
    """SAELens' HookedSAETransformer takes the BinarySAE at blocks.2.hook_resid_pre of a (tiny,
    random) TransformerLens model: its cached code is bae's bits of that hook's clean activations."""
    tmp, _, _, checkpoints = env
    sae = SAE.load_from_disk(export(export_saelens, checkpoints["bae"], tmp / "tl-bae"))
    torch.manual_seed(0)
    shape = HookedTransformerConfig(
        n_layers=3, d_model=D, n_ctx=8, d_head=4, n_heads=4, d_vocab=50, act_fn="relu"
    )
    llm = HookedSAETransformer(shape)
    tokens = torch.arange(8)[None]
    _, clean = llm.run_with_cache(tokens)
    _, spliced = llm.run_with_cache_with_saes(tokens, saes=[sae])
    expected = load_autoencoder(checkpoints["bae"]).encode(clean["blocks.2.hook_resid_pre"][0])
    assert expected.any() and not expected.all()
    assert torch.equal(spliced["blocks.2.hook_resid_pre.hook_sae_acts_post"][0] > 0, expected)


def test_bae_with_k_bits_per_dimension_std_and_no_decoder_bias(tmp_path):
    """The other folding path: b_dec carries the input mean (apply_b_dec_to_input), 2 bits per feature."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=D, k_bits=2, standardize=True, encoder_scale=True, decoder_bias=False)
    model = build_autoencoder(cfg, Provenance(layer=LAYER, d_model=D, model={"id": "org/llm"}))
    model.set_normalization(torch.randn(D), torch.rand(D) + 0.5)
    model.encoder_input_scale.copy_(torch.rand(D) + 0.5)
    model.save_pretrained(tmp_path / "bae")
    hook = "blocks.2.hook_resid_pre"
    out = export(export_saelens, tmp_path / "bae", tmp_path / "sl")
    sae = SAE.load_from_disk(out)
    assert isinstance(sae, BinarySAE) and sae.cfg.apply_b_dec_to_input and sae.cfg.d_sae == 2 * 4 * D
    assert sae.cfg.metadata.hook_name == hook and torch.equal(sae.b_dec, model.input_mean)
    x = torch.randn(300, D) * 3
    assert_same_function(model.eval(), sae, x)
    torch.testing.assert_close(sae(x), model.decode(model.encode(x)), rtol=1e-4, atol=1e-4)
    with pytest.raises(NotImplementedError, match="cannot absorb its decoder norms"):
        sae.fold_W_dec_norm()  # a ReLU SAE's trick; on bits it would change the reconstruction


def saelens_sae(kind: str, apply_b_dec: bool, d_sae: int = 40) -> SAE:
    """An SAE made by SAELens' own constructors, with random weights and biases."""
    meta = SAEMetadata(model_name="org/llm", hook_name="blocks.1.hook_resid_post", context_size=128)
    common = {"d_in": D, "d_sae": d_sae, "apply_b_dec_to_input": apply_b_dec, "metadata": meta}
    if kind == "topk":
        sae: SAE = TopKSAE(TopKSAEConfig(k=5, **common))
    else:
        sae = StandardSAE(StandardSAEConfig(**common))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return sae


@pytest.mark.parametrize(("kind", "apply_b_dec"), [("standard", True), ("topk", False)])
def test_saelens_to_bae_to_saelens_round_trip(tmp_path, kind, apply_b_dec):
    sae = saelens_sae(kind, apply_b_dec)
    sae.save_model(tmp_path / "sl")
    out = import_sae(tmp_path / "sl", tmp_path / "bae")
    model = load_autoencoder(out)
    assert model.architecture == {"standard": "relu_sae", "topk": "topk_sae"}[kind]
    assert model.n_bits == 40 and model.provenance.layer == 2  # hook_resid_post of block 1
    x = torch.randn(200, D) * 2
    assert_same_function(model, sae, x)
    back = export(export_saelens, out, tmp_path / "back")
    again = SAE.load_from_disk(back)
    assert type(again) is type(sae) and again.cfg.apply_b_dec_to_input == apply_b_dec
    for name, tensor in sae.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    assert again.cfg.metadata.model_name == "org/llm"


def numpy_sparsify(cfg: dict, tensors: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sparsify's SparseCoder.encode/decode as its source writes them: top-k of
    ReLU((x − b_dec) @ encoder.weightᵀ + encoder.bias), then acts @ W_dec + b_dec (dense code)."""
    t = {k: v.double().numpy() for k, v in tensors.items()}
    pre = np.maximum((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"], 0)
    top = np.argsort(-pre, axis=1)[:, : cfg["k"]]
    code = np.zeros_like(pre)
    np.put_along_axis(code, top, np.take_along_axis(pre, top, axis=1), axis=1)
    return code, code @ t["W_dec"] + t["b_dec"]


SPARSIFY_CFG = {  # sparsify's SparseCoderConfig fields, and d_in (SparseCoder.save_to_disk)
    "activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
    "skip_connection", "transcode", "d_in",
}  # fmt: skip


def test_export_sparsify_format_and_round_trip(env):
    tmp, _, data, checkpoints = env
    out = export(export_sparsify, checkpoints["topk_sae"], tmp / "sp")
    hookpoint = out / "layers.1"  # hidden_states[2] is the output of block 1
    cfg = json.loads((hookpoint / "cfg.json").read_text())
    tensors = load_file(str(hookpoint / "sae.safetensors"))
    n = load_autoencoder(checkpoints["topk_sae"]).n_bits
    assert set(cfg) == SPARSIFY_CFG and (cfg["activation"], cfg["k"], cfg["d_in"]) == ("topk", 4, D)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "encoder.weight": (n, D), "encoder.bias": (n,), "W_dec": (n, D), "b_dec": (D,)
    }  # fmt: skip
    assert json.loads((out / "config.json").read_text())["hookpoints"] == ["layers.1"]
    model = load_autoencoder(checkpoints["topk_sae"])
    x = rows(data)
    code, recon = numpy_sparsify(cfg, tensors, x.double().numpy())
    ours = model.analyse(x)
    np.testing.assert_allclose(code, ours.code.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(recon, model.reconstruct(ours.decoder_input).numpy(), rtol=1e-4, atol=1e-4)
    # SAELens' reader of sparsify directories sees the same SAE
    cfg_dict, state = sparsify_disk_loader(hookpoint, cfg_overrides={"dtype": "float32"})
    assert cfg_dict["hook_name"] == "blocks.1.hook_resid_post" and cfg_dict["apply_b_dec_to_input"]
    assert state["W_dec"].shape == (D, n)  # SAELens 6.54 transposes sparsify's W_dec [n, d] (its own
    state["W_dec"] = state["W_dec"].T  # test expects W_dec.T), so its SAEs cannot load it as it is
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=n, k=4, apply_b_dec_to_input=True))
    sae.load_state_dict(state)
    torch.testing.assert_close(sae.encode(x), ours.code, rtol=1e-4, atol=1e-5)
    # sparsify -> bae -> sparsify: the same files
    imported = import_sae(out, tmp / "sp-bae")
    assert load_autoencoder(imported).provenance.layer == LAYER
    back = export(export_sparsify, imported, tmp / "sp-back")
    assert json.loads((back / "layers.1" / "cfg.json").read_text()) == cfg
    again = load_file(str(back / "layers.1" / "sae.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in tensors.items())


def test_imported_checkpoint_in_features_compare(env, tmp_path):
    _, store, data, checkpoints = env
    sae = saelens_sae("topk", apply_b_dec=True, d_sae=4 * D)
    sae.save_model(tmp_path / "sl")
    import_sae(tmp_path / "sl", tmp_path / "imported", store=store.url, layer=LAYER)
    recorded = load_autoencoder(tmp_path / "imported").provenance
    assert (recorded.store, recorded.layer, recorded.corpus_fingerprint) == (store.url, LAYER, "c0")
    both = [str(checkpoints["bae"]), str(tmp_path / "imported")]
    config = FeaturesConfig(store=store.url, checkpoints=both, out=str(tmp_path / "cmp"))
    table = run_compare(config, show_progress=False, evaluate=False)
    assert [r["architecture"] for r in table] == ["bae", "topk_sae"]
    x = torch.from_numpy(data["layers"][LAYER][data["valid"]])  # what compare reads: the valid rows
    assert table[1]["mean_l0"] == pytest.approx(
        (sae.encode(x) > 0).sum(dim=1).double().mean().item(), abs=1e-3
    )


def test_bad_inputs_are_one_line_errors(env, tmp_path):
    _, _, _, checkpoints = env
    (tmp_path / "jr").mkdir()
    (tmp_path / "jr" / "cfg.json").write_text(json.dumps({"architecture": "jumprelu", "d_in": D}))
    (tmp_path / "jr" / "sae_weights.safetensors").write_bytes(b"")
    with pytest.raises(BaeError, match="architecture 'jumprelu' has no bae counterpart"):
        import_sae(tmp_path / "jr", tmp_path / "o")
    (tmp_path / "jr" / "cfg.json").write_text("{")
    with pytest.raises(BaeError, match="SAELens cannot load it: Expecting property name"):
        import_sae(tmp_path / "jr", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaeError, match="not a SAELens or sparsify SAE directory"):
        import_sae(tmp_path / "empty", tmp_path / "o")
    for arch in ("bae", "relu_sae"):
        with pytest.raises(BaeError, match=f"is a {arch}: sparsify holds TopK SAEs only"):
            export(export_sparsify, checkpoints[arch], tmp_path / "o")
    last = load_autoencoder(checkpoints["relu_sae"])
    last.provenance = last.provenance.model_copy(update={"layer": LAST})
    last.save_pretrained(tmp_path / "last")
    with pytest.raises(BaeError, match=r"last hidden state.*pass --hook-name"):
        export(export_saelens, tmp_path / "last", tmp_path / "o")
    named = export(export_saelens, tmp_path / "last", tmp_path / "o", hook_name="ln_final.hook_normalized")
    assert SAE.load_from_disk(named).cfg.metadata.hook_name == "ln_final.hook_normalized"
    other = ActivationStore.create(
        str(tmp_path / "d8.zarr"), StoreLayout(n_rows=8, d_model=8, layers=[2]), {}
    )
    saelens_sae("standard", True).save_model(tmp_path / "sl")
    with pytest.raises(BaeError, match=r"d_in=16 states, but store .* d_model=8"):
        import_sae(tmp_path / "sl", tmp_path / "o2", store=other.url)
    assert not (tmp_path / "o2").exists()
    # an output directory holding anything these commands do not write is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for run in (
        lambda: export(export_saelens, checkpoints["relu_sae"], tmp_path / "mine"),
        lambda: export(export_sparsify, checkpoints["topk_sae"], tmp_path / "mine"),
        lambda: import_sae(tmp_path / "sl", tmp_path / "mine"),
    ):
        with pytest.raises(BaeError, match=r"holds 'notes\.txt', not an export"):
            run()
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    again = export(export_saelens, checkpoints["relu_sae"], named)  # an earlier export is replaced
    assert SAE.load_from_disk(again).cfg.metadata.hook_name != "ln_final.hook_normalized"


CLI = """
import sys
from bae.cli import main
for argv in sys.argv[1:]:
    sys.argv = ["bae", *argv.split("|")]
    try:
        main()
    except SystemExit as exit:
        print("exit", exit.code)
print("sae_lens imported:", "sae_lens" in sys.modules)
"""


def test_cli_without_sae_lens_at_start_up(env, tmp_path):
    """The real commands: `bae export saelens` writes what SAELens loads without importing SAELens
    (seconds to import; kept out of bae's start-up), a missing source is one line and exit 2."""
    _, _, data, checkpoints = env
    export_args = f"export|saelens|{checkpoints['topk_sae']}|{tmp_path / 'cli'}"
    missing = f"import-checkpoint|{tmp_path / 'nowhere'}|{tmp_path / 'o'}"
    proc = subprocess.run(
        [sys.executable, "-c", CLI, export_args, missing], capture_output=True, text=True, timeout=600
    )
    assert proc.stdout.splitlines()[-2:] == ["exit 2", "sae_lens imported: False"], proc.stderr
    assert proc.stderr == f"error: {tmp_path / 'nowhere'}: no such directory\n"
    assert "blocks.2.hook_resid_pre" in proc.stdout
    assert_same_function(
        load_autoencoder(checkpoints["topk_sae"]), SAE.load_from_disk(tmp_path / "cli"), rows(data)
    )


@pytest.mark.parametrize("kind", ["llama", "neox", "gpt2"])
def test_sparsify_hookpoints_are_the_modules_that_output_the_hidden_states(tmp_path, kind):
    """For hidden_states[0], [2] and [n_layers] of a real (tiny) HF model, the derived hookpoint is
    the base model's module whose output equals that hidden state; a block's reads back as the layer."""
    config = tiny_config(kind, 320)
    config.save_pretrained(tmp_path)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(config).eval()
    outputs = {}
    for layer in (0, 2, LAST):
        name = sparsify_hookpoint(Source(Provenance(layer=layer, model={"id": str(tmp_path)})))
        module = llm.base_model.get_submodule(name)
        module.register_forward_hook(lambda _m, _i, out, layer=layer: outputs.__setitem__(layer, out))
        assert layer_of_hook(name) == (layer if layer < LAST else None)  # the final norm needs --layer
    with torch.no_grad():
        hidden = llm(torch.arange(2, 12)[None], output_hidden_states=True).hidden_states
    for layer, out in outputs.items():
        torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, hidden[layer])
